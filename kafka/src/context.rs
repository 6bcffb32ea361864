//! How librdkafka's own log lines and global errors reach the bridge's logs.
//!
//! librdkafka reports every failed connection attempt as an error, and again through its
//! global-error callback. Those are transient while Kafka is down, and the Kafka task already
//! reports the failing state in its own words, so they become WARN (log) and DEBUG (duplicate
//! global errors); ERROR is kept for fatal errors, which need an operator.

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use tracing::{debug, error, info, warn};

/// The context of every librdkafka client the bridge creates.
#[derive(Clone, Copy, Debug, Default)]
pub struct BridgeContext;

impl ClientContext for BridgeContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                error!(facility, "librdkafka: {message}");
            }
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                warn!(facility, "librdkafka: {message}");
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => debug!(facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        let transient = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::Resolve
                    | RDKafkaErrorCode::MessageTimedOut
            )
        );
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            error!(error = %error, "Kafka client hit a fatal error: {reason}");
        } else if transient {
            // Already in librdkafka's log line, and in the Kafka task's failing-state warning.
            debug!(error = %error, "librdkafka: {reason}");
        } else {
            warn!(error = %error, "librdkafka: {reason}");
        }
    }
}
