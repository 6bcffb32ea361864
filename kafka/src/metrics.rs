//! Metrics of the Kafka task. Metric names live here and nowhere else.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    exponential_buckets,
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
    /// MQTT receipt to Kafka acknowledgement, per record.
    pub latency: Histogram,
    /// Records per batch written.
    pub batch_records: Histogram,
    /// Records and bytes held in memory, waiting for Kafka.
    pub memory_records: IntGauge,
    pub memory_bytes: IntGauge,
}

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
        registry.register(Box::new(spool_records.clone()))?;
        registry.register(Box::new(spool_bytes.clone()))?;
        registry.register(Box::new(records_sent.clone()))?;
        registry.register(Box::new(batches_sent.clone()))?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(batch_records.clone()))?;
        Ok(Self {
            records_sent,
            batches_sent,
            state,
            errors,
            dropped,
            latency,
            batch_records,
            memory_records: spool_records.with_label_values(&["memory"]),
            memory_bytes: spool_bytes.with_label_values(&["memory"]),
        })
    }

    pub(crate) fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    pub(crate) fn dropped(&self, reason: &str) {
        self.dropped.with_label_values(&[reason]).inc();
    }
}
