//! The downlink against real Mosquitto and tansu: records written to Kafka reach an MQTT
//! subscriber byte for byte, in key order, through a broker restart and through kill -9 of the
//! bridge (at least once), and a record without a usable topic never blocks its partition.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mkb_tests::kafka::{KafkaReader, KafkaWriter, create_topic};
use mkb_tests::mqtt::Subscriber;
use mkb_tests::{
    BridgeProcess, Fault, FaultProxy, Mosquitto, MosquittoOptions, Publisher, RunningBridge, Tansu,
    bridge_config, bridge_env, brokers, eventually, http_get, init_logging, metric_value,
};
use rumqttc::QoS;

const DEADLINE: Duration = Duration::from_secs(60);

/// Fresh brokers and a downlink topic of `partitions` partitions.
struct Setup {
    kafka: Tansu,
    mqtt: Mosquitto,
    /// The uplink's Kafka topic (unused by most of these tests).
    topic: String,
    /// The downlink's Kafka topic.
    commands: String,
}

impl Setup {
    async fn new(partitions: i32) -> Self {
        let (kafka, mqtt, topic) = brokers();
        Self::with(kafka, mqtt, topic, partitions).await
    }

    async fn with(kafka: Tansu, mqtt: Mosquitto, topic: String, partitions: i32) -> Self {
        let commands = format!("commands-{}", mkb_tests::unique());
        create_topic(&kafka.brokers(), &commands, partitions).await;
        Self {
            kafka,
            mqtt,
            topic,
            commands,
        }
    }

    /// A downlink reading the commands topic from the start, raw values, plus `extra`.
    fn overrides<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut overrides = vec![
            ("DOWNLINK_KAFKA_TOPICS", self.commands.as_str()),
            ("DOWNLINK_OFFSET_RESET", "earliest"),
            ("DOWNLINK_VALUE_FORMAT", "raw"),
        ];
        overrides.extend_from_slice(extra);
        overrides
    }

    /// An in-process bridge with [`Setup::overrides`], subscribed.
    async fn bridge(&self, extra: &[(&str, &str)]) -> RunningBridge {
        self.bridge_at(self.mqtt.port(), extra).await
    }

    /// [`Setup::bridge`] reaching MQTT through `mqtt_port` (a proxy's).
    async fn bridge_at(&self, mqtt_port: u16, extra: &[(&str, &str)]) -> RunningBridge {
        let config = bridge_config(
            mqtt_port,
            self.kafka.port(),
            &self.topic,
            "unused/#",
            &self.overrides(extra),
        );
        let bridge = RunningBridge::start(config).await.expect("bridge starts");
        bridge.wait_subscribed().await;
        bridge
    }
}

/// The uplink writes MQTT messages to Kafka; the downlink reads them back and publishes them
/// to other topics; a subscriber gets every payload byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_returns_every_payload_byte_for_byte() {
    init_logging();
    let (kafka, mqtt, topic) = brokers();
    let config = bridge_config(
        mqtt.port(),
        kafka.port(),
        &topic,
        "up/#",
        &[
            ("DOWNLINK_KAFKA_TOPICS", &topic),
            ("DOWNLINK_OFFSET_RESET", "earliest"),
            ("DOWNLINK_MQTT_TOPIC", "down/{key}"),
        ],
    );
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    // Ready once the downlink is connected and has its partitions, too.
    eventually(DEADLINE, "/readyz 200 with the downlink", || async {
        let readyz = http_get(bridge.health_addr, "/readyz").await;
        readyz.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    let subscriber = Subscriber::connect(mqtt.port(), "down/#").await;
    let payloads: Vec<Vec<u8>> = vec![
        b"plain".to_vec(),
        Vec::new(),
        (0..=255u8).collect(),
        vec![b'x'; 100_000],
    ];
    let publisher = Publisher::connect(mqtt.port()).await;
    for (n, payload) in payloads.iter().enumerate() {
        publisher
            .publish(&format!("up/{n}"), payload.clone(), QoS::AtLeastOnce)
            .await;
    }
    let received = subscriber
        .wait_until(DEADLINE, "every payload back", |r| {
            r.len() >= payloads.len()
        })
        .await;
    for (n, payload) in payloads.iter().enumerate() {
        let topic = format!("down/up/{n}");
        let back: Vec<&Vec<u8>> = received
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, p)| p)
            .collect();
        assert_eq!(back, [payload], "{topic}");
    }
    eventually(
        DEADLINE,
        "the publishes acknowledged and counted",
        || async {
            let published = bridge
                .metric("bridge_downlink_records_published_total")
                .await;
            (published >= payloads.len() as f64).then_some(())
        },
    )
    .await;
    bridge.stop().await.expect("clean stop");
}

