//! Routing (SPEC §3.5): what an MQTT message becomes in Kafka. Its topic, from an ordered map
//! of rules (first match wins); its key, from a template; its headers; its value format.
//!
//! A rule is `SOURCE=TARGET`. SOURCE is an MQTT filter whose levels may be named (`cars/{vin}/#`,
//! a named `+`) or `re:` and a regular expression with named groups. TARGET is a template:
//! `{name}` (a named level or group), `{N}` (the N-th topic level, from 1), `{#}` (what `#`
//! matched), `{topic}` (the whole MQTT topic). The key template takes the same, and
//! `{prop:NAME}` (an MQTT 5 user property) and `{json:/pointer}` (a field of a JSON payload).
//!
//! Everything is parsed and checked once, at start-up; a message is then matched and rendered
//! without parsing anything but, for `{json:…}` keys and the `json` format, its payload.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use regex::Regex;

use std::sync::{Arc, Mutex, PoisonError};

use crate::message::{Key, Message, Record, Topic};
use crate::sparkplug::Decoder;
use crate::{dead_letter, envelope};

/// Longest Kafka topic name.
const MAX_TOPIC: usize = 249;

/// How the record value is made from the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueFormat {
    /// Metamorphosis' `{"topic":…,"content":"<base64>"}`, byte for byte.
    Envelope,
    /// The payload bytes as they are.
    Raw,
    /// An object with the topic, QoS, retain flag, receipt time and the payload: embedded as
    /// JSON when it parses, as a string when it is UTF-8, as base64 otherwise.
    Json,
    /// Sparkplug B payloads (topics under `spBv1.0/`) decoded to JSON, aliases resolved
    /// ([`crate::sparkplug`]); STATE messages as they are; other topics in the envelope.
    SparkplugJson,
}

/// Which MQTT fields become Kafka headers (`KAFKA_HEADERS`), each named `mqtt.<field>`; user
/// properties keep their own names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderSet {
    pub topic: bool,
    pub qos: bool,
    pub retain: bool,
    pub dup: bool,
    pub props: bool,
    pub content_type: bool,
    pub response_topic: bool,
    pub correlation_data: bool,
    pub message_expiry: bool,
}

impl HeaderSet {
    /// The names `KAFKA_HEADERS` lists take.
    pub const NAMES: [&'static str; 9] = [
        "topic",
        "qos",
        "retain",
        "dup",
        "props",
        "content_type",
        "response_topic",
        "correlation_data",
        "message_expiry",
    ];

    /// `none`, `all`, or a comma-separated list of [`HeaderSet::NAMES`].
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut set = Self::default();
        match value.trim() {
            "none" => return Ok(set),
            "all" => {
                return Ok(Self {
                    topic: true,
                    qos: true,
                    retain: true,
                    dup: true,
                    props: true,
                    content_type: true,
                    response_topic: true,
                    correlation_data: true,
                    message_expiry: true,
                });
            }
            _ => {}
        }
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let flag = match name {
                "topic" => &mut set.topic,
                "qos" => &mut set.qos,
                "retain" => &mut set.retain,
                "dup" => &mut set.dup,
                "props" => &mut set.props,
                "content_type" => &mut set.content_type,
                "response_topic" => &mut set.response_topic,
                "correlation_data" => &mut set.correlation_data,
                "message_expiry" => &mut set.message_expiry,
                other => return Err(format!("unknown header {other:?}")),
            };
            *flag = true;
        }
        Ok(set)
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    /// A named level or regex group.
    Name(String),
    /// The N-th topic level, from 1.
    Level(usize),
    /// What `#` matched.
    Hash,
    /// The whole MQTT topic.
    Topic,
    /// An MQTT 5 user property (key templates only).
    Property(String),
    /// A JSON pointer into the payload (key templates only).
    Json(String),
}

