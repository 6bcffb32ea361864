//! The batcher task: turns the stream of MQTT messages into Kafka batches.
//!
//! Batching adapts to the Kafka side, the way Nagle's algorithm and Kafka producers' "linger
//! only under load" do. While the Kafka task has nothing in flight ([`KafkaIdle`]), whatever
//! has arrived is sent at once, so a message at a low rate waits for no one. While a write is
//! in flight, records gather in the open batch, and it goes out as soon as that write is done.
//! `max_records` (`KAFKA_BATCH_SIZE`) and `interval` (`KAFKA_INTERVAL`, counted from the
//! batch's first record) stay upper bounds: a full batch goes at once, and no record waits
//! longer than the interval, whatever the Kafka side does. Under load batches grow towards the
//! size of what arrives during one Kafka round trip, so the per-batch costs shrink per message
//! as the rate rises; once batches fill up, the next one waits up to [`LOAD_LINGER`] to fill
//! too ("linger only under load").
//!
//! Order is kept: records leave in the order messages came in. When its input closes
//! (shutdown), the open batch is sent and the task ends, which closes the Kafka task's input in
//! turn: that is how the pipeline drains.
//!
//! Both channels are bounded. While the Kafka task does not take a batch, the batcher waits and
//! stops reading messages, so backpressure reaches the MQTT task instead of piling up here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, error};

use crate::{Batch, Message, Router};

/// After a full batch (the bridge is under load), how long the next batch waits to fill before
/// an idle Kafka side takes it partial. Flat out, batches then stay full, where sending each
/// time Kafka turned idle made a half more of them (and cost a tenth of the throughput on the
/// 2-core benchmark machine); below `KAFKA_BATCH_SIZE` records per Kafka round trip nothing is
/// held.
const LOAD_LINGER: Duration = Duration::from_millis(5);

/// Batching rule, from `KAFKA_BATCH_SIZE` and `KAFKA_INTERVAL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Records in a full batch; at least 1.
    pub max_records: usize,
    /// Longest time a record waits in an open batch.
    pub interval: Duration,
}

/// Whether the Kafka task is waiting for work: no write in flight and no batch queued for it.
/// The Kafka task sets it; the batcher sends an open batch at once while it is set, and clears
/// it when it sends one. Starts unset: a batcher without a Kafka task batches by size and
/// interval alone.
#[derive(Clone, Debug, Default)]
pub struct KafkaIdle(Arc<IdleFlag>);

#[derive(Debug, Default)]
struct IdleFlag {
    idle: AtomicBool,
    became_idle: Notify,
}

impl KafkaIdle {
    /// Sets or clears the flag, waking the batcher when it turns set.
    pub fn set(&self, idle: bool) {
        let was = self.0.idle.swap(idle, Ordering::AcqRel);
        if idle && !was {
            self.0.became_idle.notify_one();
        }
    }

    pub fn is_idle(&self) -> bool {
        self.0.idle.load(Ordering::Acquire)
    }

    /// Returns once the flag is set. Cancel-safe.
    async fn wait(&self) {
        // A wake-up left over from an earlier change costs one more check.
        while !self.is_idle() {
            self.0.became_idle.notified().await;
        }
    }
}

/// The batcher task; see the module documentation.
pub struct Batcher {
    config: BatcherConfig,
    /// Makes each message's record (topic, key, headers, value).
    router: Arc<Router>,
    kafka_idle: KafkaIdle,
}

impl Batcher {
    pub fn new(config: BatcherConfig, router: Arc<Router>, kafka_idle: KafkaIdle) -> Self {
        assert!(config.max_records > 0, "a batch holds at least one record");
        Self {
            config,
            router,
            kafka_idle,
        }
    }

