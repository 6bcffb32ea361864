//! Test harness: real Mosquitto and tansu processes on free loopback ports, a Kafka reader, an
//! MQTT publisher, and a handle to a bridge started through the same code as `main`.
//!
//! Servers are child processes owned by their handle and killed (by PID) when it drops, so a
//! failing test leaves nothing behind. A missing server binary fails the test with the command
//! that installs it; nothing is skipped.

pub mod certs;
pub mod kafka;
pub mod mqtt;
pub mod numbered;
pub mod process;
pub mod proxy;
pub mod servers;

use std::future::Future;
use std::time::Duration;

use mqtt_kafka_bridge::{Bridge, Config, config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use kafka::KafkaReader;
pub use mqtt::Publisher;
pub use process::BridgeProcess;
pub use proxy::{Fault, FaultProxy};
pub use servers::{ListenerTls, Mosquitto, MosquittoOptions, Tansu};

/// Installs a test logger once; `MKB_TEST_LOG=debug` shows the bridge's logs.
pub fn init_logging() {
    let level = std::env::var("MKB_TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
    let level = mkb_log_level(&level);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_test_writer()
        .try_init();
}

fn mkb_log_level(value: &str) -> tracing::Level {
    value.parse().unwrap_or(tracing::Level::WARN)
}

/// Polls `condition` until it returns `Some`, or fails the test after `deadline` with `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A configuration for a bridge between the given brokers, from environment-style pairs, so
/// the tests go through the same parsing as the binary. `overrides` win over the basics.
pub fn bridge_config(
    mqtt_port: u16,
    kafka_port: u16,
    kafka_topic: &str,
    mqtt_topics: &str,
    overrides: &[(&str, &str)],
) -> Config {
    let env = bridge_env(mqtt_port, kafka_port, kafka_topic, mqtt_topics, overrides);
    // An explicit, empty env file keeps a developer's ./.env out of the tests.
    let empty = tempfile::NamedTempFile::new().expect("temp file for an empty .env");
    config::load(env, Some(empty.path()), "test-host").expect("test configuration is valid")
}

/// The environment of a test bridge between the given brokers; `overrides` win.
pub fn bridge_env(
    mqtt_port: u16,
    kafka_port: u16,
    kafka_topic: &str,
    mqtt_topics: &str,
    overrides: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("MQTT_BROKER", "127.0.0.1".to_owned()),
        ("MQTT_PORT", mqtt_port.to_string()),
        ("MQTT_TOPIC", mqtt_topics.to_owned()),
        ("MQTT_CLIENT_ID", format!("bridge-{}", unique())),
        ("KAFKA_BROKER", "127.0.0.1".to_owned()),
        ("KAFKA_PORT", kafka_port.to_string()),
        ("KAFKA_TOPIC", kafka_topic.to_owned()),
        ("KAFKA_TOPIC_REPLICATION", "1".to_owned()),
        ("KAFKA_INTERVAL", "50ms".to_owned()),
        ("KAFKA_RETRY_INTERVAL", "1s".to_owned()),
        ("HEALTH_ADDR", "127.0.0.1".to_owned()),
        ("HEALTH_PORT", "0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.retain(|(k, _)| !overrides.iter().any(|(o, _)| o == k));
    env.extend(
        overrides
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env
}

/// A fresh tansu, a fresh Mosquitto and a Kafka topic name no other test uses.
pub fn brokers() -> (Tansu, Mosquitto, String) {
    (
        Tansu::start(),
        Mosquitto::start(),
        format!("mqtt-{}", unique()),
    )
}

/// Settings that make Kafka outages show quickly: writes fail after 3 s, retries every second.
pub const FAST_FAILURE: [(&str, &str); 2] = [
    ("KAFKA_DELIVERY_TIMEOUT", "3s"),
    ("KAFKA_RETRY_INTERVAL", "1s"),
];

/// [`FAST_FAILURE`] followed by `extra`.
pub fn with_fast_failure<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = FAST_FAILURE.to_vec();
    all.extend_from_slice(extra);
    all
}

/// As [`brokers`], with tansu behind a [`FaultProxy`]: point the bridge at the proxy's port.
pub async fn brokers_behind_proxy() -> (Tansu, FaultProxy, Mosquitto, String) {
    let (kafka, proxy) = Tansu::start_behind_proxy().await;
    (
        kafka,
        proxy,
        Mosquitto::start(),
        format!("mqtt-{}", unique()),
    )
}

/// A temporary directory and the `SPOOL_DIR` value for a spool inside it.
pub fn spool_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir for the spool");
    let spool = dir.path().join("spool").display().to_string();
    (dir, spool)
}

/// A name no other test in this run uses (topics, client ids).
pub fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A bridge running in this process, stopped by [`RunningBridge::stop`].
pub struct RunningBridge {
    pub health_addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), mqtt_kafka_bridge::Error>>,
    /// The spool directory, when the test left it to the harness.
    _spool: Option<tempfile::TempDir>,
}

impl RunningBridge {
    /// Starts a bridge (probe and topic creation included) and returns once it reads MQTT.
    /// A relative `SPOOL_DIR` (the default) is replaced by a temporary directory.
    pub async fn start(mut config: Config) -> Result<Self, mqtt_kafka_bridge::Error> {
        let spool = match &mut config.kafka.spool.dir {
            Some(dir) if dir.is_relative() => {
                let temp = tempfile::tempdir().expect("temp dir for the spool");
                *dir = temp.path().join("spool");
                Some(temp)
            }
            _ => None,
        };
        let bridge = Bridge::start(config).await?;
        let health_addr = bridge.health_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bridge.run_until(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            health_addr,
            stop: Some(stop),
            task,
            _spool: spool,
        })
    }

    /// Signals shutdown and waits for the drain; returns how the bridge ended.
    pub async fn stop(mut self) -> Result<(), mqtt_kafka_bridge::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("bridge task does not panic")
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        http_get(self.health_addr, "/metrics").await
    }

    /// One metric's value (summed over its labels), 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics().await, name)
    }

    /// Waits until the bridge holds every MQTT subscription, so messages published from now on
    /// reach it.
    pub async fn wait_subscribed(&self) {
        eventually(
            Duration::from_secs(30),
            "the bridge's MQTT subscription",
            || async { (self.metric("bridge_mqtt_subscribed").await == 1.0).then_some(()) },
        )
        .await;
    }
}

