//! The downlink's MQTT connection, version 3.1.1 or 5 as `MQTT_VERSION` says, behind one small
//! interface: publish, and hear which publish went out with which packet id and which the
//! broker acknowledged or (MQTT 5 only) refused.

use std::future::Future;

use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as mqtt5;

use crate::DownlinkConfig;
use crate::render::Publish;

/// What the downlink needs to know about one event of its connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    Connected,
    /// The oldest publish handed to the client was written; QoS 1 and 2 ones got this packet id
    /// (0 for QoS 0).
    Sent(u16),
    /// The broker took the publish with this packet id: PUBACK for QoS 1, PUBCOMP for QoS 2.
    Acknowledged(u16),
    /// The broker refused it with an MQTT 5 reason code (PUBACK or PUBREC); sending it again
    /// would be refused again.
    Refused(u16, String),
    Other,
}

/// The seam between the downlink task and MQTT: [`Connection`] here, a scripted fake in the
/// task's unit tests.
pub(crate) trait Link {
    /// Drives the connection until the next event; reconnects when called after an error.
    fn poll(&mut self) -> impl Future<Output = Result<LinkEvent, String>> + Send;
    /// Queues a publish without waiting; its packet id comes with [`LinkEvent::Sent`], in the
    /// order the publishes were queued.
    fn publish(&self, publish: Publish) -> Result<(), String>;
    /// Queues a DISCONNECT without waiting.
    fn disconnect(&self);
}

/// The event loops are large and of different sizes; one connection lives per downlink, so
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

impl Connection {
    /// A clean session as `<MQTT_CLIENT_ID>-downlink`, keeping up to `max_in_flight` publishes
    /// unacknowledged (MQTT 5: fewer if the broker's Receive Maximum says so).
    pub(crate) fn new(config: &DownlinkConfig) -> Self {
        let client_id = format!("{}-downlink", config.mqtt.client_id);
        let window = config.max_in_flight.clamp(1, 65_535) as u16;
        // Room for every publish the task may have in flight, plus a DISCONNECT.
        let requests = config.max_in_flight + 16;
        match config.mqtt.version {
            mkb_mqtt::MqttVersion::V311 => {
                let mut options = mkb_mqtt::options_311(&config.mqtt, &client_id);
                options.set_clean_session(true).set_inflight(window);
                let (client, eventloop) = rumqttc::AsyncClient::new(options, requests);
                Self::V311 {
                    client,
                    eventloop: Box::new(eventloop),
                }
            }
            mkb_mqtt::MqttVersion::V5 => {
                let mut options = mkb_mqtt::options_5(&config.mqtt, &client_id);
                options
                    .set_clean_start(true)
                    .set_outgoing_inflight_upper_limit(window);
                let (client, eventloop) = v5::AsyncClient::new(options, requests);
                Self::V5 {
                    client,
                    eventloop: Box::new(eventloop),
                }
            }
        }
    }
}

impl Link for Connection {
    async fn poll(&mut self) -> Result<LinkEvent, String> {
        match self {
            Self::V311 { eventloop, .. } => eventloop
                .poll()
                .await
                .map(event_311)
                .map_err(|e| e.to_string()),
            Self::V5 { eventloop, .. } => eventloop
                .poll()
                .await
                .map(event_5)
                .map_err(|e| e.to_string()),
        }
    }

    fn publish(&self, publish: Publish) -> Result<(), String> {
        let Publish {
            topic,
            payload,
            qos,
            retain,
            properties,
        } = publish;
        match self {
            Self::V311 { client, .. } => client
                .try_publish(topic, mkb_mqtt::qos_311(qos), retain, payload)
                .map_err(|e| e.to_string()),
            Self::V5 { client, .. } => {
                let qos = mkb_mqtt::qos_5(qos);
                match properties {
                    Some(properties) => {
                        let properties = mqtt5::PublishProperties {
                            message_expiry_interval: properties.message_expiry,
                            response_topic: properties.response_topic,
                            correlation_data: properties.correlation_data,
                            user_properties: properties.user,
                            content_type: properties.content_type,
                            ..mqtt5::PublishProperties::default()
                        };
                        client.try_publish_with_properties(topic, qos, retain, payload, properties)
                    }
                    None => client.try_publish(topic, qos, retain, payload),
                }
                .map_err(|e| e.to_string())
            }
        }
    }

    fn disconnect(&self) {
        // Best effort: a full request channel means the connection is going anyway.
        match self {
            Self::V311 { client, .. } => drop(client.try_disconnect()),
            Self::V5 { client, .. } => drop(client.try_disconnect()),
        }
    }
}

fn event_311(event: rumqttc::Event) -> LinkEvent {
    use rumqttc::{Event, Outgoing, Packet};
    match event {
        Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected,
        Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Sent(pkid),
        Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acknowledged(ack.pkid),
        Event::Incoming(Packet::PubComp(comp)) => LinkEvent::Acknowledged(comp.pkid),
        _ => LinkEvent::Other,
    }
}

fn event_5(event: v5::Event) -> LinkEvent {
    use mqtt5::{PubAckReason, PubRecReason};
    use rumqttc::Outgoing;
    use v5::Event;
    use v5::mqttbytes::v5::Packet;
    match event {
        Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected,
        Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Sent(pkid),
        Event::Incoming(Packet::PubAck(ack)) => match ack.reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                LinkEvent::Acknowledged(ack.pkid)
            }
            refused => LinkEvent::Refused(ack.pkid, format!("PUBACK {refused:?}")),
        },
        // A QoS 2 publish refused at PUBREC ends there: no PUBREL, no PUBCOMP.
        Event::Incoming(Packet::PubRec(rec)) => match rec.reason {
            PubRecReason::Success | PubRecReason::NoMatchingSubscribers => LinkEvent::Other,
            refused => LinkEvent::Refused(rec.pkid, format!("PUBREC {refused:?}")),
        },
        // Any PUBCOMP: the broker took the message at PUBREC (one that no longer knows the
        // packet id has finished with it).
        Event::Incoming(Packet::PubComp(comp)) => LinkEvent::Acknowledged(comp.pkid),
        _ => LinkEvent::Other,
    }
}
