//! What a Kafka record becomes on MQTT: its topic (a template, the `mqtt.topic` header, or the
//! topic in a Metamorphosis envelope), its payload (the inverse of the uplink's value formats,
//! so a record the uplink wrote is replayed unchanged), its QoS and retain flag.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use mkb_bridge::route::{Piece, pieces};
use mkb_bridge::{Properties, QoS, envelope};

/// How the payload is taken from the record value (`DOWNLINK_VALUE_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A Metamorphosis envelope is decoded; anything else is sent as it is.
    Auto,
    Raw,
    Envelope,
    /// The uplink's `json` format: its `payload`, as it was encoded.
    Json,
}

impl Format {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "auto" => Some(Self::Auto),
            "raw" => Some(Self::Raw),
            "envelope" => Some(Self::Envelope),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Key,
    Header(String),
    KafkaTopic,
    Partition,
}

/// `DOWNLINK_MQTT_TOPIC`: `{key}`, `{header:NAME}`, `{kafka_topic}`, `{partition}` and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

impl TopicTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts = pieces(text)?
            .into_iter()
            .map(|piece| match piece {
                Piece::Text(text) => Ok(Part::Text(text.to_owned())),
                Piece::Placeholder("key") => Ok(Part::Key),
                Piece::Placeholder("kafka_topic") => Ok(Part::KafkaTopic),
                Piece::Placeholder("partition") => Ok(Part::Partition),
                Piece::Placeholder(inner) => match inner.strip_prefix("header:") {
                    Some(name) if !name.is_empty() => Ok(Part::Header(name.to_owned())),
                    _ => Err(format!("unknown placeholder {{{inner}}}")),
                },
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { parts })
    }
}

impl TopicTemplate {
    /// Whether a topic this template renders can match the MQTT subscription `filter`: then
    /// the bridge's uplink would read back its own downlink publishes. A level holding a
    /// placeholder may become anything, `/` included, so from there on it is taken to match.
    pub fn may_match(&self, filter: &str) -> bool {
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or(rest, |(_, inner)| inner),
            None => filter,
        };
        let mut rendered = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => rendered.push_str(text),
                // Nothing a topic holds: marks where anything may appear.
                _ => rendered.push('\0'),
            }
        }
        let levels: Vec<&str> = rendered.split('/').collect();
        let filter_levels: Vec<&str> = filter.split('/').collect();
        for (i, wanted) in filter_levels.iter().enumerate() {
            if *wanted == "#" {
                return true;
            }
            let Some(level) = levels.get(i) else {
                return false;
            };
            if level.contains('\0') {
                return true;
            }
            if *wanted != "+" && wanted != level {
                return false;
            }
        }
        levels.len() == filter_levels.len()
    }
}

/// One Kafka record, as the downlink reads it.
pub struct Incoming<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub key: Option<&'a [u8]>,
    pub headers: &'a [(String, Vec<u8>)],
    pub value: &'a [u8],
}

impl Incoming<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A publish to make.
#[derive(Debug, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 only: the record's headers as properties ([`Render::properties`]).
    pub properties: Option<Box<Properties>>,
}

/// How records are turned into publishes.
#[derive(Clone, Debug)]
pub struct Render {
    pub topic: Option<TopicTemplate>,
    pub format: Format,
    pub qos: QoS,
    pub retain: bool,
    /// The connection speaks MQTT 5: headers become properties, the inverse of the uplink's
    /// `KAFKA_HEADERS`. `mqtt.content_type`, `mqtt.response_topic`, `mqtt.correlation_data`
    /// and `mqtt.message_expiry` become those properties; every header not named `mqtt.…`
    /// becomes a user property, in order, when its value is UTF-8 (a user property is a
    /// string). `mqtt.topic`, `mqtt.qos`, `mqtt.retain` and `mqtt.dup` steer the publish or
    /// are dropped.
    pub properties: bool,
}

impl Render {
    /// The publish of `record`, or why it has none (no usable topic, a value that is not in
    /// the format): such a record is given up on, never retried.
    pub fn publish(&self, record: &Incoming<'_>) -> Result<Publish, String> {
        let decoded = match self.format {
            Format::Raw | Format::Json => None,
            Format::Auto => envelope::decode(record.value).ok(),
            Format::Envelope => {
                Some(envelope::decode(record.value).map_err(|e| format!("value: {e}"))?)
            }
        };
        let topic = match &self.topic {
            Some(template) => render(template, record),
            None => match record.header("mqtt.topic") {
                Some(topic) => String::from_utf8_lossy(topic).into_owned(),
                None => match &decoded {
                    Some(envelope) => envelope.topic.clone(),
                    None => {
                        return Err("no MQTT topic: no mqtt.topic header, and the value is \
                                    not an envelope"
                            .to_owned());
                    }
                },
            },
        };
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            return Err(format!("not an MQTT topic to publish to: {topic:?}"));
        }
        let payload = match (self.format, decoded) {
            (_, Some(envelope)) => envelope.payload,
            (Format::Json, None) => json_payload(record.value)?,
            (_, None) => record.value.to_vec(),
        };
        let qos = match record.header("mqtt.qos") {
            Some(b"0") => QoS::AtMostOnce,
            Some(b"1") => QoS::AtLeastOnce,
            Some(b"2") => QoS::ExactlyOnce,
            _ => self.qos,
        };
        let retain = match record.header("mqtt.retain") {
            Some(b"true") => true,
            Some(b"false") => false,
            _ => self.retain,
        };
        let properties = if self.properties {
            properties(record.headers)
        } else {
            None
        };
        Ok(Publish {
            topic,
            payload,
            qos,
            retain,
            properties,
        })
    }
}

