//! The middle of the pipeline and the types that cross it.
//!
//! A message travels `mqtt` → [`Message`] → [`Batcher`] → [`Batch`] of [`Record`]s → `kafka`,
//! and its acknowledgement travels back as an [`AckHandle`] watermark.
//! The MQTT crate produces messages, the Kafka crate consumes batches; neither knows the other.
//! This crate owns the Kafka record format (the [`envelope`]) and the batching rule, so a change
//! to either happens in one place.

pub mod acks;
pub mod batcher;
pub mod dead_letter;
pub mod envelope;
mod message;
pub mod route;
pub mod sparkplug;

pub use acks::{AckHandle, AckWatermark, ack_channel};
pub use batcher::{Batcher, BatcherConfig, KafkaIdle};
pub use message::{Batch, Key, Message, Properties, QoS, Record, Topic};
pub use route::Router;
