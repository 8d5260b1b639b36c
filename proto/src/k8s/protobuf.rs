//! Kubernetes' protobuf encoding of request bodies
//! (`application/vnd.kubernetes.protobuf`), which kubectl's typed clients
//! send for `create namespace`, `auth can-i`, evictions and the like.
//!
//! A body is the magic `k8s\0` followed by a `runtime.Unknown` that names
//! the object's apiVersion/kind and carries its protobuf bytes. The message
//! is decoded dynamically against Kubernetes' schema (`proto/k8s`, compiled
//! into a descriptor set at build time) and rendered as the same JSON a
//! JSON client would have sent: field names are the JSON names, and the
//! types with a custom JSON form (Time, Quantity, IntOrString, RawExtension,
//! FieldsV1) are rendered as Kubernetes renders them. Fields this schema
//! does not know are an error, never silently dropped.

use std::sync::LazyLock;

use base64::Engine;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, ReflectMessage, Value as PValue};
use serde_json::{json, Map, Value};

const MAGIC: &[u8] = b"k8s\0";

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(&include_bytes!(concat!(env!("OUT_DIR"), "/k8s-descriptors.bin"))[..])
        .map_err(|e| e.to_string())
});

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtobufError {
    #[error("protobuf body does not start with the Kubernetes magic number")]
    NoMagic,
    #[error("invalid protobuf body: {0}")]
    Invalid(String),
    #[error("protobuf bodies of {0} are not supported; send JSON or YAML")]
    UnknownKind(String),
    #[error("protobuf field {field} of {message} is not known to this server; send JSON or YAML")]
    UnknownField { message: String, field: u32 },
}

fn pool() -> Result<&'static DescriptorPool, ProtobufError> {
    POOL.as_ref().map_err(|e| ProtobufError::Invalid(format!("descriptor set: {e}")))
}

fn message(name: &str) -> Result<MessageDescriptor, ProtobufError> {
    pool()?.get_message_by_name(name).ok_or_else(|| ProtobufError::UnknownKind(name.to_string()))
}

/// The protobuf package of an apiVersion: `v1` -> core, `apps/v1` -> apps,
/// `rbac.authorization.k8s.io/v1` -> rbac, `meta.k8s.io/v1` -> apimachinery meta.
fn package(api_version: &str) -> String {
    match api_version.split_once('/') {
        None => format!("k8s.io.api.core.{api_version}"),
        Some(("meta.k8s.io", v)) => format!("k8s.io.apimachinery.pkg.apis.meta.{v}"),
        Some((group, v)) => format!("k8s.io.api.{}.{v}", group.split('.').next().unwrap_or(group)),
    }
}

/// Decodes a protobuf request body into the object's JSON.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let rest = body.strip_prefix(MAGIC).ok_or(ProtobufError::NoMagic)?;
    let unknown = DynamicMessage::decode(message("k8s.io.apimachinery.pkg.runtime.Unknown")?, rest)
        .map_err(|e| ProtobufError::Invalid(e.to_string()))?;
    let u = to_json(&unknown)?;
    let api_version = u["typeMeta"]["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = u["typeMeta"]["kind"].as_str().unwrap_or_default().to_string();
    if kind.is_empty() || api_version.is_empty() {
        return Err(ProtobufError::Invalid("runtime.Unknown without apiVersion/kind".into()));
    }
    if u["contentEncoding"].as_str().is_some_and(|e| !e.is_empty()) {
        return Err(ProtobufError::Invalid("content encodings are not supported".into()));
    }
    let raw = match unknown.get_field_by_name("raw").as_deref() {
        Some(PValue::Bytes(b)) => b.clone(),
        _ => Default::default(),
    };
    let desc = message(&format!("{}.{kind}", package(&api_version)))
        .map_err(|_| ProtobufError::UnknownKind(format!("{api_version} {kind}")))?;
    let msg = DynamicMessage::decode(desc, raw).map_err(|e| ProtobufError::Invalid(e.to_string()))?;
    let mut v = to_json(&msg)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), json!(api_version));
        m.insert("kind".into(), json!(kind));
    }
    Ok(v)
}

