//! The MQTT side of the bridge: one task that owns the rumqttc event loop, MQTT 3.1.1 or 5,
//! over TCP, TLS or WebSockets ([`websocket`]).
//!
//! [`MqttSource`] connects, subscribes to every configured filter, and hands each received
//! publish on as a [`mkb_bridge::Message`] through a bounded channel. It reconnects forever with
//! capped, jittered exponential [`Backoff`] and subscribes again on every connection; a broker
//! that is down never makes it exit. Only shutdown does, and then it drops its sender, which is
//! what starts the drain of the rest of the pipeline.

mod backoff;
mod config;
mod connection;
mod metrics;
mod skip;
mod source;
mod tls;
pub mod websocket;

pub use backoff::Backoff;
pub use config::{AckMode, Credentials, MqttConfig, MqttVersion};
pub use connection::{options_5, options_311, qos_5, qos_311};
pub use metrics::MqttMetrics;
pub use source::{INTAKE_LIMIT_BYTES, MqttSource, MqttStatus};
pub use tls::{TlsConfig, TlsError, TlsFile};
