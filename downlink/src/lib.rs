//! The downlink (SPEC §3.6): Kafka records published to MQTT, as the Callista bridge does for
//! commands to cars. Off unless `DOWNLINK_KAFKA_TOPICS` is set.
//!
//! **At-least-once**: a record's offset is committed only once the broker acknowledged its
//! publish (PUBACK for QoS 1, PUBCOMP for QoS 2; QoS 0 once written), per partition up to the
//! first record still in flight ([`offsets`]). Records of one partition are published in offset
//! order. At most `max_in_flight` publishes await their acknowledgement; beyond that the task
//! stops reading Kafka, so memory stays bounded.
//!
//! **Its own MQTT connection** (client id `<MQTT_CLIENT_ID>-downlink`, clean session): the
//! uplink's connection is tuned for receiving (manual acknowledgements in receipt order, a
//! persistent session), and a second connection keeps either side's stall from holding up the
//! other. When it fails, every publish in flight is abandoned: the consumer is sent back to the
//! first unacknowledged record of each partition and a fresh connection publishes them again
//! (duplicates, never loss). A record without a usable MQTT topic, or whose value is not in the
//! configured format, or whose publish the broker refused (MQTT 5 reason code), is counted,
//! logged and written to the dead-letter topic when one is set (committed once Kafka has it);
//! it never blocks its partition. Under MQTT 5 a record's headers become the publish's
//! properties ([`Render::properties`]).
//!
//! **Rebalances**: partitions the group takes away are forgotten ([`Offsets::forget`]); their
//! publishes in flight may finish, but nothing more is committed for them.

mod link;
mod offsets;
pub mod render;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mkb_bridge::QoS;
use mkb_bridge::dead_letter;
use mkb_mqtt::MqttConfig;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use link::{Connection, Link, LinkEvent};
use offsets::{Offsets, Partition};
pub use render::{Format, Render, TopicTemplate};

/// Everything the downlink needs, already validated.
#[derive(Clone, Debug)]
pub struct DownlinkConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// librdkafka properties for the consumer (the bridge's security settings).
    pub properties: Vec<(String, String)>,
    /// Topics to consume; `re:` marks a regular expression.
    pub topics: Vec<String>,
    pub group_id: String,
    /// `session.timeout.ms`: how long a replica that stopped answering (killed) keeps its
    /// partitions before the group hands them to the others.
    pub session_timeout: Duration,
    /// Static membership (`group.instance.id` = `<MQTT_CLIENT_ID>-downlink`): a bridge
    /// restarted with the same client id (a StatefulSet's pod name) takes its partitions back
    /// at once, without a rebalance. Kafka 2.3 and later; tansu 0.6 rebalances without end
    /// when two static members share a group.
    pub static_membership: bool,
    /// `auto.offset.reset`: `latest` or `earliest`.
    pub offset_reset: String,
    pub render: Render,
    /// Publishes awaiting their acknowledgement at most.
    pub max_in_flight: usize,
    /// How often acknowledged positions are committed.
    pub commit_interval: Duration,
    /// `KAFKA_DLQ_TOPIC`: where records without a usable topic or payload go; unset: they
    /// are counted and skipped.
    pub dead_letter_topic: Option<String>,
    /// The uplink's MQTT connection settings; the downlink connects with them as
    /// `<client id>-downlink`.
    pub mqtt: MqttConfig,
}

/// The downlink's metrics.
#[derive(Clone)]
pub struct DownlinkMetrics {
    consumed: IntCounter,
    published: IntCounter,
    errors: IntCounterVec,
    in_flight: IntGauge,
    lag: IntGauge,
    lag_max: IntGauge,
}

