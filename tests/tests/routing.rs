//! Routing against real Mosquitto and tansu: the seeds' examples (Callista, uns_kafka), every
//! rule kind, key mode, header set and value format, decoded from what lands in Kafka and
//! compared exactly; unmatched messages; and an outage with five mapped topics.

use std::sync::Arc;
use std::time::Duration;

use mkb_tests::kafka::{KafkaReader, Received};
use mkb_tests::numbered::{expect_numbers, publish_numbered_over};
use mkb_tests::{
    Fault, Publisher, RunningBridge, bridge_config, brokers, brokers_behind_proxy, eventually,
    init_logging, metric_value, subscribed_bridge, with_fast_failure,
};
use rumqttc::QoS;

const DEADLINE: Duration = Duration::from_secs(30);

fn headers(record: &Received) -> Vec<(&str, String)> {
    record
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

/// The Callista/Volvo bridge (seeds 000, 001): car topics to one uplink topic, keyed by the car
/// (its VIN, from the topic), the MQTT topic in a header, the payload as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callista_cars_to_cs_uplink_keyed_by_vin_with_the_topic_header_and_raw_value() {
    init_logging();
    let (kafka, mqtt, _topic, bridge) = subscribed_bridge(
        "cars/#",
        &[
            ("KAFKA_TOPIC_MAP", "cars/{vin}/#=cs.uplink"),
            ("KAFKA_KEY", "{vin}"),
            ("KAFKA_HEADERS", "topic"),
            ("KAFKA_VALUE_FORMAT", "raw"),
        ],
    )
    .await;
    let publisher = Publisher::connect(mqtt.port()).await;
    publisher
        .publish(
            "cars/VIN123/telemetry",
            &b"\x01\x02speed=88"[..],
            QoS::AtLeastOnce,
        )
        .await;
    let mut reader = KafkaReader::new_raw(&kafka.brokers(), "cs.uplink").await;
    let record = reader.read_exactly(1, DEADLINE).await[0].clone();
    assert_eq!(record.key.as_deref(), Some(&b"VIN123"[..]));
    assert_eq!(
        headers(&record),
        [("mqtt.topic", "cars/VIN123/telemetry".to_owned())]
    );
    assert_eq!(record.value, b"\x01\x02speed=88");
    eprintln!(
        "Callista: key VIN123, headers {:?}, raw value",
        headers(&record)
    );
    bridge.stop().await.expect("clean stop");
}

/// uns_kafka (seed 002): every MQTT topic to a Kafka topic of its own, `/` replaced by `_`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uns_kafka_each_mqtt_topic_to_its_own_kafka_topic() {
    init_logging();
    let (kafka, mqtt, _topic, bridge) =
        subscribed_bridge("spBv1.0/#", &[("KAFKA_TOPIC_MAP", "spBv1.0/#={topic}")]).await;
    let publisher = Publisher::connect(mqtt.port()).await;
    for (topic, payload) in [
        ("spBv1.0/g/NDATA/n", "node"),
        ("spBv1.0/g/DDATA/n/d", "device"),
    ] {
        publisher.publish(topic, payload, QoS::AtLeastOnce).await;
    }
    for (kafka_topic, mqtt_topic, payload) in [
        ("spBv1.0_g_NDATA_n", "spBv1.0/g/NDATA/n", "node"),
        ("spBv1.0_g_DDATA_n_d", "spBv1.0/g/DDATA/n/d", "device"),
    ] {
        let mut reader = KafkaReader::new(&kafka.brokers(), kafka_topic).await;
        let record = reader.read_exactly(1, DEADLINE).await[0].clone();
        assert_eq!(record.mqtt_topic, mqtt_topic, "the envelope, as by default");
        assert_eq!(record.payload, payload.as_bytes());
        assert_eq!(record.key.as_deref(), Some(mqtt_topic.as_bytes()));
    }
    bridge.stop().await.expect("clean stop");
}

