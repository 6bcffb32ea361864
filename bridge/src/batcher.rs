//! The batcher task: turns the stream of MQTT messages into Kafka batches.
//!
//! A batch is sent when it holds `max_records` records or when `interval` has passed since its
//! first record, whichever comes first. Order is kept: records leave in the order messages came
//! in. When its input closes (shutdown), the open batch is sent and the task ends, which closes
//! the Kafka task's input in turn: that is how the pipeline drains.
//!
//! Both channels are bounded. While the Kafka task does not take a batch, the batcher waits and
//! stops reading messages, so backpressure reaches the MQTT task instead of piling up here.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, error};

use std::sync::Arc;

use crate::{Batch, Message, Router};

/// Batching rule, from `KAFKA_BATCH_SIZE` and `KAFKA_INTERVAL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Records in a full batch; at least 1.
    pub max_records: usize,
    /// Longest time a record waits in an open batch.
    pub interval: Duration,
    /// When set, a batch is also sent once no message arrived for this long. With acks deferred
    /// until Kafka has a message, the broker sends at most its in-flight window and then waits
    /// for acknowledgements: waiting out `interval` would only stall the stream.
    pub idle_flush: Option<Duration>,
}

/// The batcher task; see the module documentation.
pub struct Batcher {
    config: BatcherConfig,
    /// Makes each message's record (topic, key, headers, value).
    router: Arc<Router>,
}

impl Batcher {
    pub fn new(config: BatcherConfig, router: Arc<Router>) -> Self {
        assert!(config.max_records > 0, "a batch holds at least one record");
        Self { config, router }
    }

    /// Runs until `input` closes, then sends the open batch and returns.
    pub async fn run(self, mut input: mpsc::Receiver<Message>, output: mpsc::Sender<Batch>) {
        let max = self.config.max_records;
        let mut batch = Batch::with_capacity(max);
        let mut incoming = Vec::with_capacity(max.min(1024));
        // Armed when the open batch gets its first record.
        let mut deadline = Instant::now();
        let timer = sleep_until(deadline);
        tokio::pin!(timer);
        let idle = self.config.idle_flush;

        loop {
            let closed = tokio::select! {
                biased;
                received = input.recv_many(&mut incoming, max - batch.len()) => received == 0,
                () = &mut timer, if !batch.is_empty() => false,
            };
            if !incoming.is_empty() {
                if batch.is_empty() {
                    deadline = Instant::now() + self.config.interval;
                }
                if let Some(idle) = idle {
                    // Every arrival pushes the idle deadline back, never past the interval's.
                    timer.as_mut().reset(deadline.min(Instant::now() + idle));
                } else if batch.is_empty() {
                    timer.as_mut().reset(deadline);
                }
                let router = &self.router;
                batch
                    .records
                    .extend(incoming.drain(..).map(|message| router.record(message)));
            }
            let due =
                batch.len() >= max || (!batch.is_empty() && Instant::now() >= timer.deadline());
            if (due || closed) && !batch.is_empty() {
                let full = std::mem::replace(&mut batch, Batch::with_capacity(max));
                debug!(records = full.len(), "Batch ready.");
                if output.send(full).await.is_err() {
                    error!("Kafka task stopped before the batcher; records in flight are lost.");
                    return;
                }
            }
            if closed {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::QoS;

    fn message(n: usize) -> Message {
        Message::new(
            n as u64 + 1,
            format!("t/{n}"),
            Bytes::from(n.to_string()),
            QoS::AtLeastOnce,
            Instant::now(),
        )
    }

    fn start(
        max_records: usize,
        interval: Duration,
    ) -> (mpsc::Sender<Message>, mpsc::Receiver<Batch>) {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(4);
        let batcher = Batcher::new(
            BatcherConfig {
                max_records,
                interval,
                idle_flush: None,
            },
            Arc::default(),
        );
        tokio::spawn(batcher.run(in_rx, out_tx));
        (in_tx, out_rx)
    }

    fn keys(batch: &Batch) -> Vec<&str> {
        batch
            .records
            .iter()
            .map(|r| r.mqtt_topic.as_str())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn batch_is_sent_when_full_before_the_interval() {
        let (tx, mut rx) = start(3, Duration::from_secs(3600));
        for n in 0..7 {
            tx.send(message(n)).await.expect("batcher runs");
        }
        let first = rx.recv().await.expect("a full batch");
        let second = rx.recv().await.expect("a second full batch");
        assert_eq!(keys(&first), ["t/0", "t/1", "t/2"]);
        assert_eq!(keys(&second), ["t/3", "t/4", "t/5"]);
        // The seventh waits for the interval, which is an hour away.
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn partial_batch_is_sent_after_the_interval() {
        let (tx, mut rx) = start(1000, Duration::from_millis(250));
        let started = Instant::now();
        tx.send(message(1)).await.expect("batcher runs");
        tx.send(message(2)).await.expect("batcher runs");
        let batch = rx.recv().await.expect("a batch after the interval");
        assert_eq!(keys(&batch), ["t/1", "t/2"]);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_millis(300),
            "sent after {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn interval_counts_from_the_first_record_of_a_batch() {
        let (tx, mut rx) = start(1000, Duration::from_secs(1));
        let started = Instant::now();
        tx.send(message(1)).await.expect("batcher runs");
        tokio::time::sleep(Duration::from_millis(900)).await;
        tx.send(message(2)).await.expect("batcher runs");
        let batch = rx.recv().await.expect("a batch");
        assert_eq!(batch.len(), 2);
        assert!(started.elapsed() < Duration::from_millis(1050));
    }

    #[tokio::test(start_paused = true)]
    async fn open_batch_is_flushed_when_input_closes() {
        let (tx, mut rx) = start(1000, Duration::from_secs(3600));
        for n in 0..5 {
            tx.send(message(n)).await.expect("batcher runs");
        }
        drop(tx);
        let batch = rx.recv().await.expect("the open batch");
        assert_eq!(keys(&batch), ["t/0", "t/1", "t/2", "t/3", "t/4"]);
        assert!(rx.recv().await.is_none(), "output closes after the flush");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_flush_sends_as_soon_as_messages_stop_coming() {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, mut rx) = mpsc::channel(4);
        let batcher = Batcher::new(
            BatcherConfig {
                max_records: 1000,
                interval: Duration::from_secs(5),
                idle_flush: Some(Duration::from_millis(2)),
            },
            Arc::default(),
        );
        tokio::spawn(batcher.run(in_rx, out_tx));
        let started = Instant::now();
        for n in 0..3 {
            in_tx.send(message(n)).await.expect("batcher runs");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let batch = rx.recv().await.expect("a batch once idle");
        assert_eq!(batch.len(), 3, "arrivals 1 ms apart keep the batch open");
        assert_eq!(batch.last_seq(), 3);
        assert!(
            started.elapsed() < Duration::from_millis(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn records_carry_the_envelope() {
        let (tx, mut rx) = start(1, Duration::from_secs(1));
        tx.send(message(7)).await.expect("batcher runs");
        let batch = rx.recv().await.expect("a batch");
        assert_eq!(
            batch.records[0].value,
            br#"{"topic":"t/7","content":"Nw=="}"#
        );
    }
}
