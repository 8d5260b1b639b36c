//! Server-side apply (`PATCH` with `application/apply-patch+yaml`): field
//! ownership in `metadata.managedFields` (FieldsV1), conflicts (409) unless
//! `force`, and removal of fields a manager stopped applying when nobody
//! else owns them.
//!
//! Paths are FieldsV1 path elements: `f:<field>`, `k:{<merge keys>}` for an
//! item of a keyed list, `v:<value>` for a set item, and `.` for "this list
//! item exists". Lists merge with the same strategies as strategic merge
//! patch (`patch.rs`), so both patch styles agree on list identity.

use std::collections::BTreeSet;

use capstan_proto::k8s::registry::ResourceType;
use http::StatusCode;
use serde_json::{json, Map, Value};

use super::patch::{list_key, strategic_merge};
use super::status::ApiError;
use super::{admission, ApiServer, Ctx, Reply, ReplyBody};

pub type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// Metadata fields that are identity or system-owned, never managed.
const UNMANAGED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// The fields an applied configuration sets.
pub fn field_set(config: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(m) = config.as_object() else { return out };
    for (k, v) in m {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for (mk, mv) in v.as_object().into_iter().flatten() {
                    if !UNMANAGED_META.contains(&mk.as_str()) {
                        collect(mv, mk, &mut vec!["f:metadata".into(), format!("f:{mk}")], &mut out);
                    }
                }
            }
            _ => collect(v, k, &mut vec![format!("f:{k}")], &mut out),
        }
    }
    out
}

fn collect(v: &Value, field: &str, prefix: &mut Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                prefix.push(format!("f:{k}"));
                collect(c, k, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => match list_key(field, items) {
            Some(Some(key)) => {
                for item in items {
                    let id = json!({ key: item.get(key).cloned().unwrap_or(Value::Null) });
                    prefix.push(format!("k:{id}"));
                    let mut dot = prefix.clone();
                    dot.push(".".into());
                    out.insert(dot);
                    if let Some(m) = item.as_object() {
                        for (k, c) in m {
                            prefix.push(format!("f:{k}"));
                            collect(c, k, prefix, out);
                            prefix.pop();
                        }
                    }
                    prefix.pop();
                }
            }
            Some(None) => {
                for item in items {
                    let mut p = prefix.clone();
                    p.push(format!("v:{item}"));
                    out.insert(p);
                }
            }
            None => {
                out.insert(prefix.clone());
            }
        },
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// FieldsV1 JSON of a set.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for el in path {
            node =
                node.entry(el.clone()).or_insert_with(|| json!({})).as_object_mut().expect("fields nodes are objects");
        }
    }
    Value::Object(root)
}

/// The set a FieldsV1 JSON names (leaves and `.` markers).
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(v: &Value, prefix: &mut Path, out: &mut FieldSet) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, c) in m {
                    prefix.push(k.clone());
                    walk(c, prefix, out);
                    prefix.pop();
                }
            }
            _ => {
                if !prefix.is_empty() {
                    out.insert(prefix.clone());
                }
            }
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// The value at a path, if present.
fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for el in path {
        cur = step(cur, el)?;
    }
    Some(cur)
}

fn step<'a>(cur: &'a Value, el: &str) -> Option<&'a Value> {
    if el == "." {
        return Some(cur);
    }
    if let Some(f) = el.strip_prefix("f:") {
        return cur.get(f);
    }
    let items = cur.as_array()?;
    if let Some(k) = el.strip_prefix("k:") {
        let id: Map<String, Value> = serde_json::from_str(k).ok()?;
        return items.iter().find(|i| id.iter().all(|(ik, iv)| i.get(ik) == Some(iv)));
    }
    if let Some(v) = el.strip_prefix("v:") {
        let want: Value = serde_json::from_str(v).ok()?;
        return items.iter().find(|i| **i == want);
    }
    None
}