/// Go's zero `time.Time` (year 1), which Go's JSON renders as null.
const GO_ZERO_TIME: i64 = -62_135_596_800;

fn rfc3339(seconds: i64, nanos: i64, micros: bool) -> Result<Value, ProtobufError> {
    // Go's metav1.Time marshals its zero value as an empty message (0, 0).
    if seconds <= GO_ZERO_TIME || (seconds == 0 && nanos == 0) {
        return Ok(Value::Null);
    }
    let t = chrono::DateTime::from_timestamp(seconds, nanos.clamp(0, 999_999_999) as u32)
        .ok_or_else(|| ProtobufError::Invalid(format!("time out of range: {seconds}")))?;
    let format = if micros { chrono::SecondsFormat::Micros } else { chrono::SecondsFormat::Secs };
    Ok(json!(t.to_rfc3339_opts(format, true)))
}

fn int_field(msg: &DynamicMessage, name: &str) -> i64 {
    match msg.get_field_by_name(name).as_deref() {
        Some(PValue::I64(n)) => *n,
        Some(PValue::I32(n)) => i64::from(*n),
        _ => 0,
    }
}

fn to_json(msg: &DynamicMessage) -> Result<Value, ProtobufError> {
    let desc = msg.descriptor();
    if let Some(f) = msg.unknown_fields().next() {
        return Err(ProtobufError::UnknownField { message: desc.full_name().to_string(), field: f.number() });
    }
    let raw_json = |m: &DynamicMessage| -> Result<Value, ProtobufError> {
        match m.get_field_by_name("raw").as_deref() {
            Some(PValue::Bytes(b)) if !b.is_empty() => {
                serde_json::from_slice(b).map_err(|e| ProtobufError::Invalid(format!("embedded JSON: {e}")))
            }
            _ => Ok(json!({})),
        }
    };
    match desc.full_name() {
        "k8s.io.apimachinery.pkg.apis.meta.v1.Time" => {
            return rfc3339(int_field(msg, "seconds"), int_field(msg, "nanos"), false)
        }
        "k8s.io.apimachinery.pkg.apis.meta.v1.MicroTime" => {
            return rfc3339(int_field(msg, "seconds"), int_field(msg, "nanos"), true)
        }
        "k8s.io.apimachinery.pkg.apis.meta.v1.Duration" => {
            let d = std::time::Duration::from_nanos(int_field(msg, "duration").max(0) as u64);
            return Ok(json!(format!("{}s", d.as_secs_f64())));
        }
        "k8s.io.apimachinery.pkg.api.resource.Quantity" => {
            return Ok(match msg.get_field_by_name("string").as_deref() {
                Some(PValue::String(s)) => json!(s),
                _ => json!("0"),
            })
        }
        "k8s.io.apimachinery.pkg.util.intstr.IntOrString" => {
            return Ok(if int_field(msg, "type") == 0 {
                json!(int_field(msg, "intVal"))
            } else {
                match msg.get_field_by_name("strVal").as_deref() {
                    Some(PValue::String(s)) => json!(s),
                    _ => json!(""),
                }
            })
        }
        "k8s.io.apimachinery.pkg.runtime.RawExtension" | "k8s.io.apimachinery.pkg.apis.meta.v1.FieldsV1" => {
            return raw_json(msg)
        }
        _ => {}
    }
    let mut out = Map::new();
    for (field, value) in msg.fields() {
        let name = field.json_name();
        if is_go_zero(name, value) {
            continue;
        }
        match value_json(value)? {
            Value::Null => {}
            v => {
                out.insert(name.to_string(), v);
            }
        }
    }
    Ok(Value::Object(out))
}

