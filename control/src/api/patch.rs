//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and
//! Kubernetes' strategic merge patch. Pure functions over JSON values.
//!
//! Strategic merge merges lists by their patch merge key (containers by
//! `name`, container ports by `containerPort`, ...) and understands the
//! directives `$patch` (replace/delete/merge), `$setElementOrder/<list>`,
//! `$deleteFromPrimitiveList/<list>` and `$retainKeys`. The merge keys are
//! Kubernetes' `patchMergeKey` struct tags for the built-in kinds.

use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        match ct.split(';').next().unwrap_or_default().trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// Applies an RFC 6902 patch; `test` failures and bad paths are errors.
pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, String> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| format!("invalid JSON patch: {e}"))?;
    let mut out = doc.clone();
    json_patch::patch(&mut out, &ops).map_err(|e| format!("the JSON patch could not be applied: {e}"))?;
    Ok(out)
}

/// Applies an RFC 7386 merge patch (`null` removes a field).
pub fn merge_patch(doc: &Value, patch: &Value) -> Result<Value, String> {
    if !patch.is_object() {
        return Err("a merge patch must be a JSON object".into());
    }
    let mut out = doc.clone();
    json_patch::merge(&mut out, patch);
    Ok(out)
}

/// How a list field merges under a strategic merge patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListStrategy {
    /// Merge items that share this key's value; append the others.
    Key(&'static str),
    /// A list of scalars merged as a set (e.g. `finalizers`).
    Set,
    Replace,
}

/// Kubernetes' patchMergeKey tags, by field name. Where one name carries
/// different keys in different types, the items decide (`ports`).
fn list_strategy(field: &str, items: &[&Value]) -> ListStrategy {
    let has = |k: &str| items.iter().any(|i| i.get(k).is_some());
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => ListStrategy::Key("name"),
        "ports" if has("containerPort") => ListStrategy::Key("containerPort"),
        "ports" if has("port") => ListStrategy::Key("port"),
        "volumeMounts" => ListStrategy::Key("mountPath"),
        "volumeDevices" => ListStrategy::Key("devicePath"),
        "hostAliases" => ListStrategy::Key("ip"),
        "conditions" => ListStrategy::Key("type"),
        "ownerReferences" => ListStrategy::Key("uid"),
        "taints" => ListStrategy::Key("key"),
        "topologySpreadConstraints" => ListStrategy::Key("topologyKey"),
        "addresses" if has("type") && has("address") => ListStrategy::Key("type"),
        "finalizers" => ListStrategy::Set,
        _ => ListStrategy::Replace,
    }
}

/// How server-side apply identifies a list's items: `Some(Some(key))` by
/// merge key, `Some(None)` as a set of values, `None` atomic.
pub fn list_key(field: &str, items: &[Value]) -> Option<Option<&'static str>> {
    match list_strategy(field, &items.iter().collect::<Vec<_>>()) {
        ListStrategy::Key(k) => Some(Some(k)),
        ListStrategy::Set => Some(None),
        ListStrategy::Replace => None,
    }
}

/// The patch strategy of a list field in the named schema definition, for
/// the OpenAPI document: `Some(Some(key))` merge by key, `Some(None)` merge
/// as a set, `None` replace.
pub fn schema_merge_key(def: &str, field: &str) -> Option<Option<&'static str>> {
    let items: Vec<Value> = match (def, field) {
        ("io.k8s.api.core.v1.ServiceSpec", "ports") => vec![serde_json::json!({"port": 1})],
        (d, "ports") if d.ends_with(".Container") || d.ends_with(".EphemeralContainer") => {
            vec![serde_json::json!({"containerPort": 1})]
        }
        (_, "ports") => return None,
        (d, "addresses") if d.ends_with(".NodeStatus") => vec![serde_json::json!({"type": "a", "address": "b"})],
        _ => vec![],
    };
    match list_strategy(field, &items.iter().collect::<Vec<_>>()) {
        ListStrategy::Key(k) => Some(Some(k)),
        ListStrategy::Set => Some(None),
        ListStrategy::Replace => None,
    }
}

