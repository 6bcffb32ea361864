//! One MQTT connection, version 3.1.1 or 5, behind one small interface.
//!
//! rumqttc has a separate client for each protocol version with its own packet types. The
//! source task should not care, so this module maps both onto [`Incoming`] and [`PollError`];
//! everything version-specific (session expiry, Receive Maximum, reason codes) stays here.

use std::future::Future;

use bytes::Bytes;
use mkb_bridge::{Properties, QoS};
use rumqttc::v5::mqttbytes::v5 as mqtt5;
use rumqttc::{Transport, v5};

use crate::skip::{self, Skipped};
use crate::{AckMode, MqttConfig, MqttVersion};

/// One received PUBLISH.
pub(crate) struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// Packet identifier, needed to acknowledge QoS 1/2 messages.
    pub pkid: u16,
    pub retain: bool,
    pub dup: bool,
    /// MQTT 5 properties routing can use.
    pub properties: Option<Box<Properties>>,
}

/// What the source task needs to know about one event of the connection.
pub(crate) enum Incoming {
    ConnAck {
        session_present: bool,
    },
    Publish(Received),
    /// One entry per filter of the SUBSCRIBE: the granted QoS, or why it was refused.
    SubAck(Vec<Result<QoS, String>>),
    /// Our DISCONNECT went out.
    Disconnected,
    Other,
}

/// A failed poll: the connection is down and the next poll reconnects.
pub(crate) struct PollError {
    /// The broker answered and said no (credentials, client id, authorisation): an operator
    /// has to act, retrying alone will not help.
    pub refused: bool,
    pub message: String,
    /// The broker sent a PUBLISH the client cannot read; the source task may read past it.
    pub unreadable: Option<Unreadable>,
    /// The broker closed or reset the connection (the source task says what it was doing).
    pub closed: bool,
}

/// A PUBLISH rumqttc cannot read, which failed the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unreadable {
    /// A packet of this many bytes, above `MQTT_MAX_PACKET_SIZE`.
    TooLarge(usize),
    /// Its topic is not UTF-8 (MQTT 3.1.1 only: the MQTT 5 client reads topics as bytes).
    TopicNotUtf8,
}

/// The event loops are large and of different sizes; one connection lives per bridge, so
/// they are boxed rather than sized to the larger.
pub(crate) enum Connection {
    V311 {
        client: rumqttc::AsyncClient,
        eventloop: Box<rumqttc::EventLoop>,
    },
    V5 {
        client: v5::AsyncClient,
        eventloop: Box<v5::EventLoop>,
    },
}

/// MQTT 3.1.1 options for a connection to `config`'s broker as `client_id`: TLS, keep-alive,
/// packet size limit and credentials as configured; session and acknowledgements are the
/// caller's.
pub fn options_311(config: &MqttConfig, client_id: &str) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, &config.host, config.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(config.max_packet_size, config.max_packet_size);
    if let Some(transport) = tls_transport(config) {
        options.set_transport(transport);
    }
    if let Some(credentials) = &config.credentials {
        options.set_credentials(&credentials.username, &credentials.password);
    }
    options
}

/// TLS with the configured connector, when `MQTT_TLS` is on.
fn tls_transport(config: &MqttConfig) -> Option<Transport> {
    config.tls.as_ref().map(|tls| {
        Transport::tls_with_config(rumqttc::TlsConfiguration::NativeConnector(tls.clone()))
    })
}

/// MQTT 5 options for a connection to `config`'s broker as `client_id`, as [`options_311`]:
/// the broker drops messages larger than the packet size limit instead of sending them.
pub fn options_5(config: &MqttConfig, client_id: &str) -> v5::MqttOptions {
    let mut options = v5::MqttOptions::new(client_id, &config.host, config.port);
    let max_packet = u32::try_from(config.max_packet_size).unwrap_or(u32::MAX);
    options
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(Some(max_packet));
    if let Some(transport) = tls_transport(config) {
        options.set_transport(transport);
    }
    if let Some(credentials) = &config.credentials {
        options.set_credentials(&credentials.username, &credentials.password);
    }
    options
}

/// Requests queued on the client before the event loop sends them (acknowledgements, subscribe,
/// disconnect). Acks that find the channel full wait in the source task's own compact queue, so
/// this only bounds memory: an MQTT 5 request takes about 400 bytes.
const REQUEST_CAPACITY: usize = 1024;
/// The bridge publishes nothing, but rumqttc's MQTT 5 client keeps a slot per outgoing packet
/// id up to this limit (65,535 by default, some 14 MB).
const OUTGOING_INFLIGHT_V5: u16 = 16;