    /// Runs until `input` closes, then sends the open batch and returns.
    pub async fn run(self, mut input: mpsc::Receiver<Message>, output: mpsc::Sender<Batch>) {
        let max = self.config.max_records;
        let idle = &self.kafka_idle;
        let mut batch = Batch::with_capacity(max);
        let mut incoming = Vec::with_capacity(max.min(1024));
        // The open batch's deadline, from its first record.
        let mut deadline = Instant::now();
        // Under load (the last batch was full), until when the open batch waits to fill even
        // though Kafka is idle.
        let mut hold: Option<Instant> = None;
        let mut last_full = false;
        // The hold while it runs, otherwise the deadline.
        let timer = sleep_until(deadline);
        tokio::pin!(timer);

        loop {
            let closed = tokio::select! {
                biased;
                received = input.recv_many(&mut incoming, max - batch.len()) => received == 0,
                () = idle.wait(), if !batch.is_empty() && hold.is_none() => false,
                () = &mut timer, if !batch.is_empty() => false,
            };
            let now = Instant::now();
            if !incoming.is_empty() {
                if batch.is_empty() {
                    deadline = now + self.config.interval;
                    hold = last_full.then(|| (now + LOAD_LINGER).min(deadline));
                    timer.as_mut().reset(hold.unwrap_or(deadline));
                }
                let router = &self.router;
                batch
                    .records
                    .extend(incoming.drain(..).map(|message| router.record(message)));
            }
            if hold.is_some_and(|until| now >= until) {
                hold = None;
                timer.as_mut().reset(deadline);
            }
            let due = batch.len() >= max
                || (!batch.is_empty() && ((hold.is_none() && idle.is_idle()) || now >= deadline));
            if (due || closed) && !batch.is_empty() {
                let ready = std::mem::replace(&mut batch, Batch::with_capacity(max));
                debug!(records = ready.len(), "Batch ready.");
                last_full = ready.len() >= max;
                hold = None;
                idle.set(false);
                if output.send(ready).await.is_err() {
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

    /// A batcher whose Kafka side never reports idle: it batches by size and interval alone.
    fn start(
        max_records: usize,
        interval: Duration,
    ) -> (mpsc::Sender<Message>, mpsc::Receiver<Batch>) {
        let (tx, rx, _) = start_with_idle(max_records, interval);
        (tx, rx)
    }

    fn start_with_idle(
        max_records: usize,
        interval: Duration,
    ) -> (mpsc::Sender<Message>, mpsc::Receiver<Batch>, KafkaIdle) {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(4);
        let idle = KafkaIdle::default();
        let config = BatcherConfig {
            max_records,
            interval,
        };
        let batcher = Batcher::new(config, Arc::default(), idle.clone());
        tokio::spawn(batcher.run(in_rx, out_tx));
        (in_tx, out_rx, idle)
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
    async fn a_record_goes_at_once_while_kafka_is_idle() {
        let (tx, mut rx, idle) = start_with_idle(1000, Duration::from_secs(5));
        idle.set(true);
        let started = Instant::now();
        tx.send(message(1)).await.expect("batcher runs");
        let batch = rx.recv().await.expect("a batch at once");
        assert_eq!(keys(&batch), ["t/1"]);
        assert_eq!(started.elapsed(), Duration::ZERO, "no time passes");
        assert!(!idle.is_idle(), "sending a batch clears the flag");
    }

    #[tokio::test(start_paused = true)]
    async fn records_gather_while_a_write_is_in_flight_and_go_when_it_is_done() {
        let (tx, mut rx, idle) = start_with_idle(1000, Duration::from_secs(5));
        idle.set(true);
        tx.send(message(1)).await.expect("batcher runs");
        assert_eq!(rx.recv().await.expect("the first batch").len(), 1);
        // The first batch is in flight: the next records wait for it.
        for n in 2..5 {
            tx.send(message(n)).await.expect("batcher runs");
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            rx.try_recv().is_err(),
            "nothing is sent while Kafka is busy"
        );
        let done = Instant::now();
        idle.set(true);
        let batch = rx.recv().await.expect("the gathered records");
        assert_eq!(keys(&batch), ["t/2", "t/3", "t/4"]);
        assert_eq!(
            done.elapsed(),
            Duration::ZERO,
            "sent as soon as Kafka is idle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_while_kafka_is_busy_and_the_interval_bounds_the_rest() {
        let (tx, mut rx, idle) = start_with_idle(2, Duration::from_millis(250));
        assert!(!idle.is_idle());
        let started = Instant::now();
        for n in 0..3 {
            tx.send(message(n)).await.expect("batcher runs");
        }
        let full = rx.recv().await.expect("a full batch");
        assert_eq!(keys(&full), ["t/0", "t/1"]);
        assert_eq!(started.elapsed(), Duration::ZERO);
        let rest = rx.recv().await.expect("the rest after the interval");
        assert_eq!(keys(&rest), ["t/2"]);
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_full_batch_the_next_waits_a_moment_to_fill() {
        let (tx, mut rx, idle) = start_with_idle(2, Duration::from_secs(5));
        for n in 0..2 {
            tx.send(message(n)).await.expect("batcher runs");
        }
        assert_eq!(rx.recv().await.expect("a full batch").len(), 2);
        idle.set(true);
        let started = Instant::now();
        tx.send(message(2)).await.expect("batcher runs");
        let held = rx.recv().await.expect("the partial batch, after the hold");
        assert_eq!(keys(&held), ["t/2"]);
        assert_eq!(started.elapsed(), LOAD_LINGER);
        // That batch was partial: the load is gone, and the next record goes at once.
        idle.set(true);
        let started = Instant::now();
        tx.send(message(3)).await.expect("batcher runs");
        assert_eq!(keys(&rx.recv().await.expect("at once")), ["t/3"]);
        assert_eq!(started.elapsed(), Duration::ZERO);
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
