//! Typed configuration of the Kafka task and the librdkafka properties derived from it.

use std::time::Duration;

use rdkafka::ClientConfig;

/// Everything the Kafka task needs, already validated.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port` list, comma-separated, as librdkafka's `bootstrap.servers`.
    pub brokers: String,
    pub topic: String,
    /// Create missing topics through the Admin API (some brokers do not auto-create on produce).
    pub auto_create_topics: bool,
    /// Partitions of a topic the bridge creates.
    pub topic_partitions: i32,
    /// Replication factor of a topic the bridge creates; -1 takes the broker's default.
    pub topic_replication: i32,
    /// When set, the start-up probe is written there before MQTT is read.
    pub test_topic: Option<String>,
    /// Deadline of the start-up probe and of topic creation.
    pub startup_timeout: Duration,
    /// Pause between tries while Kafka is failing.
    pub retry_interval: Duration,
    /// How long librdkafka keeps trying one record before reporting it failed.
    pub delivery_timeout: Duration,
    /// librdkafka properties passed through unchanged, applied after the bridge's own defaults.
    pub properties: Vec<(String, String)>,
}

impl KafkaConfig {
    /// The librdkafka configuration: the bridge's defaults, then the user's properties.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("compression.type", "none")
            // librdkafka would otherwise buffer up to 1 GiB and retry for 5 minutes: both bounds
            // decide how much memory the bridge uses and how fast it notices an outage.
            .set("queue.buffering.max.kbytes", "32768")
            .set(
                "message.timeout.ms",
                self.delivery_timeout.as_millis().to_string(),
            )
            .set("log.connection.close", "false");
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}
