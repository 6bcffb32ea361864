//! Each task's configuration, built in one pass from [`Vars`]: the values several of them
//! depend on (the shutdown timeout, the dead-letter topic, whether acknowledgements wait for
//! Kafka) are settled first and passed in, so nothing is filled with a placeholder and patched
//! later.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mkb_bridge::route::{HeaderSet, KeySetting, RouterConfig, Rule, ValueFormat};
use mkb_bridge::{BatcherConfig, QoS, Router};
use mkb_downlink::{DownlinkConfig, Format as DownlinkFormat, Render, TopicTemplate};
use mkb_kafka::{KafkaConfig, SpoolConfig};
use mkb_log::LogConfig;
use mkb_mqtt::{AckMode, Credentials, MqttConfig, MqttVersion, TlsConfig, TlsError, TlsFile};

use super::values::{
    ack_mode, boolean, broker_list, byte_size, full_policy, host, ip_address, kafka_topic,
    keep_alive, listen_port, log_format, log_level, mqtt_version, number, packet_size, port,
    positive_duration, qos, replication, topic_filters,
};
use super::variables::{KAFKA_PROPERTY_PREFIX, Vars};
use super::{Config, ConfigError};

/// The whole configuration.
pub(super) fn config(vars: &Vars, host_name: &str) -> Result<Config, ConfigError> {
    let log = LogConfig {
        level: vars.parse("LOG_LEVEL", log_level)?,
        format: vars.parse("LOG_FORMAT", log_format)?,
    };
    let shutdown_timeout = vars.parse("SHUTDOWN_TIMEOUT", positive_duration)?;
    // Both tasks make dead letters: the Kafka task of records Kafka refuses, the MQTT task of
    // messages it has to read past.
    let dead_letter_topic = vars.parse_opt("KAFKA_DLQ_TOPIC", kafka_topic)?;
    let mqtt = mqtt(vars, host_name, shutdown_timeout, dead_letter_topic.clone())?;
    let rules = topic_map(vars)?;
    let topic = vars.parse_opt("KAFKA_TOPIC", kafka_topic)?;
    if topic.is_none() && rules.is_empty() {
        return Err(ConfigError::Missing {
            var: "KAFKA_TOPIC",
            expected: "the Kafka topic every message is written to (or a topic map, \
                       KAFKA_TOPIC_MAP or KAFKA_TOPIC_MAP_FILE)",
        });
    }
    let router = router(vars, rules, topic.is_some())?;
    // With deferred acks the broker stops at its in-flight window: flush when it goes quiet,
    // and keep what is spooled on disk before acknowledging it.
    let deferred_acks = mqtt.ack_mode == AckMode::AfterWrite && mqtt.qos != QoS::AtMostOnce;
    let batcher = BatcherConfig {
        max_records: vars.parse("KAFKA_BATCH_SIZE", |v, n| number(v, n, 1, 1_000_000))?,
        interval: vars.parse("KAFKA_INTERVAL", positive_duration)?,
    };
    let max_batch_size = vars.parse("KAFKA_MAX_BATCH_SIZE", |value, name| {
        match number(value, name, 1, 1_000_000)? {
            size if size >= batcher.max_records => Ok(size),
            _ => Err(ConfigError::invalid(
                name,
                value,
                format!("at least KAFKA_BATCH_SIZE ({})", batcher.max_records),
            )),
        }
    })?;
    let kafka = kafka(
        vars,
        topic,
        dead_letter_topic,
        max_batch_size,
        shutdown_timeout,
        deferred_acks,
    )?;
    let downlink = downlink(vars, &mqtt, &kafka)?;
    Ok(Config {
        log,
        mqtt,
        kafka,
        downlink,
        router: Arc::new(router),
        batcher,
        max_batch_size,
        health_addr: health_addr(vars)?,
        shutdown_timeout,
        worker_threads: vars.parse("WORKER_THREADS", |v, n| number(v, n, 1, 256))?,
        effective: Vec::new(),
    })
}

