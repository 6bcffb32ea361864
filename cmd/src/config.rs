//! The bridge's configuration: the only place that reads the environment and `.env`.
//!
//! Sources, strongest first: the process environment, then the `.env` file (the working
//! directory's, or the one named by `--env-file`), then the defaults in [`VARIABLES`]. Every
//! value is validated here; a bad one becomes a [`ConfigError`] naming the variable, the value
//! and what is expected, which `main` prints on one line before exiting with status 64.
//! Secrets never appear in those messages.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mkb_bridge::{BatcherConfig, QoS};
use mkb_kafka::{FullPolicy, KafkaConfig, SpoolConfig};
use mkb_log::{LogConfig, LogFormat};
use mkb_mqtt::{AckMode, Credentials, MqttConfig, MqttVersion, TlsConfig, TlsError, TlsFile};
use serde::Deserialize;

/// One configuration variable, as `--help` and `.env.example` show it.
pub struct Variable {
    pub name: &'static str,
    /// The default, `None` when the variable must be set or is off when unset.
    pub default: Option<&'static str>,
    pub meaning: &'static str,
}

const fn var(name: &'static str, default: Option<&'static str>, meaning: &'static str) -> Variable {
    Variable {
        name,
        default,
        meaning,
    }
}

/// Every variable the bridge reads, with its default and meaning.
pub const VARIABLES: &[Variable] = &[
    var(
        "LOG_LEVEL",
        Some("info"),
        "trace, debug, info, warn or error",
    ),
    var(
        "LOG_FORMAT",
        Some("text"),
        "text, or json for one JSON object per line",
    ),
    var(
        "MQTT_BROKER",
        Some("localhost"),
        "MQTT broker host name or address",
    ),
    var(
        "MQTT_PORT",
        None,
        "MQTT broker port; unset: 1883, or 8883 with TLS",
    ),
    var(
        "MQTT_VERSION",
        Some("3.1.1"),
        "MQTT protocol version: 3.1.1 or 5",
    ),
    var(
        "MQTT_TLS",
        None,
        "true for TLS to the broker; unset: on when ROOT_CA or MQTT_CLIENT_CERT is set",
    ),
    var(
        "ROOT_CA",
        None,
        "PEM file of the CA(s) that sign the broker's certificate; unset: the system's roots",
    ),
    var(
        "MQTT_CLIENT_CERT",
        None,
        "PEM client certificate for mutual TLS (with MQTT_CLIENT_KEY)",
    ),
    var(
        "MQTT_CLIENT_KEY",
        None,
        "PEM private key of MQTT_CLIENT_CERT: PKCS#8, PKCS#1 or SEC1, encrypted or not",
    ),
    var(
        "MQTT_CLIENT_KEY_PASSWORD",
        None,
        "password of an encrypted MQTT_CLIENT_KEY (never logged)",
    ),
    var("MQTT_USERNAME", None, "user name for the MQTT broker"),
    var(
        "MQTT_PASSWORD",
        None,
        "password for the MQTT broker (never logged)",
    ),
    var(
        "MQTT_TOPIC",
        None,
        "required: comma-separated topic filters (wildcards and $share/group/filter allowed)",
    ),
    var("MQTT_QOS", Some("1"), "QoS of the subscriptions: 0, 1 or 2"),
    var(
        "MQTT_CLIENT_ID",
        Some("%h"),
        "MQTT client id; %h is replaced by the host name",
    ),
    var(
        "MQTT_CLEAN_SESSION",
        Some("false"),
        "true starts a fresh session on every connect; false lets the broker queue messages \
         for the bridge while it is away (needs a stable client id)",
    ),
    var("MQTT_KEEP_ALIVE", Some("30s"), "MQTT keep-alive interval"),
    var(
        "MQTT_MAX_PACKET_SIZE",
        Some("16MiB"),
        "largest MQTT packet accepted (the most one message can take in memory); a number of \
         bytes, or with KiB, MiB, from 1KiB to 256MiB (MQTT's largest packet)",
    ),
    var(
        "MQTT_ACK",
        Some("after-write"),
        "after-write: acknowledge QoS 1/2 messages once Kafka or the fsynced disk spool holds \
         them (crash-safe); on-receipt: acknowledge on arrival (faster, a crash loses messages \
         in flight)",
    ),
    var(
        "MQTT_RECEIVE_MAXIMUM",
        Some("1000"),
        "MQTT 5: unacknowledged QoS 1/2 messages the broker may send at once",
    ),
    var(
        "KAFKA_BROKER",
        Some("localhost"),
        "Kafka broker host (see KAFKA_BROKERS)",
    ),
    var(
        "KAFKA_PORT",
        Some("9092"),
        "Kafka broker port (see KAFKA_BROKERS)",
    ),
    var(
        "KAFKA_BROKERS",
        None,
        "comma-separated host:port list; overrides KAFKA_BROKER and KAFKA_PORT",
    ),
    var(
        "KAFKA_TOPIC",
        None,
        "required: Kafka topic every message is written to",
    ),
    var(
        "KAFKA_DLQ_TOPIC",
        None,
        "dead-letter topic: records given up on for good (too large for Kafka, topic refused or \
         invalid) go there with headers saying why; unset: they are dropped and counted",
    ),
    var(
        "KAFKA_PROPERTY_*",
        None,
        "any librdkafka property, passed through: KAFKA_PROPERTY_SASL_MECHANISM=PLAIN sets \
         sasl.mechanism (lower case, _ becomes ., __ becomes _)",
    ),
    var(
        "KAFKA_AUTO_CREATE_TOPICS",
        Some("true"),
        "create missing topics through the Kafka Admin API",
    ),
    var(
        "KAFKA_TOPIC_PARTITIONS",
        Some("1"),
        "partitions of a topic the bridge creates",
    ),
    var(
        "KAFKA_TOPIC_REPLICATION",
        Some("-1"),
        "replication factor of a topic the bridge creates; -1 takes the broker's default",
    ),
    var(
        "KAFKA_TEST_TOPIC",
        None,
        "when set, a probe message is written there at start-up; the bridge exits if Kafka \
         does not acknowledge it within KAFKA_STARTUP_TIMEOUT",
    ),
    var(
        "KAFKA_STARTUP_TIMEOUT",
        Some("10s"),
        "deadline of the start-up probe and of topic creation",
    ),
    var(
        "KAFKA_RETRY_INTERVAL",
        Some("10s"),
        "pause between tries while Kafka is failing",
    ),
    var(
        "KAFKA_DELIVERY_TIMEOUT",
        Some("30s"),
        "how long one write may take before Kafka counts as failing",
    ),
    var(
        "KAFKA_BATCH_SIZE",
        Some("1000"),
        "records in a batch; a full batch is sent at once",
    ),
    var(
        "KAFKA_MAX_BATCH_SIZE",
        Some("8000"),
        "records per write when draining a backlog; at least KAFKA_BATCH_SIZE",
    ),
    var(
        "KAFKA_INTERVAL",
        Some("5s"),
        "longest wait before a partial batch is sent: 5 (seconds), 5s or 250ms",
    ),
    var(
        "SPOOL_DIR",
        Some("spool"),
        "directory of the disk spool (created if missing), relative to the working directory",
    ),
    var(
        "SPOOL_MEMORY_BYTES",
        Some("32MiB"),
        "memory tier of the spool (used with MQTT_ACK=on-receipt or MQTT_QOS=0); \
         a number of bytes, or with KiB, MiB, GiB",
    ),
    var(
        "SPOOL_DISK_BYTES",
        Some("1GiB"),
        "disk tier of the spool; 0 turns it off",
    ),
    var(
        "SPOOL_FULL_POLICY",
        Some("block"),
        "when both tiers are full: block (take no more; the MQTT broker keeps QoS 1/2 \
         messages), drop-oldest or drop-newest (counted in bridge_records_dropped_total)",
    ),
    var("HEALTH_ADDR", Some("0.0.0.0"), "address of the HTTP server"),
    var(
        "HEALTH_PORT",
        Some("8080"),
        "port of the HTTP server (/metrics, /healthz, /readyz); 0 picks a free one",
    ),
    var(
        "SHUTDOWN_TIMEOUT",
        Some("30s"),
        "longest drain on SIGINT/SIGTERM before the bridge exits",
    ),
    var(
        "WORKER_THREADS",
        Some("1"),
        "threads running the bridge's tasks (librdkafka and the disk spool have their own); \
         one moves the most messages per CPU second",
    ),
];

