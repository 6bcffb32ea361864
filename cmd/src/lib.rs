//! Wiring of the bridge: builds the tasks from a [`Config`], connects them with bounded
//! channels, and drains them on shutdown.
//!
//! ```text
//! MqttSource ──Message──▶ Batcher ──Batch──▶ KafkaSink
//!   (mqtt)     bounded     (bridge)  bounded   (kafka)
//! ```
//!
//! Only the MQTT task watches the shutdown signal. When it stops it drops its sender; the
//! batcher flushes its open batch and drops its own; the Kafka task delivers what it holds and
//! ends. The whole drain runs under `SHUTDOWN_TIMEOUT`. `main` and the integration tests both go
//! through [`Bridge::start`] and [`Bridge::run_until`] (or [`run`], which is both).

pub mod config;
mod healthcheck;

use std::future::Future;
use std::net::SocketAddr;

use mkb_bridge::{Batcher, KafkaIdle, ack_channel};
use mkb_downlink::{Downlink, DownlinkMetrics, DownlinkStatus};
use mkb_kafka::{KafkaMetrics, KafkaSink, KafkaStatus};
use mkb_mqtt::{MqttMetrics, MqttSource, MqttStatus};
use mkb_observability::{HealthServer, Readiness, ReadinessHandle};
use prometheus::Registry;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use config::{Config, ConfigError};
pub use healthcheck::healthcheck;

/// What a message on `topic` with `payload` becomes with `config`, as `--route` prints it.
pub fn explain_route(config: &Config, topic: &str, payload: Vec<u8>) -> String {
    let message = mkb_bridge::Message::new(
        0,
        topic.to_owned(),
        payload.into(),
        config.mqtt.qos,
        tokio::time::Instant::now(),
    );
    let explained = config.router.explain(message);
    let record = &explained.record;
    let kafka_topic = match &record.topic {
        mkb_bridge::Topic::Named(name) => name.clone(),
        mkb_bridge::Topic::Default => format!(
            "{} (KAFKA_TOPIC)",
            config.kafka.topic.as_deref().unwrap_or_default()
        ),
        mkb_bridge::Topic::Unmapped => {
            "none: no rule matches and KAFKA_TOPIC is unset (counted as unmapped)".to_owned()
        }
        mkb_bridge::Topic::Dropped(reason) => {
            format!("none: dropped and counted as {reason} (no KAFKA_DLQ_TOPIC)")
        }
    };
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut out = format!(
        "MQTT topic:  {topic}\nrule:        {}\nKafka topic: {kafka_topic}\nkey:         {}\n",
        explained.rule.as_deref().unwrap_or("none"),
        record.key_bytes().map_or("(null)".to_owned(), text),
    );
    if record.headers.is_empty() {
        out.push_str("headers:     none\n");
    }
    for (i, (name, value)) in record.headers.iter().enumerate() {
        let label = if i == 0 { "headers:" } else { "" };
        out.push_str(&format!("{label:<12} {name}={}\n", text(value)));
    }
    out.push_str(&format!("value:       {}\n", text(&record.value)));
    out
}

/// Messages waiting between the MQTT task and the batcher.
const MESSAGE_QUEUE: usize = 4096;
/// Batches waiting between the batcher and the Kafka task.
const BATCH_QUEUE: usize = 2;

