//! The variable table — every variable's name, default and meaning, the one place a variable
//! is declared — and what is derived from it: [`Vars`], the lookup the builders read values
//! through; the command line (a `--kebab-case` flag per variable, and Metamorphosis' flag
//! spellings); and `--help`.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use super::ConfigError;

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
    var(
        "MQTT_TRANSPORT",
        Some("tcp"),
        "tcp, or ws for MQTT over WebSockets (wss with TLS)",
    ),
    var(
        "MQTT_WS_PATH",
        Some("/mqtt"),
        "with MQTT_TRANSPORT=ws: the path of the broker's WebSocket endpoint",
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
        "Kafka topic every message is written to; required without a topic map, with one the \
         topic of messages no rule matches (unset: they are counted as unmapped)",
    ),
    var(
        "KAFKA_TOPIC_MAP",
        None,
        "routing rules SOURCE=TARGET separated by ; or newlines, first match wins: an MQTT \
         filter with named levels (cars/{vin}/#) or re:REGEX, to a topic template ({vin}, {2}, \
         {#}, {topic}); see README, Routing",
    ),
    var(
        "KAFKA_TOPIC_MAP_FILE",
        None,
        "file of routing rules, one per line, # comments (after those of KAFKA_TOPIC_MAP)",
    ),
    var(
        "KAFKA_TOPIC_SEPARATOR",
        Some("_"),
        "what / becomes in a mapped Kafka topic name",
    ),
    var(
        "KAFKA_KEY",
        Some("{topic}"),
        "key template: {topic}, a level ({2}, {vin}), {prop:NAME} (MQTT 5 user property), \
         {json:/pointer} (payload field), text; none for a null key",
    ),
    var(
        "KAFKA_HEADERS",
        Some("none"),
        "MQTT fields as Kafka headers (mqtt.*): none, all, or a list of topic, qos, retain, \
         dup, props, content_type, response_topic, correlation_data, message_expiry",
    ),
    var(
        "KAFKA_VALUE_FORMAT",
        Some("envelope"),
        "record value: envelope (Metamorphosis' JSON with base64 content), raw (the payload), \
         json (topic, qos, retain, receipt time and the payload) or sparkplug-json (Sparkplug B \
         payloads on spBv1.0/ topics decoded to JSON, aliases resolved; other topics as envelope)",
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
    var(
        "DOWNLINK_KAFKA_TOPICS",
        None,
        "downlink: comma-separated Kafka topics (re: prefix for a regex) whose records are \
         published to MQTT, offsets committed after the broker's acknowledgement; unset: off",
    ),
    var(
        "DOWNLINK_GROUP_ID",
        Some("mqtt-kafka-bridge-downlink"),
        "downlink Kafka consumer group (replicas share the partitions)",
    ),
    var(
        "DOWNLINK_OFFSET_RESET",
        Some("latest"),
        "downlink: where a group without committed offsets starts, latest or earliest",
    ),
    var(
        "DOWNLINK_SESSION_TIMEOUT",
        Some("10s"),
        "downlink: how long a replica that stopped answering (killed) keeps its Kafka \
         partitions before the others take them (librdkafka's session.timeout.ms)",
    ),
    var(
        "DOWNLINK_STATIC_MEMBERSHIP",
        Some("false"),
        "downlink: join the consumer group as <MQTT_CLIENT_ID>-downlink (group.instance.id), so \
         a restart takes its partitions back without a rebalance (Kafka 2.3+; not tansu 0.6)",
    ),
    var(
        "DOWNLINK_MQTT_TOPIC",
        None,
        "downlink MQTT topic template: {key}, {header:NAME}, {kafka_topic}, {partition}; unset: \
         the record's mqtt.topic header, else the topic of a Metamorphosis envelope value",
    ),
    var(
        "DOWNLINK_VALUE_FORMAT",
        Some("auto"),
        "downlink payload: auto (an envelope is decoded, anything else sent as it is), raw, \
         envelope or json (the uplink's formats, reversed)",
    ),
    var(
        "DOWNLINK_QOS",
        Some("1"),
        "downlink QoS, 0, 1 or 2 (a record's mqtt.qos header overrides it)",
    ),
    var(
        "DOWNLINK_RETAIN",
        Some("false"),
        "downlink retain flag (a record's mqtt.retain header overrides it)",
    ),
    var(
        "DOWNLINK_ALLOW_OVERLAP",
        Some("false"),
        "true lets DOWNLINK_MQTT_TOPIC publish where MQTT_TOPIC subscribes (the uplink then \
         reads the downlink's publishes back); false refuses such a start",
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

/// Variables whose values are never printed.
pub(super) const SECRET_VARIABLES: &[&str] = &["MQTT_PASSWORD", "MQTT_CLIENT_KEY_PASSWORD"];

/// Prefix of the variables passed through to librdkafka.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";

/// The table's entry for `name`.
fn variable(name: &str) -> Option<&'static Variable> {
    VARIABLES.iter().find(|v| v.name == name)
}

/// The merged configuration values (environment, flags and env file), read by name. Every
/// name must be in [`VARIABLES`]; defaults come from there.
pub(super) struct Vars {
    values: HashMap<String, String>,
    /// Names read so far, for the test that every variable in the table is used.
    read: RefCell<BTreeSet<&'static str>>,
}

impl Vars {
    /// `values` holds only set, non-empty values.
    pub(super) fn new(values: HashMap<String, String>) -> Self {
        Self {
            values,
            read: RefCell::new(BTreeSet::new()),
        }
    }

    /// The value when set, trimmed.
    pub(super) fn opt(&self, name: &'static str) -> Option<&str> {
        debug_assert!(variable(name).is_some(), "{name} is not in VARIABLES");
        self.read.borrow_mut().insert(name);
        self.values.get(name).map(|v| v.trim())
    }

    /// The value when set, as given (a password may begin or end with spaces).
    pub(super) fn raw(&self, name: &'static str) -> Option<&str> {
        self.opt(name)?;
        self.values.get(name).map(String::as_str)
    }

    /// The value, or its default from the table.
    pub(super) fn get(&self, name: &'static str) -> &str {
        self.opt(name).unwrap_or_else(|| {
            variable(name)
                .and_then(|v| v.default)
                .unwrap_or_else(|| panic!("{name} is read with a default but has none"))
        })
    }

    /// The value of a variable that must be set.
    pub(super) fn required(&self, name: &'static str) -> Result<&str, ConfigError> {
        self.opt(name).ok_or_else(|| ConfigError::Missing {
            var: name,
            expected: variable(name)
                .map_or("", |v| v.meaning)
                .trim_start_matches("required: "),
        })
    }

    /// The value (or default) parsed by `parse`.
    pub(super) fn parse<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str, &'static str) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        parse(self.get(name), name)
    }

    /// The value parsed by `parse` when set.
    pub(super) fn parse_opt<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str, &'static str) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        self.opt(name).map(|value| parse(value, name)).transpose()
    }

    /// Every set value, for the librdkafka pass-through and `--check-config`.
    pub(super) fn all(&self) -> &HashMap<String, String> {
        &self.values
    }

    /// The names read so far.
    #[cfg(test)]
    pub(super) fn read(&self) -> BTreeSet<&'static str> {
        self.read.borrow().clone()
    }
}

