//! Dead letters: a record the bridge gives up on for good goes to `KAFKA_DLQ_TOPIC` instead of
//! being dropped, as an ordinary record addressed there, with headers saying why. The Kafka
//! task makes those of records Kafka refuses; the MQTT task makes those of messages it had to
//! read past (larger than `MQTT_MAX_PACKET_SIZE`), whose payload it never held.

/// Why the record is here (a reason label). Always a dead letter's first header.
pub const REASON: &str = "mqtt.dlq.reason";
/// The MQTT topic the message came from.
pub const MQTT_TOPIC: &str = "mqtt.topic";
/// The Kafka topic the record was meant for (absent when it never got that far).
pub const KAFKA_TOPIC: &str = "mqtt.dlq.topic";
/// The size in bytes of the value (or MQTT packet) the bridge could not take, in decimal.
pub const ORIGINAL_SIZE: &str = "mqtt.dlq.original_size";
/// What went wrong, as the component that refused it said it.
pub const ERROR: &str = "mqtt.dlq.error";

/// The reason of a message larger than `MQTT_MAX_PACKET_SIZE`, read past without its payload.
pub const MQTT_TOO_LARGE: &str = "mqtt_too_large";
/// The reason of a message whose MQTT topic is not UTF-8; its payload is the value.
pub const MQTT_INVALID_TOPIC: &str = "mqtt_invalid_topic";

/// What the MQTT task knows of a message it gave up on; it travels in [`crate::Message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The dead-letter topic.
    pub topic: String,
    /// The reason label.
    pub reason: &'static str,
    pub original_size: usize,
    pub error: String,
}

/// The headers of a dead letter, in order, [`REASON`] first.
pub fn headers(
    reason: &str,
    mqtt_topic: &str,
    kafka_topic: Option<&str>,
    original_size: usize,
    error: &str,
) -> Vec<(String, Vec<u8>)> {
    let mut headers = vec![
        (REASON.to_owned(), reason.as_bytes().to_vec()),
        (MQTT_TOPIC.to_owned(), mqtt_topic.as_bytes().to_vec()),
    ];
    if let Some(topic) = kafka_topic {
        headers.push((KAFKA_TOPIC.to_owned(), topic.as_bytes().to_vec()));
    }
    headers.push((
        ORIGINAL_SIZE.to_owned(),
        original_size.to_string().into_bytes(),
    ));
    headers.push((ERROR.to_owned(), error.as_bytes().to_vec()));
    headers
}

/// The reason a dead letter carries; `None` for any other record.
pub fn reason_of(headers: &[(String, Vec<u8>)]) -> Option<&str> {
    match headers.first() {
        Some((name, value)) if name == REASON => std::str::from_utf8(value).ok(),
        _ => None,
    }
}
