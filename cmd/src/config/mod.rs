//! The bridge's configuration: the only place that reads flags, the environment and `.env`.
//!
//! Sources, strongest first: command-line flags, the process environment, the `.env` file (the
//! working directory's, or the one named by `--env-file`), then the defaults in [`VARIABLES`].
//! Every value is validated here; a bad one becomes a [`ConfigError`] naming the variable, the
//! value and what is expected, which `main` prints on one line before exiting with status 64.
//! Secrets never appear in those messages.
//!
//! - [`variables`]: the table of variables (the one place a variable is declared), the
//!   [`Vars`](variables::Vars) lookup built on it, the command line and `--help`;
//! - [`values`]: the value parsers;
//! - [`build`]: each task's configuration, built in one pass from [`Vars`](variables::Vars).

mod build;
mod values;
mod variables;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mkb_bridge::{BatcherConfig, Router};
use mkb_kafka::KafkaConfig;
use mkb_log::LogConfig;
use mkb_mqtt::MqttConfig;

pub use values::{parse_bytes, parse_duration};
pub use variables::{
    CommandLine, KAFKA_PROPERTY_PREFIX, VARIABLES, Variable, flag_name, help, parse_args,
};
use variables::{SECRET_VARIABLES, Vars};

/// The validated configuration of one bridge.
#[derive(Clone, Debug)]
pub struct Config {
    pub log: LogConfig,
    pub mqtt: MqttConfig,
    pub kafka: KafkaConfig,
    /// The Kafka → MQTT direction, when `DOWNLINK_KAFKA_TOPICS` is set.
    pub downlink: Option<mkb_downlink::DownlinkConfig>,
    /// What each message becomes in Kafka: topic, key, headers, value.
    pub router: Arc<Router>,
    pub batcher: BatcherConfig,
    pub max_batch_size: usize,
    pub health_addr: SocketAddr,
    pub shutdown_timeout: Duration,
    /// Threads of the async runtime.
    pub worker_threads: usize,
    /// Every variable's effective value, secrets shown as `***`, for `--check-config`.
    pub effective: Vec<(String, String)>,
}

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

/// Reads the configuration from `environment` (the process's, or a test's; later entries win,
/// so flags go last) merged with the env file: `env_file` when given (it must exist), else
/// `./.env` when present.
pub fn load(
    environment: impl IntoIterator<Item = (String, String)>,
    env_file: Option<&Path>,
    host_name: &str,
) -> Result<Config, ConfigError> {
    let vars = merge(environment, env_file)?;
    let mut config = build::config(&vars, host_name)?;
    config.effective = effective_values(vars.all());
    Ok(config)
}

/// Only `HEALTH_ADDR:HEALTH_PORT`, for the `healthcheck` subcommand: a health check must not
/// fail because some other setting is missing where it runs.
pub fn health_addr(
    environment: impl IntoIterator<Item = (String, String)>,
    env_file: Option<&Path>,
) -> Result<std::net::SocketAddr, ConfigError> {
    let vars = merge(environment, env_file)?;
    build::health_addr(&vars)
}

