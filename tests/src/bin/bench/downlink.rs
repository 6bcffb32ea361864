//! `mkb-bench --downlink`: Kafka → MQTT. N records are written to a one-partition Kafka topic
//! first; then the bridge's downlink reads them and publishes each to `down/<key>`, and an MQTT
//! subscriber in this process counts them. The baseline does the same job with a plain
//! rdkafka consumer and a plain rumqttc client in this process (no commits, no tracking), on
//! the same brokers and records. Each run is timed from the subscriber's first message to its
//! last, so neither the consumer group's join nor connecting counts.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mkb_tests::{BridgeProcess, Mosquitto, MosquittoOptions, Tansu, bridge_env, unique};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::time::Instant;

use crate::Options;

/// What one run measured.
pub struct Run {
    pub received: u64,
    pub seconds: f64,
    /// The bridge's peak RSS and CPU time; `None` for the baseline (it runs in this process).
    pub resources: Option<(u64, Duration)>,
}

/// Runs the bridge's downlink, then the baseline, on the same brokers and records; prints the
/// table. Returns whether both delivered every record.
pub async fn run(o: &Options) -> bool {
    let kafka = Tansu::start();
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        max_inflight: Some(o.inflight),
        ..MosquittoOptions::default()
    });
    let topic = format!("down-{}", unique());
    mkb_tests::kafka::create_topic(&kafka.brokers(), &topic, 1).await;
    fill(&kafka.brokers(), &topic, o).await;

    eprintln!("downlink run: the bridge");
    let bridge = run_bridge(&kafka, &mqtt, &topic, o).await;
    let baseline = if o.baseline {
        eprintln!("downlink run: baseline (plain consumer, plain MQTT client)");
        Some(run_baseline(&kafka, &mqtt, &topic, o).await)
    } else {
        None
    };
    println!(
        "\ndownlink: {} records × {} B from one partition, QoS {}, MQTT {}, broker window {}",
        o.messages, o.size, o.qos, o.mqtt_version, o.inflight
    );
    println!("| run | received | msg/s | MB/s | bridge peak RSS | bridge CPU s |");
    println!("|---|---|---|---|---|---|");
    for (name, run) in [
        ("bridge downlink", Some(&bridge)),
        ("baseline", baseline.as_ref()),
    ] {
        let Some(run) = run else { continue };
        let rate = run.received as f64 / run.seconds;
        println!(
            "| {name} | {}/{} | {rate:.0} | {:.1} | {} | {} |",
            run.received,
            o.messages,
            rate * o.size as f64 / 1e6,
            run.resources
                .map_or("—".to_owned(), |r| format!("{:.1} MB", r.0 as f64 / 1e6)),
            run.resources
                .map_or("—".to_owned(), |r| format!("{:.1}", r.1.as_secs_f64())),
        );
    }
    if let Some(baseline) = &baseline {
        let ratio = (bridge.received as f64 / bridge.seconds)
            / (baseline.received as f64 / baseline.seconds);
        println!("\nbridge / baseline throughput: {ratio:.2}");
    }
    bridge.received == o.messages && baseline.is_none_or(|b| b.received == o.messages)
}

/// Writes the records, keyed `dev-<n % 16>`, each value the load's payload for `n`.
async fn fill(brokers: &str, topic: &str, o: &Options) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .expect("create the benchmark's producer");
    eprintln!("  writing {} records to {topic}", o.messages);
    let mut pending = Vec::with_capacity(10_000);
    let mut value = Vec::with_capacity(o.size);
    for n in 0..o.messages {
        value.clear();
        crate::payload(n, o.size, &mut value);
        let key = format!("dev-{}", n % 16);
        let record = FutureRecord::to(topic).key(&key).payload(&value);
        pending.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queue a record"),
        );
        if pending.len() == 10_000 {
            for delivery in pending.drain(..) {
                let _ = delivery.await.expect("delivery").expect("Kafka takes it");
            }
        }
    }
    for delivery in pending {
        let _ = delivery.await.expect("delivery").expect("Kafka takes it");
    }
}

