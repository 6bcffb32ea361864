//! The Kafka producer task: the only owner of the producer and of the spool.
//!
//! # States
//! - **Direct**: Kafka accepts writes and the spool is empty. Each batch is handed to librdkafka
//!   at once; up to [`MAX_IN_FLIGHT`] batches await their delivery reports, settled in order.
//! - **Failing**: a write failed. Every new batch goes to the spool, behind what is there;
//!   nothing overtakes it. Every `retry_interval` the oldest spooled chunk is tried.
//! - **Draining**: that try succeeded (or a spool was found at start-up). Chunks of up to
//!   `max_batch_size` records go out in order, several in flight; new batches still go to the
//!   spool. Once it is empty the task is back to Direct.
//!
//! # Order and duplicates
//! When a unit in flight fails, everything from its first failed record on — including records
//! of later units that Kafka may still deliver — goes to the spool and is sent again later.
//! Kafka may then hold a record twice, but the last copy of every record comes after the last
//! copy of every record before it: per MQTT topic (one topic, one partition) order holds.
//!
//! # Error kinds, per record
//! - *final*: larger than Kafka accepts. Dropped and counted (`too_large`); the rest goes on.
//! - *wait*: librdkafka's local queue is full. Wait briefly, enqueue again.
//! - *down*: anything else (delivery timeout, broker unreachable, unknown topic). Failing state.
//!
//! # Acknowledgements
//! A message is *done* once Kafka acknowledged it, it is fsynced in the disk spool, or it was
//! given up on and counted; the task reports that through its [`AckHandle`] in receipt order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use mkb_bridge::{AckHandle, Batch, Record, envelope};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, error, info, warn};

use crate::context::BridgeContext;
use crate::delivery::{Failure, Reports, Ticket};
use crate::spool::{self, Pushed, Spool};
use crate::{KafkaConfig, KafkaError, KafkaMetrics};

/// The probe Metamorphosis writes at start-up; kept identical for existing dashboards.
const PROBE_TOPIC_FIELD: &str = "test";
const PROBE_CONTENT: &[u8] = b"Internal test to see if kafka is alive at startup";

/// Units (batches or spool chunks) awaiting delivery reports at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// Spool chunks (of up to `max_batch_size` records) awaiting delivery reports at once while
/// draining: two keep Kafka busy, and each one in flight is held in memory twice (here and in
/// librdkafka's copy).
const MAX_CHUNKS_IN_FLIGHT: usize = 2;
/// How long to wait before enqueueing again when librdkafka's local queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);
/// Batches taken from the input in one go while spooling, then fsynced together.
const GROUP_COMMIT_BATCHES: usize = 64;
/// At most one log line per this interval about dropped records.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The Kafka side's state, as readiness needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaStatus {
    /// The latest write failed; records go to the spool.
    pub failing: bool,
    pub last_error: Option<String>,
    /// Nothing more can be held: new messages wait in the MQTT broker (or are dropped, as the
    /// full policy says).
    pub full: bool,
    /// Why the disk spool cannot be written, while it cannot.
    pub spool_error: Option<String>,
}

enum State {
    Direct,
    Failing { retry_at: Instant },
    Draining { cursor: u64, probing: bool },
}

/// Where the records of a unit in flight came from.
enum Origin {
    Direct,
    Spool { last_id: u64 },
}

/// A batch or spool chunk awaiting its delivery reports.
struct InFlight {
    origin: Origin,
    records: Vec<Record>,
    reports: Arc<Reports>,
    /// Every report is in and counted.
    settled: bool,
    /// The first record not delivered (it and everything after it is tried again) and why.
    failure: Option<(usize, Failure)>,
}

impl InFlight {
    /// Waits for every delivery report, then counts the outcome. Cancel-safe.
    async fn settle(&mut self, metrics: &KafkaMetrics) {
        if !self.settled {
            self.reports.wait().await;
            self.conclude(metrics);
        }
    }

