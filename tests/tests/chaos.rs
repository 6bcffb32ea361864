//! Outages between the bridge and Kafka, made by a fault proxy in front of a real tansu: cut,
//! latency, resets, a restart in the middle of an outage, full spools and damaged spools.
//! Duplicates are acceptable; a lost or reordered message is a failure.

use std::sync::Arc;
use std::time::Duration;

use mkb_tests::numbered::{expect_all_numbers, publish_all, publish_numbered};
use mkb_tests::{
    BridgeProcess, Fault, FaultProxy, KafkaReader, Mosquitto, Publisher, RunningBridge, Tansu,
    bridge_config, bridge_env, brokers, brokers_behind_proxy, eventually, init_logging, spool_dir,
    with_fast_failure,
};
use rumqttc::QoS;

const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

async fn spooled(bridge: &RunningBridge) -> f64 {
    bridge.metric("bridge_spool_records").await
}

type Setup = (Tansu, FaultProxy, Mosquitto, String, RunningBridge);

/// Brokers, with Kafka behind the fault proxy, and a subscribed bridge on `filter` with the
/// fast failure settings plus `extra`.
async fn bridge_behind_proxy(filter: &str, extra: &[(&str, &str)]) -> Setup {
    let (kafka, proxy, mqtt, topic) = brokers_behind_proxy().await;
    let config = bridge_config(
        mqtt.port(),
        proxy.port(),
        &topic,
        filter,
        &with_fast_failure(extra),
    );
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    (kafka, proxy, mqtt, topic, bridge)
}

