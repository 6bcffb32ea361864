//! `mkb-bench`: what the bridge costs compared with not having it (SPEC §6).
//!
//! Starts Mosquitto, tansu and the bridge (built in this binary's profile: run it with
//! `--release`), publishes N messages of S bytes from P connections, flat out or at a rate, and
//! reads them back from Kafka. Each payload carries its publish time, so latency is measured
//! from publish to the moment the benchmark's Kafka consumer receives the record. Then it runs
//! the same load into a no-op MQTT subscriber that acknowledges at once (the baseline: what
//! broker and publishers alone manage) and prints one table with the ratio.

mod cpu;
mod downlink;
mod kafka_alone;
mod publisher;
mod sparkplug;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use mkb_tests::{
    BridgeProcess, Mosquitto, MosquittoOptions, Tansu, bridge_env, metric_value, unique,
    with_fast_failure,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::time::Instant;

const USAGE: &str =
    "usage: mkb-bench [--messages N] [--size BYTES] [--publishers P] [--rate MSG_PER_S]
                 [--qos 0|1] [--mqtt-version 3.1.1|5] [--ack after-write|on-receipt]
                 [--batch-size N] [--interval DURATION] [--inflight N] [--no-baseline]
                 [--outage]   (Kafka cut while publishing: measures spool write and drain rates)
                 [--outage-hold SECONDS]   (keep Kafka cut that long after everything is spooled)
                 [--topics N]   (N MQTT topics per publisher, each mapped to a Kafka topic of its own)
                 [--headers none|all|LIST]   (the bridge's KAFKA_HEADERS)
                 [--downlink]   (Kafka → MQTT: the downlink against a plain consumer and client)
                 [--sparkplug]   (Sparkplug B NDATA payloads of 20 alias-only metrics on spBv1.0/bench/NDATA/<p>)
                 [--format envelope|raw|json|sparkplug-json]   (the bridge's KAFKA_VALUE_FORMAT)
                 [--cpu]   (count the bridge's instructions per message under callgrind; no baseline)
                 [--kafka-alone]   (also time the same records written straight into tansu, no bridge)";

#[derive(Clone, Debug)]
struct Options {
    messages: u64,
    size: usize,
    publishers: u64,
    rate: u64,
    qos: u8,
    mqtt_version: String,
    ack: String,
    batch_size: String,
    interval: String,
    inflight: u16,
    baseline: bool,
    outage: bool,
    outage_hold: u64,
    /// MQTT topics per publisher; above 1, each is mapped to a Kafka topic of its own.
    topics: u64,
    /// `KAFKA_HEADERS` of the bridge.
    headers: String,
    /// Measure the downlink (Kafka → MQTT) instead.
    downlink: bool,
    /// Sparkplug B payloads (after one NBIRTH per publisher).
    sparkplug: bool,
    /// `KAFKA_VALUE_FORMAT` of the bridge.
    format: String,
    /// Count the bridge's instructions under callgrind.
    cpu: bool,
    /// Also run the Kafka half alone: a producer straight into tansu, the same reader.
    kafka_alone: bool,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        messages: 100_000,
        size: 100,
        publishers: 1,
        rate: 0,
        qos: 0,
        mqtt_version: "3.1.1".to_owned(),
        ack: "after-write".to_owned(),
        batch_size: "1000".to_owned(),
        interval: "5s".to_owned(),
        inflight: 20,
        baseline: true,
        outage: false,
        outage_hold: 0,
        topics: 1,
        headers: "none".to_owned(),
        downlink: false,
        sparkplug: false,
        format: "envelope".to_owned(),
        cpu: false,
        kafka_alone: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--no-baseline" => o.baseline = false,
            "--outage" => o.outage = true,
            "--downlink" => o.downlink = true,
            "--sparkplug" => o.sparkplug = true,
            "--cpu" => (o.cpu, o.baseline) = (true, false),
            "--kafka-alone" => o.kafka_alone = true,
            "--messages" => o.messages = number(flag, &value()?)?,
            "--size" => o.size = number(flag, &value()?)? as usize,
            "--publishers" => o.publishers = number(flag, &value()?)?.max(1),
            "--rate" => o.rate = number(flag, &value()?)?,
            "--qos" => o.qos = number(flag, &value()?)? as u8,
            "--mqtt-version" => o.mqtt_version = value()?,
            "--ack" => o.ack = value()?,
            "--batch-size" => o.batch_size = value()?,
            "--interval" => o.interval = value()?,
            "--inflight" => o.inflight = number(flag, &value()?)? as u16,
            "--outage-hold" => o.outage_hold = number(flag, &value()?)?,
            "--topics" => o.topics = number(flag, &value()?)?.max(1),
            "--headers" => o.headers = value()?,
            "--format" => o.format = value()?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if o.size < 16 {
        return Err("--size must be at least 16 (the payload carries a timestamp)".to_owned());
    }
    Ok(o)
}

fn number(flag: &str, value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: not a number: {value}"))
}

/// One run's figures.
struct Figures {
    seconds: f64,
    received: u64,
    latencies: Vec<Duration>,
    rss: Option<u64>,
    cpu: Option<Duration>,
    outage: Option<Outage>,
    /// With `--cpu`: the bridge's instructions during the load, and callgrind's dump.
    instructions: Option<(u64, std::path::PathBuf)>,
    /// The bridge's own figures from `/metrics`: its latency histogram and mean batch.
    own_figures: Option<String>,
    /// CPU µs per message of each program on the machine during the load.
    budget: String,
}

impl Figures {
    /// A run without the bridge: the load's figures and the CPU budget alone.
    fn without_bridge(seconds: f64, latencies: Vec<Duration>, budget: String) -> Self {
        Self {
            seconds,
            received: latencies.len() as u64,
            latencies,
            rss: None,
            cpu: None,
            outage: None,
            instructions: None,
            own_figures: None,
            budget,
        }
    }
}

/// What `--outage` measured.
struct Outage {
    /// Seconds from the first publish until every message was spooled or counted as dropped.
    spooled: f64,
    /// Records spooled after the bridge knew Kafka was down (`bridge_kafka_state` 1), and the
    /// seconds that took: the spool's own write rate, without the delivery timeout before it.
    spooled_once_down: (f64, f64),
    /// Messages the bridge counted as dropped (QoS 0 intake full, or a spool drop policy).
    dropped: u64,
    /// With `--outage-hold`: peak RSS in bytes when the hold began and when it ended.
    held: Option<(u64, u64)>,
    /// Seconds to drain the records left in the spool once draining had started, and how many
    /// those were.
    drained: f64,
    remaining: f64,
}

/// Metrics that count messages the bridge gave up on, by design and counted.
const DROPPED: [&str; 2] = [
    "bridge_mqtt_messages_dropped_total",
    "bridge_records_dropped_total",
];

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A payload of `size` bytes: publish time in microseconds, then the sequence number, then
/// padding.
fn payload(seq: u64, size: usize, bytes: &mut Vec<u8>) {
    bytes.extend_from_slice(&now_micros().to_le_bytes());
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.resize(size, b'x');
}

fn latency_of(payload: &[u8]) -> Option<Duration> {
    let sent = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    Some(Duration::from_micros(now_micros().saturating_sub(sent)))
}

/// Publishes the load from `publishers` connections; returns when every message was handed to
/// the broker (and, for QoS 1, acknowledged).
async fn publish(port: u16, o: &Options, topic_prefix: &str) {
    let mut tasks = Vec::new();
    for p in 0..o.publishers {
        let o = o.clone();
        let topics: Vec<String> = if o.topics > 1 {
            (0..o.topics)
                .map(|t| format!("{topic_prefix}/{p}/{t}"))
                .collect()
        } else {
            vec![format!("{topic_prefix}/{p}")]
        };
        tasks.push(tokio::spawn(async move {
            let load = publisher::Load {
                port,
                topics: &topics,
                messages: o.messages / o.publishers,
                size: o.size,
                qos: o.qos,
                rate: o.rate / o.publishers,
            };
            if o.sparkplug {
                publisher::publish(load, sparkplug::ndata).await;
            } else {
                publisher::publish(load, |seq, body| payload(seq, o.size, body)).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("publisher task");
    }
}

/// The publish time carried by a record: the first 8 bytes of the envelope's payload. Only
/// those 12 base64 characters are decoded, so reading back costs the machine (which the
/// bridge shares with this benchmark) as little as it can.
fn sent_micros(value: &[u8], sparkplug: bool) -> Option<u64> {
    if sparkplug && !value.starts_with(br#"{"topic""#) {
        return sparkplug::sent_micros_json(value);
    }
    const CONTENT: &[u8] = br#"","content":""#;
    let start = value.windows(CONTENT.len()).position(|w| w == CONTENT)? + CONTENT.len();
    let mut head = [0u8; 9];
    base64::engine::general_purpose::STANDARD
        .decode_slice(value.get(start..start + 12)?, &mut head)
        .ok()?;
    if sparkplug {
        return sparkplug::sent_micros_protobuf(&head);
    }
    Some(u64::from_le_bytes(head[..8].try_into().ok()?))
}

/// Reads `expected` records from the topics on a blocking thread, recording each one's latency.
/// `ready` fires once the consumer is connected, so its start-up does not count as latency.
fn read_kafka(
    brokers: &str,
    topics: &[String],
    expected: u64,
    progress: &AtomicU64,
    ready: tokio::sync::oneshot::Sender<()>,
    sparkplug: bool,
) -> Vec<Duration> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-{}", unique()))
        .set("enable.auto.commit", "false")
        // A fetch that finds nothing new waits this long, and the wait shows in every measured
        // latency: a 5,000 msg/s run had p50 13.3 ms with 5 ms here, 8.1 ms with 1 ms.
        .set("fetch.wait.max.ms", "1")
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("create the benchmark's consumer");
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        assignment
            .add_partition_offset(topic, 0, Offset::Beginning)
            .expect("valid offset");
    }
    consumer.assign(&assignment).expect("assign");
    let mut latencies = Vec::with_capacity(expected as usize);
    let mut record = |message: &rdkafka::message::BorrowedMessage<'_>| {
        if let Some(sent) = message.payload().and_then(|v| sent_micros(v, sparkplug)) {
            latencies.push(Duration::from_micros(now_micros().saturating_sub(sent)));
            progress.fetch_add(1, Ordering::Relaxed);
        }
    };
    // Returns once the consumer has connected and fetched (or read a record, kept too).
    if let Some(Ok(message)) = consumer.poll(Duration::from_secs(2)) {
        record(&message);
    }
    let _ = ready.send(());
    let mut last_record = std::time::Instant::now();
    while progress.load(Ordering::Relaxed) < expected {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                record(&message);
                last_record = std::time::Instant::now();
            }
            Some(Err(_)) => {}
            None if last_record.elapsed() > Duration::from_secs(60) => {
                eprintln!(
                    "Kafka: nothing new for 60 s; stopping at {} records",
                    latencies.len()
                );
                break;
            }
            None => {}
        }
    }
    latencies
}

fn spawn_progress(
    label: &'static str,
    total: u64,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = done.load(Ordering::Relaxed);
            eprintln!("  {label}: {now}/{total} received ({} msg/s)", now - last);
            last = now;
        }
    })
}

