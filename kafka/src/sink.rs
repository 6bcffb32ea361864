//! The Kafka producer task.
//!
//! Invariant: records leave in the order they arrived, and a record is forgotten only once Kafka
//! acknowledged it or it was dropped as final (too large, counted). While Kafka fails, the
//! undelivered records of the current batch are tried again every `retry_interval`, and the task
//! takes no new batch meanwhile: the bounded channels fill and the MQTT side slows down.
//!
//! Error kinds, decided per record:
//! - *final* — the record can never be written (larger than `message.max.bytes`): dropped and
//!   counted under `bridge_records_dropped_total{reason="too_large"}`; the rest goes on.
//! - *wait* — librdkafka's local queue is full: wait briefly and enqueue again.
//! - *down* — anything else (delivery timeout, broker unreachable, unknown topic): keep the
//!   record and enter the failing state.

use std::time::Duration;

use mkb_bridge::{Batch, Record, envelope};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::context::BridgeContext;
use crate::{KafkaConfig, KafkaError, KafkaMetrics};

/// The probe Metamorphosis writes at start-up; kept identical for existing dashboards.
const PROBE_TOPIC_FIELD: &str = "test";
const PROBE_CONTENT: &[u8] = b"Internal test to see if kafka is alive at startup";

/// How long to wait before enqueueing again when librdkafka's local queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// The Kafka side's state, as readiness needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaStatus {
    /// The latest write failed; records are held until Kafka answers.
    pub failing: bool,
    pub last_error: Option<String>,
    /// Nothing more can be held: new messages wait in the MQTT broker.
    pub full: bool,
}

/// The Kafka producer task; see the module documentation.
pub struct KafkaSink {
    config: KafkaConfig,
    metrics: KafkaMetrics,
    producer: FutureProducer<BridgeContext>,
    admin: AdminClient<BridgeContext>,
    /// Whether the bridge's topics are known to exist (or creation is left to the broker).
    topics_ready: bool,
    status: watch::Sender<KafkaStatus>,
}

impl KafkaSink {
    /// Builds the producer, creates missing topics and, when configured, runs the start-up probe.
    ///
    /// Without a probe topic an unreachable Kafka is not an error here: the bridge starts, and
    /// the records wait until Kafka answers.
    pub async fn connect(config: KafkaConfig, metrics: KafkaMetrics) -> Result<Self, KafkaError> {
        let client_config = config.client_config();
        let producer: FutureProducer<BridgeContext> = client_config
            .create_with_context(BridgeContext)
            .map_err(KafkaError::Client)?;
        let admin: AdminClient<BridgeContext> = client_config
            .create_with_context(BridgeContext)
            .map_err(KafkaError::Client)?;
        let mut sink = Self {
            topics_ready: !config.auto_create_topics,
            config,
            metrics,
            producer,
            admin,
            status: watch::Sender::new(KafkaStatus::default()),
        };
        if let Some(test_topic) = sink.config.test_topic.clone() {
            sink.create_topics().await?;
            sink.probe(&test_topic).await?;
        } else if let Err(e) = sink.create_topics().await {
            warn!(error = %e, "Kafka topics not ready yet; trying again before the first write.");
        }
        Ok(sink)
    }

    /// Follows the Kafka side's state.
    pub fn status(&self) -> watch::Receiver<KafkaStatus> {
        self.status.subscribe()
    }

    /// Writes every batch from `input` until it closes, and returns once all are delivered.
    pub async fn run(mut self, mut input: mpsc::Receiver<Batch>) {
        while let Some(batch) = input.recv().await {
            self.deliver(batch).await;
        }
        info!("Kafka task stopped: every batch handed to it was delivered.");
    }

    /// Delivers one batch, trying again every `retry_interval` until nothing of it is left.
    async fn deliver(&mut self, batch: Batch) {
        let mut pending = batch.records;
        self.metrics.batch_records.observe(pending.len() as f64);
        loop {
            if !self.topics_ready
                && let Err(e) = self.create_topics().await
            {
                self.metrics.error("create_topic");
                self.enter_failing(&e.to_string(), &pending);
                tokio::time::sleep(self.config.retry_interval).await;
                continue;
            }
            let failed = self.send(pending).await;
            let Some((reason, undelivered)) = failed else {
                self.metrics.batches_sent.inc();
                self.leave_failing();
                return;
            };
            self.enter_failing(&reason, &undelivered);
            tokio::time::sleep(self.config.retry_interval).await;
            pending = undelivered;
        }
    }

    /// Enqueues every record, then awaits every delivery report. Returns the first error and the
    /// records that were not delivered, in their original order, or `None` when all were.
    async fn send(&self, records: Vec<Record>) -> Option<(String, Vec<Record>)> {
        let mut reports: Vec<Option<DeliveryFuture>> = Vec::with_capacity(records.len());
        let mut first_error: Option<String> = None;
        for record in &records {
            reports.push(self.enqueue(record, &mut first_error).await);
        }
        let mut undelivered = Vec::new();
        for (record, report) in records.into_iter().zip(reports) {
            let outcome = match report {
                Some(report) => report.await,
                None => {
                    undelivered.push(record);
                    continue;
                }
            };
            match outcome {
                Ok(Ok(_)) => {
                    self.metrics.records_sent.inc();
                    self.metrics
                        .latency
                        .observe(record.received_at.elapsed().as_secs_f64());
                }
                Ok(Err((e, _))) if is_final(&e) => self.drop_too_large(&record, &e),
                Ok(Err((e, _))) => {
                    self.metrics.error("delivery");
                    first_error.get_or_insert_with(|| e.to_string());
                    undelivered.push(record);
                }
                Err(_canceled) => {
                    self.metrics.error("delivery");
                    first_error.get_or_insert_with(|| "producer shut down".to_owned());
                    undelivered.push(record);
                }
            }
        }
        first_error.map(|reason| (reason, undelivered))
    }

