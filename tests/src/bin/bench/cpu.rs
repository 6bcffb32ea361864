//! `--cpu`: the bridge's instructions per message, counted by callgrind.
//!
//! Seconds of CPU move with whatever else the shared machine does; instructions do not. The
//! bridge runs under `valgrind --tool=callgrind`; its counters are zeroed just before the
//! first publish and dumped once the last record was read back from Kafka, so the count
//! covers the load and nothing of start-up or shutdown: every thread of the bridge
//! (librdkafka's included), the idle moments between messages included. The dump stays on
//! disk for `callgrind_annotate`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mkb_tests::process::cpu_time;
use tokio::time::Instant;

/// How long callgrind may take to write a dump.
const DUMP_DEADLINE: Duration = Duration::from_secs(120);

/// A directory for callgrind's output, and the commands that drive it.
pub struct Callgrind {
    dir: PathBuf,
}

impl Callgrind {
    /// Checks that valgrind is installed and makes a fresh output directory.
    pub fn new() -> Result<Self, String> {
        for tool in ["valgrind", "callgrind_control"] {
            let found = Command::new(tool).arg("--version").output();
            if found.is_err() {
                return Err(format!(
                    "--cpu needs {tool}: install it with `apt-get install valgrind`"
                ));
            }
        }
        let dir = std::env::temp_dir().join(format!("mkb-bench-callgrind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self { dir })
    }

    /// The wrapper that runs the bridge under callgrind.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            format!("--callgrind-out-file={}", self.out_file().display()),
        ]
    }

    fn out_file(&self) -> PathBuf {
        self.dir.join("callgrind.out")
    }

    /// Starts counting from zero.
    pub fn zero(&self, pid: u32) {
        control(pid, "--zero");
    }

