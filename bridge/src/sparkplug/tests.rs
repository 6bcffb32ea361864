//! Payloads encoded here with the message definitions, decoded back to JSON.

use prost::Message as _;
use serde_json::{Value, json};

use super::proto::*;
use super::{Decoder, Namespace};

fn metric(
    name: Option<&str>,
    alias: Option<u64>,
    datatype: Option<u32>,
    value: MetricValue,
) -> Metric {
    Metric {
        name: name.map(str::to_owned),
        alias,
        datatype,
        value: Some(value),
        ..Metric::default()
    }
}

fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(1_764_670_000_123),
        seq: Some(seq),
        metrics,
        ..Payload::default()
    }
    .encode_to_vec()
}

fn decode(decoder: &mut Decoder, topic: &str, bytes: &[u8]) -> Value {
    let json = decoder
        .to_json(topic, bytes)
        .expect("decodes")
        .expect("a Sparkplug topic");
    serde_json::from_slice(&json).expect("JSON")
}

#[test]
fn every_scalar_datatype_has_its_json_type() {
    use MetricValue::*;
    let cases: Vec<(u32, MetricValue, Value)> = vec![
        (1, IntValue(0xFFFF_FF80), json!(-128)),
        (1, IntValue(0x80), json!(-128)), // sent without sign extension
        (2, IntValue(0xFFFF_8000), json!(-32768)),
        (3, IntValue(u32::MAX), json!(-1)),
        (4, LongValue(u64::MAX), json!(-1)),
        (5, IntValue(255), json!(255)),
        (6, IntValue(65_535), json!(65_535)),
        (7, IntValue(u32::MAX), json!(4_294_967_295u64)),
        (8, LongValue(u64::MAX), json!(u64::MAX)),
        (9, FloatValue(1.5), json!(1.5)),
        (10, DoubleValue(-2.25), json!(-2.25)),
        (11, BooleanValue(true), json!(true)),
        (12, StringValue("s".into()), json!("s")),
        (
            13,
            LongValue(1_764_670_000_000),
            json!(1_764_670_000_000u64),
        ),
        (14, StringValue("text".into()), json!("text")),
        (15, StringValue("8c7b…".into()), json!("8c7b…")),
        (17, BytesValue(vec![0xFF, 0]), json!("/wA=")),
        (18, BytesValue(b"file".to_vec()), json!("ZmlsZQ==")),
    ];
    let names = [
        "", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float",
        "Double", "Boolean", "String", "DateTime", "Text", "UUID", "", "Bytes", "File",
    ];
    let metrics = cases
        .iter()
        .enumerate()
        .map(|(i, (datatype, value, _))| {
            metric(Some(&format!("m{i}")), None, Some(*datatype), value.clone())
        })
        .collect();
    let json = decode(
        &mut Decoder::default(),
        "spBv1.0/plant/NBIRTH/edge1",
        &payload(0, metrics),
    );
    assert_eq!(json["timestamp"], json!(1_764_670_000_123u64), "a number");
    assert_eq!(json["seq"], json!(0));
    assert_eq!(json["group_id"], "plant");
    assert_eq!(json["message_type"], "NBIRTH");
    assert_eq!(json["edge_node_id"], "edge1");
    for (i, (datatype, _, expected)) in cases.iter().enumerate() {
        let metric = &json["metrics"][i];
        assert_eq!(metric["value"], *expected, "{metric}");
        assert_eq!(metric["datatype"], names[*datatype as usize], "{metric}");
    }
}

