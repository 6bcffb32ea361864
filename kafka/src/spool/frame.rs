//! The spool's record framing: how one entry (a batch of records) is laid out on disk, and a
//! scanner that finds every intact frame in a damaged byte range.
//!
//! A frame is `"MKBF"` · body length (u32 LE) · CRC-32 of the body (u32 LE) · body. The body is
//! the entry id (u64 LE), the record count (u32 LE) and per record:
//! - receipt time, microseconds since the Unix epoch (u64 LE);
//! - Kafka topic: length (u32 LE) and UTF-8 bytes; empty means the bridge's `KAFKA_TOPIC`;
//! - key: length (u32 LE, [`NONE`] for a null key) and bytes;
//! - value: length (u32 LE) and bytes;
//! - header count (u32 LE), then per header a name (length, UTF-8) and a value (length or
//!   [`NONE`], bytes).
//!
//! Every frame stands alone: its magic lets a reader find the next frame after damage, its CRC
//! tells an intact frame from a damaged one, and its id (rising through the spool) tells the
//! frames of this spool apart from stale copies.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mkb_bridge::{Key, Record, Topic};
use tokio::time::Instant;

/// Marks the start of every frame.
pub const MAGIC: &[u8; 4] = b"MKBF";
/// Magic, body length and CRC.
pub const HEADER_BYTES: usize = 12;
/// A length that stands for "none" (a null key or header value).
pub const NONE: u32 = u32::MAX;
/// Bytes of a record besides its topic, key and value: time, four lengths and a header count.
const RECORD_OVERHEAD: usize = 8 + 4 + 4 + 4 + 4;
/// Bytes of a body besides its records: id and record count.
const BODY_OVERHEAD: usize = 8 + 4;

/// One intact frame found by [`next`].
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub id: u64,
    pub count: u32,
    /// The body, checksum verified.
    pub body: &'a [u8],
    /// Where the frame ends, relative to the scanned slice.
    pub end: usize,
}

/// What the scanner found at a position.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan<'a> {
    Frame(Frame<'a>),
    /// Bytes `start..end` hold no intact frame; the next one (if any) starts at `end`.
    Damage {
        start: usize,
        end: usize,
    },
    End,
}

/// Bytes an entry of `count` records whose [`Record::size`]s add up to `bytes` takes on disk.
pub fn frame_size(count: usize, bytes: usize) -> usize {
    HEADER_BYTES + BODY_OVERHEAD + count * RECORD_OVERHEAD + bytes
}

/// Appends the frame of entry `id` to `out`.
pub fn encode(id: u64, records: &[Record], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 8]); // length and CRC, filled in below
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    let (now_system, now) = (SystemTime::now(), Instant::now());
    for record in records {
        let age = now.saturating_duration_since(record.received_at);
        let received = now_system
            .checked_sub(age)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as u64);
        out.extend_from_slice(&received.to_le_bytes());
        let topic = match &record.topic {
            Topic::Named(name) => name.as_str(),
            // Unmapped records are never spooled (there is nothing to write).
            Topic::Default | Topic::Unmapped | Topic::Dropped(_) => "",
        };
        put(out, topic.as_bytes());
        // A key other than the MQTT topic is stored as the key, and the MQTT topic as a first
        // header with an empty name (a name no Kafka header of the bridge has).
        let mqtt_topic_header = match &record.key {
            Key::MqttTopic => {
                put(out, record.mqtt_topic.as_bytes());
                false
            }
            Key::Null => {
                out.extend_from_slice(&NONE.to_le_bytes());
                true
            }
            Key::Text(key) => {
                put(out, key.as_bytes());
                true
            }
        };
        put(out, &record.value);
        let count = record.headers.len() + usize::from(mqtt_topic_header);
        out.extend_from_slice(&(count as u32).to_le_bytes());
        if mqtt_topic_header {
            put(out, b"");
            put(out, record.mqtt_topic.as_bytes());
        }
        for (name, value) in &record.headers {
            put(out, name.as_bytes());
            put(out, value);
        }
    }
    let body = start + HEADER_BYTES;
    let length = (out.len() - body) as u32;
    let crc = crc32fast::hash(&out[body..]);
    out[start + 4..start + 8].copy_from_slice(&length.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The body length and CRC a frame header at the start of `bytes` declares; `None` unless
/// `bytes` start with the magic and hold the whole header.
pub fn header(bytes: &[u8]) -> Option<(usize, u32)> {
    let header = bytes.get(..HEADER_BYTES)?;
    if &header[..4] != MAGIC {
        return None;
    }
    let length = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[8..12].try_into().ok()?);
    Some((length, crc))
}

/// The frame starting at `at`, or why there is none.
fn frame_at(bytes: &[u8], at: usize) -> Option<Frame<'_>> {
    let (length, crc) = header(bytes.get(at..)?)?;
    let start = at + HEADER_BYTES;
    let body = bytes.get(start..start.checked_add(length)?)?;
    if length < BODY_OVERHEAD || crc32fast::hash(body) != crc {
        return None;
    }
    let id = u64::from_le_bytes(body[..8].try_into().ok()?);
    let count = u32::from_le_bytes(body[8..12].try_into().ok()?);
    Some(Frame {
        id,
        count,
        body,
        end: start + length,
    })
}

