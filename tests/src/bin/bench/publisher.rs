//! The benchmark's load: MQTT 3.1.1 PUBLISH packets encoded by hand and written to the socket
//! in chunks of up to 64 KiB.
//!
//! A client library writes and flushes each publish on its own (rumqttc 0.25: one `write` per
//! message), which costs this two-core machine about 1.3 µs of CPU per message: CPU the bridge,
//! Mosquitto and tansu then do not have. Chunked writes take that share down to a fraction, and
//! the baseline run uses this same publisher, so the ratio compares like with like. QoS 1
//! keeps at most `WINDOW` publishes unacknowledged, as a client's in-flight limit would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Publishes a QoS 1 publisher may have unacknowledged.
const WINDOW: u64 = 1000;
/// Bytes gathered before a write.
const CHUNK: usize = 64 * 1024;

/// One publisher connection's share of the load.
pub struct Load<'a> {
    pub port: u16,
    /// Message `n` goes to `topics[n % topics.len()]`.
    pub topics: &'a [String],
    pub messages: u64,
    pub size: usize,
    pub qos: u8,
    /// Messages per second, or 0 for flat out.
    pub rate: u64,
}

/// Connects, publishes `load.messages` messages (payload from `payload(sequence)`) and returns
/// once all are written and, for QoS 1, acknowledged. Panics on any protocol or I/O error: a
/// benchmark whose load did not go out has nothing to report.
pub async fn publish(load: Load<'_>, payload: impl Fn(u64, &mut Vec<u8>)) {
    let mut stream = TcpStream::connect(("127.0.0.1", load.port))
        .await
        .expect("publisher connects to Mosquitto");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
        .write_all(&connect_packet(&format!(
            "bench-pub-{}",
            mkb_tests::unique()
        )))
        .await
        .expect("publisher sends CONNECT");
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .await
        .expect("publisher reads CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "Mosquitto refused the publisher");
    let (reader, mut writer) = stream.into_split();
    let acked = Arc::new(AtomicU64::new(0));
    let ack_arrived = Arc::new(Notify::new());
    let ack_counter = (load.qos > 0)
        .then(|| tokio::spawn(count_pubacks(reader, acked.clone(), ack_arrived.clone())));

    let started = Instant::now();
    let mut chunk = Vec::with_capacity(CHUNK + load.size + 256);
    let mut body = Vec::with_capacity(load.size);
    for n in 0..load.messages {
        while load.qos > 0 && n - acked.load(Ordering::Acquire) >= WINDOW {
            if !chunk.is_empty() {
                writer.write_all(&chunk).await.expect("publisher writes");
                chunk.clear();
            }
            ack_arrived.notified().await;
        }
        body.clear();
        payload(n, &mut body);
        encode_publish(
            &mut chunk,
            &load.topics[(n % load.topics.len() as u64) as usize],
            load.qos,
            (n % 65_535) as u16 + 1,
            &body,
        );
        let pause = load.rate > 0 && n % 10 == 9;
        if chunk.len() >= CHUNK || pause || n + 1 == load.messages {
            writer.write_all(&chunk).await.expect("publisher writes");
            chunk.clear();
        }
        if pause {
            let due = started + Duration::from_secs_f64((n + 1) as f64 / load.rate as f64);
            tokio::time::sleep_until(due).await;
        }
    }
    while load.qos > 0 && acked.load(Ordering::Acquire) < load.messages {
        ack_arrived.notified().await;
    }
    let _ = writer.write_all(&[0xE0, 0]).await; // DISCONNECT
    if let Some(task) = ack_counter {
        task.abort();
    }
}

/// CONNECT for MQTT 3.1.1: clean session, keep-alive off (the load never pauses long).
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut variable = Vec::new();
    put_string(&mut variable, "MQTT");
    variable.extend_from_slice(&[4, 0x02, 0, 0]); // level 4, clean session, keep-alive 0
    put_string(&mut variable, client_id);
    let mut packet = vec![0x10];
    put_length(&mut packet, variable.len());
    packet.extend_from_slice(&variable);
    packet
}

fn encode_publish(out: &mut Vec<u8>, topic: &str, qos: u8, packet_id: u16, payload: &[u8]) {
    let id_len = if qos > 0 { 2 } else { 0 };
    out.push(0x30 | (qos << 1));
    put_length(out, 2 + topic.len() + id_len + payload.len());
    put_string(out, topic);
    if qos > 0 {
        out.extend_from_slice(&packet_id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// MQTT's variable-length integer: seven bits a byte, high bit set while more follow.
fn put_length(out: &mut Vec<u8>, mut length: usize) {
    loop {
        let byte = (length % 128) as u8;
        length /= 128;
        if length == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Counts PUBACKs until the connection closes, waking the publisher after each read.
async fn count_pubacks(mut reader: OwnedReadHalf, acked: Arc<AtomicU64>, arrived: Arc<Notify>) {
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut read = [0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut read).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buffer.extend_from_slice(&read[..n]);
        let mut at = 0;
        let mut pubacks = 0;
        while let Some((kind, len)) = packet_at(&buffer[at..]) {
            if kind == 4 {
                pubacks += 1;
            }
            at += len;
        }
        buffer.drain(..at);
        acked.fetch_add(pubacks, Ordering::Release);
        arrived.notify_one();
    }
}

/// The type and whole length of the packet at the start of `bytes`, once it is all there.
fn packet_at(bytes: &[u8]) -> Option<(u8, usize)> {
    let mut remaining = 0usize;
    for (i, byte) in bytes.iter().enumerate().skip(1).take(4) {
        remaining |= usize::from(byte & 0x7F) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            let total = i + 1 + remaining;
            return (bytes.len() >= total).then_some((bytes[0] >> 4, total));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_as_many_bytes_as_the_value_needs() {
        for (value, bytes) in [
            (0, vec![0]),
            (127, vec![0x7F]),
            (128, vec![0x80, 1]),
            (16_383, vec![0xFF, 0x7F]),
            (16_384, vec![0x80, 0x80, 1]),
        ] {
            let mut out = Vec::new();
            put_length(&mut out, value);
            assert_eq!(out, bytes, "length {value}");
        }
    }

    #[test]
    fn a_publish_reads_back_as_one_packet_of_its_own_length() {
        let mut out = Vec::new();
        encode_publish(&mut out, "bench/0", 1, 7, &[b'x'; 200]);
        encode_publish(&mut out, "bench/0", 0, 0, &[b'y'; 3]);
        let first = packet_at(&out).expect("first packet complete");
        assert_eq!(first, (3, 2 + 2 + 7 + 2 + 200 + 1));
        let second = packet_at(&out[first.1..]).expect("second packet complete");
        assert_eq!(second, (3, out.len() - first.1));
        assert_eq!(
            packet_at(&out[..first.1 - 1]),
            None,
            "a cut packet is not complete"
        );
    }
}