/// A template: text with `{…}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`; `payload_fields` allows `{prop:…}` and `{json:…}`.
    fn parse(text: &str, payload_fields: bool) -> Result<Self, String> {
        let parts = pieces(text)?
            .into_iter()
            .map(|piece| match piece {
                Piece::Text(text) => Ok(Part::Text(text.to_owned())),
                Piece::Placeholder(inner) => placeholder(inner, payload_fields),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { parts })
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Name(name) => Some(name.as_str()),
            _ => None,
        })
    }

    fn uses_hash(&self) -> bool {
        self.parts.contains(&Part::Hash)
    }

    fn render(&self, found: &Found<'_>, message: &Message, out: &mut String) {
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Name(name) => out.push_str(found.name(name)),
                Part::Level(n) => out.push_str(message.topic.split('/').nth(n - 1).unwrap_or("")),
                Part::Hash => out.push_str(found.hash),
                Part::Topic => out.push_str(&message.topic),
                Part::Property(name) => {
                    let value = message
                        .properties
                        .as_ref()
                        .and_then(|p| p.user.iter().find(|(k, _)| k == name));
                    out.push_str(value.map_or("", |(_, v)| v.as_str()));
                }
                Part::Json(pointer) => {
                    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&message.payload)
                    {
                        match json.pointer(pointer) {
                            Some(serde_json::Value::String(s)) => out.push_str(s),
                            Some(serde_json::Value::Null) | None => {}
                            Some(other) => {
                                let _ = write!(out, "{other}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A piece of a template: text, or what is between `{` and `}`.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// Splits a template into text and `{…}` placeholders; `Err` for an unclosed `{` or a `}`
/// without its `{`.
pub fn pieces(text: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        if rest[..open].contains('}') {
            return Err(format!("unopened }} in {text:?}"));
        }
        if open > 0 {
            pieces.push(Piece::Text(&rest[..open]));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed {{ in {text:?}"))?;
        pieces.push(Piece::Placeholder(&rest[open + 1..open + close]));
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("unopened }} in {text:?}"));
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// One placeholder of a routing template.
fn placeholder(inner: &str, payload_fields: bool) -> Result<Part, String> {
    Ok(match inner {
        "#" => Part::Hash,
        "topic" => Part::Topic,
        _ if inner.starts_with("prop:") && payload_fields => {
            Part::Property(inner["prop:".len()..].to_owned())
        }
        _ if inner.starts_with("json:") && payload_fields => {
            Part::Json(inner["json:".len()..].to_owned())
        }
        _ if !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_digit()) => {
            match inner.parse::<usize>() {
                Ok(n) if n >= 1 => Part::Level(n),
                _ => return Err(format!("{{{inner}}}: levels count from 1")),
            }
        }
        _ if !inner.is_empty() && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
            Part::Name(inner.to_owned())
        }
        _ => return Err(format!("unknown placeholder {{{inner}}}")),
    })
}

/// One level of a filter source.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Exact(String),
    /// `+`, or `{name}`: a whole level, named or not.
    One(Option<String>),
    /// `#`: the rest, possibly nothing.
    Rest,
}

#[derive(Clone, Debug)]
enum Source {
    Filter(Vec<Level>),
    Regex(Regex),
}

/// What a rule matched in a topic.
struct Found<'a> {
    /// Named levels or groups, with what they matched.
    names: Vec<(&'a str, &'a str)>,
    /// What `#` matched.
    hash: &'a str,
}

impl Found<'_> {
    fn name(&self, name: &str) -> &str {
        self.names
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v)
    }
}

/// One rule of the topic map.
#[derive(Clone, Debug)]
pub struct Rule {
    /// As written, for `--route` and errors.
    pub text: String,
    source: Source,
    target: Template,
}

impl Rule {
    /// Parses `SOURCE=TARGET`. The last `=` separates them (a target has none, Kafka topic
    /// names cannot), so a regular expression may contain `=`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .rfind('=')
            .ok_or_else(|| format!("{text:?}: expected SOURCE=TARGET"))?;
        let (source, target) = (text[..split].trim(), text[split + 1..].trim());
        if source.is_empty() || target.is_empty() {
            return Err(format!("{text:?}: expected SOURCE=TARGET"));
        }
        let target =
            Template::parse(target, false).map_err(|e| format!("{text:?}: target: {e}"))?;
        let source = match source.strip_prefix("re:") {
            Some(pattern) => Source::Regex(
                Regex::new(pattern).map_err(|e| format!("{text:?}: {}", one_line(&e)))?,
            ),
            None => Source::Filter(filter_levels(source).map_err(|e| format!("{text:?}: {e}"))?),
        };
        let rule = Self {
            text: text.to_owned(),
            source,
            target,
        };
        for name in rule.target.names() {
            if !rule.defines(name) {
                return Err(format!(
                    "{text:?}: the target uses {{{name}}}, which the source does not name"
                ));
            }
        }
        if rule.target.uses_hash() && !rule.has_hash() {
            return Err(format!(
                "{text:?}: the target uses {{#}}, but the source has no #"
            ));
        }
        Ok(rule)
    }

    /// Whether the source names `name`.
    fn defines(&self, name: &str) -> bool {
        match &self.source {
            Source::Filter(levels) => levels
                .iter()
                .any(|l| matches!(l, Level::One(Some(n)) if n == name)),
            Source::Regex(regex) => regex.capture_names().flatten().any(|n| n == name),
        }
    }

    fn has_hash(&self) -> bool {
        match &self.source {
            Source::Filter(levels) => levels.last() == Some(&Level::Rest),
            Source::Regex(_) => false,
        }
    }

    /// What the rule matches in `topic`, if it does.
    fn find<'a>(&'a self, topic: &'a str) -> Option<Found<'a>> {
        match &self.source {
            Source::Filter(levels) => {
                let mut names = Vec::new();
                let mut rest = Some(topic);
                for (i, level) in levels.iter().enumerate() {
                    if *level == Level::Rest {
                        if i == 0 && topic.starts_with('$') {
                            return None;
                        }
                        // `a/#` matches `a` as well as `a/b/c`.
                        return Some(Found {
                            names,
                            hash: rest.unwrap_or(""),
                        });
                    }
                    let current = rest?;
                    let (this, next) = match current.split_once('/') {
                        Some((this, next)) => (this, Some(next)),
                        None => (current, None),
                    };
                    // Wildcards at the first level do not match topics starting with `$`.
                    if i == 0 && this.starts_with('$') && !matches!(level, Level::Exact(_)) {
                        return None;
                    }
                    match level {
                        Level::Exact(text) if text != this => return None,
                        Level::One(Some(name)) => names.push((name.as_str(), this)),
                        _ => {}
                    }
                    rest = next;
                }
                rest.is_none().then_some(Found { names, hash: "" })
            }
            Source::Regex(regex) => {
                let captures = regex.captures(topic)?;
                let names = regex
                    .capture_names()
                    .flatten()
                    .filter_map(|name| Some((name, captures.name(name)?.as_str())))
                    .collect();
                Some(Found { names, hash: "" })
            }
        }
    }
}

/// The levels of a filter source: `+`, `#` (last only), `{name}` (a named `+`) or text.
fn filter_levels(filter: &str) -> Result<Vec<Level>, String> {
    let parts: Vec<&str> = filter.split('/').collect();
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| match *part {
            "+" => Ok(Level::One(None)),
            "#" if i == parts.len() - 1 => Ok(Level::Rest),
            "#" => Err("# must be the last level".to_owned()),
            _ if part.starts_with('{') && part.ends_with('}') => {
                let name = &part[1..part.len() - 1];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("{part}: a level name is letters, digits and _"));
                }
                Ok(Level::One(Some(name.to_owned())))
            }
            _ if part.contains(['+', '#', '{', '}']) => {
                Err(format!("{part}: wildcards and names must be a whole level"))
            }
            _ => Ok(Level::Exact((*part).to_owned())),
        })
        .collect()
}