fn mqtt(
    vars: &Vars,
    host_name: &str,
    shutdown_timeout: Duration,
    dead_letter_topic: Option<String>,
) -> Result<MqttConfig, ConfigError> {
    let client_id = vars.parse("MQTT_CLIENT_ID", |value, name| {
        match value.replace("%h", host_name) {
            id if id.is_empty() => Err(ConfigError::invalid(
                name,
                value,
                "a non-empty client id (%h is the host name)",
            )),
            id => Ok(id),
        }
    })?;
    let tls = tls(vars)?;
    // Checked whatever the transport, so a bad path is reported before it matters.
    let path = vars.parse("MQTT_WS_PATH", |value, name| {
        if value.starts_with('/') && !value.contains(char::is_whitespace) {
            Ok(value.to_owned())
        } else {
            Err(ConfigError::invalid(
                name,
                value,
                "a URL path starting with / (e.g. /mqtt)",
            ))
        }
    })?;
    let websocket_path = match vars.parse("MQTT_TRANSPORT", |value, name| match value {
        "tcp" => Ok(false),
        "ws" => Ok(true),
        _ => Err(ConfigError::invalid(name, value, "tcp or ws")),
    })? {
        false => None,
        true => Some(path),
    };
    Ok(MqttConfig {
        host: vars.parse("MQTT_BROKER", host)?,
        port: match vars.parse_opt("MQTT_PORT", port)? {
            Some(port) => port,
            None if tls.is_some() => 8883,
            None => 1883,
        },
        version: vars.parse("MQTT_VERSION", mqtt_version)?,
        credentials: credentials(vars)?,
        tls,
        dead_letter_topic,
        receive_maximum: vars.parse("MQTT_RECEIVE_MAXIMUM", |v, n| number(v, n, 1, 65535))?,
        filters: topic_filters(vars.required("MQTT_TOPIC")?, "MQTT_TOPIC")?,
        qos: vars.parse("MQTT_QOS", qos)?,
        clean_session: vars.parse("MQTT_CLEAN_SESSION", boolean)?,
        keep_alive: vars.parse("MQTT_KEEP_ALIVE", keep_alive)?,
        max_packet_size: vars.parse("MQTT_MAX_PACKET_SIZE", packet_size)?,
        reconnect_min: Duration::from_millis(250),
        reconnect_max: Duration::from_secs(30),
        ack_mode: vars.parse("MQTT_ACK", ack_mode)?,
        shutdown_grace: shutdown_timeout.mul_f64(0.75),
        websocket_path,
        client_id,
    })
}

