//! The at-least-once promise under kill -9: a QoS 1/2 message is acknowledged to the broker
//! only once Kafka or the fsynced disk spool holds it, so killing the bridge at any moment and
//! starting it again loses nothing. Duplicates are counted and reported, not failed.

use std::sync::Arc;
use std::time::Duration;

use mkb_tests::numbered::{expect_all_numbers, publish_all, publish_numbered};
use mkb_tests::{
    BridgeProcess, Fault, Publisher, bridge_env, brokers, init_logging, killed_during_outage,
    spool_dir,
};
use rumqttc::QoS;

/// Publishes 20,000 numbered QoS 1 messages at 1,000 a second while killing the bridge with
/// SIGKILL five times at random moments, restarting it each time with the same client id and
/// spool. Every number must reach Kafka.
async fn survives_kill_9(mqtt_version: &str) {
    init_logging();
    let (kafka, mqtt, topic) = brokers();
    let (_spool, spool_dir) = spool_dir();
    let env = bridge_env(
        mqtt.port(),
        kafka.port(),
        &topic,
        "crash/#",
        &[("MQTT_VERSION", mqtt_version), ("SPOOL_DIR", &spool_dir)],
    );
    let mut bridge = BridgeProcess::start(&env);
    bridge.wait_subscribed().await;

    let publisher = Arc::new(Publisher::connect(mqtt.port()).await);
    let count = 20_000;
    let traffic = publish_numbered(publisher.clone(), "crash", count, 1000, QoS::AtLeastOnce);
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    for kill in 1..=5 {
        tokio::time::sleep(Duration::from_millis(rng.u64(1500..3500))).await;
        bridge.kill();
        eprintln!(
            "MQTT {mqtt_version}: kill -9 #{kill} after {} broker acks (seed {seed})",
            publisher.acked()
        );
        bridge = BridgeProcess::start(&env);
    }
    traffic.await.expect("publisher");
    publisher.wait_acked(count).await;

    let delivery =
        expect_all_numbers(&kafka.brokers(), &topic, count, Duration::from_secs(120)).await;
    eprintln!(
        "MQTT {mqtt_version}, 5 x kill -9 during {count} messages: {} delivered, {} duplicates \
         (seed {seed})",
        delivery.distinct, delivery.duplicates
    );
    drop(bridge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_with_mqtt_3_1_1() {
    survives_kill_9("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_with_mqtt_5() {
    survives_kill_9("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_outage_loses_nothing_held_only_on_disk() {
    init_logging();
    let count = 5_000;
    let killed = killed_during_outage("outage", count, &[]).await;
    killed.proxy.set(Fault::None);
    let _restarted = BridgeProcess::start(&killed.env);
    let delivery = expect_all_numbers(
        &killed.kafka.brokers(),
        &killed.topic,
        count,
        Duration::from_secs(120),
    )
    .await;
    eprintln!("kill -9 during an outage: {delivery:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_receipt_mode_acknowledges_at_once_and_bridges_everything() {
    init_logging();
    let (kafka, mqtt, topic) = brokers();
    let env = bridge_env(
        mqtt.port(),
        kafka.port(),
        &topic,
        "fast/#",
        &[("MQTT_ACK", "on-receipt")],
    );
    let bridge = BridgeProcess::start(&env);
    bridge.wait_subscribed().await;
    let count = 2_000;
    let _publisher = publish_all(mqtt.port(), "fast", count).await;
    expect_all_numbers(&kafka.brokers(), &topic, count, Duration::from_secs(60)).await;
    // Nothing waits for Kafka before being acknowledged in this mode.
    assert_eq!(
        bridge.metric("bridge_mqtt_messages_awaiting_ack").await,
        Some(0.0)
    );
    assert_eq!(
        bridge.metric("bridge_mqtt_ack_latency_seconds_count").await,
        Some(0.0)
    );
}
