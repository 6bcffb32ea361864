//! What operators rely on: readiness that tells the truth, and a SIGTERM that loses nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mkb_tests::{
    BridgeProcess, KafkaReader, Mosquitto, Publisher, RunningBridge, Tansu, bridge_config,
    bridge_env, brokers, eventually, http_get, init_logging, servers::free_port, unique,
};
use rumqttc::QoS;

async fn readyz(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/readyz").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_subscribed() {
    init_logging();
    let kafka = Tansu::start();
    // Nothing listens on this port: the bridge can never subscribe.
    let config = bridge_config(free_port(), kafka.port(), "mqtt", "a/#", &[]);
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    let answer = eventually(
        Duration::from_secs(10),
        "a connection error in /readyz",
        || async {
            let answer = readyz(bridge.health_addr).await;
            answer.contains("Connection refused").then_some(answer)
        },
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("not ready: MQTT not subscribed"),
        "{answer}"
    );
    let healthz = http_get(bridge.health_addr, "/healthz").await;
    assert!(
        healthz.starts_with("HTTP/1.1 200") && healthz.ends_with("ok\n"),
        "{healthz}"
    );
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_200_when_healthy_and_503_while_kafka_cannot_take_writes() {
    init_logging();
    let kafka = Tansu::start();
    let mqtt = Mosquitto::start();
    let config = bridge_config(
        mqtt.port(),
        kafka.port(),
        &format!("mqtt-{}", unique()),
        "ready/#",
        // No room to hold anything: a failing Kafka leaves the bridge unable to take more.
        &[
            ("KAFKA_DELIVERY_TIMEOUT", "2s"),
            ("KAFKA_BATCH_SIZE", "1"),
            ("SPOOL_MEMORY_BYTES", "0"),
            ("SPOOL_DISK_BYTES", "0"),
        ],
    );
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    let answer = readyz(bridge.health_addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(bridge.metric("bridge_kafka_state").await, 0.0);

    // Kafka goes away for good; the next write fails after the delivery timeout.
    drop(kafka);
    let publisher = Publisher::connect(mqtt.port()).await;
    publisher
        .publish("ready/a", "stuck", QoS::AtLeastOnce)
        .await;
    let answer = eventually(
        Duration::from_secs(30),
        "/readyz to report Kafka",
        || async {
            let answer = readyz(bridge.health_addr).await;
            answer.starts_with("HTTP/1.1 503").then_some(answer)
        },
    )
    .await;
    assert!(
        answer.contains("not ready: Kafka failing and nothing more can be held"),
        "{answer}"
    );
    assert_eq!(bridge.metric("bridge_kafka_state").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_traffic_exits_0_with_everything_published_in_kafka() {
    init_logging();
    let (kafka, mqtt, topic) = brokers();
    let env = bridge_env(
        mqtt.port(),
        kafka.port(),
        &topic,
        "steady/#",
        &[("KAFKA_INTERVAL", "1s"), ("SHUTDOWN_TIMEOUT", "20s")],
    );
    let mut bridge = BridgeProcess::start(&env);
    bridge.wait_subscribed().await;

    // Steady QoS 1 traffic, numbered, about 500 messages a second.
    let publisher = Arc::new(Publisher::connect(mqtt.port()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (publisher, stop) = (publisher.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                publisher
                    .publish("steady/n", sent.to_string(), QoS::AtLeastOnce)
                    .await;
                sent += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent
        })
    };
    eventually(Duration::from_secs(30), "traffic to flow", || async {
        (publisher.acked() >= 1000).then_some(())
    })
    .await;

    // The broker acknowledges in order: everything below this count was in the broker (and
    // so sent on to the bridge) before the signal.
    let acked_before_signal = publisher.acked();
    bridge.terminate();
    let status = tokio::task::spawn_blocking(move || {
        let status = bridge.wait(Duration::from_secs(25));
        (status, bridge)
    });
    let (status, bridge) = status.await.expect("wait for the bridge");
    stop.store(true, Ordering::Relaxed);
    let published = traffic.await.expect("publisher task");
    assert_eq!(status.code(), Some(0), "stderr:\n{}", bridge.stderr());
    assert!(published > acked_before_signal);

    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    let count = usize::try_from(acked_before_signal).expect("fits");
    let received = reader.read_exactly(count, Duration::from_secs(30)).await;
    let mut numbers: Vec<u64> = received
        .iter()
        .map(|r| {
            String::from_utf8_lossy(&r.payload)
                .parse()
                .expect("numbered payload")
        })
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    let missing: Vec<u64> = (0..acked_before_signal)
        .filter(|n| numbers.binary_search(n).is_err())
        .collect();
    assert!(missing.is_empty(), "lost across SIGTERM: {missing:?}");
}
