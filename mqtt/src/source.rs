//! The MQTT client task. It alone polls the rumqttc event loop, so the connection (keep-alive,
//! acks, reconnects) is serviced from one place, and it never awaits a client request from that
//! loop (those go through `try_` calls), which would deadlock when the request channel is full.

use std::future::Future;
use std::time::Duration;

use mkb_bridge::{Message, QoS};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::{Backoff, MqttMetrics};

/// Everything the MQTT task needs, already validated.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// Topic filters (wildcards and `$share/group/filter` allowed); never empty.
    pub filters: Vec<String>,
    pub qos: QoS,
    pub keep_alive: Duration,
    /// With `false` the broker keeps the session (and queues QoS 1/2 messages) while the bridge
    /// is away; needs a stable client id.
    pub clean_session: bool,
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet_size: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// The MQTT client task; see the crate documentation.
pub struct MqttSource {
    config: MqttConfig,
    metrics: MqttMetrics,
}

/// How long a shutdown waits for the DISCONNECT packet to go out.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

impl MqttSource {
    pub fn new(config: MqttConfig, metrics: MqttMetrics) -> Self {
        Self { config, metrics }
    }

    /// Runs until `shutdown` completes, then disconnects and drops `output`.
    pub async fn run(self, output: mpsc::Sender<Message>, shutdown: impl Future<Output = ()>) {
        let config = &self.config;
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options
            .set_keep_alive(config.keep_alive)
            .set_clean_session(config.clean_session)
            .set_max_packet_size(config.max_packet_size, config.max_packet_size);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let filters: Vec<SubscribeFilter> = config
            .filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), to_rumqttc_qos(config.qos)))
            .collect();
        let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
        tokio::pin!(shutdown);

        loop {
            let event = tokio::select! {
                biased;
                () = &mut shutdown => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let qos = from_rumqttc_qos(publish.qos);
                    self.metrics.received(qos).inc();
                    let message = Message {
                        topic: publish.topic,
                        payload: publish.payload,
                        qos,
                        received_at: Instant::now(),
                    };
                    if output.send(message).await.is_err() {
                        error!("Batcher stopped before the MQTT task; no longer reading MQTT.");
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                    backoff.reset();
                    self.metrics.connected.set(1);
                    info!(
                        broker = %format_args!("{}:{}", config.host, config.port),
                        client_id = %config.client_id,
                        session_present = connack.session_present,
                        "Connected to MQTT broker."
                    );
                    // Subscribing again when the session survived is harmless and covers a
                    // changed filter list between runs.
                    if let Err(e) = client.try_subscribe_many(filters.clone()) {
                        error!(error = %e, "Could not queue the MQTT subscription.");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(suback))) => {
                    let all_granted = suback
                        .return_codes
                        .iter()
                        .all(|code| matches!(code, SubscribeReasonCode::Success(_)));
                    self.metrics.subscribed.set(i64::from(all_granted));
                    for (filter, code) in config.filters.iter().zip(&suback.return_codes) {
                        match code {
                            SubscribeReasonCode::Success(granted) => {
                                info!(filter = %filter, granted_qos = ?granted, "Subscribed.");
                            }
                            SubscribeReasonCode::Failure => {
                                error!(filter = %filter, "The MQTT broker refused the subscription.");
                            }
                        }
                    }
                }
                Ok(event) => debug!(?event, "MQTT event."),
                Err(e) => {
                    self.metrics.connected.set(0);
                    self.metrics.subscribed.set(0);
                    self.metrics.reconnects.inc();
                    let delay = backoff.next_delay();
                    log_connection_error(config, &e, delay);
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }

        self.metrics.connected.set(0);
        self.metrics.subscribed.set(0);
        disconnect(&client, &mut eventloop).await;
        info!("MQTT task stopped.");
    }
}

fn log_connection_error(config: &MqttConfig, error: &ConnectionError, retry_in: Duration) {
    let broker = format!("{}:{}", config.host, config.port);
    match error {
        // A refusal needs an operator (credentials, client id, ACLs); retrying alone will not help.
        ConnectionError::ConnectionRefused(code) => error!(
            broker = %broker, code = ?code, retry_in = ?retry_in,
            "MQTT broker refused the connection."
        ),
        _ => warn!(
            broker = %broker, error = %error, retry_in = ?retry_in,
            "MQTT connection failed, reconnecting."
        ),
    }
}

/// Sends DISCONNECT and polls until it is written (or the grace period ends).
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

fn to_rumqttc_qos(qos: QoS) -> rumqttc::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

fn from_rumqttc_qos(qos: rumqttc::QoS) -> QoS {
    match qos {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}
