//! Real servers for the tests: Mosquitto (Debian's package) and tansu (from crates.io), each a
//! child process on a free loopback port, killed by PID when its handle drops.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MOSQUITTO_INSTALL: &str =
    "install it with `apt-get install mosquitto mosquitto-clients` (or run `bash .ci/run`)";
const TANSU_INSTALL: &str = "install it with `cargo install tansu --version 0.6.0 --features \
     dynostore --locked` (or run `bash .ci/run`)";

/// A port that was free a moment ago on 127.0.0.1, never handed out before in this process.
///
/// Taken below the kernel's ephemeral range (32768–60999 on Linux): a port from that range can
/// be taken by an outgoing connection (a Kafka or MQTT client's) between this check and the
/// server's bind, which failed a bridge's start with "Address already in use" in CI.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..10_000 {
        let port = fastrand::u16(20_000..32_000);
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between 20000 and 32000")
}

/// Finds an executable on PATH or in the usual places, or fails the test saying how to install it.
fn find_executable(name: &str, extra_dirs: &[PathBuf], install: &str) -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .iter()
        .chain(extra_dirs)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: {install}"))
}

/// Waits until something accepts TCP connections on `port`, or panics naming `what`.
fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    if let Err(e) = listening(port, what, child) {
        panic!("{e}");
    }
}

/// Waits until something accepts TCP connections on `port`; an error when the child exits
/// first or nothing listens within 20 s.
fn listening(port: u16, what: &str, child: &mut Child) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited with {status} before listening on port {port}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} did not listen on port {port} within 20 s"))
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// TLS settings of a Mosquitto listener.
#[derive(Clone, Debug)]
pub struct ListenerTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Clients must present a certificate signed by `ca_file`.
    pub require_certificate: bool,
}

/// How a test Mosquitto is set up beyond the defaults (anonymous, plain TCP, no persistence).
#[derive(Clone, Debug, Default)]
pub struct MosquittoOptions {
    pub tls: Option<ListenerTls>,
    /// A single user allowed in; anonymous access is then off.
    pub user: Option<(String, String)>,
    /// `max_inflight_messages` (Mosquitto's default, 20, when `None`).
    pub max_inflight: Option<u16>,
    /// The text of an `acl_file` (its lines before any `user` line apply to anonymous
    /// clients).
    pub acl: Option<String>,
    /// The main port speaks MQTT over WebSockets (with TLS when `tls` is set); test clients use
    /// the plain TCP listener on `plain_port` (Mosquitto 2.0.11 also refuses to start with a
    /// websockets listener alone).
    pub websockets: bool,
}

/// A Mosquitto broker with a generated configuration in its own temporary directory.
pub struct Mosquitto {
    child: Child,
    port: u16,
    /// A plain TCP listener for test publishers when `port` is TLS; equal to `port` otherwise.
    plain_port: u16,
    dir: tempfile::TempDir,
    options: MosquittoOptions,
}

impl Mosquitto {
    /// Starts Mosquitto on a free port, anonymous access, no persistence.
    pub fn start() -> Self {
        Self::start_with(MosquittoOptions::default())
    }

    /// Starts Mosquitto with `options` on free ports. A port found free can be taken by
    /// another process (an outgoing connection's ephemeral port) before Mosquitto binds it;
    /// then Mosquitto exits at once, and it is started again on other ports.
    pub fn start_with(options: MosquittoOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for mosquitto");
        let mut failures = Vec::new();
        for _ in 0..5 {
            let port = free_port();
            let plain_port = if options.tls.is_some() || options.websockets {
                free_port()
            } else {
                port
            };
            match Self::try_spawn(dir.path(), port, plain_port, &options) {
                Ok(child) => {
                    return Self {
                        child,
                        port,
                        plain_port,
                        dir,
                        options,
                    };
                }
                Err(e) => failures.push(e),
            }
        }
        let log = std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default();
        panic!("mosquitto did not start: {failures:?}; its log:\n{log}");
    }

    fn spawn(dir: &Path, port: u16, plain_port: u16, options: &MosquittoOptions) -> Child {
        let mut child = Self::spawn_unchecked(dir, port, plain_port, options);
        wait_for_port(port, "mosquitto", &mut child);
        wait_for_port(plain_port, "mosquitto", &mut child);
        child
    }