#[test]
fn arrays_are_unpacked_from_their_little_endian_bytes() {
    let cases: Vec<(u32, Vec<u8>, Value)> = vec![
        (22, vec![0xFF, 0x7F], json!([-1, 127])),
        (
            23,
            [-2i16, 300].iter().flat_map(|v| v.to_le_bytes()).collect(),
            json!([-2, 300]),
        ),
        (24, (-5i32).to_le_bytes().to_vec(), json!([-5])),
        (25, i64::MIN.to_le_bytes().to_vec(), json!([i64::MIN])),
        (26, vec![0, 255], json!([0, 255])),
        (27, 65_535u16.to_le_bytes().to_vec(), json!([65_535])),
        (28, u32::MAX.to_le_bytes().to_vec(), json!([u32::MAX])),
        (29, u64::MAX.to_le_bytes().to_vec(), json!([u64::MAX])),
        (30, 0.5f32.to_le_bytes().to_vec(), json!([0.5])),
        (31, (-1.25f64).to_le_bytes().to_vec(), json!([-1.25])),
        // Ten booleans: count 10, then 1011 0000 and 01.. (most significant bit first).
        (
            32,
            vec![10, 0, 0, 0, 0b1011_0000, 0b0100_0000],
            json!([
                true, false, true, true, false, false, false, false, false, true
            ]),
        ),
        (33, b"ab\0\0c\0".to_vec(), json!(["ab", "", "c"])),
        (
            34,
            1_764_670_000_000i64.to_le_bytes().to_vec(),
            json!([1_764_670_000_000i64]),
        ),
    ];
    let metrics = cases
        .iter()
        .map(|(datatype, bytes, _)| {
            metric(
                Some(&format!("a{datatype}")),
                None,
                Some(*datatype),
                MetricValue::BytesValue(bytes.clone()),
            )
        })
        .collect();
    let json = decode(
        &mut Decoder::default(),
        "spBv1.0/g/DBIRTH/n/d",
        &payload(1, metrics),
    );
    assert_eq!(json["device_id"], "d");
    for (i, (_, _, expected)) in cases.iter().enumerate() {
        assert_eq!(
            json["metrics"][i]["value"], *expected,
            "{}",
            json["metrics"][i]
        );
    }
}

#[test]
fn datasets_templates_properties_and_metadata() {
    let dataset = DataSet {
        num_of_columns: Some(2),
        columns: vec!["t".into(), "ok".into()],
        types: vec![3, 11],
        rows: vec![
            Row {
                elements: vec![
                    DataSetValue {
                        value: Some(DataSetValueKind::IntValue(u32::MAX)),
                    },
                    DataSetValue {
                        value: Some(DataSetValueKind::BooleanValue(true)),
                    },
                ],
            },
            Row {
                elements: vec![
                    DataSetValue {
                        value: Some(DataSetValueKind::IntValue(7)),
                    },
                    DataSetValue { value: None },
                ],
            },
        ],
    };
    let template = Template {
        version: Some("1.0".into()),
        template_ref: Some("Motor".into()),
        is_definition: Some(false),
        parameters: vec![Parameter {
            name: Some("rated".into()),
            r#type: Some(10),
            value: Some(ParameterValue::DoubleValue(7.5)),
        }],
        metrics: vec![metric(
            Some("rpm"),
            None,
            Some(7),
            MetricValue::IntValue(1500),
        )],
    };
    let properties = PropertySet {
        keys: vec!["engUnit".into(), "Quality".into(), "limits".into()],
        values: vec![
            PropertyValue {
                r#type: Some(12),
                is_null: None,
                value: Some(PropertyValueKind::StringValue("°C".into())),
            },
            PropertyValue {
                r#type: Some(3),
                is_null: None,
                value: Some(PropertyValueKind::IntValue(192)),
            },
            PropertyValue {
                r#type: Some(20),
                is_null: None,
                value: Some(PropertyValueKind::PropertysetValue(PropertySet {
                    keys: vec!["high".into()],
                    values: vec![PropertyValue {
                        r#type: Some(10),
                        is_null: None,
                        value: Some(PropertyValueKind::DoubleValue(90.0)),
                    }],
                })),
            },
        ],
    };
    let mut temperature = metric(
        Some("temp"),
        Some(3),
        Some(10),
        MetricValue::DoubleValue(21.5),
    );
    temperature.properties = Some(properties);
    temperature.metadata = Some(MetaData {
        description: Some("inlet".into()),
        ..MetaData::default()
    });
    temperature.is_historical = Some(true);
    let mut missing = metric(Some("gone"), None, Some(10), MetricValue::DoubleValue(0.0));
    missing.is_null = Some(true);
    let json = decode(
        &mut Decoder::default(),
        "spBv1.0/g/NBIRTH/n",
        &payload(
            2,
            vec![
                metric(
                    Some("table"),
                    None,
                    Some(16),
                    MetricValue::DatasetValue(dataset),
                ),
                metric(
                    Some("motor"),
                    None,
                    Some(19),
                    MetricValue::TemplateValue(template),
                ),
                temperature,
                missing,
            ],
        ),
    );
    let metrics = &json["metrics"];
    assert_eq!(
        metrics[0]["value"],
        json!({"num_of_columns": 2, "columns": ["t", "ok"], "types": ["Int32", "Boolean"],
               "rows": [[-1, true], [7, null]]})
    );
    assert_eq!(
        metrics[1]["value"],
        json!({"version": "1.0", "template_ref": "Motor", "is_definition": false,
               "parameters": [{"name": "rated", "type": "Double", "value": 7.5}],
               "metrics": [{"name": "rpm", "datatype": "UInt32", "value": 1500}]})
    );
    assert_eq!(
        metrics[2]["properties"],
        json!({"engUnit": "°C", "Quality": 192, "limits": {"high": 90.0}})
    );
    assert_eq!(metrics[2]["metadata"], json!({"description": "inlet"}));
    assert_eq!(metrics[2]["is_historical"], json!(true));
    assert_eq!(metrics[3]["value"], Value::Null, "is_null");
}

