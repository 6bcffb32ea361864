//! The seam between the Kafka task and its client: [`Produce`], implemented by librdkafka's
//! producer here and by a scripted fake in the unit tests, so that the task's behaviour (retry,
//! spool, drain, acknowledgements) is tested in milliseconds of paused time while the
//! integration tests prove that a real broker agrees.

use std::time::Duration;

use mkb_bridge::Record;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use crate::context::BridgeContext;
use crate::delivery::{Failure, Ticket};
use crate::{KafkaConfig, KafkaError, KafkaMetrics};

/// How long to wait before handing a record over again when the client's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// Why the client did not take a record.
pub(crate) enum Refused {
    /// Its local queue is full: the ticket comes back, to be sent again shortly.
    QueueFull(Box<Ticket>),
    /// It refused the record; the ticket is already settled with this reason.
    Failed(Failure),
}

/// A Kafka producer as the Kafka task uses it.
pub(crate) trait Produce: Send + Sync {
    /// Hands one record over to `topic` (the record's own, or the bridge's `KAFKA_TOPIC`). Its
    /// ticket is settled by the record's delivery report.
    fn send(&self, topic: &str, record: &Record, ticket: Box<Ticket>) -> Result<(), Refused>;

    /// The client's fatal error, once it hit one: it will not write again.
    fn fatal_error(&self) -> Option<String>;
}

/// Builds producers: the first one, and a fresh one after a failed write.
pub(crate) type Connector = Box<dyn Fn() -> Result<Box<dyn Produce>, KafkaError> + Send + Sync>;

/// The connector of librdkafka producers for `config`.
pub(crate) fn rdkafka_connector(config: &KafkaConfig) -> Connector {
    let client_config = config.client_config();
    Box::new(move || {
        let producer: ThreadedProducer<BridgeContext> = client_config
            .create_with_context(BridgeContext)
            .map_err(KafkaError::Client)?;
        Ok(Box::new(Rdkafka(producer)))
    })
}

struct Rdkafka(ThreadedProducer<BridgeContext>);

impl Produce for Rdkafka {
    fn send(&self, topic: &str, record: &Record, ticket: Box<Ticket>) -> Result<(), Refused> {
        let mut base = BaseRecord::with_opaque_to(topic, ticket).payload(&record.value);
        base.key = record.key_bytes();
        if !record.headers.is_empty() {
            let headers = record.headers.iter().fold(
                OwnedHeaders::new_with_capacity(record.headers.len()),
                |headers, (key, value)| {
                    headers.insert(Header {
                        key,
                        value: Some(value),
                    })
                },
            );
            base = base.headers(headers);
        }
        match self.0.send(base) {
            Ok(()) => Ok(()),
            Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                Err(Refused::QueueFull(returned.delivery_opaque))
            }
            Err((error, returned)) => {
                let failure = Failure::of(&error);
                returned.delivery_opaque.settle(Err(failure.clone()));
                Err(Refused::Failed(failure))
            }
        }
    }

    fn fatal_error(&self) -> Option<String> {
        self.0
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }
}

/// Hands one record over, waiting while the client's queue is full. When the client refuses
/// the record, its ticket is settled with the reason, which is also returned.
pub(crate) async fn enqueue(
    producer: &dyn Produce,
    metrics: &KafkaMetrics,
    topic: &str,
    record: &Record,
    mut ticket: Box<Ticket>,
) -> Result<(), Failure> {
    loop {
        match producer.send(topic, record, ticket) {
            Ok(()) => return Ok(()),
            Err(Refused::QueueFull(returned)) => {
                metrics.error("queue_full");
                ticket = returned;
                tokio::time::sleep(QUEUE_FULL_PAUSE).await;
            }
            Err(Refused::Failed(failure)) => return Err(failure),
        }
    }
}

