//! Metrics of the Kafka task. Metric names live here and nowhere else.

use prometheus::{
    Counter, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, exponential_buckets,
};

/// Counters, gauges and histograms of the Kafka side, registered in the bridge's registry.
#[derive(Clone)]
pub struct KafkaMetrics {
    pub records_sent: IntCounter,
    pub batches_sent: IntCounter,
    /// 0 while Kafka accepts writes, 1 while it is failing (as Metamorphosis' `kafka_state`).
    pub state: IntGauge,
    errors: IntCounterVec,
    dropped: IntCounterVec,
    dead_lettered: IntCounterVec,
    /// MQTT receipt to Kafka acknowledgement, per record.
    pub latency: Histogram,
    /// Records per batch written.
    pub batch_records: Histogram,
    /// Seconds spent in the failing state.
    pub failing_seconds: Counter,
    pub spool: SpoolMetrics,
}

/// Metrics of the outage spool.
#[derive(Clone)]
pub struct SpoolMetrics {
    pub memory_records: IntGauge,
    pub memory_bytes: IntGauge,
    pub disk_records: IntGauge,
    pub disk_bytes: IntGauge,
    /// `SPOOL_MEMORY_BYTES` and `SPOOL_DISK_BYTES` (0 without a disk tier), for alerts on how
    /// full the spool is.
    pub memory_limit: IntGauge,
    pub disk_limit: IntGauge,
    /// 1 while the disk tier is usable.
    pub disk_available: IntGauge,
    pub spooled: IntCounter,
    pub drained: IntCounter,
    pub corrupt: IntCounter,
    pub fsync: Histogram,
}

/// `kind`s of `bridge_kafka_errors_total`.
const KAFKA_ERROR_KINDS: &[&str] = &[
    "delivery",
    "enqueue",
    "queue_full",
    "too_large",
    "topic_refused",
    "topic_invalid",
    "create_topic",
    "fatal",
];
/// `reason`s of `bridge_records_dropped_total`.
const DROP_REASONS: &[&str] = &[
    "too_large",
    "topic_refused",
    "topic_invalid",
    "dead_letter_failed",
    "spool_full_oldest",
    "spool_full_newest",
    "unmapped",
    mkb_bridge::route::SPARKPLUG_INVALID,
];
/// `reason`s of `bridge_records_dead_lettered_total`.
const DEAD_LETTER_REASONS: &[&str] = &[
    "too_large",
    "topic_refused",
    "topic_invalid",
    mkb_bridge::dead_letter::MQTT_TOO_LARGE,
    mkb_bridge::dead_letter::MQTT_INVALID_TOPIC,
    mkb_bridge::route::SPARKPLUG_INVALID,
];