/// Removes the value at a path (a field, a keyed item, a set item).
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parent_path)) = path.split_last() else { return };
    let (target, parent_path) = if last == "." {
        match parent_path.split_last() {
            Some((item, pp)) => (item.as_str(), pp),
            None => return,
        }
    } else {
        (last.as_str(), parent_path)
    };
    let mut cur = obj;
    for el in parent_path {
        let next = if el == "." {
            continue;
        } else if let Some(f) = el.strip_prefix("f:") {
            cur.get_mut(f)
        } else {
            let idx = value_at(cur, std::slice::from_ref(el))
                .and_then(|found| cur.as_array().and_then(|a| a.iter().position(|i| std::ptr::eq(i, found))));
            match idx {
                Some(i) => cur.get_mut(i),
                None => None,
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = target.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(found) = value_at(cur, &[target.to_string()]) {
        let found = found as *const Value;
        if let Some(a) = cur.as_array_mut() {
            a.retain(|i| !std::ptr::eq(i, found));
        }
    }
}

fn managers(obj: &Value) -> Vec<Value> {
    obj["metadata"]["managedFields"].as_array().cloned().unwrap_or_default()
}

fn entry(rt: &ResourceType, manager: &str, operation: &str, set: &FieldSet, now: &str) -> Value {
    entry_with(rt, manager, operation, to_fields_v1(set), now)
}

/// A managedFields entry owning `fields` (FieldsV1 JSON). Built by hand:
/// `json!` would copy the fields through serialization.
fn entry_with(rt: &ResourceType, manager: &str, operation: &str, fields: Value, now: &str) -> Value {
    let mut e = Map::new();
    for (k, v) in [("manager", manager), ("operation", operation), ("time", now), ("fieldsType", "FieldsV1")] {
        e.insert(k.into(), Value::String(v.into()));
    }
    e.insert("apiVersion".into(), Value::String(rt.api_version()));
    e.insert("fieldsV1".into(), fields);
    Value::Object(e)
}

/// `to_fields_v1(&field_set(obj))`, built straight from the object: a
/// create owns every field it sets, and going through the set cloned
/// every path of every field (most of a create's managedFields cost).
pub fn fields_v1_of(obj: &Value) -> Value {
    let mut root = Map::new();
    for (k, v) in obj.as_object().into_iter().flatten() {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                let mut meta = Map::new();
                for (mk, mv) in v.as_object().into_iter().flatten() {
                    if !UNMANAGED_META.contains(&mk.as_str()) {
                        add_field(&mut meta, mk, mv);
                    }
                }
                if !meta.is_empty() {
                    merge_into(&mut root, "f:metadata".into(), Value::Object(meta));
                }
            }
            _ => add_field(&mut root, k, v),
        }
    }
    Value::Object(root)
}

/// Adds field `k` (value `v`) to `node` as `f:<k>`, if it names any path.
fn add_field(node: &mut Map<String, Value>, k: &str, v: &Value) {
    if let Some(t) = fields_tree(v, k) {
        merge_into(node, format!("f:{k}"), t);
    }
}

/// The FieldsV1 subtree of value `v` of field `field`, as [`collect`]
/// names its paths; `None` when it names none (an empty list).
fn fields_tree(v: &Value, field: &str) -> Option<Value> {
    let mut node = Map::new();
    let leaf = match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                add_field(&mut node, k, c);
            }
            false
        }
        Value::Array(items) => match list_key(field, items) {
            Some(Some(key)) => {
                for item in items {
                    let id = json!({ key: item.get(key).cloned().unwrap_or(Value::Null) });
                    let mut child = Map::new();
                    child.insert(".".into(), json!({}));
                    for (k, c) in item.as_object().into_iter().flatten() {
                        add_field(&mut child, k, c);
                    }
                    merge_into(&mut node, format!("k:{id}"), Value::Object(child));
                }
                false
            }
            Some(None) => {
                for item in items {
                    merge_into(&mut node, format!("v:{item}"), json!({}));
                }
                false
            }
            None => true,
        },
        _ => true,
    };
    (leaf || !node.is_empty()).then_some(Value::Object(node))
}

/// Inserts `t` under `k`, merging with a subtree already there (two list
/// items with the same key name the same fields).
fn merge_into(node: &mut Map<String, Value>, k: String, t: Value) {
    match (node.get_mut(&k), t) {
        (Some(Value::Object(have)), Value::Object(add)) => {
            for (ck, cv) in add {
                merge_into(have, ck, cv);
            }
        }
        (_, t) => {
            node.insert(k, t);
        }
    }
}

fn manager_name(ctx: &Ctx) -> Result<String, ApiError> {
    ctx.query.get("fieldManager").map(str::to_string).ok_or_else(|| {
        ApiError::bad_request("PATCH with application/apply-patch+yaml requires the fieldManager parameter")
    })
}