impl DownlinkMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let consumed = IntCounter::new(
            "bridge_downlink_records_consumed_total",
            "Kafka records the downlink read.",
        )?;
        let published = IntCounter::new(
            "bridge_downlink_records_published_total",
            "Downlink publishes the MQTT broker acknowledged.",
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "bridge_downlink_errors_total",
                "Downlink errors, by kind: unroutable (a record given up on), refused (a publish \
                 the MQTT broker refused), dead_letter (its dead letter not written either), \
                 mqtt, kafka, commit.",
            ),
            &["kind"],
        )?;
        let in_flight = IntGauge::new(
            "bridge_downlink_in_flight",
            "Downlink publishes awaiting the broker's acknowledgement.",
        )?;
        let lag = IntGauge::new(
            "bridge_downlink_consumer_lag",
            "Records of the downlink's partitions not yet committed (not yet acknowledged by the \
             MQTT broker), summed over the partitions this member has; from librdkafka's \
             statistics every 5 s.",
        )?;
        let lag_max = IntGauge::new(
            "bridge_downlink_consumer_lag_max",
            "The consumer lag of this member's most lagging partition: a partition that stopped \
             moving shows here even when the others keep the sum low.",
        )?;
        for metric in [&in_flight, &lag, &lag_max] {
            registry.register(Box::new(metric.clone()))?;
        }
        registry.register(Box::new(consumed.clone()))?;
        registry.register(Box::new(published.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        // Every kind from the start, at 0 (an alert on an increase fires on the first).
        for kind in [
            "unroutable",
            "refused",
            "dead_letter",
            "mqtt",
            "kafka",
            "commit",
        ] {
            errors.with_label_values(&[kind]);
        }
        Ok(Self {
            consumed,
            published,
            errors,
            in_flight,
            lag,
            lag_max,
        })
    }
}

/// The publishing side: the MQTT connection, and which record each publish carries (kept
/// until the broker acknowledges it, so a refused one can become a dead letter).
struct Flight<L> {
    link: L,
    /// Publishes handed to the client, waiting for their packet id, in order.
    queued: VecDeque<(Owned, QoS)>,
    /// Publishes sent, by packet id, awaiting their acknowledgement.
    sent: HashMap<u16, Owned>,
}

impl<L: Link> Flight<L> {
    fn new(link: L) -> Self {
        Self {
            link,
            queued: VecDeque::new(),
            sent: HashMap::new(),
        }
    }

    /// Publishes the connection holds: its window, even for records whose partition was
    /// revoked meanwhile.
    fn pending(&self) -> usize {
        self.queued.len() + self.sent.len()
    }
}

/// What woke the task.
enum Wake {
    Stop,
    /// A dead letter was written (or could not be): its record is done.
    DeadLettered(Partition, i64),
    Mqtt(Result<LinkEvent, String>),
    /// The back-off after a connection failure is over.
    Reconnect,
    Kafka(Result<Owned, String>),
    Commit,
}

/// Completes at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A consumed record, owned.
struct Owned {
    partition: Partition,
    offset: i64,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    value: Vec<u8>,
}

