//! A decoded Sparkplug B payload as JSON: numbers as numbers, each value typed by its datatype.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

use super::SparkplugTopic;
use super::proto::{
    DataSet, DataSetValueKind, MetaData, Metric, MetricValue, ParameterValue, Payload, PropertySet,
    PropertyValue, PropertyValueKind, Template,
};

/// The Sparkplug B datatype names, by number (Sparkplug 3.0, section 6.4.16).
const DATATYPES: [&str; 35] = [
    "Unknown",
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "UInt8",
    "UInt16",
    "UInt32",
    "UInt64",
    "Float",
    "Double",
    "Boolean",
    "String",
    "DateTime",
    "Text",
    "UUID",
    "DataSet",
    "Bytes",
    "File",
    "Template",
    "PropertySet",
    "PropertySetList",
    "Int8Array",
    "Int16Array",
    "Int32Array",
    "Int64Array",
    "UInt8Array",
    "UInt16Array",
    "UInt32Array",
    "UInt64Array",
    "FloatArray",
    "DoubleArray",
    "BooleanArray",
    "StringArray",
    "DateTimeArray",
];

fn datatype_name(datatype: u32) -> Value {
    DATATYPES
        .get(datatype as usize)
        .map_or_else(|| json!(datatype), |name| json!(name))
}

/// What the edge node's BIRTH said of a metric.
#[derive(Debug, Default)]
pub(super) struct Known {
    /// The name of a metric that came with an alias only.
    pub name: Option<String>,
    pub datatype: Option<u32>,
    /// It came with an alias only, and no BIRTH gave that alias.
    pub unknown_alias: bool,
}

/// The whole payload.
pub(super) fn payload(
    topic: &SparkplugTopic<'_>,
    payload: &Payload,
    known: &dyn Fn(&Metric) -> Known,
) -> Result<Value, String> {
    let mut out = Map::new();
    out.insert("group_id".into(), json!(topic.group));
    out.insert("message_type".into(), json!(topic.message_type));
    out.insert("edge_node_id".into(), json!(topic.node));
    if let Some(device) = topic.device {
        out.insert("device_id".into(), json!(device));
    }
    if let Some(timestamp) = payload.timestamp {
        out.insert("timestamp".into(), json!(timestamp));
    }
    if let Some(seq) = payload.seq {
        out.insert("seq".into(), json!(seq));
    }
    if let Some(uuid) = &payload.uuid {
        out.insert("uuid".into(), json!(uuid));
    }
    if let Some(body) = &payload.body {
        out.insert("body".into(), json!(STANDARD.encode(body)));
    }
    let metrics = payload
        .metrics
        .iter()
        .map(|m| metric(m, known(m)))
        .collect::<Result<Vec<_>, _>>()?;
    out.insert("metrics".into(), Value::Array(metrics));
    Ok(Value::Object(out))
}

fn metric(metric: &Metric, known: Known) -> Result<Value, String> {
    let mut out = Map::new();
    let name = metric.name.clone().or(known.name);
    out.insert(
        "name".into(),
        name.as_ref().map_or(Value::Null, |n| json!(n)),
    );
    if let Some(alias) = metric.alias {
        out.insert("alias".into(), json!(alias));
    }
    if known.unknown_alias {
        out.insert("alias_unknown".into(), json!(true));
    }
    if let Some(timestamp) = metric.timestamp {
        out.insert("timestamp".into(), json!(timestamp));
    }
    let datatype = metric.datatype.or(known.datatype);
    if let Some(datatype) = datatype {
        out.insert("datatype".into(), datatype_name(datatype));
    }
    for (flag, value) in [
        ("is_historical", metric.is_historical),
        ("is_transient", metric.is_transient),
        ("is_null", metric.is_null),
    ] {
        if let Some(value) = value {
            out.insert(flag.into(), json!(value));
        }
    }
    if let Some(metadata) = &metric.metadata {
        out.insert("metadata".into(), metadata_json(metadata));
    }
    if let Some(properties) = &metric.properties {
        out.insert("properties".into(), property_set(properties)?);
    }
    let value = if metric.is_null == Some(true) {
        Value::Null
    } else {
        match &metric.value {
            None => Value::Null,
            Some(value) => metric_value(value, datatype)
                .map_err(|e| format!("metric {}: {e}", name.as_deref().unwrap_or("?")))?,
        }
    };
    out.insert("value".into(), value);
    Ok(Value::Object(out))
}