fn check_config(rt: &ResourceType, config: &Value, name: &str) -> Result<(), ApiError> {
    if config["apiVersion"].as_str() != Some(&rt.api_version()) || config["kind"].as_str() != Some(rt.kind) {
        return Err(ApiError::bad_request(format!(
            "apply configurations must name apiVersion {} and kind {}",
            rt.api_version(),
            rt.kind
        )));
    }
    match config["metadata"]["name"].as_str() {
        Some(n) if n == name => Ok(()),
        _ => Err(ApiError::bad_request(format!("the applied configuration's metadata.name must be {name:?}"))),
    }
}

/// The object after `ctx`'s manager applies `config` to `current`:
/// conflicts checked, fields it dropped removed, managedFields updated.
pub fn apply(rt: &ResourceType, current: &Value, config: &Value, ctx: &Ctx) -> Result<Value, ApiError> {
    let name = current["metadata"]["name"].as_str().unwrap_or_default().to_string();
    check_config(rt, config, &name)?;
    let manager = manager_name(ctx)?;
    let force = ctx.query.flag("force");
    let now = super::handlers::now();
    let applied = field_set(config);
    let mut entries = managers(current);
    let mut prev = FieldSet::new();
    let mut conflicts: Vec<(String, String)> = Vec::new();
    let mut conflicting: FieldSet = FieldSet::new();
    for e in &entries {
        let set = from_fields_v1(&e["fieldsV1"]);
        let m = e["manager"].as_str().unwrap_or_default();
        if m == manager && e["operation"] == "Apply" {
            prev = set;
            continue;
        }
        for p in set.intersection(&applied) {
            if p.last().is_some_and(|l| l == ".") {
                continue;
            }
            if value_at(current, p).is_some_and(|cur| Some(cur) != value_at(config, p)) {
                conflicts.push((m.to_string(), display(p)));
                conflicting.insert(p.clone());
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let msg = conflicts.iter().map(|(m, p)| format!("conflict with \"{m}\": {p}")).collect::<Vec<_>>().join("\n- ");
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(m, p)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\""), "field": p}))
            .collect();
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Apply failed with {} conflict{}: {msg}",
                conflicts.len(),
                if conflicts.len() == 1 { "" } else { "s" }
            ),
        )
        .with_details(json!({"name": name, "kind": rt.plural, "causes": causes})));
    }
    // Forced: the others lose the fields that conflicted; fields applied
    // with the value they already had stay shared.
    let mut others: Vec<(Value, FieldSet)> = Vec::new();
    for e in entries.drain(..) {
        let is_me = e["manager"].as_str() == Some(&manager) && e["operation"] == "Apply";
        if is_me {
            continue;
        }
        let mut set = from_fields_v1(&e["fieldsV1"]);
        set.retain(|p| !conflicting.contains(p));
        if !set.is_empty() {
            others.push((e, set));
        }
    }
    let mut obj = current.clone();
    let owned_by_others = |p: &Path| others.iter().any(|(_, s)| s.contains(p));
    let mut dropped: Vec<&Path> = prev.difference(&applied).filter(|p| !owned_by_others(p)).collect();
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in dropped {
        remove_at(&mut obj, p);
    }
    let mut merged = strategic_merge(&obj, config).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut out_entries: Vec<Value> = others
        .into_iter()
        .map(|(mut e, set)| {
            e["fieldsV1"] = to_fields_v1(&set);
            e
        })
        .collect();
    out_entries.push(entry(rt, &manager, "Apply", &applied, &now));
    merged["metadata"]["managedFields"] = Value::Array(out_entries);
    // The applied config's resourceVersion (if any) is a precondition the caller checks.
    match config["metadata"]["resourceVersion"].as_str() {
        Some(rv) => merged["metadata"]["resourceVersion"] = json!(rv),
        None => merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone(),
    }
    Ok(merged)
}