impl Drop for RunningBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of one unlabelled metric (or the sum over its labels), 0 when absent.
pub fn metric_value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP/1.1 GET; returns status line, headers and body as text.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("bridge HTTP server listens");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    response
}

/// A bridge process that acknowledged numbered messages during a Kafka outage and was then
/// killed with SIGKILL, so that only its disk spool holds them; Kafka is still cut.
pub struct KilledDuringOutage {
    pub kafka: Tansu,
    pub proxy: FaultProxy,
    pub mqtt: Mosquitto,
    pub topic: String,
    /// The environment it ran with, to start it again on the same spool.
    pub env: Vec<(String, String)>,
    /// `SPOOL_DIR`, inside `_spool`.
    pub spool: String,
    _spool: tempfile::TempDir,
}

/// Starts a bridge process behind a cut Kafka with its own spool (and `extra` settings),
/// publishes `count` numbered QoS 1 messages on `prefix/…`, waits until all are spooled and
/// acknowledged, and kills it.
pub async fn killed_during_outage(
    prefix: &str,
    count: u64,
    extra: &[(&str, &str)],
) -> KilledDuringOutage {
    let (kafka, proxy, mqtt, topic) = brokers_behind_proxy().await;
    let (dir, spool) = spool_dir();
    let mut settings = vec![("SPOOL_DIR", spool.as_str())];
    settings.extend_from_slice(extra);
    let env = bridge_env(
        mqtt.port(),
        proxy.port(),
        &topic,
        &format!("{prefix}/#"),
        &with_fast_failure(&settings),
    );
    let mut bridge = BridgeProcess::start(&env);
    bridge.wait_subscribed().await;
    proxy.set(Fault::Down);
    let publisher = numbered::publish_all(mqtt.port(), prefix, count).await;
    publisher.wait_acked(count).await;
    // All acknowledged by the bridge: the broker has forgotten them, only the spool has them.
    bridge.wait_all_spooled(count).await;
    bridge.kill();
    KilledDuringOutage {
        kafka,
        proxy,
        mqtt,
        topic,
        env,
        spool,
        _spool: dir,
    }
}

/// A fresh tansu and Mosquitto, and a subscribed in-process bridge between them on `filter`
/// with `overrides`.
pub async fn subscribed_bridge(
    filter: &str,
    overrides: &[(&str, &str)],
) -> (Tansu, Mosquitto, String, RunningBridge) {
    let (kafka, mqtt, topic) = brokers();
    let config = bridge_config(mqtt.port(), kafka.port(), &topic, filter, overrides);
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    (kafka, mqtt, topic, bridge)
}