/// The MQTT 5 properties the headers of a record carry, if any (see [`Render::properties`]).
fn properties(headers: &[(String, Vec<u8>)]) -> Option<Box<Properties>> {
    let text = |value: &[u8]| std::str::from_utf8(value).ok().map(str::to_owned);
    let mut properties = Properties::default();
    for (name, value) in headers {
        match name.as_str() {
            "mqtt.content_type" => properties.content_type = text(value),
            "mqtt.response_topic" => properties.response_topic = text(value),
            "mqtt.correlation_data" => {
                properties.correlation_data = Some(Bytes::copy_from_slice(value));
            }
            "mqtt.message_expiry" => {
                properties.message_expiry = text(value).and_then(|v| v.parse().ok());
            }
            name if name.starts_with("mqtt.") => {}
            name => {
                if let Some(value) = text(value) {
                    properties.user.push((name.to_owned(), value));
                }
            }
        }
    }
    (properties != Properties::default()).then(|| Box::new(properties))
}

fn render(template: &TopicTemplate, record: &Incoming<'_>) -> String {
    let mut out = String::new();
    for part in &template.parts {
        match part {
            Part::Text(text) => out.push_str(text),
            Part::Key => out.push_str(&String::from_utf8_lossy(record.key.unwrap_or_default())),
            Part::Header(name) => {
                out.push_str(&String::from_utf8_lossy(
                    record.header(name).unwrap_or_default(),
                ));
            }
            Part::KafkaTopic => out.push_str(record.topic),
            Part::Partition => out.push_str(&record.partition.to_string()),
        }
    }
    out
}