impl Owned {
    fn of(message: &BorrowedMessage<'_>) -> Self {
        let headers = message.headers().map_or(Vec::new(), |headers| {
            headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        });
        Self {
            partition: (message.topic().to_owned(), message.partition()),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            headers,
            value: message.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// The downlink task.
pub struct Downlink {
    config: DownlinkConfig,
    metrics: DownlinkMetrics,
    offsets: Offsets,
    /// Writes dead letters, when a dead-letter topic is set.
    producer: Option<FutureProducer>,
    status: watch::Sender<DownlinkStatus>,
    /// What the consumer's context tells the task about the group.
    group: Arc<Group>,
    /// Records whose dead letter was written (or failed), reported back to the task.
    dead_letters: (
        mpsc::UnboundedSender<Position>,
        mpsc::UnboundedReceiver<Position>,
    ),
}

/// A record's place: its partition and offset.
type Position = (Partition, i64);

impl Downlink {
    pub fn new(config: DownlinkConfig, metrics: DownlinkMetrics) -> Self {
        let producer = config.dead_letter_topic.as_ref().and_then(|_| {
            let mut client = ClientConfig::new();
            client
                .set("bootstrap.servers", &config.brokers)
                .set("acks", "all")
                .set("message.timeout.ms", "30000")
                .set("log.connection.close", "false");
            for (key, value) in &config.properties {
                client.set(key, value);
            }
            client
                .create()
                .inspect_err(|e| warn!(error = %e, "Downlink: no dead-letter producer."))
                .ok()
        });
        Self {
            config,
            metrics,
            offsets: Offsets::default(),
            producer,
            status: watch::channel(DownlinkStatus::default()).0,
            group: Arc::default(),
            dead_letters: mpsc::unbounded_channel(),
        }
    }

    /// Follows the downlink's state.
    pub fn status(&self) -> watch::Receiver<DownlinkStatus> {
        self.status.subscribe()
    }

    /// Writes the dead letter of a record given up on: its key, value and headers, and
    /// headers saying why. The record is done once Kafka has it, or once that failed (counted
    /// and logged). Without a dead-letter topic it is done at once.
    fn dead_letter(&mut self, record: Owned, code: &str, reason: &str) {
        let (Some(producer), Some(topic)) = (&self.producer, &self.config.dead_letter_topic) else {
            self.offsets.done(&record.partition, record.offset);
            return;
        };
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 5);
        let ours = [
            (dead_letter::REASON, code.to_owned()),
            (dead_letter::KAFKA_TOPIC, record.partition.0.clone()),
            ("mqtt.dlq.partition", record.partition.1.to_string()),
            ("mqtt.dlq.offset", record.offset.to_string()),
            (dead_letter::ERROR, reason.to_owned()),
        ];
        for (key, value) in &ours {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_slice()),
            });
        }
        let mut letter = FutureRecord::to(topic)
            .payload(&record.value)
            .headers(headers);
        if let Some(key) = &record.key {
            letter = letter.key(key);
        }
        // The error owns the record back: keep only the error, so nothing borrowed escapes.
        let delivery = producer.send_result(letter).map_err(|(e, _)| e);
        let (done, errors) = (self.dead_letters.0.clone(), self.metrics.errors.clone());
        let (partition, offset) = (record.partition, record.offset);
        tokio::spawn(async move {
            let written = match delivery {
                Ok(delivery) => delivery.await.ok().and_then(|r| r.err().map(|(e, _)| e)),
                Err(e) => Some(e),
            };
            if let Some(e) = written {
                errors.with_label_values(&["dead_letter"]).inc();
                warn!(error = %e, "Downlink: dead letter not written; the record is dropped.");
            }
            let _ = done.send((partition, offset));
        });
    }

    fn consumer(&self) -> Result<StreamConsumer<DownlinkContext>, rdkafka::error::KafkaError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", &self.config.group_id)
            .set(
                "session.timeout.ms",
                self.config.session_timeout.as_millis().to_string(),
            )
            // librdkafka wants heartbeats well inside the session timeout.
            .set(
                "heartbeat.interval.ms",
                (self.config.session_timeout.as_millis() / 3)
                    .min(3000)
                    .to_string(),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &self.config.offset_reset)
            // librdkafka prefetches up to 64 MB per partition by default. 16 MB keeps the
            // task fed at full rate from tansu (4 MB did not: 58,000 msg/s against 100,000)
            // and bounds memory under a large backlog.
            .set("queued.max.messages.kbytes", "16384")
            // For the consumer lag gauges.
            .set("statistics.interval.ms", "5000")
            .set("log.connection.close", "false");
        if self.config.static_membership {
            client.set(
                "group.instance.id",
                format!("{}-downlink", self.config.mqtt.client_id),
            );
        }
        for (key, value) in &self.config.properties {
            client.set(key, value);
        }
        let consumer: StreamConsumer<DownlinkContext> =
            client.create_with_context(DownlinkContext {
                errors: self.metrics.errors.clone(),
                lag: (self.metrics.lag.clone(), self.metrics.lag_max.clone()),
                group: self.group.clone(),
            })?;
        let topics: Vec<String> = self
            .config
            .topics
            .iter()
            .map(|t| match t.strip_prefix("re:") {
                Some(pattern) if pattern.starts_with('^') => pattern.to_owned(),
                Some(pattern) => format!("^{pattern}"),
                None => t.clone(),
            })
            .collect();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(consumer)
    }

    /// Runs until `shutdown` completes, then waits briefly for acknowledgements in flight and
    /// commits what they allow.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let consumer = match self.consumer() {
            Ok(consumer) => consumer,
            Err(e) => {
                warn!(error = %e, "Downlink: cannot create the Kafka consumer; downlink off.");
                self.metrics.errors.with_label_values(&["kafka"]).inc();
                return;
            }
        };
        // Over WebSockets the downlink's connection goes through an adapter of its own.
        let _adapter = match mkb_mqtt::websocket::endpoint(&self.config.mqtt) {
            Ok((local, adapter)) => {
                self.config.mqtt = local;
                adapter
            }
            Err(e) => {
                warn!(error = %e, "Downlink: cannot start the WebSocket adapter; downlink off.");
                return;
            }
        };
        info!(topics = ?self.config.topics, group = %self.config.group_id, "Downlink started.");
        let mut flight = Flight::new(Connection::new(&self.config));
        let mut commit = tokio::time::interval(self.config.commit_interval);
        let mut backoff =
            mkb_mqtt::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut last_kafka_warning: Option<tokio::time::Instant> = None;
        // After a connection failure: when to connect again. The loop goes on meanwhile
        // (commits, dead letters, reading into the fresh connection's queue), so librdkafka's
        // callbacks keep being served.
        let mut reconnect_at: Option<tokio::time::Instant> = None;
        tokio::pin!(shutdown);
        loop {
            self.forget_revoked();
            let max = self.config.max_in_flight;
            let reading = self.offsets.in_flight() < max && flight.pending() < max;
            let wake = tokio::select! {
                biased;
                () = &mut shutdown => Wake::Stop,
                // Before the event loop: a steady stream of acknowledgements keeps it always
                // ready, and would otherwise hold commits back until the stream pauses.
                _ = commit.tick() => Wake::Commit,
                Some((partition, offset)) = self.dead_letters.1.recv() => {
                    Wake::DeadLettered(partition, offset)
                }
                () = sleep_until(reconnect_at), if reconnect_at.is_some() => Wake::Reconnect,
                event = flight.link.poll(), if reconnect_at.is_none() => Wake::Mqtt(event),
                message = consumer.recv(), if reading => {
                    Wake::Kafka(message.map(|m| Owned::of(&m)).map_err(|e| e.to_string()))
                }
            };
            match wake {
                Wake::Stop => break,
                Wake::Mqtt(Ok(event)) => {
                    if event == LinkEvent::Connected {
                        backoff.reset();
                        info!("Downlink connected to the MQTT broker.");
                        self.status.send_modify(|s| {
                            s.connected = true;
                            s.last_error = None;
                        });
                    }
                    self.on_event(&mut flight, event);
                }
                Wake::Mqtt(Err(e)) => {
                    self.metrics.errors.with_label_values(&["mqtt"]).inc();
                    let delay = backoff.next_delay();
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.last_error = Some(e.clone());
                    });
                    warn!(
                        error = %e, retry_in = ?delay,
                        "Downlink MQTT connection failed; publishing again what was in flight."
                    );
                    for ((topic, partition), offset) in self.offsets.abandon() {
                        let sought = consumer.seek(
                            &topic,
                            partition,
                            Offset::Offset(offset),
                            Duration::from_secs(5),
                        );
                        if let Err(e) = sought {
                            warn!(error = %e, topic, partition, offset, "Downlink: cannot rewind.");
                        }
                    }
                    self.metrics.in_flight.set(0);
                    flight = Flight::new(Connection::new(&self.config));
                    reconnect_at = Some(tokio::time::Instant::now() + delay);
                }
                Wake::Reconnect => reconnect_at = None,
                Wake::Kafka(Ok(record)) => self.on_record(&mut flight, record),
                Wake::DeadLettered(partition, offset) => {
                    self.offsets.done(&partition, offset);
                    self.metrics.in_flight.set(self.offsets.in_flight() as i64);
                }
                Wake::Kafka(Err(e)) => {
                    self.metrics.errors.with_label_values(&["kafka"]).inc();
                    // librdkafka reports every failed attempt while Kafka is down.
                    if last_kafka_warning.is_none_or(|at| at.elapsed() >= WARN_INTERVAL) {
                        warn!(error = %e, "Downlink: Kafka consumer error.");
                        last_kafka_warning = Some(tokio::time::Instant::now());
                    }
                }
                Wake::Commit => {
                    self.commit(&consumer);
                    let assigned = self.group.assigned.load(Ordering::Relaxed);
                    self.status.send_if_modified(|s| {
                        std::mem::replace(&mut s.assigned, assigned) != assigned
                    });
                }
            }
        }
        self.drain(&mut flight, &consumer).await;
    }

    /// Stops tracking the partitions the group took away: their publishes still in flight
    /// may finish, but nothing more is committed for them (the new owner reads again from the
    /// last commit: duplicates, never a commit past a record not acknowledged).
    fn forget_revoked(&mut self) {
        if !self.group.revoked_any.swap(false, Ordering::AcqRel) {
            return;
        }
        let revoked = std::mem::take(&mut *self.group.revoked.lock().expect("revoked lock"));
        for partition in &revoked {
            self.offsets.forget(partition);
        }
        self.metrics.in_flight.set(self.offsets.in_flight() as i64);
    }

    /// Publishes one record, or gives up on it (counted, dead-lettered) when it has no usable
    /// topic or payload.
    fn on_record(&mut self, flight: &mut Flight<impl Link>, record: Owned) {
        self.metrics.consumed.inc();
        self.offsets.start(&record.partition, record.offset);
        let incoming = render::Incoming {
            topic: &record.partition.0,
            partition: record.partition.1,
            key: record.key.as_deref(),
            headers: &record.headers,
            value: &record.value,
        };
        let publish = match self.config.render.publish(&incoming) {
            Ok(publish) => publish,
            Err(reason) => {
                self.metrics.errors.with_label_values(&["unroutable"]).inc();
                warn!(
                    topic = %record.partition.0, partition = record.partition.1,
                    offset = record.offset, reason = %reason,
                    "Downlink record without a usable topic or payload; skipped."
                );
                self.dead_letter(record, "downlink_unroutable", &reason);
                return;
            }
        };
        let qos = publish.qos;
        // The request channel holds more than `max_in_flight`, so this never finds it full.
        match flight.link.publish(publish) {
            Ok(()) => flight.queued.push_back((record, qos)),
            Err(e) => {
                // Left in flight: the next connection failure, or shutdown, rewinds to it.
                warn!(error = %e, "Downlink: publish not queued.");
            }
        }
        self.metrics.in_flight.set(self.offsets.in_flight() as i64);
    }

    /// Follows the publishes through the connection: a packet id for each one sent, then its
    /// acknowledgement or refusal.
    fn on_event(&mut self, flight: &mut Flight<impl Link>, event: LinkEvent) {
        match event {
            LinkEvent::Sent(pkid) => {
                let Some((record, qos)) = flight.queued.pop_front() else {
                    return;
                };
                if qos == QoS::AtMostOnce {
                    // Written to the socket: all QoS 0 promises.
                    self.acknowledged(&record);
                } else {
                    flight.sent.insert(pkid, record);
                }
            }
            LinkEvent::Acknowledged(pkid) => {
                if let Some(record) = flight.sent.remove(&pkid) {
                    self.acknowledged(&record);
                }
            }
            LinkEvent::Refused(pkid, reason) => {
                if let Some(record) = flight.sent.remove(&pkid) {
                    self.metrics.errors.with_label_values(&["refused"]).inc();
                    warn!(
                        topic = %record.partition.0, partition = record.partition.1,
                        offset = record.offset, reason = %reason,
                        "The MQTT broker refused a downlink publish."
                    );
                    let reason = format!("the MQTT broker refused the publish: {reason}");
                    self.dead_letter(record, "downlink_refused", &reason);
                }
            }
            LinkEvent::Connected | LinkEvent::Other => {}
        }
    }

    fn acknowledged(&mut self, record: &Owned) {
        self.offsets.done(&record.partition, record.offset);
        self.metrics.published.inc();
        self.metrics.in_flight.set(self.offsets.in_flight() as i64);
    }

    /// Commits every position acknowledgements moved.
    fn commit(&mut self, consumer: &StreamConsumer<DownlinkContext>) {
        let positions = self.offsets.take_positions();
        if positions.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in &positions {
            if let Err(e) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
                warn!(error = %e, "Downlink: bad commit position.");
            }
        }
        if let Err(e) = consumer.commit(&list, CommitMode::Async) {
            self.metrics.errors.with_label_values(&["commit"]).inc();
            warn!(error = %e, "Downlink: commit failed; it is tried again with the next one.");
            self.offsets.recommit(&positions);
        }
    }

    /// Shutdown: stops reading, waits up to 2 s for the acknowledgements in flight, commits
    /// what they allow (closing the consumer sends the commit) and disconnects. What is still
    /// in flight is read again by the next start.
    async fn drain(
        &mut self,
        flight: &mut Flight<impl Link>,
        consumer: &StreamConsumer<DownlinkContext>,
    ) {
        let waited = tokio::time::timeout(DRAIN, async {
            while self.offsets.in_flight() > 0 {
                match flight.link.poll().await {
                    Ok(event) => self.on_event(flight, event),
                    Err(_) => break,
                }
            }
        })
        .await;
        if waited.is_err() {
            warn!(
                in_flight = self.offsets.in_flight(),
                "Downlink stopped with publishes unacknowledged; they are published again at the \
                 next start."
            );
        }
        self.forget_revoked();
        self.commit(consumer);
        flight.link.disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), flight.link.poll()).await;
        info!("Downlink stopped.");
    }
}