/// Applies a strategic merge patch to `doc`.
pub fn strategic_merge(doc: &Value, patch: &Value) -> Result<Value, String> {
    if !patch.is_object() {
        return Err("a strategic merge patch must be a JSON object".into());
    }
    match merge_value(Some(doc), patch)? {
        Some(v) => Ok(v),
        None => Err("the patch deletes the whole object".into()),
    }
}

/// `None` = the field is deleted.
fn merge_value(orig: Option<&Value>, patch: &Value) -> Result<Option<Value>, String> {
    match patch {
        Value::Null => Ok(None),
        Value::Object(p) => {
            match p.get("$patch").and_then(Value::as_str) {
                Some("delete") => return Ok(None),
                Some("replace") => {
                    let mut m = p.clone();
                    m.remove("$patch");
                    return Ok(Some(Value::Object(strip_directives(m))));
                }
                Some("merge") | None => {}
                Some(other) => return Err(format!("unknown patch directive {other:?}")),
            }
            let base = match orig {
                Some(Value::Object(o)) => o.clone(),
                _ => Map::new(),
            };
            merge_map(base, p).map(|m| Some(Value::Object(m)))
        }
        other => Ok(Some(other.clone())),
    }
}

fn merge_map(mut out: Map<String, Value>, p: &Map<String, Value>) -> Result<Map<String, Value>, String> {
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        match v {
            Value::Array(items) => {
                let orig = out.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
                let merged = merge_list(k, &orig, items)?;
                out.insert(k.clone(), Value::Array(merged));
            }
            _ => match merge_value(out.get(k), v)? {
                Some(m) => {
                    out.insert(k.clone(), m);
                }
                None => {
                    out.remove(k);
                }
            },
        }
    }
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = v.as_array().ok_or("$deleteFromPrimitiveList needs a list")?;
            if let Some(Value::Array(list)) = out.get_mut(field) {
                list.retain(|x| !remove.contains(x));
            }
        }
    }
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            let order = v.as_array().ok_or("$setElementOrder needs a list")?;
            if let Some(Value::Array(list)) = out.get_mut(field) {
                reorder(field, list, order);
            }
        }
    }
    if let Some(keep) = p.get("$retainKeys") {
        let keep: Vec<&str> =
            keep.as_array().ok_or("$retainKeys needs a list")?.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(out)
}

