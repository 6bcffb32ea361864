//! Delivery reports, gathered per unit (a batch or a spool chunk) rather than per record.
//!
//! Every record handed to librdkafka carries a [`Ticket`]: a share of its unit's [`Reports`]
//! and its index in the unit. librdkafka's delivery callback, on the producer's polling thread,
//! settles the ticket: a success only counts down, a failure is kept with its index. The Kafka
//! task is woken once per unit, when the last report is in, not once per record.
//!
//! A ticket dropped without a report (librdkafka never drops one, but a bug could) settles as
//! a failure, so a unit can never wait forever and a record can never pass as delivered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use tokio::sync::Notify;

use crate::context::BridgeContext;

/// Why a record was not delivered.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub(crate) code: Option<RDKafkaErrorCode>,
    pub(crate) text: String,
}

impl Failure {
    pub(crate) fn of(error: &RdKafkaError) -> Self {
        Self {
            code: error.rdkafka_error_code(),
            text: error.to_string(),
        }
    }

    pub(crate) fn other(text: &str) -> Self {
        Self {
            code: None,
            text: text.to_owned(),
        }
    }

    /// Why the record can never be written, however often it is tried (too large, or its
    /// topic refused or invalid); `None` when trying again may succeed.
    pub(crate) fn final_reason(&self) -> Option<GiveUp> {
        match self.code? {
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize => {
                Some(GiveUp::TooLarge)
            }
            RDKafkaErrorCode::TopicAuthorizationFailed => Some(GiveUp::TopicRefused),
            RDKafkaErrorCode::InvalidTopic => Some(GiveUp::TopicInvalid),
            _ => None,
        }
    }

    /// Errors after which this producer instance will not write again, though librdkafka does
    /// not always flag them fatal: its idempotence state no longer matches the broker's.
    pub(crate) fn breaks_the_producer(&self) -> bool {
        matches!(
            self.code,
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::InvalidProducerIdMapping
                    | RDKafkaErrorCode::Fatal
            )
        )
    }
}

/// Why the bridge gave up on a record for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// Larger than Kafka accepts (`message.max.bytes`, or the broker's limit).
    TooLarge,
    /// Kafka refused its topic (`TopicAuthorizationFailed`: an ACL).
    TopicRefused,
    /// Its topic is not a valid Kafka topic name.
    TopicInvalid,
}

impl GiveUp {
    /// The label of the drop and dead-letter counters, and the `mqtt.dlq.reason` header.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::TopicRefused => "topic_refused",
            Self::TopicInvalid => "topic_invalid",
        }
    }
}

/// The delivery reports of one unit.
#[derive(Debug, Default)]
pub(crate) struct Reports {
    /// Tickets issued and not yet settled.
    outstanding: AtomicUsize,
    /// Failed records: index in the unit, and why.
    failures: Mutex<Vec<(usize, Failure)>>,
    all_in: Notify,
}

impl Reports {
    pub(crate) fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A ticket for the record at `index`, to travel with it through librdkafka.
    pub(crate) fn ticket(self: &Arc<Self>, index: usize) -> Box<Ticket> {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        Box::new(Ticket {
            reports: Arc::clone(self),
            index,
            settled: false,
        })
    }

    /// Whether every ticket issued so far is settled.
    pub(crate) fn all_in(&self) -> bool {
        self.outstanding.load(Ordering::Acquire) == 0
    }

    /// Waits until every ticket issued so far is settled. Cancel-safe.
    pub(crate) async fn wait(&self) {
        while !self.all_in() {
            // A wake-up from before this call (the count touching zero while tickets were
            // still being issued) only costs one more check.
            self.all_in.notified().await;
        }
    }

    /// The failures so far, by index (each one returned once).
    pub(crate) fn take_failures(&self) -> Vec<(usize, Failure)> {
        let mut failures =
            std::mem::take(&mut *self.failures.lock().unwrap_or_else(PoisonError::into_inner));
        failures.sort_unstable_by_key(|(index, _)| *index);
        failures
    }

    fn settle(&self, index: usize, result: Result<(), Failure>) {
        if let Err(failure) = result {
            self.failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((index, failure));
        }
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_in.notify_one();
        }
    }
}

/// One record's share of its unit's [`Reports`].
#[derive(Debug)]
pub struct Ticket {
    reports: Arc<Reports>,
    index: usize,
    settled: bool,
}

impl Ticket {
    pub(crate) fn settle(mut self, result: Result<(), Failure>) {
        self.settled = true;
        self.reports.settle(self.index, result);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            self.reports
                .settle(self.index, Err(Failure::other("delivery report lost")));
        }
    }
}

impl ProducerContext for BridgeContext {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        ticket.settle(match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(Failure::of(error)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_unit_is_in_once_every_ticket_is_settled() {
        let reports = Reports::new();
        let first = reports.ticket(0);
        let second = reports.ticket(1);
        first.settle(Ok(()));
        assert!(!reports.all_in());
        let waiter = tokio::spawn({
            let reports = Arc::clone(&reports);
            async move { reports.wait().await }
        });
        second.settle(Err(Failure::other("broker down")));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken when the last report is in")
            .expect("waiter task");
        let failures = reports.take_failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, 1);
        assert_eq!(failures[0].1.text, "broker down");
    }

    #[test]
    fn a_dropped_ticket_counts_as_a_failure() {
        let reports = Reports::new();
        drop(reports.ticket(0));
        assert!(reports.all_in());
        let failures = reports.take_failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].1.text, "delivery report lost");
    }

    #[test]
    fn failures_come_back_in_record_order() {
        let reports = Reports::new();
        let tickets: Vec<_> = (0..3).map(|i| reports.ticket(i)).collect();
        for ticket in tickets.into_iter().rev() {
            ticket.settle(Err(Failure::other("timed out")));
        }
        let order: Vec<usize> = reports.take_failures().iter().map(|f| f.0).collect();
        assert_eq!(order, [0, 1, 2]);
    }
}
