//! The bridge as a separate process, for what only a process shows: signals, exit statuses,
//! log output, and kill -9 crashes.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Builds the bridge binary once per run (a no-op when it is up to date), in the profile this
/// code was built in (release for the benchmark), and returns it. `MKB_BRIDGE_BINARY` names
/// another binary instead (the static one of the container image, to compare).
pub fn bridge_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(binary) = std::env::var_os("MKB_BRIDGE_BINARY") {
                return PathBuf::from(binary);
            }
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "--quiet", "-p", "mqtt-kafka-bridge"]);
            build.args(["--bin", "mqtt-kafka-bridge"]);
            if !cfg!(debug_assertions) {
                build.arg("--release");
            }
            let status = build
                .status()
                .expect("run cargo build for the bridge binary");
            assert!(status.success(), "cargo build of the bridge failed");
            // Tests live in target/<profile>/deps/, binaries in target/<profile>/.
            let exe = std::env::current_exe().expect("own executable path");
            let mut dir = exe.parent().expect("executable in a directory");
            if dir.ends_with("deps") {
                dir = dir.parent().expect("deps has a parent");
            }
            dir.join("mqtt-kafka-bridge")
        })
        .clone()
}

/// A bridge process with its output captured to files.
pub struct BridgeProcess {
    child: Child,
    dir: tempfile::TempDir,
    pub health_addr: std::net::SocketAddr,
}

impl BridgeProcess {
    /// Starts the binary with exactly `env` (nothing inherited but PATH), in an empty working
    /// directory, serving HTTP on a fresh port.
    pub fn start(env: &[(String, String)]) -> Self {
        // MKB_BRIDGE_WRAPPER runs the bridge under a profiler, e.g. `heaptrack` or `perf record`.
        let wrapper = std::env::var("MKB_BRIDGE_WRAPPER").unwrap_or_default();
        let wrapper: Vec<String> = wrapper.split_whitespace().map(str::to_owned).collect();
        Self::start_under(env, &wrapper)
    }

    /// [`Self::start`] with the binary run by `wrapper` (a program and its arguments, the
    /// bridge's path appended), or directly when it is empty.
    pub fn start_under(env: &[(String, String)], wrapper: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the bridge");
        let port = crate::servers::free_port();
        let stdout = std::fs::File::create(dir.path().join("stdout")).expect("stdout file");
        let stderr = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let binary = bridge_binary();
        let mut words = wrapper.iter();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(words).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("HEALTH_ADDR", "127.0.0.1")
            .env("HEALTH_PORT", port.to_string())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the bridge {}: {e}", binary.display()));
        Self {
            child,
            dir,
            health_addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory (VmHWM) in bytes and CPU time used, from /proc.
    pub fn resources(&self) -> Option<(u64, Duration)> {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let peak_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some((peak_kib * 1024, cpu_time(pid)?))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, failing the test after `deadline`.
    pub fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let give_up = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the bridge process") {
                return status;
            }
            assert!(
                Instant::now() < give_up,
                "bridge did not exit within {deadline:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// One metric's value (summed over labels), `None` while the HTTP server is not up.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        Some(crate::metric_value(&self.metrics().await?, name))
    }

    /// The metrics page, `None` while the HTTP server is not up.
    pub async fn metrics(&self) -> Option<String> {
        let stream = tokio::net::TcpStream::connect(self.health_addr)
            .await
            .ok()?;
        drop(stream);
        Some(crate::http_get(self.health_addr, "/metrics").await)
    }

    /// Waits until `count` messages were received and every one is in the spool and
    /// acknowledged: from then on the spool is the only place that holds them.
    pub async fn wait_all_spooled(&self, count: u64) {
        let what = format!("{count} messages spooled and acknowledged");
        crate::eventually(Duration::from_secs(60), &what, || async {
            let received = self.metric("bridge_mqtt_messages_received_total").await?;
            let spooled = self.metric("bridge_spool_records").await?;
            let awaiting = self.metric("bridge_mqtt_messages_awaiting_ack").await?;
            let count = count as f64;
            (received >= count && spooled >= count && awaiting == 0.0).then_some(())
        })
        .await;
    }

    /// Waits until the process holds its MQTT subscription.
    pub async fn wait_subscribed(&self) {
        crate::eventually(
            Duration::from_secs(30),
            "the bridge process subscribed",
            || async { (self.metric("bridge_mqtt_subscribed").await == Some(1.0)).then_some(()) },
        )
        .await;
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.kill();
        // The log files go with the temp dir: a failing test shows the end of them first.
        // The log goes to stdout; stderr holds what is printed before logging starts.
        if std::thread::panicking() {
            for (name, text) in [("stdout", self.stdout()), ("stderr", self.stderr())] {
                let what = format!("bridge (pid {}) {name}", self.pid());
                print_tail(&what, text.lines(), LOG_TAIL_LINES);
            }
        }
    }
}

/// How much of a bridge's log a failing test prints.
const LOG_TAIL_LINES: usize = 60;

/// Prints the last `keep` of `lines` to stderr under `what`: how a failing test shows a
/// server's log.
pub(crate) fn print_tail<'a>(what: &str, lines: impl Iterator<Item = &'a str>, keep: usize) {
    let lines: Vec<&str> = lines.collect();
    let tail = &lines[lines.len().saturating_sub(keep)..];
    eprintln!(
        "{what}, last {} of {} lines:\n{}",
        tail.len(),
        lines.len(),
        tail.join("\n")
    );
}

/// The CPU time (user and system, every thread) process `pid` has used so far, from /proc.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // The kernel reports CPU time in clock ticks of 1/100 s on Linux (USER_HZ).
    Some(Duration::from_millis(ticks * 10))
}