/// TLS is on with `MQTT_TLS=true`, or when a CA or client certificate is given and `MQTT_TLS`
/// is unset. The files are read now, so a bad one stops the start.
fn tls(vars: &Vars) -> Result<Option<native_tls::TlsConnector>, ConfigError> {
    let path = |name| vars.opt(name).map(PathBuf::from);
    let settings = TlsConfig {
        ca_file: path("ROOT_CA"),
        client_cert_file: path("MQTT_CLIENT_CERT"),
        client_key_file: path("MQTT_CLIENT_KEY"),
        client_key_password: vars.raw("MQTT_CLIENT_KEY_PASSWORD").map(str::to_owned),
    };
    let enabled = match vars.parse_opt("MQTT_TLS", boolean)? {
        Some(enabled) => enabled,
        None => settings.ca_file.is_some() || settings.client_cert_file.is_some(),
    };
    if !enabled {
        let needs_tls = [
            ("ROOT_CA", &settings.ca_file),
            ("MQTT_CLIENT_CERT", &settings.client_cert_file),
        ];
        if let Some((var, _)) = needs_tls.iter().find(|(_, file)| file.is_some()) {
            return Err(ConfigError::invalid(
                "MQTT_TLS",
                vars.opt("MQTT_TLS").unwrap_or_default(),
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

fn credentials(vars: &Vars) -> Result<Option<Credentials>, ConfigError> {
    match (vars.opt("MQTT_USERNAME"), vars.raw("MQTT_PASSWORD")) {
        (Some(username), password) => Ok(Some(Credentials {
            username: username.to_owned(),
            password: password.unwrap_or_default().to_owned(),
        })),
        (None, Some(_)) => Err(ConfigError::Missing {
            var: "MQTT_USERNAME",
            expected: "a user name, since MQTT_PASSWORD is set",
        }),
        (None, None) => Ok(None),
    }
}

fn kafka(
    vars: &Vars,
    topic: Option<String>,
    dead_letter_topic: Option<String>,
    max_batch_size: usize,
    shutdown_timeout: Duration,
    deferred_acks: bool,
) -> Result<KafkaConfig, ConfigError> {
    let brokers = match vars.parse_opt("KAFKA_BROKERS", broker_list)? {
        Some(list) => list,
        None => format!(
            "{}:{}",
            vars.parse("KAFKA_BROKER", host)?,
            vars.parse("KAFKA_PORT", port)?
        ),
    };
    if let Some(dlq) = dead_letter_topic
        .as_deref()
        .filter(|dlq| Some(*dlq) == topic.as_deref())
    {
        return Err(ConfigError::invalid(
            "KAFKA_DLQ_TOPIC",
            dlq,
            "a topic other than KAFKA_TOPIC",
        ));
    }
    let kafka = KafkaConfig {
        brokers,
        topic,
        dead_letter_topic,
        auto_create_topics: vars.parse("KAFKA_AUTO_CREATE_TOPICS", boolean)?,
        topic_partitions: vars.parse("KAFKA_TOPIC_PARTITIONS", |v, n| number(v, n, 1, 100_000))?,
        topic_replication: vars.parse("KAFKA_TOPIC_REPLICATION", replication)?,
        test_topic: vars.parse_opt("KAFKA_TEST_TOPIC", kafka_topic)?,
        startup_timeout: vars.parse("KAFKA_STARTUP_TIMEOUT", positive_duration)?,
        retry_interval: vars.parse("KAFKA_RETRY_INTERVAL", positive_duration)?,
        delivery_timeout: vars.parse("KAFKA_DELIVERY_TIMEOUT", positive_duration)?,
        properties: kafka_properties(vars.all())?,
        max_batch_size,
        shutdown_grace: shutdown_timeout / 2,
        spool: spool(vars, deferred_acks)?,
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
    Ok(kafka)
}

/// `persist_all`: records are acknowledged only once the disk holds them.
fn spool(vars: &Vars, persist_all: bool) -> Result<SpoolConfig, ConfigError> {
    let dir = vars.parse("SPOOL_DIR", |value, name| {
        let dir = PathBuf::from(value);
        if dir.exists() && !dir.is_dir() {
            return Err(ConfigError::invalid(
                name,
                value,
                "a directory (this is a file)",
            ));
        }
        Ok(dir)
    })?;
    let disk_bytes = vars.parse("SPOOL_DISK_BYTES", byte_size)?;
    Ok(SpoolConfig {
        dir: (disk_bytes > 0).then_some(dir),
        memory_bytes: vars.parse("SPOOL_MEMORY_BYTES", byte_size)?,
        disk_bytes,
        full_policy: vars.parse("SPOOL_FULL_POLICY", full_policy)?,
        persist_all,
    })
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

/// The rules of `KAFKA_TOPIC_MAP` (separated by `;` or newlines), then those of
/// `KAFKA_TOPIC_MAP_FILE` (one per line, `#` comments).
fn topic_map(vars: &Vars) -> Result<Vec<Rule>, ConfigError> {
    let mut rules = Vec::new();
    if let Some(map) = vars.opt("KAFKA_TOPIC_MAP") {
        for text in map
            .split([';', '\n'])
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let rule = Rule::parse(text).map_err(|e| {
                ConfigError::invalid("KAFKA_TOPIC_MAP", map, format!("rules SOURCE=TARGET ({e})"))
            })?;
            rules.push(rule);
        }
    }
    if let Some(path) = vars.opt("KAFKA_TOPIC_MAP_FILE") {
        let invalid = |why: String| ConfigError::invalid("KAFKA_TOPIC_MAP_FILE", path, why);
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("a readable file of rules ({e})")))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let rule = Rule::parse(line).map_err(|e| {
                invalid(format!(
                    "one rule SOURCE=TARGET per line (line {}: {e})",
                    number + 1
                ))
            })?;
            rules.push(rule);
        }
    }
    Ok(rules)
}

/// Routing: the topic map, `KAFKA_TOPIC_SEPARATOR`, `KAFKA_KEY`, `KAFKA_HEADERS` and
/// `KAFKA_VALUE_FORMAT`. `fallback`: `KAFKA_TOPIC` is set, for messages no rule matches.
fn router(vars: &Vars, rules: Vec<Rule>, fallback: bool) -> Result<Router, ConfigError> {
    let separator = vars.parse("KAFKA_TOPIC_SEPARATOR", |value, name| {
        let valid =
            (1..=8).contains(&value.len()) && value.chars().all(mkb_bridge::route::is_topic_char);
        if valid {
            Ok(value.to_owned())
        } else {
            Err(ConfigError::invalid(
                name,
                value,
                "1 to 8 characters of a-z A-Z 0-9 . _ -",
            ))
        }
    })?;
    let key = vars.parse("KAFKA_KEY", |value, name| {
        KeySetting::parse(value)
            .map_err(|e| ConfigError::invalid(name, value, format!("a key template or none ({e})")))
    })?;
    let headers = vars.parse("KAFKA_HEADERS", |value, name| {
        HeaderSet::parse(value).map_err(|e| {
            ConfigError::invalid(
                name,
                value,
                format!(
                    "none, all, or a list of {} ({e})",
                    HeaderSet::NAMES.join(", ")
                ),
            )
        })
    })?;
    let format = vars.parse("KAFKA_VALUE_FORMAT", |value, name| match value {
        "envelope" => Ok(ValueFormat::Envelope),
        "raw" => Ok(ValueFormat::Raw),
        "json" => Ok(ValueFormat::Json),
        "sparkplug-json" => Ok(ValueFormat::SparkplugJson),
        _ => Err(ConfigError::invalid(
            name,
            value,
            "envelope, raw, json or sparkplug-json",
        )),
    })?;
    Router::new(RouterConfig {
        rules,
        fallback,
        separator,
        key,
        headers,
        format,
        dead_letter_topic: vars.opt("KAFKA_DLQ_TOPIC").map(str::to_owned),
    })
    .map_err(|e| {
        ConfigError::invalid(
            "KAFKA_KEY",
            vars.get("KAFKA_KEY"),
            format!("a key template whose names a rule of the topic map defines ({e})"),
        )
    })
}

/// Publishes awaiting their acknowledgement at most, on the downlink.
const DOWNLINK_IN_FLIGHT: usize = 1000;

/// The downlink, when `DOWNLINK_KAFKA_TOPICS` is set: the uplink's connections (MQTT, and Kafka
/// with its security properties), its own topics and rendering.
fn downlink(
    vars: &Vars,
    mqtt: &MqttConfig,
    kafka: &KafkaConfig,
) -> Result<Option<DownlinkConfig>, ConfigError> {
    let topics = vars.parse_opt("DOWNLINK_KAFKA_TOPICS", |value, name| {
        let topics: Vec<String> = value
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        for topic in &topics {
            let valid = match topic.strip_prefix("re:") {
                Some(pattern) => regex::Regex::new(pattern).is_ok(),
                None => kafka_topic(topic, name).is_ok(),
            };
            if !valid {
                return Err(ConfigError::invalid(
                    name,
                    value,
                    format!("Kafka topics or re:REGEX, comma-separated ({topic:?} is neither)"),
                ));
            }
        }
        Ok(topics)
    })?;
    let group_id = vars.get("DOWNLINK_GROUP_ID").to_owned();
    let session_timeout = vars.parse("DOWNLINK_SESSION_TIMEOUT", |value, name| {
        let timeout = positive_duration(value, name)?;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&timeout) {
            return Err(ConfigError::invalid(name, value, "between 1s and 1h"));
        }
        Ok(timeout)
    })?;
    let static_membership = vars.parse("DOWNLINK_STATIC_MEMBERSHIP", boolean)?;
    let offset_reset = vars.parse("DOWNLINK_OFFSET_RESET", |value, name| match value {
        "latest" | "earliest" => Ok(value.to_owned()),
        _ => Err(ConfigError::invalid(name, value, "latest or earliest")),
    })?;
    let topic = vars.parse_opt("DOWNLINK_MQTT_TOPIC", |value, name| {
        TopicTemplate::parse(value).map_err(|e| {
            ConfigError::invalid(
                name,
                value,
                format!("an MQTT topic template with {{key}}, {{header:NAME}}, {{kafka_topic}}, {{partition}} ({e})"),
            )
        })
    })?;
    let format = vars.parse("DOWNLINK_VALUE_FORMAT", |value, name| {
        DownlinkFormat::parse(value)
            .ok_or_else(|| ConfigError::invalid(name, value, "auto, raw, envelope or json"))
    })?;
    // The downlink publishes on a connection of its own, so MQTT 5's No Local would not keep
    // the uplink from reading those publishes back: a template that can match an uplink filter
    // is refused unless the overlap is intended.
    let allow_overlap = vars.parse("DOWNLINK_ALLOW_OVERLAP", boolean)?;
    if let (Some(template), Some(_), false) = (&topic, &topics, allow_overlap)
        && let Some(filter) = mqtt.filters.iter().find(|f| template.may_match(f))
    {
        return Err(ConfigError::invalid(
            "DOWNLINK_MQTT_TOPIC",
            vars.opt("DOWNLINK_MQTT_TOPIC").unwrap_or_default(),
            format!(
                "topics the uplink's MQTT_TOPIC does not subscribe to ({filter} can match them: \
                 the bridge would read back its own publishes); set DOWNLINK_ALLOW_OVERLAP=true \
                 if that is intended"
            ),
        ));
    }
    let render = Render {
        topic,
        format,
        qos: vars.parse("DOWNLINK_QOS", qos)?,
        retain: vars.parse("DOWNLINK_RETAIN", boolean)?,
        properties: mqtt.version == MqttVersion::V5,
    };
    let properties = kafka
        .properties
        .iter()
        .filter(|(key, _)| {
            ["security.", "sasl.", "ssl."]
                .iter()
                .any(|p| key.starts_with(p))
        })
        .cloned()
        .collect();
    Ok(topics
        .filter(|t| !t.is_empty())
        .map(|topics| DownlinkConfig {
            brokers: kafka.brokers.clone(),
            properties,
            topics,
            group_id,
            session_timeout,
            static_membership,
            offset_reset,
            render,
            max_in_flight: DOWNLINK_IN_FLIGHT,
            commit_interval: Duration::from_millis(250),
            dead_letter_topic: kafka.dead_letter_topic.clone(),
            mqtt: mqtt.clone(),
        }))
}

/// Where `/healthz`, `/readyz` and `/metrics` are served.
pub(super) fn health_addr(vars: &Vars) -> Result<SocketAddr, ConfigError> {
    Ok(SocketAddr::new(
        vars.parse("HEALTH_ADDR", ip_address)?,
        vars.parse("HEALTH_PORT", listen_port)?,
    ))
}
