//! Numbered traffic for loss tests: a publisher that sends `0, 1, 2, …` as payloads over a few
//! topics at a steady rate, and the check that every number reached Kafka, in order per topic.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::QoS;
use tokio::task::JoinHandle;

use crate::{KafkaReader, Publisher};

/// Topic of message `n`: numbers are spread over three topics, `prefix/0` to `prefix/2`.
pub fn topic_of(prefix: &str, n: u64) -> String {
    format!("{prefix}/{}", n % 3)
}

/// Publishes `count` numbered messages at about `rate` per second (0: flat out) on a task.
pub fn publish_numbered(
    publisher: Arc<Publisher>,
    prefix: &str,
    count: u64,
    rate: u64,
    qos: QoS,
) -> JoinHandle<()> {
    publish_numbered_over(publisher, prefix, 3, count, rate, qos)
}

/// [`publish_numbered`] over `spread` topics, `prefix/0` to `prefix/{spread - 1}`.
pub fn publish_numbered_over(
    publisher: Arc<Publisher>,
    prefix: &str,
    spread: u64,
    count: u64,
    rate: u64,
    qos: QoS,
) -> JoinHandle<()> {
    let prefix = prefix.to_owned();
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        for n in 0..count {
            publisher
                .publish(&format!("{prefix}/{}", n % spread), n.to_string(), qos)
                .await;
            if rate > 0 && n % 10 == 9 {
                // Keep to the rate on average: sleep until message n+1 is due.
                let due = started + Duration::from_secs_f64((n + 1) as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
            }
        }
    })
}

/// Connects a publisher and sends `count` numbered QoS 1 messages flat out; returns once all
/// are handed to it (see [`Publisher::wait_acked`] for the broker's acknowledgements).
pub async fn publish_all(port: u16, prefix: &str, count: u64) -> Arc<Publisher> {
    let publisher = Arc::new(Publisher::connect(port).await);
    publish_numbered(publisher.clone(), prefix, count, 0, QoS::AtLeastOnce)
        .await
        .expect("publisher");
    publisher
}

/// What a loss check found.
#[derive(Debug)]
pub struct Delivery {
    pub distinct: usize,
    pub duplicates: usize,
}

/// Reads the Kafka `topic` at `brokers` until every number below `count` arrived (failing the
/// test after `deadline` with the missing ones), then checks that per topic the last copies of
/// the numbers are in publish order. Duplicates are allowed; loss and reordering are not.
pub async fn expect_all_numbers(
    brokers: &str,
    topic: &str,
    count: u64,
    deadline: Duration,
) -> Delivery {
    let wanted: Vec<u64> = (0..count).collect();
    expect_numbers(KafkaReader::new(brokers, topic).await, &wanted, deadline).await
}

/// [`expect_all_numbers`] for the numbers `wanted`, read by `reader`.
pub async fn expect_numbers(
    mut reader: KafkaReader,
    wanted: &[u64],
    deadline: Duration,
) -> Delivery {
    let complete = reader
        .read_until(deadline, |received| {
            let seen = distinct_numbers(received);
            wanted.iter().all(|n| seen.contains(n))
        })
        .await;
    let seen = distinct_numbers(&reader.received);
    let count = wanted.len();
    if !complete {
        let missing: Vec<u64> = wanted
            .iter()
            .copied()
            .filter(|n| !seen.contains(n))
            .take(20)
            .collect();
        panic!(
            "{} of {count} numbers reached Kafka within {deadline:?}; first missing: {missing:?}; \
             (partition, last offset read, high watermark): {:?}",
            seen.len(),
            reader.positions()
        );
    }
    // Per topic, walk backwards keeping first sightings: the last copies, newest first.
    let mut last_copies: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut kept: HashSet<(&str, u64)> = HashSet::new();
    for record in reader.received.iter().rev() {
        let n = number(record);
        if kept.insert((record.mqtt_topic.as_str(), n)) {
            last_copies
                .entry(record.mqtt_topic.as_str())
                .or_default()
                .push(n);
        }
    }
    for (topic, newest_first) in &last_copies {
        if let Some(pair) = newest_first.windows(2).find(|w| w[0] < w[1]) {
            // Every copy of the topic's numbers, in the order Kafka holds them, around the
            // first number whose last copy came after a later number's.
            let copies: Vec<u64> = reader
                .received
                .iter()
                .filter(|r| r.mqtt_topic == *topic)
                .map(number)
                .collect();
            let at = copies.iter().rposition(|&n| n == pair[0]).unwrap_or(0);
            let window = &copies[at.saturating_sub(40)..(at + 40).min(copies.len())];
            panic!(
                "{topic}: last copies out of publish order: the last copy of {} comes after \
                 the last copy of {}; copies in Kafka's order around it: {window:?}",
                pair[0], pair[1]
            );
        }
    }
    Delivery {
        distinct: seen.len(),
        duplicates: reader.received.len() - seen.len(),
    }
}

fn number(record: &crate::kafka::Received) -> u64 {
    std::str::from_utf8(&record.payload)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a numbered payload: {:?}", record.payload))
}

/// The distinct numbers among received records.
pub fn distinct_numbers(received: &[crate::kafka::Received]) -> HashSet<u64> {
    received.iter().map(number).collect()
}