/// Scans `bytes` from `at`: the intact frame there, or the damaged range up to the next intact
/// frame (or to the end), or the end. Never reads outside `bytes`.
pub fn next(bytes: &[u8], at: usize) -> Scan<'_> {
    if at >= bytes.len() {
        return Scan::End;
    }
    if let Some(frame) = frame_at(bytes, at) {
        return Scan::Frame(frame);
    }
    let mut from = at + 1;
    while let Some(offset) = find(&bytes[from..], MAGIC) {
        let candidate = from + offset;
        if frame_at(bytes, candidate).is_some() {
            return Scan::Damage {
                start: at,
                end: candidate,
            };
        }
        from = candidate + 1;
    }
    Scan::Damage {
        start: at,
        end: bytes.len(),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One record as a body holds it, borrowed.
struct Fields<'a> {
    received_micros: u64,
    topic: &'a str,
    key: Option<&'a str>,
    value: &'a [u8],
    /// Where the headers start in the body, and how many there are.
    headers: (&'a [u8], u32),
}

/// Walks a body's records, handing each to `visit`; `None` when the layout is wrong (a frame
/// whose CRC matches but whose body does not parse was not written by this format).
fn parse<'a>(body: &'a [u8], mut visit: impl FnMut(Fields<'a>)) -> Option<usize> {
    let mut rest = body;
    let _id = take_u64(&mut rest)?;
    let count = take_u32(&mut rest)? as usize;
    // Each record takes at least RECORD_OVERHEAD bytes: a count that cannot fit is a lie.
    if count > rest.len() / RECORD_OVERHEAD {
        return None;
    }
    for _ in 0..count {
        let received_micros = take_u64(&mut rest)?;
        let topic = std::str::from_utf8(take_bytes(&mut rest)?).ok()?;
        let key = match take_optional(&mut rest)? {
            Some(key) => Some(std::str::from_utf8(key).ok()?),
            None => None,
        };
        let value = take_bytes(&mut rest)?;
        let header_count = take_u32(&mut rest)?;
        let headers = rest;
        for _ in 0..header_count {
            std::str::from_utf8(take_bytes(&mut rest)?).ok()?;
            take_optional(&mut rest)?;
        }
        visit(Fields {
            received_micros,
            topic,
            key,
            value,
            headers: (headers, header_count),
        });
    }
    rest.is_empty().then_some(count)
}

/// Whether an intact frame's body parses, and its record count; allocates nothing.
pub fn check(body: &[u8]) -> Option<usize> {
    parse(body, |_| {})
}

/// The records of an intact frame's body, `None` when its layout is wrong. A null key or header
/// value reads as an empty one: this release writes none.
pub fn decode(body: &[u8]) -> Option<Vec<Record>> {
    let (now_system, now) = (SystemTime::now(), Instant::now());
    let mut records = Vec::new();
    parse(body, |fields| {
        let received = UNIX_EPOCH + Duration::from_micros(fields.received_micros);
        let age = now_system.duration_since(received).unwrap_or_default();
        let (mut rest, count) = fields.headers;
        // `parse` has checked every header already.
        let mut headers: Vec<(String, Vec<u8>)> = (0..count)
            .filter_map(|_| {
                let name = std::str::from_utf8(take_bytes(&mut rest)?).ok()?;
                let value = take_optional(&mut rest)?.unwrap_or_default();
                Some((name.to_owned(), value.to_vec()))
            })
            .collect();
        let key = fields.key.unwrap_or_default();
        let (mqtt_topic, key) = match headers.first() {
            Some((name, _)) if name.is_empty() => {
                let (_, mqtt_topic) = headers.remove(0);
                let key = match fields.key {
                    Some(key) => Key::Text(key.to_owned()),
                    None => Key::Null,
                };
                (String::from_utf8_lossy(&mqtt_topic).into_owned(), key)
            }
            _ => (key.to_owned(), Key::MqttTopic),
        };
        records.push(Record {
            seq: 0,
            topic: if fields.topic.is_empty() {
                Topic::Default
            } else {
                Topic::Named(fields.topic.to_owned())
            },
            mqtt_topic,
            key,
            value: fields.value.to_vec(),
            headers,
            received_at: now.checked_sub(age).unwrap_or(now),
        });
    })?;
    Some(records)
}

fn take_u32(rest: &mut &[u8]) -> Option<u32> {
    let (head, tail) = rest.split_at_checked(4)?;
    *rest = tail;
    Some(u32::from_le_bytes(head.try_into().ok()?))
}

fn take_u64(rest: &mut &[u8]) -> Option<u64> {
    let (head, tail) = rest.split_at_checked(8)?;
    *rest = tail;
    Some(u64::from_le_bytes(head.try_into().ok()?))
}

fn take_bytes<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    take_optional(rest)?
}