/// Records keyed by device over three partitions: each device's commands reach MQTT in the
/// order they were written. A record without a usable topic in the middle is skipped and
/// counted; the records behind it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_arrive_in_order_and_an_unroutable_one_never_blocks() {
    init_logging();
    let setup = Setup::new(3).await;
    let (kafka, mqtt, commands) = (&setup.kafka, &setup.mqtt, &setup.commands);
    let dlq = format!("dlq-{}", mkb_tests::unique());
    let bridge = setup.bridge(&[("KAFKA_DLQ_TOPIC", &dlq)]).await;
    let subscriber = Subscriber::connect(mqtt.port(), "cars/#").await;
    let writer = KafkaWriter::new(&kafka.brokers());
    let count = 300;
    for n in 0..count {
        let car = format!("car-{}", n % 5);
        let mqtt_topic = format!("cars/{car}/cmd");
        writer
            .write(
                commands,
                &car,
                n.to_string().as_bytes(),
                &[("mqtt.topic", &mqtt_topic)],
            )
            .await;
        if n == 100 {
            // No mqtt.topic header, no template, not an envelope: nowhere to publish it.
            writer.write(commands, "car-0", b"lost", &[]).await;
        }
    }
    let received = subscriber
        .wait_until(DEADLINE, "every command", |r| r.len() >= count)
        .await;
    let mut per_car: HashMap<&str, Vec<u64>> = HashMap::new();
    for (topic, payload) in &received {
        let n: u64 = std::str::from_utf8(payload)
            .expect("UTF-8")
            .parse()
            .expect("a number");
        per_car.entry(topic.as_str()).or_default().push(n);
    }
    for (car, numbers) in &per_car {
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "{car}: {numbers:?}"
        );
    }
    assert_eq!(per_car.values().map(Vec::len).sum::<usize>(), count);
    let metrics = bridge.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "bridge_downlink_errors_total{kind=\"unroutable\"}"
        ),
        1.0
    );
    // The unroutable record is in the dead-letter topic, with why.
    let mut reader = KafkaReader::new_raw(&kafka.brokers(), &dlq).await;
    let letter = reader.read_exactly(1, DEADLINE).await[0].clone();
    assert_eq!(letter.value, b"lost");
    assert_eq!(letter.key.as_deref(), Some(&b"car-0"[..]));
    assert_eq!(
        letter.header("mqtt.dlq.reason").as_deref(),
        Some("downlink_unroutable")
    );
    assert_eq!(
        letter.header("mqtt.dlq.topic").as_deref(),
        Some(commands.as_str())
    );
    assert!(
        letter
            .header("mqtt.dlq.error")
            .unwrap_or_default()
            .contains("no MQTT topic")
    );
    bridge.stop().await.expect("clean stop");
}

/// Mosquitto restarted in the middle of the stream: the publishes in flight are sent again on
/// the new connection; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() {
    init_logging();
    let mut setup = Setup::new(1).await;
    let bridge = setup
        .bridge(&[("DOWNLINK_MQTT_TOPIC", "restart/{key}")])
        .await;
    let (kafka, commands) = (&setup.kafka, setup.commands.clone());
    let writer = KafkaWriter::new(&kafka.brokers());
    let count = 2000u64;
    for n in 0..count / 2 {
        writer
            .write(&commands, "k", n.to_string().as_bytes(), &[])
            .await;
    }
    // The broker forgets everything (no persistence): the subscriber connects afterwards.
    setup.mqtt.restart();
    let subscriber = Subscriber::connect(setup.mqtt.port(), "restart/#").await;
    for n in count / 2..count {
        writer
            .write(&commands, "k", n.to_string().as_bytes(), &[])
            .await;
    }
    let received = subscriber
        .wait_until(DEADLINE, "the records written after the restart", |r| {
            let seen: std::collections::HashSet<&[u8]> =
                r.iter().map(|(_, p)| p.as_slice()).collect();
            (count / 2..count).all(|n| seen.contains(n.to_string().as_bytes()))
        })
        .await;
    eprintln!(
        "after the broker restart: {} publishes received",
        received.len()
    );
    bridge.stop().await.expect("clean stop");
}

