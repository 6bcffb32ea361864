//! The MQTT client task. It alone polls the connection, so keep-alive, acks and reconnects are
//! serviced from one place, and it never awaits a client request from that loop (requests are
//! queued with `try_` calls): awaiting one while the request channel is full would deadlock.
//!
//! It reports its state on a watch channel ([`MqttStatus`]) for readiness, and reconnects
//! forever: the only way out of the loop is the shutdown signal.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mkb_bridge::{Message, QoS};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::connection::{Connection, Incoming, MqttVersion, PollError};
use crate::{Backoff, MqttMetrics};

/// User name and password for the MQTT broker. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Everything the MQTT task needs, already validated.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub version: MqttVersion,
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
    /// MQTT 5 Receive Maximum: unacknowledged QoS 1/2 messages the broker may send at once.
    pub receive_maximum: u16,
    pub credentials: Option<Credentials>,
    /// TLS client configuration, built (and its files checked) before the task starts.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// The MQTT connection's state, as readiness needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MqttStatus {
    pub connected: bool,
    /// Every filter granted on the current connection.
    pub subscribed: bool,
    /// The latest connection or subscription problem, cleared once subscribed.
    pub last_error: Option<String>,
}

/// The MQTT client task; see the module documentation.
pub struct MqttSource {
    config: MqttConfig,
    metrics: MqttMetrics,
    status: watch::Sender<MqttStatus>,
}

/// How long a shutdown waits for the broker to close the connection after DISCONNECT.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

impl MqttSource {
    pub fn new(config: MqttConfig, metrics: MqttMetrics) -> Self {
        let (status, _) = watch::channel(MqttStatus::default());
        Self {
            config,
            metrics,
            status,
        }
    }

    /// Follows the connection's state.
    pub fn status(&self) -> watch::Receiver<MqttStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` completes, then disconnects and drops `output`.
    pub async fn run(self, output: mpsc::Sender<Message>, shutdown: impl Future<Output = ()>) {
        let config = &self.config;
        let broker = format!("{}:{}", config.host, config.port);
        let mut connection = Connection::new(config, config.tls.clone());
        let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
        tokio::pin!(shutdown);

        loop {
            let event = tokio::select! {
                biased;
                () = &mut shutdown => break,
                event = connection.poll() => event,
            };
            match event {
                Ok(Incoming::Publish {
                    topic,
                    payload,
                    qos,
                }) => {
                    if !self.forward(&output, topic, payload, qos).await {
                        return;
                    }
                }
                Ok(Incoming::ConnAck { session_present }) => {
                    backoff.reset();
                    self.metrics.connected.set(1);
                    self.status.send_modify(|s| s.connected = true);
                    info!(
                        broker = %broker, client_id = %config.client_id, session_present,
                        "Connected to MQTT broker."
                    );
                    // Subscribing again when the session survived is harmless and covers a
                    // changed filter list between runs.
                    if let Err(e) = connection.subscribe(&config.filters, config.qos) {
                        error!(error = %e, "Could not queue the MQTT subscription.");
                    }
                }
                Ok(Incoming::SubAck(granted)) => self.on_suback(&granted),
                Ok(Incoming::Disconnected | Incoming::Other) => {}
                Err(e) => {
                    let delay = backoff.next_delay();
                    self.on_connection_error(&broker, &e, delay);
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }

        self.set_disconnected(None);
        self.drain(&mut connection, &output).await;
        info!("MQTT task stopped.");
    }

    /// Hands one message on; `false` when the rest of the pipeline is gone.
    async fn forward(
        &self,
        output: &mpsc::Sender<Message>,
        topic: String,
        payload: bytes::Bytes,
        qos: QoS,
    ) -> bool {
        self.metrics.received(qos).inc();
        let message = Message {
            topic,
            payload,
            qos,
            received_at: Instant::now(),
        };
        if output.send(message).await.is_err() {
            error!("Batcher stopped before the MQTT task; no longer reading MQTT.");
            return false;
        }
        true
    }

    fn on_suback(&self, granted: &[Result<QoS, String>]) {
        let mut refused = Vec::new();
        for (filter, result) in self.config.filters.iter().zip(granted) {
            match result {
                Ok(qos) => info!(filter = %filter, granted_qos = qos.level(), "Subscribed."),
                Err(reason) => {
                    error!(filter = %filter, reason = %reason, "MQTT subscription refused.");
                    refused.push(format!("{filter}: {reason}"));
                }
            }
        }
        let subscribed = refused.is_empty();
        self.metrics.subscribed.set(i64::from(subscribed));
        self.status.send_modify(|s| {
            s.subscribed = subscribed;
            s.last_error =
                (!subscribed).then(|| format!("subscription refused ({})", refused.join("; ")));
        });
    }

    fn on_connection_error(&self, broker: &str, error: &PollError, retry_in: Duration) {
        self.metrics.reconnects.inc();
        self.set_disconnected(Some(error.message.clone()));
        if error.refused {
            error!(broker = %broker, error = %error.message, retry_in = ?retry_in,
                "MQTT connection refused, retrying.");
        } else {
            warn!(broker = %broker, error = %error.message, retry_in = ?retry_in,
                "MQTT connection failed, retrying.");
        }
    }

    fn set_disconnected(&self, error: Option<String>) {
        self.metrics.connected.set(0);
        self.metrics.subscribed.set(0);
        self.status.send_modify(|s| {
            s.connected = false;
            s.subscribed = false;
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// Sends DISCONNECT and keeps reading until the broker closes the connection, so messages
    /// it had already sent are passed on rather than left in the socket.
    async fn drain(&self, connection: &mut Connection, output: &mpsc::Sender<Message>) {
        if !connection.disconnect() {
            return;
        }
        let drained = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match connection.poll().await {
                    Ok(Incoming::Publish {
                        topic,
                        payload,
                        qos,
                    }) => {
                        if !self.forward(output, topic, payload, qos).await {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_closed) => return,
                }
            }
        })
        .await;
        if drained.is_err() {
            debug!("MQTT broker did not close the connection after DISCONNECT in time.");
        }
    }
}
