//! An MQTT publisher for the tests: a rumqttc client whose event loop runs on its own task and
//! counts the broker's acknowledgements, so a test knows when QoS 1 publishes are in the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;

pub struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Connects to the broker on 127.0.0.1:`port` and waits for its CONNACK.
    pub async fn connect(port: u16) -> Self {
        Self::connect_as(port, None).await
    }

    /// Connects with a user name and password.
    pub async fn connect_as(port: u16, credentials: Option<(&str, &str)>) -> Self {
        let mut options = MqttOptions::new(format!("pub-{}", crate::unique()), "127.0.0.1", port);
        // Large enough for the oversized messages the bad-input tests send.
        options
            .set_max_packet_size(64 << 20, 64 << 20)
            .set_keep_alive(Duration::from_secs(30));
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let acked = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let task = {
            let acked = acked.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connections.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        let publisher = Self {
            client,
            acked,
            connections,
            task,
        };
        let connections = publisher.connections.clone();
        crate::eventually(Duration::from_secs(10), "publisher CONNACK", || {
            let connected = connections.load(Ordering::Relaxed) > 0;
            async move { connected.then_some(()) }
        })
        .await;
        publisher
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: QoS) {
        self.client
            .publish(topic, qos, false, payload.into())
            .await
            .expect("publisher event loop runs");
    }

    /// Waits until the broker acknowledged `count` QoS 1/2 publishes over one connection.
    /// After a reconnect the client sends its unacknowledged publishes again, and a QoS 1
    /// publish sent again is a new message to the broker: a copy behind later ones, which an
    /// order check would blame on the bridge.
    pub async fn wait_acked_in_one_connection(&self, count: u64) {
        self.wait_acked(count).await;
        let connections = self.connections.load(Ordering::Relaxed);
        assert_eq!(
            connections, 1,
            "the test's publisher connected {connections} times: its publishes sent again are \
             new messages to the broker, so the order checks do not hold"
        );
    }

    /// Publishes acknowledged by the broker so far (QoS 1/2).
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until the broker acknowledged `count` QoS 1/2 publishes in all.
    pub async fn wait_acked(&self, count: u64) {
        let acked = self.acked.clone();
        crate::eventually(
            Duration::from_secs(30),
            &format!("{count} publishes acknowledged by the broker"),
            || {
                let done = acked.load(Ordering::Relaxed) >= count;
                async move { done.then_some(()) }
            },
        )
        .await;
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Messages a [`Subscriber`] received: topic and payload, in order.
type Received = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// An MQTT subscriber for the downlink tests: a persistent session on `filter` at QoS 1 that
/// keeps every message it receives, topic and payload, in order.
pub struct Subscriber {
    received: Received,
    /// MQTT 5 subscribers: each message's properties, in the order of `received`.
    properties: Arc<std::sync::Mutex<Vec<Option<PublishProperties>>>>,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// Connects to 127.0.0.1:`port`, subscribes to `filter` and waits for the SUBACK.
    pub async fn connect(port: u16, filter: &str) -> Self {
        let mut options = MqttOptions::new(format!("sub-{}", crate::unique()), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(false)
            .set_max_packet_size(64 << 20, 64 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let received: Received = Arc::default();
        let subscribed = Arc::new(AtomicU64::new(0));
        let task = {
            let (received, subscribed) = (received.clone(), subscribed.clone());
            let filter = filter.to_owned();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subscribed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Packet::Publish(publish))) => {
                            received
                                .lock()
                                .expect("lock")
                                .push((publish.topic, publish.payload.to_vec()));
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        wait_subscribed(&subscribed).await;
        Self {
            received,
            properties: Arc::default(),
            task,
        }
    }

    /// [`Subscriber::connect`] under MQTT 5, keeping each message's properties.
    pub async fn connect_v5(port: u16, filter: &str) -> Self {
        use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
        use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};
        let mut options = Options5::new(format!("sub5-{}", crate::unique()), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(64 << 20));
        let (client, mut eventloop) = Client5::new(options, 1024);
        let received: Received = Arc::default();
        let properties: Arc<std::sync::Mutex<Vec<Option<PublishProperties>>>> = Arc::default();
        let subscribed = Arc::new(AtomicU64::new(0));
        let task = {
            let (received, properties, subscribed) =
                (received.clone(), properties.clone(), subscribed.clone());
            let filter = filter.to_owned();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event5::Incoming(Packet5::ConnAck(_))) => {
                            let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                            let _ = client.subscribe(filter.clone(), qos).await;
                        }
                        Ok(Event5::Incoming(Packet5::SubAck(_))) => {
                            subscribed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event5::Incoming(Packet5::Publish(publish))) => {
                            // Both under one lock order: received, then properties.
                            let mut received = received.lock().expect("lock");
                            received.push((
                                String::from_utf8_lossy(&publish.topic).into_owned(),
                                publish.payload.to_vec(),
                            ));
                            properties.lock().expect("lock").push(publish.properties);
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        wait_subscribed(&subscribed).await;
        Self {
            received,
            properties,
            task,
        }
    }

    /// MQTT 5: the properties of each message received so far, in order.
    pub fn properties(&self) -> Vec<Option<PublishProperties>> {
        self.properties.lock().expect("lock").clone()
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().expect("lock").clone()
    }

    /// Waits until `done` holds for what was received, failing the test after `deadline`.
    pub async fn wait_until(
        &self,
        deadline: Duration,
        what: &str,
        done: impl Fn(&[(String, Vec<u8>)]) -> bool,
    ) -> Vec<(String, Vec<u8>)> {
        crate::eventually(deadline, what, || {
            let received = self.received();
            let ok = done(&received);
            async move { ok.then_some(received) }
        })
        .await
    }
}

async fn wait_subscribed(subscribed: &AtomicU64) {
    crate::eventually(Duration::from_secs(10), "subscriber SUBACK", || {
        let done = subscribed.load(Ordering::Relaxed) > 0;
        async move { done.then_some(()) }
    })
    .await;
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