impl Connection {
    pub(crate) fn new(config: &MqttConfig) -> Self {
        match config.version {
            MqttVersion::V311 => {
                let mut options = options_311(config, &config.client_id);
                options
                    .set_clean_session(config.clean_session)
                    .set_manual_acks(config.ack_mode == AckMode::AfterWrite);
                let (client, eventloop) = rumqttc::AsyncClient::new(options, REQUEST_CAPACITY);
                Self::V311 {
                    client,
                    eventloop: Box::new(eventloop),
                }
            }
            MqttVersion::V5 => {
                let mut options = options_5(config, &config.client_id);
                options
                    .set_clean_start(config.clean_session)
                    .set_manual_acks(config.ack_mode == AckMode::AfterWrite)
                    .set_receive_maximum(Some(config.receive_maximum))
                    .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT_V5);
                if !config.clean_session {
                    // In MQTT 5 a session outlives the connection only with an expiry interval;
                    // the largest value means "never expires" (the broker may cap it).
                    options.set_session_expiry_interval(Some(u32::MAX));
                }
                let (client, eventloop) = v5::AsyncClient::new(options, REQUEST_CAPACITY);
                Self::V5 {
                    client,
                    eventloop: Box::new(eventloop),
                }
            }
        }
    }
}

/// The seam between the MQTT task and its connection: [`Connection`] here, a scripted fake in
/// the task's unit tests (so its acknowledgement and intake rules are tested in paused time,
/// and the integration tests prove that a real Mosquitto agrees).
pub(crate) trait Link {
    /// Drives the connection until the next event; reconnects when called after an error.
    fn poll(&mut self) -> impl Future<Output = Result<Incoming, PollError>> + Send;
    /// Queues a SUBSCRIBE for every filter, without waiting (see the source task's invariant).
    fn subscribe(&self, filters: &[String], qos: QoS) -> Result<(), String>;
    /// Queues the acknowledgement (PUBACK, or PUBREC for QoS 2) of a received message, without
    /// waiting; `false` when the request channel is full.
    fn ack(&self, qos: QoS, pkid: u16) -> bool;
    /// Queues a DISCONNECT, without waiting.
    fn disconnect(&self) -> bool;
    /// After an unreadable PUBLISH broke the connection (MQTT 3.1.1, persistent session):
    /// reads past it on a side connection and acknowledges it (see [`crate::skip`]).
    fn read_past(
        &mut self,
        config: &MqttConfig,
    ) -> impl Future<Output = Result<Option<Skipped>, String>> + Send;
}

impl Link for Connection {
    async fn poll(&mut self) -> Result<Incoming, PollError> {
        match self {
            Self::V311 { eventloop, .. } => match eventloop.poll().await {
                Ok(event) => Ok(incoming_311(event)),
                Err(e) => Err(poll_error_311(e)),
            },
            Self::V5 { eventloop, .. } => match eventloop.poll().await {
                Ok(event) => Ok(incoming_5(event)),
                Err(e) => Err(poll_error_5(e)),
            },
        }
    }

