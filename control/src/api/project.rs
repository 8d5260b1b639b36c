//! Decoding only the parts of a stored object a reader needs. A Table row
//! of a pod needs its metadata and a handful of spec and status fields;
//! decoding (and later dropping) the whole spec of every pod in a
//! 10,000-pod list is most of that list's cost (measured: `perf` showed
//! ~50% of a table list in building and dropping `serde_json::Value`s).
//!
//! A [`Shape`] names the fields to keep; everything else is skipped by the
//! parser without being built. Arrays keep their length (each element
//! shaped), so counts such as "containers" stay right.

use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// Keep the whole value.
    All,
    /// Keep only these fields of an object (of each element, for arrays).
    Fields(&'static [(&'static str, Shape)]),
}

const ALL_META: (&str, Shape) = ("metadata", Shape::All);
const NAMES_IMAGES: Shape = Shape::Fields(&[("name", Shape::All), ("image", Shape::All)]);
const COUNT: Shape = Shape::Fields(&[]);
const TEMPLATE: Shape =
    Shape::Fields(&[("spec", Shape::Fields(&[("containers", NAMES_IMAGES), ("nodeSelector", Shape::All)]))]);
const WORKLOAD: Shape = Shape::Fields(&[
    ALL_META,
    (
        "spec",
        Shape::Fields(&[
            ("replicas", Shape::All),
            ("selector", Shape::All),
            ("template", TEMPLATE),
            ("completions", Shape::All),
            ("parallelism", Shape::All),
        ]),
    ),
    ("status", Shape::All),
]);

/// What a Table row of `kind` reads (see `table.rs`), or `All`.
pub fn table_shape(kind: &str) -> Shape {
    match kind {
        "Pod" => Shape::Fields(&[
            ALL_META,
            (
                "spec",
                Shape::Fields(&[
                    ("containers", COUNT),
                    ("initContainers", COUNT),
                    ("readinessGates", COUNT),
                    ("nodeName", Shape::All),
                ]),
            ),
            ("status", Shape::All),
        ]),
        "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" | "Job" => WORKLOAD,
        _ => Shape::All,
    }
}

/// Parses `json` keeping only what `shape` names.
pub fn decode(json: &[u8], shape: Shape) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let v = Seed(shape).deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

struct Seed(Shape);

impl<'de> DeserializeSeed<'de> for Seed {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        match self.0 {
            Shape::All => serde::Deserialize::deserialize(d),
            Shape::Fields(_) => d.deserialize_any(self),
        }
    }
}

impl<'de> Visitor<'de> for Seed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Shape::Fields(fields) = self.0 else { unreachable!("All never visits") };
        let mut out = Map::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match fields.iter().find(|(k, _)| *k == key) {
                Some((k, shape)) => {
                    out.insert((*k).to_string(), map.next_value_seed(Seed(*shape))?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Seed(self.0))? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_what_the_shape_names_and_array_lengths() {
        let pod = json!({"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"nodeName": "n",
            "containers": [{"name": "a", "image": "x", "env": [{"name": "E"}]}, {"name": "b"}], "tolerations": [{}]},
            "status": {"phase": "Running"}});
        let v = decode(pod.to_string().as_bytes(), table_shape("Pod")).unwrap();
        assert_eq!(
            v,
            json!({"metadata": pod["metadata"], "spec": {"nodeName": "n", "containers": [{}, {}]}, "status": pod["status"]})
        );
        assert_eq!(decode(pod.to_string().as_bytes(), Shape::All).unwrap(), pod);
        assert!(decode(b"{\"metadata\": [", table_shape("Pod")).is_err());
        // Every kind's Table row is the same from the projection as from the whole object.
        let now = chrono::Utc::now();
        let deploy = json!({"metadata": {"name": "d"}, "spec": {"replicas": 3, "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i", "ports": []}],
              "nodeSelector": {"disk": "ssd"}}}}, "status": {"readyReplicas": 1}});
        for obj in [&pod, &deploy] {
            for rt in capstan_proto::k8s::registry::all() {
                let full = super::super::table::row(rt.kind, obj.clone(), now, "Metadata");
                let projected = decode(obj.to_string().as_bytes(), table_shape(rt.kind)).unwrap();
                assert_eq!(full, super::super::table::row(rt.kind, projected, now, "Metadata"), "{}", rt.kind);
            }
        }
    }
}