/// A length-prefixed field that may be [`NONE`]: `Some(None)` for none, `None` when malformed.
fn take_optional<'a>(rest: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    let length = take_u32(rest)?;
    if length == NONE {
        return Some(None);
    }
    let (head, tail) = rest.split_at_checked(length as usize)?;
    *rest = tail;
    Some(Some(head))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::tests::records;

    fn frames(ids: std::ops::Range<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for id in ids {
            encode(id, &records(id * 10, 10), &mut out);
        }
        out
    }

    /// Every intact frame's id and body, and the damaged bytes, in order.
    fn scan_bodies(bytes: &[u8]) -> (Vec<(u64, Vec<u8>)>, usize) {
        let (mut found, mut damaged, mut at) = (Vec::new(), 0, 0);
        loop {
            match next(bytes, at) {
                Scan::Frame(frame) => {
                    let decoded = decode(frame.body).expect("an intact frame decodes");
                    assert_eq!(decoded.len(), frame.count as usize);
                    found.push((frame.id, frame.body.to_vec()));
                    at = frame.end;
                }
                Scan::Damage { start, end } => {
                    assert!(start < end && end <= bytes.len());
                    damaged += end - start;
                    at = end;
                }
                Scan::End => return (found, damaged),
            }
        }
    }

    fn scan_all(bytes: &[u8]) -> (Vec<u64>, usize) {
        let (found, damaged) = scan_bodies(bytes);
        (found.into_iter().map(|(id, _)| id).collect(), damaged)
    }

    #[test]
    fn frames_round_trip_with_their_sizes() {
        let mut original = records(0, 5);
        original[2].topic = Topic::Named("dead-letters".to_owned());
        original[2].headers = vec![
            ("mqtt.dlq.reason".to_owned(), b"too_large".to_vec()),
            ("empty".to_owned(), Vec::new()),
        ];
        original[3].key = Key::Text("VIN123".to_owned());
        original[3].headers = vec![("mqtt.topic".to_owned(), b"cars/VIN123".to_vec())];
        original[4].key = Key::Null;
        let mut out = Vec::new();
        encode(7, &original, &mut out);
        let (count, bytes) = crate::spool::sizes(&original);
        assert_eq!(out.len(), frame_size(count, bytes));
        let Scan::Frame(frame) = next(&out, 0) else {
            panic!("no frame found");
        };
        assert_eq!((frame.id, frame.count, frame.end), (7, 5, out.len()));
        let decoded = decode(frame.body).expect("decodes");
        assert_eq!(decoded.len(), original.len());
        for (a, b) in original.iter().zip(&decoded) {
            assert_eq!(
                (&a.topic, &a.mqtt_topic, &a.key, &a.value, &a.headers),
                (&b.topic, &b.mqtt_topic, &b.key, &b.value, &b.headers)
            );
            let skew = a.received_at.max(b.received_at) - a.received_at.min(b.received_at);
            assert!(
                skew < Duration::from_millis(50),
                "receipt time kept: {skew:?}"
            );
        }
    }

    #[test]
    fn damage_in_the_middle_skips_only_the_damaged_frame() {
        let mut bytes = frames(1..6);
        let second = match next(&bytes, 0) {
            Scan::Frame(f) => f.end,
            other => panic!("{other:?}"),
        };
        bytes[second + 40] ^= 0x55; // inside the second frame's body
        let (ids, damaged) = scan_all(&bytes);
        assert_eq!(ids, [1, 3, 4, 5]);
        assert!(damaged > 0);
    }

    #[test]
    fn a_torn_tail_is_damage_up_to_the_end() {
        let bytes = frames(1..4);
        let torn = &bytes[..bytes.len() - 7];
        let (ids, damaged) = scan_all(torn);
        assert_eq!(ids, [1, 2]);
        assert!(damaged > 0);
    }

    /// The property test of the format: arbitrary bytes, and valid frames with arbitrary
    /// damage, never make the scanner or decoder panic or hang, and never yield a frame that
    /// was not written.
    #[test]
    fn arbitrary_bytes_never_panic_and_never_invent_frames() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for round in 0..3000 {
            let written = frames(1..1 + rng.u64(1..8));
            let mut bytes = written.clone();
            match round % 4 {
                0 => rng.fill(&mut bytes),
                1 => {
                    for _ in 0..rng.usize(1..20) {
                        let at = rng.usize(..bytes.len());
                        bytes[at] = rng.u8(..);
                    }
                }
                2 => bytes.truncate(rng.usize(..bytes.len())),
                _ => {
                    let at = rng.usize(..bytes.len());
                    let mut junk = vec![0; rng.usize(0..64)];
                    rng.fill(&mut junk);
                    junk.extend_from_slice(MAGIC);
                    bytes.splice(at..at, junk);
                }
            }
            let (intact, _) = scan_bodies(&written);
            let (found, _) = scan_bodies(&bytes);
            for frame in &found {
                assert!(
                    intact.contains(frame),
                    "round {round}: invented frame {}",
                    frame.0
                );
            }
            // Bodies that pass no CRC at all still never panic the decoder.
            let _ = decode(&bytes);
        }
    }
}
