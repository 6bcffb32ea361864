//! Reading past a message rumqttc cannot read under MQTT 3.1.1: one larger than
//! `MQTT_MAX_PACKET_SIZE`, or one whose topic is not UTF-8 (from a broker that does not check).
//!
//! MQTT 3.1.1 cannot tell the broker a size limit, and rumqttc fails the connection on such a
//! packet. With a persistent session the broker then sends the same message first after every
//! reconnect, and nothing behind it ever arrives. So after such a failure the bridge opens one
//! short connection of its own with the same client id and session: it reads the packets the
//! broker sends again until it meets the unreadable PUBLISH (an oversized payload is streamed
//! away, never held); it acknowledges that one (PUBACK, or PUBREC and PUBCOMP for QoS 2), and
//! disconnects. Every other message it sees stays unacknowledged, so the broker sends it again
//! on the bridge's next connection.
//!
//! Only the fixed header, the topic and the packet id are parsed: enough MQTT 3.1.1 to find
//! the packet and acknowledge it.

use std::time::Duration;

use mkb_bridge::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::MqttConfig;

/// How long the side connection looks for the oversized message among those sent again.
const LOOK_FOR: Duration = Duration::from_secs(10);
/// How long it waits for the broker to close the connection after its DISCONNECT.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The message read past.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Skipped {
    /// The topic, invalid UTF-8 replaced by U+FFFD.
    pub topic: String,
    /// The PUBLISH packet's remaining length: variable header and payload.
    pub size: usize,
    pub qos: QoS,
    /// The payload when the packet was within the size limit (its topic was the problem).
    pub payload: Option<Vec<u8>>,
}

/// Opens the side connection and reads past the first PUBLISH above `config.max_packet_size`
/// or with a topic that is not UTF-8. `Ok(None)` when none came within [`LOOK_FOR`] (a QoS 0
/// message is not sent again).
pub(crate) async fn read_past(config: &MqttConfig) -> Result<Option<Skipped>, String> {
    let tcp = TcpStream::connect((config.host.as_str(), config.port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    match &config.tls {
        Some(connector) => {
            let tls = tokio_native_tls::TlsConnector::from(connector.clone())
                .connect(&config.host, tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            session(tls, config).await
        }
        None => session(tcp, config).await,
    }
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    config: &MqttConfig,
) -> Result<Option<Skipped>, String> {
    let io = |e: std::io::Error| e.to_string();
    stream.write_all(&connect(config)).await.map_err(io)?;
    let (first, length) = fixed_header(&mut stream).await.map_err(io)?;
    let mut connack = [0u8; 2];
    if first != 0x20 || length != 2 {
        return Err(format!("expected CONNACK, got packet type {}", first >> 4));
    }
    stream.read_exact(&mut connack).await.map_err(io)?;
    if connack[1] != 0 {
        return Err(format!(
            "broker refused the connection (code {})",
            connack[1]
        ));
    }
    let found = tokio::time::timeout(LOOK_FOR, find(&mut stream, config.max_packet_size)).await;
    let skipped = match found {
        Ok(found) => Some(found.map_err(io)?),
        Err(_elapsed) => None,
    };
    // DISCONNECT: the session stays, with every message but the skipped one unacknowledged.
    stream.write_all(&[0xE0, 0]).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    // Read on until the broker closes: a socket closed with unread bytes (the messages sent
    // after the skipped one) is reset, and a broker may then lose the PUBACK not yet processed.
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(
        CLOSE_WAIT,
        tokio::io::copy(&mut stream, &mut tokio::io::sink()),
    )
    .await;
    Ok(skipped)
}

/// Reads packets until a PUBLISH above `limit` or with a topic that is not UTF-8, reads past
/// it and acknowledges it. Packets within the limit are read whole (bounded by the limit).
async fn find<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    limit: usize,
) -> std::io::Result<Skipped> {
    loop {
        let (first, length) = fixed_header(stream).await?;
        if first >> 4 != 3 {
            discard(stream, length).await?;
            continue;
        }
        let qos = match (first >> 1) & 3 {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let topic_length = usize::from(stream.read_u16().await?);
        let mut topic = vec![0; topic_length.min(length)];
        stream.read_exact(&mut topic).await?;
        let mut consumed = 2 + topic.len();
        let pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            consumed += 2;
            stream.read_u16().await?
        };
        let rest = length.saturating_sub(consumed);
        let readable = std::str::from_utf8(&topic).is_ok();
        if length > limit {
            discard(stream, rest).await?;
        }
        let payload = if length > limit {
            None
        } else {
            let mut payload = vec![0; rest];
            stream.read_exact(&mut payload).await?;
            if readable {
                // Left for the bridge's next connection, where the broker sends it again.
                continue;
            }
            Some(payload)
        };
        let [high, low] = pkid.to_be_bytes();
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => stream.write_all(&[0x40, 2, high, low]).await?,
            QoS::ExactlyOnce => {
                stream.write_all(&[0x50, 2, high, low]).await?;
                await_pubrel(stream, pkid).await?;
                stream.write_all(&[0x70, 2, high, low]).await?;
            }
        }
        return Ok(Skipped {
            topic: String::from_utf8_lossy(&topic).into_owned(),
            size: length,
            qos,
            payload,
        });
    }
}

/// Reads packets until the PUBREL of `pkid`.
async fn await_pubrel<S: AsyncRead + Unpin>(stream: &mut S, pkid: u16) -> std::io::Result<()> {
    loop {
        let (first, length) = fixed_header(stream).await?;
        if first != 0x62 || length != 2 {
            discard(stream, length).await?;
        } else if stream.read_u16().await? == pkid {
            return Ok(());
        }
    }
}

/// The first byte of a fixed header and the remaining length.
async fn fixed_header<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<(u8, usize)> {
    let first = stream.read_u8().await?;
    let mut length = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = stream.read_u8().await?;
        length |= usize::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return Ok((first, length));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "malformed remaining length",
    ))
}

