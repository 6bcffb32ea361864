//! The binary's contract with operators: exit statuses, one-line errors, --help and --version.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bridge(env: &[(&str, &str)], args: &[&str]) -> Output {
    let empty_dir = tempfile::tempdir().expect("temp dir");
    Command::new(env!("CARGO_BIN_EXE_mqtt-kafka-bridge"))
        .args(args)
        // A clean environment and working directory: no stray variables or .env file.
        .env_clear()
        .current_dir(empty_dir.path())
        .envs(env.iter().copied())
        .output()
        .expect("run the bridge binary")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_configuration_exits_64_with_one_line_naming_the_variable() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("MQTT_TOPIC", "a/#"),
                ("KAFKA_TOPIC", "t"),
                ("MQTT_PORT", "eighteen"),
            ],
            "MQTT_PORT",
        ),
        (
            &[
                ("MQTT_TOPIC", "a/#"),
                ("KAFKA_TOPIC", "t"),
                ("LOG_LEVEL", "chatty"),
            ],
            "LOG_LEVEL",
        ),
        (&[("KAFKA_TOPIC", "t")], "MQTT_TOPIC"),
        (
            &[
                ("MQTT_TOPIC", "a/#"),
                ("KAFKA_TOPIC", "t"),
                ("KAFKA_INTERVAL", "5 parsecs"),
            ],
            "KAFKA_INTERVAL",
        ),
    ];
    for (env, variable) in cases {
        let output = bridge(env, &[]);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(64), "{env:?}: {message}");
        assert_eq!(message.lines().count(), 1, "{env:?}: {message}");
        assert!(message.contains(variable), "{env:?}: {message}");
    }
}

#[test]
fn missing_env_file_exits_64() {
    let output = bridge(&[], &["--env-file", "/nonexistent/bridge.env"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(stderr(&output).contains("/nonexistent/bridge.env"));
}

#[test]
fn help_lists_every_variable_and_version_prints_the_version() {
    let help = bridge(&[], &["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for variable in mqtt_kafka_bridge::config::VARIABLES {
        assert!(
            text.contains(variable.name),
            "--help lacks {}",
            variable.name
        );
    }
    let version = bridge(&[], &["--version"]);
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("mqtt-kafka-bridge {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn failed_start_up_probe_exits_non_zero_within_seconds() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
        .to_string();
    let started = Instant::now();
    let output = bridge(
        &[
            ("MQTT_TOPIC", "a/#"),
            ("KAFKA_TOPIC", "t"),
            ("KAFKA_BROKER", "127.0.0.1"),
            ("KAFKA_PORT", &closed_port),
            ("KAFKA_TEST_TOPIC", "probe"),
            ("KAFKA_STARTUP_TIMEOUT", "2s"),
            ("HEALTH_PORT", "0"),
            ("HEALTH_ADDR", "127.0.0.1"),
        ],
        &[],
    );
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(stderr(&output).contains("Kafka"), "{}", stderr(&output));
}
