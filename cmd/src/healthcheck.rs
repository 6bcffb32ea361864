//! `mqtt-kafka-bridge healthcheck`: asks a running bridge's `/healthz` over loopback and says
//! whether it answered 200, for a container's HEALTHCHECK (a `FROM scratch` image has no curl).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// How long the connection and each read or write may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// GETs `/healthz` from the bridge listening on `listen` (a wildcard address is asked on
/// loopback). Returns the status line of a 200 answer, or why the bridge is not healthy.
pub fn healthcheck(listen: SocketAddr) -> Result<String, String> {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, listen.port());
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("no answer on {addr} ({e}): is the bridge running?"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| format!("{addr}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or_default().trim().to_owned();
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body.trim());
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(format!("{status} {body}").trim().to_owned())
    } else if status.is_empty() {
        Err(format!("{addr} closed the connection without an answer"))
    } else {
        Err(format!("{addr}/healthz: {status} {body}").trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// Serves one connection with `answer`.
    fn serve_once(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(answer.as_bytes());
        });
        addr
    }

    #[test]
    fn a_200_is_healthy_anything_else_says_why() {
        let ok = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!(healthcheck(ok).expect("healthy"), "HTTP/1.1 200 OK ok");
        let failing = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\nKafka task stopped");
        let error = healthcheck(failing).expect_err("unhealthy");
        assert!(
            error.ends_with("503 Service Unavailable Kafka task stopped"),
            "{error}"
        );
    }

    #[test]
    fn nothing_listening_is_unhealthy_and_a_wildcard_address_is_asked_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        drop(listener);
        let error = healthcheck(SocketAddr::from(([0, 0, 0, 0], port))).expect_err("down");
        assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
        assert!(error.contains("is the bridge running?"), "{error}");
    }
}
