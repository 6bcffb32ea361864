//! The disk spool under the faults trusted storage is judged by, with the bridge as a separate
//! process between a real Mosquitto and a real tansu: a filesystem that fills up, bytes damaged
//! inside spool files after a kill -9, and a second bridge started on a spool in use.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mkb_tests::numbered::{distinct_numbers, expect_all_numbers, publish_all};
use mkb_tests::{
    BridgeProcess, Fault, KafkaReader, Publisher, bridge_env, brokers, brokers_behind_proxy,
    eventually, http_get, init_logging, killed_during_outage, spool_dir, with_fast_failure,
};
use rumqttc::QoS;

/// A tmpfs of a few MiB mounted for one test, unmounted when dropped. Mounting needs root,
/// which CI has; anywhere else the test fails saying so rather than skipping.
struct SmallFilesystem {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl SmallFilesystem {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the mount point");
        let mount = dir.path().to_path_buf();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a {size} tmpfs at {}: this test fills a real filesystem and needs \
             root (CI runs as root; run it with sudo)",
            mount.display()
        );
        Self { _dir: dir, mount }
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// GETs `path`, failing the test if the bridge does not answer within 5 s.
async fn answers(bridge: &BridgeProcess, path: &str) -> String {
    tokio::time::timeout(Duration::from_secs(5), http_get(bridge.health_addr, path))
        .await
        .unwrap_or_else(|_| panic!("the bridge did not answer {path} within 5 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_holds_acks_keeps_serving_and_resumes_when_space_returns() {
    init_logging();
    let (kafka, proxy, mqtt, topic) = brokers_behind_proxy().await;
    // 4 MiB of which a filler takes 3.5: the spool has about half a MiB.
    let filesystem = SmallFilesystem::mount("4m");
    let filler = filesystem.mount.join("filler");
    std::fs::write(&filler, vec![0u8; 3584 << 10]).expect("fill the filesystem");
    let spool = filesystem.mount.join("spool").display().to_string();
    let env = bridge_env(
        mqtt.port(),
        proxy.port(),
        &topic,
        "full/#",
        &with_fast_failure(&[("SPOOL_DIR", &spool)]),
    );
    let bridge = BridgeProcess::start(&env);
    bridge.wait_subscribed().await;
    proxy.set(Fault::Down);

    // About 230 bytes a record on disk: 10,000 messages need four times the room there is.
    let count = 10_000;
    let publisher = publish_all(mqtt.port(), "full", count).await;
    eventually(
        Duration::from_secs(60),
        "the disk spool to fail",
        || async {
            (bridge.metric("bridge_spool_disk_available").await == Some(0.0)).then_some(())
        },
    )
    .await;
    let readyz = answers(&bridge, "/readyz").await;
    assert!(
        readyz.starts_with("HTTP/1.1 503") && readyz.contains("disk spool cannot be written"),
        "{readyz}"
    );
    assert!(readyz.contains("No space left on device"), "{readyz}");
    // Still serving, still connected to MQTT, and nothing more acknowledged: the broker keeps
    // what the disk cannot hold.
    assert!(
        answers(&bridge, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        answers(&bridge, "/metrics")
            .await
            .contains("bridge_mqtt_subscribed 1")
    );
    // Every acknowledged message is on disk (Kafka has none): nothing else was acknowledged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked = bridge
        .metric("bridge_mqtt_ack_latency_seconds_count")
        .await
        .expect("metrics");
    let on_disk = bridge
        .metric("bridge_spool_records{tier=\"disk\"}")
        .await
        .expect("metrics");
    assert!(acked < count as f64, "acknowledged {acked} of {count}");
    assert!(acked <= on_disk, "acknowledged {acked}, on disk {on_disk}");

    // Space returns: the bridge uses the disk again by itself, then Kafka returns.
    std::fs::remove_file(&filler).expect("free the space");
    eventually(
        Duration::from_secs(30),
        "the disk spool to be used again",
        || async {
            (bridge.metric("bridge_spool_disk_available").await == Some(1.0)).then_some(())
        },
    )
    .await;
    proxy.set(Fault::None);
    let delivery =
        expect_all_numbers(&kafka.brokers(), &topic, count, Duration::from_secs(120)).await;
    publisher.wait_acked(count).await;
    assert!(
        bridge.stderr().contains("Disk spool write failed"),
        "{}",
        bridge.stderr()
    );
    eprintln!("full disk: {delivery:?}");
    // And it still stops cleanly.
    bridge.terminate();
    let mut bridge = bridge;
    assert!(bridge.wait(Duration::from_secs(30)).success());
}

/// Segment files of a spool, oldest first.
fn segments(spool: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(spool)
        .expect("spool directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_spool_files_after_kill_9_lose_only_the_damaged_records() {
    init_logging();
    let batch = 50;
    let count = 3_000;
    let killed = killed_during_outage("hurt", count, &[("KAFKA_BATCH_SIZE", "50")]).await;
    let (kafka, spool) = (&killed.kafka, &killed.spool);

    // Three bytes flipped, each in a different place in the spool's files.
    let files = segments(Path::new(spool));
    let mut damaged = 0;
    for (n, file) in files.iter().enumerate().take(3) {
        let mut bytes = std::fs::read(file).expect("read segment");
        let at = bytes.len() / 2 + n * 7;
        bytes[at] ^= 0x5a;
        std::fs::write(file, bytes).expect("write segment");
        damaged += 1;
    }
    if files.len() == 1 {
        // One segment: damage two more places in it, far apart.
        let mut bytes = std::fs::read(&files[0]).expect("read segment");
        let len = bytes.len();
        bytes[len / 5] ^= 0x5a;
        bytes[len * 4 / 5] ^= 0x5a;
        std::fs::write(&files[0], bytes).expect("write segment");
        damaged += 2;
    }

    killed.proxy.set(Fault::None);
    let restarted = BridgeProcess::start(&killed.env);
    restarted.wait_subscribed().await;
    eventually(Duration::from_secs(60), "the spool to drain", || async {
        (restarted.metric("bridge_spool_records").await == Some(0.0)
            && restarted.metric("bridge_kafka_state").await == Some(0.0))
        .then_some(())
    })
    .await;
    let sent = restarted
        .metric("bridge_kafka_records_sent_total")
        .await
        .expect("metrics") as usize;
    let mut reader = KafkaReader::new(&kafka.brokers(), &killed.topic).await;
    reader
        .read_until(Duration::from_secs(30), |received| received.len() >= sent)
        .await;
    let seen: HashSet<u64> = distinct_numbers(&reader.received);
    let missing: Vec<u64> = (0..count).filter(|n| !seen.contains(n)).collect();
    let corrupt = restarted
        .metric("bridge_spool_corrupt_entries_total")
        .await
        .expect("metrics");
    eprintln!(
        "damage: {damaged} bytes flipped, {corrupt} ranges set aside, {} records missing",
        missing.len()
    );
    assert_eq!(corrupt, damaged as f64, "every damaged place counted");
    assert!(
        !missing.is_empty(),
        "damage that loses nothing was not damage"
    );
    assert!(
        missing.len() <= damaged * batch,
        "only the damaged entries are lost: {} missing",
        missing.len()
    );
    // Records before the first damage and after the last one are delivered.
    assert!(seen.contains(&0) && seen.contains(&(count - 1)));
    let stderr = restarted.stderr();
    let errors = stderr
        .lines()
        .filter(|l| l.contains("Disk spool damaged"))
        .count();
    assert_eq!(errors, 1, "one ERROR line at start-up: {stderr}");
    assert!(Path::new(spool).join("quarantine").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_bridge_on_the_same_spool_refuses_to_start_and_touches_nothing() {
    init_logging();
    let (kafka, mqtt, topic) = brokers();
    let (dir, spool) = spool_dir();
    let env = bridge_env(
        mqtt.port(),
        kafka.port(),
        &topic,
        "shared/#",
        &[("SPOOL_DIR", &spool)],
    );
    let first = BridgeProcess::start(&env);
    first.wait_subscribed().await;
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();

    let mut second = BridgeProcess::start(&bridge_env(
        mqtt.port(),
        kafka.port(),
        &topic,
        "shared/#",
        &[("SPOOL_DIR", &spool)],
    ));
    let status = second.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", second.stderr());
    let stderr = second.stderr();
    assert!(stderr.contains(&spool), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.pid())), "{stderr}");
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(before, after, "nothing moved aside or created");

    // The first bridge goes on as before.
    let publisher = Publisher::connect(mqtt.port()).await;
    publisher
        .publish("shared/a", "still mine", QoS::AtLeastOnce)
        .await;
    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    assert_eq!(
        reader.read_exactly(1, Duration::from_secs(30)).await[0].payload,
        b"still mine"
    );
}