/// Records a non-apply write (create, update, patch, scale) in
/// managedFields as Kubernetes does: `manager` (operation Update) takes
/// ownership of every field the write set or changed, other managers lose
/// those fields, and fields the write removed are owned by nobody.
pub fn track_update(rt: &ResourceType, old: Option<&Value>, new: &mut Value, manager: &str, now: &str) {
    if old.is_none() && new["metadata"].get("managedFields").is_none_or(Value::is_null) {
        // A create with no managers yet: the manager owns every field.
        let fields = fields_v1_of(new);
        if fields.as_object().is_some_and(|f| !f.is_empty()) {
            new["metadata"]["managedFields"] = Value::Array(vec![entry_with(rt, manager, "Update", fields, now)]);
        }
        return;
    }
    let new_set = field_set(new);
    let old_set = old.map(field_set).unwrap_or_default();
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| match old {
            None => true,
            Some(o) => !old_set.contains(*p) || value_at(o, p) != value_at(new, p),
        })
        .cloned()
        .collect();
    let removed: FieldSet = old_set.difference(&new_set).cloned().collect();
    if changed.is_empty() && removed.is_empty() {
        return;
    }
    let mut entries = managers(new);
    let mut mine = FieldSet::new();
    entries.retain_mut(|e| {
        let mut set = from_fields_v1(&e["fieldsV1"]);
        if e["manager"].as_str() == Some(manager) && e["operation"] == "Update" {
            mine = set;
            return false;
        }
        set.retain(|p| !changed.contains(p) && !removed.contains(p));
        e["fieldsV1"] = to_fields_v1(&set);
        !set.is_empty()
    });
    mine.retain(|p| !removed.contains(p));
    mine.extend(changed);
    if !mine.is_empty() {
        entries.push(entry(rt, manager, "Update", &mine, now));
    }
    if entries.is_empty() {
        if let Some(m) = new["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        new["metadata"]["managedFields"] = Value::Array(entries);
    }
}

/// The manager of a non-apply write: `?fieldManager=`, else the client's
/// name from its User-Agent (`kubectl/v1.32.4 (...)` -> `kubectl`), as
/// Kubernetes defaults it.
pub fn update_manager(ctx: &Ctx) -> String {
    if let Some(m) = ctx.query.get("fieldManager") {
        return m.to_string();
    }
    let ua = ctx.user_agent.split('/').next().unwrap_or_default().trim();
    if ua.is_empty() {
        "unknown".into()
    } else {
        ua.chars().take(128).collect()
    }
}

/// `.spec.replicas`-style rendering of a path for conflict messages.
fn display(p: &Path) -> String {
    let mut s = String::new();
    for el in p {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if el != "." {
            s.push('[');
            s.push_str(&el[2..]);
            s.push(']');
        }
    }
    s
}

