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

/// The two required variables, plus `extra`.
fn with_required<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![("MQTT_TOPIC", "a/#"), ("KAFKA_TOPIC", "t")];
    env.extend_from_slice(extra);
    env
}

#[test]
fn every_bad_value_exits_64_with_one_line_naming_the_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let missing = dir.path().join("missing.pem");
    let a_directory = dir.path().display().to_string();
    let (garbage, missing) = (garbage.display().to_string(), missing.display().to_string());
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (with_required(&[("LOG_LEVEL", "chatty")]), "LOG_LEVEL"),
        (with_required(&[("LOG_FORMAT", "xml")]), "LOG_FORMAT"),
        (with_required(&[("MQTT_PORT", "eighteen")]), "MQTT_PORT"),
        (with_required(&[("MQTT_PORT", "0")]), "MQTT_PORT"),
        (
            with_required(&[("MQTT_TRANSPORT", "udp")]),
            "MQTT_TRANSPORT",
        ),
        (with_required(&[("MQTT_WS_PATH", "mqtt")]), "MQTT_WS_PATH"),
        (with_required(&[("KAFKA_PORT", "65536")]), "KAFKA_PORT"),
        (with_required(&[("HEALTH_PORT", "-1")]), "HEALTH_PORT"),
        (with_required(&[("ROOT_CA", &missing)]), "ROOT_CA"),
        (with_required(&[("ROOT_CA", &garbage)]), "ROOT_CA"),
        (with_required(&[("ROOT_CA", &a_directory)]), "ROOT_CA"),
        (
            with_required(&[
                ("MQTT_TLS", "true"),
                ("MQTT_CLIENT_CERT", &missing),
                ("MQTT_CLIENT_KEY", &garbage),
            ]),
            "MQTT_CLIENT_CERT",
        ),
        (
            with_required(&[("MQTT_TLS", "false"), ("ROOT_CA", &garbage)]),
            "MQTT_TLS",
        ),
        (vec![("KAFKA_TOPIC", "t")], "MQTT_TOPIC"),
        (vec![("MQTT_TOPIC", "a/#")], "KAFKA_TOPIC"),
        (with_required(&[("MQTT_TOPIC", ",")]), "MQTT_TOPIC"),
        (with_required(&[("MQTT_TOPIC", "a/#/b")]), "MQTT_TOPIC"),
        (with_required(&[("MQTT_QOS", "3")]), "MQTT_QOS"),
        (with_required(&[("MQTT_VERSION", "4.0")]), "MQTT_VERSION"),
        (
            with_required(&[("KAFKA_BATCH_SIZE", "0")]),
            "KAFKA_BATCH_SIZE",
        ),
        (
            with_required(&[("KAFKA_INTERVAL", "5 parsecs")]),
            "KAFKA_INTERVAL",
        ),
        (
            with_required(&[("KAFKA_RETRY_INTERVAL", "0")]),
            "KAFKA_RETRY_INTERVAL",
        ),
        (
            with_required(&[("MQTT_PASSWORD", "hunter2")]),
            "MQTT_USERNAME",
        ),
        (
            with_required(&[("KAFKA_PROPERTY_NO_SUCH_THING", "1")]),
            "KAFKA_PROPERTY_NO_SUCH_THING",
        ),
        (
            with_required(&[("KAFKA_PROPERTY_LINGER_MS", "soon")]),
            "KAFKA_PROPERTY_LINGER_MS",
        ),
        (
            with_required(&[("KAFKA_DLQ_TOPIC", "t")]),
            "KAFKA_DLQ_TOPIC",
        ),
        (
            with_required(&[("KAFKA_DLQ_TOPIC", "dead/letters")]),
            "KAFKA_DLQ_TOPIC",
        ),
        (
            with_required(&[("KAFKA_TOPIC_MAP", "cars/#")]),
            "invalid KAFKA_TOPIC_MAP=\"cars/#\": expected rules SOURCE=TARGET",
        ),
        (
            with_required(&[("KAFKA_TOPIC_MAP", "re:cars/(=x")]),
            "KAFKA_TOPIC_MAP",
        ),
        (
            with_required(&[("KAFKA_TOPIC_MAP", "a/{x}=t.{y}")]),
            "the source does not name",
        ),
        (
            with_required(&[("KAFKA_TOPIC_MAP_FILE", &missing)]),
            "KAFKA_TOPIC_MAP_FILE",
        ),
        (with_required(&[("KAFKA_KEY", "{vin}")]), "KAFKA_KEY"),
        (
            with_required(&[("KAFKA_HEADERS", "color")]),
            "KAFKA_HEADERS",
        ),
        (
            with_required(&[("KAFKA_VALUE_FORMAT", "xml")]),
            "KAFKA_VALUE_FORMAT",
        ),
        (
            with_required(&[("KAFKA_TOPIC_SEPARATOR", "/")]),
            "KAFKA_TOPIC_SEPARATOR",
        ),
        (
            with_required(&[("DOWNLINK_KAFKA_TOPICS", "a,b/c")]),
            "DOWNLINK_KAFKA_TOPICS",
        ),
        (
            with_required(&[("DOWNLINK_OFFSET_RESET", "oldest")]),
            "DOWNLINK_OFFSET_RESET",
        ),
        (
            with_required(&[("DOWNLINK_MQTT_TOPIC", "cars/{vin}")]),
            "DOWNLINK_MQTT_TOPIC",
        ),
        (
            with_required(&[("DOWNLINK_VALUE_FORMAT", "xml")]),
            "DOWNLINK_VALUE_FORMAT",
        ),
        (with_required(&[("DOWNLINK_QOS", "3")]), "DOWNLINK_QOS"),
        (
            with_required(&[("DOWNLINK_RETAIN", "sometimes")]),
            "DOWNLINK_RETAIN",
        ),
        (
            vec![
                ("KAFKA_TOPIC", "t"),
                ("MQTT_TOPIC", "cars/#"),
                ("DOWNLINK_KAFKA_TOPICS", "commands"),
                ("DOWNLINK_MQTT_TOPIC", "cars/{key}/commands"),
            ],
            "invalid DOWNLINK_MQTT_TOPIC=\"cars/{key}/commands\": expected topics the uplink's \
             MQTT_TOPIC does not subscribe to (cars/# can match them",
        ),
    ];
    for (env, variable) in &cases {
        let output = bridge(env, &[]);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(64), "{env:?}: {message}");
        assert_eq!(message.lines().count(), 1, "{env:?}: {message}");
        assert!(message.contains(variable), "{env:?}: {message}");
        assert!(!message.contains("hunter2"), "a password leaked: {message}");
    }
}

