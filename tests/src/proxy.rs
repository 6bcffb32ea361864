//! A fault-injecting TCP proxy for chaos tests, in the spirit of Toxiproxy: it sits between the
//! bridge and a broker and can cut the link, delay it, or reset its connections.
//!
//! Kafka clients reconnect to the broker's *advertised* address after bootstrap, so a broker
//! behind this proxy must advertise the proxy's port ([`crate::Tansu::start_behind_proxy`]),
//! or the client silently bypasses it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Close every connection and refuse new ones: the broker is unreachable.
    Down,
    /// Hold every chunk of data this long before forwarding it, both ways.
    Latency(Duration),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Control {
    fault: Fault,
    /// Raised to reset every open connection.
    generation: u64,
}

pub struct FaultProxy {
    port: u16,
    control: watch::Sender<Control>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:`port` (0 for any) and forwards to `upstream`.
    pub async fn start(port: u16, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the fault proxy");
        let port = listener.local_addr().expect("bound address").port();
        let (control, watch) = watch::channel(Control {
            fault: Fault::None,
            generation: 0,
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let control = watch.clone();
                tokio::spawn(async move {
                    if control.borrow().fault == Fault::Down {
                        reset(client);
                        return;
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        reset(client);
                        return;
                    };
                    link(client, server, control).await;
                });
            }
        });
        Self {
            port,
            control,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Applies a fault; `Down` also resets every open connection.
    pub fn set(&self, fault: Fault) {
        self.control.send_modify(|c| {
            c.fault = fault;
            if fault == Fault::Down {
                c.generation += 1;
            }
        });
    }

    /// Resets every open connection (the clients see a TCP RST) but accepts new ones.
    pub fn reset_connections(&self) {
        self.control.send_modify(|c| c.generation += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Closes with a TCP RST instead of a FIN, as a crashed peer or a middlebox would.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Pumps both directions until either side closes or the connection generation changes.
async fn link(client: TcpStream, server: TcpStream, mut control: watch::Receiver<Control>) {
    let generation = control.borrow().generation;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let upstream = pump(client_read, server_write, control.clone());
    let downstream = pump(server_read, client_write, control.clone());
    let reset_requested = async {
        while control.changed().await.is_ok() {
            if control.borrow().generation != generation {
                return;
            }
        }
    };
    tokio::select! {
        halves = async { tokio::join!(upstream, downstream) } => {
            let ((client_read, server_write), (server_read, client_write)) = halves;
            drop((client_read, server_write, server_read, client_write));
        }
        () = reset_requested => {}
    }
}

/// Copies one direction, delaying each chunk while a latency fault is on. Returns its halves so
/// the caller decides how they close.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    control: watch::Receiver<Control>,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let fault = control.borrow().fault;
        if let Fault::Latency(delay) = fault {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    (from, to)
}
