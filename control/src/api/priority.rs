//! Pod priority, as Kubernetes' Priority admission plugin decides it, and
//! the rules of PriorityClass objects.
//!
//! A new pod's `priorityClassName` names a PriorityClass (or, if empty,
//! the class marked `globalDefault`, if any); admission copies its value
//! into `spec.priority` and its `preemptionPolicy` unless the pod sets one.
//! A pod may not state a priority of its own that differs. The two system
//! classes exist from bootstrap (`bootstrap.rs`).

use serde_json::{json, Value};

use super::objects::Found;
use super::status::ApiError;
use super::ApiServer;

/// The classes every cluster has, with Kubernetes' values.
pub const SYSTEM_CLASSES: [(&str, i64, &str); 2] = [
    (
        "system-node-critical",
        2_000_001_000,
        "Used for system critical pods that must not be moved from their current node.",
    ),
    (
        "system-cluster-critical",
        2_000_000_000,
        "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
    ),
];

/// The highest value a class not named `system-*` may have.
pub const HIGHEST_USER_PRIORITY: i64 = 1_000_000_000;

/// Fills the pod's priority from `class` (the one it names, or the global
/// default when it names none); pure.
pub fn resolve(pod: &mut Value, named: &str, class: Option<&Value>) -> Result<(), ApiError> {
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let forbidden = |msg: String| ApiError::forbidden(format!("pods \"{pod_name}\" is forbidden: {msg}"));
    let (name, value, policy) = match class {
        Some(c) => (
            c["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            c["value"].as_i64().unwrap_or(0),
            c["preemptionPolicy"].as_str().unwrap_or("PreemptLowerPriority").to_string(),
        ),
        None if named.is_empty() => (String::new(), 0, "PreemptLowerPriority".to_string()),
        None => return Err(forbidden(format!("no PriorityClass with name {named} was found"))),
    };
    if let Some(stated) = pod["spec"]["priority"].as_i64() {
        if stated != value {
            return Err(forbidden(format!(
                "the integer value of priority ({stated}) must not be provided in pod spec; priority admission controller computed {value} from the given PriorityClass name"
            )));
        }
    }
    let spec = &mut pod["spec"];
    if !name.is_empty() {
        spec["priorityClassName"] = json!(name);
    }
    spec["priority"] = json!(value);
    if spec["preemptionPolicy"].as_str().is_none_or(str::is_empty) {
        spec["preemptionPolicy"] = json!(policy);
    }
    Ok(())
}

/// Admits a new pod: looks up its class and resolves its priority.
pub async fn admit_pod(api: &ApiServer, mut pod: Value) -> Result<Value, ApiError> {
    let rt = capstan_proto::k8s::registry::by_kind("scheduling.k8s.io/v1", "PriorityClass")
        .ok_or_else(|| ApiError::internal("PriorityClass is not served"))?;
    let named = pod["spec"]["priorityClassName"].as_str().unwrap_or_default().to_string();
    let class = if named.is_empty() {
        let page = api.objects.list_local(rt, None, None, None, &|kv| {
            // Stored JSON is compact serde_json: a global default says so
            // in these bytes, and the other classes need no decoding.
            let stored = capstan_proto::k8s::stored::StoredObject::access(&kv.value)
                .map_err(|e| ApiError::internal(format!("priority class: {e}")))?;
            if memchr::memmem::find(&stored.json, br#""globalDefault":true"#).is_none() {
                return Ok(None);
            }
            let v = super::objects::decode_kv(kv)?;
            Ok((v["globalDefault"] == true).then_some(v))
        })?;
        page.items.into_iter().next()
    } else {
        let mut found = api.objects.get_local(rt, None, &named)?;
        if found.is_none() {
            // Created a moment ago through another master?
            api.objects.sync().await?;
            found = api.objects.get_local(rt, None, &named)?;
        }
        found.map(|Found { object, .. }| object)
    };
    resolve(&mut pod, &named, class.as_ref())?;
    Ok(pod)
}

/// PriorityClass rules: a user class's value is at most 1e9; `system-`
/// names are reserved for the built-in classes.
pub fn validate_class(obj: &Value, errs: &mut Vec<(String, String)>) {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match obj["value"].as_i64() {
        None => errs.push(("value".into(), "Required value".into())),
        Some(v) if v > HIGHEST_USER_PRIORITY && !SYSTEM_CLASSES.iter().any(|(n, ..)| *n == name) => errs.push((
            "value".into(),
            format!("Invalid value: {v}: maximum allowed value of a user defined priority is {HIGHEST_USER_PRIORITY}"),
        )),
        Some(_) => {}
    }
    if name.starts_with("system-") && !SYSTEM_CLASSES.iter().any(|(n, ..)| *n == name) {
        errs.push(("metadata.name".into(), format!("Invalid value: {name:?}: name prefix 'system-' is reserved")));
    }
    if !matches!(obj["preemptionPolicy"].as_str(), None | Some("PreemptLowerPriority" | "Never")) {
        errs.push((
            "preemptionPolicy".into(),
            "Unsupported value: supported values: \"Never\", \"PreemptLowerPriority\"".into(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_come_from_classes() {
        let high = json!({"metadata": {"name": "high"}, "value": 1000, "preemptionPolicy": "Never"});
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"priorityClassName": "high"}});
        resolve(&mut pod, "high", Some(&high)).unwrap();
        assert_eq!(
            (pod["spec"]["priority"].clone(), pod["spec"]["preemptionPolicy"].clone()),
            (json!(1000), json!("Never"))
        );

        let mut plain = json!({"metadata": {"name": "p"}, "spec": {}});
        resolve(&mut plain, "", None).unwrap();
        assert_eq!(plain["spec"]["priority"], 0);
        let mut defaulted = json!({"metadata": {"name": "p"}, "spec": {}});
        resolve(&mut defaulted, "", Some(&high)).unwrap();
        assert_eq!(
            (defaulted["spec"]["priorityClassName"].clone(), defaulted["spec"]["priority"].clone()),
            (json!("high"), json!(1000))
        );

        let mut missing = json!({"metadata": {"name": "p"}, "spec": {"priorityClassName": "nope"}});
        let e = resolve(&mut missing, "nope", None).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (403, "pods \"p\" is forbidden: no PriorityClass with name nope was found")
        );
        let mut lying = json!({"metadata": {"name": "p"}, "spec": {"priority": 5}});
        assert_eq!(resolve(&mut lying, "", None).unwrap_err().code, 403);
        let mut honest = json!({"metadata": {"name": "p"}, "spec": {"priority": 1000, "priorityClassName": "high"}});
        assert!(resolve(&mut honest, "high", Some(&high)).is_ok());
    }

    #[test]
    fn class_rules() {
        let errs = |v: Value| {
            let mut e = Vec::new();
            validate_class(&v, &mut e);
            e
        };
        assert!(errs(json!({"metadata": {"name": "ok"}, "value": 10})).is_empty());
        assert!(errs(json!({"metadata": {"name": "system-cluster-critical"}, "value": 2_000_000_000})).is_empty());
        assert_eq!(errs(json!({"metadata": {"name": "big"}, "value": 2_000_000_000}))[0].0, "value");
        assert_eq!(errs(json!({"metadata": {"name": "system-mine"}, "value": 1}))[0].0, "metadata.name");
        assert_eq!(errs(json!({"metadata": {"name": "x"}}))[0].1, "Required value");
        assert_eq!(
            errs(json!({"metadata": {"name": "x"}, "value": 1, "preemptionPolicy": "Sometimes"}))[0].0,
            "preemptionPolicy"
        );
    }
}