/// The validated configuration of one bridge.
#[derive(Clone, Debug)]
pub struct Config {
    pub log: LogConfig,
    pub mqtt: MqttConfig,
    pub kafka: KafkaConfig,
    pub batcher: BatcherConfig,
    pub max_batch_size: usize,
    pub health_addr: SocketAddr,
    pub shutdown_timeout: Duration,
    /// Threads of the async runtime.
    pub worker_threads: usize,
    /// Every variable's effective value, secrets shown as `***`, for `--check-config`.
    pub effective: Vec<(String, String)>,
}

/// With deferred acknowledgements, a batch is also sent once no message came for this long.
const IDLE_FLUSH: Duration = Duration::from_millis(2);

/// Prefix of the variables passed through to librdkafka.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";

/// Variables whose values are never printed.
const SECRET_VARIABLES: &[&str] = &["MQTT_PASSWORD", "MQTT_CLIENT_KEY_PASSWORD"];

/// A configuration value that cannot be used. Printed as one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid {var}={value:?}: expected {expected}")]
    Invalid {
        var: &'static str,
        value: String,
        expected: String,
    },
    #[error("{var} is not set: expected {expected}")]
    Missing {
        var: &'static str,
        expected: &'static str,
    },
    #[error(
        "invalid {var}={value:?}: expected a valid value of librdkafka property {key} ({reason})"
    )]
    Property {
        var: String,
        /// `***` when the property holds a secret.
        value: String,
        key: String,
        reason: String,
    },
    #[error("invalid Kafka properties: {0}")]
    Properties(String),
    #[error("cannot read env file {path}: {reason}")]
    EnvFile { path: String, reason: String },
}

impl ConfigError {
    fn invalid(var: &'static str, value: &str, expected: impl Into<String>) -> Self {
        Self::Invalid {
            var,
            value: value.to_owned(),
            expected: expected.into(),
        }
    }
}

/// The variables as read, before validation; `envy` fills it from the merged sources.
#[derive(Debug, Default, Deserialize)]
struct Raw {
    log_level: Option<String>,
    log_format: Option<String>,
    mqtt_broker: Option<String>,
    mqtt_port: Option<String>,
    mqtt_version: Option<String>,
    mqtt_tls: Option<String>,
    root_ca: Option<String>,
    mqtt_client_cert: Option<String>,
    mqtt_client_key: Option<String>,
    mqtt_client_key_password: Option<String>,
    mqtt_username: Option<String>,
    mqtt_password: Option<String>,
    mqtt_topic: Option<String>,
    mqtt_qos: Option<String>,
    mqtt_client_id: Option<String>,
    mqtt_clean_session: Option<String>,
    mqtt_keep_alive: Option<String>,
    mqtt_max_packet_size: Option<String>,
    mqtt_receive_maximum: Option<String>,
    mqtt_ack: Option<String>,
    spool_dir: Option<String>,
    spool_memory_bytes: Option<String>,
    spool_disk_bytes: Option<String>,
    spool_full_policy: Option<String>,
    kafka_broker: Option<String>,
    kafka_port: Option<String>,
    kafka_brokers: Option<String>,
    kafka_topic: Option<String>,
    kafka_dlq_topic: Option<String>,
    kafka_auto_create_topics: Option<String>,
    kafka_topic_partitions: Option<String>,
    kafka_topic_replication: Option<String>,
    kafka_test_topic: Option<String>,
    kafka_startup_timeout: Option<String>,
    kafka_retry_interval: Option<String>,
    kafka_delivery_timeout: Option<String>,
    kafka_batch_size: Option<String>,
    kafka_max_batch_size: Option<String>,
    kafka_interval: Option<String>,
    health_addr: Option<String>,
    health_port: Option<String>,
    shutdown_timeout: Option<String>,
    worker_threads: Option<String>,
}