/// Why the bridge could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kafka(#[from] mkb_kafka::KafkaError),
    #[error(transparent)]
    Http(#[from] mkb_observability::ObservabilityError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("shutdown did not finish within {0:?}; records still in the pipeline were lost")]
    DrainTimeout(std::time::Duration),
    #[error("the {0} task failed: {1}")]
    Task(&'static str, String),
}

/// A started bridge: its tasks run until [`Bridge::run_until`] is told to stop.
pub struct Bridge {
    config: Config,
    health_addr: SocketAddr,
    readiness: ReadinessHandle,
    stop_mqtt: Option<oneshot::Sender<()>>,
    stop_http: Option<oneshot::Sender<()>>,
    mqtt: JoinHandle<()>,
    batcher: JoinHandle<()>,
    kafka: JoinHandle<()>,
    http: JoinHandle<()>,
    /// The downlink task and its stop signal, when it runs.
    downlink: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// Starts a bridge and runs it until `shutdown` completes, then drains it.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    Bridge::start(config).await?.run_until(shutdown).await
}

impl Bridge {
    /// Serves HTTP, prepares Kafka (topics, start-up probe), then starts reading MQTT.
    pub async fn start(config: Config) -> Result<Self, Error> {
        let registry = Registry::new();
        let mqtt_metrics = MqttMetrics::new(&registry)?;
        let kafka_metrics = KafkaMetrics::new(&registry)?;
        let downlink_metrics = match &config.downlink {
            Some(_) => Some(DownlinkMetrics::new(&registry)?),
            None => None,
        };

        for (a, b) in config.router.colliding_rules() {
            warn!(
                first = a,
                second = b,
                "Two rules of the topic map can make Kafka topics that differ only in '.' and \
                 '_', which Kafka cannot tell apart in its metrics."
            );
        }
        let (http_server, readiness) = HealthServer::bind(config.health_addr, registry).await?;
        let health_addr = http_server.local_addr();
        let (stop_http, http_stopped) = oneshot::channel::<()>();
        let http = tokio::spawn(http_server.run(async {
            let _ = http_stopped.await;
        }));

        let (ack_handle, ack_watermark) = ack_channel();
        let sink = match KafkaSink::connect(config.kafka.clone(), kafka_metrics, ack_handle).await {
            Ok(sink) => sink,
            Err(e) => {
                let _ = stop_http.send(());
                return Err(e.into());
            }
        };

        let (message_tx, message_rx) = mpsc::channel(MESSAGE_QUEUE);
        let (batch_tx, batch_rx) = mpsc::channel(BATCH_QUEUE);
        let kafka_idle = KafkaIdle::default();
        let batcher = Batcher::new(
            config.batcher.clone(),
            config.router.clone(),
            kafka_idle.clone(),
        );
        let batcher = tokio::spawn(batcher.run(message_rx, batch_tx));
        let (stop_mqtt, mqtt_stopped) = oneshot::channel::<()>();
        let source = MqttSource::new(config.mqtt.clone(), mqtt_metrics);
        let downlink = config
            .downlink
            .clone()
            .zip(downlink_metrics)
            .map(|(downlink, metrics)| Downlink::new(downlink, metrics));
        tokio::spawn(track_readiness(
            source.status(),
            sink.status(),
            downlink.as_ref().map(Downlink::status),
            readiness.clone(),
        ));
        let kafka = tokio::spawn(sink.run(batch_rx, kafka_idle));
        let mqtt = tokio::spawn(source.run(message_tx, ack_watermark, async {
            let _ = mqtt_stopped.await;
        }));
        let downlink = downlink.map(|downlink| {
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(downlink.run(async {
                let _ = stopped.await;
            }));
            (stop, task)
        });
        info!(
            mqtt = %format_args!("{}:{}", config.mqtt.host, config.mqtt.port),
            filters = ?config.mqtt.filters,
            kafka = %config.kafka.brokers,
            topic = config.kafka.topic.as_deref().unwrap_or("(mapped only)"),
            "Bridge started."
        );
        Ok(Self {
            config,
            health_addr,
            readiness,
            stop_mqtt: Some(stop_mqtt),
            stop_http: Some(stop_http),
            mqtt,
            batcher,
            kafka,
            http,
            downlink,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr
    }

    /// Runs until `shutdown` completes (or a task fails), then drains the pipeline.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        // The pipeline's tasks only end on their own when something broke.
        let early_end = tokio::select! {
            () = shutdown => None,
            joined = &mut self.kafka => Some(("Kafka", joined)),
            joined = &mut self.batcher => Some(("batcher", joined)),
            joined = &mut self.mqtt => Some(("MQTT", joined)),
        };
        if let Some((task, joined)) = early_end {
            let reason = joined
                .err()
                .map_or("ended early".to_owned(), |e| e.to_string());
            error!(task, reason = %reason, "A bridge task stopped unexpectedly.");
            self.abort();
            return Err(Error::Task(task, reason));
        }

        info!("Shutting down: draining the pipeline.");
        self.readiness
            .set(Readiness::NotReady("shutting down".to_owned()));
        stop(&mut self.stop_mqtt);
        let downlink = self.downlink.take().map(|(stop, task)| {
            let _ = stop.send(());
            task
        });
        let timeout = self.config.shutdown_timeout;
        let drained = tokio::time::timeout(timeout, async {
            for (name, task) in [
                ("MQTT", &mut self.mqtt),
                ("batcher", &mut self.batcher),
                ("Kafka", &mut self.kafka),
            ] {
                task.await.map_err(|e| Error::Task(name, e.to_string()))?;
            }
            if let Some(task) = downlink {
                task.await
                    .map_err(|e| Error::Task("downlink", e.to_string()))?;
            }
            Ok(())
        })
        .await;
        stop(&mut self.stop_http);
        let _ = (&mut self.http).await;
        match drained {
            Ok(result) => {
                info!("Bridge stopped.");
                result
            }
            Err(_elapsed) => {
                error!(timeout = ?timeout, "Drain did not finish in time; undelivered records are lost.");
                self.abort();
                Err(Error::DrainTimeout(timeout))
            }
        }
    }

    fn abort(&self) {
        if let Some((_, task)) = &self.downlink {
            task.abort();
        }
        self.mqtt.abort();
        self.batcher.abort();
        self.kafka.abort();
        self.http.abort();
    }
}

/// `/readyz`: ready while every MQTT filter is subscribed and Kafka either accepts writes or
/// the bridge can still hold what it cannot deliver.
fn readiness(
    mqtt: &MqttStatus,
    kafka: &KafkaStatus,
    downlink: Option<&DownlinkStatus>,
) -> Readiness {
    if !mqtt.subscribed {
        let why = mqtt.last_error.as_deref().unwrap_or("connecting");
        return Readiness::NotReady(format!("MQTT not subscribed: {why}"));
    }
    if let Some(downlink) = downlink {
        if !downlink.connected {
            let why = downlink.last_error.as_deref().unwrap_or("connecting");
            return Readiness::NotReady(format!("downlink MQTT connection not up: {why}"));
        }
        if !downlink.assigned {
            return Readiness::NotReady(
                "downlink waiting for its Kafka partitions (DOWNLINK_GROUP_ID)".to_owned(),
            );
        }
    }
    if let (true, Some(why)) = (kafka.failing, &kafka.spool_error) {
        return Readiness::NotReady(format!(
            "Kafka failing and the disk spool cannot be written ({why}); the MQTT broker keeps \
             what is not acknowledged"
        ));
    }
    if kafka.failing && kafka.full {
        let why = kafka.last_error.as_deref().unwrap_or("unknown error");
        return Readiness::NotReady(format!("Kafka failing and nothing more can be held: {why}"));
    }
    Readiness::Ready
}

/// Keeps `/readyz` in step with both sides (and the downlink, when it runs) until one of them
/// stops reporting.
async fn track_readiness(
    mut mqtt: watch::Receiver<MqttStatus>,
    mut kafka: watch::Receiver<KafkaStatus>,
    mut downlink: Option<watch::Receiver<DownlinkStatus>>,
    handle: ReadinessHandle,
) {
    loop {
        let downlink_status = downlink.as_mut().map(|d| d.borrow_and_update().clone());
        handle.set(readiness(
            &mqtt.borrow_and_update(),
            &kafka.borrow_and_update(),
            downlink_status.as_ref(),
        ));
        let watching_downlink = downlink.is_some();
        tokio::select! {
            changed = mqtt.changed() => if changed.is_err() { return },
            changed = kafka.changed() => if changed.is_err() { return },
            changed = async {
                match &mut downlink {
                    Some(d) => d.changed().await,
                    None => std::future::pending().await,
                }
            }, if watching_downlink => if changed.is_err() { return },
        }
    }
}

fn stop(signal: &mut Option<oneshot::Sender<()>>) {
    if let Some(signal) = signal.take() {
        let _ = signal.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_the_downlink_s_connection_and_partitions() {
        let mqtt = MqttStatus {
            connected: true,
            subscribed: true,
            last_error: None,
        };
        let kafka = KafkaStatus::default();
        assert_eq!(readiness(&mqtt, &kafka, None), Readiness::Ready);
        let mut downlink = DownlinkStatus {
            connected: false,
            assigned: true,
            last_error: Some("connection refused".to_owned()),
        };
        let not_ready = |downlink: &DownlinkStatus| match readiness(&mqtt, &kafka, Some(downlink)) {
            Readiness::NotReady(why) => why,
            Readiness::Ready => panic!("ready with {downlink:?}"),
        };
        assert!(
            not_ready(&downlink).contains("downlink MQTT connection not up: connection refused")
        );
        downlink.connected = true;
        downlink.assigned = false;
        assert!(not_ready(&downlink).contains("waiting for its Kafka partitions"));
        downlink.assigned = true;
        assert_eq!(readiness(&mqtt, &kafka, Some(&downlink)), Readiness::Ready);
    }
}
