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
//! configured format, is counted, logged and written to the dead-letter topic when one is set
//! (committed once Kafka has it); it never blocks its partition.

mod offsets;
pub mod render;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use mkb_bridge::QoS;
use mkb_bridge::dead_letter;
use mkb_mqtt::MqttConfig;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

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
                "Downlink errors, by kind: unroutable (a record given up on), dead_letter (its \
                 dead letter not written either), mqtt, kafka, commit.",
            ),
            &["kind"],
        )?;
        let in_flight = IntGauge::new(
            "bridge_downlink_in_flight",
            "Downlink publishes awaiting the broker's acknowledgement.",
        )?;
        registry.register(Box::new(consumed.clone()))?;
        registry.register(Box::new(published.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(Self {
            consumed,
            published,
            errors,
            in_flight,
        })
    }
}

/// The publishing side: the MQTT client, and which record each publish carries.
struct Link {
    client: AsyncClient,
    eventloop: EventLoop,
    /// Publishes handed to the client, waiting for their packet id, in order.
    queued: VecDeque<(Partition, i64, QoS)>,
    /// Publishes sent, by packet id, awaiting their acknowledgement.
    sent: HashMap<u16, (Partition, i64)>,
}

impl Link {
    fn new(config: &DownlinkConfig) -> Self {
        let client_id = format!("{}-downlink", config.mqtt.client_id);
        let mut options = mkb_mqtt::options_311(&config.mqtt, &client_id);
        options
            .set_clean_session(true)
            .set_inflight(config.max_in_flight.clamp(1, 65_535) as u16);
        let (client, eventloop) = AsyncClient::new(options, config.max_in_flight + 16);
        Self {
            client,
            eventloop,
            queued: VecDeque::new(),
            sent: HashMap::new(),
        }
    }
}