/// What the command line asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CommandLine {
    pub help: bool,
    pub version: bool,
    pub check_config: bool,
    pub env_file: Option<std::path::PathBuf>,
    /// `--route TOPIC`: print what a message on TOPIC becomes, then exit.
    pub route: Option<String>,
    /// `--payload FILE`: the payload `--route` uses (empty without it).
    pub payload: Option<std::path::PathBuf>,
    /// `healthcheck`: ask the running bridge's `/healthz` (a container's HEALTHCHECK), then
    /// exit.
    pub healthcheck: bool,
    /// Values given as flags, by variable name; they win over the environment.
    pub values: Vec<(String, String)>,
    /// Metamorphosis flags that mean nothing here, given anyway (warned about at start).
    pub ignored: Vec<String>,
}

/// Metamorphosis' flag spellings that are not the kebab-case of one of our variables.
const METAMORPHOSIS_FLAGS: &[(&str, &str)] = &[
    // Misspelt in Metamorphosis itself.
    ("kakfa-port", "KAFKA_PORT"),
    // Before it became kafka-test-topic.
    ("test-message-topic", "KAFKA_TEST_TOPIC"),
];

/// Metamorphosis flags of settings this bridge does not have: accepted with their value, so a
/// Metamorphosis command line starts, and reported.
const IGNORED_FLAGS: &[&str] = &["kafka-workers"];

/// A variable's flag: `MQTT_BROKER` → `mqtt-broker`.
pub fn flag_name(variable: &str) -> String {
    variable.to_ascii_lowercase().replace('_', "-")
}

