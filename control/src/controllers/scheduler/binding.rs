//! A binding written into the stored pod's JSON text.
//!
//! A binding changes two fields of a pod: `spec.nodeName` and the
//! `PodScheduled` condition. Decoding the whole pod into a `Value`,
//! setting them, writing it out again and dropping the `Value` was a
//! fifth of the leader's CPU in a plain-pod burst. Here the pod's text is
//! split at its top-level and `spec` fields (their values stay text,
//! copied as they are), only `status` — a few conditions — is decoded,
//! and the pieces are joined again. Stored JSON is serde_json's own
//! compact output with sorted keys, so the result is byte for byte what
//! the `Value` path writes (tested). Text this cannot split (never stored:
//! admission wrote it) gives `None`, and the caller takes the `Value`
//! path.

use std::collections::BTreeMap;

use serde_json::value::{to_raw_value, RawValue};
use serde_json::Value;

use super::model::PodInfo;
use crate::api::admission::set_condition;

/// The pod `stored` (its JSON) bound to `node` at `now`: `spec.nodeName`
/// set and `PodScheduled=True`, as the `Value` path sets them.
pub fn bound_json(stored: &[u8], node: &str, now: &str) -> Option<Vec<u8>> {
    // Keys borrowed: a key with escapes fails here, and is left to the
    // `Value` path.
    let mut top: BTreeMap<&str, &RawValue> = serde_json::from_slice(stored).ok()?;
    let mut spec: BTreeMap<&str, &RawValue> = serde_json::from_str(top.get("spec")?.get()).ok()?;
    let node = to_raw_value(node).ok()?;
    spec.insert("nodeName", &node);
    let spec = to_raw_value(&spec).ok()?;
    let status = match top.get("status") {
        Some(s) => serde_json::from_str::<Value>(s.get()).ok()?,
        None => Value::Null,
    };
    let mut holder = serde_json::json!({ "status": status });
    set_condition(&mut holder, "PodScheduled", "True", None, now);
    let status = to_raw_value(&holder["status"]).ok()?;
    top.insert("spec", &spec);
    top.insert("status", &status);
    serde_json::to_vec(&top).ok()
}

/// The scheduler's view of a pod after [`bound_json`]: the binding
/// changes nothing else it reads (tested), so the bound text need not be
/// parsed again.
pub fn bound_info(info: &PodInfo, node: &str) -> PodInfo {
    PodInfo { node_name: node.to_string(), ..info.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::k8s::stored::StoredObject;
    use serde_json::json;

    /// What the scheduler wrote before: the whole pod decoded and edited.
    fn by_value(pod: &Value, node: &str, now: &str) -> Vec<u8> {
        let mut bound = pod.clone();
        bound["spec"]["nodeName"] = json!(node);
        set_condition(&mut bound, "PodScheduled", "True", None, now);
        StoredObject::from_object(&bound).unwrap().json
    }

    #[test]
    fn the_text_is_what_the_value_path_writes() {
        let now = "2026-11-27T06:00:00Z";
        let pods = [
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "d", "uid": "u", "labels": {"app": "web"},
                    "annotations": {"note": "quote \" and \\ and \u{e9}"},
                    "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:containers": {}}}}]},
                "spec": {"containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "100m"}}}],
                    "nodeName": null, "schedulerName": "default-scheduler", "priority": 0,
                    "tolerations": [{"key": "k", "operator": "Exists", "tolerationSeconds": 300}]},
                "status": {"phase": "Pending", "nominatedNodeName": "n9", "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/5 nodes"},
                    {"type": "Other", "status": "True"}]}}),
            json!({"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}}),
            json!({"metadata": {"name": "p"}, "spec": {"nodeName": "elsewhere"}}),
            json!({"metadata": {"name": "p"}, "spec": {"containers": []}, "status": {"conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "earlier"}]}}),
            json!({"metadata": {"name": "p"}, "spec": {}, "status": null}),
            json!({"metadata": {"name": "p", "deletionTimestamp": "2026-11-27T06:00:00Z"},
                "spec": {"schedulerName": "other"}, "status": {"phase": "Succeeded"}}),
        ];
        for pod in pods {
            let stored = StoredObject::from_object(&pod).unwrap().json;
            let text = bound_json(&stored, "node-1", now).expect("splits");
            assert_eq!(PodInfo::from_json(&text), bound_info(&PodInfo::from_json(&stored), "node-1"), "{pod}");
            assert_eq!(String::from_utf8(text).unwrap(), String::from_utf8(by_value(&pod, "node-1", now)).unwrap());
        }
    }

    #[test]
    fn text_it_cannot_split_is_left_to_the_value_path() {
        for odd in [&br#"{"spec": "x"}"#[..], br#"{"metadata": {}}"#, br#"[1]"#, b"{not json", br#"{"sp\u0065c": {}}"#]
        {
            assert_eq!(bound_json(odd, "n", "t"), None, "{}", String::from_utf8_lossy(odd));
        }
    }
}