    /// Hands one record to librdkafka. `None` means it was not enqueued: either dropped as final
    /// (counted) or to be tried again (the reason is kept in `first_error`).
    async fn enqueue(
        &self,
        record: &Record,
        first_error: &mut Option<String>,
    ) -> Option<DeliveryFuture> {
        if first_error.is_some() {
            // Kafka is already failing for this batch; enqueueing more only reorders the rest.
            return None;
        }
        loop {
            let kafka_record = FutureRecord::to(&self.config.topic)
                .key(record.key.as_bytes())
                .payload(&record.value);
            match self.producer.send_result(kafka_record) {
                Ok(report) => return Some(report),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.metrics.error("queue_full");
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((e, _)) if is_final(&e) => {
                    self.drop_too_large(record, &e);
                    return None;
                }
                Err((e, _)) => {
                    self.metrics.error("enqueue");
                    *first_error = Some(e.to_string());
                    return None;
                }
            }
        }
    }

    fn drop_too_large(&self, record: &Record, error: &RdKafkaError) {
        self.metrics.error("too_large");
        self.metrics.dropped("too_large");
        error!(
            mqtt_topic = %record.key, bytes = record.value.len(), error = %error,
            "Record larger than Kafka accepts, dropped."
        );
    }

    /// Records the failing state. Until the spool exists, the held batch is all the bridge
    /// can hold, so it is also full: the MQTT side waits.
    fn enter_failing(&mut self, reason: &str, held: &[Record]) {
        self.metrics.state.set(1);
        self.metrics.memory_records.set(held.len() as i64);
        self.metrics
            .memory_bytes
            .set(held.iter().map(Record::size).sum::<usize>() as i64);
        self.status.send_replace(KafkaStatus {
            failing: true,
            last_error: Some(reason.to_owned()),
            full: true,
        });
        warn!(
            error = %reason, records = held.len(), retry_in = ?self.config.retry_interval,
            "Kafka delivery failed, holding records and retrying."
        );
    }

    fn leave_failing(&mut self) {
        if self.status.borrow().failing {
            self.metrics.state.set(0);
            self.metrics.memory_records.set(0);
            self.metrics.memory_bytes.set(0);
            self.status.send_replace(KafkaStatus::default());
            info!("Kafka accepts writes again.");
        }
    }

    /// Creates the bridge's topics (the main one and the probe's) unless they exist.
    async fn create_topics(&mut self) -> Result<(), KafkaError> {
        if !self.config.auto_create_topics {
            return Ok(());
        }
        let mut names = vec![self.config.topic.as_str()];
        names.extend(self.config.test_topic.as_deref());
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    self.config.topic_partitions,
                    TopicReplication::Fixed(self.config.topic_replication),
                )
            })
            .collect();
        let options = AdminOptions::new()
            .request_timeout(Some(self.config.startup_timeout))
            .operation_timeout(Some(self.config.startup_timeout));
        let results = self
            .admin
            .create_topics(&topics, &options)
            .await
            .map_err(|e| KafkaError::CreateTopic {
                topic: names.join(","),
                brokers: self.config.brokers.clone(),
                reason: match e {
                    RdKafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut) => {
                        format!("no answer within {:?}", self.config.startup_timeout)
                    }
                    _ => e.to_string(),
                },
            })?;
        for result in results {
            match result {
                Ok(topic) => info!(topic = %topic, "Created Kafka topic."),
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    debug!(topic = %topic, "Kafka topic exists.");
                }
                Err((topic, code)) => {
                    return Err(KafkaError::CreateTopic {
                        topic,
                        brokers: self.config.brokers.clone(),
                        reason: code.to_string(),
                    });
                }
            }
        }
        self.topics_ready = true;
        Ok(())
    }

    /// Writes Metamorphosis' start-up probe to `topic` and waits for Kafka's acknowledgement.
    async fn probe(&self, topic: &str) -> Result<(), KafkaError> {
        let mut value = Vec::new();
        envelope::encode(PROBE_TOPIC_FIELD, PROBE_CONTENT, &mut value);
        let failed = |reason: String| KafkaError::Probe {
            topic: topic.to_owned(),
            brokers: self.config.brokers.clone(),
            reason,
        };
        let report = self
            .producer
            .send_result(FutureRecord::<(), _>::to(topic).payload(&value))
            .map_err(|(e, _)| failed(e.to_string()))?;
        match tokio::time::timeout(self.config.startup_timeout, report).await {
            Ok(Ok(Ok(_))) => {
                info!(topic = %topic, "Kafka start-up probe acknowledged.");
                Ok(())
            }
            Ok(Ok(Err((e, _)))) => Err(failed(e.to_string())),
            Ok(Err(_canceled)) => Err(failed("producer shut down".to_owned())),
            Err(_elapsed) => Err(failed(format!(
                "not acknowledged within {:?}",
                self.config.startup_timeout
            ))),
        }
    }
}

/// Errors after which the record can never be written, however often it is tried.
fn is_final(error: &RdKafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}
