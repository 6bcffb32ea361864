//! `mkb-bench --sparkplug`: Sparkplug B NDATA payloads of 20 metrics carrying aliases only (as
//! edge nodes send them), after one NBIRTH per publisher naming them. The payload's `timestamp`
//! holds the publish time in microseconds (Sparkplug's are milliseconds; only the benchmark
//! reads it), so latency is measured as for the other loads.

use mkb_bridge::sparkplug::proto::{Metric, MetricValue, Payload};
use prost::Message as _;

/// Metrics per payload.
const METRICS: u64 = 20;

/// The NBIRTH of a publisher's node: each metric's name, alias and datatype (Double). No
/// timestamp, so the reader does not count it as a message of the load.
pub fn nbirth() -> Vec<u8> {
    Payload {
        seq: Some(0),
        metrics: (1..=METRICS)
            .map(|alias| Metric {
                name: Some(format!("line/sensor-{alias}")),
                alias: Some(alias),
                datatype: Some(10),
                value: Some(MetricValue::DoubleValue(0.0)),
                ..Metric::default()
            })
            .collect(),
        ..Payload::default()
    }
    .encode_to_vec()
}

/// NDATA number `seq`: 20 doubles by alias.
pub fn ndata(seq: u64, body: &mut Vec<u8>) {
    let payload = Payload {
        timestamp: Some(crate::now_micros()),
        seq: Some(seq % 256),
        metrics: (1..=METRICS)
            .map(|alias| Metric {
                alias: Some(alias),
                value: Some(MetricValue::DoubleValue(seq as f64 + alias as f64 / 10.0)),
                ..Metric::default()
            })
            .collect(),
        ..Payload::default()
    };
    payload.encode(body).expect("a Vec grows to any payload");
}

/// The publish time in a `sparkplug-json` value: its top-level `timestamp` (the last one: the
/// keys come sorted, and the metrics carry none).
pub fn sent_micros_json(value: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#""timestamp":"#;
    let at = value.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let digits = value[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&value[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// The publish time at the start of a protobuf payload (field 1, a varint), from the first
/// bytes of an envelope's content.
pub fn sent_micros_protobuf(head: &[u8]) -> Option<u64> {
    let (&tag, rest) = head.split_first()?;
    if tag != 0x08 {
        return None;
    }
    let mut value = 0u64;
    for (i, byte) in rest.iter().enumerate() {
        value |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}