/// Reads the configuration from `environment` (the process's, or a test's) merged with the env
/// file: `env_file` when given (it must exist), else `./.env` when present.
pub fn load(
    environment: impl IntoIterator<Item = (String, String)>,
    env_file: Option<&Path>,
    host_name: &str,
) -> Result<Config, ConfigError> {
    let mut merged: HashMap<String, String> = HashMap::new();
    let default_file = Path::new(".env");
    let file = match env_file {
        Some(path) => Some(path),
        None if default_file.is_file() => Some(default_file),
        None => None,
    };
    if let Some(path) = file {
        let env_file_error = |reason: String| ConfigError::EnvFile {
            path: path.display().to_string(),
            reason,
        };
        let entries = dotenvy::from_path_iter(path).map_err(|e| env_file_error(e.to_string()))?;
        for entry in entries {
            let (key, value) = entry.map_err(|e| env_file_error(e.to_string()))?;
            merged.insert(key, value);
        }
    }
    // The real environment wins over the file.
    merged.extend(environment);
    // Empty values count as unset, as in a `.env` line `KAFKA_TEST_TOPIC=`.
    merged.retain(|_, value| !value.trim().is_empty());
    let properties = kafka_properties(&merged)?;
    let effective = effective_values(&merged);
    let raw: Raw = envy::from_iter(merged).map_err(|e| ConfigError::EnvFile {
        path: "environment".to_owned(),
        reason: e.to_string(),
    })?;
    let mut config = Parser {
        raw,
        host_name,
        properties,
    }
    .parse()?;
    config.effective = effective;
    Ok(config)
}

/// `KAFKA_PROPERTY_SASL_MECHANISM=PLAIN` → (`sasl.mechanism`, `PLAIN`); `__` stands for `_`.
fn kafka_properties(
    merged: &HashMap<String, String>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut properties: Vec<(String, String)> = merged
        .iter()
        .filter_map(|(name, value)| {
            let suffix = name.strip_prefix(KAFKA_PROPERTY_PREFIX)?;
            let key = suffix
                .to_ascii_lowercase()
                .split("__")
                .map(|part| part.replace('_', "."))
                .collect::<Vec<_>>()
                .join("_");
            Some((key, value.clone()))
        })
        .collect();
    properties.sort();
    if let Some((key, _)) = properties.iter().find(|(key, _)| key.is_empty()) {
        return Err(ConfigError::invalid(
            "KAFKA_PROPERTY_*",
            key,
            "a librdkafka property name after the prefix",
        ));
    }
    Ok(properties)
}

/// The variable that sets librdkafka property `key`.
fn property_variable(key: &str) -> String {
    let name = key
        .replace('_', "__")
        .replace('.', "_")
        .to_ascii_uppercase();
    format!("{KAFKA_PROPERTY_PREFIX}{name}")
}

fn effective_values(merged: &HashMap<String, String>) -> Vec<(String, String)> {
    let mut values: Vec<(String, String)> = VARIABLES
        .iter()
        .filter(|v| !v.name.ends_with('*'))
        .map(|v| {
            let value = match merged.get(v.name) {
                Some(_) if SECRET_VARIABLES.contains(&v.name) => "***".to_owned(),
                Some(value) => value.trim().to_owned(),
                None => v.default.unwrap_or("").to_owned(),
            };
            (v.name.to_owned(), value)
        })
        .collect();
    let mut properties: Vec<(String, String)> = merged
        .iter()
        .filter(|(name, _)| name.starts_with(KAFKA_PROPERTY_PREFIX))
        .map(|(name, value)| {
            let key = name[KAFKA_PROPERTY_PREFIX.len()..].to_ascii_lowercase();
            let shown = if mkb_kafka::is_secret_property(&key.replace('_', ".")) {
                "***".to_owned()
            } else {
                value.clone()
            };
            (name.clone(), shown)
        })
        .collect();
    properties.sort();
    values.extend(properties);
    values
}

struct Parser<'a> {
    raw: Raw,
    host_name: &'a str,
    properties: Vec<(String, String)>,
}

