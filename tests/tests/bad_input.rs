//! What the bridge does with input that real deployments produce and no limit was set for:
//! here, a message far larger than Kafka accepts, or than `MQTT_MAX_PACKET_SIZE`, among normal
//! traffic. It must not stall the messages behind it; it goes to the dead-letter topic when one
//! is set, and is dropped and counted otherwise.

use std::time::Duration;

use mkb_tests::kafka::KafkaReader;
use mkb_tests::numbered::expect_all_numbers;
use mkb_tests::{Publisher, eventually, init_logging, metric_value, subscribed_bridge};
use rumqttc::QoS;

/// 1.5 MB: above librdkafka's `message.max.bytes`, set to 1,000,000 (its default) here.
const OVER_KAFKA_LIMIT: usize = 1_500_000;
/// 3 MiB: above Kafka's limit and the old 1 MiB MQTT limit, below the bridge's default
/// `MQTT_MAX_PACKET_SIZE` of 16 MiB.
const OVER_OLD_MQTT_LIMIT: usize = 3 << 20;

/// Publishes 100 numbered messages on `big/0`..`big/2`, and one of `size` bytes on `big/0`
/// before the 51st.
async fn publish_with_one_of(publisher: &Publisher, size: usize) {
    for n in 0..100u64 {
        if n == 50 {
            publisher
                .publish("big/0", vec![b'x'; size], QoS::AtLeastOnce)
                .await;
        }
        publisher
            .publish(&format!("big/{}", n % 3), n.to_string(), QoS::AtLeastOnce)
            .await;
    }
}

async fn oversized_message_among_normal_ones(mqtt_version: &str, size: usize, dead_letters: bool) {
    init_logging();
    let dlq = format!("dlq-{}", mkb_tests::unique());
    let mut overrides = vec![
        ("MQTT_VERSION", mqtt_version),
        ("KAFKA_PROPERTY_MESSAGE_MAX_BYTES", "1000000"),
    ];
    if dead_letters {
        overrides.push(("KAFKA_DLQ_TOPIC", &dlq));
    }
    let (kafka, mqtt, topic, bridge) = subscribed_bridge("big/#", &overrides).await;

    let publisher = Publisher::connect(mqtt.port()).await;
    publish_with_one_of(&publisher, size).await;
    publisher.wait_acked_in_one_connection(101).await;
    // Every normal message arrives, those behind the big one included (a non-numbered payload
    // in Kafka would fail the check).
    let delivery = expect_all_numbers(&kafka.brokers(), &topic, 100, Duration::from_secs(60)).await;
    let counter = if dead_letters {
        "bridge_records_dead_lettered_total{reason=\"too_large\"}"
    } else {
        "bridge_records_dropped_total{reason=\"too_large\"}"
    };
    let given_up = eventually(Duration::from_secs(10), "the big one counted", || async {
        let metrics = bridge.metrics().await;
        let given_up = metric_value(&metrics, counter);
        let awaiting = metric_value(&metrics, "bridge_mqtt_messages_awaiting_ack");
        (given_up > 0.0 && awaiting == 0.0).then_some(given_up)
    })
    .await;
    assert_eq!(given_up, 1.0, "{counter}");
    assert_eq!(
        bridge.metric("bridge_mqtt_reconnects_total").await,
        0.0,
        "the connection held"
    );
    eprintln!("MQTT {mqtt_version}, {size} bytes: {delivery:?}, {counter} = {given_up}");
    if dead_letters {
        let mut reader = KafkaReader::new(&kafka.brokers(), &dlq).await;
        let letters = reader.read_exactly(1, Duration::from_secs(30)).await;
        let letter = &letters[0];
        let header = |name| letter.header(name).unwrap_or_default();
        eprintln!(
            "dead letter: key {:?}, headers {:?}",
            letter.key,
            letter
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v)))
                .collect::<Vec<_>>()
        );
        assert_eq!(header("mqtt.dlq.reason"), "too_large");
        assert_eq!(header("mqtt.topic"), "big/0");
        assert_eq!(header("mqtt.dlq.topic"), topic);
        let original: usize = header("mqtt.dlq.original_size").parse().expect("a size");
        assert!(original > size, "the envelope of {size} bytes: {original}");
        assert!(header("mqtt.dlq.error").contains("too large"), "{letter:?}");
        assert!(
            letter.value.is_empty(),
            "the value did not fit, so it is not there"
        );
        assert_eq!(letter.key.as_deref(), Some(&b"big/0"[..]));
    }
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_for_kafka_goes_to_the_dead_letter_topic_mqtt_3_1_1() {
    oversized_message_among_normal_ones("3.1.1", OVER_KAFKA_LIMIT, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_topic_an_oversized_message_is_counted_and_dropped_mqtt_5() {
    oversized_message_among_normal_ones("5", OVER_OLD_MQTT_LIMIT, false).await;
}

/// MQTT 3.1.1 cannot tell the broker a size limit: a message above `MQTT_MAX_PACKET_SIZE`
/// breaks the connection once, is read past on a side connection and acknowledged there, and
/// its dead letter (topic and size, no payload) reaches the dead-letter topic. One reconnect,
/// not a loop, and every normal message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_above_the_mqtt_limit_is_read_past_once_mqtt_3_1_1() {
    init_logging();
    let dlq = format!("dlq-{}", mkb_tests::unique());
    let (kafka, mqtt, topic, bridge) = subscribed_bridge(
        "big/#",
        &[
            ("MQTT_VERSION", "3.1.1"),
            ("MQTT_CLEAN_SESSION", "false"),
            ("MQTT_MAX_PACKET_SIZE", "1MiB"),
            ("KAFKA_DLQ_TOPIC", &dlq),
        ],
    )
    .await;
    let size = 2 << 20;
    let publisher = Publisher::connect(mqtt.port()).await;
    publish_with_one_of(&publisher, size).await;
    publisher.wait_acked_in_one_connection(101).await;
    let delivery = expect_all_numbers(&kafka.brokers(), &topic, 100, Duration::from_secs(60)).await;
    let mut reader = KafkaReader::new(&kafka.brokers(), &dlq).await;
    let letter = reader.read_exactly(1, Duration::from_secs(30)).await[0].clone();
    let header = |name| letter.header(name).unwrap_or_default();
    assert_eq!(header("mqtt.dlq.reason"), "mqtt_too_large");
    assert_eq!(header("mqtt.topic"), "big/0");
    let original: usize = header("mqtt.dlq.original_size").parse().expect("a size");
    assert!(original > size, "the packet's remaining length: {original}");
    assert!(header("mqtt.dlq.error").contains("MQTT_MAX_PACKET_SIZE"));
    assert!(letter.value.is_empty());
    let metrics = bridge.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "bridge_mqtt_messages_dropped_total{reason=\"too_large\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "bridge_records_dead_lettered_total{reason=\"mqtt_too_large\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "bridge_mqtt_reconnects_total"),
        1.0,
        "one reconnect, to read past the message, then none"
    );
    eprintln!(
        "MQTT 3.1.1, {size} bytes above a 1 MiB limit: {delivery:?}, dead letter headers {:?}",
        letter
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v)))
            .collect::<Vec<_>>()
    );
    bridge.stop().await.expect("clean stop");
}