/// The variable a flag (without its dashes) sets.
fn flag_variable(flag: &str) -> Option<&'static str> {
    METAMORPHOSIS_FLAGS
        .iter()
        .find(|(name, _)| *name == flag)
        .map(|(_, var)| *var)
        .or_else(|| {
            VARIABLES
                .iter()
                .filter(|v| !v.name.ends_with('*'))
                .find(|v| flag_name(v.name) == flag)
                .map(|v| v.name)
        })
}

/// Whether a variable is a switch: as a flag it may stand alone (`-mqtt-tls` means true).
pub(super) fn is_switch(variable: &str) -> bool {
    self::variable(variable)
        .and_then(|v| v.default)
        .is_some_and(|d| d == "true" || d == "false")
        || variable == "MQTT_TLS"
}

/// Parses the command line in Go's flag syntax, which Metamorphosis uses, and ours: `-flag
/// value`, `--flag value`, `-flag=value`, `--flag=value`; a switch alone means true
/// (`-mqtt-tls`, `-mqtt-tls=false`). A later flag wins over an earlier one.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<CommandLine, String> {
    let mut command = CommandLine::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "healthcheck" {
            command.healthcheck = true;
            continue;
        }
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(format!("unknown argument {arg:?} (see --help)"));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (flag, None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("-{name} needs {what}"))
        };
        match name {
            "h" | "help" => command.help = true,
            "V" | "version" => command.version = true,
            "check-config" => command.check_config = true,
            "env-file" => command.env_file = Some(value("a path")?.into()),
            "route" => command.route = Some(value("an MQTT topic")?),
            "payload" => command.payload = Some(value("a file")?.into()),
            _ => {
                if IGNORED_FLAGS.contains(&name) {
                    value("a value")?;
                    command.ignored.push(format!("-{name}"));
                    continue;
                }
                let Some(variable) = flag_variable(name) else {
                    return Err(format!("unknown argument {arg:?} (see --help)"));
                };
                let value = match inline {
                    Some(value) => value,
                    None if is_switch(variable) => "true".to_owned(),
                    None => value("a value")?,
                };
                command.values.push((variable.to_owned(), value));
            }
        }
    }
    Ok(command)
}

/// The text of `--help`.
pub fn help() -> String {
    let mut text = String::from(
        "mqtt-kafka-bridge: subscribes to MQTT topic filters and writes every message to Kafka.\n\n\
         Usage: mqtt-kafka-bridge [--env-file PATH] [--check-config] [--FLAG VALUE ...]\n\
         \x20      mqtt-kafka-bridge --route TOPIC [--payload FILE] [--FLAG VALUE ...]\n\
         \x20      mqtt-kafka-bridge healthcheck [--health-port PORT]\n\
         \x20      mqtt-kafka-bridge --help | --version\n\n\
         --check-config validates the configuration, prints the effective values (secrets as\n\
         ***) and exits: 0 when valid, 64 when not.\n\
         --route TOPIC prints what a message on TOPIC (with the payload in FILE) becomes with\n\
         this configuration: the rule that matched, the Kafka topic, key, headers and value.\n\
         It connects to nothing.\n\
         healthcheck asks the running bridge's /healthz (HEALTH_ADDR, HEALTH_PORT) and exits 0\n\
         on 200, 1 otherwise: a container's HEALTHCHECK.\n\n\
         Configuration comes from flags, then environment variables, then a .env file in the\n\
         working directory (or --env-file PATH); a flag wins over the environment, which wins\n\
         over the file. Every variable has a flag: MQTT_BROKER is --mqtt-broker (or\n\
         -mqtt-broker, --mqtt-broker=VALUE, as Metamorphosis takes them).\n\n\
         Variables and flags (default in brackets):\n",
    );
    for variable in VARIABLES {
        let default = variable.default.unwrap_or("no default");
        let flag = if variable.name.ends_with('*') {
            String::new()
        } else {
            format!("--{}", flag_name(variable.name))
        };
        text.push_str(&format!(
            "  {:<26} {}\n  {:<26} {} [{}]\n",
            variable.name, flag, "", variable.meaning, default
        ));
    }
    text.push_str(
        "\nMetamorphosis' -kakfa-port and -test-message-topic are taken too; -kafka-workers is \
         accepted and ignored.\n\nExit status: 0 clean stop, 64 bad configuration, 1 any other \
         failure.\n",
    );
    text
}