fn merge_list(field: &str, orig: &[Value], patch: &[Value]) -> Result<Vec<Value>, String> {
    let all: Vec<&Value> = orig.iter().chain(patch).collect();
    match list_strategy(field, &all) {
        ListStrategy::Replace => {
            Ok(patch.iter().filter(|i| i.get("$patch").is_none()).map(|v| strip_value(v.clone())).collect())
        }
        ListStrategy::Set => {
            let mut out = orig.to_vec();
            for v in patch {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListStrategy::Key(key) => {
            if patch.iter().any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace")) {
                return Ok(patch
                    .iter()
                    .filter(|i| i.get("$patch").is_none())
                    .map(|v| strip_value(v.clone()))
                    .collect());
            }
            let mut out = orig.to_vec();
            for item in patch {
                let Some(k) = item.get(key) else {
                    return Err(format!("the list {field} is merged by {key:?}, but an item has none"));
                };
                let pos = out.iter().position(|o| o.get(key) == Some(k));
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        out.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => {
                        if let Some(m) = merge_value(Some(&out[i]), item)? {
                            out[i] = m;
                        }
                    }
                    (None, false) => {
                        if let Some(m) = merge_value(None, item)? {
                            out.push(m);
                        }
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Orders `list` as `order` says (by merge key, or by value for scalar
/// lists); items the order does not name keep their place after those it names.
fn reorder(field: &str, list: &mut Vec<Value>, order: &[Value]) {
    let strategy = list_strategy(field, &list.iter().chain(order).collect::<Vec<_>>());
    let key_of = |v: &Value| -> Value {
        match strategy {
            ListStrategy::Key(k) => v.get(k).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let rank = |v: &Value| order.iter().position(|o| key_of(o) == key_of(v)).unwrap_or(usize::MAX);
    let mut ranked: Vec<(usize, usize, Value)> = list.drain(..).enumerate().map(|(i, v)| (rank(&v), i, v)).collect();
    ranked.sort_by_key(|(r, i, _)| (*r, *i));
    list.extend(ranked.into_iter().map(|(_, _, v)| v));
}

fn strip_directives(m: Map<String, Value>) -> Map<String, Value> {
    m.into_iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k, strip_value(v))).collect()
}

fn strip_value(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip_directives(m)),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_value).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> Value {
        json!({"metadata": {"name": "web", "labels": {"app": "web", "tier": "x"}, "finalizers": ["a"]},
            "spec": {"replicas": 1, "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
              "template": {"spec": {"containers": [
                {"name": "app", "image": "a:1", "ports": [{"containerPort": 80}, {"containerPort": 443}],
                 "env": [{"name": "A", "value": "1"}]},
                {"name": "side", "image": "s:1"}]}}}})
    }

    #[test]
    fn merges_lists_by_key_and_keeps_untouched_items() {
        let p = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "a:2", "ports": [{"containerPort": 8080}]}]}}}});
        let out = strategic_merge(&deployment(), &p).unwrap();
        let c = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(c[0]["image"], "a:2");
        assert_eq!(c[0]["ports"].as_array().unwrap().len(), 3, "ports merged by containerPort");
        assert_eq!(c[0]["env"][0]["value"], "1");
        assert_eq!(c[1]["name"], "side");
    }

    #[test]
    fn directives() {
        let p = json!({
            "metadata": {"labels": {"tier": null}, "finalizers": ["b"]},
            "spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"},
              "template": {"spec": {
                "$setElementOrder/containers": [{"name": "side"}, {"name": "app"}],
                "containers": [{"name": "app", "ports": [{"containerPort": 443, "$patch": "delete"}]}]}}}});
        let out = strategic_merge(&deployment(), &p).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        let c = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(c[0]["name"], "side");
        assert_eq!(c[1]["ports"], json!([{"containerPort": 80}]));

        let p = json!({"spec": {"template": {"spec": {"containers": [{"$patch": "replace"}, {"name": "only", "image": "o"}]}}}});
        let out = strategic_merge(&deployment(), &p).unwrap();
        assert_eq!(out["spec"]["template"]["spec"]["containers"], json!([{"name": "only", "image": "o"}]));

        let p = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}});
        assert_eq!(strategic_merge(&deployment(), &p).unwrap()["metadata"]["finalizers"], json!([]));
        let p = json!({"spec": {"template": {"$patch": "delete"}}});
        assert!(strategic_merge(&deployment(), &p).unwrap()["spec"].get("template").is_none());
        assert!(strategic_merge(&deployment(), &json!([1])).is_err());
        let p = json!({"spec": {"template": {"spec": {"containers": [{"image": "nokey"}]}}}});
        assert!(strategic_merge(&deployment(), &p).is_err());
    }

    #[test]
    fn json_and_merge_patches() {
        let d = deployment();
        let out = json_patch(
            &d,
            &json!([{"op": "test", "path": "/spec/replicas", "value": 1},
            {"op": "replace", "path": "/spec/replicas", "value": 3}]),
        )
        .unwrap();
        assert_eq!(out["spec"]["replicas"], 3);
        assert!(json_patch(&d, &json!([{"op": "test", "path": "/spec/replicas", "value": 2}])).is_err());
        assert!(json_patch(&d, &json!({"op": "nonsense"})).is_err());
        let out = merge_patch(&d, &json!({"metadata": {"labels": {"app": null}}})).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"tier": "x"}));
    }
}