/// What the consumer's callbacks (run inside `recv`) tell the task about the consumer group.
#[derive(Default)]
struct Group {
    /// The group gave this member its partitions (possibly none).
    assigned: AtomicBool,
    /// Partitions taken away since the task last looked, and whether there are any.
    revoked: Mutex<Vec<Partition>>,
    revoked_any: AtomicBool,
}

/// The consumer's context: reports commits Kafka refused (they are made asynchronously),
/// follows the group's assignments, and turns librdkafka's statistics into the lag gauges.
struct DownlinkContext {
    errors: IntCounterVec,
    /// `bridge_downlink_consumer_lag` and `…_lag_max`.
    lag: (IntGauge, IntGauge),
    group: Arc<Group>,
}

impl rdkafka::ClientContext for DownlinkContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        // Partition -1 is librdkafka's own bookkeeping; a lag of -1 is not known yet.
        let lags = statistics
            .topics
            .values()
            .flat_map(|topic| topic.partitions.values())
            .filter(|p| p.partition >= 0 && p.desired && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag);
        let (sum, max) = lags.fold((0, 0), |(sum, max), lag| (sum + lag, max.max(lag)));
        self.lag.0.set(sum);
        self.lag.1.set(max);
    }
}

impl rdkafka::consumer::ConsumerContext for DownlinkContext {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            self.errors.with_label_values(&["commit"]).inc();
            warn!(error = %e, "Downlink: Kafka refused a commit; the next one covers it.");
        }
    }

    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Revoke(partitions) = rebalance {
            info!(
                partitions = partitions.count(),
                "Downlink: Kafka partitions revoked."
            );
            let mut revoked = self.group.revoked.lock().expect("revoked lock");
            revoked.extend(
                partitions
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition())),
            );
            self.group.revoked_any.store(true, Ordering::Release);
        }
    }

    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        // An assignment, even an empty one (more replicas than partitions), means this member
        // is in the group and takes its share.
        if let rdkafka::consumer::Rebalance::Assign(partitions) = rebalance {
            info!(
                partitions = partitions.count(),
                "Downlink: Kafka partitions assigned."
            );
            self.group.assigned.store(true, Ordering::Relaxed);
        }
    }
}