impl Parser<'_> {
    fn parse(self) -> Result<Config, ConfigError> {
        let r = &self.raw;
        let log = LogConfig {
            level: {
                let value = get(&r.log_level, "LOG_LEVEL");
                mkb_log::parse_level(value).ok_or_else(|| {
                    ConfigError::invalid("LOG_LEVEL", value, "trace, debug, info, warn or error")
                })?
            },
            format: {
                let value = get(&r.log_format, "LOG_FORMAT");
                value
                    .parse::<LogFormat>()
                    .map_err(|()| ConfigError::invalid("LOG_FORMAT", value, "text or json"))?
            },
        };

        let client_id = get(&r.mqtt_client_id, "MQTT_CLIENT_ID").replace("%h", self.host_name);
        let tls = self.tls()?;
        // Both tasks make dead letters: the Kafka task of records Kafka refuses, the MQTT task
        // of messages above MQTT_MAX_PACKET_SIZE.
        let dead_letter_topic = r
            .kafka_dlq_topic
            .as_deref()
            .map(|t| kafka_topic(t, "KAFKA_DLQ_TOPIC"))
            .transpose()?;
        let mut mqtt = MqttConfig {
            host: host(get(&r.mqtt_broker, "MQTT_BROKER"), "MQTT_BROKER")?,
            port: match &r.mqtt_port {
                Some(value) => port(value.trim(), "MQTT_PORT")?,
                None if tls.is_some() => 8883,
                None => 1883,
            },
            version: {
                let value = get(&r.mqtt_version, "MQTT_VERSION");
                match value {
                    "3.1.1" | "311" | "3" | "4" => MqttVersion::V311,
                    "5" | "5.0" => MqttVersion::V5,
                    _ => return Err(ConfigError::invalid("MQTT_VERSION", value, "3.1.1 or 5")),
                }
            },
            credentials: self.credentials()?,
            tls,
            dead_letter_topic: dead_letter_topic.clone(),
            receive_maximum: number(
                get(&r.mqtt_receive_maximum, "MQTT_RECEIVE_MAXIMUM"),
                "MQTT_RECEIVE_MAXIMUM",
                1,
                65535,
            )?,
            filters: topic_filters(required(&r.mqtt_topic, "MQTT_TOPIC")?)?,
            qos: {
                let value = get(&r.mqtt_qos, "MQTT_QOS");
                value
                    .parse::<u8>()
                    .ok()
                    .and_then(QoS::from_level)
                    .ok_or_else(|| ConfigError::invalid("MQTT_QOS", value, "0, 1 or 2"))?
            },
            clean_session: boolean(
                get(&r.mqtt_clean_session, "MQTT_CLEAN_SESSION"),
                "MQTT_CLEAN_SESSION",
            )?,
            keep_alive: duration(
                get(&r.mqtt_keep_alive, "MQTT_KEEP_ALIVE"),
                "MQTT_KEEP_ALIVE",
            )?,
            max_packet_size: {
                let value = get(&r.mqtt_max_packet_size, "MQTT_MAX_PACKET_SIZE");
                match byte_size(value, "MQTT_MAX_PACKET_SIZE")? {
                    size @ 1024..=MQTT_LARGEST_PACKET => size,
                    _ => {
                        return Err(ConfigError::invalid(
                            "MQTT_MAX_PACKET_SIZE",
                            value,
                            "a size from 1KiB to 256MiB (268435455 bytes, MQTT's largest packet)",
                        ));
                    }
                }
            },
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            ack_mode: {
                let value = get(&r.mqtt_ack, "MQTT_ACK");
                match value {
                    "after-write" => AckMode::AfterWrite,
                    "on-receipt" => AckMode::OnReceipt,
                    _ => {
                        return Err(ConfigError::invalid(
                            "MQTT_ACK",
                            value,
                            "after-write or on-receipt",
                        ));
                    }
                }
            },
            // Set below, from SHUTDOWN_TIMEOUT.
            shutdown_grace: Duration::ZERO,
            client_id,
        };
        if mqtt.client_id.is_empty() {
            return Err(ConfigError::invalid(
                "MQTT_CLIENT_ID",
                "",
                "a non-empty client id (%h is the host name)",
            ));
        }
        if mqtt.keep_alive < Duration::from_secs(1) || mqtt.keep_alive > Duration::from_secs(65535)
        {
            return Err(ConfigError::invalid(
                "MQTT_KEEP_ALIVE",
                get(&r.mqtt_keep_alive, "MQTT_KEEP_ALIVE"),
                "a duration from 1s to 65535s",
            ));
        }

        let brokers = match &r.kafka_brokers {
            Some(list) => broker_list(list)?,
            None => {
                let host = host(get(&r.kafka_broker, "KAFKA_BROKER"), "KAFKA_BROKER")?;
                let port = port(get(&r.kafka_port, "KAFKA_PORT"), "KAFKA_PORT")?;
                format!("{host}:{port}")
            }
        };
        let topic = kafka_topic(required(&r.kafka_topic, "KAFKA_TOPIC")?, "KAFKA_TOPIC")?;
        if let Some(dlq) = dead_letter_topic.as_deref().filter(|dlq| *dlq == topic) {
            return Err(ConfigError::invalid(
                "KAFKA_DLQ_TOPIC",
                dlq,
                "a topic other than KAFKA_TOPIC",
            ));
        }
        let mut kafka = KafkaConfig {
            brokers,
            topic,
            dead_letter_topic,
            auto_create_topics: boolean(
                get(&r.kafka_auto_create_topics, "KAFKA_AUTO_CREATE_TOPICS"),
                "KAFKA_AUTO_CREATE_TOPICS",
            )?,
            topic_partitions: number(
                get(&r.kafka_topic_partitions, "KAFKA_TOPIC_PARTITIONS"),
                "KAFKA_TOPIC_PARTITIONS",
                1,
                100_000,
            )?,
            topic_replication: {
                let value = get(&r.kafka_topic_replication, "KAFKA_TOPIC_REPLICATION");
                match value.parse::<i32>() {
                    Ok(n) if n == -1 || (1..=32).contains(&n) => n,
                    _ => {
                        return Err(ConfigError::invalid(
                            "KAFKA_TOPIC_REPLICATION",
                            value,
                            "-1 (broker default) or a replication factor from 1 to 32",
                        ));
                    }
                }
            },
            test_topic: r
                .kafka_test_topic
                .as_deref()
                .map(|t| kafka_topic(t, "KAFKA_TEST_TOPIC"))
                .transpose()?,
            startup_timeout: positive_duration(
                get(&r.kafka_startup_timeout, "KAFKA_STARTUP_TIMEOUT"),
                "KAFKA_STARTUP_TIMEOUT",
            )?,
            retry_interval: positive_duration(
                get(&r.kafka_retry_interval, "KAFKA_RETRY_INTERVAL"),
                "KAFKA_RETRY_INTERVAL",
            )?,
            delivery_timeout: positive_duration(
                get(&r.kafka_delivery_timeout, "KAFKA_DELIVERY_TIMEOUT"),
                "KAFKA_DELIVERY_TIMEOUT",
            )?,
            properties: self.properties.clone(),
            // Set below, with the batch sizes and SHUTDOWN_TIMEOUT.
            max_batch_size: 0,
            shutdown_grace: Duration::ZERO,
            spool: self.spool()?,
        };
        if let Err(invalid) = kafka.validate() {
            let Some((key, value)) = kafka.properties.iter().find(|(key, _)| *key == invalid.key)
            else {
                return Err(ConfigError::Properties(invalid.reason));
            };
            let shown = if mkb_kafka::is_secret_property(key) {
                "***"
            } else {
                value
            };
            return Err(ConfigError::Property {
                var: property_variable(key),
                value: shown.to_owned(),
                key: key.clone(),
                reason: invalid.reason,
            });
        }

        let batch_size = number(
            get(&r.kafka_batch_size, "KAFKA_BATCH_SIZE"),
            "KAFKA_BATCH_SIZE",
            1,
            1_000_000,
        )?;
        let max_batch_value = get(&r.kafka_max_batch_size, "KAFKA_MAX_BATCH_SIZE");
        let max_batch_size = number(max_batch_value, "KAFKA_MAX_BATCH_SIZE", 1, 1_000_000)?;
        if max_batch_size < batch_size {
            return Err(ConfigError::invalid(
                "KAFKA_MAX_BATCH_SIZE",
                max_batch_value,
                format!("at least KAFKA_BATCH_SIZE ({batch_size})"),
            ));
        }
        // With deferred acks the broker stops at its in-flight window: flush when it goes quiet.
        let deferred_acks = mqtt.ack_mode == AckMode::AfterWrite && mqtt.qos != QoS::AtMostOnce;
        let batcher = BatcherConfig {
            max_records: batch_size,
            interval: positive_duration(
                get(&r.kafka_interval, "KAFKA_INTERVAL"),
                "KAFKA_INTERVAL",
            )?,
            idle_flush: deferred_acks.then_some(IDLE_FLUSH),
        };
        let shutdown_timeout = positive_duration(
            get(&r.shutdown_timeout, "SHUTDOWN_TIMEOUT"),
            "SHUTDOWN_TIMEOUT",
        )?;
        mqtt.shutdown_grace = shutdown_timeout.mul_f64(0.75);
        kafka.max_batch_size = max_batch_size;
        kafka.shutdown_grace = shutdown_timeout / 2;
        kafka.spool.persist_all = deferred_acks;

        let health_ip: IpAddr = {
            let value = get(&r.health_addr, "HEALTH_ADDR");
            value.parse().map_err(|_| {
                ConfigError::invalid("HEALTH_ADDR", value, "an IPv4 or IPv6 address")
            })?
        };
        let health_port = {
            let value = get(&r.health_port, "HEALTH_PORT");
            value.parse::<u16>().map_err(|_| {
                ConfigError::invalid("HEALTH_PORT", value, "a port number from 0 to 65535")
            })?
        };

        let worker_threads = number(
            get(&r.worker_threads, "WORKER_THREADS"),
            "WORKER_THREADS",
            1,
            256,
        )?;

        Ok(Config {
            log,
            mqtt,
            kafka,
            batcher,
            max_batch_size,
            health_addr: SocketAddr::new(health_ip, health_port),
            shutdown_timeout,
            worker_threads,
            effective: Vec::new(),
        })
    }

    /// TLS is on with `MQTT_TLS=true`, or when a CA or client certificate is given and
    /// `MQTT_TLS` is unset. The files are read now, so a bad one stops the start.
    fn tls(&self) -> Result<Option<native_tls::TlsConnector>, ConfigError> {
        let r = &self.raw;
        let path = |value: &Option<String>| value.as_deref().map(|p| PathBuf::from(p.trim()));
        let settings = TlsConfig {
            ca_file: path(&r.root_ca),
            client_cert_file: path(&r.mqtt_client_cert),
            client_key_file: path(&r.mqtt_client_key),
            client_key_password: r.mqtt_client_key_password.clone(),
        };
        let enabled = match &r.mqtt_tls {
            Some(value) => boolean(value.trim(), "MQTT_TLS")?,
            None => settings.ca_file.is_some() || settings.client_cert_file.is_some(),
        };
        if !enabled {
            if let Some(var) = [
                ("ROOT_CA", &r.root_ca),
                ("MQTT_CLIENT_CERT", &r.mqtt_client_cert),
            ]
            .iter()
            .find_map(|(var, value)| value.as_ref().map(|_| *var))
            {
                return Err(ConfigError::invalid(
                    "MQTT_TLS",
                    r.mqtt_tls.as_deref().unwrap_or_default(),
                    format!("true (or unset) when {var} is set"),
                ));
            }
            return Ok(None);
        }
        settings.connector().map(Some).map_err(|e| match e {
            TlsError::File {
                file: TlsFile::ClientKeyPassword,
                path,
                reason,
            } => ConfigError::Invalid {
                var: "MQTT_CLIENT_KEY_PASSWORD",
                value: "***".to_owned(),
                expected: format!("the password of {} ({reason})", path.display()),
            },
            TlsError::File { file, path, reason } => ConfigError::Invalid {
                var: match file {
                    TlsFile::Ca => "ROOT_CA",
                    TlsFile::ClientCert => "MQTT_CLIENT_CERT",
                    TlsFile::ClientKey | TlsFile::ClientKeyPassword => "MQTT_CLIENT_KEY",
                },
                value: path.display().to_string(),
                expected: format!("a usable PEM file ({reason})"),
            },
            TlsError::Library(reason) => ConfigError::Invalid {
                var: "MQTT_TLS",
                value: "true".to_owned(),
                expected: format!("a working TLS library ({reason})"),
            },
        })
    }

    fn spool(&self) -> Result<SpoolConfig, ConfigError> {
        let r = &self.raw;
        let dir = PathBuf::from(get(&r.spool_dir, "SPOOL_DIR"));
        if dir.exists() && !dir.is_dir() {
            return Err(ConfigError::invalid(
                "SPOOL_DIR",
                &dir.display().to_string(),
                "a directory (this is a file)",
            ));
        }
        let memory_bytes = byte_size(
            get(&r.spool_memory_bytes, "SPOOL_MEMORY_BYTES"),
            "SPOOL_MEMORY_BYTES",
        )?;
        let disk_bytes = byte_size(
            get(&r.spool_disk_bytes, "SPOOL_DISK_BYTES"),
            "SPOOL_DISK_BYTES",
        )?;
        let full_policy = {
            let value = get(&r.spool_full_policy, "SPOOL_FULL_POLICY");
            match value {
                "block" => FullPolicy::Block,
                "drop-oldest" => FullPolicy::DropOldest,
                "drop-newest" => FullPolicy::DropNewest,
                _ => {
                    return Err(ConfigError::invalid(
                        "SPOOL_FULL_POLICY",
                        value,
                        "block, drop-oldest or drop-newest",
                    ));
                }
            }
        };
        Ok(SpoolConfig {
            dir: (disk_bytes > 0).then_some(dir),
            memory_bytes,
            disk_bytes,
            full_policy,
            // Set by the caller, from MQTT_ACK and MQTT_QOS.
            persist_all: false,
        })
    }

    fn credentials(&self) -> Result<Option<Credentials>, ConfigError> {
        let r = &self.raw;
        match (&r.mqtt_username, &r.mqtt_password) {
            (Some(username), password) => Ok(Some(Credentials {
                username: username.trim().to_owned(),
                password: password.clone().unwrap_or_default(),
            })),
            (None, Some(_)) => Err(ConfigError::Missing {
                var: "MQTT_USERNAME",
                expected: "a user name, since MQTT_PASSWORD is set",
            }),
            (None, None) => Ok(None),
        }
    }
}