#[test]
fn check_config_prints_the_effective_values_with_secrets_hidden() {
    let output = bridge(
        &with_required(&[
            ("MQTT_USERNAME", "bridge"),
            ("MQTT_PASSWORD", "hunter2"),
            ("KAFKA_PROPERTY_SASL_PASSWORD", "kafka-secret"),
            ("KAFKA_PROPERTY_SASL_USERNAME", "edge"),
            ("MQTT_CLIENT_ID", "bridge-%h"),
        ]),
        &["--check-config"],
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(text.contains("\nMQTT_PASSWORD=***\n"), "{text}");
    assert!(
        text.contains("\nKAFKA_PROPERTY_SASL_PASSWORD=***\n"),
        "{text}"
    );
    assert!(
        text.contains("\nKAFKA_PROPERTY_SASL_USERNAME=edge\n"),
        "{text}"
    );
    assert!(text.contains("\nMQTT_USERNAME=bridge\n"), "{text}");
    assert!(
        text.contains("\nKAFKA_BATCH_SIZE=1000\n"),
        "defaults are shown: {text}"
    );
    assert!(
        !text.contains("hunter2") && !text.contains("kafka-secret"),
        "{text}"
    );
    let invalid = bridge(&with_required(&[("MQTT_QOS", "7")]), &["--check-config"]);
    assert_eq!(invalid.status.code(), Some(64));
}

#[test]
fn json_logs_are_one_object_per_line_on_stdout_and_stderr() {
    let closed_port = closed_port();
    let output = bridge(
        &with_required(&[
            ("LOG_FORMAT", "json"),
            ("KAFKA_BROKER", "127.0.0.1"),
            ("KAFKA_PORT", &closed_port),
            ("KAFKA_TEST_TOPIC", "probe"),
            ("KAFKA_STARTUP_TIMEOUT", "1s"),
            ("HEALTH_PORT", "0"),
            ("HEALTH_ADDR", "127.0.0.1"),
        ]),
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let levels = |stream: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(stream)
            .lines()
            .map(|line| {
                let object: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                object["level"].as_str().expect("a level field").to_owned()
            })
            .collect()
    };
    let stdout = levels(&output.stdout);
    let stderr = levels(&output.stderr);
    assert!(stdout.iter().any(|l| l == "INFO"), "{stdout:?}");
    assert!(
        stdout
            .iter()
            .all(|l| l == "INFO" || l == "DEBUG" || l == "TRACE"),
        "{stdout:?}"
    );
    assert!(stderr.iter().any(|l| l == "ERROR"), "{stderr:?}");
    assert!(
        stderr.iter().all(|l| l == "WARN" || l == "ERROR"),
        "{stderr:?}"
    );
}

fn closed_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
        .to_string()
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
        if !variable.name.ends_with('*') {
            let flag = format!("--{}", mqtt_kafka_bridge::config::flag_name(variable.name));
            assert!(text.contains(&flag), "--help lacks {flag}");
        }
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
    let closed_port = closed_port();
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

/// Runs the `openssl` command line in `dir`.
fn openssl(dir: &std::path::Path, args: &str) {
    let output = Command::new("openssl")
        .args(args.split(' '))
        .current_dir(dir)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Certificates and keys made with the `openssl` command line, as Mosquitto's documentation
/// shows: a v1 client certificate passes; an expired certificate, a key of another
/// certificate, an encrypted key without its password or with a wrong one each stop the start
/// with one line naming the variable to fix.
#[test]
fn certificate_problems_name_the_variable_to_fix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    openssl(
        d,
        "req -new -x509 -days 30 -nodes -subj /CN=ca -keyout ca.key -out ca.crt",
    );
    openssl(d, "genrsa -out client.key 2048");
    openssl(
        d,
        "req -new -key client.key -subj /CN=bridge -out client.csr",
    );
    let sign = "x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial";
    openssl(d, &format!("{sign} -days 30 -out client.crt"));
    openssl(d, &format!("{sign} -days -1 -out expired.crt"));
    openssl(d, "genrsa -out other.key 2048");
    openssl(
        d,
        "pkcs8 -topk8 -v2 aes-256-cbc -in client.key -passout pass:right -out locked.key",
    );
    let path = |name: &str| d.join(name).display().to_string();
    let (ca, cert, key) = (path("ca.crt"), path("client.crt"), path("client.key"));
    let (expired, other, locked) = (path("expired.crt"), path("other.key"), path("locked.key"));
    let files = |cert: &str, key: &str| -> Vec<(&'static str, String)> {
        vec![
            ("MQTT_TOPIC", "a/#".to_owned()),
            ("KAFKA_TOPIC", "t".to_owned()),
            ("ROOT_CA", ca.clone()),
            ("MQTT_CLIENT_CERT", cert.to_owned()),
            ("MQTT_CLIENT_KEY", key.to_owned()),
        ]
    };
    let run = |env: &[(&'static str, String)]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        bridge(&env, &["--check-config"])
    };
    let good = run(&files(&cert, &key));
    assert!(good.status.success(), "v1 certificate: {}", stderr(&good));
    let mut with_password = files(&cert, &locked);
    with_password.push(("MQTT_CLIENT_KEY_PASSWORD", "right".to_owned()));
    let unlocked = run(&with_password);
    assert!(unlocked.status.success(), "{}", stderr(&unlocked));
    let mut wrong_password = files(&cert, &locked);
    wrong_password.push(("MQTT_CLIENT_KEY_PASSWORD", "hunter2".to_owned()));
    let cases = [
        (files(&expired, &key), "MQTT_CLIENT_CERT=", "expired on"),
        (files(&cert, &other), "MQTT_CLIENT_KEY=", "does not belong"),
        (
            files(&cert, &locked),
            "MQTT_CLIENT_KEY=",
            "set MQTT_CLIENT_KEY_PASSWORD",
        ),
        (
            wrong_password,
            "MQTT_CLIENT_KEY_PASSWORD=",
            "does not decrypt",
        ),
    ];
    for (env, variable, reason) in &cases {
        let output = run(env);
        let message = stderr(&output);
        eprintln!("{message}");
        assert_eq!(output.status.code(), Some(64), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(
            message.contains(&format!("invalid {variable}")),
            "{message}"
        );
        assert!(message.contains(reason), "{message}");
        assert!(!message.contains("hunter2"), "a password leaked: {message}");
    }
}

/// Metamorphosis is configured by flags as well as by the environment; its command lines start
/// this bridge unchanged, and a flag wins over the environment.
#[test]
fn a_metamorphosis_command_line_is_taken_and_flags_win_over_the_environment() {
    let line = [
        "-log-level",
        "debug",
        "-mqtt-broker",
        "broker.local",
        "-mqtt-port",
        "1884",
        "-mqtt-topic",
        "test/#",
        "-mqtt-tls=false",
        "-kafka-broker",
        "redpanda",
        "-kakfa-port",
        "19092",
        "-kafka-topic",
        "mqtt",
        "--kafka-batch-size",
        "500",
        "--health-port=9000",
        "-kafka-workers",
        "2",
        "--check-config",
    ];
    let output = bridge(&[("KAFKA_TOPIC", "from-env"), ("HEALTH_PORT", "1")], &line);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    for expected in [
        "\nLOG_LEVEL=debug\n",
        "\nMQTT_BROKER=broker.local\n",
        "\nMQTT_PORT=1884\n",
        "\nMQTT_TLS=false\n",
        "\nKAFKA_PORT=19092\n",
        "\nKAFKA_TOPIC=mqtt\n",
        "\nKAFKA_BATCH_SIZE=500\n",
        "\nHEALTH_PORT=9000\n",
        "# Kafka brokers: redpanda:19092\n",
    ] {
        assert!(text.contains(expected), "lacks {expected:?}: {text}");
    }
    let unknown = bridge(&with_required(&[]), &["-mqtt-brokr", "x"]);
    assert_eq!(unknown.status.code(), Some(64));
    assert!(stderr(&unknown).contains("unknown argument \"-mqtt-brokr\""));
}

/// `--route` explains with the real configuration what a topic becomes, and connects to nothing
/// (the brokers named here do not exist).
#[test]
fn route_explains_what_a_topic_becomes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, br#"{"device":"press-3"}"#).expect("write");
    let payload = payload.display().to_string();
    let env = [
        ("MQTT_BROKER", "mqtt.invalid"),
        ("KAFKA_BROKER", "kafka.invalid"),
        ("MQTT_TOPIC", "cars/#"),
        ("KAFKA_TOPIC_MAP", "cars/{vin}/#=cs.uplink"),
        ("KAFKA_KEY", "{vin}"),
        ("KAFKA_HEADERS", "topic,qos"),
        ("KAFKA_VALUE_FORMAT", "raw"),
    ];
    let output = bridge(
        &env,
        &["--route", "cars/VIN123/telemetry", "--payload", &payload],
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        text,
        "MQTT topic:  cars/VIN123/telemetry\n\
         rule:        cars/{vin}/#=cs.uplink\n\
         Kafka topic: cs.uplink\n\
         key:         VIN123\n\
         headers:     mqtt.topic=cars/VIN123/telemetry\n\
         \x20            mqtt.qos=1\n\
         value:       {\"device\":\"press-3\"}\n"
    );
    let unmatched = bridge(&env, &["--route", "trucks/1"]);
    let text = String::from_utf8_lossy(&unmatched.stdout);
    assert!(text.contains("rule:        none\n"), "{text}");
    assert!(
        text.contains("Kafka topic: none: no rule matches"),
        "{text}"
    );
}

/// `healthcheck` (a container's HEALTHCHECK) needs only HEALTH_ADDR and HEALTH_PORT: with no
/// bridge listening it exits 1 with one line saying so, whatever else is unset; a bad port is
/// a configuration error.
#[test]
fn healthcheck_without_a_bridge_exits_1_and_says_why() {
    let port = closed_port();
    let output = bridge(&[("HEALTH_PORT", &port)], &["healthcheck"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:{port}"))
            && message.contains("is the bridge running?"),
        "{message}"
    );
    let bad = bridge(&[("HEALTH_PORT", "none")], &["healthcheck"]);
    assert_eq!(bad.status.code(), Some(64), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("HEALTH_PORT"), "{}", stderr(&bad));
}