/// Reads `count` bytes and throws them away, holding 64 KiB at most.
async fn discard<S: AsyncRead + Unpin>(stream: &mut S, count: usize) -> std::io::Result<()> {
    let mut limited = stream.take(count as u64);
    let copied = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
    if copied < count as u64 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The CONNECT packet: MQTT 3.1.1, the bridge's client id, its session kept (clean session
/// off), no keep-alive (the connection lives seconds), and the bridge's credentials.
fn connect(config: &MqttConfig) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, bytes: &[u8]) {
        let length = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&bytes[..usize::from(length)]);
    }
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(4); // protocol level: 3.1.1
    let flags = match &config.credentials {
        Some(_) => 0b1100_0000,
        None => 0,
    };
    body.push(flags);
    body.extend_from_slice(&0u16.to_be_bytes());
    string(&mut body, config.client_id.as_bytes());
    if let Some(credentials) = &config.credentials {
        string(&mut body, credentials.username.as_bytes());
        string(&mut body, credentials.password.as_bytes());
    }
    packet(0x10, body)
}

/// A packet: its first byte, the remaining length, and `body`.
fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut packet = vec![first];
    let mut length = body.len();
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if length == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PUBLISH packet of `qos` with a payload of `payload` bytes.
    pub(crate) fn publish(topic: &[u8], qos: u8, pkid: u16, payload: usize) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic);
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.extend(std::iter::repeat_n(b'x', payload));
        packet(0x30 | (qos << 1), body)
    }

    #[tokio::test]
    async fn finds_the_oversized_publish_among_others_and_acknowledges_only_it() {
        for (qos, ack) in [
            (1u8, vec![0x40, 2, 0, 7]),
            (2, vec![0x50, 2, 0, 7, 0x70, 2, 0, 7]),
        ] {
            let (mut broker, mut bridge) = tokio::io::duplex(1 << 16);
            let mut sent = publish(b"small/1", 1, 5, 10);
            sent.extend(publish(b"big/topic", qos, 7, 300_000));
            sent.extend([0x62, 2, 0, 7]); // PUBREL, read only for QoS 2
            let broker_side = tokio::spawn(async move {
                broker.write_all(&sent).await.expect("write");
                let mut acks = vec![0; if qos == 1 { 4 } else { 8 }];
                broker.read_exact(&mut acks).await.expect("acks");
                acks
            });
            let skipped = find(&mut bridge, 1024).await.expect("found");
            assert_eq!(
                skipped,
                Skipped {
                    topic: "big/topic".to_owned(),
                    size: 2 + 9 + 2 + 300_000,
                    qos: if qos == 1 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::ExactlyOnce
                    },
                    payload: None,
                }
            );
            assert_eq!(broker_side.await.expect("broker"), ack, "QoS {qos}");
        }
    }

    #[tokio::test]
    async fn finds_a_publish_whose_topic_is_not_utf8_and_keeps_its_payload() {
        let (mut broker, mut bridge) = tokio::io::duplex(1 << 16);
        let mut sent = publish(b"ok/1", 1, 1, 10);
        sent.extend(publish(b"bad/\xff\xfe", 1, 2, 20));
        broker.write_all(&sent).await.expect("write");
        let skipped = find(&mut bridge, 1024).await.expect("found");
        assert_eq!(skipped.topic, "bad/\u{fffd}\u{fffd}");
        assert_eq!(skipped.payload, Some(vec![b'x'; 20]));
        let mut ack = [0; 4];
        broker.read_exact(&mut ack).await.expect("PUBACK");
        assert_eq!(
            ack,
            [0x40, 2, 0, 2],
            "only the unreadable one is acknowledged"
        );
    }

    #[tokio::test]
    async fn a_stream_that_ends_inside_the_packet_is_an_error() {
        let (mut broker, mut bridge) = tokio::io::duplex(1 << 16);
        let mut sent = publish(b"big", 1, 1, 5000);
        sent.truncate(3000);
        broker.write_all(&sent).await.expect("write");
        drop(broker);
        assert!(find(&mut bridge, 1024).await.is_err());
    }

    #[test]
    fn connect_keeps_the_session_and_sends_the_credentials() {
        let config = MqttConfig {
            client_id: "bridge-1".to_owned(),
            credentials: Some(crate::Credentials {
                username: "u".to_owned(),
                password: "p".to_owned(),
            }),
            ..crate::source::tests::config(crate::AckMode::AfterWrite)
        };
        let packet = connect(&config);
        let expected_body: Vec<u8> = [
            &[0, 4][..],
            b"MQTT",
            &[4, 0b1100_0000, 0, 0],
            &[0, 8],
            b"bridge-1",
            &[0, 1],
            b"u",
            &[0, 1],
            b"p",
        ]
        .concat();
        assert_eq!(packet[0], 0x10);
        assert_eq!(usize::from(packet[1]), expected_body.len());
        assert_eq!(&packet[2..], expected_body);
    }

    /// Reads one packet a client sent: its first byte and body.
    async fn read_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
        let (first, length) = fixed_header(stream).await.expect("fixed header");
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.expect("packet body");
        (first, body)
    }

    /// Accepts a connection and answers its CONNECT (and its SUBSCRIBE, when `subscribe`).
    async fn accept(listener: &tokio::net::TcpListener, subscribe: bool) -> TcpStream {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let (first, _) = read_packet(&mut stream).await;
        assert_eq!(first, 0x10, "CONNECT");
        stream.write_all(&[0x20, 2, 1, 0]).await.expect("CONNACK");
        if subscribe {
            let (first, body) = read_packet(&mut stream).await;
            assert_eq!(first, 0x82, "SUBSCRIBE");
            let suback = [0x90, 3, body[0], body[1], 1];
            stream.write_all(&suback).await.expect("SUBACK");
        }
        stream
    }

    /// A broker that does not check topics sends one that is not UTF-8: the MQTT 3.1.1 client
    /// fails on it, the side connection reads past it and acknowledges it, its dead letter
    /// (with the payload) is passed on, and the next message arrives on the new connection.
    #[tokio::test]
    async fn a_topic_that_is_not_utf8_from_a_lax_broker_is_read_past_and_the_stream_goes_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let bad = publish(b"bad/\xff", 1, 1, 5);
        let broker = tokio::spawn(async move {
            let mut first = accept(&listener, true).await;
            first.write_all(&bad).await.expect("PUBLISH");
            let mut side = accept(&listener, false).await;
            side.write_all(&bad).await.expect("PUBLISH again");
            let mut acks = [0; 6];
            side.read_exact(&mut acks)
                .await
                .expect("PUBACK, DISCONNECT");
            // A broker closes the connection on DISCONNECT.
            drop(side);
            let mut next = accept(&listener, true).await;
            next.write_all(&publish(b"good/1", 1, 2, 3))
                .await
                .expect("PUBLISH");
            (acks, first, next)
        });
        let config = MqttConfig {
            host: "127.0.0.1".to_owned(),
            port,
            dead_letter_topic: Some("dlq".to_owned()),
            ..crate::source::tests::config(crate::AckMode::AfterWrite)
        };
        let metrics = crate::MqttMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let source = crate::MqttSource::new(config, metrics.clone());
        let (output, mut messages) = tokio::sync::mpsc::channel(10);
        let (_done, watermark) = mkb_bridge::ack_channel();
        let task = tokio::spawn(source.run(output, watermark, std::future::pending()));
        let mut next_message = async || {
            tokio::time::timeout(Duration::from_secs(20), messages.recv())
                .await
                .expect("in time")
                .expect("a message")
        };
        let letter = next_message().await;
        assert_eq!(letter.topic, "bad/\u{fffd}");
        assert_eq!(&letter.payload[..], b"xxxxx");
        let dead = letter.dead_letter.expect("a dead letter");
        assert_eq!(dead.reason, mkb_bridge::dead_letter::MQTT_INVALID_TOPIC);
        let next = next_message().await;
        assert_eq!(next.topic, "good/1");
        assert!(next.dead_letter.is_none());
        let (acks, _first, _next) = broker.await.expect("broker");
        assert_eq!(
            acks,
            [0x40, 2, 0, 1, 0xE0, 0],
            "PUBACK of the bad one, DISCONNECT"
        );
        assert_eq!(metrics.invalid_topic.get(), 1);
        task.abort();
    }
}