/// The value of a variable, or its default from [`VARIABLES`].
fn get<'a>(value: &'a Option<String>, name: &'static str) -> &'a str {
    match value {
        Some(value) => value.trim(),
        None => VARIABLES
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.default)
            .expect("every variable read with a default has one in VARIABLES"),
    }
}

fn required<'a>(value: &'a Option<String>, name: &'static str) -> Result<&'a str, ConfigError> {
    let expected = VARIABLES
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.meaning.trim_start_matches("required: "))
        .expect("every required variable is in VARIABLES");
    value.as_deref().map(str::trim).ok_or(ConfigError::Missing {
        var: name,
        expected,
    })
}

fn host(value: &str, var: &'static str) -> Result<String, ConfigError> {
    let valid = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(ConfigError::invalid(
            var,
            value,
            "a host name or IP address",
        ))
    }
}

fn port(value: &str, var: &'static str) -> Result<u16, ConfigError> {
    match value.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(ConfigError::invalid(
            var,
            value,
            "a port number from 1 to 65535",
        )),
    }
}

fn number<T>(value: &str, var: &'static str, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    match value.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(ConfigError::invalid(
            var,
            value,
            format!("a whole number from {min} to {max}"),
        )),
    }
}

fn boolean(value: &str, var: &'static str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::invalid(var, value, "true or false")),
    }
}

