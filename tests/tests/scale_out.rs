//! The scale-out recipe (README, "Deploy"): three bridges share one subscription
//! (`$share/<group>/<filter>`) on Mosquitto, keyed per device. One is killed with SIGKILL in the
//! middle of 30,000 QoS 1 messages and started again under the same client id and with the same
//! spool directory (a StatefulSet's volume, as in `deploy/kubernetes/`): every message reaches
//! Kafka, each record keyed by its device.

use std::collections::HashMap;
use std::time::Duration;

use mkb_tests::numbered::distinct_numbers;
use mkb_tests::{BridgeProcess, KafkaReader, Publisher, bridge_env, brokers, init_logging};
use rumqttc::QoS;

const COUNT: u64 = 30_000;
const DEVICES: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_a_subscription_and_a_killed_one_loses_nothing() {
    init_logging();
    let (kafka, mqtt, topic) = brokers();
    // Each replica's spool outlives its process, as a volume would.
    let spools = tempfile::tempdir().expect("spool directories");
    let spool_dir = |replica: usize| {
        spools
            .path()
            .join(format!("replica-{replica}"))
            .display()
            .to_string()
    };
    let env = |replica: usize| {
        bridge_env(
            mqtt.port(),
            kafka.port(),
            &topic,
            "$share/bridges/cars/+/telemetry",
            &[
                ("MQTT_CLIENT_ID", &format!("bridge-{replica}")),
                ("SPOOL_DIR", &spool_dir(replica)),
                ("MQTT_QOS", "1"),
                ("MQTT_CLEAN_SESSION", "false"),
                // The device is the topic's second level: its records share a partition.
                ("KAFKA_KEY", "{2}"),
                ("KAFKA_TOPIC_PARTITIONS", "6"),
            ],
        )
    };
    let mut replicas: Vec<BridgeProcess> = (0..3).map(|r| BridgeProcess::start(&env(r))).collect();
    for replica in &replicas {
        replica.wait_subscribed().await;
    }
    let publisher = std::sync::Arc::new(Publisher::connect(mqtt.port()).await);
    // About 3,000 a second, so the kill lands mid-stream.
    let publishing = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            for n in 0..COUNT {
                let device = format!("dev-{}", n % DEVICES);
                publisher
                    .publish(
                        &format!("cars/{device}/telemetry"),
                        n.to_string(),
                        QoS::AtLeastOnce,
                    )
                    .await;
                if n % 30 == 29 {
                    tokio::time::sleep_until(started + Duration::from_millis(n / 3)).await;
                }
            }
        })
    };
    mkb_tests::eventually(Duration::from_secs(60), "a third published", || {
        let acked = publisher.acked();
        async move { (acked >= COUNT / 3).then_some(()) }
    })
    .await;
    replicas[1].kill();
    tokio::time::sleep(Duration::from_millis(fastrand::u64(200..1500))).await;
    // The killed replica is kept to the end, so that a failure prints its log too.
    let _killed = std::mem::replace(&mut replicas[1], BridgeProcess::start(&env(1)));
    publishing.await.expect("publisher");
    publisher.wait_acked(COUNT).await;

    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    let complete = reader
        .read_until(Duration::from_secs(120), |received| {
            distinct_numbers(received).len() as u64 >= COUNT
        })
        .await;
    let seen = distinct_numbers(&reader.received);
    let mut drops = Vec::new();
    let partitions = if complete {
        Vec::new()
    } else {
        reader.unread_offsets(10)
    };
    if !complete {
        for replica in &replicas {
            let page = replica.metrics().await.unwrap_or_default();
            drops.extend(
                page.lines()
                    .filter(|line| line.contains("dropped_total{"))
                    .map(|line| format!("pid {}: {line}", replica.pid())),
            );
        }
    }
    assert!(
        complete,
        "{} of {COUNT} messages reached Kafka; first missing: {:?}; the running replicas' \
         drop counters: {drops:?}; {partitions:?}",
        seen.len(),
        (0..COUNT)
            .filter(|n| !seen.contains(n))
            .take(20)
            .collect::<Vec<_>>()
    );
    // Keyed per device, whichever replica wrote it.
    for record in &reader.received {
        let device = record
            .mqtt_topic
            .split('/')
            .nth(1)
            .expect("cars/<device>/telemetry");
        assert_eq!(record.key.as_deref(), Some(device.as_bytes()), "{record:?}");
    }
    // What ordering held: per device, in Kafka (one partition per key), how often a message
    // came after a later one. Mosquitto hands each message of a shared subscription to the next
    // member in turn, so one device's messages go through all three replicas.
    let mut last: HashMap<&[u8], u64> = HashMap::new();
    let mut out_of_order = 0;
    for record in &reader.received {
        let n: u64 = std::str::from_utf8(&record.payload)
            .expect("UTF-8")
            .parse()
            .expect("a number");
        let previous = last
            .entry(record.key.as_deref().unwrap_or_default())
            .or_insert(0);
        if n < *previous {
            out_of_order += 1;
        }
        *previous = (*previous).max(n);
    }
    let mut received = Vec::new();
    for replica in &replicas {
        received.push(
            replica
                .metric("bridge_mqtt_messages_received_total{qos=\"1\"}")
                .await
                .unwrap_or(0.0),
        );
    }
    eprintln!(
        "{COUNT} messages over 3 replicas, one killed and restarted: {} records ({} \
         duplicates); received per replica since its start {received:?}; {out_of_order} \
         records behind a later message of their device",
        reader.received.len(),
        reader.received.len() - seen.len()
    );
    assert!(
        received.iter().all(|&r| r > 0.0),
        "every replica took a share: {received:?}"
    );
    for replica in &replicas {
        replica.terminate();
    }
}
