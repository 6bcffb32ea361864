//! Metrics of the MQTT task. Metric names live here and nowhere else.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    exponential_buckets,
};

/// Counters and gauges of the MQTT connection, registered in the bridge's registry.
#[derive(Clone)]
pub struct MqttMetrics {
    /// Received messages, one counter per QoS level (index 0, 1, 2), resolved once.
    received: [IntCounter; 3],
    pub connected: IntGauge,
    /// 1 once the broker granted every topic filter on the current connection.
    pub subscribed: IntGauge,
    pub reconnects: IntCounter,
    /// QoS 1/2 messages received and not yet acknowledged to the broker.
    pub awaiting_ack: IntGauge,
    /// Receipt to acknowledgement, per QoS 1/2 message.
    pub ack_latency: Histogram,
    /// Messages waiting in the intake queue for room in the pipeline.
    pub intake: IntGauge,
    /// Messages dropped because the intake queue was full.
    pub dropped_intake_full: IntCounter,
    /// Messages above `MQTT_MAX_PACKET_SIZE` the broker sent: read past, acknowledged, their
    /// payload not passed on (a dead letter says so when a dead-letter topic is set).
    pub oversized: IntCounter,
    /// Messages whose topic is not UTF-8 (from a broker that does not check): read past and
    /// acknowledged, passed on only as dead letters.
    pub invalid_topic: IntCounter,
    /// Unix time of the latest second in which a message arrived (see
    /// [`MqttMetrics::stamp_last_message`]).
    last_message: IntGauge,
}

impl MqttMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let received = IntCounterVec::new(
            Opts::new(
                "bridge_mqtt_messages_received_total",
                "MQTT messages received, by QoS.",
            ),
            &["qos"],
        )?;
        let connected = IntGauge::new(
            "bridge_mqtt_connected",
            "1 while connected to the MQTT broker, 0 otherwise.",
        )?;
        let subscribed = IntGauge::new(
            "bridge_mqtt_subscribed",
            "1 while every topic filter is subscribed on the current connection, 0 otherwise.",
        )?;
        let reconnects = IntCounter::new(
            "bridge_mqtt_reconnects_total",
            "Failed or lost MQTT connections that were retried.",
        )?;
        let awaiting_ack = IntGauge::new(
            "bridge_mqtt_messages_awaiting_ack",
            "QoS 1/2 messages received and not yet acknowledged to the broker.",
        )?;
        let ack_latency = Histogram::with_opts(
            HistogramOpts::new(
                "bridge_mqtt_ack_latency_seconds",
                "Time from receipt to acknowledgement of QoS 1/2 messages.",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 16)?),
        )?;
        let intake = IntGauge::new(
            "bridge_mqtt_intake_messages",
            "Messages received and waiting for room in the pipeline.",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "bridge_mqtt_messages_dropped_total",
                "MQTT messages dropped before reaching the pipeline, by reason.",
            ),
            &["reason"],
        )?;
        let last_message = IntGauge::new(
            "bridge_mqtt_last_message_timestamp_seconds",
            "Unix time of the latest second in which an MQTT message arrived (0: none yet); \
             checked once a second.",
        )?;
        registry.register(Box::new(last_message.clone()))?;
        registry.register(Box::new(awaiting_ack.clone()))?;
        registry.register(Box::new(ack_latency.clone()))?;
        registry.register(Box::new(intake.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(received.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        registry.register(Box::new(subscribed.clone()))?;
        registry.register(Box::new(reconnects.clone()))?;
        Ok(Self {
            received: [0, 1, 2].map(|qos: u8| received.with_label_values(&[&qos.to_string()])),
            connected,
            subscribed,
            reconnects,
            awaiting_ack,
            ack_latency,
            intake,
            dropped_intake_full: dropped.with_label_values(&["intake_full"]),
            oversized: dropped.with_label_values(&["too_large"]),
            invalid_topic: dropped.with_label_values(&["invalid_topic"]),
            last_message,
        })
    }

    pub fn received(&self, qos: mkb_bridge::QoS) -> &IntCounter {
        &self.received[usize::from(qos.level())]
    }

    /// Keeps `bridge_mqtt_last_message_timestamp_seconds` up to date: once a second, if the
    /// received counters moved, it becomes the current time. A stall alert needs seconds, not
    /// a clock read per message. Runs until aborted.
    pub async fn stamp_last_message(self) {
        let mut seen = 0;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let received: u64 = self.received.iter().map(IntCounter::get).sum();
            if received != seen {
                seen = received;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.last_message
                    .set(i64::try_from(now).unwrap_or(i64::MAX));
            }
        }
    }
}