/// A producer that follows a script, for the Kafka task's unit tests.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The topic the Kafka task's unit tests configure as `KAFKA_TOPIC`.
    pub(crate) const TOPIC: &str = "bridge";

    /// What happens to one record handed over.
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Outcome {
        Deliver,
        DeliverAfter(Duration),
        /// The local queue is full; the next outcome applies to the same record sent again.
        QueueFull,
        /// Refused at once: larger than Kafka accepts.
        TooLarge,
        /// The delivery report says the topic is not authorised (an ACL refuses it).
        TopicRefused,
        /// The delivery report says the topic name is invalid.
        TopicInvalid,
        /// No answer: the delivery report says it timed out after this long.
        TimeOut(Duration),
        /// The broker fenced this producer (its idempotence state is gone).
        Fenced,
    }

    /// One record handed over: its topic, the record, and whether it was delivered.
    struct Handed {
        topic: String,
        record: Record,
        delivered: bool,
    }

    #[derive(Default)]
    struct State {
        script: VecDeque<Outcome>,
        /// When the script is used up.
        otherwise: Option<Outcome>,
        /// Outcomes for every record to one topic, before the script is consulted.
        per_topic: Vec<(String, Outcome)>,
        /// Every record handed over, in order (a partition's order).
        log: Vec<Handed>,
        producers: usize,
    }

    /// The script all producers of one test share, and what they delivered.
    #[derive(Clone, Default)]
    pub(crate) struct Script(Arc<Mutex<State>>);

    impl Script {
        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.0.lock().expect("script lock")
        }

        /// The next `count` records get `outcome`.
        pub(crate) fn then(&self, count: usize, outcome: Outcome) -> &Self {
            self.state()
                .script
                .extend(std::iter::repeat_n(outcome, count));
            self
        }

        /// Every record after the script gets `outcome` (delivery, until set).
        pub(crate) fn otherwise(&self, outcome: Outcome) -> &Self {
            self.state().otherwise = Some(outcome);
            self
        }

        /// Every record to `topic` gets `outcome`, whatever the script says.
        pub(crate) fn for_topic(&self, topic: &str, outcome: Outcome) -> &Self {
            self.state().per_topic.push((topic.to_owned(), outcome));
            self
        }

        /// Values delivered to [`TOPIC`], in the order they were handed over (as a partition
        /// keeps them).
        pub(crate) fn delivered(&self) -> Vec<String> {
            self.delivered_to(TOPIC)
                .iter()
                .map(|record| String::from_utf8_lossy(&record.value).into_owned())
                .collect()
        }

        /// Records delivered to `topic`, in the order they were handed over.
        pub(crate) fn delivered_to(&self, topic: &str) -> Vec<Record> {
            self.state()
                .log
                .iter()
                .filter(|handed| handed.delivered && handed.topic == topic)
                .map(|handed| handed.record.clone())
                .collect()
        }

        /// Records handed over so far, whatever became of them.
        pub(crate) fn handed(&self) -> usize {
            self.state().log.len()
        }

        /// Producers built so far.
        pub(crate) fn producers(&self) -> usize {
            self.state().producers
        }

        pub(crate) fn connector(&self) -> Connector {
            let script = self.clone();
            Box::new(move || {
                script.state().producers += 1;
                Ok(Box::new(Fake(script.clone())))
            })
        }
    }

    struct Fake(Script);

    fn failure(code: RDKafkaErrorCode) -> Failure {
        Failure {
            code: Some(code),
            text: code.to_string(),
        }
    }

    impl Produce for Fake {
        fn send(&self, topic: &str, record: &Record, ticket: Box<Ticket>) -> Result<(), Refused> {
            let outcome = {
                let mut state = self.0.state();
                match state.per_topic.iter().find(|(t, _)| t == topic) {
                    Some((_, outcome)) => *outcome,
                    None => {
                        let otherwise = state.otherwise.unwrap_or(Outcome::Deliver);
                        state.script.pop_front().unwrap_or(otherwise)
                    }
                }
            };
            let (after, result) = match outcome {
                Outcome::Deliver => (Duration::ZERO, Ok(())),
                Outcome::DeliverAfter(after) => (after, Ok(())),
                Outcome::TimeOut(after) => (after, Err(failure(RDKafkaErrorCode::MessageTimedOut))),
                Outcome::Fenced => (
                    Duration::ZERO,
                    Err(failure(RDKafkaErrorCode::ProducerFenced)),
                ),
                Outcome::TopicRefused => (
                    Duration::ZERO,
                    Err(failure(RDKafkaErrorCode::TopicAuthorizationFailed)),
                ),
                Outcome::TopicInvalid => {
                    (Duration::ZERO, Err(failure(RDKafkaErrorCode::InvalidTopic)))
                }
                Outcome::QueueFull => return Err(Refused::QueueFull(ticket)),
                Outcome::TooLarge => {
                    let failure = failure(RDKafkaErrorCode::MessageSizeTooLarge);
                    ticket.settle(Err(failure.clone()));
                    return Err(Refused::Failed(failure));
                }
            };
            let index = {
                let mut state = self.0.state();
                state.log.push(Handed {
                    topic: topic.to_owned(),
                    record: record.clone(),
                    delivered: false,
                });
                state.log.len() - 1
            };
            let script = self.0.clone();
            // Delivery reports arrive on another thread in librdkafka; here on another task.
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if result.is_ok() {
                    script.state().log[index].delivered = true;
                }
                ticket.settle(result);
            });
            Ok(())
        }

        fn fatal_error(&self) -> Option<String> {
            None
        }
    }
}