/// Apply to an object that does not exist yet: create it from the config.
pub async fn create(
    api: &ApiServer,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    config: &Value,
    ctx: &Ctx,
) -> Result<Reply, ApiError> {
    check_config(rt, config, name)?;
    let manager = manager_name(ctx)?;
    let now = super::handlers::now();
    let mut obj = config.clone();
    obj["metadata"]["managedFields"] = json!([entry(rt, &manager, "Apply", &field_set(config), &now)]);
    let (obj, warnings) = super::handlers::normalize(rt, &obj, ctx)?;
    let mut obj = admission::prepare_create(rt, ns, obj, &now, &uuid::Uuid::new_v4().to_string(), "")?;
    obj = super::admission::admit_new(api, rt, obj).await?;
    let created = api.objects.create(rt, obj).await?;
    Ok(Reply { code: StatusCode::CREATED, body: ReplyBody::Json(created), warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::k8s::registry::by_kind;

    fn ctx(manager: &str, force: bool) -> Ctx {
        Ctx {
            user: super::super::rbac::User { name: "u".into(), groups: vec![] },
            query: super::super::request::Query::parse(Some(&format!("fieldManager={manager}&force={force}"))),
            accept: String::new(),
            content_type: String::new(),
            user_agent: String::new(),
            body: Default::default(),
            upgrade: None,
        }
    }

    fn deploy(replicas: i64, ports: &[i64]) -> Value {
        let ports: Vec<Value> = ports.iter().map(|p| json!({"containerPort": p})).collect();
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"a": "1"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "c", "image": "i", "ports": ports}]}}}})
    }

    /// The fields of a create, built straight from the object, are the
    /// set's: keyed and set lists, duplicate keys, empty lists and
    /// objects, metadata with nothing managed.
    #[test]
    fn a_creates_fields_are_its_field_sets() {
        let objects = [
            deploy(3, &[80, 443]),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "d",
                    "labels": {"app": "web"}, "finalizers": ["a/b", "c/d"], "annotations": {}},
                "spec": {"containers": [
                        {"name": "a", "image": "i", "env": [{"name": "X", "value": "1"}, {"name": "X", "value": "2"}],
                            "ports": [{"containerPort": 80, "protocol": "TCP"}], "resources": {"requests": {"cpu": "1"}}},
                        {"name": "a", "args": ["x"]}],
                    "initContainers": [], "volumes": [{"name": "v", "emptyDir": {}}],
                    "tolerations": [{"key": "k", "operator": "Exists"}], "nodeSelector": {}},
                "status": {"phase": "Pending"}}),
            json!({"metadata": {"name": "only-identity", "uid": "u"}, "data": {"k": "v"}}),
            json!({"metadata": {"name": "n"}, "spec": {"list": [], "obj": {"inner": []}}}),
            json!({"kind": "NoMetadata", "x": null, "y": 1}),
            json!("not an object"),
        ];
        for obj in objects {
            assert_eq!(fields_v1_of(&obj), to_fields_v1(&field_set(&obj)), "{obj}");
        }
    }

    #[test]
    fn updates_take_over_the_fields_they_change() {
        let rt = by_kind("apps/v1", "Deployment").unwrap();
        let mut created = deploy(1, &[80]);
        track_update(rt, None, &mut created, "kubectl-create", "t0");
        let applied = apply(rt, &created, &deploy(1, &[80]), &ctx("kubectl", false)).unwrap();
        let mut scaled = applied.clone();
        scaled["spec"]["replicas"] = json!(4);
        track_update(rt, Some(&applied), &mut scaled, "kubectl-scale", "t1");
        let e = apply(rt, &scaled, &deploy(2, &[80]), &ctx("kubectl", false)).unwrap_err();
        assert!(e.message.contains("conflict with \"kubectl-scale\": .spec.replicas"), "{}", e.message);
        let owners: Vec<&str> = scaled["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["manager"].as_str().unwrap())
            .collect();
        assert!(owners.contains(&"kubectl-create") && owners.contains(&"kubectl-scale"), "{owners:?}");
        // A no-op write changes no ownership.
        let mut same = scaled.clone();
        track_update(rt, Some(&scaled), &mut same, "other", "t2");
        assert_eq!(same, scaled);
    }

    #[test]
    fn fields_v1_round_trips() {
        let set = field_set(&deploy(1, &[80]));
        assert!(set.contains(&vec!["f:spec".to_string(), "f:replicas".to_string()]));
        let item = r#"k:{"name":"c"}"#.to_string();
        assert!(set.iter().any(|p| p.contains(&item) && p.last().unwrap() == "."));
        assert_eq!(from_fields_v1(&to_fields_v1(&set)), set);
    }

    #[test]
    fn conflicts_force_and_removal() {
        let rt = by_kind("apps/v1", "Deployment").unwrap();
        let mut cur = deploy(1, &[80]);
        cur["metadata"]["resourceVersion"] = json!("5");
        let a = apply(rt, &cur, &deploy(2, &[80, 443]), &ctx("alice", false)).unwrap();
        assert_eq!(a["spec"]["replicas"], 2);
        assert_eq!(a["spec"]["template"]["spec"]["containers"][0]["ports"].as_array().unwrap().len(), 2);
        // bob applies a different replica count: conflict, unless forced.
        let e = apply(rt, &a, &deploy(3, &[80, 443]), &ctx("bob", false)).unwrap_err();
        assert_eq!(e.code, 409);
        assert!(e.message.contains("conflict with \"alice\": .spec.replicas"), "{}", e.message);
        let b = apply(rt, &a, &deploy(3, &[80, 443]), &ctx("bob", true)).unwrap();
        assert_eq!(b["spec"]["replicas"], 3);
        let alice = b["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["manager"] == "alice")
            .unwrap()
            .clone();
        assert!(alice["fieldsV1"]["f:spec"].get("f:replicas").is_none(), "the forced field moved to bob");
        assert!(alice["fieldsV1"]["f:metadata"]["f:labels"].get("f:a").is_some(), "same-valued fields stay shared");
        // alice drops port 443; bob still owns it (he applied it too), so it stays.
        let c = apply(rt, &b, &deploy(3, &[80]), &ctx("alice", true)).unwrap();
        assert_eq!(c["spec"]["template"]["spec"]["containers"][0]["ports"].as_array().unwrap().len(), 2);
        // bob drops it as well: now nobody owns it and it goes.
        let d = apply(rt, &c, &deploy(3, &[80]), &ctx("bob", false)).unwrap();
        assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["ports"], json!([{"containerPort": 80}]));
        // Same value as another owner is shared ownership, not a conflict.
        assert!(apply(rt, &d, &deploy(3, &[80]), &ctx("carol", false)).is_ok());
        assert!(apply(rt, &d, &json!({"kind": "Deployment", "metadata": {"name": "web"}}), &ctx("x", false)).is_err());
    }
}