/// The downlink's state, as readiness needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DownlinkStatus {
    /// Its MQTT connection is up.
    pub connected: bool,
    /// The consumer group assigned this member its partitions (possibly none).
    pub assigned: bool,
    /// The latest MQTT connection problem.
    pub last_error: Option<String>,
}

/// At most one warning about consumer errors per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// How long shutdown waits for acknowledgements in flight.
const DRAIN: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use mkb_mqtt::{AckMode, MqttVersion};

    use super::*;

    /// A connection that takes every publish and is driven by the test's events.
    #[derive(Default)]
    struct Scripted {
        published: Mutex<Vec<(String, QoS)>>,
    }

    impl Link for Scripted {
        async fn poll(&mut self) -> Result<LinkEvent, String> {
            std::future::pending().await
        }

        fn publish(&self, publish: render::Publish) -> Result<(), String> {
            let mut published = self.published.lock().expect("lock");
            published.push((publish.topic, publish.qos));
            Ok(())
        }

        fn disconnect(&self) {}
    }

    fn downlink() -> (Downlink, Registry) {
        let mqtt = MqttConfig {
            host: "mqtt.invalid".to_owned(),
            port: 1883,
            version: MqttVersion::V311,
            client_id: "bridge".to_owned(),
            filters: vec!["up/#".to_owned()],
            qos: QoS::AtLeastOnce,
            keep_alive: Duration::from_secs(30),
            clean_session: true,
            max_packet_size: 1 << 20,
            dead_letter_topic: None,
            receive_maximum: 1000,
            credentials: None,
            tls: None,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            ack_mode: AckMode::AfterWrite,
            shutdown_grace: Duration::from_secs(5),
            websocket_path: None,
        };
        let config = DownlinkConfig {
            brokers: "kafka.invalid:9092".to_owned(),
            properties: Vec::new(),
            topics: vec!["commands".to_owned()],
            group_id: "g".to_owned(),
            session_timeout: Duration::from_secs(45),
            static_membership: false,
            offset_reset: "earliest".to_owned(),
            render: Render {
                topic: Some(TopicTemplate::parse("cars/{key}").expect("template")),
                format: Format::Raw,
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: false,
            },
            max_in_flight: 10,
            commit_interval: Duration::from_millis(250),
            dead_letter_topic: None,
            mqtt,
        };
        let registry = Registry::new();
        let metrics = DownlinkMetrics::new(&registry).expect("metrics");
        (Downlink::new(config, metrics), registry)
    }

    fn record(offset: i64, key: &str, qos: Option<&str>) -> Owned {
        Owned {
            partition: ("commands".to_owned(), 0),
            offset,
            key: Some(key.as_bytes().to_vec()),
            headers: qos
                .map(|q| vec![("mqtt.qos".to_owned(), q.as_bytes().to_vec())])
                .unwrap_or_default(),
            value: b"v".to_vec(),
        }
    }

    fn counter(registry: &Registry, name: &str, kind: Option<&str>) -> f64 {
        registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric())
            .filter(|m| kind.is_none_or(|k| m.get_label().iter().any(|l| l.value() == k)))
            .map(|m| m.get_counter().get_value())
            .sum()
    }

    /// The commit position follows acknowledgements in packet-id order, not arrival order;
    /// QoS 0 is done once written; a refused publish is given up on (counted; here without a
    /// dead-letter topic) and no longer holds its partition back.
    #[test]
    fn positions_follow_acknowledgements_and_a_refusal_never_blocks() {
        let (mut downlink, registry) = downlink();
        let mut flight = Flight::new(Scripted::default());
        downlink.on_record(&mut flight, record(0, "a", None));
        downlink.on_record(&mut flight, record(1, "b", None));
        downlink.on_record(&mut flight, record(2, "c", Some("0")));
        downlink.on_record(&mut flight, record(3, "#", None));
        assert_eq!(
            *flight.link.published.lock().expect("lock"),
            [
                ("cars/a".to_owned(), QoS::AtLeastOnce),
                ("cars/b".to_owned(), QoS::AtLeastOnce),
                ("cars/c".to_owned(), QoS::AtMostOnce),
            ],
            "the record with a wildcard key is not published"
        );
        assert_eq!(
            counter(
                &registry,
                "bridge_downlink_errors_total",
                Some("unroutable")
            ),
            1.0
        );
        for event in [LinkEvent::Sent(1), LinkEvent::Sent(2), LinkEvent::Sent(0)] {
            downlink.on_event(&mut flight, event);
        }
        downlink.on_event(&mut flight, LinkEvent::Acknowledged(2));
        assert_eq!(
            downlink.offsets.take_positions(),
            [(("commands".to_owned(), 0), 0)],
            "offset 0 still in flight holds the position"
        );
        downlink.on_event(
            &mut flight,
            LinkEvent::Refused(1, "PUBACK NotAuthorized".into()),
        );
        assert_eq!(
            downlink.offsets.take_positions(),
            [(("commands".to_owned(), 0), 4)],
            "everything acknowledged, written (QoS 0), refused or unroutable"
        );
        assert_eq!(
            counter(&registry, "bridge_downlink_errors_total", Some("refused")),
            1.0
        );
        assert_eq!(
            counter(&registry, "bridge_downlink_records_published_total", None),
            2.0,
            "offset 1 (acknowledged) and 2 (QoS 0)"
        );
        assert_eq!(flight.pending(), 0);
        // An acknowledgement nobody waits for (a previous connection's) changes nothing.
        downlink.on_event(&mut flight, LinkEvent::Acknowledged(9));
        assert_eq!(downlink.offsets.in_flight(), 0);
    }
}