/// Publishes one MQTT 5 message with properties, on a connection of its own.
async fn publish_v5(port: u16, topic: &str, payload: &[u8]) {
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut options = MqttOptions::new(format!("v5-{}", mkb_tests::unique()), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let properties = PublishProperties {
        user_properties: vec![
            ("site".to_owned(), "oslo".to_owned()),
            ("mqtt.topic".to_owned(), "forged".to_owned()),
            ("site".to_owned(), "bergen".to_owned()),
        ],
        content_type: Some("application/json".to_owned()),
        response_topic: Some("reply/here".to_owned()),
        correlation_data: Some(bytes::Bytes::from_static(b"c-1")),
        message_expiry_interval: Some(600),
        ..PublishProperties::default()
    };
    client
        .publish_with_properties(
            topic,
            QoS5::AtLeastOnce,
            false,
            payload.to_vec(),
            properties,
        )
        .await
        .expect("queue the publish");
    let acked = tokio::time::timeout(DEADLINE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("MQTT 5 publisher: {e}"),
            }
        }
    })
    .await;
    acked.expect("the MQTT 5 PUBACK in time");
}

/// A regex rule with named groups, a filter rule with a named level, `{N}` and `{#}`; a key
/// from a JSON payload field and an MQTT 5 user property; every header; the json format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_kind_key_mode_header_and_the_json_format_land_exactly() {
    init_logging();
    let (kafka, mqtt, _topic, bridge) = subscribed_bridge(
        "plant/#",
        &[
            ("MQTT_VERSION", "5"),
            (
                "KAFKA_TOPIC_MAP",
                "re:^plant/(?P<site>[a-z]+)/line-(?P<line>[0-9]+)$=line.{site}.{line}\n\
                 plant/{site}/+/#=plant.{site}.{3}.{#}",
            ),
            ("KAFKA_KEY", "{json:/device}@{prop:site}"),
            ("KAFKA_HEADERS", "all"),
            ("KAFKA_VALUE_FORMAT", "json"),
        ],
    )
    .await;
    publish_v5(
        mqtt.port(),
        "plant/oslo/line-7",
        br#"{"device":"press-3","t":21.5}"#,
    )
    .await;
    publish_v5(mqtt.port(), "plant/oslo/hall/a/b", b"not json \xff").await;

    let mut reader = KafkaReader::new_raw(&kafka.brokers(), "line.oslo.7").await;
    let record = reader.read_exactly(1, DEADLINE).await[0].clone();
    assert_eq!(record.key.as_deref(), Some(&b"press-3@oslo"[..]));
    let expected_headers = [
        ("mqtt.topic", "plant/oslo/line-7"),
        ("mqtt.qos", "1"),
        ("mqtt.retain", "false"),
        ("mqtt.dup", "false"),
        ("mqtt.content_type", "application/json"),
        ("mqtt.response_topic", "reply/here"),
        ("mqtt.correlation_data", "c-1"),
        ("mqtt.message_expiry", "600"),
        ("site", "oslo"),
        ("site", "bergen"),
    ]
    .map(|(n, v)| (n, v.to_owned()));
    assert_eq!(
        headers(&record),
        expected_headers,
        "the forged mqtt.topic property is left out"
    );
    let value: serde_json::Value = serde_json::from_slice(&record.value).expect("JSON value");
    assert_eq!(value["topic"], "plant/oslo/line-7");
    assert_eq!(value["qos"], 1);
    assert_eq!(value["retain"], false);
    assert_eq!(value["payload_encoding"], "json");
    assert_eq!(
        value["payload"],
        serde_json::json!({"device": "press-3", "t": 21.5})
    );

    let mut reader = KafkaReader::new_raw(&kafka.brokers(), "plant.oslo.hall.a_b").await;
    let record = reader.read_exactly(1, DEADLINE).await[0].clone();
    assert_eq!(
        record.key.as_deref(),
        Some(&b"@oslo"[..]),
        "no JSON: that part is empty"
    );
    let value: serde_json::Value = serde_json::from_slice(&record.value).expect("JSON value");
    assert_eq!(value["payload_encoding"], "base64");
    assert_eq!(value["payload"], "bm90IGpzb24g/w==");
    bridge.stop().await.expect("clean stop");
}