/// Parses a byte size: `1048576`, `512KiB`, `64MiB`, `1GiB` (binary units; `KB`, `MB`, `GB`
/// and `K`, `M`, `G` mean the same here).
pub fn parse_bytes(value: &str) -> Option<usize> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let n: usize = digits.parse().ok()?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(multiplier)
}

/// The largest packet MQTT can encode (its remaining length tops out at 256 MiB - 1).
const MQTT_LARGEST_PACKET: usize = 268_435_455;

fn byte_size(value: &str, var: &'static str) -> Result<usize, ConfigError> {
    parse_bytes(value).ok_or_else(|| {
        ConfigError::invalid(
            var,
            value,
            "a size in bytes such as 1048576, 512KiB, 64MiB or 1GiB",
        )
    })
}

/// Parses `5` (seconds, as Metamorphosis), `5s`, `250ms`, `2m` or `1h`.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let n: u64 = digits.parse().ok()?;
    match unit.trim() {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

const DURATION_EXPECTED: &str = "a duration such as 5 (seconds), 5s, 250ms or 2m";

fn duration(value: &str, var: &'static str) -> Result<Duration, ConfigError> {
    parse_duration(value).ok_or_else(|| ConfigError::invalid(var, value, DURATION_EXPECTED))
}

fn positive_duration(value: &str, var: &'static str) -> Result<Duration, ConfigError> {
    match parse_duration(value) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(ConfigError::invalid(
            var,
            value,
            format!("{DURATION_EXPECTED}, above zero"),
        )),
    }
}

/// Splits and checks `MQTT_TOPIC`: each filter non-empty, `#` only last and alone in its level,
/// `+` alone in its level, and `$share/group/filter` with a group and a filter.
fn topic_filters(value: &str) -> Result<Vec<String>, ConfigError> {
    let filters: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect();
    if filters.is_empty() {
        return Err(ConfigError::invalid(
            "MQTT_TOPIC",
            value,
            "at least one topic filter",
        ));
    }
    for filter in &filters {
        if let Err(why) = check_filter(filter) {
            return Err(ConfigError::invalid(
                "MQTT_TOPIC",
                value,
                format!("valid topic filters ({filter:?}: {why})"),
            ));
        }
    }
    Ok(filters)
}

