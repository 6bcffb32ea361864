//! The MQTT task's configuration, already validated (the binary builds it from the environment
//! and flags).

use std::fmt;
use std::time::Duration;

use mkb_bridge::QoS;

/// MQTT protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttVersion {
    V311,
    V5,
}

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
    /// `KAFKA_DLQ_TOPIC`: where a message read past for its size is reported.
    pub dead_letter_topic: Option<String>,
    /// MQTT 5 Receive Maximum: unacknowledged QoS 1/2 messages the broker may send at once.
    pub receive_maximum: u16,
    pub credentials: Option<Credentials>,
    /// TLS connector, built (and its files checked) before the task starts.
    pub tls: Option<native_tls::TlsConnector>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub ack_mode: AckMode,
    /// How long a shutdown waits for the acknowledgements of messages already passed on.
    pub shutdown_grace: Duration,
    /// `MQTT_TRANSPORT=ws`: MQTT over WebSockets to this path (`MQTT_WS_PATH`); `None`: TCP.
    pub websocket_path: Option<String>,
}

impl MqttConfig {
    /// The broker as logs name it: `host:port`, and the WebSocket URL's scheme and path when
    /// there is one.
    pub fn broker_label(&self) -> String {
        match &self.websocket_path {
            None => format!("{}:{}", self.host, self.port),
            Some(path) => {
                let scheme = if self.tls.is_some() { "wss" } else { "ws" };
                format!("{scheme}://{}:{}{path}", self.host, self.port)
            }
        }
    }
}

/// When QoS 1/2 messages are acknowledged to the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// Once Kafka or the fsynced disk spool holds the message: a crash loses nothing.
    AfterWrite,
    /// On arrival, as other bridges do: faster, but a crash loses what was in flight.
    OnReceipt,
}