    fn subscribe(&self, filters: &[String], qos: QoS) -> Result<(), String> {
        match self {
            Self::V311 { client, .. } => {
                let filters = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos_311(qos)));
                client
                    .try_subscribe_many(filters)
                    .map_err(|e| e.to_string())
            }
            Self::V5 { client, .. } => {
                let filters = filters
                    .iter()
                    .map(|f| mqtt5::Filter::new(f.clone(), qos_5(qos)));
                client
                    .try_subscribe_many(filters)
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn ack(&self, qos: QoS, pkid: u16) -> bool {
        // The client builds the PUBACK (PUBREC) from a publish's QoS and packet id alone. An
        // empty one is built field by field: MQTT 5's `Publish::new` copies its topic into a
        // fresh buffer, about 275 instructions per acknowledgement (callgrind).
        match self {
            Self::V311 { client, .. } => {
                let publish = rumqttc::Publish {
                    dup: false,
                    qos: qos_311(qos),
                    retain: false,
                    topic: String::new(),
                    pkid,
                    payload: bytes::Bytes::new(),
                };
                client.try_ack(&publish).is_ok()
            }
            Self::V5 { client, .. } => {
                let publish = mqtt5::Publish {
                    qos: qos_5(qos),
                    pkid,
                    ..mqtt5::Publish::default()
                };
                client.try_ack(&publish).is_ok()
            }
        }
    }

    fn disconnect(&self) -> bool {
        match self {
            Self::V311 { client, .. } => client.try_disconnect().is_ok(),
            Self::V5 { client, .. } => client.try_disconnect().is_ok(),
        }
    }

    async fn read_past(&mut self, config: &MqttConfig) -> Result<Option<Skipped>, String> {
        skip::read_past(config).await
    }
}

fn incoming_311(event: rumqttc::Event) -> Incoming {
    use rumqttc::{Event, Outgoing, Packet, SubscribeReasonCode};
    match event {
        Event::Incoming(Packet::Publish(publish)) => Incoming::Publish(Received {
            topic: publish.topic,
            payload: publish.payload,
            qos: qos_from_311(publish.qos),
            pkid: publish.pkid,
            retain: publish.retain,
            dup: publish.dup,
            properties: None,
        }),
        Event::Incoming(Packet::ConnAck(connack)) => Incoming::ConnAck {
            session_present: connack.session_present,
        },
        Event::Incoming(Packet::SubAck(suback)) => Incoming::SubAck(
            suback
                .return_codes
                .iter()
                .map(|code| match code {
                    SubscribeReasonCode::Success(qos) => Ok(qos_from_311(*qos)),
                    SubscribeReasonCode::Failure => Err("refused by the broker".to_owned()),
                })
                .collect(),
        ),
        Event::Outgoing(Outgoing::Disconnect) => Incoming::Disconnected,
        _ => Incoming::Other,
    }
}

fn incoming_5(event: v5::Event) -> Incoming {
    use v5::Event;
    use v5::mqttbytes::v5::Packet;
    match event {
        Event::Incoming(Packet::Publish(publish)) => Incoming::Publish(Received {
            // Topics are UTF-8 by the protocol; rumqttc checked the packet's framing only.
            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
            payload: publish.payload,
            qos: qos_from_5(publish.qos),
            pkid: publish.pkid,
            retain: publish.retain,
            dup: publish.dup,
            properties: publish.properties.and_then(|p| {
                let properties = Properties {
                    user: p.user_properties,
                    content_type: p.content_type,
                    response_topic: p.response_topic,
                    correlation_data: p.correlation_data,
                    message_expiry: p.message_expiry_interval,
                };
                (properties != Properties::default()).then(|| Box::new(properties))
            }),
        }),
        Event::Incoming(Packet::ConnAck(connack)) => Incoming::ConnAck {
            session_present: connack.session_present,
        },
        Event::Incoming(Packet::SubAck(suback)) => Incoming::SubAck(
            suback
                .return_codes
                .iter()
                .map(|code| match code {
                    mqtt5::SubscribeReasonCode::Success(qos) => Ok(qos_from_5(*qos)),
                    refused => Err(format!("refused by the broker: {refused:?}")),
                })
                .collect(),
        ),
        Event::Outgoing(rumqttc::Outgoing::Disconnect) => Incoming::Disconnected,
        _ => Incoming::Other,
    }
}

fn poll_error_311(error: rumqttc::ConnectionError) -> PollError {
    use rumqttc::{ConnectionError, StateError, mqttbytes};
    match error {
        ConnectionError::ConnectionRefused(code) => refused(&format!("{code:?}")),
        ConnectionError::MqttState(StateError::Deserialization(
            mqttbytes::Error::PayloadSizeLimitExceeded(size),
        )) => too_large(size),
        ConnectionError::MqttState(StateError::Deserialization(mqttbytes::Error::TopicNotUtf8)) => {
            PollError {
                refused: false,
                message: "the broker sent a message whose topic is not UTF-8".to_owned(),
                unreadable: Some(Unreadable::TopicNotUtf8),
                closed: false,
            }
        }
        other => failed(other.to_string()),
    }
}

fn poll_error_5(error: v5::ConnectionError) -> PollError {
    use v5::{ConnectionError, StateError, mqttbytes};
    match error {
        ConnectionError::ConnectionRefused(code) => refused(&format!("{code:?}")),
        ConnectionError::MqttState(StateError::Deserialization(
            mqttbytes::Error::PayloadSizeLimitExceeded { pkt_size, .. },
        )) => too_large(pkt_size),
        other => failed(other.to_string()),
    }
}

/// The broker sent a packet above `MQTT_MAX_PACKET_SIZE`. rumqttc cannot read past it, so the
/// connection drops; the source task then reads past it on a side connection.
fn too_large(size: usize) -> PollError {
    PollError {
        refused: false,
        message: format!(
            "the broker sent a packet of {size} bytes, more than MQTT_MAX_PACKET_SIZE allows"
        ),
        unreadable: Some(Unreadable::TooLarge(size)),
        closed: false,
    }
}

/// The broker answered CONNECT with a refusal (`code` is the return or reason code's name).
fn refused(code: &str) -> PollError {
    let hint = match code {
        "BadUserNamePassword" | "BadUsernamePassword" | "NotAuthorized" => {
            " (check MQTT_USERNAME and MQTT_PASSWORD)"
        }
        "BadClientId" | "ClientIdentifierNotValid" => " (check MQTT_CLIENT_ID)",
        _ => "",
    };
    let what = match code {
        "BadUserNamePassword" | "BadUsernamePassword" => "bad user name or password".to_owned(),
        "NotAuthorized" => "not authorized".to_owned(),
        other => other.to_owned(),
    };
    PollError {
        refused: true,
        message: format!("broker refused the connection: {what}{hint}"),
        unreadable: None,
        closed: false,
    }
}

/// How rumqttc's errors say that the broker closed or reset the connection.
const CLOSED_BY_PEER: [&str; 3] = ["reset by peer", "closed by peer", "end of file"];

/// Any other failure. TLS problems reach rumqttc by several paths (the handshake, or a fatal
/// alert read after it, as TLS 1.3 reports a rejected client certificate), so they are
/// recognised by OpenSSL's wording and reported as what they are.
fn failed(message: String) -> PollError {
    match tls_problem(&message) {
        // A certificate problem needs an operator, like a refused login.
        Some(problem) => PollError {
            refused: true,
            message: format!("TLS handshake failed: {problem}"),
            unreadable: None,
            closed: false,
        },
        None => PollError {
            refused: false,
            closed: CLOSED_BY_PEER.iter().any(|marker| message.contains(marker)),
            message,
            unreadable: None,
        },
    }
}

/// What OpenSSL's error string (`error:CODE:SSL routines:FUNCTION:REASON:FILE:LINE:DATA`, and
/// the certificate verification result in parentheses) says went wrong, with what to check.
fn tls_problem(message: &str) -> Option<String> {
    const LIBRARY: &str = "SSL routines:";
    let at = message.find(LIBRARY)?;
    let mut fields = message[at + LIBRARY.len()..].split(':');
    let reason = fields.nth(1).unwrap_or_default().trim();
    let verify = message
        .rfind(" (")
        .filter(|&open| open > at)
        .map(|open| message[open + 2..].trim_end_matches(')'));
    let hint = if reason.contains("unknown ca") || reason.contains("bad certificate") {
        "the broker does not accept MQTT_CLIENT_CERT (check the CA that issued it)"
    } else if reason.contains("certificate required") {
        "the broker requires a client certificate: set MQTT_CLIENT_CERT and MQTT_CLIENT_KEY"
    } else if reason.contains("certificate expired") {
        "the broker says MQTT_CLIENT_CERT has expired"
    } else if reason.contains("certificate verify failed") {
        "the broker's certificate is not trusted (check ROOT_CA and MQTT_BROKER)"
    } else {
        "check ROOT_CA, MQTT_CLIENT_CERT and MQTT_CLIENT_KEY"
    };
    Some(match verify {
        Some(verify) => format!("{reason}: {verify}; {hint}"),
        None => format!("{reason}; {hint}"),
    })
}

/// The QoS as rumqttc's MQTT 3.1.1 client spells it.
pub fn qos_311(qos: QoS) -> rumqttc::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_from_311(qos: rumqttc::QoS) -> QoS {
    match qos {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The QoS as rumqttc's MQTT 5 client spells it.
pub fn qos_5(qos: QoS) -> v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_from_5(qos: v5::mqttbytes::QoS) -> QoS {
    match qos {
        v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openssl_errors_are_reported_as_tls_problems_with_what_to_check() {
        let cases = [
            (
                "Mqtt state: Mqtt serialization/deserialization error: IO: error:0A000418:SSL \
                 routines:ssl3_read_bytes:tlsv1 alert unknown ca:../ssl/record/rec_layer_s3.c:\
                 1601:SSL alert number 48",
                "tlsv1 alert unknown ca; the broker does not accept MQTT_CLIENT_CERT",
            ),
            (
                "TLS: Native TLS error error:0A000086:SSL routines:tls_post_process_server_\
                 certificate:certificate verify failed:../ssl/statem/statem_clnt.c:1889: \
                 (self-signed certificate in certificate chain)",
                "certificate verify failed: self-signed certificate in certificate chain; the \
                 broker's certificate is not trusted",
            ),
        ];
        for (message, expected) in cases {
            let error = failed(message.to_owned());
            assert!(error.refused, "{message}");
            assert!(
                error.message.starts_with("TLS handshake failed: ")
                    && error.message.contains(expected),
                "{}",
                error.message
            );
        }
        let other = failed("I/O: connection refused".to_owned());
        assert!(!other.refused);
        assert_eq!(other.message, "I/O: connection refused");
    }
}