    /// Dumps the counters and returns the instructions counted since [`Self::zero`], with the
    /// dump's path.
    pub async fn instructions(&self, pid: u32) -> (u64, PathBuf) {
        control(pid, "--dump=load");
        // The first dump is `callgrind.out.1`; the file is complete once its totals are in.
        let dump = PathBuf::from(format!("{}.1", self.out_file().display()));
        let deadline = Instant::now() + DUMP_DEADLINE;
        loop {
            if let Some(count) = totals(&dump) {
                return (count, dump);
            }
            assert!(
                Instant::now() < deadline,
                "callgrind wrote no dump at {} within {DUMP_DEADLINE:?}",
                dump.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn control(pid: u32, command: &str) {
    let output = Command::new("callgrind_control")
        .args([command, &pid.to_string()])
        .output()
        .expect("run callgrind_control");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && said.contains("OK"),
        "callgrind_control {command} {pid} failed: {said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The instruction count on a dump's `totals:` line, once the dump is complete.
fn totals(dump: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dump).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("totals:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The parts of the bridge the split reports: a label, and the function whose inclusive count
/// (everything it and its callees ran) measures it. Nested parts are indented.
const PARTS: [(&str, &str); 8] = [
    (
        "MQTT task",
        "mkb_mqtt::source::MqttSource::run::{{closure}}",
    ),
    (
        "  of which rumqttc's event loop",
        // rumqttc::eventloop (MQTT 3.1.1) or rumqttc::v5::eventloop.
        "eventloop::EventLoop::poll::{{closure}}",
    ),
    ("batcher", "mkb_bridge::batcher::Batcher::run::{{closure}}"),
    ("  of which the envelope", "mkb_bridge::envelope::encode"),
    ("Kafka task", "mkb_kafka::sink::KafkaSink::run::{{closure}}"),
    (
        "  of which handing records to librdkafka",
        "BaseProducer<C,Part>::send",
    ),
    ("librdkafka's broker threads", "rd_kafka_broker_thread_main"),
    (
        "delivery reports (rdkafka's polling thread)",
        "BaseProducer<C,Part>::poll",
    ),
];

/// Instructions per message of each of [`PARTS`], from `callgrind_annotate --inclusive=yes`;
/// `None` when callgrind_annotate cannot read the dump.
pub fn split(dump: &Path, messages: u64) -> Option<String> {
    let output = Command::new("callgrind_annotate")
        .args(["--auto=no", "--threshold=100", "--inclusive=yes"])
        .arg(dump)
        .output()
        .ok()?;
    let listing = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<String> = PARTS
        .iter()
        .map(|(label, function)| {
            count_in(&listing, function).map_or(format!("{label}: not found"), |count| {
                format!("{label}: {:.0}", count as f64 / messages.max(1) as f64)
            })
        })
        .collect();
    output.status.success().then(|| lines.join("\n  "))
}

/// The inclusive count of `function` (its full path, or its path's tail after a `::`) in a
/// `callgrind_annotate` listing. Lines are "  1,234 (12.34%)  file:function [object]", largest
/// first, so a function's first line is its total (later ones are parts inlined from other
/// files).
fn count_in(listing: &str, function: &str) -> Option<u64> {
    let tail = format!("::{function}");
    listing.lines().find_map(|line| {
        let (count, rest) = line.trim_start().split_once(' ')?;
        let name = rest.split_once(':')?.1;
        let name = name.split_once(" [").map_or(name, |(name, _)| name);
        if name == function || name.ends_with(&tail) {
            count.replace(',', "").parse().ok()
        } else {
            None
        }
    })
}

/// The CPU time of the programs that share the machine during a run, from /proc: where the
/// cores went, per message. On a saturated machine the rate is the cores over the sum.
pub struct Budget {
    programs: Vec<(&'static str, u32, Duration)>,
    started: Instant,
}

impl Budget {
    /// Takes each program's CPU time so far, at the start of the load.
    pub fn start(programs: &[(&'static str, u32)]) -> Self {
        Self {
            programs: programs
                .iter()
                .map(|&(name, pid)| (name, pid, cpu_time(pid).unwrap_or_default()))
                .collect(),
            started: Instant::now(),
        }
    }

    /// Each program's CPU µs per message since [`Self::start`], the sum, and how many of the
    /// machine's cores were busy with them on average.
    pub fn report(&self, messages: u64) -> String {
        let seconds = self.started.elapsed().as_secs_f64();
        let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / messages.max(1) as f64;
        let mut total = Duration::ZERO;
        let mut parts = Vec::new();
        for &(name, pid, before) in &self.programs {
            let used = cpu_time(pid).unwrap_or_default().saturating_sub(before);
            total += used;
            parts.push(format!("{name} {:.2}", per_message(used)));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!(
            "{}; {:.2} in all, {:.2} of {cores} cores busy over {seconds:.1} s",
            parts.join(", "),
            per_message(total),
            total.as_secs_f64() / seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\
--------------------------------------------------------------------------------
Ir                    file:function
--------------------------------------------------------------------------------
886,363,594 (100.0%)  PROGRAM TOTALS
272,939,170 (30.79%)  /work/main/mqtt/src/source.rs:mkb_mqtt::source::MqttSource::run::{{closure}} [/x/bridge]
188,001,280 (21.21%)  /r/base_producer.rs:rdkafka::producer::base_producer::BaseProducer<C,Part>::send [/x/bridge]
164,893,604 (18.60%)  /r/rumqttc-0.25.1/src/v5/eventloop.rs:rumqttc::v5::eventloop::EventLoop::poll::{{closure}} [/x/bridge]
139,817,852 (15.77%)  /b/rdkafka_broker.c:rd_kafka_broker_thread_main [/x/bridge]
  6,600,000 ( 0.74%)  /rustc/alloc/src/ffi/c_str.rs:rdkafka::producer::base_producer::BaseProducer<C,Part>::send
  5,232,204 ( 0.58%)  /r/select.rs:<mkb_mqtt::source::MqttSource as Foo>::run::{{closure}}
";

    #[test]
    fn a_parts_count_is_its_first_and_largest_line() {
        let count = |function| count_in(LISTING, function);
        assert_eq!(count(PARTS[0].1), Some(272_939_170));
        assert_eq!(count("BaseProducer<C,Part>::send"), Some(188_001_280));
        assert_eq!(
            count(PARTS[1].1),
            Some(164_893_604),
            "rumqttc's v5 event loop"
        );
        assert_eq!(count("rd_kafka_broker_thread_main"), Some(139_817_852));
        assert_eq!(count("mkb_bridge::envelope::encode"), None);
        assert_eq!(count("thread_main"), None, "a name's tail only after ::");
    }
}
