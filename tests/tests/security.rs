//! Secure MQTT connections against a real Mosquitto: TLS with and without a client certificate,
//! a certificate from a CA the broker does not trust, and user name / password.

use std::time::Duration;

use mkb_tests::certs::TestCa;
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
    assert_eq!(bridge.metric("bridge_mqtt_subscribed").await, 0.0);
    bridge.stop().await.expect("clean stop");
    readyz
}

fn tls_broker(dir: &std::path::Path, require_certificate: bool) -> (Mosquitto, TestCa) {
    let ca = TestCa::new(dir, "trusted");
    let server = ca.issue("server");
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        tls: Some(ListenerTls {
            ca_file: ca.cert.clone(),
            cert_file: server.cert,
            key_file: server.key,
            require_certificate,
        }),
        user: None,
        max_inflight: None,
    });
    (mqtt, ca)
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
        tls: None,
        user: Some(("bridge".to_owned(), "s3cret".to_owned())),
        max_inflight: None,
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
