//! Sparkplug B (`KAFKA_VALUE_FORMAT=sparkplug-json`): payloads on
//! `spBv1.0/<group>/<type>/<node>[/<device>]` decoded from protobuf into JSON, metric aliases
//! resolved from the latest BIRTH of their edge node.
//!
//! - Numbers stay numbers: `timestamp` and `seq` (uint64) are JSON numbers, not strings; each
//!   metric's value has the JSON type of its Sparkplug datatype (signed integers sign-extended,
//!   arrays unpacked from their little-endian bytes, datasets as columns and typed rows,
//!   templates with their parameters and metrics, property sets as objects).
//! - Aliases: NBIRTH and DBIRTH map names (and datatypes) to aliases, per edge node (Sparkplug
//!   makes an alias unique within its edge node, devices included). A metric carrying only an
//!   alias gets its name and datatype from there; an alias no BIRTH gave is reported as
//!   `"alias_unknown": true` with a null name, never guessed. NBIRTH starts the node afresh.
//!   At most [`MAX_NODES`] edge nodes are remembered; beyond that the one not heard from longest
//!   is forgotten (its aliases come back with its next BIRTH).
//! - `spBv1.0/STATE/<host>` (JSON in Sparkplug 3.0) passes through unchanged.

mod json;
pub mod proto;

use std::collections::HashMap;

pub use proto::Payload;

/// Edge nodes whose aliases are remembered at most.
pub const MAX_NODES: usize = 10_000;

/// The parts of a Sparkplug B topic.
#[derive(Debug, PartialEq, Eq)]
pub struct SparkplugTopic<'a> {
    pub group: &'a str,
    /// NBIRTH, NDATA, NDEATH, NCMD, DBIRTH, DDATA, DDEATH, DCMD.
    pub message_type: &'a str,
    pub node: &'a str,
    pub device: Option<&'a str>,
}

/// What a topic is to Sparkplug.
#[derive(Debug, PartialEq, Eq)]
pub enum Namespace<'a> {
    /// Not under `spBv1.0/`.
    Other,
    /// `spBv1.0/STATE/<host>`: JSON already.
    State,
    Message(SparkplugTopic<'a>),
}

impl<'a> Namespace<'a> {
    pub fn of(topic: &'a str) -> Result<Self, String> {
        let Some(rest) = topic.strip_prefix("spBv1.0/") else {
            return Ok(Self::Other);
        };
        let levels: Vec<&str> = rest.split('/').collect();
        match levels.as_slice() {
            ["STATE", _] => Ok(Self::State),
            [group, message_type, node] => Ok(Self::Message(SparkplugTopic {
                group,
                message_type,
                node,
                device: None,
            })),
            [group, message_type, node, device] => Ok(Self::Message(SparkplugTopic {
                group,
                message_type,
                node,
                device: Some(device),
            })),
            _ => Err(format!(
                "not a Sparkplug B topic: {topic} (spBv1.0/<group>/<type>/<node>[/<device>])"
            )),
        }
    }
}

/// A metric's name and datatype, as its BIRTH gave them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Born {
    name: String,
    datatype: Option<u32>,
}

/// The names and datatypes of one edge node's metrics (its devices' included).
#[derive(Debug, Default)]
struct Node {
    by_alias: HashMap<u64, Born>,
    /// Datatypes by name, for DATA metrics that carry a name but no datatype.
    datatypes: HashMap<String, u32>,
    /// When it was last heard from, in messages decoded (for forgetting the oldest).
    heard: u64,
}

/// The alias tables of the edge nodes seen, and the decoding.
#[derive(Debug, Default)]
pub struct Decoder {
    nodes: HashMap<(String, String), Node>,
    decoded: u64,
    /// Edge nodes forgotten to stay within [`MAX_NODES`].
    pub forgotten: u64,
}

impl Decoder {
    /// The JSON value of a payload on `topic`: `Ok(None)` when the topic is not Sparkplug's
    /// (another format applies), the payload itself for STATE, `Err` with why when it does
    /// not decode.
    pub fn to_json(&mut self, topic: &str, payload: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let parts = match Namespace::of(topic)? {
            Namespace::Other => return Ok(None),
            Namespace::State => return Ok(Some(payload.to_vec())),
            Namespace::Message(parts) => parts,
        };
        let decoded: Payload = prost::Message::decode(payload)
            .map_err(|e| format!("not a Sparkplug B payload: {e}"))?;
        self.decoded += 1;
        let node = self.node(parts.group, parts.node, parts.message_type == "NBIRTH");
        if parts.message_type.ends_with("BIRTH") {
            for metric in &decoded.metrics {
                if let Some(name) = &metric.name {
                    if let Some(alias) = metric.alias {
                        node.by_alias.insert(
                            alias,
                            Born {
                                name: name.clone(),
                                datatype: metric.datatype,
                            },
                        );
                    }
                    if let Some(datatype) = metric.datatype {
                        node.datatypes.insert(name.clone(), datatype);
                    }
                }
            }
        }
        let json = json::payload(&parts, &decoded, &|metric| {
            lookup(node, metric.alias, metric.name.as_deref())
        })?;
        serde_json::to_vec(&json)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// The alias table of an edge node, created (or, for NBIRTH, started afresh) as needed.
    fn node(&mut self, group: &str, node: &str, birth: bool) -> &mut Node {
        let key = (group.to_owned(), node.to_owned());
        if !self.nodes.contains_key(&key) && self.nodes.len() >= MAX_NODES {
            let oldest = self
                .nodes
                .iter()
                .min_by_key(|(_, node)| node.heard)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.nodes.remove(&oldest);
                self.forgotten += 1;
            }
        }
        let entry = self.nodes.entry(key).or_default();
        if birth {
            *entry = Node::default();
        }
        entry.heard = self.decoded;
        entry
    }
}

/// What a metric's BIRTH said: its name when it came with an alias only, and its datatype.
fn lookup(node: &Node, alias: Option<u64>, name: Option<&str>) -> json::Known {
    match (name, alias) {
        (Some(name), alias) => json::Known {
            name: None,
            datatype: node.datatypes.get(name).copied().or_else(|| {
                alias
                    .and_then(|a| node.by_alias.get(&a))
                    .and_then(|b| b.datatype)
            }),
            unknown_alias: false,
        },
        (None, Some(alias)) => match node.by_alias.get(&alias) {
            Some(born) => json::Known {
                name: Some(born.name.clone()),
                datatype: born.datatype,
                unknown_alias: false,
            },
            None => json::Known {
                name: None,
                datatype: None,
                unknown_alias: true,
            },
        },
        (None, None) => json::Known::default(),
    }
}

#[cfg(test)]
mod tests;