    /// Writes the configuration and starts Mosquitto, without waiting for it to listen.
    fn spawn_unchecked(
        dir: &Path,
        port: u16,
        plain_port: u16,
        options: &MosquittoOptions,
    ) -> Child {
        let binary = find_executable(
            "mosquitto",
            &[PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")],
            MOSQUITTO_INSTALL,
        );
        let conf = dir.join("mosquitto.conf");
        // Run as root: Mosquitto started as root otherwise switches to `mosquitto`, which
        // cannot read files in a private temp dir.
        let mut text = format!(
            "listener {port} 127.0.0.1\nuser root\npersistence false\n\
             log_dest file {log}\nmax_queued_messages 10000000\n",
            log = dir.join("mosquitto.log").display()
        );
        if options.websockets {
            text.push_str("protocol websockets\n");
        }
        if let Some(inflight) = options.max_inflight {
            text.push_str(&format!("max_inflight_messages {inflight}\n"));
        }
        if let Some(tls) = &options.tls {
            text.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n\
                 listener {plain_port} 127.0.0.1\n",
                tls.ca_file.display(),
                tls.cert_file.display(),
                tls.key_file.display(),
                tls.require_certificate
            ));
        }
        if options.websockets && options.tls.is_none() {
            text.push_str(&format!("listener {plain_port} 127.0.0.1\n"));
        }
        match &options.user {
            Some((user, password)) => {
                let passwords = dir.join("passwords");
                let status = Command::new("mosquitto_passwd")
                    .args(["-c", "-b"])
                    .arg(&passwords)
                    .args([user, password])
                    .status()
                    .unwrap_or_else(|e| panic!("mosquitto_passwd: {e}: {MOSQUITTO_INSTALL}"));
                assert!(status.success(), "mosquitto_passwd failed");
                text.push_str(&format!(
                    "allow_anonymous false\npassword_file {}\n",
                    passwords.display()
                ));
            }
            None => text.push_str("allow_anonymous true\n"),
        }
        if let Some(acl) = &options.acl {
            let file = dir.join("acl");
            std::fs::write(&file, acl).expect("write the ACL file");
            text.push_str(&format!("acl_file {}\n", file.display()));
        }
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto")
    }

    /// [`Mosquitto::spawn`], with an error instead of a panic when it does not listen.
    fn try_spawn(
        dir: &Path,
        port: u16,
        plain_port: u16,
        options: &MosquittoOptions,
    ) -> Result<Child, String> {
        let mut child = Self::spawn_unchecked(dir, port, plain_port, options);
        let listens = listening(port, "mosquitto", &mut child)
            .and_then(|()| listening(plain_port, "mosquitto", &mut child));
        match listens {
            Ok(()) => Ok(child),
            Err(e) => {
                kill(&mut child);
                Err(e)
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A plain TCP port for test publishers (the same as [`Mosquitto::port`] without TLS).
    pub fn plain_port(&self) -> u16 {
        self.plain_port
    }

    /// Kills the broker and starts a fresh one on the same port (its sessions are gone).
    pub fn restart(&mut self) {
        kill(&mut self.child);
        self.child = Self::spawn(self.dir.path(), self.port, self.plain_port, &self.options);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A tansu Kafka-protocol broker with in-memory storage (it forgets everything when stopped).
pub struct Tansu {
    child: Child,
    port: u16,
    /// The port clients are told to use, when it is not `port` (a proxy's).
    advertised_port: Option<u16>,
    /// Its output; a failing test prints the warnings and errors in it.
    log: tempfile::NamedTempFile,
}

impl Tansu {
    pub fn start() -> Self {
        Self::start_advertising(None)
    }

    /// Starts tansu behind a [`crate::FaultProxy`] that clients reach it through: tansu
    /// advertises the proxy's address, so every connection, not just the first, goes through it.
    pub async fn start_behind_proxy() -> (Self, crate::FaultProxy) {
        let proxy_port = free_port();
        let tansu = Self::start_advertising(Some(proxy_port));
        let upstream = SocketAddr::from(([127, 0, 0, 1], tansu.port));
        let proxy = crate::FaultProxy::start(proxy_port, upstream).await;
        (tansu, proxy)
    }

    /// Kills the broker and starts an empty one on the same port: a broker replaced by a new
    /// one without the old one's topics.
    pub fn replace_with_empty(&mut self) {
        kill(&mut self.child);
        self.child = Self::spawn(self.port, self.advertised_port, &self.log);
    }

    fn start_advertising(advertised_port: Option<u16>) -> Self {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().expect("tansu log file");
        Self {
            child: Self::spawn(port, advertised_port, &log),
            port,
            advertised_port,
            log,
        }
    }

    fn spawn(port: u16, advertised_port: Option<u16>, log: &tempfile::NamedTempFile) -> Child {
        let cargo_bin = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|home| home.join("bin"))
            .into_iter()
            .collect::<Vec<_>>();
        let binary = find_executable("tansu", &cargo_bin, TANSU_INSTALL);
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{}", advertised_port.unwrap_or(port));
        let mut child = Command::new(binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            // Its default is errors only; a refused produce request is a warning.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(append(log))
            .stderr(append(log))
            .spawn()
            .expect("spawn tansu");
        wait_for_port(port, "tansu", &mut child);
        child
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `bootstrap.servers` for this broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        kill(&mut self.child);
        if std::thread::panicking() {
            let text = std::fs::read_to_string(self.log.path()).unwrap_or_default();
            let notable = text
                .lines()
                .filter(|line| line.contains("WARN") || line.contains("ERROR"));
            let what = format!("tansu (pid {}) warnings and errors", self.child.id());
            crate::process::print_tail(&what, notable, TANSU_LOG_LINES);
        }
    }
}

/// `log` opened for appending: output of both streams and of a restarted broker is kept.
fn append(log: &tempfile::NamedTempFile) -> std::fs::File {
    std::fs::OpenOptions::new()
        .append(true)
        .open(log.path())
        .expect("tansu log file")
}

/// How many of tansu's warning and error lines a failing test prints.
const TANSU_LOG_LINES: usize = 40;