/// What woke the task.
enum Wake {
    Stop,
    /// A dead letter was written (or could not be): its record is done.
    DeadLettered(Partition, i64),
    Mqtt(Result<Event, rumqttc::ConnectionError>),
    Kafka(Result<Owned, String>),
    Commit,
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
    /// Set by the consumer's context once the group assigned partitions.
    assigned: Arc<AtomicBool>,
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
            assigned: Arc::default(),
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
    fn dead_letter(&mut self, record: Owned, reason: &str) {
        let (Some(producer), Some(topic)) = (&self.producer, &self.config.dead_letter_topic) else {
            self.offsets.done(&record.partition, record.offset);
            return;
        };
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 5);
        let ours = [
            (dead_letter::REASON, "downlink_unroutable".to_owned()),
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
            // Static membership: a bridge restarted with the same client id (a StatefulSet's
            // pod name) takes its partitions back at once, instead of after the session
            // timeout of the member it replaces.
            .set(
                "group.instance.id",
                format!("{}-downlink", self.config.mqtt.client_id),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &self.config.offset_reset)
            .set("log.connection.close", "false");
        for (key, value) in &self.config.properties {
            client.set(key, value);
        }
        let consumer: StreamConsumer<DownlinkContext> =
            client.create_with_context(DownlinkContext {
                errors: self.metrics.errors.clone(),
                assigned: self.assigned.clone(),
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
        info!(topics = ?self.config.topics, group = %self.config.group_id, "Downlink started.");
        let mut link = Link::new(&self.config);
        let mut commit = tokio::time::interval(self.config.commit_interval);
        let mut backoff =
            mkb_mqtt::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut last_kafka_warning: Option<tokio::time::Instant> = None;
        tokio::pin!(shutdown);
        loop {
            let reading = self.offsets.in_flight() < self.config.max_in_flight;
            let wake = tokio::select! {
                biased;
                () = &mut shutdown => Wake::Stop,
                // Before the event loop: a steady stream of acknowledgements keeps it always
                // ready, and would otherwise hold commits back until the stream pauses.
                _ = commit.tick() => Wake::Commit,
                Some((partition, offset)) = self.dead_letters.1.recv() => {
                    Wake::DeadLettered(partition, offset)
                }
                event = link.eventloop.poll() => Wake::Mqtt(event),
                message = consumer.recv(), if reading => {
                    Wake::Kafka(message.map(|m| Owned::of(&m)).map_err(|e| e.to_string()))
                }
            };
            match wake {
                Wake::Stop => break,
                Wake::Mqtt(Ok(event)) => {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                        backoff.reset();
                        info!("Downlink connected to the MQTT broker.");
                        self.status.send_modify(|s| {
                            s.connected = true;
                            s.last_error = None;
                        });
                    }
                    self.on_event(&mut link, event);
                }
                Wake::Mqtt(Err(e)) => {
                    self.metrics.errors.with_label_values(&["mqtt"]).inc();
                    let delay = backoff.next_delay();
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.last_error = Some(e.to_string());
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
                    link = Link::new(&self.config);
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Wake::Kafka(Ok(record)) => self.on_record(&mut link, record),
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
                    let assigned = self.assigned.load(Ordering::Relaxed);
                    self.status.send_if_modified(|s| {
                        std::mem::replace(&mut s.assigned, assigned) != assigned
                    });
                }
            }
        }
        self.drain(&mut link, &consumer).await;
    }

    /// Publishes one record, or skips it (counted) when it has no usable topic or payload.
    fn on_record(&mut self, link: &mut Link, record: Owned) {
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
                self.dead_letter(record, &reason);
                return;
            }
        };
        let qos = match publish.qos {
            QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
            QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
            QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
        };
        // The request channel holds more than `max_in_flight`, so this never finds it full.
        match link
            .client
            .try_publish(publish.topic, qos, publish.retain, publish.payload)
        {
            Ok(()) => link
                .queued
                .push_back((record.partition, record.offset, publish.qos)),
            Err(e) => {
                // Left in flight: the next connection failure, or shutdown, rewinds to it.
                warn!(error = %e, "Downlink: publish not queued.");
            }
        }
        self.metrics.in_flight.set(self.offsets.in_flight() as i64);
    }

    /// Follows the publishes through the event loop: a packet id for each one sent, then its
    /// acknowledgement.
    fn on_event(&mut self, link: &mut Link, event: Event) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let Some((partition, offset, qos)) = link.queued.pop_front() else {
                    return;
                };
                if qos == QoS::AtMostOnce {
                    // Written to the socket: all QoS 0 promises.
                    self.acknowledged(&partition, offset);
                } else {
                    link.sent.insert(pkid, (partition, offset));
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some((partition, offset)) = link.sent.remove(&ack.pkid) {
                    self.acknowledged(&partition, offset);
                }
            }
            Event::Incoming(Packet::PubComp(comp)) => {
                if let Some((partition, offset)) = link.sent.remove(&comp.pkid) {
                    self.acknowledged(&partition, offset);
                }
            }
            _ => {}
        }
    }

    fn acknowledged(&mut self, partition: &Partition, offset: i64) {
        self.offsets.done(partition, offset);
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
    /// what they allow (closing the consumer sends the commit) and disconnects. What is still in flight is read again
    /// by the next start.
    async fn drain(&mut self, link: &mut Link, consumer: &StreamConsumer<DownlinkContext>) {
        let waited = tokio::time::timeout(DRAIN, async {
            while self.offsets.in_flight() > 0 {
                match link.eventloop.poll().await {
                    Ok(event) => self.on_event(link, event),
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
        self.commit(consumer);
        let _ = link.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), link.eventloop.poll()).await;
        info!("Downlink stopped.");
    }
}

/// The consumer's context: reports commits Kafka refused (they are made asynchronously), and
/// notes when the group gave this member its partitions.
struct DownlinkContext {
    errors: IntCounterVec,
    assigned: Arc<AtomicBool>,
}

impl rdkafka::ClientContext for DownlinkContext {}

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
            self.assigned.store(true, Ordering::Relaxed);
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
