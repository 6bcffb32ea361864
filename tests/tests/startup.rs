//! Start-up: the Kafka probe of `KAFKA_TEST_TOPIC`, against a real broker and a closed port.

use std::time::{Duration, Instant};

use mkb_tests::{
    KafkaReader, Mosquitto, RunningBridge, bridge_config, brokers, init_logging, unique,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_is_written_to_the_test_topic_before_mqtt_is_read() {
    init_logging();
    let (kafka, mqtt, topic) = brokers();
    let probe_topic = format!("probe-{}", unique());
    // The broker's default replication factor (-1) must work too: it is the bridge's default.
    let mut config = bridge_config(
        mqtt.port(),
        kafka.port(),
        &topic,
        "x/#",
        &[("KAFKA_TEST_TOPIC", &probe_topic)],
    );
    config.kafka.topic_replication = -1;
    let bridge = RunningBridge::start(config).await.expect("bridge starts");

    let mut reader = KafkaReader::new(&kafka.brokers(), &probe_topic).await;
    let probe = reader.read_exactly(1, Duration::from_secs(30)).await[0].clone();
    assert_eq!(
        probe.value,
        br#"{"topic":"test","content":"SW50ZXJuYWwgdGVzdCB0byBzZWUgaWYga2Fma2EgaXMgYWxpdmUgYXQgc3RhcnR1cA=="}"#
    );
    assert_eq!(
        probe.payload,
        b"Internal test to see if kafka is alive at startup"
    );
    // The main topic was created as well.
    KafkaReader::new(&kafka.brokers(), &topic).await;
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_against_a_closed_port_fails_within_the_startup_timeout() {
    init_logging();
    let mqtt = Mosquitto::start();
    let closed_port = mkb_tests::servers::free_port();
    let config = bridge_config(
        mqtt.port(),
        closed_port,
        "mqtt",
        "x/#",
        &[
            ("KAFKA_TEST_TOPIC", "probe"),
            ("KAFKA_STARTUP_TIMEOUT", "2s"),
        ],
    );
    let started = Instant::now();
    let error = match RunningBridge::start(config).await {
        Ok(_) => panic!("bridge started without Kafka"),
        Err(error) => error.to_string(),
    };
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "gave up after {took:?}");
    assert!(
        error.contains("probe") || error.contains("could not create Kafka topic"),
        "unclear error: {error}"
    );
}
