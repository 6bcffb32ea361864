//! Sparkplug B through real Mosquitto and tansu: NBIRTH, DBIRTH, then NDATA and DDATA carrying
//! aliases only, published as an edge node would; the JSON read back from Kafka has every
//! metric's name and typed value. A payload that does not decode goes to the dead-letter topic
//! and the messages behind it still arrive.

use std::time::Duration;

use mkb_bridge::sparkplug::proto::{Metric, MetricValue, Payload};
use mkb_tests::certs::tls_broker;
use mkb_tests::{
    KafkaReader, Mosquitto, MosquittoOptions, Publisher, RunningBridge, Tansu, bridge_config,
    init_logging, unique,
};
use prost::Message as _;
use rumqttc::QoS;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

fn metric(name: Option<&str>, alias: u64, datatype: Option<u32>, value: MetricValue) -> Metric {
    Metric {
        name: name.map(str::to_owned),
        alias: Some(alias),
        timestamp: Some(1_764_670_000_000),
        datatype,
        value: Some(value),
        ..Metric::default()
    }
}

fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(1_764_670_000_000 + seq),
        seq: Some(seq),
        metrics,
        ..Payload::default()
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn births_then_alias_only_data_read_back_with_names() {
    init_logging();
    births_then_data(&Mosquitto::start(), &[]).await;
}

/// The same messages over MQTT over WebSockets (Mosquitto's `protocol websockets` listener).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_websockets() {
    init_logging();
    let mqtt = Mosquitto::start_with(MosquittoOptions {
        websockets: true,
        ..MosquittoOptions::default()
    });
    births_then_data(&mqtt, &[("MQTT_TRANSPORT", "ws")]).await;
}

/// The same over WebSockets with TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_websockets_with_tls() {
    init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mqtt, ca) = tls_broker(dir.path(), false, true);
    let ca_file = ca.cert.display().to_string();
    births_then_data(
        &mqtt,
        &[
            ("MQTT_TRANSPORT", "ws"),
            ("MQTT_TLS", "true"),
            ("ROOT_CA", &ca_file),
        ],
    )
    .await;
}