fn metric_value(value: &MetricValue, datatype: Option<u32>) -> Result<Value, String> {
    Ok(match value {
        MetricValue::IntValue(v) => int(*v, datatype),
        MetricValue::LongValue(v) => long(*v, datatype),
        MetricValue::FloatValue(v) => json!(f64::from(*v)),
        MetricValue::DoubleValue(v) => json!(v),
        MetricValue::BooleanValue(v) => json!(v),
        MetricValue::StringValue(v) => json!(v),
        MetricValue::BytesValue(bytes) => match datatype {
            Some(datatype @ 22..=34) => array(bytes, datatype)?,
            _ => json!(STANDARD.encode(bytes)),
        },
        MetricValue::DatasetValue(dataset) => dataset_json(dataset)?,
        MetricValue::TemplateValue(template) => template_json(template)?,
    })
}

/// The scalar fields every value message of the schema has (each under its own tags).
enum Scalar<'a> {
    Int(u32),
    Long(u64),
    Float(f32),
    Double(f64),
    Boolean(bool),
    String(&'a str),
}

/// A scalar as JSON, typed by `datatype`; null when absent.
fn scalar(value: Option<Scalar<'_>>, datatype: Option<u32>) -> Value {
    match value {
        None => Value::Null,
        Some(Scalar::Int(v)) => int(v, datatype),
        Some(Scalar::Long(v)) => long(v, datatype),
        Some(Scalar::Float(v)) => json!(f64::from(v)),
        Some(Scalar::Double(v)) => json!(v),
        Some(Scalar::Boolean(v)) => json!(v),
        Some(Scalar::String(v)) => json!(v),
    }
}

/// A 32-bit field: Int8, Int16 and Int32 are two's complement (whether the sender
/// sign-extended to 32 bits or not); unsigned otherwise.
fn int(value: u32, datatype: Option<u32>) -> Value {
    match datatype {
        Some(1) => json!(value as u8 as i8),
        Some(2) => json!(value as u16 as i16),
        Some(3) => json!(value as i32),
        _ => json!(value),
    }
}

/// A 64-bit field: Int64 is two's complement, DateTime milliseconds; unsigned otherwise.
fn long(value: u64, datatype: Option<u32>) -> Value {
    match datatype {
        Some(4) => json!(value as i64),
        _ => json!(value),
    }
}

/// An array datatype's packed little-endian bytes.
fn array(bytes: &[u8], datatype: u32) -> Result<Value, String> {
    fn each<const N: usize>(
        bytes: &[u8],
        what: &str,
        to: impl Fn([u8; N]) -> Value,
    ) -> Result<Value, String> {
        if !bytes.len().is_multiple_of(N) {
            return Err(format!(
                "{what} of {} bytes, not a multiple of {N}",
                bytes.len()
            ));
        }
        Ok(Value::Array(
            bytes
                .chunks_exact(N)
                .map(|c| to(c.try_into().unwrap_or([0; N])))
                .collect(),
        ))
    }
    let name = DATATYPES[datatype as usize];
    match datatype {
        22 => each(bytes, name, |b: [u8; 1]| json!(i8::from_le_bytes(b))),
        23 => each(bytes, name, |b: [u8; 2]| json!(i16::from_le_bytes(b))),
        24 => each(bytes, name, |b: [u8; 4]| json!(i32::from_le_bytes(b))),
        25 | 34 => each(bytes, name, |b: [u8; 8]| json!(i64::from_le_bytes(b))),
        26 => each(bytes, name, |b: [u8; 1]| json!(b[0])),
        27 => each(bytes, name, |b: [u8; 2]| json!(u16::from_le_bytes(b))),
        28 => each(bytes, name, |b: [u8; 4]| json!(u32::from_le_bytes(b))),
        29 => each(bytes, name, |b: [u8; 8]| json!(u64::from_le_bytes(b))),
        30 => each(bytes, name, |b: [u8; 4]| {
            json!(f64::from(f32::from_le_bytes(b)))
        }),
        31 => each(bytes, name, |b: [u8; 8]| json!(f64::from_le_bytes(b))),
        32 => booleans(bytes),
        33 => strings(bytes),
        _ => Ok(json!(STANDARD.encode(bytes))),
    }
}