#[test]
fn aliases_take_names_and_datatypes_from_the_latest_birth() {
    let mut decoder = Decoder::default();
    let birth = payload(
        0,
        vec![
            metric(
                Some("temp"),
                Some(1),
                Some(10),
                MetricValue::DoubleValue(20.0),
            ),
            metric(Some("count"), Some(2), Some(3), MetricValue::IntValue(0)),
        ],
    );
    decode(&mut decoder, "spBv1.0/g/NBIRTH/n", &birth);
    let device_birth = payload(
        1,
        vec![metric(
            Some("speed"),
            Some(7),
            Some(24),
            MetricValue::BytesValue(vec![]),
        )],
    );
    decode(&mut decoder, "spBv1.0/g/DBIRTH/n/d", &device_birth);
    let data = payload(
        2,
        vec![
            metric(None, Some(1), None, MetricValue::DoubleValue(21.0)),
            metric(None, Some(2), None, MetricValue::IntValue(u32::MAX)),
            metric(None, Some(9), None, MetricValue::IntValue(1)),
        ],
    );
    let json = decode(&mut decoder, "spBv1.0/g/NDATA/n", &data);
    assert_eq!(
        json["metrics"][0],
        json!({"name": "temp", "alias": 1, "datatype": "Double", "value": 21.0})
    );
    assert_eq!(
        json["metrics"][1]["value"],
        json!(-1),
        "Int32 from the BIRTH"
    );
    assert_eq!(
        json["metrics"][2],
        json!({"name": null, "alias": 9, "alias_unknown": true, "value": 1}),
        "not guessed"
    );
    // A device's DATA: the array datatype comes from its DBIRTH.
    let ddata = payload(
        3,
        vec![metric(
            None,
            Some(7),
            None,
            MetricValue::BytesValue((-3i32).to_le_bytes().to_vec()),
        )],
    );
    let json = decode(&mut decoder, "spBv1.0/g/DDATA/n/d", &ddata);
    assert_eq!(json["metrics"][0]["name"], "speed");
    assert_eq!(json["metrics"][0]["value"], json!([-3]));
    // Another node's aliases are its own.
    let json = decode(&mut decoder, "spBv1.0/g/NDATA/other", &data);
    assert_eq!(json["metrics"][0]["alias_unknown"], json!(true));
    // A new NBIRTH starts the node afresh: alias 2 is now another metric, alias 1 is gone.
    let rebirth = payload(
        0,
        vec![metric(
            Some("pressure"),
            Some(2),
            Some(9),
            MetricValue::FloatValue(1.0),
        )],
    );
    decode(&mut decoder, "spBv1.0/g/NBIRTH/n", &rebirth);
    let json = decode(&mut decoder, "spBv1.0/g/NDATA/n", &data);
    assert_eq!(json["metrics"][0]["alias_unknown"], json!(true));
    assert_eq!(json["metrics"][1]["name"], "pressure");
}

