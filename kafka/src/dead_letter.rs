//! The dead letters the Kafka task makes: a record it gives up on for good (too large for
//! Kafka, its topic refused or invalid) goes to `KAFKA_DLQ_TOPIC` with headers saying why (see
//! [`mkb_bridge::dead_letter`]). Its value is the original one, except when that was the
//! problem (too large): then it goes without one. A dead letter is an ordinary record
//! addressed to the dead-letter topic, so it is written, retried and spooled like any other;
//! one that cannot be written either is counted as dropped.

use mkb_bridge::{Record, Topic, dead_letter};

use crate::delivery::{Failure, GiveUp};

/// The dead letter of `record`, which was meant for `topic` and refused with `failure`; `seq`
/// is the receipt number its writing finishes.
pub(crate) fn letter(
    seq: u64,
    record: &Record,
    topic: &str,
    dlq: &str,
    reason: GiveUp,
    failure: &Failure,
) -> Record {
    let value = match reason {
        GiveUp::TooLarge => Vec::new(),
        GiveUp::TopicRefused | GiveUp::TopicInvalid => record.value.clone(),
    };
    Record {
        seq,
        topic: Topic::Named(dlq.to_owned()),
        mqtt_topic: record.mqtt_topic.clone(),
        key: record.key.clone(),
        value,
        headers: dead_letter::headers(
            reason.label(),
            &record.mqtt_topic,
            Some(topic),
            record.value.len(),
            &failure.text,
        ),
        received_at: record.received_at,
    }
}

/// The reason a dead letter carries; `None` for any other record.
pub(crate) fn reason_of(record: &Record) -> Option<&str> {
    dead_letter::reason_of(&record.headers)
}