fn one_line(error: &regex::Error) -> String {
    error
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `KAFKA_KEY` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySetting {
    /// The MQTT topic (`{topic}`, the default).
    MqttTopic,
    /// `none`: a null key.
    Null,
    Template(Template),
}

impl KeySetting {
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            "{topic}" => Ok(Self::MqttTopic),
            "none" => Ok(Self::Null),
            other => Template::parse(other, true).map(Self::Template),
        }
    }
}

/// The routing settings, as configured.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// The topic map, in order.
    pub rules: Vec<Rule>,
    /// Whether unmatched messages go to `KAFKA_TOPIC` (else they are counted as unmapped).
    pub fallback: bool,
    /// What `/` becomes in a rendered topic name.
    pub separator: String,
    pub key: KeySetting,
    pub headers: HeaderSet,
    pub format: ValueFormat,
    /// `KAFKA_DLQ_TOPIC`: where a message whose payload does not decode in `format` goes;
    /// unset, it is dropped and counted.
    pub dead_letter_topic: Option<String>,
}

impl Default for RouterConfig {
    /// Today's behaviour: every message to `KAFKA_TOPIC`, keyed by its MQTT topic, no headers,
    /// the Metamorphosis envelope.
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            fallback: true,
            separator: "_".to_owned(),
            key: KeySetting::MqttTopic,
            headers: HeaderSet::default(),
            format: ValueFormat::Envelope,
            dead_letter_topic: None,
        }
    }
}