#[test]
fn the_alias_table_is_bounded() {
    let mut decoder = Decoder::default();
    let birth = payload(
        0,
        vec![metric(
            Some("m"),
            Some(1),
            Some(10),
            MetricValue::DoubleValue(0.0),
        )],
    );
    for n in 0..super::MAX_NODES + 5 {
        decode(&mut decoder, &format!("spBv1.0/g/NBIRTH/n{n}"), &birth);
    }
    assert_eq!(decoder.nodes.len(), super::MAX_NODES);
    assert_eq!(decoder.forgotten, 5);
    // The oldest went first; the newest is still known.
    let data = payload(
        1,
        vec![metric(None, Some(1), None, MetricValue::DoubleValue(1.0))],
    );
    let newest = decode(
        &mut decoder,
        &format!("spBv1.0/g/NDATA/n{}", super::MAX_NODES + 4),
        &data,
    );
    assert_eq!(newest["metrics"][0]["name"], "m");
    let oldest = decode(&mut decoder, "spBv1.0/g/NDATA/n0", &data);
    assert_eq!(oldest["metrics"][0]["alias_unknown"], json!(true));
}

#[test]
fn bad_bytes_and_topics_say_what_is_wrong() {
    let mut decoder = Decoder::default();
    let garbage = decoder.to_json("spBv1.0/g/NDATA/n", b"\xff\xff\xff\xff");
    assert!(
        garbage
            .expect_err("garbage")
            .starts_with("not a Sparkplug B payload")
    );
    let short_array = payload(
        0,
        vec![metric(
            Some("a"),
            None,
            Some(24),
            MetricValue::BytesValue(vec![1, 2, 3]),
        )],
    );
    let error = decoder
        .to_json("spBv1.0/g/NBIRTH/n", &short_array)
        .expect_err("bad array");
    assert!(error.contains("Int32Array of 3 bytes"), "{error}");
    let bad_dataset = payload(
        0,
        vec![metric(
            Some("d"),
            None,
            Some(16),
            MetricValue::DatasetValue(DataSet {
                num_of_columns: Some(2),
                columns: vec!["a".into(), "b".into()],
                types: vec![3, 3],
                rows: vec![Row {
                    elements: vec![DataSetValue {
                        value: Some(DataSetValueKind::IntValue(1)),
                    }],
                }],
            }),
        )],
    );
    let error = decoder
        .to_json("spBv1.0/g/NBIRTH/n", &bad_dataset)
        .expect_err("bad row");
    assert!(error.contains("row of 1 values for 2 columns"), "{error}");
    assert!(decoder.to_json("spBv1.0/too/few", b"").is_err());
    assert_eq!(decoder.to_json("plant/x", b"\xff").expect("other"), None);
    assert_eq!(
        decoder
            .to_json("spBv1.0/STATE/host1", br#"{"online":true}"#)
            .expect("state"),
        Some(br#"{"online":true}"#.to_vec()),
        "STATE passes through"
    );
    assert_eq!(Namespace::of("spBv1.0/STATE/h"), Ok(Namespace::State));
}
