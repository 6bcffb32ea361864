//! A small HTTP/1 server on hyper. Each connection is served on its own task; the listener stops
//! when the shutdown future completes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::ObservabilityError;

/// What `/readyz` answers: ready, or not ready with a one-line reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

/// Sets what `/readyz` answers. Cloneable; the latest value wins.
#[derive(Clone, Debug)]
pub struct ReadinessHandle(watch::Sender<Readiness>);

impl ReadinessHandle {
    pub fn set(&self, readiness: Readiness) {
        self.0.send_replace(readiness);
    }
}

/// The bound HTTP server, not yet serving.
pub struct HealthServer {
    listener: TcpListener,
    registry: Registry,
    readiness: watch::Receiver<Readiness>,
}

impl HealthServer {
    /// Binds `addr` (port 0 picks a free port). The server starts not ready.
    pub async fn bind(
        addr: SocketAddr,
        registry: Registry,
    ) -> Result<(Self, ReadinessHandle), ObservabilityError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ObservabilityError::Bind { addr, source })?;
        let (tx, readiness) = watch::channel(Readiness::NotReady("starting".to_owned()));
        let server = Self {
            listener,
            registry,
            readiness,
        };
        Ok((server, ReadinessHandle(tx)))
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        info!(addr = %self.local_addr(), "Serving /metrics, /healthz and /readyz.");
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        debug!(error = %e, "HTTP accept failed.");
                        continue;
                    }
                },
            };
            let registry = self.registry.clone();
            let readiness = self.readiness.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = respond(&request, &registry, &readiness);
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(peer = %peer, error = %e, "HTTP connection ended with an error.");
                }
            });
        }
    }
}

fn respond(
    request: &Request<Incoming>,
    registry: &Registry,
    readiness: &watch::Receiver<Readiness>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match &*readiness.borrow() {
            Readiness::Ready => text(StatusCode::OK, "ready\n"),
            Readiness::NotReady(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {reason}\n"),
            ),
        },
        "/metrics" => metrics(registry),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn metrics(registry: &Registry) -> Response<Full<Bytes>> {
    let encoder = TextEncoder::new();
    let mut body = Vec::with_capacity(8 * 1024);
    if let Err(e) = encoder.encode(&registry.gather(), &mut body) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode metrics: {e}\n"),
        );
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(prometheus::TEXT_FORMAT),
    );
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("server listens");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("test_things_total", "Things.").expect("valid");
        registry
            .register(Box::new(counter.clone()))
            .expect("registered");
        counter.inc_by(3);
        let (server, readiness) =
            HealthServer::bind("127.0.0.1:0".parse().expect("addr"), registry)
                .await
                .expect("bind");
        let addr = server.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.contains("test_things_total 3"), "{metrics}");
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(not_ready.contains("not ready: starting"), "{not_ready}");
        readiness.set(Readiness::Ready);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        stop.send(()).expect("server runs");
        task.await.expect("server stops");
    }
}