    /// Counts what was delivered and what was dropped as too large, and finds the first record
    /// that has to be tried again. Called once every report is in.
    fn conclude(&mut self, metrics: &KafkaMetrics) {
        self.settled = true;
        let mut end = self.records.len();
        let mut dropped = Vec::new();
        for (index, failure) in self.reports.take_failures() {
            if failure.is_final() {
                drop_too_large(metrics, &self.records[index], &failure);
                dropped.push(index);
            } else {
                metrics.error("delivery");
                end = index;
                self.failure = Some((index, failure));
                break;
            }
        }
        metrics.records_sent.inc_by((end - dropped.len()) as u64);
        if matches!(self.origin, Origin::Direct) {
            let now = Instant::now();
            // Observed locally, then added to the shared histogram once for the whole unit.
            let latencies = metrics.latency.local();
            for (index, record) in self.records[..end].iter().enumerate() {
                if dropped.binary_search(&index).is_err() {
                    let latency = now.saturating_duration_since(record.received_at);
                    latencies.observe(latency.as_secs_f64());
                }
            }
            latencies.flush();
        }
    }

    fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.seq)
    }

    /// The records not known to be in Kafka: all of them while reports are missing, otherwise
    /// those from the first failed one on.
    fn undelivered(mut self, metrics: &KafkaMetrics) -> Vec<Record> {
        if !self.settled && self.reports.all_in() {
            self.conclude(metrics);
        }
        if !self.settled {
            return self.records;
        }
        let from = self
            .failure
            .as_ref()
            .map_or(self.records.len(), |(i, _)| *i);
        self.records.split_off(from)
    }
}

/// The Kafka producer task; see the module documentation.
pub struct KafkaSink {
    config: KafkaConfig,
    metrics: KafkaMetrics,
    producer: ThreadedProducer<BridgeContext>,
    admin: AdminClient<BridgeContext>,
    /// Whether the bridge's topics are known to exist (or creation is left to the broker).
    topics_ready: bool,
    status: watch::Sender<KafkaStatus>,
    acks: AckHandle,
    spool: Spool,
    state: State,
    in_flight: VecDeque<InFlight>,
    /// A batch that arrived while the spool was full under the `block` policy.
    held: Option<Batch>,
    /// Highest receipt number spooled but not yet reported done (waits for the fsync).
    spooled_through: u64,
    /// When Kafka started failing, for `bridge_kafka_failing_seconds_total`.
    failing_since: Option<Instant>,
    /// Records dropped by the full policy since the last log line, and when that was.
    drops_unlogged: usize,
    drop_logged_at: Option<Instant>,
    /// Records in the latest batch and bytes of their keys and values, to judge whether the
    /// spool can take another.
    typical_batch: (usize, usize),
}