/// Makes each message's record from checked [`RouterConfig`].
#[derive(Clone, Debug)]
pub struct Router {
    config: RouterConfig,
    /// The configuration is the default one: the record is the envelope to `KAFKA_TOPIC`.
    plain: bool,
    /// `sparkplug-json`: the alias tables, kept across messages (the batcher routes them one
    /// at a time, so the lock is never contended).
    sparkplug: Option<Arc<Mutex<Decoder>>>,
}

impl Default for Router {
    fn default() -> Self {
        Self {
            config: RouterConfig::default(),
            plain: true,
            sparkplug: None,
        }
    }
}

/// The reason of a message whose payload does not decode as Sparkplug B (a dead letter's
/// `mqtt.dlq.reason`, or the drop counter's label without a dead-letter topic).
pub const SPARKPLUG_INVALID: &str = "sparkplug_invalid";

/// What `--route` shows of one message.
#[derive(Debug, PartialEq, Eq)]
pub struct Explained {
    /// The rule that matched, as written; `None` when none did.
    pub rule: Option<String>,
    pub record: Record,
}

impl Router {
    /// A router; `Err` when the key template names a level no rule names.
    pub fn new(config: RouterConfig) -> Result<Self, String> {
        if let KeySetting::Template(template) = &config.key {
            for name in template.names() {
                if !config.rules.iter().any(|rule| rule.defines(name)) {
                    return Err(format!(
                        "{{{name}}} is not named by any rule of the topic map"
                    ));
                }
            }
        }
        let plain = config.rules.is_empty()
            && config.key == KeySetting::MqttTopic
            && config.headers.is_empty()
            && config.format == ValueFormat::Envelope;
        let sparkplug = (config.format == ValueFormat::SparkplugJson)
            .then(|| Arc::new(Mutex::new(Decoder::default())));
        Ok(Self {
            config,
            plain,
            sparkplug,
        })
    }

