//! Secure MQTT connections against a real Mosquitto: TLS with and without a client certificate,
//! a certificate from a CA the broker does not trust, certificates and keys made with the
//! `openssl` command line as Mosquitto's documentation shows, and user name / password.

use std::time::Duration;

use mkb_tests::certs::{KeyFormat, OpensslCa, TestCa};
use mkb_tests::{
    KafkaReader, ListenerTls, Mosquitto, MosquittoOptions, Publisher, RunningBridge, Tansu,
    bridge_config, eventually, http_get, init_logging, unique,
};
use rumqttc::QoS;

/// Starts a bridge with `overrides`, publishes one message through the broker's plain port and
/// checks that it reaches Kafka.
async fn bridges_one_message(
    mqtt: &Mosquitto,
    credentials: Option<(&str, &str)>,
    overrides: &[(&str, &str)],
) {
    let kafka = Tansu::start();
    let topic = format!("mqtt-{}", unique());
    let config = bridge_config(mqtt.port(), kafka.port(), &topic, "secure/#", overrides);
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    let publisher = Publisher::connect_as(mqtt.plain_port(), credentials).await;
    publisher
        .publish("secure/a", "over TLS", QoS::AtLeastOnce)
        .await;
    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    let received = reader.read_exactly(1, Duration::from_secs(30)).await;
    assert_eq!(received[0].payload, b"over TLS");
    bridge.stop().await.expect("clean stop");
}

/// Starts a bridge that cannot get in and returns `/readyz` once it names a reason, after
/// checking that the bridge keeps retrying.
async fn refusal_reason(mqtt: &Mosquitto, overrides: &[(&str, &str)]) -> String {
    let kafka = Tansu::start();
    let config = bridge_config(mqtt.port(), kafka.port(), "mqtt", "secure/#", overrides);
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    eventually(
        Duration::from_secs(30),
        "two refused connection attempts",
        || async { (bridge.metric("bridge_mqtt_reconnects_total").await >= 2.0).then_some(()) },
    )
    .await;
    let readyz = http_get(bridge.health_addr, "/readyz").await;
    assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
    eprintln!("/readyz: {}", readyz.lines().last().unwrap_or_default());
    assert_eq!(bridge.metric("bridge_mqtt_subscribed").await, 0.0);
    bridge.stop().await.expect("clean stop");
    readyz
}