/// Counts distinct records (by the sequence number in the payload) arriving on `down/#`;
/// returns the seconds from the first to the `expected`-th, and how many arrived.
async fn subscriber(port: u16, expected: u64, progress: Arc<AtomicU64>) -> (u64, f64) {
    let mut options = MqttOptions::new(format!("bench-down-{}", unique()), "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client
        .subscribe("down/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut seen = HashSet::with_capacity(expected as usize);
    let mut first = None;
    while (seen.len() as u64) < expected {
        match tokio::time::timeout(Duration::from_secs(60), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                first.get_or_insert_with(Instant::now);
                if let Some(seq) = p.payload.get(8..16) {
                    seen.insert(u64::from_le_bytes(seq.try_into().expect("8 bytes")));
                    progress.store(seen.len() as u64, Ordering::Relaxed);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("subscriber: {e}"),
            Err(_) => {
                eprintln!("subscriber: nothing for 60 s; stopping at {}", seen.len());
                break;
            }
        }
    }
    let seconds = first.map_or(f64::INFINITY, |f| f.elapsed().as_secs_f64());
    (seen.len() as u64, seconds)
}

async fn run_bridge(kafka: &Tansu, mqtt: &Mosquitto, topic: &str, o: &Options) -> Run {
    let progress = Arc::new(AtomicU64::new(0));
    let counting = tokio::spawn(subscriber(mqtt.port(), o.messages, progress.clone()));
    let reporter = crate::spawn_progress("bridge downlink", o.messages, progress);
    let qos = o.qos.to_string();
    let env = bridge_env(
        mqtt.port(),
        kafka.port(),
        &format!("unused-{}", unique()),
        "unused/#",
        &[
            ("DOWNLINK_KAFKA_TOPICS", topic),
            ("DOWNLINK_GROUP_ID", &format!("bench-{}", unique())),
            ("DOWNLINK_OFFSET_RESET", "earliest"),
            ("DOWNLINK_MQTT_TOPIC", "down/{key}"),
            ("DOWNLINK_VALUE_FORMAT", "raw"),
            ("DOWNLINK_QOS", &qos),
            ("MQTT_VERSION", &o.mqtt_version),
            ("LOG_LEVEL", "error"),
        ],
    );
    let bridge = BridgeProcess::start(&env);
    let (received, seconds) = counting.await.expect("subscriber");
    reporter.abort();
    Run {
        received,
        seconds,
        resources: bridge.resources(),
    }
}

async fn run_baseline(kafka: &Tansu, mqtt: &Mosquitto, topic: &str, o: &Options) -> Run {
    let progress = Arc::new(AtomicU64::new(0));
    let counting = tokio::spawn(subscriber(mqtt.port(), o.messages, progress.clone()));
    let reporter = crate::spawn_progress("baseline", o.messages, progress);
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", format!("bench-{}", unique()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("create the baseline's consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("valid offset");
    consumer.assign(&assignment).expect("assign");
    let (client, publishing) = Plain::connect(mqtt.port(), o);
    for _ in 0..o.messages {
        let message = consumer.recv().await.expect("a record");
        let key = String::from_utf8_lossy(message.key().unwrap_or_default());
        let payload = message.payload().unwrap_or_default().to_vec();
        client.publish(format!("down/{key}"), payload).await;
    }
    let (received, seconds) = counting.await.expect("subscriber");
    publishing.abort();
    reporter.abort();
    Run {
        received,
        seconds,
        resources: None,
    }
}

/// A plain rumqttc client of either version.
enum Plain {
    V311(AsyncClient, QoS),
    V5(rumqttc::v5::AsyncClient, QoS5),
}

impl Plain {
    /// Connects with the broker's window; returns the client and the task driving its event
    /// loop.
    fn connect(port: u16, o: &Options) -> (Self, tokio::task::JoinHandle<()>) {
        let id = format!("bench-plain-{}", unique());
        if o.mqtt_version == "5" {
            let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
            options.set_outgoing_inflight_upper_limit(o.inflight);
            let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 1000);
            let qos = if o.qos == 0 {
                QoS5::AtMostOnce
            } else {
                QoS5::AtLeastOnce
            };
            let driving = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            (Self::V5(client, qos), driving)
        } else {
            let mut options = MqttOptions::new(id, "127.0.0.1", port);
            options.set_inflight(o.inflight);
            let (client, mut eventloop) = AsyncClient::new(options, 1000);
            let qos = if o.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            let driving = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            (Self::V311(client, qos), driving)
        }
    }

    async fn publish(&self, topic: String, payload: Vec<u8>) {
        let published = match self {
            Self::V311(client, qos) => client
                .publish(topic, *qos, false, payload)
                .await
                .map_err(|e| e.to_string()),
            Self::V5(client, qos) => client
                .publish(topic, *qos, false, payload)
                .await
                .map_err(|e| e.to_string()),
        };
        published.expect("publish");
    }
}