/// kill -9 of the bridge five times while 10,000 records go out: every record reaches the
/// subscriber at least once (a record is committed only after the broker acknowledged it), and
/// a restarted bridge goes on from its commits rather than from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_loses_no_record() {
    init_logging();
    let setup = Setup::new(2).await;
    let (kafka, mqtt, commands) = (&setup.kafka, &setup.mqtt, &setup.commands);
    let subscriber = Subscriber::connect(mqtt.port(), "killed/#").await;
    let env = bridge_env(
        mqtt.port(),
        kafka.port(),
        &setup.topic,
        "unused/#",
        &setup.overrides(&[
            ("DOWNLINK_MQTT_TOPIC", "killed/{key}"),
            ("MQTT_CLIENT_ID", "downlink-killed"),
            // The restarted bridge replaces the killed one in the group at once. As a new
            // member it would wait for the killed one's session to expire, and tansu 0.6 can
            // leave the partitions with the dead member longer than that (measured: a
            // restarted bridge assigned none 9 s after joining).
            ("DOWNLINK_STATIC_MEMBERSHIP", "true"),
        ]),
    );
    let count = 10_000u64;
    // Written at about 250 a second while the bridges come and go (each takes seconds to join
    // the consumer group).
    let (produce, _) = paced_writes(&kafka.brokers(), commands, count, 4, 4);
    let mut kills = 0;
    while kills < 5 && distinct(&subscriber.received()) < count {
        let before = subscriber.received().len();
        let mut bridge = BridgeProcess::start(&env);
        bridge.wait_subscribed().await;
        eventually(DEADLINE, "the downlink publishing", || {
            let now = subscriber.received().len();
            async move { (now > before).then_some(()) }
        })
        .await;
        // Killed at a random moment, wherever the publishes and commits are.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..800))).await;
        bridge.kill();
        kills += 1;
        let received = subscriber.received();
        eprintln!(
            "kill {kills}: {} publishes received, {} distinct",
            received.len(),
            distinct(&received)
        );
    }
    produce.await.expect("producer");
    let mut bridge = BridgeProcess::start(&env);
    bridge.wait_subscribed().await;
    let received = subscriber
        .wait_until(
            Duration::from_secs(120),
            "every record at least once",
            |r| distinct(r) >= count,
        )
        .await;
    eprintln!(
        "10,000 records, {kills} kills: {} publishes received, {} duplicates",
        received.len(),
        received.len() as u64 - count
    );
    assert!(
        kills >= 3,
        "the bridge was killed while publishing ({kills} times)"
    );
    bridge.terminate();
    bridge.wait(Duration::from_secs(30));
}

/// Committed offsets hold across restarts: a bridge started again after a clean stop does not
/// publish what was acknowledged before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_publishes_only_what_was_not_acknowledged() {
    init_logging();
    let setup = Setup::new(1).await;
    let (kafka, mqtt, commands) = (&setup.kafka, &setup.mqtt, &setup.commands);
    let overrides = [
        ("DOWNLINK_MQTT_TOPIC", "again/{key}"),
        ("MQTT_CLIENT_ID", "downlink-restart"),
    ];
    let subscriber = Subscriber::connect(mqtt.port(), "again/#").await;
    let writer = KafkaWriter::new(&kafka.brokers());
    for n in 0..50u64 {
        writer
            .write(commands, "k", n.to_string().as_bytes(), &[])
            .await;
    }
    let bridge = setup.bridge(&overrides).await;
    subscriber
        .wait_until(DEADLINE, "the first 50", |r| r.len() >= 50)
        .await;
    bridge.stop().await.expect("clean stop");
    for n in 50..60u64 {
        writer
            .write(commands, "k", n.to_string().as_bytes(), &[])
            .await;
    }
    let bridge = setup.bridge(&overrides).await;
    let received = subscriber
        .wait_until(DEADLINE, "the next 10", |r| {
            r.iter().any(|(_, p)| p.as_slice() == b"59")
        })
        .await;
    assert_eq!(received.len(), 60, "nothing published twice: {received:?}");
    bridge.stop().await.expect("clean stop");
}