impl KafkaSink {
    /// Builds the producer, opens the spool, creates missing topics and, when configured,
    /// runs the start-up probe.
    ///
    /// Without a probe topic an unreachable Kafka is not an error here: the bridge starts, and
    /// the records wait in the spool until Kafka answers.
    pub async fn connect(
        config: KafkaConfig,
        metrics: KafkaMetrics,
        acks: AckHandle,
    ) -> Result<Self, KafkaError> {
        let client_config = config.client_config();
        let producer: ThreadedProducer<BridgeContext> = client_config
            .create_with_context(BridgeContext)
            .map_err(KafkaError::Client)?;
        let admin: AdminClient<BridgeContext> = client_config
            .create_with_context(BridgeContext)
            .map_err(KafkaError::Client)?;
        let spool = Spool::open(config.spool.clone(), metrics.spool.clone()).await?;
        let state = if spool.is_empty() {
            State::Direct
        } else {
            State::Draining {
                cursor: 0,
                probing: true,
            }
        };
        let mut sink = Self {
            topics_ready: !config.auto_create_topics,
            config,
            metrics,
            producer,
            admin,
            status: watch::Sender::new(KafkaStatus::default()),
            acks,
            spool,
            state,
            in_flight: VecDeque::new(),
            held: None,
            spooled_through: 0,
            failing_since: None,
            drops_unlogged: 0,
            drop_logged_at: None,
            typical_batch: (0, 0),
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

    /// Writes every batch from `input` until it closes, then settles what is in flight and
    /// saves whatever Kafka has not confirmed to the disk spool.
    pub async fn run(mut self, mut input: mpsc::Receiver<Batch>) {
        loop {
            self.top_up().await;
            let accepting = self.held.is_none()
                && match self.state {
                    State::Direct => self.in_flight.len() < MAX_IN_FLIGHT,
                    State::Failing { .. } | State::Draining { .. } => true,
                };
            let retry_at = match self.state {
                State::Failing { retry_at } if self.in_flight.is_empty() => Some(retry_at),
                _ => None,
            };
            let disk_retry_at = self.spool.disk_retry_at();
            enum Event {
                Settled,
                Batch(Option<Batch>),
                Retry,
                DiskRetry,
            }
            let event = {
                let head = self.in_flight.front_mut();
                let has_head = head.is_some();
                let metrics = &self.metrics;
                tokio::select! {
                    biased;
                    () = async { if let Some(head) = head { head.settle(metrics).await } },
                        if has_head => Event::Settled,
                    batch = input.recv(), if accepting => Event::Batch(batch),
                    () = sleep_until(retry_at.unwrap_or_else(Instant::now)),
                        if retry_at.is_some() => Event::Retry,
                    () = sleep_until(disk_retry_at.unwrap_or_else(Instant::now)),
                        if disk_retry_at.is_some() => Event::DiskRetry,
                }
            };
            match event {
                Event::Settled => self.on_settled().await,
                Event::Batch(Some(batch)) => self.accept(batch, &mut input).await,
                Event::Batch(None) => break,
                Event::Retry => {
                    self.add_failing_time();
                    self.state = State::Draining {
                        cursor: 0,
                        probing: true,
                    };
                }
                Event::DiskRetry => {
                    self.flush_spool().await;
                    self.unhold().await;
                }
            }
        }
        self.shutdown().await;
    }

    /// A batch from the batcher: straight to Kafka, or behind the spool.
    async fn accept(&mut self, batch: Batch, input: &mut mpsc::Receiver<Batch>) {
        self.metrics.batch_records.observe(batch.len() as f64);
        self.typical_batch = spool::sizes(&batch.records);
        if matches!(self.state, State::Direct) {
            if self.ensure_topics().await {
                let unit = self.send(Origin::Direct, batch.records).await;
                self.in_flight.push_back(unit);
            } else {
                // Failing, like any write Kafka did not take: later batches go behind this one
                // and the spool drains once the topics can be created.
                let failure = Failure::other("Kafka topics cannot be created");
                self.enter_failing(&failure, batch.len());
                self.spool_records(batch.records);
                self.flush_spool().await;
            }
            return;
        }
        // Spooling: take what else is waiting, then fsync once for all of it.
        let mut next = Some(batch);
        let mut taken = 0;
        while let Some(batch) = next.take() {
            if !self.spool_records(batch.records) {
                break;
            }
            taken += 1;
            if taken < GROUP_COMMIT_BATCHES {
                next = input.try_recv().ok();
                if let Some(batch) = &next {
                    self.metrics.batch_records.observe(batch.len() as f64);
                }
            }
        }
        self.flush_spool().await;
    }

    /// Hands records to librdkafka. After the first record that cannot be enqueued, the rest are
    /// not tried, so nothing behind a failure overtakes it.
    async fn send(&self, origin: Origin, records: Vec<Record>) -> InFlight {
        let reports = Reports::new();
        for (index, record) in records.iter().enumerate() {
            let key = Some(record.key.as_bytes());
            let sent = self
                .enqueue(
                    &self.config.topic,
                    key,
                    &record.value,
                    reports.ticket(index),
                )
                .await;
            if let Err(failure) = sent
                && !failure.is_final()
            {
                self.metrics.error("enqueue");
                break;
            }
        }
        InFlight {
            origin,
            records,
            reports,
            settled: false,
            failure: None,
        }
    }

    /// Hands one record to librdkafka, waiting while its queue is full. When librdkafka refuses
    /// the record, its ticket is settled with the reason, which is also returned.
    async fn enqueue(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        ticket: Box<Ticket>,
    ) -> Result<(), Failure> {
        let mut record = BaseRecord::with_opaque_to(topic, ticket).payload(value);
        record.key = key;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    self.metrics.error("queue_full");
                    record = returned;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((error, returned)) => {
                    let failure = Failure::of(&error);
                    returned.delivery_opaque.settle(Err(failure.clone()));
                    return Err(failure);
                }
            }
        }
    }