fn check_filter(filter: &str) -> Result<(), &'static str> {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => {
            let (group, inner) = rest
                .split_once('/')
                .ok_or("$share needs a group and a filter")?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err("$share group must be a non-empty name without wildcards");
            }
            inner
        }
        None => filter,
    };
    if filter.is_empty() {
        return Err("empty filter");
    }
    if filter.contains('\0') {
        return Err("NUL character");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err("# must be the whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("+ must be a whole level");
        }
    }
    Ok(())
}

/// Kafka topic names: 1 to 249 characters of ASCII letters, digits, `.`, `_` and `-`.
fn kafka_topic(value: &str, var: &'static str) -> Result<String, ConfigError> {
    let valid = !value.is_empty()
        && value.len() <= 249
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(ConfigError::invalid(
            var,
            value,
            "a Kafka topic name: 1 to 249 of a-z A-Z 0-9 . _ -",
        ))
    }
}

fn broker_list(value: &str) -> Result<String, ConfigError> {
    let brokers: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .collect();
    let valid = !brokers.is_empty()
        && brokers.iter().all(|b| {
            b.rsplit_once(':').is_some_and(|(host_part, port_part)| {
                host(host_part, "KAFKA_BROKERS").is_ok() && port(port_part, "KAFKA_BROKERS").is_ok()
            })
        });
    if valid {
        Ok(brokers.join(","))
    } else {
        Err(ConfigError::invalid(
            "KAFKA_BROKERS",
            value,
            "a comma-separated list of host:port",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all = vec![
            ("MQTT_TOPIC".to_owned(), "a/#".to_owned()),
            ("KAFKA_TOPIC".to_owned(), "mqtt".to_owned()),
        ];
        all.extend(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        all
    }

    fn load_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        // An explicit empty file keeps a developer's ./.env out of the tests.
        let empty = tempfile::NamedTempFile::new().expect("temp file");
        load(env(pairs), Some(empty.path()), "gateway-7")
    }

    fn error_line(pairs: &[(&str, &str)]) -> String {
        load_env(pairs).expect_err("invalid").to_string()
    }

    #[test]
    fn defaults_match_metamorphosis() {
        let config = load_env(&[]).expect("valid");
        assert_eq!(config.mqtt.host, "localhost");
        assert_eq!(config.mqtt.port, 1883);
        assert_eq!(config.mqtt.qos, QoS::AtLeastOnce);
        assert_eq!(config.mqtt.client_id, "gateway-7");
        assert_eq!(config.kafka.brokers, "localhost:9092");
        assert_eq!(config.kafka.retry_interval, Duration::from_secs(10));
        assert_eq!(config.batcher.max_records, 1000);
        assert_eq!(config.max_batch_size, 8000);
        assert_eq!(config.batcher.interval, Duration::from_secs(5));
        assert_eq!(config.health_addr.port(), 8080);
    }

    #[test]
    fn the_mqtt_packet_limit_takes_sizes_and_defaults_to_16_mib() {
        assert_eq!(load_env(&[]).expect("valid").mqtt.max_packet_size, 16 << 20);
        let config = load_env(&[("MQTT_MAX_PACKET_SIZE", "256KiB")]).expect("valid");
        assert_eq!(config.mqtt.max_packet_size, 256 << 10);
        let largest = load_env(&[("MQTT_MAX_PACKET_SIZE", "268435455")]).expect("valid");
        assert_eq!(largest.mqtt.max_packet_size, 268_435_455);
    }

    #[test]
    fn one_worker_thread_unless_told_otherwise() {
        assert_eq!(load_env(&[]).expect("valid").worker_threads, 1);
        let config = load_env(&[("WORKER_THREADS", "4")]).expect("valid");
        assert_eq!(config.worker_threads, 4);
    }

    #[test]
    fn interval_accepts_seconds_and_units() {
        assert_eq!(parse_duration("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5 s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("fast"), None);
        assert_eq!(parse_duration("-5"), None);
        assert_eq!(parse_duration("1.5s"), None);
    }

    #[test]
    fn sizes_accept_binary_units() {
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("512KiB"), Some(512 << 10));
        assert_eq!(parse_bytes("64 MiB"), Some(64 << 20));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("2g"), Some(2 << 30));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("1.5GiB"), None);
    }

    #[test]
    fn after_write_acks_persist_spooled_records_and_flush_on_idle() {
        let config = load_env(&[]).expect("valid");
        assert_eq!(config.mqtt.ack_mode, AckMode::AfterWrite);
        assert!(config.kafka.spool.persist_all);
        assert_eq!(config.batcher.idle_flush, Some(IDLE_FLUSH));
        let on_receipt = load_env(&[("MQTT_ACK", "on-receipt")]).expect("valid");
        assert!(!on_receipt.kafka.spool.persist_all);
        assert_eq!(on_receipt.batcher.idle_flush, None);
        let qos0 = load_env(&[("MQTT_QOS", "0")]).expect("valid");
        assert!(
            !qos0.kafka.spool.persist_all,
            "QoS 0 has nothing to acknowledge"
        );
        assert_eq!(config.kafka.spool.full_policy, FullPolicy::Block);
        assert_eq!(config.kafka.spool.disk_bytes, 1 << 30);
    }

    #[test]
    fn topics_are_split_on_commas_and_client_id_expands_host_name() {
        let config = load_env(&[
            (
                "MQTT_TOPIC",
                " cars/+/telemetry , $share/bridges/alerts/#,x",
            ),
            ("MQTT_CLIENT_ID", "bridge-%h"),
        ])
        .expect("valid");
        assert_eq!(
            config.mqtt.filters,
            ["cars/+/telemetry", "$share/bridges/alerts/#", "x"]
        );
        assert_eq!(config.mqtt.client_id, "bridge-gateway-7");
    }

    #[test]
    fn kafka_brokers_overrides_broker_and_port() {
        let config = load_env(&[
            ("KAFKA_BROKER", "ignored"),
            ("KAFKA_BROKERS", "k1:9092, k2:9093"),
        ])
        .expect("valid");
        assert_eq!(config.kafka.brokers, "k1:9092,k2:9093");
    }

    #[test]
    fn bad_values_name_the_variable_the_value_and_what_is_expected() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("LOG_LEVEL", "loud")],
                "invalid LOG_LEVEL=\"loud\": expected trace, debug",
            ),
            (
                &[("MQTT_PORT", "abc")],
                "invalid MQTT_PORT=\"abc\": expected a port number",
            ),
            (&[("KAFKA_PORT", "70000")], "invalid KAFKA_PORT=\"70000\""),
            (
                &[("MQTT_QOS", "3")],
                "invalid MQTT_QOS=\"3\": expected 0, 1 or 2",
            ),
            (
                &[("MQTT_TOPIC", " , ")],
                "invalid MQTT_TOPIC=\",\": expected at least one",
            ),
            (&[("MQTT_TOPIC", "a/#/b")], "# must be the whole last level"),
            (&[("MQTT_TOPIC", "a/b+")], "+ must be a whole level"),
            (
                &[("KAFKA_BATCH_SIZE", "0")],
                "invalid KAFKA_BATCH_SIZE=\"0\"",
            ),
            (
                &[("KAFKA_INTERVAL", "soon")],
                "invalid KAFKA_INTERVAL=\"soon\": expected a duration",
            ),
            (&[("KAFKA_INTERVAL", "0ms")], "above zero"),
            (
                &[("KAFKA_TOPIC", "a/b")],
                "invalid KAFKA_TOPIC=\"a/b\": expected a Kafka topic",
            ),
            (&[("KAFKA_BROKERS", "k1")], "invalid KAFKA_BROKERS=\"k1\""),
            (
                &[("KAFKA_MAX_BATCH_SIZE", "10")],
                "expected at least KAFKA_BATCH_SIZE (1000)",
            ),
            (&[("MQTT_CLEAN_SESSION", "maybe")], "expected true or false"),
            (&[("HEALTH_ADDR", "everywhere")], "invalid HEALTH_ADDR"),
            (
                &[("WORKER_THREADS", "0")],
                "invalid WORKER_THREADS=\"0\": expected a whole number from 1 to 256",
            ),
            (
                &[("MQTT_MAX_PACKET_SIZE", "300MiB")],
                "invalid MQTT_MAX_PACKET_SIZE=\"300MiB\": expected a size from 1KiB to 256MiB",
            ),
            (
                &[("MQTT_MAX_PACKET_SIZE", "huge")],
                "invalid MQTT_MAX_PACKET_SIZE=\"huge\": expected a size in bytes",
            ),
        ];
        for (pairs, expected) in cases {
            let line = error_line(pairs);
            assert!(
                line.contains(expected),
                "{pairs:?}: {line:?} lacks {expected:?}"
            );
            assert!(!line.contains('\n'), "{line:?} is one line");
        }
    }

    #[test]
    fn missing_required_variables_are_named() {
        let empty = tempfile::NamedTempFile::new().expect("temp file");
        let error = load(Vec::new(), Some(empty.path()), "h").expect_err("invalid");
        assert_eq!(
            error.to_string(),
            "MQTT_TOPIC is not set: expected comma-separated topic filters \
             (wildcards and $share/group/filter allowed)"
        );
    }

    #[test]
    fn env_file_fills_in_and_the_real_environment_wins() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(
            &mut file,
            b"MQTT_TOPIC=from/file\nKAFKA_TOPIC=file-topic\nMQTT_PORT=1999\n",
        )
        .expect("write");
        let config = load(
            vec![("MQTT_PORT".to_owned(), "2000".to_owned())],
            Some(file.path()),
            "h",
        )
        .expect("valid");
        assert_eq!(config.mqtt.filters, ["from/file"]);
        assert_eq!(config.kafka.topic, "file-topic");
        assert_eq!(config.mqtt.port, 2000);
    }

    #[test]
    fn missing_env_file_is_an_error() {
        let error = load(env(&[]), Some(Path::new("/nonexistent/.env")), "h").expect_err("invalid");
        assert!(
            error
                .to_string()
                .starts_with("cannot read env file /nonexistent/.env")
        );
    }

    #[test]
    fn every_default_parses() {
        for variable in VARIABLES {
            if let Some(default) = variable.default {
                let config = load_env(&[(variable.name, default)]);
                assert!(
                    config.is_ok(),
                    "{} default {default:?}: {config:?}",
                    variable.name
                );
            }
        }
    }

    #[test]
    fn env_example_lists_every_variable_with_its_default() {
        let example = include_str!("../../.env.example");
        for variable in VARIABLES {
            let name = variable.name.trim_end_matches('*');
            let set = format!("\n{name}=");
            let commented = format!("\n# {name}");
            match variable.default {
                Some(default) => assert!(
                    example.contains(&format!("\n{}={default}\n", variable.name)),
                    ".env.example lacks {}={default}",
                    variable.name
                ),
                None => assert!(
                    example.contains(&set) || example.contains(&commented),
                    ".env.example lacks {}",
                    variable.name
                ),
            }
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.env.example");
        load(Vec::new(), Some(&path), "h").expect(".env.example is a valid configuration");
    }
}