/// NBIRTH, DBIRTH, alias-only NDATA and DDATA, a bad payload and STATE, published to `mqtt`
/// (through its plain port), read back from Kafka; the bridge has `overrides` too.
async fn births_then_data(mqtt: &Mosquitto, overrides: &[(&str, &str)]) {
    let kafka = Tansu::start();
    let topic = format!("mqtt-{}", unique());
    let dlq = format!("dlq-{}", unique());
    let map = format!("spBv1.0/{{group}}/{{type}}/{{node}}/#={topic}");
    let mut settings = vec![
        ("KAFKA_VALUE_FORMAT", "sparkplug-json"),
        // One topic, keyed by edge node: a node's messages keep their order.
        ("KAFKA_TOPIC_MAP", map.as_str()),
        ("KAFKA_KEY", "{node}"),
        ("KAFKA_DLQ_TOPIC", dlq.as_str()),
    ];
    settings.extend_from_slice(overrides);
    let config = bridge_config(mqtt.port(), kafka.port(), &topic, "spBv1.0/#", &settings);
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    let publisher = Publisher::connect(mqtt.plain_port()).await;
    let messages: Vec<(&str, Vec<u8>)> = vec![
        (
            "spBv1.0/plant/NBIRTH/edge1",
            payload(
                0,
                vec![
                    metric(
                        Some("Node Control/Rebirth"),
                        1,
                        Some(11),
                        MetricValue::BooleanValue(false),
                    ),
                    metric(Some("uptime"), 2, Some(8), MetricValue::LongValue(10)),
                    metric(Some("offset"), 3, Some(3), MetricValue::IntValue(0)),
                ],
            ),
        ),
        (
            "spBv1.0/plant/DBIRTH/edge1/pump7",
            payload(
                1,
                vec![
                    metric(
                        Some("temperature"),
                        10,
                        Some(10),
                        MetricValue::DoubleValue(20.5),
                    ),
                    metric(
                        Some("levels"),
                        11,
                        Some(24),
                        MetricValue::BytesValue(Vec::new()),
                    ),
                ],
            ),
        ),
        (
            "spBv1.0/plant/NDATA/edge1",
            payload(
                2,
                vec![
                    metric(None, 2, None, MetricValue::LongValue(u64::MAX)),
                    metric(None, 3, None, MetricValue::IntValue((-7i32) as u32)),
                ],
            ),
        ),
        (
            "spBv1.0/plant/DDATA/edge1/pump7",
            b"\x0a\xff not protobuf".to_vec(),
        ),
        (
            "spBv1.0/plant/DDATA/edge1/pump7",
            payload(
                3,
                vec![
                    metric(None, 10, None, MetricValue::DoubleValue(21.25)),
                    metric(
                        None,
                        11,
                        None,
                        MetricValue::BytesValue(
                            [1i32, -2].iter().flat_map(|v| v.to_le_bytes()).collect(),
                        ),
                    ),
                    metric(None, 99, None, MetricValue::IntValue(1)),
                ],
            ),
        ),
        (
            "spBv1.0/STATE/scada1",
            br#"{"online":true,"timestamp":1764670000000}"#.to_vec(),
        ),
    ];
    for (topic, payload) in &messages {
        publisher
            .publish(topic, payload.clone(), QoS::AtLeastOnce)
            .await;
    }
    let mut reader = KafkaReader::new_raw(&kafka.brokers(), &topic).await;
    let records = reader.read_exactly(4, DEADLINE).await.to_vec();
    let json: Vec<Value> = records
        .iter()
        .map(|r| serde_json::from_slice(&r.value).expect("JSON value"))
        .collect();
    for (record, value) in records.iter().zip(&json) {
        eprintln!(
            "{} key {:?}: {value}",
            record.mqtt_topic,
            record.key.as_deref().map(String::from_utf8_lossy)
        );
        assert_eq!(record.key.as_deref(), Some(&b"edge1"[..]));
    }
    assert_eq!(json[0]["message_type"], "NBIRTH");
    assert_eq!(json[0]["metrics"][1]["name"], "uptime");
    assert_eq!(json[0]["seq"], json!(0), "a number, not a string");
    assert_eq!(json[0]["timestamp"], json!(1_764_670_000_000u64));
    assert_eq!(json[1]["device_id"], "pump7");
    assert_eq!(
        json[2]["metrics"],
        json!([
            {"name": "uptime", "alias": 2, "timestamp": 1_764_670_000_000u64, "datatype": "UInt64", "value": u64::MAX},
            {"name": "offset", "alias": 3, "timestamp": 1_764_670_000_000u64, "datatype": "Int32", "value": -7},
        ])
    );
    assert_eq!(json[3]["metrics"][0]["name"], "temperature");
    assert_eq!(json[3]["metrics"][0]["value"], json!(21.25));
    assert_eq!(json[3]["metrics"][1]["name"], "levels");
    assert_eq!(json[3]["metrics"][1]["value"], json!([1, -2]));
    assert_eq!(json[3]["metrics"][2]["alias_unknown"], json!(true));
    assert_eq!(json[3]["metrics"][2]["name"], Value::Null);
    // STATE is not under a group: it falls back to KAFKA_TOPIC, as it was published.
    let mut state = KafkaReader::new_raw(&kafka.brokers(), &topic).await;
    let all = state.read_at_least(5, DEADLINE).await;
    assert!(
        all.iter()
            .any(|r| r.value == br#"{"online":true,"timestamp":1764670000000}"#),
        "STATE passed through"
    );
    // The undecodable DDATA: in the dead-letter topic, its bytes and why.
    let mut letters = KafkaReader::new_raw(&kafka.brokers(), &dlq).await;
    let letter = letters.read_exactly(1, DEADLINE).await[0].clone();
    assert_eq!(letter.value, b"\x0a\xff not protobuf");
    assert_eq!(
        letter.header("mqtt.dlq.reason").as_deref(),
        Some("sparkplug_invalid")
    );
    assert_eq!(
        letter.header("mqtt.dlq.topic").as_deref(),
        Some(topic.as_str())
    );
    let error = letter.header("mqtt.dlq.error").unwrap_or_default();
    eprintln!("dead letter: {error}");
    assert!(error.starts_with("not a Sparkplug B payload"), "{error}");
    bridge.stop().await.expect("clean stop");
}