    /// The oldest unit in flight has settled (or failed).
    async fn on_settled(&mut self) {
        let unit = self.in_flight.pop_front().expect("a unit settled");
        let Some((_, reason)) = unit.failure.clone() else {
            self.metrics.batches_sent.inc();
            match unit.origin {
                Origin::Direct => self.acks.done_through(unit.last_seq()),
                Origin::Spool { last_id } => {
                    self.spool.remove_through(last_id).await;
                    // Records held in memory only (the disk failed) are now in Kafka.
                    if self.spool.all_durable() {
                        self.acks.done_through(self.spooled_through);
                    }
                    if let State::Draining { probing, .. } = &mut self.state
                        && *probing
                    {
                        *probing = false;
                        self.kafka_back();
                    }
                    self.unhold().await;
                }
            }
            return;
        };
        match unit.origin {
            Origin::Direct => {
                // Everything from the failure on, and every later batch, goes to the spool in
                // order (the spool is empty in the direct state).
                let mut records = unit.undelivered(&self.metrics);
                for later in std::mem::take(&mut self.in_flight) {
                    records.extend(later.records);
                }
                self.enter_failing(&reason, records.len());
                self.spool_records(records);
                self.flush_spool().await;
            }
            Origin::Spool { .. } => {
                // The chunks stay in the spool; later chunks in flight are abandoned.
                self.in_flight.clear();
                self.enter_failing(&reason, self.spool.records());
            }
        }
    }

    /// While draining: keeps up to [`MAX_CHUNKS_IN_FLIGHT`] chunks out (one while probing), and
    /// returns to the direct state once the spool is empty.
    async fn top_up(&mut self) {
        let State::Draining { cursor, probing } = self.state else {
            return;
        };
        let limit = if probing { 1 } else { MAX_CHUNKS_IN_FLIGHT };
        let mut cursor = cursor;
        while self.in_flight.len() < limit {
            let chunk = self
                .spool
                .read_after(cursor, self.config.max_batch_size)
                .await;
            let Some(last_id) = chunk.last().map(|e| e.id) else {
                if self.in_flight.is_empty() && !self.spool.is_empty() {
                    // Nothing could be read of a spool that is not empty: the disk failed.
                    let why = self.spool.disk_error().unwrap_or("cannot read").to_owned();
                    let failure = Failure::other(&format!("disk spool cannot be read: {why}"));
                    self.enter_failing(&failure, self.spool.records());
                    return;
                }
                break;
            };
            if !self.ensure_topics().await {
                let failure = Failure::other("Kafka topics cannot be created");
                self.enter_failing(&failure, self.spool.records());
                return;
            }
            let records: Vec<Record> = chunk.into_iter().flat_map(|e| e.records).collect();
            let unit = self.send(Origin::Spool { last_id }, records).await;
            self.in_flight.push_back(unit);
            cursor = last_id;
        }
        if let State::Draining { cursor: c, .. } = &mut self.state {
            *c = cursor;
        }
        if self.in_flight.is_empty() && self.spool.is_empty() && self.held.is_none() {
            info!("Spool drained; writing to Kafka directly again.");
            self.kafka_back();
            self.state = State::Direct;
        }
        self.update_status();
    }