/// Under MQTT 5 a record's headers become the publish's properties (the inverse of the
/// uplink's `KAFKA_HEADERS`), and a publish the broker refuses (PUBACK "not authorized") goes
/// to the dead-letter topic with why, without holding up the records behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_headers_become_properties_and_a_refused_publish_is_dead_lettered() {
    init_logging();
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        acl: Some("topic readwrite #\ntopic deny forbidden/#\n".to_owned()),
        ..MosquittoOptions::default()
    });
    let setup = Setup::with(
        Tansu::start(),
        mqtt,
        format!("up-{}", mkb_tests::unique()),
        1,
    )
    .await;
    let (kafka, commands) = (&setup.kafka, &setup.commands);
    let dlq = format!("dlq-{}", mkb_tests::unique());
    let bridge = setup
        .bridge(&[("MQTT_VERSION", "5"), ("KAFKA_DLQ_TOPIC", &dlq)])
        .await;
    let subscriber = Subscriber::connect_v5(setup.mqtt.port(), "cars/#").await;
    let writer = KafkaWriter::new(&kafka.brokers());
    writer
        .write(
            commands,
            "VIN1",
            b"unlock",
            &[
                ("mqtt.topic", "cars/VIN1/cmd"),
                ("vin", "VIN1"),
                ("mqtt.response_topic", "replies/VIN1"),
                ("mqtt.correlation_data", "req-17"),
                ("mqtt.content_type", "text/plain"),
                ("mqtt.message_expiry", "300"),
            ],
        )
        .await;
    writer
        .write(
            commands,
            "VIN2",
            b"denied",
            &[("mqtt.topic", "forbidden/VIN2")],
        )
        .await;
    writer
        .write(
            commands,
            "VIN1",
            b"lock",
            &[("mqtt.topic", "cars/VIN1/cmd")],
        )
        .await;
    let received = subscriber
        .wait_until(DEADLINE, "both allowed commands", |r| r.len() >= 2)
        .await;
    assert_eq!(
        received,
        [
            ("cars/VIN1/cmd".to_owned(), b"unlock".to_vec()),
            ("cars/VIN1/cmd".to_owned(), b"lock".to_vec()),
        ]
    );
    let properties = subscriber.properties()[0].clone().expect("properties");
    assert_eq!(
        properties.user_properties,
        [("vin".to_owned(), "VIN1".to_owned())]
    );
    assert_eq!(properties.response_topic.as_deref(), Some("replies/VIN1"));
    assert_eq!(properties.correlation_data.as_deref(), Some(&b"req-17"[..]));
    assert_eq!(properties.content_type.as_deref(), Some("text/plain"));
    // Mosquitto counts the expiry down while the message waits; it is sent on, at most 300.
    assert!(
        properties
            .message_expiry_interval
            .is_some_and(|s| (1..=300).contains(&s)),
        "{properties:?}"
    );
    let mut reader = KafkaReader::new_raw(&kafka.brokers(), &dlq).await;
    let letter = reader.read_exactly(1, DEADLINE).await[0].clone();
    eprintln!(
        "refused publish, dead letter: {:?}",
        letter.header("mqtt.dlq.error")
    );
    assert_eq!(letter.value, b"denied");
    assert_eq!(
        letter.header("mqtt.dlq.reason").as_deref(),
        Some("downlink_refused")
    );
    assert!(
        letter
            .header("mqtt.dlq.error")
            .unwrap_or_default()
            .contains("NotAuthorized"),
        "{letter:?}"
    );
    assert_eq!(
        bridge
            .metric("bridge_downlink_errors_total{kind=\"refused\"}")
            .await,
        1.0
    );
    bridge.stop().await.expect("clean stop");
}

