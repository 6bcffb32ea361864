//! MQTT over WebSockets (`MQTT_TRANSPORT=ws`, SPEC and README "MQTT connection").
//!
//! rumqttc's WebSocket transports need rustls (for `wss://` entirely, and through
//! async-tungstenite's features even for `ws://`), which the bridge left for OpenSSL. So the
//! MQTT clients keep speaking plain TCP, to a loopback port of this adapter, which carries each
//! connection's bytes in WebSocket binary messages to `ws://` or `wss://<broker>:<port><path>`
//! (subprotocol `mqtt`, MQTT 3.1.1 and 5 alike), TLS through the same OpenSSL connector as the
//! TCP transport. One adapter per task (uplink, downlink); it stops with its owner.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tracing::warn;

use crate::MqttConfig;

/// A running adapter; dropping it stops it (and the connections it carries).
pub struct Adapter {
    task: JoinHandle<()>,
}

impl Drop for Adapter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// With `MQTT_TRANSPORT=ws`: starts an adapter to the configured broker and returns the
/// configuration the MQTT clients use to reach it (loopback, plain TCP), and the adapter to
/// keep. Over TCP: the configuration as it is, and no adapter.
pub fn endpoint(config: &MqttConfig) -> std::io::Result<(MqttConfig, Option<Adapter>)> {
    let Some(path) = &config.websocket_path else {
        return Ok((config.clone(), None));
    };
    let scheme = if config.tls.is_some() { "wss" } else { "ws" };
    let url = format!("{scheme}://{}:{}{path}", config.host, config.port);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let listener = TcpListener::from_std(listener)?;
    let tls = config.tls.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, url.clone(), tls.clone()));
            }
        }
    });
    let mut local = config.clone();
    local.host = addr.ip().to_string();
    local.port = addr.port();
    local.tls = None;
    local.websocket_path = None;
    Ok((local, Some(Adapter { task })))
}

/// Carries one MQTT connection: opens the WebSocket, then copies bytes both ways until either
/// side closes. A failed opening closes the client's connection (it reconnects with its
/// back-off) and is logged with why.
async fn relay(client: TcpStream, url: String, tls: Option<native_tls::TlsConnector>) {
    let mut request = match url.as_str().into_client_request() {
        Ok(request) => request,
        Err(e) => {
            warn!(url, error = %e, "MQTT over WebSockets: not a URL.");
            return;
        }
    };
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let connector = tls.map(Connector::NativeTls);
    let opened =
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector).await;
    let socket = match opened {
        Ok((socket, _response)) => socket,
        Err(e) => {
            warn!(url, error = %e, "MQTT over WebSockets: cannot open the WebSocket.");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let (mut to_broker, mut from_broker) = socket.split();
    let (mut from_client, mut to_client) = client.into_split();
    let up = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from_client.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Message::Binary(buffer[..n].to_vec().into());
                    if to_broker.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_broker.close().await;
    };
    let down = async {
        while let Some(Ok(message)) = from_broker.next().await {
            match message {
                Message::Binary(bytes) if to_client.write_all(&bytes).await.is_err() => break,
                Message::Close(_) => break,
                // Pings are answered by tungstenite; MQTT sends no text.
                _ => {}
            }
        }
        let _ = to_client.shutdown().await;
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
