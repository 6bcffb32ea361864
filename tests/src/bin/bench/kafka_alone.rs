//! `--kafka-alone`: the Kafka half of the path without the bridge, for the latency runs.
//!
//! A producer with the bridge's delivery settings writes the same records (the envelope of the
//! same payloads, keyed by the MQTT topic) at the same pace as the MQTT publisher, and the same
//! consumer reads them back. What this run measures is what the bridge cannot take away from
//! `mkb-bench`'s latency: tansu writing and serving a record, and the consumer's fetch. The
//! producer's own figure, from the hand-over to Kafka's acknowledgement, is the counterpart of
//! the bridge's histogram (receipt to Kafka's acknowledgement) without the bridge.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mkb_tests::Tansu;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use tokio::time::Instant;

use crate::{Figures, Options, cpu, now_micros, payload, percentile, read_kafka, spawn_progress};

/// Keeps, for each record Kafka acknowledged, the time since it was handed to the producer.
#[derive(Default)]
struct Acks(Mutex<Vec<Duration>>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    /// The time the record was handed over, in microseconds since the epoch.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: usize) {
        if result.is_ok() {
            let waited = Duration::from_micros(now_micros().saturating_sub(sent as u64));
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(waited);
        }
    }
}

/// Writes `o.messages` records at `o.rate` straight into tansu and reads them back.
pub async fn run(o: &Options) -> Figures {
    let kafka = Tansu::start();
    let topic = format!("bench-{}", mkb_tests::unique());
    mkb_tests::kafka::create_topic(&kafka.brokers(), &topic, 1).await;
    let producer: ThreadedProducer<Acks> = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        // The bridge's own settings (`kafka/src/config.rs`).
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("compression.type", "none")
        .create_with_context(Acks::default())
        .expect("create the Kafka-alone producer");
    let progress = Arc::new(AtomicU64::new(0));
    let reporter = spawn_progress("Kafka alone", o.messages, progress.clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking({
        let brokers = kafka.brokers();
        let topics = vec![topic.clone()];
        let expected = o.messages;
        move || read_kafka(&brokers, &topics, expected, &progress, ready_tx, false)
    });
    let _ = ready_rx.await;
    let budget = cpu::Budget::start(&[
        ("tansu", kafka.pid()),
        ("mkb-bench (producer, Kafka reader)", std::process::id()),
    ]);
    let started = Instant::now();
    let mqtt_topic = "bench/0";
    let (mut body, mut value) = (Vec::new(), Vec::new());
    for n in 0..o.messages {
        body.clear();
        payload(n, o.size, &mut body);
        value.clear();
        mkb_bridge::envelope::encode(mqtt_topic, &body, &mut value);
        let mut record =
            BaseRecord::<str, [u8], usize>::with_opaque_to(&topic, now_micros() as usize)
                .key(mqtt_topic)
                .payload(&value);
        while let Err((error, returned)) = producer.send(record) {
            eprintln!("Kafka alone: {error}; trying again");
            record = returned;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The MQTT publisher's pace: ten at a time, then wait for the next ten's turn.
        if o.rate > 0 && n % 10 == 9 {
            let due = started + Duration::from_secs_f64((n + 1) as f64 / o.rate as f64);
            tokio::time::sleep_until(due).await;
        }
    }
    let latencies = reader.await.expect("reader");
    let seconds = started.elapsed().as_secs_f64();
    let budget = budget.report(latencies.len() as u64);
    reporter.abort();
    let _ = producer.flush(Duration::from_secs(10));
    let mut acks = std::mem::take(
        &mut *producer
            .context()
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    acks.sort_unstable();
    let ms = |p: f64| percentile(&acks, p).as_secs_f64() * 1000.0;
    let within = acks.partition_point(|d| *d <= Duration::from_millis(4));
    let own_figures = Some(format!(
        "p50 {:.1} ms, p99 {:.1} ms, {:.1} % within 4 ms ({} records)",
        ms(0.5),
        ms(0.99),
        100.0 * within as f64 / acks.len().max(1) as f64,
        acks.len()
    ));
    Figures {
        own_figures,
        ..Figures::without_bridge(seconds, latencies, budget)
    }
}