/// `bridge_downlink_consumer_lag` counts the records not yet acknowledged by the MQTT broker:
/// while the broker is unreachable it grows with every record written, and once the broker is
/// back and the records are published it returns to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_gauge_counts_records_waiting_for_the_mqtt_broker() {
    init_logging();
    let setup = Setup::new(2).await;
    let proxy = FaultProxy::start(0, ([127, 0, 0, 1], setup.mqtt.port()).into()).await;
    let bridge = setup
        .bridge_at(proxy.port(), &[("DOWNLINK_MQTT_TOPIC", "lag/{key}")])
        .await;
    let subscriber = Subscriber::connect(setup.mqtt.port(), "lag/#").await;
    let writer = KafkaWriter::new(&setup.kafka.brokers());
    let write = |from: u64, to: u64| {
        let (writer, commands) = (&writer, &setup.commands);
        async move {
            for n in from..to {
                let key = format!("k{}", n % 4);
                writer
                    .write(commands, &key, n.to_string().as_bytes(), &[])
                    .await;
            }
        }
    };
    // The first 20 committed first: until a partition has a committed offset librdkafka
    // reports no lag for it (and the gauge's 0 proves nothing).
    write(0, 20).await;
    subscriber
        .wait_until(DEADLINE, "the first 20", |r| r.len() >= 20)
        .await;
    let brokers = setup.kafka.brokers();
    eventually(DEADLINE, "the first 20 committed", || {
        let (brokers, topic) = (brokers.clone(), setup.commands.clone());
        async move { (committed(brokers, topic, 2).await == 20).then_some(()) }
    })
    .await;
    proxy.set(Fault::Down);
    write(20, 220).await;
    // At least 200 (seen: 200, and 201 in runs beside other tests: a record the test's
    // producer sent twice after a timeout counts too).
    let metrics = lag(&bridge, 200.0).await;
    let (sum, max) = (
        metric_value(&metrics, "bridge_downlink_consumer_lag"),
        metric_value(&metrics, "bridge_downlink_consumer_lag_max"),
    );
    eprintln!("lag while the MQTT broker is unreachable: {sum}, largest partition's {max}");
    assert!(sum <= 210.0, "only the records written meanwhile: {sum}");
    // Four keys over two partitions: the largest partition holds at least half.
    assert!(
        (sum / 2.0..=sum).contains(&max),
        "the largest partition's: {max} of {sum}"
    );
    proxy.set(Fault::None);
    subscriber
        .wait_until(DEADLINE, "all 220", |r| r.len() >= 220)
        .await;
    lag(&bridge, 0.0).await;
    bridge.stop().await.expect("clean stop");
}

/// The offsets the downlink's consumer group committed on `partitions` partitions of `topic`,
/// summed (an OffsetFetch: the asking consumer does not join the group).
async fn committed(brokers: String, topic: String, partitions: i32) -> i64 {
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "mqtt-kafka-bridge-downlink")
            .create()
            .expect("a consumer");
        let mut list = rdkafka::TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(&topic, partition);
        }
        consumer
            .committed_offsets(list, Duration::from_secs(5))
            .map(|list| {
                list.elements()
                    .iter()
                    .filter_map(|e| e.offset().to_raw())
                    .filter(|offset| *offset >= 0)
                    .sum()
            })
            .unwrap_or(0)
    })
    .await
    .expect("offset fetch")
}

/// Waits until `bridge_downlink_consumer_lag` is 0, or at least `wanted`; returns the metrics
/// page.
async fn lag(bridge: &RunningBridge, wanted: f64) -> String {
    let name = "bridge_downlink_consumer_lag";
    let seen = std::sync::Mutex::new(Vec::new());
    let waited = tokio::time::timeout(
        DEADLINE,
        eventually(DEADLINE * 2, name, || async {
            let metrics = bridge.metrics().await;
            let value = metric_value(&metrics, name);
            let mut seen = seen.lock().expect("lock");
            if seen.last() != Some(&value) {
                seen.push(value);
            }
            let reached = if wanted == 0.0 {
                value == 0.0
            } else {
                value >= wanted
            };
            reached.then_some(metrics)
        }),
    )
    .await;
    waited.unwrap_or_else(|_| panic!("{name} never {wanted}; it was {:?}", seen.lock()))
}

