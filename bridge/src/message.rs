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
    /// Set when the bridge gave up on the message: it becomes a dead letter, its payload (empty
    /// when the bridge could not hold it) the value, instead of an envelope.
    pub dead_letter: Option<Box<DeadLetter>>,
}

/// One Kafka record: the MQTT topic as key (so one MQTT topic always lands in one partition and
/// keeps its order) and the encoded envelope as value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The receipt number of the message it came from (0 for records read back from disk).
    pub seq: u64,
    /// The Kafka topic; `None` for the bridge's `KAFKA_TOPIC`.
    pub topic: Option<String>,
    pub key: String,
    pub value: Vec<u8>,
    /// Kafka headers, name and value (none on an uplink record today; a dead letter says why).
    pub headers: Vec<(String, Vec<u8>)>,
    pub received_at: Instant,
}

impl Record {
    /// Builds the record for a message, encoding its envelope.
    pub fn from_message(message: Message) -> Self {
        if let Some(letter) = message.dead_letter {
            return Self {
                seq: message.seq,
                headers: crate::dead_letter::headers(
                    letter.reason,
                    &message.topic,
                    None,
                    letter.original_size,
                    &letter.error,
                ),
                topic: Some(letter.topic),
                key: message.topic,
                value: message.payload.to_vec(),
                received_at: message.received_at,
            };
        }
        // `encode` reserves the exact length itself.
        let mut value = Vec::new();
        crate::envelope::encode(&message.topic, &message.payload, &mut value);
        Self {
            seq: message.seq,
            topic: None,
            key: message.topic,
            value,
            headers: Vec::new(),
            received_at: message.received_at,
        }
    }

    /// Bytes this record holds, for memory accounting: key, value, and the topic and headers
    /// when it has them (each header with the 8 bytes its two lengths take on disk).
    pub fn size(&self) -> usize {
        let extra = self.topic.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len() + 8)
                .sum::<usize>();
        self.key.len() + self.value.len() + extra
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