/// The env file's values overridden by `environment`'s; empty values count as unset.
fn merge(
    environment: impl IntoIterator<Item = (String, String)>,
    env_file: Option<&Path>,
) -> Result<Vars, ConfigError> {
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
    merged.extend(environment);
    // As in a `.env` line `KAFKA_TEST_TOPIC=`.
    merged.retain(|_, value| !value.trim().is_empty());
    Ok(Vars::new(merged))
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

#[cfg(test)]
mod tests {
    use mkb_bridge::QoS;
    use mkb_kafka::FullPolicy;
    use mkb_mqtt::AckMode;

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
    fn after_write_acks_persist_spooled_records() {
        let config = load_env(&[]).expect("valid");
        assert_eq!(config.mqtt.ack_mode, AckMode::AfterWrite);
        assert!(config.kafka.spool.persist_all);
        let on_receipt = load_env(&[("MQTT_ACK", "on-receipt")]).expect("valid");
        assert!(!on_receipt.kafka.spool.persist_all);
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
        assert_eq!(config.kafka.topic.as_deref(), Some("file-topic"));
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
        let example = include_str!("../../../.env.example");
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

    #[test]
    fn every_variable_in_the_table_is_read() {
        let empty = tempfile::NamedTempFile::new().expect("temp file");
        let vars = merge(env(&[]), Some(empty.path())).expect("merged");
        build::config(&vars, "h").expect("valid");
        let read = vars.read();
        for variable in VARIABLES.iter().filter(|v| !v.name.ends_with('*')) {
            assert!(
                read.contains(variable.name),
                "{} is never read",
                variable.name
            );
        }
    }

    fn args(line: &str) -> Result<CommandLine, String> {
        parse_args(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn every_variable_has_a_flag_in_each_of_go_s_spellings() {
        for variable in VARIABLES.iter().filter(|v| !v.name.ends_with('*')) {
            let flag = flag_name(variable.name);
            let mut lines = vec![(format!("--{flag}=v"), "v"), (format!("-{flag}=v"), "v")];
            if variables::is_switch(variable.name) {
                // As in Go, a switch takes no separate value: alone, it means true.
                lines.push((format!("--{flag}"), "true"));
                lines.push((format!("-{flag}"), "true"));
            } else {
                lines.push((format!("--{flag} v"), "v"));
                lines.push((format!("-{flag} v"), "v"));
            }
            for (line, value) in lines {
                let parsed = args(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
                assert_eq!(
                    parsed.values,
                    [(variable.name.to_owned(), value.to_owned())],
                    "{line}"
                );
            }
        }
    }

    /// A Metamorphosis command line, with its own spellings: the misspelt `-kakfa-port`, a
    /// switch alone and as `=false`, and `-kafka-workers`, which means nothing here.
    #[test]
    fn a_metamorphosis_command_line_configures_the_bridge_and_flags_win() {
        let line = "-log-level debug -mqtt-broker broker.local -mqtt-port 1884 \
                    -mqtt-topic test/# -mqtt-tls=false -kafka-broker redpanda -kakfa-port 19092 \
                    -kafka-topic mqtt-in -kafka-batch-size 500 -kafka-max-batch-size 4000 \
                    -kafka-interval 2s -kafka-retry-interval 3 -health-port 9000 \
                    -kafka-workers 4 -test-message-topic probe -mqtt-clean-session";
        let command = args(line).expect("parses");
        assert_eq!(command.ignored, ["-kafka-workers"]);
        // The environment says otherwise; the flags come last and win.
        let mut environment = vec![
            ("MQTT_BROKER".to_owned(), "from-env".to_owned()),
            ("KAFKA_TOPIC".to_owned(), "from-env".to_owned()),
        ];
        environment.extend(command.values);
        let empty = tempfile::NamedTempFile::new().expect("temp file");
        let config = load(environment, Some(empty.path()), "h").expect("valid");
        assert_eq!(config.log.level, tracing::Level::DEBUG);
        assert_eq!(
            (config.mqtt.host.as_str(), config.mqtt.port),
            ("broker.local", 1884)
        );
        assert_eq!(config.mqtt.filters, ["test/#"]);
        assert!(config.mqtt.tls.is_none());
        assert!(config.mqtt.clean_session, "a switch alone is true");
        assert_eq!(config.kafka.brokers, "redpanda:19092");
        assert_eq!(config.kafka.topic.as_deref(), Some("mqtt-in"));
        assert_eq!(config.kafka.test_topic.as_deref(), Some("probe"));
        assert_eq!(config.batcher.max_records, 500);
        assert_eq!(config.max_batch_size, 4000);
        assert_eq!(config.batcher.interval, Duration::from_secs(2));
        assert_eq!(config.kafka.retry_interval, Duration::from_secs(3));
        assert_eq!(config.health_addr.port(), 9000);
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        for (line, expected) in [
            ("--no-such-flag 1", "unknown argument \"--no-such-flag\""),
            ("positional", "unknown argument \"positional\""),
            ("--mqtt-broker", "-mqtt-broker needs a value"),
            ("--env-file", "-env-file needs a path"),
        ] {
            let error = args(line).expect_err(line);
            assert!(error.contains(expected), "{line}: {error}");
        }
        let control = args("--check-config --env-file x.env -h -V").expect("parses");
        assert!(control.check_config && control.help && control.version);
        assert_eq!(control.env_file.as_deref(), Some(Path::new("x.env")));
    }
}