/// [`bridge_behind_proxy`], with Kafka cut once the bridge is subscribed.
async fn bridge_with_kafka_cut(filter: &str, extra: &[(&str, &str)]) -> Setup {
    let setup = bridge_behind_proxy(filter, extra).await;
    setup.1.set(Fault::Down);
    setup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_cut_for_30_s_during_steady_traffic_loses_nothing() {
    init_logging();
    let (kafka, proxy, mqtt, topic, bridge) = bridge_behind_proxy("cut/#", &[]).await;

    // 1,000 messages a second for 40 s; Kafka is cut from the 5th second to the 35th.
    let publisher = Arc::new(Publisher::connect(mqtt.port()).await);
    let count = 40_000;
    let traffic = publish_numbered(publisher.clone(), "cut", count, 1000, QoS::AtLeastOnce);
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.set(Fault::Down);
    let peak = eventually(Duration::from_secs(20), "records in the spool", || async {
        let spooled = spooled(&bridge).await;
        (spooled > 0.0 && bridge.metric("bridge_kafka_state").await == 1.0).then_some(spooled)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    let during = spooled(&bridge).await;
    assert!(
        during > peak,
        "the spool kept growing during the outage ({peak} then {during})"
    );
    proxy.set(Fault::None);
    traffic.await.expect("publisher");
    publisher.wait_acked(count).await;
    let delivery = expect_all_numbers(&kafka.brokers(), &topic, count, DRAIN_DEADLINE).await;
    eventually(Duration::from_secs(30), "the spool to empty", || async {
        (spooled(&bridge).await == 0.0 && bridge.metric("bridge_kafka_state").await == 0.0)
            .then_some(())
    })
    .await;
    assert!(bridge.metric("bridge_spool_records_drained_total").await >= during);
    assert!(bridge.metric("bridge_kafka_failing_seconds_total").await >= 20.0);
    eprintln!("30 s cut: {delivery:?}, spool peaked above {during} records");
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_larger_than_the_memory_tier_spills_to_disk_in_order() {
    init_logging();
    // Acknowledged on receipt, so the memory tier is used first.
    let (kafka, proxy, mqtt, topic, bridge) = bridge_with_kafka_cut(
        "spill/#",
        &[
            ("MQTT_ACK", "on-receipt"),
            ("SPOOL_MEMORY_BYTES", "64KiB"),
            ("KAFKA_BATCH_SIZE", "100"),
        ],
    )
    .await;

    let count = 5_000;
    let _publisher = publish_all(mqtt.port(), "spill", count).await;
    // The memory tier fills first; when it overflows, what it holds moves to disk ahead of
    // the rest, so everything ends up there.
    let metrics = eventually(
        Duration::from_secs(30),
        "everything spooled, on disk",
        || async {
            let metrics = bridge.metrics().await;
            let memory = mkb_tests::metric_value(&metrics, "bridge_spool_bytes{tier=\"memory\"}");
            let disk = mkb_tests::metric_value(&metrics, "bridge_spool_records{tier=\"disk\"}");
            (disk >= count as f64).then_some((memory, disk))
        },
    )
    .await;
    assert!(
        metrics.0 <= 64.0 * 1024.0,
        "memory tier within its quota: {metrics:?}"
    );
    proxy.set(Fault::None);

    expect_all_numbers(&kafka.brokers(), &topic, count, DRAIN_DEADLINE).await;
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_and_connection_resets_lose_nothing() {
    init_logging();
    let (kafka, proxy, mqtt, topic, bridge) = bridge_behind_proxy("rough/#", &[]).await;

    let publisher = Arc::new(Publisher::connect(mqtt.port()).await);
    let count = 6_000;
    let traffic = publish_numbered(publisher.clone(), "rough", count, 500, QoS::AtLeastOnce);
    proxy.set(Fault::Latency(Duration::from_secs(2)));
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set(Fault::None);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.reset_connections();
    }
    traffic.await.expect("publisher");

    let delivery = expect_all_numbers(&kafka.brokers(), &topic, count, DRAIN_DEADLINE).await;
    eprintln!("latency and resets: {delivery:?}");
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_outage_keeps_the_spool_for_the_next_start() {
    init_logging();
    let (kafka, proxy, mqtt, topic) = brokers_behind_proxy().await;
    let (_spool, spool_dir) = spool_dir();
    let env = bridge_env(
        mqtt.port(),
        proxy.port(),
        &topic,
        "term/#",
        &with_fast_failure(&[("SPOOL_DIR", &spool_dir), ("SHUTDOWN_TIMEOUT", "10s")]),
    );
    let mut first = BridgeProcess::start(&env);
    first.wait_subscribed().await;
    proxy.set(Fault::Down);

    let count = 3_000;
    let publisher = publish_all(mqtt.port(), "term", count).await;
    publisher.wait_acked(count).await;
    first.wait_all_spooled(count).await;
    first.terminate();
    let (status, first) =
        tokio::task::spawn_blocking(move || (first.wait(Duration::from_secs(15)), first))
            .await
            .expect("wait");
    assert_eq!(status.code(), Some(0), "{}", first.stderr());

    proxy.set(Fault::None);
    let second = BridgeProcess::start(&env);
    let delivery = expect_all_numbers(&kafka.brokers(), &topic, count, DRAIN_DEADLINE).await;
    eventually(
        Duration::from_secs(30),
        "the restarted bridge to empty its spool",
        || async { (second.metric("bridge_spool_records").await == Some(0.0)).then_some(()) },
    )
    .await;
    eprintln!("SIGTERM during outage, restart: {delivery:?}");
}

/// Fills a small disk spool during an outage and returns what Kafka got afterwards, as
/// (distinct numbers received, records dropped by the policy, number published).
async fn overflow_with_policy(policy: &str) -> (Vec<u64>, f64, u64) {
    let (kafka, proxy, mqtt, topic, bridge) = bridge_with_kafka_cut(
        "full/#",
        &[
            ("SPOOL_FULL_POLICY", policy),
            ("SPOOL_MEMORY_BYTES", "0"),
            ("SPOOL_DISK_BYTES", "32KiB"),
            ("KAFKA_BATCH_SIZE", "50"),
        ],
    )
    .await;
    let count = 3_000;
    let publisher = publish_all(mqtt.port(), "full", count).await;
    publisher.wait_acked(count).await;
    eventually(Duration::from_secs(60), "the spool to fill", || async {
        let readyz = mkb_tests::http_get(bridge.health_addr, "/readyz").await;
        let dropped = bridge.metric("bridge_records_dropped_total").await;
        (readyz.contains("nothing more can be held") || dropped > 0.0).then_some(())
    })
    .await;
    if policy != "block" {
        // Everything published has been either spooled or dropped once nothing awaits an ack.
        eventually(
            Duration::from_secs(60),
            "every message spooled or dropped",
            || async {
                (bridge.metric("bridge_mqtt_messages_awaiting_ack").await == 0.0).then_some(())
            },
        )
        .await;
    }
    proxy.set(Fault::None);

    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    let dropped_now = bridge.metric("bridge_records_dropped_total").await;
    let expected = count as usize - dropped_now as usize;
    reader
        .read_until(DRAIN_DEADLINE, |r| {
            r.iter()
                .map(|x| x.payload.clone())
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= expected
        })
        .await;
    // A moment more, to be sure nothing beyond that arrives.
    reader
        .read_at_least(usize::MAX, Duration::from_secs(2))
        .await;
    let mut numbers: Vec<u64> = reader
        .received
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).parse().expect("number"))
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    let dropped = bridge.metric("bridge_records_dropped_total").await;
    bridge.stop().await.expect("clean stop");
    (numbers, dropped, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_with_block_loses_nothing() {
    init_logging();
    let (numbers, dropped, count) = overflow_with_policy("block").await;
    assert_eq!(dropped, 0.0);
    assert_eq!(
        numbers,
        (0..count).collect::<Vec<_>>(),
        "every message arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_with_drop_newest_drops_exactly_what_it_counts() {
    init_logging();
    let (numbers, dropped, count) = overflow_with_policy("drop-newest").await;
    assert!(dropped > 0.0, "the spool overflowed");
    assert_eq!(
        numbers.len() as f64 + dropped,
        count as f64,
        "received + dropped = published"
    );
    assert!(numbers.contains(&0), "the oldest were kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_with_drop_oldest_drops_exactly_what_it_counts() {
    init_logging();
    let (numbers, dropped, count) = overflow_with_policy("drop-oldest").await;
    assert!(dropped > 0.0, "the spool overflowed");
    assert_eq!(
        numbers.len() as f64 + dropped,
        count as f64,
        "received + dropped = published"
    );
    assert!(numbers.contains(&(count - 1)), "the newest were kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_spool_at_start_up_is_moved_aside_and_the_bridge_runs() {
    init_logging();
    let (kafka, mqtt, topic) = brokers();
    let work = tempfile::tempdir().expect("temp dir");
    let spool_dir = work.path().join("spool");
    std::fs::create_dir(&spool_dir).expect("mkdir");
    std::fs::write(spool_dir.join("conf"), b"\x00\x01garbage").expect("write");
    std::fs::write(spool_dir.join("db"), vec![0x5a; 10_000]).expect("write");
    let spool = spool_dir.display().to_string();
    let env = bridge_env(
        mqtt.port(),
        kafka.port(),
        &topic,
        "damaged/#",
        &[("SPOOL_DIR", &spool)],
    );
    let bridge = BridgeProcess::start(&env);
    bridge.wait_subscribed().await;

    let publisher = Publisher::connect(mqtt.port()).await;
    publisher
        .publish("damaged/a", "still works", QoS::AtLeastOnce)
        .await;
    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    assert_eq!(
        reader.read_exactly(1, Duration::from_secs(30)).await[0].payload,
        b"still works"
    );
    let moved = std::fs::read_dir(work.path())
        .expect("list")
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("spool.corrupt-")
        });
    assert!(moved, "the damaged spool was kept aside");
    assert!(
        bridge.stderr().contains("moved aside"),
        "{}",
        bridge.stderr()
    );
    assert_eq!(
        bridge.metric("bridge_spool_disk_available").await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_whole_spool_is_let_in_alone_and_nothing_is_lost() {
    init_logging();
    let (kafka, proxy, mqtt, topic, bridge) = bridge_with_kafka_cut(
        "huge/#",
        &[
            ("SPOOL_FULL_POLICY", "block"),
            ("SPOOL_MEMORY_BYTES", "0"),
            ("SPOOL_DISK_BYTES", "32KiB"),
        ],
    )
    .await;
    // 2 KB topics: a batch of 20 messages (Mosquitto's window) is larger than the whole spool.
    let prefix = format!("huge/{}", "x".repeat(2000));
    let count = 400;
    let publisher = publish_all(mqtt.port(), &prefix, count).await;
    eventually(
        Duration::from_secs(60),
        "an oversized batch in the spool",
        || async {
            let bytes = bridge.metric("bridge_spool_bytes").await;
            (bytes > 32.0 * 1024.0).then_some(bytes)
        },
    )
    .await;
    proxy.set(Fault::None);
    publisher.wait_acked(count).await;
    let delivery = expect_all_numbers(&kafka.brokers(), &topic, count, DRAIN_DEADLINE).await;
    eprintln!("oversized batches: {delivery:?}");
    bridge.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_unreachable_at_start_delays_the_first_batches_without_reordering() {
    init_logging();
    // Cut before the bridge starts: the topic cannot even be created.
    let (kafka, proxy, mqtt, topic) = brokers_behind_proxy().await;
    proxy.set(Fault::Down);
    let config = bridge_config(
        mqtt.port(),
        proxy.port(),
        &topic,
        "late/#",
        &with_fast_failure(&[]),
    );
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    let count = 2_000;
    let publisher = publish_all(mqtt.port(), "late", count).await;
    eventually(
        Duration::from_secs(60),
        "a failed topic creation",
        || async {
            let errors = bridge
                .metric("bridge_kafka_errors_total{kind=\"create_topic\"}")
                .await;
            (errors > 0.0).then_some(())
        },
    )
    .await;
    proxy.set(Fault::None);
    publisher.wait_acked(count).await;
    let delivery = expect_all_numbers(&kafka.brokers(), &topic, count, DRAIN_DEADLINE).await;
    eprintln!("Kafka back after a failed topic creation: {delivery:?}");
    bridge.stop().await.expect("clean stop");
}