/// With a map and no `KAFKA_TOPIC`, a message no rule matches is counted as unmapped and
/// acknowledged; the matched ones arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_messages_without_kafka_topic_are_counted_and_acknowledged() {
    init_logging();
    let (kafka, mqtt, _) = brokers();
    // An empty value counts as unset: a map alone, no KAFKA_TOPIC.
    let config = bridge_config(
        mqtt.port(),
        kafka.port(),
        "",
        "u/#",
        &[("KAFKA_TOPIC_MAP", "u/mapped/#=u.mapped")],
    );
    assert_eq!(config.kafka.topic, None);
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    let publisher = Publisher::connect(mqtt.port()).await;
    for topic in ["u/mapped/1", "u/other", "u/mapped/2", "u/other"] {
        publisher.publish(topic, topic, QoS::AtLeastOnce).await;
    }
    let mut reader = KafkaReader::new(&kafka.brokers(), "u.mapped").await;
    let received = reader.read_exactly(2, DEADLINE).await;
    assert_eq!(received[0].mqtt_topic, "u/mapped/1");
    assert_eq!(received[1].mqtt_topic, "u/mapped/2");
    publisher.wait_acked(4).await;
    let unmapped = eventually(DEADLINE, "the unmapped ones counted", || async {
        let metrics = bridge.metrics().await;
        let unmapped = metric_value(
            &metrics,
            "bridge_records_dropped_total{reason=\"unmapped\"}",
        );
        let awaiting = metric_value(&metrics, "bridge_mqtt_messages_awaiting_ack");
        (unmapped >= 2.0 && awaiting == 0.0).then_some(unmapped)
    })
    .await;
    assert_eq!(unmapped, 2.0);
    bridge.stop().await.expect("clean stop");
}

/// Kafka cut for a while under steady traffic mapped to five topics: nothing is lost, and each
/// MQTT topic's records keep their order in their Kafka topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_with_five_mapped_topics_loses_nothing_and_keeps_order() {
    init_logging();
    let (kafka, proxy, mqtt, _topic) = brokers_behind_proxy().await;
    let prefix = format!("five{}", mkb_tests::unique().replace('-', ""));
    let map = format!("{prefix}/{{n}}={prefix}.{{n}}");
    let config = bridge_config(
        mqtt.port(),
        proxy.port(),
        "unused",
        &format!("{prefix}/#"),
        &with_fast_failure(&[("KAFKA_TOPIC_MAP", &map)]),
    );
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    let publisher = Arc::new(Publisher::connect(mqtt.port()).await);
    let count = 10_000;
    let traffic =
        publish_numbered_over(publisher.clone(), &prefix, 5, count, 1000, QoS::AtLeastOnce);
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set(Fault::Down);
    eventually(DEADLINE, "Kafka failing", || async {
        (bridge.metric("bridge_kafka_state").await == 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set(Fault::None);
    traffic.await.expect("publisher");
    for k in 0..5u64 {
        let wanted: Vec<u64> = (0..count).filter(|n| n % 5 == k).collect();
        let reader = KafkaReader::new(&kafka.brokers(), &format!("{prefix}.{k}")).await;
        let delivery = expect_numbers(reader, &wanted, Duration::from_secs(120)).await;
        eprintln!("{prefix}.{k}: {delivery:?}");
    }
    bridge.stop().await.expect("clean stop");
}

/// A broker replaced by an empty one (its topics gone) while the bridge runs: the bridge
/// creates its mapped topic again and delivers what it held. Before, it retried a topic that
/// no longer existed forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_gone_with_a_replaced_broker_is_created_again() {
    init_logging();
    let (mut kafka, mqtt, _) = brokers();
    let config = bridge_config(
        mqtt.port(),
        kafka.port(),
        "",
        "gone/#",
        &with_fast_failure(&[("KAFKA_TOPIC_MAP", "gone/#=gone.t")]),
    );
    let bridge = RunningBridge::start(config).await.expect("bridge starts");
    bridge.wait_subscribed().await;
    let publisher = Publisher::connect(mqtt.port()).await;
    for n in 0..100u64 {
        publisher
            .publish("gone/a", n.to_string(), QoS::AtLeastOnce)
            .await;
    }
    let wanted: Vec<u64> = (0..100).collect();
    let reader = KafkaReader::new(&kafka.brokers(), "gone.t").await;
    expect_numbers(reader, &wanted, DEADLINE).await;
    kafka.replace_with_empty();
    for n in 100..200u64 {
        publisher
            .publish("gone/a", n.to_string(), QoS::AtLeastOnce)
            .await;
    }
    let wanted: Vec<u64> = (100..200).collect();
    let reader = KafkaReader::new(&kafka.brokers(), "gone.t").await;
    let delivery = expect_numbers(reader, &wanted, Duration::from_secs(120)).await;
    eprintln!("after the broker was replaced: {delivery:?}");
    bridge.stop().await.expect("clean stop");
}