    /// Puts records behind the spool. Returns `false` when they are held back (spool full,
    /// policy `block`): the task then takes nothing more until there is room.
    fn spool_records(&mut self, records: Vec<Record>) -> bool {
        let Some(last_seq) = records.last().map(|r| r.seq) else {
            return true;
        };
        match self.spool.push(records) {
            Pushed::Held(records) => {
                self.held = Some(Batch { records });
                self.update_status();
                return false;
            }
            Pushed::Taken {
                dropped_oldest,
                dropped_newest,
            } => {
                self.count_drop("spool_full_oldest", dropped_oldest);
                self.count_drop("spool_full_newest", dropped_newest);
            }
        }
        // Spooled or dropped, they are done; reported once what precedes them is durable.
        self.spooled_through = self.spooled_through.max(last_seq);
        self.update_status();
        true
    }

    /// Moves a held batch into the spool once there is room.
    async fn unhold(&mut self) {
        if let Some(batch) = self.held.take()
            && self.spool_records(batch.records)
        {
            self.flush_spool().await;
        }
    }

    /// Fsyncs the spool, then reports the spooled messages done — unless some are in memory
    /// only while acknowledgements depend on the disk.
    async fn flush_spool(&mut self) {
        let durable = self.spool.flush().await;
        if durable || !self.config.spool.persist_all {
            self.acks.done_through(self.spooled_through);
        }
        self.update_status();
    }

    fn count_drop(&mut self, reason: &str, records: usize) {
        if records == 0 {
            return;
        }
        self.metrics.dropped(reason, records);
        self.drops_unlogged += records;
        let now = Instant::now();
        if self
            .drop_logged_at
            .is_none_or(|at| now.duration_since(at) >= DROP_LOG_INTERVAL)
        {
            error!(
                records = self.drops_unlogged, reason,
                policy = ?self.config.spool.full_policy,
                "Spool full: records dropped (counted in bridge_records_dropped_total)."
            );
            self.drops_unlogged = 0;
            self.drop_logged_at = Some(now);
        }
    }

    fn enter_failing(&mut self, failure: &Failure, records: usize) {
        self.replace_producer(failure);
        let reason = failure.text.as_str();
        self.failing_since.get_or_insert_with(Instant::now);
        self.state = State::Failing {
            retry_at: Instant::now() + self.config.retry_interval,
        };
        self.metrics.state.set(1);
        self.status.send_modify(|s| {
            s.failing = true;
            s.last_error = Some(reason.to_owned());
        });
        self.update_status();
        warn!(
            error = %reason, spooled_records = records, retry_in = ?self.config.retry_interval,
            "Kafka delivery failed; spooling and retrying."
        );
    }