/// The payload of an uplink `json` value, as it was published.
fn json_payload(value: &[u8]) -> Result<Vec<u8>, String> {
    let object: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("value is not JSON: {e}"))?;
    let payload = &object["payload"];
    match object["payload_encoding"].as_str() {
        Some("json") => serde_json::to_vec(payload).map_err(|e| e.to_string()),
        Some("utf8") => payload
            .as_str()
            .map(|s| s.as_bytes().to_vec())
            .ok_or_else(|| "payload is not a string".to_owned()),
        Some("base64") => payload
            .as_str()
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or_else(|| "payload is not base64".to_owned()),
        _ => Err("value has no payload_encoding of json, utf8 or base64".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(topic: Option<&str>, format: Format) -> Render {
        Render {
            topic: topic.map(|t| TopicTemplate::parse(t).expect("template")),
            format,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: false,
        }
    }

    fn record<'a>(
        key: Option<&'a [u8]>,
        headers: &'a [(String, Vec<u8>)],
        value: &'a [u8],
    ) -> Incoming<'a> {
        Incoming {
            topic: "commands",
            partition: 3,
            key,
            headers,
            value,
        }
    }

    fn envelope_of(topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut value = Vec::new();
        envelope::encode(topic, payload, &mut value);
        value
    }

    #[test]
    fn the_topic_comes_from_the_template_the_header_or_the_envelope() {
        let headers = [("mqtt.topic".to_owned(), b"from/header".to_vec())];
        let value = envelope_of("from/envelope", b"p");
        let templated = render(
            Some("cars/{key}/cmd/{kafka_topic}/{partition}"),
            Format::Auto,
        )
        .publish(&record(Some(b"VIN1"), &headers, &value))
        .expect("publish");
        assert_eq!(templated.topic, "cars/VIN1/cmd/commands/3");
        assert_eq!(templated.payload, b"p", "the envelope decoded");
        let from_header = render(None, Format::Auto)
            .publish(&record(None, &headers, &value))
            .expect("publish");
        assert_eq!(from_header.topic, "from/header");
        let from_envelope = render(None, Format::Auto)
            .publish(&record(None, &[], &value))
            .expect("publish");
        assert_eq!(from_envelope.topic, "from/envelope");
    }

    #[test]
    fn a_record_without_a_usable_topic_is_refused() {
        let none = render(None, Format::Raw).publish(&record(None, &[], b"x"));
        assert!(none.expect_err("no topic").contains("no MQTT topic"));
        let wildcard =
            render(Some("cars/{key}"), Format::Raw).publish(&record(Some(b"#"), &[], b"x"));
        assert!(
            wildcard
                .expect_err("wildcard")
                .contains("not an MQTT topic")
        );
        let empty = render(Some("{key}"), Format::Raw).publish(&record(None, &[], b"x"));
        assert!(empty.is_err());
    }

    #[test]
    fn formats_are_the_inverse_of_the_uplink_s() {
        let headers = [("mqtt.topic".to_owned(), b"t".to_vec())];
        let raw = render(None, Format::Raw).publish(&record(None, &headers, b"\xff\x00"));
        assert_eq!(raw.expect("raw").payload, b"\xff\x00");
        let not_envelope = render(None, Format::Envelope).publish(&record(None, &headers, b"{}"));
        assert!(not_envelope.is_err());
        for (value, payload) in [
            (
                &br#"{"payload_encoding":"json","payload":{"a":1}}"#[..],
                &br#"{"a":1}"#[..],
            ),
            (br#"{"payload_encoding":"utf8","payload":"hi"}"#, b"hi"),
            (
                br#"{"payload_encoding":"base64","payload":"/wA="}"#,
                b"\xff\x00",
            ),
        ] {
            let json = render(None, Format::Json).publish(&record(None, &headers, value));
            assert_eq!(json.expect("json").payload, payload);
        }
    }

    #[test]
    fn headers_override_qos_and_retain() {
        let headers = [
            ("mqtt.topic".to_owned(), b"t".to_vec()),
            ("mqtt.qos".to_owned(), b"0".to_vec()),
            ("mqtt.retain".to_owned(), b"true".to_vec()),
        ];
        let publish = render(None, Format::Raw)
            .publish(&record(None, &headers, b"x"))
            .expect("publish");
        assert_eq!((publish.qos, publish.retain), (QoS::AtMostOnce, true));
    }

    #[test]
    fn under_mqtt_5_headers_become_properties() {
        let headers: Vec<(String, Vec<u8>)> = [
            ("mqtt.topic", &b"t"[..]),
            ("vin", b"VIN1"),
            ("mqtt.content_type", b"application/json"),
            ("mqtt.response_topic", b"reply/VIN1"),
            ("mqtt.correlation_data", b"\x00\xff"),
            ("mqtt.message_expiry", b"60"),
            ("mqtt.dup", b"false"),
            ("binary", b"\xff"),
            ("vin", b"VIN2"),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), v.to_vec()))
        .collect();
        let mut mqtt5 = render(None, Format::Raw);
        mqtt5.properties = true;
        let publish = mqtt5
            .publish(&record(None, &headers, b"x"))
            .expect("publish");
        let expected = Properties {
            user: vec![
                ("vin".to_owned(), "VIN1".to_owned()),
                ("vin".to_owned(), "VIN2".to_owned()),
            ],
            content_type: Some("application/json".to_owned()),
            response_topic: Some("reply/VIN1".to_owned()),
            correlation_data: Some(Bytes::from_static(b"\x00\xff")),
            message_expiry: Some(60),
        };
        assert_eq!(publish.properties.as_deref(), Some(&expected));
        let plain = render(None, Format::Raw)
            .publish(&record(None, &headers, b"x"))
            .expect("publish");
        assert_eq!(plain.properties, None, "MQTT 3.1.1 has no properties");
        let only_topic = mqtt5
            .publish(&record(None, &headers[..1], b"x"))
            .expect("publish");
        assert_eq!(only_topic.properties, None, "nothing to carry");
    }

    #[test]
    fn a_template_may_match_a_filter_where_its_topics_could() {
        let template = |t: &str| TopicTemplate::parse(t).expect("template");
        for (t, filter, expected) in [
            ("cars/{key}/commands", "cars/#", true),
            ("cars/{key}/commands", "cars/+/telemetry", true),
            ("cars/{key}/commands", "trucks/#", false),
            ("down/{key}", "up/#", false),
            ("cmd/fixed", "cmd/fixed", true),
            ("cmd/fixed", "cmd/+", true),
            ("cmd/fixed", "cmd", false),
            ("cmd/fixed/x", "cmd/+", false),
            ("cmd", "cmd/#", true),
            ("{kafka_topic}", "anything/at/all", true),
            ("cars/{key}/commands", "$share/g/cars/#", true),
            ("cars/{key}/commands", "$share/g/trucks/#", false),
        ] {
            assert_eq!(
                template(t).may_match(filter),
                expected,
                "{t} against {filter}"
            );
        }
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(TopicTemplate::parse("a/{nope}").is_err());
        assert!(TopicTemplate::parse("a/{key").is_err());
        assert!(TopicTemplate::parse("a/{header:}").is_err());
    }
}
