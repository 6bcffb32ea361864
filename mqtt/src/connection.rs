//! One MQTT connection, version 3.1.1 or 5, behind one small interface.
//!
//! rumqttc has a separate client for each protocol version with its own packet types. The
//! source task should not care, so this module maps both onto [`Incoming`] and [`PollError`];
//! everything version-specific (session expiry, Receive Maximum, reason codes) stays here.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use mkb_bridge::QoS;
use rumqttc::v5::mqttbytes::v5 as mqtt5;
use rumqttc::{Transport, v5};

use crate::{AckMode, MqttConfig};

/// MQTT protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttVersion {
    V311,
    V5,
}

/// What the source task needs to know about one event of the connection.
pub(crate) enum Incoming {
    ConnAck {
        session_present: bool,
    },
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
        /// Packet identifier, needed to acknowledge QoS 1/2 messages.
        pkid: u16,
    },
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

/// Requests queued on the client before the event loop sends them (acknowledgements, subscribe,
/// disconnect). Acks that find the channel full wait in the source task's own compact queue, so
/// this only bounds memory: an MQTT 5 request takes about 400 bytes.
const REQUEST_CAPACITY: usize = 1024;
/// The bridge publishes nothing, but rumqttc's MQTT 5 client keeps a slot per outgoing packet
/// id up to this limit (65,535 by default, some 14 MB).
const OUTGOING_INFLIGHT_V5: u16 = 16;

impl Connection {
    pub(crate) fn new(config: &MqttConfig, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        let transport = match tls {
            Some(tls) => Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls)),
            None => Transport::tcp(),
        };
        match config.version {
            MqttVersion::V311 => {
                let mut options =
                    rumqttc::MqttOptions::new(&config.client_id, &config.host, config.port);
                options
                    .set_transport(transport)
                    .set_keep_alive(config.keep_alive)
                    .set_clean_session(config.clean_session)
                    .set_manual_acks(config.ack_mode == AckMode::AfterWrite)
                    .set_max_packet_size(config.max_packet_size, config.max_packet_size);
                if let Some(credentials) = &config.credentials {
                    options.set_credentials(&credentials.username, &credentials.password);
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(options, REQUEST_CAPACITY);
                Self::V311 {
                    client,
                    eventloop: Box::new(eventloop),
                }
            }
            MqttVersion::V5 => {
                let mut options =
                    v5::MqttOptions::new(&config.client_id, &config.host, config.port);
                let max_packet = u32::try_from(config.max_packet_size).unwrap_or(u32::MAX);
                options
                    .set_transport(transport)
                    .set_keep_alive(config.keep_alive)
                    .set_clean_start(config.clean_session)
                    .set_manual_acks(config.ack_mode == AckMode::AfterWrite)
                    // The broker drops messages larger than this instead of sending them.
                    .set_max_packet_size(Some(max_packet))
                    .set_receive_maximum(Some(config.receive_maximum))
                    .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT_V5);
                if !config.clean_session {
                    // In MQTT 5 a session outlives the connection only with an expiry interval;
                    // the largest value means "never expires" (the broker may cap it).
                    options.set_session_expiry_interval(Some(u32::MAX));
                }
                if let Some(credentials) = &config.credentials {
                    options.set_credentials(&credentials.username, &credentials.password);
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
        match self {
            Self::V311 { client, .. } => {
                let mut publish = rumqttc::Publish::new("", qos_311(qos), Vec::new());
                publish.pkid = pkid;
                client.try_ack(&publish).is_ok()
            }
            Self::V5 { client, .. } => {
                let mut publish = mqtt5::Publish::new("", qos_5(qos), Vec::new(), None);
                publish.pkid = pkid;
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
}

fn incoming_311(event: rumqttc::Event) -> Incoming {
    use rumqttc::{Event, Outgoing, Packet, SubscribeReasonCode};
    match event {
        Event::Incoming(Packet::Publish(publish)) => Incoming::Publish {
            topic: publish.topic,
            payload: publish.payload,
            qos: qos_from_311(publish.qos),
            pkid: publish.pkid,
        },
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
        Event::Incoming(Packet::Publish(publish)) => Incoming::Publish {
            // Topics are UTF-8 by the protocol; rumqttc checked the packet's framing only.
            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
            payload: publish.payload,
            qos: qos_from_5(publish.qos),
            pkid: publish.pkid,
        },
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

/// The broker sent a packet above `MQTT_MAX_PACKET_SIZE`. The client cannot read past it, so
/// the connection drops and the broker sends it again: say what to change.
fn too_large(size: usize) -> PollError {
    failed(format!(
        "the broker sent a packet of {size} bytes, more than MQTT_MAX_PACKET_SIZE allows; it \
         is sent again on every reconnect until MQTT_MAX_PACKET_SIZE is raised"
    ))
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
    }
}

/// Any other failure. TLS problems reach rumqttc by several paths (handshake, or a fatal alert
/// read after it, as TLS 1.3 reports a rejected client certificate), so they are recognised by
/// rustls' wording and reported as what they are.
fn failed(message: String) -> PollError {
    let tls_detail = ["received fatal alert", "invalid peer certificate", "TLS"]
        .iter()
        .find_map(|marker| message.find(marker).map(|at| &message[at..]));
    match tls_detail {
        // A certificate problem needs an operator, like a refused login.
        Some(detail) => PollError {
            refused: true,
            message: format!(
                "TLS handshake failed: {}",
                detail.trim_start_matches("TLS: ")
            ),
        },
        None => PollError {
            refused: false,
            message,
        },
    }
}

fn qos_311(qos: QoS) -> rumqttc::QoS {
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

fn qos_5(qos: QoS) -> v5::mqttbytes::QoS {
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