/// Fields Go declares as pointers, where an explicit 0/false differs from
/// "unset" (`replicas: 0`, `automountServiceAccountToken: false`, ...).
const POINTER_SCALARS: &[&str] = &[
    "replicas",
    "parallelism",
    "completions",
    "backoffLimit",
    "backoffLimitPerIndex",
    "maxFailedIndexes",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "startingDeadlineSeconds",
    "successfulJobsHistoryLimit",
    "failedJobsHistoryLimit",
    "suspend",
    "manualSelector",
    "revisionHistoryLimit",
    "progressDeadlineSeconds",
    "terminationGracePeriodSeconds",
    "deletionGracePeriodSeconds",
    "gracePeriodSeconds",
    "expirationSeconds",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "hostUsers",
    "shareProcessNamespace",
    "setHostnameAsFQDN",
    "priority",
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "fsGroup",
    "privileged",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "defaultMode",
    "mode",
    "optional",
    "immutable",
    "partition",
    "minReplicas",
    "orphanDependents",
    "readOnly",
    "allocateLoadBalancerNodePorts",
    "publishNotReadyAddresses",
    "ready",
    "serving",
    "terminating",
    "leaseDurationSeconds",
    "leaseTransitions",
    "stabilizationWindowSeconds",
    "averageUtilization",
    "timeoutSeconds",
    "unhealthyPodEvictionPolicy",
    "minReadySeconds",
];

/// Go's typed clients write every non-pointer field, zero or not; Go's JSON
/// omits zero ones (`omitempty`) and Kubernetes' defaulting treats them as
/// unset. Empty strings and zero/false scalars are therefore dropped,
/// except for the pointer fields where they are a real value.
fn is_go_zero(name: &str, v: &PValue) -> bool {
    match v {
        PValue::String(s) => s.is_empty(),
        PValue::Bool(false) | PValue::I32(0) | PValue::I64(0) => !POINTER_SCALARS.contains(&name),
        _ => false,
    }
}

