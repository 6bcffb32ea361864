//! The MQTT side survives its broker: Mosquitto restarted mid-stream, the bridge reconnects,
//! subscribes again, and later messages arrive.

use std::time::Duration;

use mkb_tests::{
    KafkaReader, Mosquitto, Publisher, RunningBridge, Tansu, bridge_config, eventually,
    init_logging, unique,
};
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_reconnects_after_mosquitto_restarts() {
    bridges_across_a_broker_restart("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_bridge_reconnects_after_mosquitto_restarts() {
    bridges_across_a_broker_restart("5").await;
}

async fn bridges_across_a_broker_restart(mqtt_version: &str) {
    init_logging();
    let kafka = Tansu::start();
    let mut mqtt = Mosquitto::start();
    let topic = format!("mqtt-{}", unique());
    let config = bridge_config(
        mqtt.port(),
        kafka.port(),
        &topic,
        "restart/#",
        &[("MQTT_VERSION", mqtt_version)],
    );
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;

    let before = Publisher::connect(mqtt.port()).await;
    for n in 0..100 {
        before
            .publish("restart/a", format!("before {n}"), QoS::AtLeastOnce)
            .await;
    }
    before.wait_acked(100).await;
    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    reader.read_exactly(100, Duration::from_secs(30)).await;
    drop(before);

    // A fresh broker on the same port: no session survives, so the bridge must subscribe again.
    mqtt.restart();
    eventually(Duration::from_secs(30), "a reconnect", || async {
        (bridge.metric("bridge_mqtt_reconnects_total").await >= 1.0).then_some(())
    })
    .await;
    bridge.wait_subscribed().await;

    let after = Publisher::connect(mqtt.port()).await;
    for n in 0..100 {
        after
            .publish("restart/b", format!("after {n}"), QoS::AtLeastOnce)
            .await;
    }
    after.wait_acked(100).await;
    let received = reader.read_exactly(200, Duration::from_secs(60)).await;
    let after_restart: Vec<String> = received
        .iter()
        .filter(|r| r.mqtt_topic == "restart/b")
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..100).map(|n| format!("after {n}")).collect();
    assert_eq!(after_restart, expected);
    bridge.stop().await.expect("clean stop");
}
