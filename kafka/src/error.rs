//! Errors of the Kafka crate that stop the bridge from starting.

/// Why the Kafka side could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("invalid Kafka client configuration: {0}")]
    Client(#[source] rdkafka::error::KafkaError),
    #[error("could not create Kafka topic {topic:?} on {brokers}: {reason}")]
    CreateTopic {
        topic: String,
        brokers: String,
        reason: String,
    },
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("Kafka start-up probe on topic {topic:?} at {brokers} failed: {reason}")]
    Probe {
        topic: String,
        brokers: String,
        reason: String,
    },
}
