//! Start-up of the Kafka side: the producer, the spool, the bridge's topics (created through the
//! Admin API when missing, since some brokers do not create topics on produce) and
//! Metamorphosis' start-up probe.

use std::collections::HashSet;

use mkb_bridge::{AckHandle, Key, Record, envelope};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use tracing::{debug, info, warn};

use crate::context::BridgeContext;
use crate::delivery::Reports;
use crate::producer::{self, Produce};
use crate::spool::Spool;
use crate::{KafkaConfig, KafkaError, KafkaMetrics, KafkaSink};

/// The probe Metamorphosis writes at start-up; kept identical for existing dashboards.
const PROBE_TOPIC_FIELD: &str = "test";
const PROBE_CONTENT: &[u8] = b"Internal test to see if kafka is alive at startup";

impl KafkaSink {
    /// Opens the spool, builds the producer, creates missing topics and, when configured, runs
    /// the start-up probe.
    ///
    /// Without a probe topic an unreachable Kafka is not an error here: the bridge starts, and
    /// the records wait in the spool until Kafka answers.
    pub async fn connect(
        config: KafkaConfig,
        metrics: KafkaMetrics,
        acks: AckHandle,
    ) -> Result<Self, KafkaError> {
        let spool = Spool::open(config.spool.clone(), metrics.spool.clone()).await?;
        let connector = producer::rdkafka_connector(&config);
        let producer = connector()?;
        let mut topics = if config.auto_create_topics {
            let admin = config
                .client_config()
                .create_with_context(BridgeContext)
                .map_err(KafkaError::Client)?;
            Some(Topics::new(admin))
        } else {
            None
        };
        // Created now when possible; with a probe they must be, without one the task tries
        // again before its first write.
        if let Some(topics) = &mut topics {
            match topics.ensure(std::iter::empty(), &config).await {
                Ok(()) => {}
                Err(e) if config.test_topic.is_some() => return Err(e),
                Err(e) => warn!(
                    error = %e,
                    "Kafka topics not ready yet; trying again before the first write."
                ),
            }
        }
        if let Some(test_topic) = &config.test_topic {
            probe(producer.as_ref(), &metrics, test_topic, &config).await?;
        }
        Ok(KafkaSink::new(
            config, metrics, acks, spool, producer, connector, topics,
        ))
    }
}

/// Creates missing topics through the Admin API: the bridge's own (the main one, the probe's and
/// the dead-letter topic) and every topic the topic map renders, on first use. It remembers the
/// topics it made sure of, until [`Topics::forget`]: a topic deleted while Kafka was failing
/// (an operator, a broker replaced by an empty one) is then created again.
pub(crate) struct Topics {
    admin: AdminClient<BridgeContext>,
    known: HashSet<String>,
}

impl Topics {
    fn new(admin: AdminClient<BridgeContext>) -> Self {
        Self {
            admin,
            known: HashSet::new(),
        }
    }

    /// Forgets which topics exist; the next [`Topics::ensure`] asks Kafka again.
    pub(crate) fn forget(&mut self) {
        self.known.clear();
    }

    /// Creates those of the bridge's topics and of `named` that are not known to exist.
    pub(crate) async fn ensure<'a>(
        &mut self,
        named: impl Iterator<Item = &'a str>,
        config: &'a KafkaConfig,
    ) -> Result<(), KafkaError> {
        let mut names: Vec<&str> = [config.topic.as_deref(), config.test_topic.as_deref()]
            .into_iter()
            .chain([config.dead_letter_topic.as_deref()])
            .flatten()
            .chain(named)
            .filter(|name| !self.known.contains(*name))
            .collect();
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            return Ok(());
        }
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    config.topic_partitions,
                    TopicReplication::Fixed(config.topic_replication),
                )
            })
            .collect();
        let options = AdminOptions::new()
            .request_timeout(Some(config.startup_timeout))
            .operation_timeout(Some(config.startup_timeout));
        let results = self
            .admin
            .create_topics(&topics, &options)
            .await
            .map_err(|e| KafkaError::CreateTopic {
                topic: names.join(","),
                brokers: config.brokers.clone(),
                reason: match e {
                    RdKafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut) => {
                        format!("no answer within {:?}", config.startup_timeout)
                    }
                    _ => e.to_string(),
                },
            })?;
        for result in results {
            match result {
                Ok(topic) => {
                    info!(topic = %topic, "Created Kafka topic.");
                    self.known.insert(topic);
                }
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    debug!(topic = %topic, "Kafka topic exists.");
                    self.known.insert(topic);
                }
                // Refused for this topic alone: its records find out when they are written (and
                // go to the dead-letter topic); it must not hold up the others.
                Err((
                    topic,
                    code @ (RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::InvalidTopic
                    | RDKafkaErrorCode::PolicyViolation),
                )) => {
                    warn!(topic = %topic, error = %code, "Kafka refused to create a topic.");
                    self.known.insert(topic);
                }
                Err((topic, code)) => {
                    return Err(KafkaError::CreateTopic {
                        topic,
                        brokers: config.brokers.clone(),
                        reason: code.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Writes Metamorphosis' start-up probe to `topic` and waits for Kafka's acknowledgement.
async fn probe(
    producer: &dyn Produce,
    metrics: &KafkaMetrics,
    topic: &str,
    config: &KafkaConfig,
) -> Result<(), KafkaError> {
    let mut value = Vec::new();
    envelope::encode(PROBE_TOPIC_FIELD, PROBE_CONTENT, &mut value);
    // Keyless, as Metamorphosis writes it.
    let mut record = Record::new(0, String::new(), value, tokio::time::Instant::now());
    record.key = Key::Null;
    let failed = |reason: String| KafkaError::Probe {
        topic: topic.to_owned(),
        brokers: config.brokers.clone(),
        reason,
    };
    let reports = Reports::new();
    producer::enqueue(producer, metrics, topic, &record, reports.ticket(0))
        .await
        .map_err(|f| failed(f.text))?;
    if tokio::time::timeout(config.startup_timeout, reports.wait())
        .await
        .is_err()
    {
        return Err(failed(format!(
            "not acknowledged within {:?}",
            config.startup_timeout
        )));
    }
    match reports.take_failures().into_iter().next() {
        None => {
            info!(topic = %topic, "Kafka start-up probe acknowledged.");
            Ok(())
        }
        Some((_, failure)) => Err(failed(failure.text)),
    }
}
