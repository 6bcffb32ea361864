//! The Kafka producer task: the only owner of the producer and of the spool.
//!
//! # States
//! One [`State`], changed only by [`KafkaSink::set_state`], which also derives the
//! `bridge_kafka_state` gauge, the readiness status and the failing-time counter from it:
//! - **Direct**: Kafka accepts writes and the spool is empty. Each batch is handed to the
//!   producer at once; up to [`MAX_IN_FLIGHT`] batches await their delivery reports, settled in
//!   order.
//! - **Failing** `{ outage, retry_at }`: a write failed. Every new batch goes to the spool,
//!   behind what is there; nothing overtakes it. At `retry_at` the oldest spooled chunk is tried.
//! - **Draining** `{ cursor, probing, outage }`: the retry is under way (or a spool was found at
//!   start-up). While `probing`, one chunk is out; once it is delivered the outage (if any) is
//!   over and chunks of up to `max_batch_size` records go out in order, several in flight. New
//!   batches still go to the spool. Once it is empty the task is back to Direct.
//!
//! # Order and duplicates
//! When a unit in flight fails, everything from its first failed record on — including records
//! of later units that Kafka may still deliver — goes to the spool and is sent again later.
//! Kafka may then hold a record twice, but the last copy of every record comes after the last
//! copy of every record before it: per MQTT topic (one topic, one partition) order holds.
//!
//! # Error kinds, per record
//! - *final*: larger than Kafka accepts, or its topic refused (an ACL) or invalid. Given up on:
//!   written to the dead-letter topic when one is set (see [`crate::dead_letter`]), otherwise
//!   dropped and counted; the rest goes on. A unit's dead letters are written once the unit has
//!   settled, as a unit of their own in its place: its messages are done once they are.
//! - *wait*: librdkafka's local queue is full. Wait briefly, enqueue again.
//! - *down*: anything else (delivery timeout, broker unreachable, unknown topic). Failing state.
//!
//! # Acknowledgements
//! A message is *done* once Kafka acknowledged it, it is fsynced in the disk spool, or it was
//! given up on and counted; the task reports that through its [`AckHandle`] in receipt order.
//! Spooled messages are acknowledged at the fsync, not when their chunk is later delivered:
//! the disk holds them from then on, and waiting for Kafka would keep the broker's in-flight
//! window full for the whole outage, so the broker would stop sending and the bridge could not
//! spool anything more. Records that the spool holds in memory only (no usable disk) are the
//! exception: those are acknowledged once Kafka has them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use mkb_bridge::{AckHandle, Batch, KafkaIdle, Record, Topic};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, error, info, warn};

use crate::dead_letter;
use crate::delivery::{Failure, GiveUp, Reports};
use crate::producer::{self, Connector, Produce};
use crate::spool::{self, Pushed, Spool};
use crate::startup::Topics;
use crate::{KafkaConfig, KafkaMetrics};

/// Units (batches or spool chunks) awaiting delivery reports at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// Spool chunks (of up to `max_batch_size` records) awaiting delivery reports at once while
/// draining: two keep Kafka busy, and each one in flight is held in memory twice (here and in
/// librdkafka's copy).
const MAX_CHUNKS_IN_FLIGHT: usize = 2;
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

/// The task's state; see the module documentation.
enum State {
    Direct,
    Failing {
        outage: Outage,
        retry_at: Instant,
    },
    Draining {
        /// The id of the last spool entry sent.
        cursor: u64,
        /// One chunk at a time until one is delivered.
        probing: bool,
        /// Set while Kafka has not taken a write since it failed.
        outage: Option<Outage>,
    },
}

/// Kafka failing: since when, the latest reason, and up to when the failing time is counted.
#[derive(Clone, Debug)]
struct Outage {
    since: Instant,
    counted_until: Instant,
    error: String,
}

impl State {
    fn outage(&self) -> Option<&Outage> {
        match self {
            Self::Direct => None,
            Self::Failing { outage, .. } => Some(outage),
            Self::Draining { outage, .. } => outage.as_ref(),
        }
    }

    fn outage_mut(&mut self) -> Option<&mut Outage> {
        match self {
            Self::Direct => None,
            Self::Failing { outage, .. } => Some(outage),
            Self::Draining { outage, .. } => outage.as_mut(),
        }
    }
}

/// Where the records of a unit in flight came from.
#[derive(Clone, Copy)]
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
    /// Dead letters of the records before the first failure that were given up on, to be
    /// written before the unit is done.
    dead_letters: Vec<Record>,
}

/// What a unit needs to know to settle: where records without a topic of their own go, and
/// where dead letters go.
#[derive(Clone, Copy)]
struct Destinations<'a> {
    default: Option<&'a str>,
    dead_letters: Option<&'a str>,
}

impl<'a> Destinations<'a> {
    fn of(config: &'a KafkaConfig) -> Self {
        Self {
            default: config.topic.as_deref(),
            dead_letters: config.dead_letter_topic.as_deref(),
        }
    }

    /// The Kafka topic of `record`; `None` when it is unmapped (written nowhere).
    fn topic(self, record: &'a Record) -> Option<&'a str> {
        match &record.topic {
            Topic::Default => self.default,
            Topic::Named(name) => Some(name),
            Topic::Unmapped | Topic::Dropped(_) => None,
        }
    }
}

impl InFlight {
    /// Waits for every delivery report, then counts the outcome. Cancel-safe.
    async fn settle(&mut self, metrics: &KafkaMetrics, to: Destinations<'_>) {
        if !self.settled {
            self.reports.wait().await;
            self.conclude(metrics, to);
        }
    }