fn value_json(v: &PValue) -> Result<Value, ProtobufError> {
    Ok(match v {
        PValue::Bool(b) => json!(b),
        PValue::I32(n) => json!(n),
        PValue::I64(n) => json!(n),
        PValue::U32(n) => json!(n),
        PValue::U64(n) => json!(n),
        PValue::F32(n) => json!(n),
        PValue::F64(n) => json!(n),
        PValue::String(s) => json!(s),
        PValue::Bytes(b) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        PValue::EnumNumber(n) => json!(n),
        PValue::Message(m) => to_json(m)?,
        PValue::List(items) => Value::Array(items.iter().map(value_json).collect::<Result<_, _>>()?),
        PValue::Map(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    MapKey::String(s) => s.clone(),
                    MapKey::Bool(b) => b.to_string(),
                    MapKey::I32(n) => n.to_string(),
                    MapKey::I64(n) => n.to_string(),
                    MapKey::U32(n) => n.to_string(),
                    MapKey::U64(n) => n.to_string(),
                };
                out.insert(key, value_json(v)?);
            }
            Value::Object(out)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::prost::Message;

    /// Encodes `fields` (json -> protobuf through the same schema) as a
    /// typed client would: the test builds bodies the way kubectl does.
    fn body(api_version: &str, kind: &str, obj: &Value) -> Vec<u8> {
        let desc = message(&format!("{}.{kind}", package(api_version))).unwrap();
        let msg = DynamicMessage::deserialize(desc, obj.clone()).unwrap();
        let unknown = DynamicMessage::deserialize(
            message("k8s.io.apimachinery.pkg.runtime.Unknown").unwrap(),
            json!({"typeMeta": {"apiVersion": api_version, "kind": kind},
                "raw": base64::engine::general_purpose::STANDARD.encode(msg.encode_to_vec())}),
        )
        .unwrap();
        let mut out = MAGIC.to_vec();
        out.extend(unknown.encode_to_vec());
        out
    }

    #[test]
    fn decodes_what_typed_clients_send() {
        let ns = decode(&body(
            "v1",
            "Namespace",
            &json!({"metadata": {"name": "team", "labels": {"a": "b"}, "generateName": ""}}),
        ))
        .unwrap();
        assert_eq!(
            ns,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team", "labels": {"a": "b"}}})
        );
        let zeros = json!({"spec": {"replicas": 0, "minReadySeconds": 0, "paused": false,
            "template": {"spec": {"restartPolicy": "", "automountServiceAccountToken": false, "hostNetwork": false}}}});
        let v = decode(&body("apps/v1", "Deployment", &zeros)).unwrap();
        assert_eq!(
            v["spec"],
            json!({"replicas": 0, "minReadySeconds": 0, "template": {"spec": {"automountServiceAccountToken": false}}})
        );

        let d = json!({"metadata": {"name": "web", "creationTimestamp": {"seconds": 1767225600}},
            "spec": {"replicas": 2, "strategy": {"rollingUpdate": {"maxSurge": {"type": 1, "strVal": "25%"}, "maxUnavailable": {"type": 0, "intVal": 1}}},
              "template": {"spec": {"containers": [{"name": "c", "image": "nginx", "resources": {"limits": {"cpu": {"string": "500m"}}}}]}}}});
        let v = decode(&body("apps/v1", "Deployment", &d)).unwrap();
        assert_eq!(v["metadata"]["creationTimestamp"], "2026-01-01T00:00:00Z");
        assert_eq!(v["spec"]["strategy"]["rollingUpdate"], json!({"maxSurge": "25%", "maxUnavailable": 1}));
        assert_eq!(v["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"], "500m");

        let ssar = json!({"spec": {"resourceAttributes": {"verb": "create", "resource": "pods", "namespace": "d"}}});
        let v = decode(&body("authorization.k8s.io/v1", "SelfSubjectAccessReview", &ssar)).unwrap();
        assert_eq!(v["spec"]["resourceAttributes"]["verb"], "create");

        let secret = json!({"metadata": {"name": "s"}, "data": {"k": base64::engine::general_purpose::STANDARD.encode(b"\x00\x01")}});
        assert_eq!(decode(&body("v1", "Secret", &secret)).unwrap()["data"]["k"], "AAE=");
    }

    #[test]
    fn rejects_what_it_cannot_decode_faithfully() {
        assert_eq!(decode(b"{}"), Err(ProtobufError::NoMagic));
        assert!(matches!(decode(b"k8s\0\xff\xff"), Err(ProtobufError::Invalid(_))));
        let mut b = body("v1", "Namespace", &json!({"metadata": {"name": "x"}}));
        assert!(decode(&b).is_ok());
        // An unknown kind, and a field number the schema lacks.
        let nokind = body("v1", "Namespace", &json!({}));
        let s = String::from_utf8_lossy(&nokind).replace("Namespace", "Nonsense!");
        assert!(matches!(decode(s.as_bytes()), Err(ProtobufError::UnknownKind(_))));
        let desc = message("k8s.io.api.core.v1.Namespace").unwrap();
        let mut raw = DynamicMessage::deserialize(desc, json!({"metadata": {"name": "x"}})).unwrap().encode_to_vec();
        raw.extend([0xb8, 0x3e, 0x01]); // field 999, varint 1
        let unknown = DynamicMessage::deserialize(
            message("k8s.io.apimachinery.pkg.runtime.Unknown").unwrap(),
            json!({"typeMeta": {"apiVersion": "v1", "kind": "Namespace"}, "raw": base64::engine::general_purpose::STANDARD.encode(&raw)}),
        )
        .unwrap();
        b = MAGIC.to_vec();
        b.extend(unknown.encode_to_vec());
        assert!(matches!(decode(&b), Err(ProtobufError::UnknownField { field: 999, .. })));
    }
}
