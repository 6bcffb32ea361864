//! End-to-end: real Mosquitto → bridge → real tansu, read back with an rdkafka consumer.

use std::collections::HashMap;
use std::time::Duration;

use mkb_tests::{KafkaReader, Publisher, init_logging, subscribed_bridge};
use rumqttc::QoS;

const READ_DEADLINE: Duration = Duration::from_secs(60);

/// Payloads of the main test: numbered text, every byte value, empty, 256 KiB, and some binary
/// with JSON's special characters.
fn payload(n: usize) -> Vec<u8> {
    match n {
        0 => Vec::new(),
        1 => (0..=255u8).collect(),
        2 => (0..256 * 1024).map(|i| (i % 251) as u8).collect(),
        n if n % 97 == 0 => {
            let mut binary = vec![0u8, 0xff, 0x80, b'"', b'\\'];
            binary.extend_from_slice(&n.to_le_bytes());
            binary
        }
        n => format!("message {n}").into_bytes(),
    }
}

/// Groups (MQTT topic, payload) pairs by topic, keeping their order.
fn by_topic(pairs: impl IntoIterator<Item = (String, Vec<u8>)>) -> HashMap<String, Vec<Vec<u8>>> {
    let mut map: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for (topic, payload) in pairs {
        map.entry(topic).or_default().push(payload);
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_on_three_topics_arrive_exactly_as_published() {
    init_logging();
    let (kafka, mqtt, topic, bridge) =
        subscribed_bridge("cars/+/telemetry, alerts/#", &[("KAFKA_BATCH_SIZE", "100")]).await;
    let publisher = Publisher::connect(mqtt.port()).await;

    let mqtt_topics = [
        "cars/a/telemetry",
        "cars/b/telemetry",
        "alerts/engine/overheat",
    ];
    let mut published: Vec<(String, Vec<u8>)> = Vec::new();
    for n in 0..1000 {
        let mqtt_topic = mqtt_topics[n % 3];
        publisher
            .publish(mqtt_topic, payload(n), QoS::AtLeastOnce)
            .await;
        published.push((mqtt_topic.to_owned(), payload(n)));
    }
    // Matches neither filter: must not arrive.
    publisher
        .publish("other/topic", "stray", QoS::AtLeastOnce)
        .await;
    publisher.wait_acked(1001).await;

    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    let received = reader
        .read_exactly(published.len(), READ_DEADLINE)
        .await
        .to_vec();
    let got = by_topic(
        received
            .iter()
            .map(|r| (r.mqtt_topic.clone(), r.payload.clone())),
    );
    let expected = by_topic(published.clone());
    assert_eq!(got.len(), 3, "MQTT topics received: {:?}", got.keys());
    for (mqtt_topic, payloads) in &expected {
        // Equal sequences: nothing lost, nothing changed, order kept per MQTT topic.
        assert!(
            got[mqtt_topic] == *payloads,
            "{mqtt_topic}: {} received and {} published, or not in publish order",
            got[mqtt_topic].len(),
            payloads.len()
        );
    }
    for record in &received {
        assert_eq!(record.key.as_deref(), Some(record.mqtt_topic.as_bytes()));
    }
    assert!(
        received.iter().any(|r| r.payload.is_empty()),
        "empty payload arrived"
    );
    assert!(
        received.iter().any(|r| r.payload == payload(2)),
        "256 KiB payload arrived"
    );

    // Nothing more: the stray message was not bridged and nothing was duplicated.
    let after = reader
        .read_at_least(published.len() + 1, Duration::from_secs(2))
        .await;
    assert_eq!(after.len(), published.len());

    assert_eq!(
        bridge.metric("bridge_kafka_records_sent_total").await,
        1000.0
    );
    assert_eq!(
        bridge.metric("bridge_mqtt_messages_received_total").await,
        1000.0
    );
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_go_at_once_while_kafka_is_idle_whatever_the_interval() {
    init_logging();
    // Adaptive batching: with nothing in flight a partial batch does not wait for its
    // interval (an hour here) nor to fill (1000 records).
    let (kafka, mqtt, topic, bridge) = subscribed_bridge(
        "idle/#",
        &[
            ("KAFKA_BATCH_SIZE", "1000"),
            ("KAFKA_INTERVAL", "1h"),
            ("MQTT_ACK", "on-receipt"),
        ],
    )
    .await;
    let publisher = Publisher::connect(mqtt.port()).await;
    for n in 0..25 {
        publisher
            .publish("idle/n", n.to_string(), QoS::AtLeastOnce)
            .await;
    }
    publisher.wait_acked(25).await;

    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    let all: Vec<Vec<u8>> = reader
        .read_exactly(25, READ_DEADLINE)
        .await
        .iter()
        .map(|r| r.payload.clone())
        .collect();
    let expected: Vec<Vec<u8>> = (0..25).map(|n: i32| n.to_string().into_bytes()).collect();
    assert_eq!(
        all, expected,
        "every record, in order, long before the interval"
    );
    assert_eq!(bridge.metric("bridge_kafka_records_sent_total").await, 25.0);
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_write_partial_batches_do_not_wait_to_fill() {
    init_logging();
    let (kafka, mqtt, topic, bridge) = subscribed_bridge(
        "interval/#",
        &[("KAFKA_BATCH_SIZE", "1000"), ("KAFKA_INTERVAL", "300ms")],
    )
    .await;
    let publisher = Publisher::connect(mqtt.port()).await;
    for n in 0..5 {
        publisher
            .publish("interval/n", n.to_string(), QoS::AtLeastOnce)
            .await;
    }
    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    let payloads: Vec<Vec<u8>> = reader
        .read_exactly(5, READ_DEADLINE)
        .await
        .iter()
        .map(|r| r.payload.clone())
        .collect();
    assert_eq!(payloads, [b"0", b"1", b"2", b"3", b"4"]);
    // Far below the batch size: sent partial, when Kafka was idle (adaptive batching) or at
    // the latest at the end of the interval.
    let batches = bridge.metric("bridge_kafka_batches_sent_total").await;
    assert!((1.0..=5.0).contains(&batches), "{batches} batches");
    bridge.stop().await.expect("clean stop");
}