    /// Counts what was delivered and what was given up on, makes the dead letters, and finds
    /// the first record that has to be tried again. Called once every report is in.
    fn conclude(&mut self, metrics: &KafkaMetrics, to: Destinations<'_>) {
        self.settled = true;
        let last_seq = self.last_seq();
        let mut end = self.records.len();
        let mut given_up = Vec::new();
        for (index, failure) in self.reports.take_failures() {
            let Some(reason) = failure.final_reason() else {
                metrics.error("delivery");
                end = index;
                self.failure = Some((index, failure));
                break;
            };
            let record = &self.records[index];
            let topic = to.topic(record).unwrap_or_default();
            match to.dead_letters {
                // Written after the unit's other records: once it is, the unit is done.
                Some(dlq) if dead_letter::reason_of(record).is_none() => self.dead_letters.push(
                    dead_letter::letter(last_seq, record, topic, dlq, reason, &failure),
                ),
                _ => give_up(metrics, record, topic, reason, &failure),
            }
            given_up.push(index);
        }
        let now = Instant::now();
        let direct = matches!(self.origin, Origin::Direct);
        // Observed locally, then added to the shared histogram once for the whole unit.
        let latencies = metrics.latency.local();
        let mut sent = 0;
        for (index, record) in self.records[..end].iter().enumerate() {
            if given_up.binary_search(&index).is_ok() {
                continue;
            }
            if to.topic(record).is_none() {
                metrics.dropped(record.topic.drop_reason().unwrap_or("unmapped"), 1);
                continue;
            }
            match dead_letter::reason_of(record) {
                Some(reason) => metrics.dead_lettered(reason),
                None => sent += 1,
            }
            if direct {
                let latency = now.saturating_duration_since(record.received_at);
                latencies.observe(latency.as_secs_f64());
            }
        }
        latencies.flush();
        metrics.records_sent.inc_by(sent);
    }

    fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.seq)
    }

    /// The records not known to be in Kafka: all of them while reports are missing, otherwise
    /// the dead letters still to write and the records from the first failed one on.
    fn undelivered(mut self, metrics: &KafkaMetrics, to: Destinations<'_>) -> Vec<Record> {
        if !self.settled && self.reports.all_in() {
            self.conclude(metrics, to);
        }
        if !self.settled {
            return self.records;
        }
        let from = self
            .failure
            .as_ref()
            .map_or(self.records.len(), |(i, _)| *i);
        let mut undelivered = self.dead_letters;
        undelivered.extend(self.records.drain(from..));
        undelivered
    }
}

/// The Kafka producer task; see the module documentation.
pub struct KafkaSink {
    config: KafkaConfig,
    metrics: KafkaMetrics,
    producer: Box<dyn Produce>,
    /// Builds a fresh producer after a failed write.
    connector: Connector,
    /// Creates missing topics before writes; `None` when creation is left to the broker.
    topics: Option<Topics>,
    status: watch::Sender<KafkaStatus>,
    acks: AckHandle,
    spool: Spool,
    state: State,
    in_flight: VecDeque<InFlight>,
    /// A batch that arrived while the spool was full under the `block` policy.
    held: Option<Batch>,
    /// Highest receipt number spooled but not yet reported done (waits for the fsync).
    spooled_through: u64,
    /// Records dropped by the full policy since the last log line, and when that was.
    drops_unlogged: usize,
    drop_logged_at: Option<Instant>,
    /// Records in the latest batch and bytes of their keys and values, to judge whether the
    /// spool can take another.
    typical_batch: (usize, usize),
}

impl KafkaSink {
    /// A task over an opened spool and a producer; see `startup` for the real ones.
    pub(crate) fn new(
        config: KafkaConfig,
        metrics: KafkaMetrics,
        acks: AckHandle,
        spool: Spool,
        producer: Box<dyn Produce>,
        connector: Connector,
        topics: Option<Topics>,
    ) -> Self {
        let state = if spool.is_empty() {
            State::Direct
        } else {
            State::Draining {
                cursor: 0,
                probing: true,
                outage: None,
            }
        };
        let sink = Self {
            config,
            metrics,
            producer,
            connector,
            topics,
            status: watch::Sender::new(KafkaStatus::default()),
            acks,
            spool,
            state,
            in_flight: VecDeque::new(),
            held: None,
            spooled_through: 0,
            drops_unlogged: 0,
            drop_logged_at: None,
            typical_batch: (0, 0),
        };
        sink.update_status();
        sink
    }

    /// Follows the Kafka side's state.
    pub fn status(&self) -> watch::Receiver<KafkaStatus> {
        self.status.subscribe()
    }

