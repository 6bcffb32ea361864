//! Metrics of the MQTT task. Metric names live here and nowhere else.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Counters and gauges of the MQTT connection, registered in the bridge's registry.
#[derive(Clone)]
pub struct MqttMetrics {
    /// Received messages, one counter per QoS level (index 0, 1, 2), resolved once.
    received: [IntCounter; 3],
    pub connected: IntGauge,
    /// 1 once the broker granted every topic filter on the current connection.
    pub subscribed: IntGauge,
    pub reconnects: IntCounter,
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
        registry.register(Box::new(received.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        registry.register(Box::new(subscribed.clone()))?;
        registry.register(Box::new(reconnects.clone()))?;
        Ok(Self {
            received: [0, 1, 2].map(|qos: u8| received.with_label_values(&[&qos.to_string()])),
            connected,
            subscribed,
            reconnects,
        })
    }

    pub fn received(&self, qos: mkb_bridge::QoS) -> &IntCounter {
        &self.received[usize::from(qos.level())]
    }
}
