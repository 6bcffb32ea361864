//! What the bridge does with input that real deployments produce and no limit was set for:
//! here, a message far larger than Kafka accepts among normal traffic. It must neither break
//! the MQTT connection nor stall the messages behind it.

use std::time::Duration;

use mkb_tests::numbered::expect_all_numbers;
use mkb_tests::{Publisher, eventually, init_logging, subscribed_bridge};
use rumqttc::QoS;

/// 3 MiB: above librdkafka's `message.max.bytes` (1,000,000) and the old 1 MiB MQTT limit,
/// below the bridge's default `MQTT_MAX_PACKET_SIZE` of 16 MiB.
const OVERSIZED: usize = 3 << 20;

async fn oversized_message_among_normal_ones(mqtt_version: &str) {
    init_logging();
    let (kafka, mqtt, topic, bridge) =
        subscribed_bridge("big/#", &[("MQTT_VERSION", mqtt_version)]).await;

    let publisher = Publisher::connect(mqtt.port()).await;
    for n in 0..100u64 {
        if n == 50 {
            publisher
                .publish("big/0", vec![b'x'; OVERSIZED], QoS::AtLeastOnce)
                .await;
        }
        publisher
            .publish(&format!("big/{}", n % 3), n.to_string(), QoS::AtLeastOnce)
            .await;
    }
    // Every normal message arrives, those behind the big one included (a non-numbered payload
    // in Kafka would fail the check).
    let delivery = expect_all_numbers(&kafka.brokers(), &topic, 100, Duration::from_secs(60)).await;
    let dropped = eventually(Duration::from_secs(10), "the big one counted", || async {
        let metrics = bridge.metrics().await;
        let dropped = mkb_tests::metric_value(
            &metrics,
            "bridge_records_dropped_total{reason=\"too_large\"}",
        );
        let awaiting = mkb_tests::metric_value(&metrics, "bridge_mqtt_messages_awaiting_ack");
        (dropped > 0.0 && awaiting == 0.0).then_some(dropped)
    })
    .await;
    assert_eq!(dropped, 1.0, "the oversized record, dropped and counted");
    assert_eq!(
        bridge.metric("bridge_mqtt_reconnects_total").await,
        0.0,
        "the connection held"
    );
    publisher.wait_acked(101).await;
    eprintln!("MQTT {mqtt_version}: {delivery:?}, oversized record dropped and acknowledged");
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_neither_breaks_the_connection_nor_stalls_the_stream_mqtt_3_1_1() {
    oversized_message_among_normal_ones("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_neither_breaks_the_connection_nor_stalls_the_stream_mqtt_5() {
    oversized_message_among_normal_ones("5").await;
}
