//! The Kafka side of the bridge: one task that alone owns the rdkafka producer.
//!
//! [`KafkaSink::connect`] builds the producer (`acks=all`, idempotent), creates missing topics
//! through the Admin API and runs the start-up probe. [`KafkaSink::run`] then writes each
//! [`mkb_bridge::Batch`], with a few in flight, and settles their delivery reports in order: a
//! batch's messages are reported done only once Kafka (or the disk spool) holds them.
//!
//! Errors fall in three kinds (see the `sink` module): final for one record (too large: counted
//! and dropped, the pipeline goes on), worth a short wait (local queue full), and "Kafka is
//! down": the undelivered records go to the [`spool`], in order, and are tried again every
//! `retry_interval`; nothing behind them overtakes them.

mod config;
mod context;
mod dead_letter;
mod delivery;
mod error;
mod metrics;
mod producer;
mod sink;
pub mod spool;
mod startup;

pub use config::{InvalidProperty, KafkaConfig, is_secret_property};
pub use error::KafkaError;
pub use metrics::{KafkaMetrics, SpoolMetrics};
pub use sink::{KafkaSink, KafkaStatus};
pub use spool::{FullPolicy, SpoolConfig};
