//! Node selector terms and their requirements, as Kubernetes matches them:
//! shared by the scheduler (node affinity, volume node affinity) and the
//! node agent (a local volume's node affinity checked before mounting).

use std::collections::BTreeMap;

use serde_json::Value;

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
    /// An operator Kubernetes does not know: matches nothing.
    Invalid,
}

/// One requirement of a label or node selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: Vec<String>,
}

impl Requirement {
    pub fn parse(e: &Value) -> Requirement {
        let op = match e["operator"].as_str().unwrap_or_default() {
            "In" => Op::In,
            "NotIn" => Op::NotIn,
            "Exists" => Op::Exists,
            "DoesNotExist" => Op::DoesNotExist,
            "Gt" => Op::Gt,
            "Lt" => Op::Lt,
            _ => Op::Invalid,
        };
        Requirement { key: e["key"].as_str().unwrap_or_default().to_string(), op, values: strings(&e["values"]) }
    }

    pub fn matches(&self, got: Option<&str>) -> bool {
        let has = |g: &str| self.values.iter().any(|v| v == g);
        match self.op {
            Op::In => got.is_some_and(has),
            Op::NotIn => got.is_none_or(|g| !has(g)),
            Op::Exists => got.is_some(),
            Op::DoesNotExist => got.is_none(),
            Op::Gt | Op::Lt => {
                let (Some(g), Some(v)) =
                    (got.and_then(|g| g.parse::<i64>().ok()), self.values.first().and_then(|v| v.parse::<i64>().ok()))
                else {
                    return false;
                };
                if self.op == Op::Gt {
                    g > v
                } else {
                    g < v
                }
            }
            Op::Invalid => false,
        }
    }
}

/// A node selector term: expressions on labels, fields on the name.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSelectorTerm {
    exprs: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl NodeSelectorTerm {
    pub fn parse(t: &Value) -> NodeSelectorTerm {
        let reqs = |k: &str| t[k].as_array().into_iter().flatten().map(Requirement::parse).collect();
        NodeSelectorTerm { exprs: reqs("matchExpressions"), fields: reqs("matchFields") }
    }

    /// Whether the node `name` with `labels` is selected. An empty term
    /// matches no node, as in Kubernetes; `metadata.name` is the only field
    /// a term may name.
    pub fn matches(&self, labels: &BTreeMap<String, String>, name: &str) -> bool {
        if self.exprs.is_empty() && self.fields.is_empty() {
            return false;
        }
        self.exprs.iter().all(|r| r.matches(labels.get(&r.key).map(String::as_str)))
            && self.fields.iter().all(|r| r.key == "metadata.name" && r.matches(Some(name)))
    }
}