impl KafkaMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let records_sent = IntCounter::new(
            "bridge_kafka_records_sent_total",
            "Records acknowledged by Kafka.",
        )?;
        let batches_sent = IntCounter::new(
            "bridge_kafka_batches_sent_total",
            "Batches wholly acknowledged by Kafka.",
        )?;
        let state = IntGauge::new(
            "bridge_kafka_state",
            "0 while Kafka accepts writes, 1 while it is failing.",
        )?;
        let errors = IntCounterVec::new(
            Opts::new("bridge_kafka_errors_total", "Kafka errors, by kind."),
            &["kind"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "bridge_records_dropped_total",
                "Records given up on and not written to Kafka, by reason.",
            ),
            &["reason"],
        )?;
        let dead_lettered = IntCounterVec::new(
            Opts::new(
                "bridge_records_dead_lettered_total",
                "Records given up on and written to the dead-letter topic instead, by reason.",
            ),
            &["reason"],
        )?;
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "bridge_end_to_end_latency_seconds",
                "Time from MQTT receipt to Kafka acknowledgement.",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 16)?),
        )?;
        let batch_records = Histogram::with_opts(
            HistogramOpts::new(
                "bridge_kafka_batch_records",
                "Records per batch written to Kafka.",
            )
            .buckets(exponential_buckets(1.0, 4.0, 8)?),
        )?;
        let spool_records = IntGaugeVec::new(
            Opts::new(
                "bridge_spool_records",
                "Records held while Kafka is failing, by tier.",
            ),
            &["tier"],
        )?;
        let spool_bytes = IntGaugeVec::new(
            Opts::new(
                "bridge_spool_bytes",
                "Bytes of records held while Kafka is failing, by tier.",
            ),
            &["tier"],
        )?;
        let spooled = IntCounter::new(
            "bridge_spool_records_spooled_total",
            "Records put in the spool because Kafka was failing.",
        )?;
        let drained = IntCounter::new(
            "bridge_spool_records_drained_total",
            "Spooled records delivered to Kafka.",
        )?;
        let corrupt = IntCounter::new(
            "bridge_spool_corrupt_entries_total",
            "Damaged spool entries or databases moved aside (never delivered automatically).",
        )?;
        let disk_available = IntGauge::new(
            "bridge_spool_disk_available",
            "1 while the disk tier of the spool is usable, 0 otherwise.",
        )?;
        let fsync = Histogram::with_opts(
            HistogramOpts::new(
                "bridge_spool_fsync_seconds",
                "Duration of disk spool fsyncs.",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 12)?),
        )?;
        let spool_limit = IntGaugeVec::new(
            Opts::new(
                "bridge_spool_limit_bytes",
                "How many bytes each tier of the spool may hold (SPOOL_MEMORY_BYTES, \
                 SPOOL_DISK_BYTES; 0 without a disk tier).",
            ),
            &["tier"],
        )?;
        let failing_seconds = Counter::new(
            "bridge_kafka_failing_seconds_total",
            "Seconds spent with Kafka failing.",
        )?;
        for collector in [
            Box::new(spool_records.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(spool_bytes.clone()),
            Box::new(spool_limit.clone()),
            Box::new(spooled.clone()),
            Box::new(drained.clone()),
            Box::new(corrupt.clone()),
            Box::new(disk_available.clone()),
            Box::new(fsync.clone()),
            Box::new(failing_seconds.clone()),
        ] {
            registry.register(collector)?;
        }
        // Every known label value from the start, at 0: an alert on `increase(…) > 0` then
        // fires on the first drop, and a dashboard shows zeros rather than nothing.
        for (vector, values) in [
            (&errors, KAFKA_ERROR_KINDS),
            (&dropped, DROP_REASONS),
            (&dead_lettered, DEAD_LETTER_REASONS),
        ] {
            for value in values {
                vector.with_label_values(&[value]);
            }
        }
        registry.register(Box::new(records_sent.clone()))?;
        registry.register(Box::new(batches_sent.clone()))?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(dead_lettered.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(batch_records.clone()))?;
        Ok(Self {
            records_sent,
            batches_sent,
            state,
            errors,
            dropped,
            dead_lettered,
            latency,
            batch_records,
            failing_seconds,
            spool: SpoolMetrics {
                memory_records: spool_records.with_label_values(&["memory"]),
                memory_bytes: spool_bytes.with_label_values(&["memory"]),
                disk_records: spool_records.with_label_values(&["disk"]),
                disk_bytes: spool_bytes.with_label_values(&["disk"]),
                memory_limit: spool_limit.with_label_values(&["memory"]),
                disk_limit: spool_limit.with_label_values(&["disk"]),
                disk_available,
                spooled,
                drained,
                corrupt,
                fsync,
            },
        })
    }

    pub(crate) fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    /// Records dropped for `reason` so far (unit tests).
    #[cfg(test)]
    pub(crate) fn dropped_count(&self, reason: &str) -> u64 {
        self.dropped.with_label_values(&[reason]).get()
    }

    /// Dead letters written for `reason` so far (unit tests).
    #[cfg(test)]
    pub(crate) fn dead_lettered_count(&self, reason: &str) -> u64 {
        self.dead_lettered.with_label_values(&[reason]).get()
    }

    pub(crate) fn dead_lettered(&self, reason: &str) {
        self.dead_lettered.with_label_values(&[reason]).inc();
    }

    pub(crate) fn dropped(&self, reason: &str, records: usize) {
        self.dropped
            .with_label_values(&[reason])
            .inc_by(records as u64);
    }
}