    /// Replaces the producer after a failed write. Its queued records are in the spool, and
    /// keeping it would let librdkafka's idempotent producer bump its epoch locally for the
    /// timed-out records (KIP-360): some Kafka-protocol brokers (tansu among them) fence it
    /// for that, and a fatal error would stop it for good anyway. A fresh producer gets a new
    /// producer id from the broker; duplicates of records the old one still delivers are
    /// possible, loss is not.
    fn replace_producer(&mut self, failure: &Failure) {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            self.metrics.error("fatal");
            warn!(code = ?code, reason = %reason, "Kafka producer hit a fatal error.");
        } else if failure.breaks_the_producer() {
            self.metrics.error("fatal");
        }
        match self
            .config
            .client_config()
            .create_with_context(BridgeContext)
        {
            Ok(producer) => {
                let old = std::mem::replace(&mut self.producer, producer);
                // Destroying a librdkafka client waits for its threads: not on this one.
                tokio::task::spawn_blocking(move || drop(old));
                debug!("Kafka producer replaced after a failed write.");
            }
            Err(e) => {
                error!(error = %e, "A new Kafka producer cannot be built; keeping the old one.")
            }
        }
    }

    /// Kafka took a write after failing.
    fn kafka_back(&mut self) {
        if self.failing_since.is_some() {
            self.add_failing_time();
            self.failing_since = None;
            info!(
                spooled_records = self.spool.records(),
                "Kafka accepts writes again; draining."
            );
        }
        self.metrics.state.set(0);
        self.status.send_modify(|s| {
            s.failing = false;
            s.last_error = None;
        });
    }

    fn add_failing_time(&mut self) {
        if let Some(since) = self.failing_since {
            let now = Instant::now();
            self.metrics
                .failing_seconds
                .inc_by(now.duration_since(since).as_secs_f64());
            self.failing_since = Some(now);
        }
    }

    fn update_status(&self) {
        let full = self.held.is_some()
            || !self
                .spool
                .has_room_for(self.typical_batch.0.max(1), self.typical_batch.1);
        let spool_error = self.spool.disk_error();
        self.status.send_if_modified(|s| {
            let changed = s.full != full || s.spool_error.as_deref() != spool_error;
            s.full = full;
            s.spool_error = spool_error.map(str::to_owned);
            changed
        });
    }

    /// Input closed: settle what is in flight within the grace period, then save everything
    /// Kafka has not confirmed to disk.
    async fn shutdown(mut self) {
        let deadline = Instant::now() + self.config.shutdown_grace;
        let mut unconfirmed: Vec<Record> = Vec::new();
        while let Some(head) = self.in_flight.front_mut() {
            let settled = tokio::time::timeout_at(deadline, head.settle(&self.metrics)).await;
            if settled.is_err() {
                break;
            }
            let unit = self.in_flight.pop_front().expect("head exists");
            match (&unit.origin, unit.failure.is_some()) {
                (Origin::Direct, false) => self.acks.done_through(unit.last_seq()),
                (Origin::Spool { last_id }, false) => self.spool.remove_through(*last_id).await,
                (Origin::Direct, true) => {
                    unconfirmed.extend(unit.undelivered(&self.metrics));
                    break;
                }
                (Origin::Spool { .. }, true) => break,
            }
        }
        for unit in std::mem::take(&mut self.in_flight) {
            if matches!(unit.origin, Origin::Direct) {
                unconfirmed.extend(unit.undelivered(&self.metrics));
            }
        }
        if let Some(held) = self.held.take() {
            unconfirmed.extend(held.records);
        }
        if !unconfirmed.is_empty() {
            let count = unconfirmed.len();
            self.spool.push_unbounded(unconfirmed);
            debug!(records = count, "Unconfirmed records spooled at shutdown.");
        }
        let lost = self.spool.persist_memory().await;
        let saved = self.spool.records();
        if lost > 0 && self.config.spool.persist_all {
            warn!(
                records = lost,
                "No usable disk spool: records held in memory were never acknowledged; the MQTT \
                 broker sends them again."
            );
        } else if lost > 0 {
            error!(
                records = lost,
                "No usable disk spool: records held in memory are lost."
            );
        } else if saved > 0 {
            warn!(
                records = saved,
                "Kafka task stopped; undelivered records are in the disk spool for the next start."
            );
        } else {
            info!("Kafka task stopped: everything was delivered.");
        }
        self.add_failing_time();
    }

    /// Creates missing topics before a write, once; `false` while that fails.
    async fn ensure_topics(&mut self) -> bool {
        if self.topics_ready {
            return true;
        }
        match self.create_topics().await {
            Ok(()) => true,
            Err(e) => {
                self.metrics.error("create_topic");
                warn!(error = %e, "Kafka topics cannot be created yet.");
                false
            }
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
        let reports = Reports::new();
        self.enqueue(topic, None, &value, reports.ticket(0))
            .await
            .map_err(|f| failed(f.text))?;
        if tokio::time::timeout(self.config.startup_timeout, reports.wait())
            .await
            .is_err()
        {
            return Err(failed(format!(
                "not acknowledged within {:?}",
                self.config.startup_timeout
            )));
        }
        match reports.take_failures().into_iter().next() {
            None => {
                info!(topic = %topic, "Kafka start-up probe acknowledged.");
                Ok(())
            }
            Some((_, failure)) => Err(failed(failure.text)),
        }
    }
}

fn drop_too_large(metrics: &KafkaMetrics, record: &Record, failure: &Failure) {
    metrics.error("too_large");
    metrics.dropped("too_large", 1);
    error!(
        mqtt_topic = %record.key, bytes = record.value.len(), error = %failure.text,
        "Record larger than Kafka accepts, dropped."
    );
}