/// The sum of some of the bridge's metrics, read from one page; `None` while its HTTP server
/// is not up.
async fn metric_sum(bridge: &BridgeProcess, names: &[&str]) -> Option<f64> {
    let page = bridge.metrics().await?;
    Some(names.iter().map(|name| metric_value(&page, name)).sum())
}

/// Polls the sum of some of the bridge's metrics until `done` holds; returns the seconds it
/// took. Gives up after 10 minutes, panicking, which stops the servers and prints the end of the
/// bridge's log.
async fn wait_metric(bridge: &BridgeProcess, names: &[&str], done: impl Fn(f64) -> bool) -> f64 {
    let started = Instant::now();
    loop {
        let value = metric_sum(bridge, names).await;
        if value.is_some_and(&done) {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{names:?} stuck at {value:?} for 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_bridge(o: &Options) -> Figures {
    // The fault proxy copies every byte: only the outage run puts it in front of Kafka.
    let (kafka, proxy) = if o.outage {
        let (kafka, proxy) = Tansu::start_behind_proxy().await;
        (kafka, Some(proxy))
    } else {
        (Tansu::start(), None)
    };
    let kafka_port = proxy.as_ref().map_or(kafka.port(), |p| p.port());
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        max_inflight: Some(o.inflight),
        ..MosquittoOptions::default()
    });
    let topic = format!("bench-{}", unique());
    let qos = o.qos.to_string();
    // One window for both directions: Mosquitto's max_inflight_messages and, for MQTT 5, the
    // bridge's Receive Maximum (Mosquitto uses the client's value for MQTT 5 clients).
    let window = o.inflight.to_string();
    let max_batch = o
        .batch_size
        .parse::<u64>()
        .unwrap_or(1000)
        .max(8000)
        .to_string();
    // With several MQTT topics, each is mapped to a Kafka topic of its own, created here first
    // so the reader can be assigned them before the bridge writes.
    let kafka_topics: Vec<String> = if o.topics > 1 {
        (0..o.topics).map(|t| format!("{topic}.{t}")).collect()
    } else {
        vec![topic.clone()]
    };
    if o.topics > 1 {
        for kafka_topic in &kafka_topics {
            mkb_tests::kafka::create_topic(&kafka.brokers(), kafka_topic, 1).await;
        }
    }
    let map = if o.topics > 1 {
        format!("bench/+/{{t}}={topic}.{{t}}")
    } else {
        String::new()
    };
    let (prefix, filter) = if o.sparkplug {
        ("spBv1.0/bench/NDATA", "spBv1.0/bench/#")
    } else {
        ("bench", "bench/#")
    };
    let env = bridge_env(
        mqtt.port(),
        kafka_port,
        &topic,
        filter,
        // Fast failure settings, so the outage run's spooling starts after 3 s, not 30.
        &with_fast_failure(&[
            ("KAFKA_VALUE_FORMAT", &o.format),
            ("KAFKA_TOPIC_MAP", &map),
            ("KAFKA_HEADERS", &o.headers),
            ("MQTT_QOS", &qos),
            ("MQTT_VERSION", &o.mqtt_version),
            ("MQTT_ACK", &o.ack),
            ("MQTT_RECEIVE_MAXIMUM", &window),
            ("KAFKA_BATCH_SIZE", &o.batch_size),
            ("KAFKA_MAX_BATCH_SIZE", &max_batch),
            ("KAFKA_INTERVAL", &o.interval),
            ("LOG_LEVEL", "error"),
            ("SPOOL_DISK_BYTES", "4GiB"),
        ]),
    );
    let callgrind = o.cpu.then(|| {
        cpu::Callgrind::new().unwrap_or_else(|e| {
            eprintln!("mkb-bench: {e}");
            std::process::exit(1)
        })
    });
    let bridge = match &callgrind {
        Some(callgrind) => BridgeProcess::start_under(&env, &callgrind.wrapper()),
        None => BridgeProcess::start(&env),
    };
    bridge.wait_subscribed().await;
    if o.sparkplug {
        // Each publisher is an edge node: its NBIRTH names the aliases its NDATA carry.
        let births = mkb_tests::Publisher::connect(mqtt.port()).await;
        for p in 0..o.publishers {
            births
                .publish(
                    &format!("spBv1.0/bench/NBIRTH/{p}"),
                    sparkplug::nbirth(),
                    QoS::AtLeastOnce,
                )
                .await;
        }
        births.wait_acked(o.publishers).await;
    }
    let mut outage = None;
    let mut expected = o.messages;
    if let Some(proxy) = &proxy {
        proxy.set(mkb_tests::Fault::Down);
        let started = Instant::now();
        publish(mqtt.port(), o, prefix).await;
        let spool = ["bridge_spool_records"];
        eprintln!(
            "  outage: waiting until all {} messages are spooled or counted as dropped",
            o.messages
        );
        let everything = [spool.as_slice(), &DROPPED].concat();
        wait_metric(&bridge, &["bridge_kafka_state"], |s| s == 1.0).await;
        let at_failure = metric_sum(&bridge, &everything).await.unwrap_or(0.0);
        let once_down = wait_metric(&bridge, &everything, |n| n >= o.messages as f64).await;
        let spooled_once_down = (o.messages as f64 - at_failure, once_down);
        let spooled = started.elapsed().as_secs_f64();
        let dropped = metric_sum(&bridge, &DROPPED).await.unwrap_or(0.0) as u64;
        expected -= dropped;
        let peak_rss = || bridge.resources().map_or(0, |r| r.0);
        let held = if o.outage_hold > 0 {
            let before = peak_rss();
            eprintln!("  outage: holding Kafka down for {} s more", o.outage_hold);
            tokio::time::sleep(Duration::from_secs(o.outage_hold)).await;
            Some((before, peak_rss()))
        } else {
            None
        };
        eprintln!("  outage: Kafka back, draining");
        proxy.set(mkb_tests::Fault::None);
        // The next retry comes within KAFKA_RETRY_INTERVAL; the drain is timed from there.
        let target = expected as f64;
        let noticed = wait_metric(&bridge, &spool, |n| n < target).await;
        let remaining = metric_sum(&bridge, &spool).await.unwrap_or(target);
        let drained = wait_metric(&bridge, &spool, |n| n == 0.0).await;
        eprintln!(
            "  outage: first records left the spool {noticed:.2} s after Kafka came back; \
             {remaining} records then drained in {drained:.2} s"
        );
        outage = Some(Outage {
            spooled,
            spooled_once_down,
            dropped,
            held,
            drained,
            remaining,
        });
    }
    let progress = Arc::new(AtomicU64::new(0));
    let reporter = spawn_progress("bridge", o.messages, progress.clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking({
        let brokers = kafka.brokers();
        let sparkplug = o.sparkplug;
        move || {
            read_kafka(
                &brokers,
                &kafka_topics,
                expected,
                &progress,
                ready_tx,
                sparkplug,
            )
        }
    });
    let _ = ready_rx.await;
    if let Some(callgrind) = &callgrind {
        callgrind.zero(bridge.pid());
    }
    let budget = cpu::Budget::start(&[
        ("Mosquitto", mqtt.pid()),
        ("bridge", bridge.pid()),
        ("tansu", kafka.pid()),
        ("mkb-bench (publisher, Kafka reader)", std::process::id()),
    ]);
    let started = Instant::now();
    if !o.outage {
        publish(mqtt.port(), o, prefix).await;
    }
    let latencies = reader.await.expect("reader");
    let seconds = started.elapsed().as_secs_f64();
    let budget = budget.report(latencies.len() as u64);
    reporter.abort();
    let own_figures = bridge.metrics().await.and_then(|page| own_figures(&page));
    let instructions = match &callgrind {
        Some(callgrind) => Some(callgrind.instructions(bridge.pid()).await),
        None => None,
    };
    let resources = bridge.resources();
    Figures {
        seconds,
        received: latencies.len() as u64,
        latencies,
        rss: resources.map(|r| r.0),
        cpu: resources.map(|r| r.1),
        outage,
        instructions,
        own_figures,
        budget,
    }
}

/// The bridge's `bridge_end_to_end_latency_seconds` (receipt to Kafka's acknowledgement, or
/// the fsync): the buckets that hold the median and the 99th percentile, and the share within
/// 4 ms (bucket bounds, so "≤"); and its mean batch.
fn own_figures(page: &str) -> Option<String> {
    let prefix = "bridge_end_to_end_latency_seconds_bucket{le=\"";
    let buckets: Vec<(f64, f64)> = page
        .lines()
        .filter_map(|line| line.strip_prefix(prefix))
        .filter_map(|rest| {
            let (bound, count) = rest.split_once("\"} ")?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let bound_of = |q: f64| {
        let (bound, _) = buckets.iter().find(|(_, n)| *n >= q * total)?;
        Some(format!("≤ {} ms", bound * 1000.0))
    };
    let within_4ms = buckets.iter().find(|(b, _)| *b >= 0.004)?.1 / total;
    let batches = metric_value(page, "bridge_kafka_batch_records_count");
    let batch_mean = metric_value(page, "bridge_kafka_batch_records_sum") / batches.max(1.0);
    Some(format!(
        "p50 {}, p99 {}, {:.1} % within 4 ms ({total} records); {batches} batches of \
         {batch_mean:.1} records on average",
        bound_of(0.5)?,
        bound_of(0.99)?,
        within_4ms * 100.0
    ))
}

async fn run_baseline(o: &Options) -> Figures {
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        max_inflight: Some(o.inflight),
        ..MosquittoOptions::default()
    });
    let qos = if o.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let mut options = MqttOptions::new(format!("bench-sub-{}", unique()), "127.0.0.1", mqtt.port());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe("bench/#", qos).await.expect("subscribe");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let progress = Arc::new(AtomicU64::new(0));
    let expected = o.messages;
    let subscriber = tokio::spawn({
        let progress = progress.clone();
        async move {
            let mut ready = Some(ready_tx);
            let mut latencies = Vec::with_capacity(expected as usize);
            while (latencies.len() as u64) < expected {
                match tokio::time::timeout(Duration::from_secs(60), eventloop.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                    }
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        if let Some(latency) = latency_of(&p.payload) {
                            latencies.push(latency);
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => eprintln!("subscriber: {e}"),
                    Err(_) => break,
                }
            }
            latencies
        }
    });
    let _ = ready_rx.await;
    let reporter = spawn_progress("baseline", o.messages, progress);
    let budget = cpu::Budget::start(&[
        ("Mosquitto", mqtt.pid()),
        (
            "mkb-bench (publisher, no-op subscriber)",
            std::process::id(),
        ),
    ]);
    let started = Instant::now();
    publish(mqtt.port(), o, "bench").await;
    let latencies = subscriber.await.expect("subscriber");
    let seconds = started.elapsed().as_secs_f64();
    let budget = budget.report(latencies.len() as u64);
    reporter.abort();
    Figures::without_bridge(seconds, latencies, budget)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

fn row(name: &str, o: &Options, f: &mut Figures) -> String {
    f.latencies.sort_unstable();
    let rate = f.received as f64 / f.seconds;
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    format!(
        "| {name} | {}/{} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
        f.received,
        o.messages,
        rate,
        rate * o.size as f64 / 1e6,
        ms(percentile(&f.latencies, 0.5)),
        ms(percentile(&f.latencies, 0.99)),
        ms(f.latencies.last().copied().unwrap_or_default()),
        f.rss
            .map_or("—".to_owned(), |b| format!("{:.1} MB", b as f64 / 1e6)),
        f.cpu
            .map_or("—".to_owned(), |c| format!("{:.1}", c.as_secs_f64())),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mkb-bench: {e}\n{USAGE}");
            std::process::exit(64);
        }
    };
    if cfg!(debug_assertions) {
        eprintln!("mkb-bench: built without --release; figures will be far below the bridge's.");
    }
    if o.downlink {
        eprintln!("downlink runs: {o:?}");
        if !downlink::run(&o).await {
            std::process::exit(1);
        }
        return;
    }
    eprintln!("bridge run: {o:?}");
    let mut bridge = run_bridge(&o).await;
    let mut baseline = if o.baseline && !o.outage && !o.sparkplug {
        eprintln!("baseline run (no-op subscriber)");
        Some(run_baseline(&o).await)
    } else {
        None
    };

    println!(
        "\nmessages {} × {} B, {} publisher(s), rate {}, QoS {}, MQTT {}, ack {}, batch {}, interval {}, broker window {}",
        o.messages,
        o.size,
        o.publishers,
        if o.rate == 0 {
            "flat out".to_owned()
        } else {
            format!("{}/s", o.rate)
        },
        o.qos,
        o.mqtt_version,
        o.ack,
        o.batch_size,
        o.interval,
        o.inflight
    );
    println!(
        "| run | received | msg/s | MB/s | p50 ms | p99 ms | max ms | bridge peak RSS | bridge CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!("{}", row("bridge → Kafka", &o, &mut bridge));
    println!("\nCPU µs a message, bridge run: {}", bridge.budget);
    if let Some(own) = &bridge.own_figures {
        println!("\nbridge's own histogram (receipt to Kafka's acknowledgement): {own}");
    }
    if let Some((instructions, dump)) = &bridge.instructions {
        println!(
            "\nbridge instructions (callgrind, first publish to last record read): {instructions}, \
             {:.0} per message; CPU s above are valgrind's. Dump: {} (callgrind_annotate it)",
            *instructions as f64 / bridge.received.max(1) as f64,
            dump.display()
        );
        if let Some(split) = cpu::split(dump, bridge.received) {
            println!("instructions a message, by part (inclusive):\n  {split}");
        }
    }
    if let Some(outage) = &bridge.outage {
        let Outage {
            spooled,
            spooled_once_down: (after_failure, once_down),
            dropped,
            drained,
            remaining,
            ..
        } = outage;
        println!(
            "\noutage: {} messages spooled in {spooled:.1} s ({:.0} msg/s, publish to spooled and \
             acknowledged), {dropped} counted as dropped; drain: {remaining} records in \
             {drained:.2} s ({:.0} msg/s, timed from the first records leaving the spool to empty)",
            o.messages - dropped,
            (o.messages - dropped) as f64 / spooled,
            remaining / drained
        );
        println!(
            "spool write once Kafka was known down: {after_failure} records in {once_down:.2} s \
             ({:.0} msg/s)",
            after_failure / once_down
        );
        if let Some((before, after)) = outage.held {
            println!(
                "outage held {} s: bridge peak RSS {:.1} MB when everything was spooled, {:.1} MB \
                 at the end of the hold",
                o.outage_hold,
                before as f64 / 1e6,
                after as f64 / 1e6
            );
        }
    }
    if let Some(baseline) = &mut baseline {
        println!("{}", row("baseline (no-op subscriber)", &o, baseline));
        println!("\nCPU µs a message, baseline run: {}", baseline.budget);
        let ratio = (bridge.received as f64 / bridge.seconds)
            / (baseline.received as f64 / baseline.seconds);
        println!("\nbridge / baseline throughput: {ratio:.2}");
    }
    if o.kafka_alone {
        eprintln!("Kafka alone (producer → tansu → consumer, no bridge)");
        let mut alone = kafka_alone::run(&o).await;
        println!(
            "{}",
            row("Kafka alone (no MQTT, no bridge)", &o, &mut alone)
        );
        if let Some(acks) = &alone.own_figures {
            println!("\nKafka alone, hand-over to Kafka's acknowledgement: {acks}");
        }
        println!("CPU µs a message, Kafka-alone run: {}", alone.budget);
    }
    let dropped = bridge.outage.as_ref().map_or(0, |outage| outage.dropped);
    if bridge.received < o.messages - dropped {
        std::process::exit(1);
    }
}