/// BooleanArray: a 4-byte little-endian count, then the values packed 8 to a byte, most
/// significant bit first.
fn booleans(bytes: &[u8]) -> Result<Value, String> {
    let (count, bits) = bytes
        .split_first_chunk::<4>()
        .ok_or("BooleanArray shorter than its 4-byte count")?;
    let count = u32::from_le_bytes(*count) as usize;
    if bits.len() != count.div_ceil(8) {
        return Err(format!(
            "BooleanArray of {count} values in {} bytes",
            bits.len()
        ));
    }
    Ok(Value::Array(
        (0..count)
            .map(|i| json!(bits[i / 8] & (0x80 >> (i % 8)) != 0))
            .collect(),
    ))
}

/// StringArray: UTF-8 strings, each ended by a zero byte.
fn strings(bytes: &[u8]) -> Result<Value, String> {
    let Some(body) = bytes.strip_suffix(&[0]) else {
        return if bytes.is_empty() {
            Ok(json!([]))
        } else {
            Err("StringArray not ended by a zero byte".to_owned())
        };
    };
    body.split(|b| *b == 0)
        .map(|s| {
            std::str::from_utf8(s)
                .map(|s| json!(s))
                .map_err(|_| "StringArray element not UTF-8".to_owned())
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn dataset_json(dataset: &DataSet) -> Result<Value, String> {
    let columns = dataset.columns.len();
    if dataset.types.len() != columns || dataset.num_of_columns.is_some_and(|n| n != columns as u64)
    {
        return Err(format!(
            "DataSet with {columns} column names, {} types and num_of_columns {:?}",
            dataset.types.len(),
            dataset.num_of_columns
        ));
    }
    let rows = dataset
        .rows
        .iter()
        .map(|row| {
            if row.elements.len() != columns {
                return Err(format!(
                    "DataSet row of {} values for {columns} columns",
                    row.elements.len()
                ));
            }
            Ok(Value::Array(
                row.elements
                    .iter()
                    .zip(&dataset.types)
                    .map(|(element, datatype)| {
                        let value = element.value.as_ref().map(|value| match value {
                            DataSetValueKind::IntValue(v) => Scalar::Int(*v),
                            DataSetValueKind::LongValue(v) => Scalar::Long(*v),
                            DataSetValueKind::FloatValue(v) => Scalar::Float(*v),
                            DataSetValueKind::DoubleValue(v) => Scalar::Double(*v),
                            DataSetValueKind::BooleanValue(v) => Scalar::Boolean(*v),
                            DataSetValueKind::StringValue(v) => Scalar::String(v),
                        });
                        scalar(value, Some(*datatype))
                    })
                    .collect(),
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(json!({
        "num_of_columns": columns,
        "columns": dataset.columns,
        "types": dataset.types.iter().map(|t| datatype_name(*t)).collect::<Vec<_>>(),
        "rows": rows,
    }))
}

fn template_json(template: &Template) -> Result<Value, String> {
    let mut out = Map::new();
    if let Some(version) = &template.version {
        out.insert("version".into(), json!(version));
    }
    if let Some(reference) = &template.template_ref {
        out.insert("template_ref".into(), json!(reference));
    }
    if let Some(definition) = template.is_definition {
        out.insert("is_definition".into(), json!(definition));
    }
    let parameters: Vec<Value> = template
        .parameters
        .iter()
        .map(|p| {
            let value = p.value.as_ref().map(|value| match value {
                ParameterValue::IntValue(v) => Scalar::Int(*v),
                ParameterValue::LongValue(v) => Scalar::Long(*v),
                ParameterValue::FloatValue(v) => Scalar::Float(*v),
                ParameterValue::DoubleValue(v) => Scalar::Double(*v),
                ParameterValue::BooleanValue(v) => Scalar::Boolean(*v),
                ParameterValue::StringValue(v) => Scalar::String(v),
            });
            let value = scalar(value, p.r#type);
            json!({
                "name": p.name,
                "type": p.r#type.map(datatype_name),
                "value": value,
            })
        })
        .collect();
    out.insert("parameters".into(), Value::Array(parameters));
    // A template's own metrics carry their names and datatypes.
    let metrics = template
        .metrics
        .iter()
        .map(|m| metric(m, Known::default()))
        .collect::<Result<Vec<_>, _>>()?;
    out.insert("metrics".into(), Value::Array(metrics));
    Ok(Value::Object(out))
}

fn metadata_json(metadata: &MetaData) -> Value {
    let mut out = Map::new();
    let texts = [
        ("content_type", &metadata.content_type),
        ("file_name", &metadata.file_name),
        ("file_type", &metadata.file_type),
        ("md5", &metadata.md5),
        ("description", &metadata.description),
    ];
    for (name, value) in texts {
        if let Some(value) = value {
            out.insert(name.into(), json!(value));
        }
    }
    if let Some(multi) = metadata.is_multi_part {
        out.insert("is_multi_part".into(), json!(multi));
    }
    for (name, value) in [("size", metadata.size), ("seq", metadata.seq)] {
        if let Some(value) = value {
            out.insert(name.into(), json!(value));
        }
    }
    Value::Object(out)
}

/// A property set: an object of each key's typed value.
fn property_set(set: &PropertySet) -> Result<Value, String> {
    if set.keys.len() != set.values.len() {
        return Err(format!(
            "PropertySet with {} keys and {} values",
            set.keys.len(),
            set.values.len()
        ));
    }
    let mut out = Map::new();
    for (key, value) in set.keys.iter().zip(&set.values) {
        out.insert(key.clone(), property_value(value)?);
    }
    Ok(Value::Object(out))
}

fn property_value(value: &PropertyValue) -> Result<Value, String> {
    if value.is_null == Some(true) {
        return Ok(Value::Null);
    }
    let datatype = value.r#type;
    Ok(match &value.value {
        None => Value::Null,
        Some(PropertyValueKind::IntValue(v)) => scalar(Some(Scalar::Int(*v)), datatype),
        Some(PropertyValueKind::LongValue(v)) => scalar(Some(Scalar::Long(*v)), datatype),
        Some(PropertyValueKind::FloatValue(v)) => scalar(Some(Scalar::Float(*v)), datatype),
        Some(PropertyValueKind::DoubleValue(v)) => scalar(Some(Scalar::Double(*v)), datatype),
        Some(PropertyValueKind::BooleanValue(v)) => scalar(Some(Scalar::Boolean(*v)), datatype),
        Some(PropertyValueKind::StringValue(v)) => scalar(Some(Scalar::String(v)), datatype),
        Some(PropertyValueKind::PropertysetValue(set)) => property_set(set)?,
        Some(PropertyValueKind::PropertysetsValue(list)) => Value::Array(
            list.propertyset
                .iter()
                .map(property_set)
                .collect::<Result<_, _>>()?,
        ),
    })
}