/// Two bridges in one consumer group share the downlink's partitions; one is stopped in the
/// middle of the stream (SIGTERM: it finishes or abandons what is in flight, commits what was
/// acknowledged and leaves the group) and the other takes its partitions over: every record
/// reaches the subscriber at least once.
///
/// With SIGKILL instead, Kafka hands a dead member's partitions to the others after
/// `DOWNLINK_SESSION_TIMEOUT`; tansu 0.6 does not: it keeps the dead member in the group and
/// gives it a share at every rebalance (measured: a restarted replica got 1 of 4 partitions, the
/// other 2, for the rest of the test), so that case cannot be tested here. A bridge killed and
/// restarted under the same client id is tested above with static membership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_partitions_and_a_killed_one_s_move_without_loss() {
    init_logging();
    let setup = Setup::new(4).await;
    let (kafka, mqtt, commands) = (&setup.kafka, &setup.mqtt, &setup.commands);
    let subscriber = Subscriber::connect(mqtt.port(), "replicas/#").await;
    let env = |client_id: &str| {
        bridge_env(
            mqtt.port(),
            kafka.port(),
            &setup.topic,
            "unused/#",
            &setup.overrides(&[
                ("DOWNLINK_MQTT_TOPIC", "replicas/{key}"),
                ("DOWNLINK_SESSION_TIMEOUT", "6s"),
                ("MQTT_CLIENT_ID", client_id),
            ]),
        )
    };
    let mut first = BridgeProcess::start(&env("replica-a"));
    let second = BridgeProcess::start(&env("replica-b"));
    first.wait_subscribed().await;
    second.wait_subscribed().await;
    let count = 4000u64;
    let (produce, written) = paced_writes(&kafka.brokers(), commands, count, 16, 3);
    eventually(DEADLINE, "both replicas publishing", || async {
        let (a, b) = (published(&first).await, published(&second).await);
        (a > 0.0 && b > 0.0).then_some(())
    })
    .await;
    first.terminate();
    let status = first.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "the stopped replica exits cleanly: {status}"
    );
    let by_second_at_stop = published(&second).await;
    let written_at_stop = written.load(Ordering::Relaxed);
    produce.await.expect("producer");
    let received = subscriber
        .wait_until(DEADLINE, "every record at least once", |r| {
            distinct(r) >= count
        })
        .await;
    let by_second = published(&second).await;
    eprintln!(
        "{count} records, one of two replicas stopped mid-stream: {} publishes received, {} \
         duplicates; the other published {by_second_at_stop} before the stop and \
         {by_second} in all",
        received.len(),
        received.len() as u64 - count
    );
    // Every record written after the stop was published by the survivor, whichever
    // partition it went to.
    assert!(
        written_at_stop < count,
        "stopped mid-stream ({written_at_stop} written)"
    );
    assert!(
        by_second - by_second_at_stop >= (count - written_at_stop) as f64,
        "the survivor took the stopped replica's partitions over: {by_second_at_stop} before \
         the stop, {by_second} in all, {written_at_stop} written at the stop"
    );
    second.terminate();
}

/// Writes `count` records (values `0`, `1`, … keyed `k<n % keys>`) to `topic`, one every
/// `pace_ms`, on a task of their own; the counter says how many Kafka took so far.
fn paced_writes(
    brokers: &str,
    topic: &str,
    count: u64,
    keys: u64,
    pace_ms: u64,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicU64>) {
    let writer = KafkaWriter::new(brokers);
    let written = Arc::new(AtomicU64::new(0));
    let (topic, counter) = (topic.to_owned(), written.clone());
    let task = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        for n in 0..count {
            let key = format!("k{}", n % keys);
            writer
                .write(&topic, &key, n.to_string().as_bytes(), &[])
                .await;
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep_until(started + Duration::from_millis(n * pace_ms)).await;
        }
    });
    (task, written)
}

/// How many different payloads were received.
fn distinct(received: &[(String, Vec<u8>)]) -> u64 {
    received
        .iter()
        .map(|(_, p)| p.as_slice())
        .collect::<std::collections::HashSet<_>>()
        .len() as u64
}

/// Downlink publishes the broker acknowledged, as a bridge process reports them.
async fn published(bridge: &BridgeProcess) -> f64 {
    bridge
        .metric("bridge_downlink_records_published_total")
        .await
        .unwrap_or(0.0)
}
