//! Typed configuration of the Kafka task and the librdkafka properties derived from it.

use std::time::Duration;

use rdkafka::ClientConfig;

use crate::spool::SpoolConfig;

/// Everything the Kafka task needs, already validated.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port` list, comma-separated, as librdkafka's `bootstrap.servers`.
    pub brokers: String,
    /// `KAFKA_TOPIC`: where records without a topic of their own go; with a topic map it may
    /// be unset (then no record goes there).
    pub topic: Option<String>,
    /// Where records given up on for good go (`KAFKA_DLQ_TOPIC`); `None` drops and counts them.
    pub dead_letter_topic: Option<String>,
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
    /// Records per write when draining the spool.
    pub max_batch_size: usize,
    /// How long shutdown waits for delivery reports before saving the rest to disk.
    pub shutdown_grace: Duration,
    pub spool: SpoolConfig,
}

/// A librdkafka property the configuration cannot use.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidProperty {
    pub key: String,
    pub reason: String,
}

/// Whether a librdkafka property holds a secret that must not be printed or logged.
pub fn is_secret_property(key: &str) -> bool {
    const SECRET_PARTS: [&str; 5] = [
        "password",
        "secret",
        "ssl.key.pem",
        "oauthbearer.config",
        "token",
    ];
    let key = key.to_ascii_lowercase();
    SECRET_PARTS.iter().any(|part| key.contains(part))
}

impl KafkaConfig {
    /// Checks every passed-through property with librdkafka itself (name and value), without
    /// connecting. Each is tried on its own first, so the error names the property as the user
    /// wrote it (librdkafka reports aliases such as `linger.ms` by their canonical name).
    pub fn validate(&self) -> Result<(), InvalidProperty> {
        let reason = |error: rdkafka::error::KafkaError| match error {
            rdkafka::error::KafkaError::ClientConfig(_, reason, _, _) => reason,
            other => other.to_string(),
        };
        let defaults = Self {
            properties: Vec::new(),
            ..self.clone()
        }
        .client_config();
        for (key, value) in &self.properties {
            let mut one = defaults.clone();
            one.set(key, value);
            if let Err(e) = one.create_native_config() {
                return Err(InvalidProperty {
                    key: key.clone(),
                    reason: reason(e),
                });
            }
        }
        self.client_config()
            .create_native_config()
            .map(drop)
            .map_err(|e| InvalidProperty {
                key: String::new(),
                reason: reason(e),
            })
    }

    /// The librdkafka configuration: the bridge's defaults, then the user's properties.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // The bridge batches already; librdkafka's own wait would only add latency.
            .set("linger.ms", "1")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(properties: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: "localhost:9092".to_owned(),
            topic: Some("t".to_owned()),
            dead_letter_topic: None,
            auto_create_topics: true,
            topic_partitions: 1,
            topic_replication: -1,
            test_topic: None,
            startup_timeout: Duration::from_secs(1),
            retry_interval: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(1),
            properties: properties
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            max_batch_size: 100,
            shutdown_grace: Duration::from_secs(1),
            spool: SpoolConfig {
                dir: None,
                memory_bytes: 1024,
                disk_bytes: 0,
                full_policy: crate::FullPolicy::Block,
                persist_all: false,
            },
        }
    }

    #[test]
    fn librdkafka_checks_passed_through_properties() {
        assert_eq!(
            config(&[("compression.type", "lz4"), ("client.id", "edge-7")]).validate(),
            Ok(())
        );
        let unknown = config(&[("no.such.property", "1")])
            .validate()
            .expect_err("unknown");
        assert_eq!(unknown.key, "no.such.property");
        let bad_value = config(&[("linger.ms", "soon")])
            .validate()
            .expect_err("bad value");
        assert_eq!(bad_value.key, "linger.ms");
    }

    #[test]
    fn user_properties_override_the_defaults() {
        let config = config(&[("linger.ms", "50")]).client_config();
        assert_eq!(config.get("linger.ms"), Some("50"));
        assert_eq!(config.get("acks"), Some("all"));
    }

    #[test]
    fn secret_properties_are_recognised() {
        assert!(is_secret_property("sasl.password"));
        assert!(is_secret_property("ssl.key.password"));
        assert!(is_secret_property("ssl.key.pem"));
        assert!(!is_secret_property("sasl.username"));
        assert!(!is_secret_property("ssl.ca.location"));
    }
}