    /// Pairs of rules whose topics may differ only in `.` against `_`, which Kafka treats as
    /// colliding names (its metrics cannot tell them apart).
    pub fn colliding_rules(&self) -> Vec<(&str, &str)> {
        let shape = |rule: &Rule| -> String {
            rule.target
                .parts
                .iter()
                .map(|part| match part {
                    Part::Text(text) => text.replace('.', "_"),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        let mut pairs = Vec::new();
        for (i, a) in self.config.rules.iter().enumerate() {
            for b in &self.config.rules[i + 1..] {
                if a.target != b.target && shape(a) == shape(b) {
                    pairs.push((a.text.as_str(), b.text.as_str()));
                }
            }
        }
        pairs
    }

    /// The record of a message.
    pub fn record(&self, message: Message) -> Record {
        if message.dead_letter.is_some() || self.plain {
            return Record::from_message(message);
        }
        self.explain(message).record
    }

    /// The record of a message and the rule that chose its topic.
    pub fn explain(&self, message: Message) -> Explained {
        let matched = self
            .config
            .rules
            .iter()
            .find_map(|rule| rule.find(&message.topic).map(|found| (rule, found)));
        let topic = match &matched {
            Some((rule, found)) => {
                let mut name = String::new();
                rule.target.render(found, &message, &mut name);
                let name = kafka_topic_name(&name, &self.config.separator);
                if name.is_empty() {
                    self.unmatched()
                } else {
                    Topic::Named(name)
                }
            }
            None => self.unmatched(),
        };
        let no_names = Found {
            names: Vec::new(),
            hash: "",
        };
        let found = matched.as_ref().map_or(&no_names, |(_, found)| found);
        let key = match &self.config.key {
            KeySetting::MqttTopic => Key::MqttTopic,
            KeySetting::Null => Key::Null,
            KeySetting::Template(template) => {
                let mut key = String::new();
                template.render(found, &message, &mut key);
                if key.is_empty() {
                    Key::Null
                } else {
                    Key::Text(key)
                }
            }
        };
        let rule = matched.map(|(rule, _)| rule.text.clone());
        let value = match self.value(&message) {
            Ok(value) => value,
            Err(error) => {
                return Explained {
                    rule,
                    record: self.undecodable(message, &topic, error),
                };
            }
        };
        let headers = self.headers(&message);
        Explained {
            rule,
            record: Record {
                seq: message.seq,
                topic,
                mqtt_topic: message.topic,
                key,
                value,
                headers,
                received_at: message.received_at,
            },
        }
    }

    fn unmatched(&self) -> Topic {
        if self.config.fallback {
            Topic::Default
        } else {
            Topic::Unmapped
        }
    }

    fn headers(&self, message: &Message) -> Vec<(String, Vec<u8>)> {
        let set = &self.config.headers;
        if set.is_empty() {
            return Vec::new();
        }
        let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
        let mut add = |name: &str, value: Vec<u8>| headers.push((name.to_owned(), value));
        if set.topic {
            add("mqtt.topic", message.topic.as_bytes().to_vec());
        }
        if set.qos {
            add("mqtt.qos", message.qos.level().to_string().into_bytes());
        }
        if set.retain {
            add("mqtt.retain", message.retain.to_string().into_bytes());
        }
        if set.dup {
            add("mqtt.dup", message.dup.to_string().into_bytes());
        }
        if let Some(props) = &message.properties {
            if set.content_type
                && let Some(value) = &props.content_type
            {
                add("mqtt.content_type", value.as_bytes().to_vec());
            }
            if set.response_topic
                && let Some(value) = &props.response_topic
            {
                add("mqtt.response_topic", value.as_bytes().to_vec());
            }
            if set.correlation_data
                && let Some(value) = &props.correlation_data
            {
                add("mqtt.correlation_data", value.to_vec());
            }
            if set.message_expiry
                && let Some(value) = props.message_expiry
            {
                add("mqtt.message_expiry", value.to_string().into_bytes());
            }
            if set.props {
                // A user property never poses as one of the bridge's `mqtt.` headers.
                for (name, value) in props.user.iter().filter(|(n, _)| !n.starts_with("mqtt.")) {
                    add(name, value.as_bytes().to_vec());
                }
            }
        }
        headers
    }

    /// The record value, or why the payload does not decode in the format.
    fn value(&self, message: &Message) -> Result<Vec<u8>, String> {
        let envelope = || {
            let mut value = Vec::new();
            envelope::encode(&message.topic, &message.payload, &mut value);
            value
        };
        Ok(match self.config.format {
            ValueFormat::Envelope => envelope(),
            ValueFormat::Raw => message.payload.to_vec(),
            ValueFormat::Json => json_value(message),
            ValueFormat::SparkplugJson => {
                let decoder = self.sparkplug.as_ref().ok_or("no Sparkplug decoder")?;
                let mut decoder = decoder.lock().unwrap_or_else(PoisonError::into_inner);
                decoder
                    .to_json(&message.topic, &message.payload)?
                    .unwrap_or_else(envelope)
            }
        })
    }

    /// The record of a message whose payload does not decode: a dead letter with why, or,
    /// without a dead-letter topic, dropped and counted.
    fn undecodable(&self, message: Message, topic: &Topic, error: String) -> Record {
        let intended = match topic {
            Topic::Named(name) => Some(name.as_str()),
            _ => None,
        };
        match &self.config.dead_letter_topic {
            Some(dead_letter_topic) => Record {
                seq: message.seq,
                topic: Topic::Named(dead_letter_topic.clone()),
                headers: dead_letter::headers(
                    SPARKPLUG_INVALID,
                    &message.topic,
                    intended,
                    message.payload.len(),
                    &error,
                ),
                mqtt_topic: message.topic,
                key: Key::MqttTopic,
                value: message.payload.to_vec(),
                received_at: message.received_at,
            },
            None => Record {
                seq: message.seq,
                topic: Topic::Dropped(SPARKPLUG_INVALID),
                mqtt_topic: message.topic,
                key: Key::MqttTopic,
                value: Vec::new(),
                headers: Vec::new(),
                received_at: message.received_at,
            },
        }
    }
}

/// The `json` value format.
fn json_value(message: &Message) -> Vec<u8> {
    let (encoding, payload) = match serde_json::from_slice::<serde_json::Value>(&message.payload) {
        Ok(json) => ("json", json),
        Err(_) => match std::str::from_utf8(&message.payload) {
            Ok(text) => ("utf8", serde_json::Value::String(text.to_owned())),
            Err(_) => (
                "base64",
                serde_json::Value::String(STANDARD.encode(&message.payload)),
            ),
        },
    };
    // Receipt time as wall-clock milliseconds: the monotonic receipt instant, placed on now.
    let age = message.received_at.elapsed();
    let received_ms = SystemTime::now()
        .checked_sub(age)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    let object = serde_json::json!({
        "topic": message.topic,
        "qos": message.qos.level(),
        "retain": message.retain,
        "received_ms": received_ms,
        "payload_encoding": encoding,
        "payload": payload,
    });
    serde_json::to_vec(&object).unwrap_or_default()
}

/// Whether Kafka takes `c` in a topic name: ASCII letters, digits, `.`, `_` and `-`.
pub fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A rendered name made a valid Kafka topic: `/` becomes `separator`, any other character
/// outside `[A-Za-z0-9._-]` becomes `_`, at most 249 characters. `.` and `..` alone are not
/// names; those become empty (unmatched).
pub fn kafka_topic_name(rendered: &str, separator: &str) -> String {
    let mut name = String::with_capacity(rendered.len());
    for c in rendered.chars() {
        match c {
            '/' => name.push_str(separator),
            c if is_topic_char(c) => name.push(c),
            _ => name.push('_'),
        }
    }
    name.truncate(MAX_TOPIC);
    if name == "." || name == ".." {
        name.clear();
    }
    name
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::time::Instant;

    use super::*;
    use crate::{Properties, QoS};

    fn message(topic: &str, payload: &[u8]) -> Message {
        Message::new(
            1,
            topic.to_owned(),
            Bytes::copy_from_slice(payload),
            QoS::AtLeastOnce,
            Instant::now(),
        )
    }

    fn rules(text: &[&str]) -> Vec<Rule> {
        text.iter()
            .map(|t| Rule::parse(t).unwrap_or_else(|e| panic!("{t}: {e}")))
            .collect()
    }

    fn router(map: &[&str], key: &str, headers: &str, format: ValueFormat) -> Router {
        Router::new(RouterConfig {
            rules: rules(map),
            fallback: false,
            key: KeySetting::parse(key).expect("key"),
            headers: HeaderSet::parse(headers).expect("headers"),
            format,
            ..RouterConfig::default()
        })
        .expect("router")
    }

    fn topic_of(router: &Router, topic: &str) -> Topic {
        router.record(message(topic, b"{}")).topic
    }

    fn named(name: &str) -> Topic {
        Topic::Named(name.to_owned())
    }

    /// A payload that is not Sparkplug B: a dead letter with why (its intended topic too), or
    /// without a dead-letter topic a record addressed nowhere, counted under the reason.
    #[test]
    fn an_undecodable_sparkplug_payload_is_a_dead_letter_or_dropped() {
        let config = |dead_letter_topic: Option<&str>| RouterConfig {
            rules: rules(&["spBv1.0/{group}/#=sp.{group}"]),
            format: ValueFormat::SparkplugJson,
            dead_letter_topic: dead_letter_topic.map(str::to_owned),
            ..RouterConfig::default()
        };
        let bad = || message("spBv1.0/g/NDATA/n", b"\xff\xff");
        let dropped = Router::new(config(None)).expect("router").record(bad());
        assert_eq!(dropped.topic, Topic::Dropped(SPARKPLUG_INVALID));
        assert_eq!(dropped.topic.drop_reason(), Some("sparkplug_invalid"));
        let letter = Router::new(config(Some("dlq")))
            .expect("router")
            .record(bad());
        assert_eq!(letter.topic, named("dlq"));
        assert_eq!(letter.value, b"\xff\xff");
        assert_eq!(
            dead_letter::reason_of(&letter.headers),
            Some(SPARKPLUG_INVALID)
        );
        let header = |name: &str| {
            letter
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header(dead_letter::KAFKA_TOPIC).as_deref(), Some("sp.g"));
        assert!(
            header(dead_letter::ERROR)
                .unwrap_or_default()
                .starts_with("not a Sparkplug B payload")
        );
        // Outside spBv1.0/ the envelope, as with the default format.
        let other = Router::new(config(None))
            .expect("router")
            .record(message("plant/x", b"p"));
        let mut envelope_value = Vec::new();
        envelope::encode("plant/x", b"p", &mut envelope_value);
        assert_eq!(other.value, envelope_value);
    }

    #[test]
    fn filters_with_named_levels_numbered_levels_hash_and_topic() {
        let router = router(
            &[
                "cars/{vin}/telemetry={vin}.telemetry",
                "cars/+/alerts/#=alerts.{2}.{#}",
                "spBv1.0/#={topic}",
                "plants/{site}/+/{line}=plant-{site}-{line}-{3}",
            ],
            "{topic}",
            "none",
            ValueFormat::Envelope,
        );
        assert_eq!(
            topic_of(&router, "cars/VIN1/telemetry"),
            named("VIN1.telemetry")
        );
        assert_eq!(
            topic_of(&router, "cars/VIN1/alerts/brakes/front"),
            named("alerts.VIN1.brakes_front")
        );
        assert_eq!(topic_of(&router, "cars/VIN1/alerts"), named("alerts.VIN1."));
        assert_eq!(
            topic_of(&router, "spBv1.0/g/NDATA/n"),
            named("spBv1.0_g_NDATA_n")
        );
        assert_eq!(
            topic_of(&router, "plants/oslo/a/7"),
            named("plant-oslo-7-a")
        );
        assert_eq!(
            topic_of(&router, "cars/VIN1/telemetry/extra"),
            Topic::Unmapped
        );
        assert_eq!(topic_of(&router, "other"), Topic::Unmapped);
    }

    #[test]
    fn the_first_matching_rule_wins_and_regexes_name_groups() {
        let router = router(
            &[
                r"re:^cars/(?P<vin>[A-Z0-9]{3,})/(?P<kind>\w+)$=cars.{kind}",
                "cars/#=cars.other",
            ],
            "{vin}",
            "none",
            ValueFormat::Envelope,
        );
        let record = router.record(message("cars/VIN123/telemetry", b""));
        assert_eq!(record.topic, named("cars.telemetry"));
        assert_eq!(record.key, Key::Text("VIN123".to_owned()));
        let other = router.record(message("cars/x/y/z", b""));
        assert_eq!(other.topic, named("cars.other"));
        assert_eq!(
            other.key,
            Key::Null,
            "the rule that matched does not name vin"
        );
    }

    #[test]
    fn names_are_made_valid_kafka_topics() {
        assert_eq!(kafka_topic_name("a/b c/ü", "_"), "a_b_c__");
        assert_eq!(kafka_topic_name("a/b", "."), "a.b");
        assert_eq!(kafka_topic_name(&"x".repeat(300), "_").len(), 249);
        assert_eq!(kafka_topic_name("..", "_"), "");
    }

    #[test]
    fn a_dollar_topic_is_not_matched_by_a_leading_wildcard() {
        let router = router(
            &["#=all", "$SYS/#=sys"],
            "{topic}",
            "none",
            ValueFormat::Raw,
        );
        assert_eq!(topic_of(&router, "$SYS/broker/load"), named("sys"));
        assert_eq!(topic_of(&router, "a/b"), named("all"));
    }

    #[test]
    fn unmatched_messages_go_to_kafka_topic_when_there_is_one() {
        let with_fallback = Router::new(RouterConfig {
            rules: rules(&["a/#=a"]),
            ..RouterConfig::default()
        })
        .expect("router");
        assert_eq!(topic_of(&with_fallback, "b"), Topic::Default);
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (rule, expected) in [
            ("cars/#", "expected SOURCE=TARGET"),
            ("=x", "expected SOURCE=TARGET"),
            (
                "cars/{vin}/#={vn}",
                "the target uses {vn}, which the source does not name",
            ),
            ("cars/+=x.{#}", "the source has no #"),
            ("cars/#/x=y", "# must be the last level"),
            ("cars/a+=y", "must be a whole level"),
            ("re:cars/(=y", "regex parse error"),
            ("a/#={0}", "levels count from 1"),
            ("a/#={x", "unclosed {"),
            ("a/#={json:/a}", "unknown placeholder"),
        ] {
            let error = Rule::parse(rule).expect_err(rule);
            assert!(error.contains(expected), "{rule}: {error}");
            assert!(!error.contains('\n'), "{rule}: one line: {error}");
        }
        let unknown_key = Router::new(RouterConfig {
            rules: rules(&["a/{x}=a"]),
            key: KeySetting::parse("{vin}").expect("parses"),
            ..RouterConfig::default()
        });
        assert!(
            unknown_key
                .expect_err("no rule names vin")
                .contains("{vin}")
        );
        assert!(
            HeaderSet::parse("topic,color")
                .expect_err("unknown")
                .contains("color")
        );
    }

    #[test]
    fn keys_from_levels_properties_and_json_fields() {
        let router = router(
            &["cars/{vin}/#=cars"],
            "{vin}:{json:/id}:{prop:client}",
            "none",
            ValueFormat::Raw,
        );
        let mut m = message("cars/V1/x", br#"{"id": 42}"#);
        m.properties = Some(Box::new(Properties {
            user: vec![("client".to_owned(), "c-7".to_owned())],
            ..Properties::default()
        }));
        assert_eq!(router.record(m).key, Key::Text("V1:42:c-7".to_owned()));
        let none = router_with_key("none");
        assert_eq!(none.record(message("a", b"")).key, Key::Null);
    }

    fn router_with_key(key: &str) -> Router {
        router(&["#=t"], key, "none", ValueFormat::Raw)
    }

    #[test]
    fn headers_in_order_and_user_properties_never_pose_as_the_bridge_s() {
        let router = router(&["#=t"], "{topic}", "all", ValueFormat::Raw);
        let mut m = message("a/b", b"x");
        m.retain = true;
        m.properties = Some(Box::new(Properties {
            user: vec![
                ("site".to_owned(), "1".to_owned()),
                ("mqtt.topic".to_owned(), "forged".to_owned()),
                ("site".to_owned(), "2".to_owned()),
            ],
            content_type: Some("application/json".to_owned()),
            response_topic: Some("reply/to".to_owned()),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            message_expiry: Some(60),
        }));
        let headers: Vec<(String, String)> = router
            .record(m)
            .headers
            .into_iter()
            .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let expected: Vec<(String, String)> = [
            ("mqtt.topic", "a/b"),
            ("mqtt.qos", "1"),
            ("mqtt.retain", "true"),
            ("mqtt.dup", "false"),
            ("mqtt.content_type", "application/json"),
            ("mqtt.response_topic", "reply/to"),
            ("mqtt.correlation_data", "\u{1}\u{2}"),
            ("mqtt.message_expiry", "60"),
            ("site", "1"),
            ("site", "2"),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(headers, expected);
    }

    #[test]
    fn value_formats() {
        let envelope = router(&["#=t"], "{topic}", "none", ValueFormat::Envelope);
        let raw = router(&["#=t"], "{topic}", "none", ValueFormat::Raw);
        let json = router(&["#=t"], "{topic}", "none", ValueFormat::Json);
        let payload = br#"{"speed": 88}"#;
        assert_eq!(
            envelope.record(message("a", payload)).value,
            br#"{"topic":"a","content":"eyJzcGVlZCI6IDg4fQ=="}"#
        );
        assert_eq!(raw.record(message("a", payload)).value, payload);
        for (payload, encoding, expected) in [
            (&payload[..], "json", serde_json::json!({"speed": 88})),
            (b"plain text", "utf8", serde_json::json!("plain text")),
            (b"\xff\x00", "base64", serde_json::json!("/wA=")),
        ] {
            let value = json.record(message("a/b", payload)).value;
            let object: serde_json::Value = serde_json::from_slice(&value).expect("JSON");
            assert_eq!(object["topic"], "a/b");
            assert_eq!(object["qos"], 1);
            assert_eq!(object["retain"], false);
            assert_eq!(object["payload_encoding"], encoding);
            assert_eq!(object["payload"], expected);
            assert!(object["received_ms"].as_u64().expect("a number") > 1_700_000_000_000);
        }
    }

    #[test]
    fn the_default_router_writes_what_the_bridge_always_wrote() {
        let routed = Router::default().record(message("a/b", b"x"));
        let plain = Record::from_message(message("a/b", b"x"));
        assert_eq!(
            (routed.topic, routed.key, routed.value, routed.headers),
            (plain.topic, plain.key, plain.value, plain.headers)
        );
    }

    #[test]
    fn rules_that_differ_only_in_dot_and_underscore_are_reported() {
        let router = router(
            &["a/{x}=metrics.{x}", "b/{x}=metrics_{x}", "c/{x}=other.{x}"],
            "{topic}",
            "none",
            ValueFormat::Raw,
        );
        assert_eq!(
            router.colliding_rules(),
            [("a/{x}=metrics.{x}", "b/{x}=metrics_{x}")]
        );
    }
}
