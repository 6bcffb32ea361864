//! Reading what the bridge wrote: an rdkafka consumer assigned to every partition of a topic
//! from the beginning (no consumer group offsets), decoding each envelope.

use std::time::Duration;

use mkb_bridge::envelope;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// One record read back from Kafka, envelope decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub key: Option<Vec<u8>>,
    /// The envelope's `topic`: the MQTT topic the message was published to.
    pub mqtt_topic: String,
    pub payload: Vec<u8>,
    /// The raw record value, for byte-level checks.
    pub value: Vec<u8>,
    /// Kafka headers, name and value (a null value reads as empty).
    pub headers: Vec<(String, Vec<u8>)>,
    pub partition: i32,
    pub offset: i64,
}

/// Reads a topic from its first offset.
pub struct KafkaReader {
    consumer: StreamConsumer,
    /// Values are not envelopes: `payload` is the value, `mqtt_topic` the `mqtt.topic` header.
    raw: bool,
    pub received: Vec<Received>,
}

impl Received {
    /// The value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        header_text(&self.headers, name)
    }
}

/// The value of header `name` among `headers`, as text.
fn header_text(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

impl KafkaReader {
    /// [`KafkaReader::new`] for values that are not envelopes (`raw` or `json` formats).
    pub async fn new_raw(brokers: &str, topic: &str) -> Self {
        Self {
            raw: true,
            ..Self::new(brokers, topic).await
        }
    }

    /// Assigns every partition of `topic` (which must exist within 20 s) from the beginning.
    pub async fn new(brokers: &str, topic: &str) -> Self {
        let mut config = ClientConfig::new();
        if let Ok(debug) = std::env::var("MKB_READER_DEBUG") {
            config.set("debug", debug);
        }
        let consumer: StreamConsumer = config
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("mkb-test-{}", crate::unique()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // The bridge writes no transactions. tansu's last stable offset can stall after a
            // producer is fenced and replaced, which read_committed would stop at.
            .set("isolation.level", "read_uncommitted")
            .set("log.connection.close", "false")
            .create()
            .expect("create Kafka consumer");
        let partitions = crate::eventually(
            Duration::from_secs(20),
            &format!("Kafka topic {topic} to exist"),
            || {
                let metadata = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .ok();
                async move {
                    let metadata = metadata?;
                    let found = metadata.topics().iter().find(|t| t.name() == topic)?;
                    if found.error().is_some() || found.partitions().is_empty() {
                        return None;
                    }
                    Some(found.partitions().len())
                }
            },
        )
        .await;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            let partition = i32::try_from(partition).expect("few partitions");
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .expect("valid offset");
        }
        consumer.assign(&assignment).expect("assign partitions");
        Self {
            consumer,
            raw: false,
            received: Vec::new(),
        }
    }

    /// Reads until at least `count` records in all were read or `deadline` passed; returns
    /// everything read so far.
    pub async fn read_at_least(&mut self, count: usize, deadline: Duration) -> &[Received] {
        let give_up = tokio::time::Instant::now() + deadline;
        while self.received.len() < count {
            let Ok(next) = tokio::time::timeout_at(give_up, self.consumer.recv()).await else {
                break;
            };
            let message = next.expect("Kafka consumer error");
            let value = message.payload().unwrap_or_default().to_vec();
            let headers: Vec<(String, Vec<u8>)> = message.headers().map_or(Vec::new(), |h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            });
            let header = |name: &str| header_text(&headers, name);
            // A dead letter may have lost its value (too large): its header names the topic.
            let decoded = match (envelope::decode(&value), header("mqtt.dlq.reason")) {
                _ if self.raw => envelope::Decoded {
                    topic: header("mqtt.topic").unwrap_or_default(),
                    payload: value.clone(),
                },
                (Ok(decoded), _) => decoded,
                (Err(_), Some(_)) => envelope::Decoded {
                    topic: header("mqtt.topic").unwrap_or_default(),
                    payload: value.clone(),
                },
                (Err(e), None) => panic!("{e}: {:?}", String::from_utf8_lossy(&value)),
            };
            self.received.push(Received {
                key: message.key().map(<[u8]>::to_vec),
                mqtt_topic: decoded.topic,
                payload: decoded.payload,
                headers,
                value,
                partition: message.partition(),
                offset: message.offset(),
            });
        }
        &self.received
    }

    /// Per partition: (last offset read, the broker's high watermark), for diagnosing stalls.
    pub fn positions(&self) -> Vec<(i32, i64, i64)> {
        let Ok(assignment) = self.consumer.assignment() else {
            return Vec::new();
        };
        assignment
            .elements()
            .iter()
            .map(|tp| {
                let read = self
                    .received
                    .iter()
                    .filter(|r| r.partition == tp.partition())
                    .map(|r| r.offset)
                    .max()
                    .unwrap_or(-1);
                let high = self
                    .consumer
                    .fetch_watermarks(tp.topic(), tp.partition(), Duration::from_secs(5))
                    .map_or(-1, |(_, high)| high);
                (tp.partition(), read, high)
            })
            .collect()
    }

    /// Per partition: the offsets below the broker's high watermark that were not read (at
    /// most `limit`), and how many were read. Tells records never stored from records stored
    /// and not served.
    pub fn unread_offsets(&self, limit: usize) -> Vec<String> {
        self.positions()
            .into_iter()
            .map(|(partition, _, high)| {
                let read: std::collections::BTreeSet<i64> = self
                    .received
                    .iter()
                    .filter(|r| r.partition == partition)
                    .map(|r| r.offset)
                    .collect();
                let unread: Vec<i64> = (0..high)
                    .filter(|o| !read.contains(o))
                    .take(limit)
                    .collect();
                format!(
                    "partition {partition}: {} offsets read, high watermark {high}, offsets not \
                     read {unread:?}",
                    read.len()
                )
            })
            .collect()
    }

    /// Reads until `done` says so (given everything read so far) or `deadline` passed; returns
    /// whether `done` was satisfied.
    pub async fn read_until(
        &mut self,
        deadline: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> bool {
        let give_up = tokio::time::Instant::now() + deadline;
        while !done(&self.received) {
            let remaining = give_up.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return false;
            }
            // Read in large steps: `done` may look at everything read so far.
            let wanted = self.received.len() + 5000;
            self.read_at_least(wanted, remaining.min(Duration::from_millis(300)))
                .await;
        }
        true
    }

    /// Reads until `count` records were read, failing the test after `deadline`.
    pub async fn read_exactly(&mut self, count: usize, deadline: Duration) -> &[Received] {
        let read = self.read_at_least(count, deadline).await.len();
        assert!(
            read >= count,
            "read {read} of {count} records from Kafka within {deadline:?}"
        );
        &self.received
    }
}

/// Creates `topic` with `partitions` partitions (a test's own downlink topic).
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    for result in results {
        result.expect("topic created");
    }
}

/// A producer for test records, keyed, with headers.
pub struct KafkaWriter {
    producer: rdkafka::producer::FutureProducer,
}

impl KafkaWriter {
    pub fn new(brokers: &str) -> Self {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "1")
            .create()
            .expect("create producer");
        Self { producer }
    }

    /// Writes one record and waits for Kafka's acknowledgement.
    pub async fn write(&self, topic: &str, key: &str, value: &[u8], headers: &[(&str, &str)]) {
        let mut owned = rdkafka::message::OwnedHeaders::new();
        for (name, value) in headers {
            owned = owned.insert(rdkafka::message::Header {
                key: name,
                value: Some(*value),
            });
        }
        let record = rdkafka::producer::FutureRecord::to(topic)
            .key(key)
            .payload(value)
            .headers(owned);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("Kafka takes the record");
    }
}
