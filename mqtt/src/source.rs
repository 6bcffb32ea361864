//! The MQTT client task. It alone polls the connection, so keep-alive, acks and reconnects are
//! serviced from one place, and it never awaits a client request from that loop (requests are
//! queued with `try_` calls): awaiting one while the request channel is full would deadlock.
//!
//! **The connection is always polled.** When the pipeline is full, received messages wait in a
//! small intake queue instead of stopping the loop, so keep-alive never starves (rumqttc fails
//! the connection when a PINGRESP stays unread behind a backlog). With `after-write`
//! acknowledgements the broker should send no more than its in-flight window before it sees
//! acks, which bounds that queue for QoS 1/2; QoS 0 has no flow control, so QoS 0 messages
//! (and, in `on-receipt` mode, all messages) beyond [`INTAKE_LIMIT_BYTES`] (payload, topic and
//! bookkeeping) are dropped and counted. Not every broker keeps to its window: Mosquitto 2.0.11
//! was seen sending 590,000 unacknowledged messages past a window of 1,000, and those are
//! queued, since they may be neither dropped nor left unread.
//!
//! **Acknowledgements** (`after-write`): each message is numbered; QoS 1/2 messages are
//! remembered in receipt order and acknowledged once the Kafka side reports them done (see
//! `mkb_bridge::acks`). After a reconnect the broker sends unacknowledged messages again, so the
//! remembered ones of the old connection are forgotten, not acknowledged.
//!
//! It reports its state on a watch channel ([`MqttStatus`]) for readiness, and reconnects
//! forever: the only way out of the loop is the shutdown signal.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use mkb_bridge::dead_letter::{self, DeadLetter};
use mkb_bridge::{AckWatermark, Message, QoS};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::MqttVersion;
use crate::connection::{Connection, Incoming, Link, PollError, Received, Unreadable};
#[cfg(test)]
use crate::skip::Skipped;
use crate::{AckMode, Backoff, MqttConfig, MqttMetrics};

/// The MQTT connection's state, as readiness needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MqttStatus {
    pub connected: bool,
    /// Every filter granted on the current connection.
    pub subscribed: bool,
    /// The latest connection or subscription problem, cleared once subscribed.
    pub last_error: Option<String>,
}

/// Bytes of messages the intake queue holds before it drops QoS 0 (or `on-receipt`) messages.
pub const INTAKE_LIMIT_BYTES: usize = 16 * 1024 * 1024;

/// What a queued message costs beyond its payload and topic: the message itself, its place in
/// the queues and the allocations' rounding.
const MESSAGE_OVERHEAD_BYTES: usize = 128;

/// A message's share of [`INTAKE_LIMIT_BYTES`].
fn footprint(message: &Message) -> usize {
    message.payload.len() + message.topic.len() + MESSAGE_OVERHEAD_BYTES
}

/// How long a shutdown waits for the broker to close the connection after DISCONNECT.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// A received QoS 1/2 message waiting for its acknowledgement.
struct Unacked {
    seq: u64,
    qos: QoS,
    pkid: u16,
    received_at: Instant,
}

/// The MQTT client task; see the module documentation.
pub struct MqttSource {
    config: MqttConfig,
    /// The broker as logs name it (its address, and the WebSocket path when there is one).
    broker: String,
    metrics: MqttMetrics,
    status: watch::Sender<MqttStatus>,
    /// Receipt number of the last message taken off the connection.
    last_seq: u64,
    /// Messages received but not yet handed on (the pipeline was full).
    intake: VecDeque<Message>,
    intake_bytes: usize,
    /// QoS 1/2 messages of this connection not yet acknowledged, in receipt order.
    unacked: VecDeque<Unacked>,
    /// The Kafka side's latest report: every message up to this receipt number is done.
    done_through: u64,
    /// Between a connection error and the next ConnAck, acknowledgements are held back: one
    /// queued then would go out on the new connection, where its packet id may name another
    /// message (rumqttc discards only the acks already queued when the error happened).
    connected: bool,
    /// A SUBSCRIBE went out on this connection and its SUBACK has not come yet.
    subscribing: bool,
}

/// What woke the task up.
enum Wake {
    Shutdown,
    Done(Option<u64>),
    /// The pipeline has room again: the intake goes on at the top of the next turn.
    Room,
    Connection(Result<Incoming, PollError>),
}

/// The batcher no longer takes messages.
#[derive(Debug)]
struct PipelineClosed;

impl MqttSource {
    pub fn new(config: MqttConfig, metrics: MqttMetrics) -> Self {
        let (status, _) = watch::channel(MqttStatus::default());
        Self {
            broker: config.broker_label(),
            config,
            metrics,
            status,
            last_seq: 0,
            intake: VecDeque::new(),
            intake_bytes: 0,
            unacked: VecDeque::new(),
            done_through: 0,
            connected: false,
            subscribing: false,
        }
    }