fn tls_broker(dir: &std::path::Path, require_certificate: bool) -> (Mosquitto, TestCa) {
    mkb_tests::certs::tls_broker(dir, require_certificate, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_trusted_client_certificate_works() {
    init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mqtt, ca) = tls_broker(dir.path(), true);
    let client = ca.issue("client");
    let (ca_file, cert, key) = (
        ca.cert.display().to_string(),
        client.cert.display().to_string(),
        client.key.display().to_string(),
    );
    bridges_one_message(
        &mqtt,
        None,
        &[
            ("ROOT_CA", &ca_file),
            ("MQTT_CLIENT_CERT", &cert),
            ("MQTT_CLIENT_KEY", &key),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_a_client_certificate_works_where_none_is_required() {
    init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mqtt, ca) = tls_broker(dir.path(), false);
    let ca_file = ca.cert.display().to_string();
    bridges_one_message(&mqtt, None, &[("ROOT_CA", &ca_file), ("MQTT_TLS", "true")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused_with_a_clear_reason() {
    init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mqtt, ca) = tls_broker(dir.path(), true);
    let rogue = TestCa::new(dir.path(), "rogue").issue("client");
    let (ca_file, cert, key) = (
        ca.cert.display().to_string(),
        rogue.cert.display().to_string(),
        rogue.key.display().to_string(),
    );
    let reason = refusal_reason(
        &mqtt,
        &[
            ("ROOT_CA", &ca_file),
            ("MQTT_CLIENT_CERT", &cert),
            ("MQTT_CLIENT_KEY", &key),
        ],
    )
    .await;
    assert!(reason.contains("TLS handshake failed"), "{reason}");
    assert!(
        reason.to_lowercase().contains("ca"),
        "names the certificate problem: {reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_certificate_from_an_untrusted_ca_is_refused() {
    init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mqtt, _ca) = tls_broker(dir.path(), false);
    let other = TestCa::new(dir.path(), "other");
    let other_ca = other.cert.display().to_string();
    let reason = refusal_reason(&mqtt, &[("ROOT_CA", &other_ca)]).await;
    assert!(reason.contains("TLS handshake failed"), "{reason}");
    assert!(reason.contains("certificate"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_credentials_work_and_wrong_ones_are_named() {
    init_logging();
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        user: Some(("bridge".to_owned(), "s3cret".to_owned())),
        ..MosquittoOptions::default()
    });
    bridges_one_message(
        &mqtt,
        Some(("bridge", "s3cret")),
        &[("MQTT_USERNAME", "bridge"), ("MQTT_PASSWORD", "s3cret")],
    )
    .await;
    let reason = refusal_reason(
        &mqtt,
        &[
            ("MQTT_USERNAME", "bridge"),
            ("MQTT_PASSWORD", "wrong-password"),
        ],
    )
    .await;
    assert!(
        reason.contains("not authorized") || reason.contains("bad user name or password"),
        "{reason}"
    );
    assert!(
        reason.contains("check MQTT_USERNAME and MQTT_PASSWORD"),
        "{reason}"
    );
    assert!(
        !reason.contains("wrong-password"),
        "the password leaked: {reason}"
    );
}

/// Mutual TLS with X.509 v1 certificates for the broker and the bridge, issued by
/// `openssl x509 -req` without an extensions file, and the client key in each format openssl
/// writes: every one connects and bridges a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_certificates_and_every_key_format_from_the_openssl_command_line_work() {
    init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = OpensslCa::new(dir.path());
    let server = ca.issue("server", "localhost", KeyFormat::Pkcs8);
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        tls: Some(ListenerTls {
            ca_file: ca.cert.clone(),
            cert_file: server.cert,
            key_file: server.key,
            require_certificate: true,
        }),
        ..MosquittoOptions::default()
    });
    let kafka = Tansu::start();
    let publisher = Publisher::connect(mqtt.plain_port()).await;
    let formats = [
        KeyFormat::Pkcs8,
        KeyFormat::Pkcs1,
        KeyFormat::Sec1,
        KeyFormat::EncryptedPkcs8("pass phrase"),
        KeyFormat::EncryptedPkcs1("s3cret"),
    ];
    for (n, format) in formats.into_iter().enumerate() {
        let client = ca.issue(&format!("client{n}"), "bridge", format);
        let password = match format {
            KeyFormat::EncryptedPkcs8(p) | KeyFormat::EncryptedPkcs1(p) => p,
            _ => "",
        };
        let (ca_file, cert, key) = (
            ca.cert.display().to_string(),
            client.cert.display().to_string(),
            client.key.display().to_string(),
        );
        let topic = format!("mqtt-{}", unique());
        let mut overrides = vec![
            ("MQTT_BROKER", "localhost"),
            ("ROOT_CA", ca_file.as_str()),
            ("MQTT_CLIENT_CERT", cert.as_str()),
            ("MQTT_CLIENT_KEY", key.as_str()),
        ];
        if !password.is_empty() {
            overrides.push(("MQTT_CLIENT_KEY_PASSWORD", password));
        }
        let config = bridge_config(mqtt.port(), kafka.port(), &topic, "secure/#", &overrides);
        let bridge = RunningBridge::start(config)
            .await
            .unwrap_or_else(|e| panic!("{format:?}: {e}"));
        bridge.wait_subscribed().await;
        let payload = format!("{format:?}");
        publisher
            .publish("secure/v1", payload.clone(), QoS::AtLeastOnce)
            .await;
        let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
        let received = reader.read_exactly(1, Duration::from_secs(30)).await;
        assert_eq!(received[0].payload, payload.as_bytes());
        eprintln!("v1 client certificate, key {format:?}: bridged");
        bridge.stop().await.expect("clean stop");
    }
}

/// MQTT over WebSockets (`MQTT_TRANSPORT=ws`) to Mosquitto's `protocol websockets` listener:
/// the uplink and the downlink both go through the bridge's WebSocket adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websockets_carries_the_uplink_and_the_downlink() {
    init_logging();
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        websockets: true,
        ..MosquittoOptions::default()
    });
    let kafka = Tansu::start();
    let topic = format!("mqtt-{}", unique());
    let config = bridge_config(
        mqtt.port(),
        kafka.port(),
        &topic,
        "ws/#",
        &[
            ("MQTT_TRANSPORT", "ws"),
            ("DOWNLINK_KAFKA_TOPICS", &topic),
            ("DOWNLINK_OFFSET_RESET", "earliest"),
            ("DOWNLINK_MQTT_TOPIC", "back/{key}"),
        ],
    );
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    let subscriber = mkb_tests::mqtt::Subscriber::connect(mqtt.plain_port(), "back/#").await;
    let publisher = Publisher::connect(mqtt.plain_port()).await;
    publisher
        .publish("ws/a", "over WebSockets", QoS::AtLeastOnce)
        .await;
    let mut reader = KafkaReader::new(&kafka.brokers(), &topic).await;
    let received = reader.read_exactly(1, Duration::from_secs(30)).await;
    assert_eq!(received[0].payload, b"over WebSockets");
    // The downlink reads the record back and publishes it over its own WebSocket.
    let back = subscriber
        .wait_until(Duration::from_secs(60), "the downlink's publish", |r| {
            !r.is_empty()
        })
        .await;
    assert_eq!(back[0].0, "back/ws/a");
    assert_eq!(back[0].1, b"over WebSockets");
    bridge.stop().await.expect("clean stop");
}

/// The same over TLS (`wss://`), MQTT 5, with the broker's certificate checked against
/// `ROOT_CA` through OpenSSL as for TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_over_websockets_with_tls() {
    init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mqtt, ca) = mkb_tests::certs::tls_broker(dir.path(), false, true);
    let ca_file = ca.cert.display().to_string();
    bridges_one_message(
        &mqtt,
        None,
        &[
            ("MQTT_TRANSPORT", "ws"),
            ("MQTT_TLS", "true"),
            ("ROOT_CA", &ca_file),
            ("MQTT_VERSION", "5"),
        ],
    )
    .await;
}
