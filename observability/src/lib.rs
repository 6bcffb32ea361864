//! The bridge's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (liveness) and
//! `/readyz` (readiness).
//!
//! The server reads one explicit [`prometheus::Registry`] (no global default, so several bridges
//! can share a process in tests) and a readiness flag that the bridge updates through a
//! [`ReadinessHandle`]. It depends on no other crate of the bridge.

mod server;

pub use server::{HealthServer, Readiness, ReadinessHandle};

/// Why the HTTP server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ObservabilityError {
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}
