//! An MQTT publisher for the tests: a rumqttc client whose event loop runs on its own task and
//! counts the broker's acknowledgements, so a test knows when QoS 1 publishes are in the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
