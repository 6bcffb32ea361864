//! The hand-offs of the pipeline: [`Message`] (from MQTT), [`Record`] (ready for Kafka) and
//! [`Batch`] (what the Kafka task writes in one go).

use bytes::Bytes;
use tokio::time::Instant;

use crate::dead_letter::DeadLetter;

/// MQTT quality of service of a received message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The level as a number, as MQTT and the configuration write it.
    pub fn level(self) -> u8 {
        self as u8
    }

    /// The level for a number, `None` for anything but 0, 1 and 2.
    pub fn from_level(level: u8) -> Option<Self> {
        match level {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// The MQTT 5 properties of a publish that routing can use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    /// User properties, in order, duplicates kept.
    pub user: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// Message Expiry Interval, seconds.
    pub message_expiry: Option<u32>,
}

/// One message as received from the MQTT broker.
#[derive(Debug)]
pub struct Message {
    /// Receipt number, rising by one per message; see [`crate::acks`].
    pub seq: u64,
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// When the bridge took it off the MQTT connection; the start of the end-to-end latency.
    pub received_at: Instant,
    pub retain: bool,
    /// Sent again by the broker (it may have been received before).
    pub dup: bool,
    /// MQTT 5 publish properties; `None` under MQTT 3.1.1 or when the message has none.
    pub properties: Option<Box<Properties>>,
    /// Set when the bridge gave up on the message: it becomes a dead letter, its payload (empty
    /// when the bridge could not hold it) the value, instead of an envelope.
    pub dead_letter: Option<Box<DeadLetter>>,
}

impl Message {
    /// A message as MQTT 3.1.1 delivers one: not retained, not sent again, no properties.
    pub fn new(seq: u64, topic: String, payload: Bytes, qos: QoS, received_at: Instant) -> Self {
        Self {
            seq,
            topic,
            payload,
            qos,
            received_at,
            retain: false,
            dup: false,
            properties: None,
            dead_letter: None,
        }
    }
}

/// Where a record goes in Kafka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topic {
    /// The bridge's `KAFKA_TOPIC`.
    Default,
    /// A topic of its own: mapped by a routing rule, or the dead-letter topic.
    Named(String),
    /// Nowhere: no routing rule matched and there is no `KAFKA_TOPIC` to fall back to. The
    /// Kafka task counts it and writes nothing; the message is done.
    Unmapped,
    /// Nowhere: given up on for this reason (a label of `bridge_records_dropped_total`) with no
    /// dead-letter topic to send it to. Counted like [`Topic::Unmapped`].
    Dropped(&'static str),
}

impl Topic {
    /// Why a record addressed nowhere is dropped (the drop counter's label); `None` for a
    /// record with a topic.
    pub fn drop_reason(&self) -> Option<&'static str> {
        match self {
            Self::Default | Self::Named(_) => None,
            Self::Unmapped => Some("unmapped"),
            Self::Dropped(reason) => Some(reason),
        }
    }
}

/// The Kafka key of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// The MQTT topic (the default: one MQTT topic, one partition, its order kept).
    MqttTopic,
    /// A null key.
    Null,
    /// Rendered from `KAFKA_KEY`.
    Text(String),
}

/// One Kafka record, with the MQTT topic it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The receipt number of the message it came from (0 for records read back from disk).
    pub seq: u64,
    pub topic: Topic,
    /// The MQTT topic of the message.
    pub mqtt_topic: String,
    pub key: Key,
    pub value: Vec<u8>,
    /// Kafka headers, name and value, in order (duplicates allowed).
    pub headers: Vec<(String, Vec<u8>)>,
    pub received_at: Instant,
}

impl Record {
    /// A record as the bridge writes one by default: to `KAFKA_TOPIC`, keyed by its MQTT topic,
    /// no headers.
    pub fn new(seq: u64, mqtt_topic: String, value: Vec<u8>, received_at: Instant) -> Self {
        Self {
            seq,
            topic: Topic::Default,
            mqtt_topic,
            key: Key::MqttTopic,
            value,
            headers: Vec::new(),
            received_at,
        }
    }

    /// Builds the default record for a message: the Metamorphosis envelope as value.
    pub fn from_message(message: Message) -> Self {
        if let Some(letter) = message.dead_letter {
            return Self::dead_letter(
                message.seq,
                message.topic,
                &message.payload,
                &letter,
                message.received_at,
            );
        }
        // `encode` reserves the exact length itself.
        let mut value = Vec::new();
        crate::envelope::encode(&message.topic, &message.payload, &mut value);
        Self::new(message.seq, message.topic, value, message.received_at)
    }

    /// The dead letter of a message the MQTT task gave up on.
    pub fn dead_letter(
        seq: u64,
        mqtt_topic: String,
        payload: &[u8],
        letter: &DeadLetter,
        received_at: Instant,
    ) -> Self {
        Self {
            seq,
            topic: Topic::Named(letter.topic.clone()),
            headers: crate::dead_letter::headers(
                letter.reason,
                &mqtt_topic,
                None,
                letter.original_size,
                &letter.error,
            ),
            mqtt_topic,
            key: Key::MqttTopic,
            value: payload.to_vec(),
            received_at,
        }
    }

    /// The key's bytes; `None` for a null key.
    pub fn key_bytes(&self) -> Option<&[u8]> {
        match &self.key {
            Key::MqttTopic => Some(self.mqtt_topic.as_bytes()),
            Key::Null => None,
            Key::Text(text) => Some(text.as_bytes()),
        }
    }

    /// Bytes this record holds, for memory accounting: MQTT topic, key, value, and the topic
    /// and headers when it has them (each header with the 8 bytes its two lengths take on
    /// disk).
    pub fn size(&self) -> usize {
        let topic = match &self.topic {
            Topic::Named(name) => name.len(),
            Topic::Default | Topic::Unmapped | Topic::Dropped(_) => 0,
        };
        // A key other than the MQTT topic takes its own bytes, and the MQTT topic goes in a
        // header of its own on disk.
        let key = match &self.key {
            Key::Text(text) => text.len() + 8,
            Key::Null => 8,
            Key::MqttTopic => 0,
        };
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len() + 8)
            .sum();
        self.mqtt_topic.len() + key + self.value.len() + topic + headers
    }
}

/// Records written to Kafka together, in the order they were received.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
}

impl Batch {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            records: Vec::with_capacity(capacity),
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The receipt number of its last record: finishing the batch finishes everything up to it.
    pub fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.seq)
    }
}