    /// Writes every batch from `input` until it closes, then settles what is in flight and
    /// saves whatever Kafka has not confirmed to the disk spool. Tells the batcher through
    /// `idle` when it waits for work, so a partial batch need not wait to fill.
    pub async fn run(mut self, mut input: mpsc::Receiver<Batch>, idle: KafkaIdle) {
        loop {
            self.top_up().await;
            let accepting = self.held.is_none()
                && match self.state {
                    State::Direct => self.in_flight.len() < MAX_IN_FLIGHT,
                    State::Failing { .. } | State::Draining { .. } => true,
                };
            // Direct: no write in flight. Spooling: between group commits, since a batch is
            // written and fsynced before the next is taken.
            let waiting_for_work = accepting
                && input.is_empty()
                && (self.in_flight.is_empty() || !matches!(self.state, State::Direct));
            idle.set(waiting_for_work);
            let retry_at = match self.state {
                State::Failing { retry_at, .. } if self.in_flight.is_empty() => Some(retry_at),
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
                let to = Destinations::of(&self.config);
                let head = self.in_flight.front_mut();
                let has_head = head.is_some();
                let metrics = &self.metrics;
                tokio::select! {
                    biased;
                    () = async { if let Some(head) = head { head.settle(metrics, to).await } },
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
                    if let State::Failing { outage, .. } = &self.state {
                        let outage = Some(outage.clone());
                        self.set_state(State::Draining {
                            cursor: 0,
                            probing: true,
                            outage,
                        });
                    }
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
            if self.ensure_topics(&batch.records).await {
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
        let to = Destinations::of(&self.config);
        for (index, record) in records.iter().enumerate() {
            let Some(topic) = to.topic(record) else {
                // Unmapped: nothing to write, done at once (counted when the unit settles).
                reports.ticket(index).settle(Ok(()));
                continue;
            };
            let sent = producer::enqueue(
                self.producer.as_ref(),
                &self.metrics,
                topic,
                record,
                reports.ticket(index),
            )
            .await;
            if let Err(failure) = sent
                && failure.final_reason().is_none()
            {
                self.metrics.error("enqueue");
                break;
            }
        }
        InFlight {
            origin,
            reports,
            settled: false,
            failure: None,
            dead_letters: Vec::new(),
            records,
        }
    }

    /// The oldest unit in flight has settled (or failed).
    async fn on_settled(&mut self) {
        let mut unit = self.in_flight.pop_front().expect("a unit settled");
        if unit.failure.is_none() && !unit.dead_letters.is_empty() {
            // Its dead letters take its place: its messages are done once they are written.
            let letters = std::mem::take(&mut unit.dead_letters);
            let letters = self.send(unit.origin, letters).await;
            self.in_flight.push_front(letters);
            return;
        }
        let Some((_, reason)) = unit.failure.clone() else {
            self.metrics.batches_sent.inc();
            match unit.origin {
                Origin::Direct => self.acks.done_through(unit.last_seq()),
                Origin::Spool { last_id } => {
                    self.spool.remove_through(last_id).await;
                    // Records held in memory only (no usable disk) may now all be in Kafka.
                    self.ack_spooled();
                    if let State::Draining {
                        cursor,
                        probing: true,
                        ..
                    } = self.state
                    {
                        self.kafka_back(cursor);
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
                let mut records = unit.undelivered(&self.metrics, Destinations::of(&self.config));
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
        let State::Draining {
            cursor, probing, ..
        } = self.state
        else {
            return;
        };
        let limit = if probing { 1 } else { MAX_CHUNKS_IN_FLIGHT };
        let mut cursor = cursor;
        while self.in_flight.len() < limit {
            let chunk = match self
                .spool
                .read_after(cursor, self.config.max_batch_size)
                .await
            {
                Ok(chunk) => chunk,
                Err(e) => {
                    let failure = Failure::other(&format!("disk spool cannot be read: {e}"));
                    self.enter_failing(&failure, self.spool.records());
                    return;
                }
            };
            let Some(last_id) = chunk.last().map(|e| e.id) else {
                break;
            };
            let records: Vec<Record> = chunk.into_iter().flat_map(|e| e.records).collect();
            if !self.ensure_topics(&records).await {
                let failure = Failure::other("Kafka topics cannot be created");
                self.enter_failing(&failure, self.spool.records());
                return;
            }
            let unit = self.send(Origin::Spool { last_id }, records).await;
            self.in_flight.push_back(unit);
            cursor = last_id;
        }
        if let State::Draining { cursor: c, .. } = &mut self.state {
            *c = cursor;
        }
        if self.in_flight.is_empty() && self.spool.is_empty() && self.held.is_none() {
            info!("Spool drained; writing to Kafka directly again.");
            self.set_state(State::Direct);
        }
        self.update_status();
    }

    /// Puts records behind the spool. Returns `false` when they are held back (spool full,
    /// policy `block`): the task then takes nothing more until there is room.
    fn spool_records(&mut self, mut records: Vec<Record>) -> bool {
        let Some(last_seq) = records.last().map(|r| r.seq) else {
            return true;
        };
        // Records addressed nowhere are done: nothing to keep, but their receipt numbers count.
        records.retain(|r| match r.topic.drop_reason() {
            Some(reason) => {
                self.metrics.dropped(reason, 1);
                false
            }
            None => true,
        });
        if records.is_empty() {
            self.spooled_through = self.spooled_through.max(last_seq);
            return true;
        }
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

    /// Fsyncs the spool, then reports what it allows done.
    async fn flush_spool(&mut self) {
        self.spool.flush().await;
        self.ack_spooled();
        self.update_status();
    }

    /// Reports the spooled messages done — unless some are held in memory only while
    /// acknowledgements depend on the disk.
    fn ack_spooled(&self) {
        if self.spool.all_durable() || !self.config.spool.persist_all {
            self.acks.done_through(self.spooled_through);
        }
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

    /// A write failed: into the failing state (or stays there, with the new reason).
    fn enter_failing(&mut self, failure: &Failure, records: usize) {
        self.replace_producer(failure);
        // A topic may have gone with the outage (deleted, or a broker replaced by an empty
        // one): make sure of every topic again before the next writes.
        if let Some(topics) = &mut self.topics {
            topics.forget();
        }
        let now = Instant::now();
        let outage = match self.state.outage() {
            Some(outage) => Outage {
                error: failure.text.clone(),
                ..outage.clone()
            },
            None => Outage {
                since: now,
                counted_until: now,
                error: failure.text.clone(),
            },
        };
        self.set_state(State::Failing {
            outage,
            retry_at: now + self.config.retry_interval,
        });
        warn!(
            error = %failure.text, spooled_records = records,
            retry_in = ?self.config.retry_interval,
            "Kafka delivery failed; spooling and retrying."
        );
    }

    /// The one place the state changes. The gauge, the status and the failing-time counter
    /// follow from the state, so "failing" is stored once.
    fn set_state(&mut self, state: State) {
        let now = Instant::now();
        self.count_failing_time(now);
        self.state = state;
        if let Some(outage) = self.state.outage_mut() {
            outage.counted_until = now;
        }
        let error = self.state.outage().map(|o| o.error.clone());
        self.metrics.state.set(i64::from(error.is_some()));
        self.status.send_if_modified(|s| {
            let changed = s.failing != error.is_some() || s.last_error != error;
            s.failing = error.is_some();
            s.last_error = error;
            changed
        });
        self.update_status();
    }

    /// Replaces the producer after a failed write. Its queued records are in the spool, and
    /// keeping it would let librdkafka's idempotent producer bump its epoch locally for the
    /// timed-out records (KIP-360): some Kafka-protocol brokers (tansu among them) fence it
    /// for that, and a fatal error would stop it for good anyway. A fresh producer gets a new
    /// producer id from the broker; duplicates of records the old one still delivers are
    /// possible, loss is not.
    fn replace_producer(&mut self, failure: &Failure) {
        if let Some(reason) = self.producer.fatal_error() {
            self.metrics.error("fatal");
            warn!(reason = %reason, "Kafka producer hit a fatal error.");
        } else if failure.breaks_the_producer() {
            self.metrics.error("fatal");
        }
        match (self.connector)() {
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

    /// The probe chunk was delivered: Kafka takes writes again; the drain goes on at full pace.
    fn kafka_back(&mut self, cursor: u64) {
        if let Some(outage) = self.state.outage() {
            info!(
                spooled_records = self.spool.records(),
                failing_for = ?outage.since.elapsed(),
                "Kafka accepts writes again; draining."
            );
        }
        self.set_state(State::Draining {
            cursor,
            probing: false,
            outage: None,
        });
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
        let to = Destinations::of(&self.config);
        while let Some(head) = self.in_flight.front_mut() {
            let settled = tokio::time::timeout_at(deadline, head.settle(&self.metrics, to)).await;
            if settled.is_err() {
                break;
            }
            let mut unit = self.in_flight.pop_front().expect("head exists");
            // Dead letters not written yet are saved with the rest.
            unconfirmed.append(&mut unit.dead_letters);
            match (&unit.origin, unit.failure.is_some()) {
                (Origin::Direct, false) => self.acks.done_through(unit.last_seq()),
                (Origin::Spool { last_id }, false) => self.spool.remove_through(*last_id).await,
                (Origin::Direct, true) => {
                    unconfirmed.extend(unit.undelivered(&self.metrics, to));
                    break;
                }
                (Origin::Spool { .. }, true) => break,
            }
        }
        for unit in std::mem::take(&mut self.in_flight) {
            if matches!(unit.origin, Origin::Direct) {
                unconfirmed.extend(unit.undelivered(&self.metrics, to));
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
        self.count_failing_time(Instant::now());
    }

    /// Adds the failing time not counted yet, up to `now`, to its counter.
    fn count_failing_time(&self, now: Instant) {
        if let Some(outage) = self.state.outage() {
            let uncounted = now.saturating_duration_since(outage.counted_until);
            self.metrics.failing_seconds.inc_by(uncounted.as_secs_f64());
        }
    }

    /// Creates the topics `records` go to that are not known to exist (the bridge's own
    /// first); `false` while that fails.
    async fn ensure_topics(&mut self, records: &[Record]) -> bool {
        let Some(topics) = &mut self.topics else {
            return true;
        };
        let named = records.iter().filter_map(|r| match &r.topic {
            Topic::Named(name) => Some(name.as_str()),
            Topic::Default | Topic::Unmapped | Topic::Dropped(_) => None,
        });
        match topics.ensure(named, &self.config).await {
            Ok(()) => true,
            Err(e) => {
                self.metrics.error("create_topic");
                warn!(error = %e, "Kafka topics cannot be created yet.");
                false
            }
        }
    }
}

/// Drops a record given up on for good (no dead-letter topic is set, or it is a dead letter
/// that could not be written either), counted and logged.
fn give_up(
    metrics: &KafkaMetrics,
    record: &Record,
    topic: &str,
    reason: GiveUp,
    failure: &Failure,
) {
    metrics.error(reason.label());
    let (label, what) = match (dead_letter::reason_of(record), reason) {
        (Some(_), _) => (
            "dead_letter_failed",
            "Dead letter not written either, dropped.",
        ),
        (None, GiveUp::TooLarge) => ("too_large", "Record larger than Kafka accepts, dropped."),
        (None, GiveUp::TopicRefused) => {
            ("topic_refused", "Kafka refused the topic, record dropped.")
        }
        (None, GiveUp::TopicInvalid) => ("topic_invalid", "Invalid Kafka topic, record dropped."),
    };
    metrics.dropped(label, 1);
    error!(
        mqtt_topic = %record.mqtt_topic, kafka_topic = %topic, bytes = record.value.len(),
        error = %failure.text, "{what}"
    );
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use mkb_bridge::dead_letter as names;
    use mkb_bridge::{AckWatermark, ack_channel};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::producer::fake::{Outcome, Script};
    use crate::spool::{FullPolicy, SpoolConfig};

    const RETRY: Duration = Duration::from_secs(10);

    fn config(dir: &Path) -> KafkaConfig {
        KafkaConfig {
            brokers: "kafka.invalid:9092".to_owned(),
            topic: Some(crate::producer::fake::TOPIC.to_owned()),
            dead_letter_topic: None,
            auto_create_topics: false,
            topic_partitions: 1,
            topic_replication: 1,
            test_topic: None,
            startup_timeout: Duration::from_secs(5),
            retry_interval: RETRY,
            delivery_timeout: Duration::from_secs(3),
            properties: Vec::new(),
            max_batch_size: 50,
            shutdown_grace: Duration::from_secs(5),
            spool: SpoolConfig {
                dir: Some(dir.join("spool")),
                memory_bytes: 1 << 20,
                disk_bytes: 1 << 20,
                full_policy: FullPolicy::Block,
                persist_all: true,
            },
        }
    }

    /// A running Kafka task over a scripted producer.
    struct Task {
        input: Option<mpsc::Sender<Batch>>,
        acks: AckWatermark,
        status: watch::Receiver<KafkaStatus>,
        metrics: KafkaMetrics,
        script: Script,
        /// What the task tells the batcher.
        idle: KafkaIdle,
        task: JoinHandle<()>,
        dir: tempfile::TempDir,
    }

    async fn start(script: &Script, adjust: impl FnOnce(&mut KafkaConfig)) -> Task {
        start_with(script, adjust, |_| {}).await
    }

    async fn start_with(
        script: &Script,
        adjust: impl FnOnce(&mut KafkaConfig),
        prepare: impl FnOnce(&mut Spool),
    ) -> Task {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(dir.path());
        adjust(&mut config);
        let metrics = KafkaMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let (handle, acks) = ack_channel();
        let mut spool = Spool::open(config.spool.clone(), metrics.spool.clone())
            .await
            .expect("spool");
        prepare(&mut spool);
        let connector = script.connector();
        let producer = connector().expect("fake producer");
        let sink = KafkaSink::new(
            config,
            metrics.clone(),
            handle,
            spool,
            producer,
            connector,
            None,
        );
        let status = sink.status();
        let (input, batches) = mpsc::channel(2);
        let idle = KafkaIdle::default();
        Task {
            input: Some(input),
            acks,
            status,
            metrics,
            script: script.clone(),
            idle: idle.clone(),
            task: tokio::spawn(sink.run(batches, idle)),
            dir,
        }
    }

    /// Messages numbered `from` to `from + count - 1` (receipt numbers start at 1); each
    /// record's value is its number.
    fn batch(from: u64, count: u64) -> Batch {
        Batch {
            records: (from..from + count)
                .map(|n| {
                    Record::new(
                        n,
                        format!("topic/{}", n % 3),
                        n.to_string().into_bytes(),
                        Instant::now(),
                    )
                })
                .collect(),
        }
    }

    fn numbers(from: u64, count: u64) -> Vec<String> {
        (from..from + count).map(|n| n.to_string()).collect()
    }

    impl Task {
        async fn send(&self, batch: Batch) {
            let input = self.input.as_ref().expect("input open");
            input.send(batch).await.expect("task running");
        }

        /// Waits (in paused time) until `condition` holds, failing after a minute.
        async fn until(&self, what: &str, condition: impl Fn(&Self) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !condition(self) {
                assert!(Instant::now() < deadline, "gave up waiting for {what}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }

        fn watermark(&self) -> u64 {
            self.acks.get()
        }

        fn failing(&self) -> bool {
            self.status.borrow().failing
        }

        async fn stop(mut self) -> Self {
            self.input = None;
            (&mut self.task).await.expect("task ends cleanly");
            self
        }
    }

    /// Every number delivered is among those sent, and the last copies are in order.
    fn assert_in_order(delivered: &[String], sent: u64) {
        let mut last_copies: Vec<u64> = Vec::new();
        for value in delivered.iter().rev() {
            let n: u64 = value.parse().expect("a number");
            assert!((1..=sent).contains(&n), "{n} was never sent");
            if !last_copies.contains(&n) {
                last_copies.push(n);
            }
        }
        last_copies.reverse();
        assert_eq!(
            last_copies,
            (1..=sent).collect::<Vec<_>>(),
            "last copies in order"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn batches_are_acknowledged_once_kafka_has_them() {
        let script = Script::default();
        script.otherwise(Outcome::DeliverAfter(Duration::from_millis(100)));
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 10)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(task.watermark(), 0, "nothing acknowledged before delivery");
        task.until("the batch acknowledged", |t| t.watermark() == 10)
            .await;
        assert_eq!(script.delivered(), numbers(1, 10));
        assert_eq!(task.metrics.records_sent.get(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_batcher_is_told_when_nothing_is_in_flight() {
        let script = Script::default();
        script.otherwise(Outcome::DeliverAfter(Duration::from_millis(100)));
        let task = start(&script, |_| {}).await;
        task.until("idle at start", |t| t.idle.is_idle()).await;
        // The batcher clears the flag as it sends; the task keeps it clear while it writes.
        task.idle.set(false);
        task.send(batch(1, 3)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.idle.is_idle(), "a write is in flight");
        task.until("idle once the write is done", |t| t.idle.is_idle())
            .await;
        assert_eq!(task.watermark(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watermark_never_passes_a_record_kafka_has_not_confirmed() {
        let script = Script::default();
        script
            .then(5, Outcome::DeliverAfter(Duration::from_millis(500)))
            .otherwise(Outcome::Deliver);
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 5)).await;
        task.send(batch(6, 5)).await;
        task.until("the second batch delivered", |t| {
            t.script.delivered().len() == 5
        })
        .await;
        assert_eq!(task.watermark(), 0, "the first batch is not confirmed yet");
        task.until("both acknowledged", |t| t.watermark() == 10)
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_record_and_everything_after_it_go_behind_the_spool_in_order() {
        let script = Script::default();
        script
            .then(15, Outcome::Deliver)
            .then(100, Outcome::TimeOut(Duration::from_secs(3)));
        let task = start(&script, |_| {}).await;
        for first in [1, 11, 21, 31] {
            task.send(batch(first, 10)).await;
        }
        task.until("the failing state", |t| t.failing()).await;
        assert_eq!(task.metrics.state.get(), 1);
        task.send(batch(41, 10)).await;
        // The retry succeeds (the script is used up: deliver), and everything arrives.
        task.until("everything acknowledged", |t| t.watermark() == 50)
            .await;
        task.until("Kafka back", |t| !t.failing()).await;
        assert_in_order(&script.delivered(), 50);
        assert!(task.metrics.failing_seconds.get() >= RETRY.as_secs_f64());
    }

    #[tokio::test(start_paused = true)]
    async fn spooled_messages_are_acknowledged_at_the_fsync_not_on_delivery() {
        let script = Script::default();
        script.otherwise(Outcome::TimeOut(Duration::from_secs(3)));
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 10)).await;
        task.until("the failing state", |t| t.failing()).await;
        assert_eq!(task.watermark(), 10, "the failed batch is on disk");
        task.send(batch(11, 10)).await;
        task.until("the next batch on disk", |t| t.watermark() == 20)
            .await;
        assert!(script.delivered().is_empty(), "nothing reached Kafka");
        assert_eq!(task.metrics.spool.disk_records.get(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_probes_with_one_chunk_before_draining_at_full_pace() {
        let script = Script::default();
        script.then(1, Outcome::TimeOut(Duration::from_secs(3)));
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 1)).await;
        task.until("the failing state", |t| t.failing()).await;
        for first in (2..200).step_by(11) {
            task.send(batch(first, 11)).await;
        }
        task.until("everything spooled", |t| t.watermark() == 199)
            .await;
        let handed = script.handed();
        // The probe: one chunk (max_batch_size 50, whole entries) and no more until it is in.
        script
            .then(50, Outcome::DeliverAfter(Duration::from_secs(1)))
            .otherwise(Outcome::Deliver);
        tokio::time::sleep(RETRY + Duration::from_millis(500)).await;
        let probe = script.handed() - handed;
        assert!(
            (1..=50).contains(&probe),
            "{probe} records out while probing"
        );
        assert!(task.failing(), "still failing until the probe is delivered");
        task.until("the spool drained", |t| {
            t.metrics.spool.disk_records.get() == 0 && !t.failing()
        })
        .await;
        assert_in_order(&script.delivered(), 199);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_ends_in_the_direct_state() {
        let script = Script::default();
        script.then(1, Outcome::TimeOut(Duration::from_secs(3)));
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 10)).await;
        task.until("the failing state", |t| t.failing()).await;
        task.until("drained", |t| !t.failing() && t.watermark() == 10)
            .await;
        task.until("spool empty", |t| t.metrics.spool.disk_records.get() == 0)
            .await;
        assert_eq!(task.metrics.state.get(), 0);
        // Direct again: a new batch is not spooled.
        let spooled = task.metrics.spool.spooled.get();
        task.send(batch(11, 10)).await;
        task.until("acknowledged", |t| t.watermark() == 20).await;
        assert_eq!(task.metrics.spool.spooled.get(), spooled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_too_large_for_kafka_is_dropped_counted_and_the_rest_goes_on() {
        let script = Script::default();
        script.then(3, Outcome::Deliver).then(1, Outcome::TooLarge);
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 10)).await;
        task.until("acknowledged", |t| t.watermark() == 10).await;
        let delivered = script.delivered();
        assert_eq!(delivered.len(), 9);
        assert!(!delivered.contains(&"4".to_owned()));
        assert!(!task.failing(), "a record too large is not an outage");
        assert_eq!(task.metrics.records_sent.get(), 9);
    }

    const DLQ: &str = "dead-letters";

    fn header<'a>(record: &'a Record, name: &str) -> &'a str {
        let (_, value) = record
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} header in {record:?}"));
        std::str::from_utf8(value).expect("UTF-8 header")
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_too_large_goes_to_the_dead_letter_topic_before_it_is_acknowledged() {
        let script = Script::default();
        script
            .then(3, Outcome::Deliver)
            .then(1, Outcome::TooLarge)
            .for_topic(DLQ, Outcome::DeliverAfter(Duration::from_secs(5)));
        let task = start(&script, |c| c.dead_letter_topic = Some(DLQ.to_owned())).await;
        task.send(batch(1, 10)).await;
        task.until("the rest delivered", |_| script.delivered().len() == 9)
            .await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(task.watermark(), 0, "not done before the dead letter is");
        task.until("acknowledged", |t| t.watermark() == 10).await;
        let letters = script.delivered_to(DLQ);
        assert_eq!(letters.len(), 1);
        let letter = &letters[0];
        assert_eq!(header(letter, names::REASON), "too_large");
        assert_eq!(header(letter, names::MQTT_TOPIC), "topic/1");
        assert_eq!(header(letter, names::KAFKA_TOPIC), "bridge");
        assert_eq!(header(letter, names::ORIGINAL_SIZE), "1");
        assert!(header(letter, names::ERROR).contains("too large"));
        assert_eq!(letter.key_bytes(), Some(&b"topic/1"[..]));
        assert!(letter.value.is_empty(), "a value too large goes without it");
        assert_eq!(task.metrics.dead_lettered_count("too_large"), 1);
        assert_eq!(task.metrics.dropped_count("too_large"), 0);
        assert_eq!(task.metrics.records_sent.get(), 9);
        assert!(!task.failing());
    }

    #[tokio::test(start_paused = true)]
    async fn records_of_a_refused_topic_are_dead_lettered_with_their_values_or_dropped() {
        let cases = [
            (Outcome::TopicRefused, "topic_refused"),
            (Outcome::TopicInvalid, "topic_invalid"),
        ];
        for ((outcome, reason), dlq) in cases
            .into_iter()
            .flat_map(|case| [(case, Some(DLQ)), (case, None)])
        {
            let script = Script::default();
            script.for_topic(crate::producer::fake::TOPIC, outcome);
            let task = start(&script, |c| c.dead_letter_topic = dlq.map(str::to_owned)).await;
            task.send(batch(1, 10)).await;
            task.until("acknowledged", |t| t.watermark() == 10).await;
            assert!(!task.failing(), "{reason}, {dlq:?}: not an outage");
            let letters = script.delivered_to(DLQ);
            let values: Vec<_> = letters.iter().map(|r| r.value.clone()).collect();
            if dlq.is_some() {
                let expected: Vec<_> = (1..=10).map(|n| n.to_string().into_bytes()).collect();
                assert_eq!(values, expected, "{reason}: the values kept");
                assert_eq!(header(&letters[0], names::REASON), reason);
                assert_eq!(task.metrics.dead_lettered_count(reason), 10);
            } else {
                assert!(letters.is_empty());
                assert_eq!(task.metrics.dropped_count(reason), 10);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_the_dead_letter_topic_refuses_is_dropped_and_counted() {
        let script = Script::default();
        script
            .then(3, Outcome::Deliver)
            .then(1, Outcome::TooLarge)
            .for_topic(DLQ, Outcome::TopicRefused);
        let task = start(&script, |c| c.dead_letter_topic = Some(DLQ.to_owned())).await;
        task.send(batch(1, 10)).await;
        task.until("acknowledged", |t| t.watermark() == 10).await;
        assert_eq!(task.metrics.dropped_count("dead_letter_failed"), 1);
        assert_eq!(task.metrics.dead_lettered_count("too_large"), 0);
        assert_eq!(script.delivered().len(), 9);
        assert!(!task.failing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_kafka_does_not_take_waits_in_the_spool_with_its_headers() {
        let script = Script::default();
        script
            .then(3, Outcome::Deliver)
            .then(1, Outcome::TooLarge)
            .then(6, Outcome::Deliver)
            .then(1, Outcome::TimeOut(Duration::from_secs(3)));
        let task = start(&script, |c| c.dead_letter_topic = Some(DLQ.to_owned())).await;
        task.send(batch(1, 10)).await;
        task.until("the failing state", |t| t.failing()).await;
        task.until("acknowledged once spooled", |t| t.watermark() == 10)
            .await;
        task.until("Kafka back", |t| !t.failing()).await;
        let letters = script.delivered_to(DLQ);
        assert_eq!(letters.len(), 1, "written once Kafka is back");
        assert_eq!(header(&letters[0], names::REASON), "too_large");
        assert_eq!(header(&letters[0], names::MQTT_TOPIC), "topic/1");
        assert_eq!(task.metrics.dead_lettered_count("too_large"), 1);
        assert_eq!(script.delivered().len(), 9);
    }

    /// Records 1..=`count` routed by receipt number: 3, 9, … unmapped, 6, 12, … dropped as
    /// undecodable, the others to `odd` or `even`.
    fn routed(from: u64, count: u64) -> Batch {
        let mut batch = batch(from, count);
        for record in &mut batch.records {
            record.topic = match record.seq {
                n if n % 6 == 0 => Topic::Dropped("sparkplug_invalid"),
                n if n % 3 == 0 => Topic::Unmapped,
                n if n % 2 == 1 => Topic::Named("odd".to_owned()),
                _ => Topic::Named("even".to_owned()),
            };
        }
        batch
    }

    fn values(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn routed_records_go_to_their_topics_and_unmapped_ones_are_counted_and_done() {
        let script = Script::default();
        let task = start(&script, |_| {}).await;
        // The batch ends with an unmapped record: it is done all the same.
        task.send(routed(1, 6)).await;
        task.until("acknowledged", |t| t.watermark() == 6).await;
        assert_eq!(values(&script.delivered_to("odd")), ["1", "5"]);
        assert_eq!(values(&script.delivered_to("even")), ["2", "4"]);
        assert_eq!(task.metrics.dropped_count("unmapped"), 1);
        assert_eq!(task.metrics.dropped_count("sparkplug_invalid"), 1);
        assert_eq!(task.metrics.records_sent.get(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_topic_refused_for_good_never_holds_up_the_others() {
        let script = Script::default();
        script.for_topic("odd", Outcome::TopicRefused);
        let task = start(&script, |c| c.dead_letter_topic = Some(DLQ.to_owned())).await;
        task.send(routed(1, 6)).await;
        task.send(routed(7, 6)).await;
        task.until("acknowledged", |t| t.watermark() == 12).await;
        assert!(!task.failing());
        assert_eq!(values(&script.delivered_to("even")), ["2", "4", "8", "10"]);
        let letters = script.delivered_to(DLQ);
        assert_eq!(values(&letters), ["1", "5", "7", "11"]);
        assert_eq!(header(&letters[0], names::KAFKA_TOPIC), "odd");
    }

    #[tokio::test(start_paused = true)]
    async fn routed_records_keep_their_topics_through_the_spool() {
        let script = Script::default();
        script.then(2, Outcome::TimeOut(Duration::from_secs(3)));
        let task = start(&script, |_| {}).await;
        task.send(routed(1, 6)).await;
        task.until("the failing state", |t| t.failing()).await;
        task.send(routed(7, 6)).await;
        task.until("everything acknowledged", |t| t.watermark() == 12)
            .await;
        task.until("Kafka back", |t| !t.failing()).await;
        let odd = values(&script.delivered_to("odd"));
        let even = values(&script.delivered_to("even"));
        assert_eq!(odd.last().map(String::as_str), Some("11"));
        for n in [1, 5, 7, 11] {
            assert!(odd.contains(&n.to_string()), "{n} in {odd:?}");
        }
        for n in [2, 4, 8, 10] {
            assert!(even.contains(&n.to_string()), "{n} in {even:?}");
        }
        assert_eq!(task.metrics.dropped_count("unmapped"), 2);
        assert_eq!(task.metrics.dropped_count("sparkplug_invalid"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_local_queue_is_waited_out() {
        let script = Script::default();
        script.then(3, Outcome::QueueFull);
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 5)).await;
        task.until("acknowledged", |t| t.watermark() == 5).await;
        assert_eq!(script.delivered(), numbers(1, 5));
        assert!(!task.failing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fenced_producer_is_replaced_by_a_fresh_one() {
        let script = Script::default();
        script.then(1, Outcome::Fenced);
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 5)).await;
        task.until("the failing state", |t| t.failing()).await;
        assert_eq!(
            script.producers(),
            2,
            "a new producer after the failed write"
        );
        task.until("delivered by the new one", |t| {
            t.watermark() == 5 && !t.failing()
        })
        .await;
        assert_in_order(&script.delivered(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn under_block_a_full_spool_holds_the_batch_until_the_drain_makes_room() {
        let script = Script::default();
        script.otherwise(Outcome::TimeOut(Duration::from_secs(3)));
        // Room on disk for about three batches of ten.
        let task = start(&script, |c| c.spool.disk_bytes = 1_000).await;
        task.send(batch(1, 10)).await;
        task.until("the failing state", |t| t.failing()).await;
        for first in [11, 21, 31, 41] {
            task.send(batch(first, 10)).await;
        }
        task.until("the spool full", |t| t.status.borrow().full)
            .await;
        let watermark = task.watermark();
        assert!(watermark < 50, "the held batch is not acknowledged");
        let input = task.input.as_ref().expect("input");
        let mut stuffed = 0;
        while input.try_send(batch(51 + stuffed * 10, 10)).is_ok() {
            stuffed += 1;
        }
        assert!(stuffed <= 2, "the task stopped reading its input");
        script.otherwise(Outcome::Deliver);
        let total = 50 + stuffed * 10;
        task.until("everything acknowledged", |t| t.watermark() == total)
            .await;
        task.until("drained", |t| !t.failing()).await;
        assert_in_order(&script.delivered(), total);
    }

    #[tokio::test(start_paused = true)]
    async fn drop_newest_counts_every_record_it_drops() {
        let script = Script::default();
        script.otherwise(Outcome::TimeOut(Duration::from_secs(3)));
        let task = start(&script, |c| {
            c.spool.dir = None;
            c.spool.persist_all = false;
            c.spool.memory_bytes = 3_000;
            c.spool.full_policy = FullPolicy::DropNewest;
        })
        .await;
        for first in (1..100).step_by(10) {
            task.send(batch(first, 10)).await;
        }
        task.until("all done", |t| t.watermark() == 100).await;
        let kept = task.metrics.spool.memory_records.get() as u64;
        let dropped = 100 - kept;
        assert!(kept > 0 && dropped > 0, "kept {kept}");
        assert_eq!(task.metrics.dropped_count("spool_full_newest"), dropped);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_saves_what_kafka_has_not_confirmed_to_disk() {
        let script = Script::default();
        script.otherwise(Outcome::DeliverAfter(Duration::from_secs(3600)));
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 10)).await;
        task.send(batch(11, 10)).await;
        task.until("handed over", |t| t.script.handed() == 20).await;
        let task = task.stop().await;
        assert_eq!(task.watermark(), 0, "nothing was confirmed");
        let metrics = KafkaMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let mut spool = Spool::open(config(task.dir.path()).spool, metrics.spool)
            .await
            .expect("reopen");
        let saved = crate::spool::tests::contents(&mut spool).await;
        assert_eq!(saved, numbers(1, 20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_disk_that_fails_holds_acknowledgements_until_it_works_again() {
        let script = Script::default();
        script.otherwise(Outcome::TimeOut(Duration::from_secs(3)));
        let task = start_with(&script, |_| {}, |spool| spool.fail_next_writes(2)).await;
        task.send(batch(1, 10)).await;
        task.until("the disk error in the status", |t| {
            t.status.borrow().spool_error.is_some()
        })
        .await;
        assert_eq!(task.watermark(), 0, "nothing durable, nothing acknowledged");
        assert_eq!(task.metrics.spool.disk_available.get(), 0);
        // Retried every DISK_RETRY without new input; the third write works.
        task.until("acknowledged once on disk", |t| t.watermark() == 10)
            .await;
        assert!(task.status.borrow().spool_error.is_none());
        assert_eq!(task.metrics.spool.disk_records.get(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn records_held_in_memory_only_are_acknowledged_once_kafka_has_them() {
        let script = Script::default();
        script.then(10, Outcome::TimeOut(Duration::from_secs(3)));
        let task = start(&script, |c| c.spool.dir = None).await;
        task.send(batch(1, 10)).await;
        task.until("the failing state", |t| t.failing()).await;
        assert_eq!(task.watermark(), 0, "held in memory only: not acknowledged");
        task.until("acknowledged after the drain", |t| t.watermark() == 10)
            .await;
        assert_eq!(script.delivered(), numbers(1, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_spool_left_by_a_previous_run_drains_before_new_batches() {
        let script = Script::default();
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let metrics = KafkaMetrics::new(&prometheus::Registry::new()).expect("metrics");
            let mut spool = Spool::open(config(dir.path()).spool, metrics.spool)
                .await
                .expect("spool");
            let _ = spool.push(batch(1, 20).records);
            assert!(spool.flush().await);
        }
        let spool_dir = dir.path().join("spool");
        let task = start(&script, |c| c.spool.dir = Some(spool_dir)).await;
        task.send(batch(21, 10)).await;
        task.until("everything delivered", |t| t.script.delivered().len() == 30)
            .await;
        assert_eq!(script.delivered(), numbers(1, 30));
        task.until("acknowledged", |t| t.watermark() == 30).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_status_gives_the_reason_while_failing_and_clears_when_kafka_is_back() {
        let script = Script::default();
        script.then(1, Outcome::TimeOut(Duration::from_secs(3)));
        let task = start(&script, |_| {}).await;
        task.send(batch(1, 1)).await;
        task.until("the failing state", |t| t.failing()).await;
        let error = task.status.borrow().last_error.clone();
        assert!(
            error.as_deref().is_some_and(|e| e.contains("timed out")),
            "{error:?}"
        );
        task.until("Kafka back", |t| !t.failing()).await;
        assert_eq!(task.status.borrow().last_error, None);
        assert_eq!(task.metrics.state.get(), 0);
    }
}