    /// Follows the connection's state.
    pub fn status(&self) -> watch::Receiver<MqttStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` completes, then drains and disconnects. `done` is the Kafka side's
    /// report of finished messages (used with `after-write` acknowledgements).
    pub async fn run(
        mut self,
        output: mpsc::Sender<Message>,
        done: AckWatermark,
        shutdown: impl Future<Output = ()>,
    ) {
        // Over WebSockets the clients (this one and the read-past side connection) reach the
        // broker through a loopback adapter, kept until the task ends.
        let _adapter = match crate::websocket::endpoint(&self.config) {
            Ok((local, adapter)) => {
                self.config = local;
                adapter
            }
            Err(e) => {
                error!(error = %e, "Cannot start the WebSocket adapter; MQTT task stopped.");
                return;
            }
        };
        let connection = Connection::new(&self.config);
        let stamping = tokio::spawn(self.metrics.clone().stamp_last_message());
        self.run_on(connection, output, done, shutdown).await;
        stamping.abort();
    }

    /// [`MqttSource::run`] over a given connection.
    async fn run_on(
        mut self,
        mut connection: impl Link,
        output: mpsc::Sender<Message>,
        mut done: AckWatermark,
        shutdown: impl Future<Output = ()>,
    ) {
        let broker = self.broker.clone();
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        let mut acks_open = self.config.ack_mode == AckMode::AfterWrite;
        tokio::pin!(shutdown);

        loop {
            // The watermark matters only while a message awaits its acknowledgement (never
            // under QoS 0). A rise is looked for on every turn, without waiting (a version
            // check); waiting for one registers a waiter with the channel, and removes it again
            // when another branch wins, so it comes last, once nothing else is ready. A busy
            // connection thus does not pay for it per message, and acknowledgements still go
            // out on the next turn after the Kafka side reports.
            if acks_open
                && !self.unacked.is_empty()
                && let Some(watermark) = done.rose()
            {
                self.on_watermark(watermark, &connection);
            }
            // Messages queued while the pipeline was full go on as it gains room, the same way:
            // tried on every turn with a permit check, waited for (which registers a waiter with
            // the channel's semaphore, and removes it when another branch wins) only once the
            // connection has nothing ready.
            if !self.intake.is_empty() && self.forward_intake(&output).is_err() {
                break;
            }
            let awaiting = acks_open && !self.unacked.is_empty();
            let wake = tokio::select! {
                biased;
                () = &mut shutdown => Wake::Shutdown,
                event = connection.poll() => Wake::Connection(event),
                permit = output.reserve(), if !self.intake.is_empty() => match permit {
                    Ok(_permit) => Wake::Room,
                    Err(_closed) => Wake::Shutdown,
                },
                watermark = done.changed(), if awaiting => Wake::Done(watermark),
            };
            match wake {
                Wake::Shutdown => break,
                Wake::Done(Some(watermark)) => self.on_watermark(watermark, &connection),
                Wake::Done(None) => acks_open = false,
                Wake::Room => {}
                Wake::Connection(Ok(incoming)) => {
                    match incoming {
                        Incoming::Publish(received) => self.receive(&output, received),
                        Incoming::ConnAck { session_present } => {
                            backoff.reset();
                            self.on_connected(&connection, &broker, session_present);
                        }
                        Incoming::SubAck(granted) => self.on_suback(&granted),
                        Incoming::Disconnected | Incoming::Other => {}
                    }
                    // The event loop took requests off the channel: acks that found it full go
                    // now. After a ConnAck there are none: the old connection's were forgotten.
                    self.acknowledge(&connection);
                }
                Wake::Connection(Err(mut e)) => {
                    self.explain_closed(&mut e);
                    self.connected = false;
                    self.subscribing = false;
                    let delay = backoff.next_delay();
                    self.on_connection_error(&broker, &e, delay);
                    if let Some(unreadable) = e.unreadable {
                        self.read_past(&mut connection, &output, unreadable).await;
                    }
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }

        info!("MQTT task stopping: draining.");
        match self.config.ack_mode {
            AckMode::OnReceipt => self.drain_on_receipt(&mut connection, &output).await,
            AckMode::AfterWrite => {
                self.drain_after_write(&mut connection, output, &mut done)
                    .await;
            }
        }
        self.set_disconnected(None);
        info!("MQTT task stopped.");
    }

    /// Numbers a message and passes it on, or queues it while the pipeline is full.
    fn receive(&mut self, output: &mpsc::Sender<Message>, received: Received) {
        let Received {
            topic,
            payload,
            qos,
            pkid,
            retain,
            dup,
            properties,
        } = received;
        self.metrics.received(qos).inc();
        self.last_seq += 1;
        let seq = self.last_seq;
        let received_at = Instant::now();
        let deferred = self.config.ack_mode == AckMode::AfterWrite && qos != QoS::AtMostOnce;
        if deferred {
            self.unacked.push_back(Unacked {
                seq,
                qos,
                pkid,
                received_at,
            });
            self.metrics.awaiting_ack.set(self.unacked.len() as i64);
        }
        let message = Message {
            seq,
            topic,
            payload,
            qos,
            received_at,
            retain,
            dup,
            properties,
            dead_letter: None,
        };
        self.pass_on(output, message, deferred);
    }

    /// Passes a message on, or queues it while the pipeline is full.
    fn pass_on(&mut self, output: &mpsc::Sender<Message>, message: Message, deferred: bool) {
        if self.intake.is_empty() {
            match output.try_send(message) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(message)) => self.queue(message, deferred),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    error!("Pipeline stopped before the MQTT task; message not passed on.");
                }
            }
        } else {
            self.queue(message, deferred);
        }
    }

    /// A PUBLISH the client cannot read (above `MQTT_MAX_PACKET_SIZE`, or its topic not UTF-8)
    /// broke the connection. Under MQTT 3.1.1 with a persistent session the broker would send
    /// it first on every reconnect, so it is read past on a side connection and acknowledged
    /// there; with a dead-letter topic, a dead letter (the topic, the size, and the payload
    /// when it was within the limit) goes through the pipeline. MQTT 5 brokers do not send
    /// packets above the Maximum Packet Size the bridge announces, and with a clean session the
    /// broker forgets the message.
    async fn read_past(
        &mut self,
        connection: &mut impl Link,
        output: &mpsc::Sender<Message>,
        unreadable: Unreadable,
    ) {
        let counter = match unreadable {
            Unreadable::TooLarge(_) => &self.metrics.oversized,
            Unreadable::TopicNotUtf8 => &self.metrics.invalid_topic,
        };
        counter.inc();
        if self.config.version != MqttVersion::V311 || self.config.clean_session {
            error!(
                problem = ?unreadable, limit = self.config.max_packet_size,
                "Unreadable MQTT message dropped (the broker does not send it again)."
            );
            return;
        }
        let skipped = match connection.read_past(&self.config).await {
            Ok(Some(skipped)) => skipped,
            Ok(None) => {
                warn!(
                    problem = ?unreadable,
                    "Unreadable MQTT message not sent again by the broker (QoS 0): dropped."
                );
                return;
            }
            Err(e) => {
                warn!(
                    problem = ?unreadable, error = %e,
                    "Could not read past an unreadable MQTT message; trying again after the \
                     next reconnect."
                );
                return;
            }
        };
        let (reason, error) = match &skipped.payload {
            None => (
                dead_letter::MQTT_TOO_LARGE,
                format!(
                    "MQTT packet of {} bytes, above MQTT_MAX_PACKET_SIZE ({} bytes)",
                    skipped.size, self.config.max_packet_size
                ),
            ),
            Some(_) => (
                dead_letter::MQTT_INVALID_TOPIC,
                "MQTT topic is not UTF-8".to_owned(),
            ),
        };
        error!(
            mqtt_topic = %skipped.topic, bytes = skipped.size, qos = skipped.qos.level(),
            error = %error,
            "Unreadable MQTT message read past and acknowledged; it is not in Kafka's topic."
        );
        let Some(topic) = self.config.dead_letter_topic.clone() else {
            return;
        };
        self.last_seq += 1;
        let message = Message {
            seq: self.last_seq,
            topic: skipped.topic,
            payload: skipped
                .payload
                .map_or_else(bytes::Bytes::new, bytes::Bytes::from),
            // Already acknowledged on the side connection.
            qos: QoS::AtMostOnce,
            received_at: Instant::now(),
            retain: false,
            dup: false,
            properties: None,
            dead_letter: Some(Box::new(DeadLetter {
                topic,
                reason,
                original_size: skipped.size,
                error,
            })),
        };
        self.pass_on(output, message, false);
    }

    /// Keeps a message in the intake queue, or drops it (counted) when the queue is full and
    /// nothing else limits what the broker sends.
    fn queue(&mut self, message: Message, flow_controlled: bool) {
        let bytes = footprint(&message);
        if !flow_controlled && self.intake_bytes + bytes > INTAKE_LIMIT_BYTES {
            self.metrics.dropped_intake_full.inc();
            return;
        }
        self.intake_bytes += bytes;
        self.intake.push_back(message);
        self.metrics.intake.set(self.intake.len() as i64);
    }

    /// Passes on queued messages while the pipeline has room. `Err` when the pipeline is gone
    /// (the batcher stopped): the task stops too.
    fn forward_intake(&mut self, output: &mpsc::Sender<Message>) -> Result<(), PipelineClosed> {
        let queued = self.intake.len();
        let mut result = Ok(());
        while let Some(message) = self.intake.pop_front() {
            let bytes = footprint(&message);
            if let Err(error) = output.try_send(message) {
                if matches!(error, mpsc::error::TrySendError::Closed(_)) {
                    result = Err(PipelineClosed);
                }
                self.intake.push_front(error.into_inner());
                break;
            }
            self.intake_bytes -= bytes;
        }
        // Tried on every turn while the pipeline is full: the gauge only when it moved.
        if self.intake.len() != queued {
            self.metrics.intake.set(self.intake.len() as i64);
        }
        result
    }

    /// The Kafka side reported everything through `watermark` done.
    fn on_watermark(&mut self, watermark: u64, connection: &impl Link) {
        self.done_through = watermark;
        self.acknowledge(connection);
    }

    /// Queues, in receipt order, the acknowledgement of every remembered message the Kafka side
    /// reported done. Stops while the client's request channel is full; the run loop calls it
    /// again after every connection event, which is when the channel gains room.
    fn acknowledge(&mut self, connection: &impl Link) {
        if !self.connected || !self.acks_due() {
            return;
        }
        while let Some(front) = self.unacked.front() {
            if front.seq > self.done_through || !connection.ack(front.qos, front.pkid) {
                break;
            }
            self.metrics
                .ack_latency
                .observe(front.received_at.elapsed().as_secs_f64());
            self.unacked.pop_front();
        }
        self.metrics.awaiting_ack.set(self.unacked.len() as i64);
    }

    /// Whether a message the Kafka side reported done still waits for its acknowledgement.
    fn acks_due(&self) -> bool {
        self.unacked
            .front()
            .is_some_and(|u| u.seq <= self.done_through)
    }

    fn on_connected(&mut self, connection: &impl Link, broker: &str, session_present: bool) {
        self.subscribing = false;
        // The broker sends every unacknowledged message again on the new connection; acking
        // the old packet ids would not name the right messages.
        self.unacked.clear();
        self.connected = true;
        self.metrics.awaiting_ack.set(0);
        self.metrics.connected.set(1);
        self.status.send_modify(|s| s.connected = true);
        info!(
            broker = %broker, client_id = %self.config.client_id, session_present,
            "Connected to MQTT broker."
        );
        // Subscribing again when the session survived is harmless and covers a changed
        // filter list between runs.
        match connection.subscribe(&self.config.filters, self.config.qos) {
            Ok(()) => self.subscribing = true,
            Err(e) => error!(error = %e, "Could not queue the MQTT subscription."),
        }
    }

    fn on_suback(&mut self, granted: &[Result<QoS, String>]) {
        self.subscribing = false;
        let mut refused = Vec::new();
        for (filter, result) in self.config.filters.iter().zip(granted) {
            match result {
                Ok(qos) => info!(filter = %filter, granted_qos = qos.level(), "Subscribed."),
                Err(reason) => {
                    error!(filter = %filter, reason = %reason, "MQTT subscription refused.");
                    refused.push(format!("{filter}: {reason}"));
                }
            }
        }
        let subscribed = refused.is_empty();
        self.metrics.subscribed.set(i64::from(subscribed));
        self.status.send_modify(|s| {
            s.subscribed = subscribed;
            s.last_error =
                (!subscribed).then(|| format!("subscription refused ({})", refused.join("; ")));
        });
    }

    /// A broker that closes the connection says why only by when it does it: before CONNACK
    /// on a TLS connection, it most likely refused the client certificate (under TLS 1.3 the
    /// handshake completes first and the alert that follows can be lost to the reset); before
    /// SUBACK, it most likely refused a filter (some brokers close the connection instead of
    /// answering with a failure code).
    fn explain_closed(&self, error: &mut PollError) {
        if !error.closed {
            return;
        }
        let explanation = if !self.connected && self.config.tls.is_some() {
            "TLS handshake failed or was cut short: the broker closed the connection before \
             CONNACK; it may not accept MQTT_CLIENT_CERT (check the CA that issued it), or may \
             require one"
                .to_owned()
        } else if self.subscribing {
            format!(
                "the broker closed the connection before answering SUBSCRIBE: is the client \
                 allowed to subscribe to MQTT_TOPIC ({})?",
                self.config.filters.join(", ")
            )
        } else {
            return;
        };
        error.refused = true;
        error.message = format!("{explanation} ({})", error.message);
    }

    fn on_connection_error(&self, broker: &str, error: &PollError, retry_in: Duration) {
        self.metrics.reconnects.inc();
        self.set_disconnected(Some(error.message.clone()));
        if error.refused {
            error!(broker = %broker, error = %error.message, retry_in = ?retry_in,
                "MQTT connection refused, retrying.");
        } else {
            warn!(broker = %broker, error = %error.message, retry_in = ?retry_in,
                "MQTT connection failed, retrying.");
        }
    }

    fn set_disconnected(&self, error: Option<String>) {
        self.metrics.connected.set(0);
        self.metrics.subscribed.set(0);
        self.status.send_modify(|s| {
            s.connected = false;
            s.subscribed = false;
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// `on-receipt`: everything received is already acknowledged, so nothing may be left
    /// behind. Sends DISCONNECT, passes on what the broker had already sent until it closes
    /// the connection, then hands on the intake queue.
    async fn drain_on_receipt(
        &mut self,
        connection: &mut impl Link,
        output: &mpsc::Sender<Message>,
    ) {
        if connection.disconnect() {
            let closed = tokio::time::timeout(DISCONNECT_GRACE, async {
                while let Ok(incoming) = connection.poll().await {
                    if let Incoming::Publish(received) = incoming {
                        self.receive(output, received);
                    }
                }
            })
            .await;
            if closed.is_err() {
                debug!("MQTT broker did not close the connection after DISCONNECT in time.");
            }
        }
        for message in self.intake.drain(..) {
            if output.send(message).await.is_err() {
                break;
            }
        }
    }

    /// `after-write`: hands on the intake queue and closes the pipeline's input (so the open
    /// batch is sent), then keeps the connection up to acknowledge everything passed on as the
    /// Kafka side finishes it. Messages arriving meanwhile are neither passed on nor
    /// acknowledged: the broker keeps them for the next start.
    async fn drain_after_write(
        &mut self,
        connection: &mut impl Link,
        output: mpsc::Sender<Message>,
        done: &mut AckWatermark,
    ) {
        let last_passed_on = self.last_seq;
        for message in self.intake.drain(..) {
            if output.send(message).await.is_err() {
                break;
            }
        }
        drop(output);
        let grace = tokio::time::sleep(self.config.shutdown_grace);
        tokio::pin!(grace);
        self.done_through = done.get();
        self.acknowledge(connection);
        while self.connected && self.done_through < last_passed_on && !self.unacked.is_empty() {
            tokio::select! {
                () = &mut grace => {
                    warn!(
                        unacknowledged = self.unacked.len(),
                        "Shutdown grace ended before every message was acknowledged; the broker \
                         will send those again."
                    );
                    break;
                }
                changed = done.changed() => match changed {
                    Some(w) => {
                        self.done_through = w;
                        self.acknowledge(connection);
                    }
                    None => break,
                },
                // Keep the connection serviced so the acknowledgements go out.
                polled = connection.poll() => match polled {
                    Ok(_) => self.acknowledge(connection),
                    Err(_) => {
                        self.connected = false;
                        break;
                    }
                },
            }
        }
        if !self.connected {
            // Nothing more can be acknowledged: the broker sends those messages again.
            return;
        }
        // Let the remaining acknowledgements and the DISCONNECT go out.
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            let mut disconnecting = false;
            loop {
                self.acknowledge(connection);
                if !disconnecting && !self.acks_due() {
                    disconnecting = connection.disconnect();
                }
                match connection.poll().await {
                    Ok(Incoming::Disconnected) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use mkb_bridge::{AckHandle, ack_channel};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;

    /// What the scripted broker saw of the task: acknowledged packet ids, subscriptions,
    /// disconnects.
    #[derive(Default)]
    struct Seen {
        acks: Mutex<Vec<u16>>,
        /// Polls of the connection so far, and how many there had been at each ack.
        polls: AtomicUsize,
        polls_at_ack: Mutex<Vec<usize>>,
        subscribes: AtomicUsize,
        disconnects: AtomicUsize,
        /// Acknowledgements the request channel still takes before it is full.
        room: AtomicUsize,
        /// What each side connection reading past an oversized packet finds, in turn.
        read_past: Mutex<VecDeque<Result<Option<Skipped>, String>>>,
        read_past_calls: AtomicUsize,
    }

    /// A connection whose events the test sends.
    struct ScriptedLink {
        events: mpsc::UnboundedReceiver<Result<Incoming, PollError>>,
        seen: Arc<Seen>,
    }

    impl Link for ScriptedLink {
        async fn poll(&mut self) -> Result<Incoming, PollError> {
            self.seen.polls.fetch_add(1, Ordering::Relaxed);
            match self.events.recv().await {
                Some(event) => event,
                None => std::future::pending().await,
            }
        }

        fn subscribe(&self, _filters: &[String], _qos: QoS) -> Result<(), String> {
            self.seen.subscribes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }

        fn ack(&self, _qos: QoS, pkid: u16) -> bool {
            let took = self
                .seen
                .room
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
                .is_ok();
            if took {
                self.seen.acks.lock().expect("lock").push(pkid);
                let polls = self.seen.polls.load(Ordering::Relaxed);
                self.seen.polls_at_ack.lock().expect("lock").push(polls);
            }
            took
        }

        fn disconnect(&self) -> bool {
            self.seen.disconnects.fetch_add(1, Ordering::Relaxed);
            true
        }

        async fn read_past(&mut self, _config: &MqttConfig) -> Result<Option<Skipped>, String> {
            self.seen.read_past_calls.fetch_add(1, Ordering::Relaxed);
            let next = self.seen.read_past.lock().expect("lock").pop_front();
            next.unwrap_or(Ok(None))
        }
    }

    pub(crate) fn config(ack_mode: AckMode) -> MqttConfig {
        MqttConfig {
            host: "mqtt.invalid".to_owned(),
            port: 1883,
            version: MqttVersion::V311,
            client_id: "bridge".to_owned(),
            filters: vec!["cars/#".to_owned()],
            qos: QoS::AtLeastOnce,
            keep_alive: Duration::from_secs(30),
            clean_session: false,
            max_packet_size: 1 << 20,
            dead_letter_topic: None,
            receive_maximum: 1000,
            credentials: None,
            tls: None,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            ack_mode,
            shutdown_grace: Duration::from_secs(5),
            websocket_path: None,
        }
    }

    struct Task {
        broker: mpsc::UnboundedSender<Result<Incoming, PollError>>,
        seen: Arc<Seen>,
        output: mpsc::Receiver<Message>,
        done: AckHandle,
        status: watch::Receiver<MqttStatus>,
        metrics: MqttMetrics,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    }

    /// A task with a pipeline of `capacity` messages, connected and subscribed.
    async fn start(ack_mode: AckMode, capacity: usize) -> Task {
        start_with(ack_mode, capacity, |_| {}).await
    }

    async fn start_with(
        ack_mode: AckMode,
        capacity: usize,
        adjust: impl FnOnce(&mut MqttConfig),
    ) -> Task {
        let (broker, events) = mpsc::unbounded_channel();
        let seen = Arc::new(Seen::default());
        seen.room.store(usize::MAX, Ordering::Relaxed);
        let link = ScriptedLink {
            events,
            seen: seen.clone(),
        };
        let metrics = MqttMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let mut config = config(ack_mode);
        adjust(&mut config);
        let source = MqttSource::new(config, metrics.clone());
        let status = source.status();
        let (output_tx, output) = mpsc::channel(capacity);
        let (done, watermark) = ack_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(source.run_on(link, output_tx, watermark, async {
            let _ = stopped.await;
        }));
        let task = Task {
            broker,
            seen,
            output,
            done,
            status,
            metrics,
            stop: Some(stop),
            task,
        };
        task.event(Incoming::ConnAck {
            session_present: false,
        });
        task.event(Incoming::SubAck(vec![Ok(QoS::AtLeastOnce)]));
        task.settle().await;
        task
    }

    fn publish(pkid: u16, qos: QoS, payload: usize) -> Incoming {
        Incoming::Publish(Received {
            topic: format!("cars/{pkid}"),
            payload: bytes::Bytes::from(vec![b'x'; payload]),
            qos,
            pkid,
            retain: false,
            dup: false,
            properties: None,
        })
    }

    impl Task {
        fn event(&self, incoming: Incoming) {
            self.broker.send(Ok(incoming)).expect("task polls");
        }

        fn fail(&self, message: &str) {
            self.fail_with(message, None);
        }

        fn fail_with(&self, message: &str, unreadable: Option<Unreadable>) {
            let error = PollError {
                refused: false,
                message: message.to_owned(),
                unreadable,
                closed: message.contains("closed by peer") || message.contains("reset by peer"),
            };
            self.broker.send(Err(error)).expect("task polls");
        }

        /// Lets the task handle everything sent so far.
        async fn settle(&self) {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        /// The next side connection finds a message of [`BIG`] bytes on `topic`.
        fn will_read_past(&self, topic: &str, qos: QoS) {
            let skipped = Skipped {
                topic: topic.to_owned(),
                size: BIG,
                qos,
                payload: None,
            };
            let mut script = self.seen.read_past.lock().expect("lock");
            script.push_back(Ok(Some(skipped)));
        }

        fn acks(&self) -> Vec<u16> {
            self.seen.acks.lock().expect("lock").clone()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connecting_subscribes_and_reports_ready() {
        let task = start(AckMode::AfterWrite, 10).await;
        assert_eq!(task.seen.subscribes.load(Ordering::Relaxed), 1);
        let status = task.status.borrow().clone();
        assert!(status.connected && status.subscribed, "{status:?}");
        assert_eq!(task.metrics.subscribed.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn messages_are_acknowledged_only_once_the_kafka_side_reports_them_done() {
        let mut task = start(AckMode::AfterWrite, 10).await;
        for pkid in 1..=5 {
            task.event(publish(pkid, QoS::AtLeastOnce, 10));
        }
        task.settle().await;
        let numbers: Vec<u64> = (0..5)
            .map(|_| task.output.try_recv().expect("passed on").seq)
            .collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5]);
        assert!(task.acks().is_empty(), "nothing is done yet");
        assert_eq!(task.metrics.awaiting_ack.get(), 5);
        task.done.done_through(3);
        task.settle().await;
        assert_eq!(
            task.acks(),
            [1, 2, 3],
            "in receipt order, only what is done"
        );
        task.done.done_through(5);
        task.settle().await;
        assert_eq!(task.acks(), [1, 2, 3, 4, 5]);
        assert_eq!(task.metrics.awaiting_ack.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledgements_go_out_while_the_connection_stays_busy() {
        let task = start(AckMode::AfterWrite, 1000).await;
        for pkid in 1..=3 {
            task.event(publish(pkid, QoS::AtLeastOnce, 10));
        }
        task.settle().await;
        let polls_before = task.seen.polls.load(Ordering::Relaxed);
        // The Kafka side reports while a long run of messages is already waiting: the
        // connection is ready on every turn until they are all read.
        task.done.done_through(1);
        for pkid in 4..=300 {
            task.event(publish(pkid, QoS::AtLeastOnce, 10));
        }
        task.settle().await;
        assert_eq!(task.acks(), [1]);
        let at = task.seen.polls_at_ack.lock().expect("lock")[0];
        assert!(
            at <= polls_before + 2,
            "acknowledged only after {} more messages were read",
            at - polls_before
        );
    }

    #[tokio::test(start_paused = true)]
    async fn qos_0_messages_are_never_acknowledged() {
        let mut task = start(AckMode::AfterWrite, 10).await;
        task.event(publish(0, QoS::AtMostOnce, 10));
        task.event(publish(7, QoS::AtLeastOnce, 10));
        task.settle().await;
        assert_eq!(task.output.try_recv().expect("first").seq, 1);
        task.done.done_through(2);
        task.settle().await;
        assert_eq!(task.acks(), [7]);
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledgements_of_a_lost_connection_are_forgotten() {
        let task = start(AckMode::AfterWrite, 10).await;
        for pkid in 1..=3 {
            task.event(publish(pkid, QoS::AtLeastOnce, 10));
        }
        task.settle().await;
        task.fail("connection reset");
        task.settle().await;
        assert!(!task.status.borrow().connected);
        // Done while disconnected, and after the new ConnAck: the broker sends them again under
        // new packet ids, so the old ones are never acknowledged.
        task.done.done_through(3);
        task.settle().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        task.event(Incoming::ConnAck {
            session_present: true,
        });
        task.settle().await;
        assert!(task.acks().is_empty(), "acked {:?}", task.acks());
        assert_eq!(task.metrics.awaiting_ack.get(), 0);
        assert_eq!(task.metrics.reconnects.get(), 1);
        assert_eq!(task.seen.subscribes.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledgements_wait_while_the_request_channel_is_full() {
        let task = start(AckMode::AfterWrite, 10).await;
        for pkid in 1..=4 {
            task.event(publish(pkid, QoS::AtLeastOnce, 10));
        }
        task.settle().await;
        task.seen.room.store(2, Ordering::Relaxed);
        task.done.done_through(4);
        task.settle().await;
        assert_eq!(task.acks(), [1, 2]);
        // The next event of the connection means the event loop took requests: the rest go.
        task.seen.room.store(usize::MAX, Ordering::Relaxed);
        task.event(Incoming::Other);
        task.settle().await;
        assert_eq!(task.acks(), [1, 2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn qos_0_beyond_the_intake_limit_is_dropped_and_counted() {
        // A pipeline of one message that nobody reads: everything else waits in the intake.
        let task = start(AckMode::AfterWrite, 1).await;
        let payload = 1 << 20;
        for _ in 0..20 {
            task.event(publish(0, QoS::AtMostOnce, payload));
        }
        task.settle().await;
        let queued = task.metrics.intake.get() as usize;
        let dropped = task.metrics.dropped_intake_full.get() as usize;
        assert_eq!(1 + queued + dropped, 20);
        assert!(dropped >= 4, "dropped {dropped}");
        assert!(queued * payload <= INTAKE_LIMIT_BYTES);
    }

    #[tokio::test(start_paused = true)]
    async fn qos_1_beyond_the_intake_limit_is_queued_not_dropped() {
        let mut task = start(AckMode::AfterWrite, 1).await;
        let payload = 1 << 20;
        for pkid in 1..=20 {
            task.event(publish(pkid, QoS::AtLeastOnce, payload));
        }
        task.settle().await;
        assert_eq!(task.metrics.dropped_intake_full.get(), 0);
        // All of them come out, in order, as the pipeline takes them.
        for seq in 1..=20 {
            let message = task.output.recv().await.expect("passed on");
            assert_eq!(message.seq, seq);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_stops_when_the_pipeline_closes_while_messages_are_queued() {
        // One message in the pipeline, the rest queued; then the batcher goes away while the
        // connection stays busy.
        let mut task = start(AckMode::AfterWrite, 1).await;
        for pkid in 1..=3 {
            task.event(publish(pkid, QoS::AtLeastOnce, 10));
        }
        task.settle().await;
        assert_eq!(task.metrics.intake.get(), 2);
        drop(std::mem::replace(&mut task.output, mpsc::channel(1).1));
        for pkid in 4..=300 {
            task.event(publish(pkid, QoS::AtLeastOnce, 10));
        }
        tokio::time::timeout(Duration::from_secs(60), &mut task.task)
            .await
            .expect("the task stops (after its shutdown grace)")
            .expect("task ends");
        assert!(
            task.acks().is_empty(),
            "nothing was done, nothing acknowledged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_subscription_is_reported() {
        let task = start(AckMode::AfterWrite, 10).await;
        task.event(Incoming::SubAck(vec![Err("not authorised".to_owned())]));
        task.settle().await;
        let status = task.status.borrow().clone();
        assert!(!status.subscribed);
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("not authorised")),
            "{status:?}"
        );
        assert_eq!(task.metrics.subscribed.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_what_was_passed_on_then_disconnects() {
        let mut task = start(AckMode::AfterWrite, 10).await;
        for pkid in 1..=3 {
            task.event(publish(pkid, QoS::AtLeastOnce, 10));
        }
        task.settle().await;
        task.stop
            .take()
            .expect("running")
            .send(())
            .expect("task running");
        task.settle().await;
        // The pipeline's input closes so that the open batch is sent...
        for _ in 0..3 {
            task.output
                .recv()
                .await
                .expect("passed on before the close");
        }
        assert!(task.output.recv().await.is_none(), "input closed");
        // ...and the acknowledgements still go out as the Kafka side finishes.
        task.done.done_through(3);
        task.settle().await;
        task.event(Incoming::Disconnected);
        (&mut task.task).await.expect("task ends");
        assert_eq!(task.acks(), [1, 2, 3]);
        assert_eq!(task.seen.disconnects.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn on_receipt_mode_defers_nothing() {
        let mut task = start(AckMode::OnReceipt, 10).await;
        task.event(publish(1, QoS::AtLeastOnce, 10));
        task.settle().await;
        assert_eq!(task.output.try_recv().expect("passed on").seq, 1);
        assert_eq!(task.metrics.awaiting_ack.get(), 0);
        assert!(task.acks().is_empty(), "the client acknowledges on its own");
    }

    const BIG: usize = 20 << 20;

    #[tokio::test(start_paused = true)]
    async fn a_packet_above_the_limit_is_read_past_and_reported_as_a_dead_letter() {
        let mut task = start_with(AckMode::AfterWrite, 10, |c| {
            c.dead_letter_topic = Some("dlq".to_owned());
        })
        .await;
        task.will_read_past("cars/big", QoS::AtLeastOnce);
        task.event(publish(1, QoS::AtLeastOnce, 10));
        task.fail_with("packet too large", Some(Unreadable::TooLarge(BIG)));
        task.settle().await;
        assert_eq!(task.seen.read_past_calls.load(Ordering::Relaxed), 1);
        assert_eq!(task.metrics.oversized.get(), 1);
        let first = task.output.recv().await.expect("the message before");
        assert!(first.dead_letter.is_none());
        let letter = task.output.recv().await.expect("the dead letter");
        assert_eq!(letter.topic, "cars/big");
        assert_eq!(
            letter.qos,
            QoS::AtMostOnce,
            "acknowledged on the side connection"
        );
        assert!(letter.payload.is_empty());
        let dead = letter.dead_letter.expect("a dead letter");
        assert_eq!(
            (dead.topic.as_str(), dead.reason, dead.original_size),
            ("dlq", dead_letter::MQTT_TOO_LARGE, BIG)
        );
        assert!(
            dead.error.contains("MQTT_MAX_PACKET_SIZE"),
            "{}",
            dead.error
        );
        assert_eq!(letter.seq, first.seq + 1, "numbered like any message");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_dead_letter_topic_a_message_read_past_is_only_counted() {
        let mut task = start(AckMode::AfterWrite, 10).await;
        task.will_read_past("cars/big", QoS::ExactlyOnce);
        task.fail_with("packet too large", Some(Unreadable::TooLarge(BIG)));
        task.settle().await;
        assert_eq!(task.seen.read_past_calls.load(Ordering::Relaxed), 1);
        assert_eq!(task.metrics.oversized.get(), 1);
        assert!(task.output.try_recv().is_err(), "nothing passed on");
    }

    #[tokio::test(start_paused = true)]
    async fn no_side_connection_where_the_broker_does_not_send_the_packet_again() {
        for (version, clean_session) in [(MqttVersion::V5, false), (MqttVersion::V311, true)] {
            let task = start_with(AckMode::AfterWrite, 10, |c| {
                c.version = version;
                c.clean_session = clean_session;
            })
            .await;
            task.fail_with("packet too large", Some(Unreadable::TooLarge(BIG)));
            task.settle().await;
            assert_eq!(task.seen.read_past_calls.load(Ordering::Relaxed), 0);
            assert_eq!(task.metrics.oversized.get(), 1, "{version:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_closed_after_subscribe_is_reported_as_a_refused_subscription() {
        let task = start(AckMode::AfterWrite, 10).await;
        task.event(Incoming::ConnAck {
            session_present: false,
        });
        task.fail("connection closed by peer");
        task.settle().await;
        let status = task.status.borrow().clone();
        let error = status.last_error.expect("an error");
        assert!(
            error.contains("closed the connection before answering SUBSCRIBE")
                && error.contains("cars/#"),
            "{error}"
        );
        // A failure once subscribed is an ordinary one.
        task.event(Incoming::ConnAck {
            session_present: false,
        });
        task.event(Incoming::SubAck(vec![Ok(QoS::AtLeastOnce)]));
        task.fail("connection closed by peer");
        // Past the reconnect delay (paused time).
        tokio::time::sleep(Duration::from_secs(60)).await;
        let error = task.status.borrow().last_error.clone().expect("an error");
        assert_eq!(error, "connection closed by peer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tls_connection_closed_before_connack_points_at_the_client_certificate() {
        let task = start_with(AckMode::AfterWrite, 10, |c| {
            c.tls = Some(native_tls::TlsConnector::new().expect("TLS connector"));
        })
        .await;
        let reset = "IO: Connection reset by peer (os error 104)";
        let last_error = async || {
            // Past the reconnect delay (paused time).
            tokio::time::sleep(Duration::from_secs(60)).await;
            task.status.borrow().last_error.clone().expect("an error")
        };
        task.fail_with(reset, None);
        assert_eq!(last_error().await, reset, "lost once connected: as it is");
        task.fail_with(reset, None);
        let error = last_error().await;
        assert!(
            error.starts_with("TLS handshake failed or was cut short")
                && error.contains("MQTT_CLIENT_CERT")
                && error.ends_with(&format!("({reset})")),
            "{error}"
        );
    }
}
