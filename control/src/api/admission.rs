//! What happens to an object between decoding and the store: system
//! metadata (uid, creationTimestamp, generation, generateName), Kubernetes'
//! defaults, and validation. Pure: the caller passes `now` and fresh uids.

use capstan_proto::k8s::registry::ResourceType;
use serde_json::{json, Map, Value};

use super::status::ApiError;

/// Kinds whose `metadata.generation` tracks spec changes.
fn has_generation(kind: &str) -> bool {
    matches!(
        kind,
        "Deployment"
            | "ReplicaSet"
            | "DaemonSet"
            | "StatefulSet"
            | "Job"
            | "CronJob"
            | "PodDisruptionBudget"
            | "HorizontalPodAutoscaler"
    )
}

/// Fills system metadata and defaults on a new object, then validates it.
pub fn prepare_create(
    rt: &ResourceType,
    namespace: Option<&str>,
    mut obj: Value,
    now: &str,
    uid: &str,
    suffix: &str,
) -> Result<Value, ApiError> {
    let meta = obj.as_object_mut().and_then(|o| o.get_mut("metadata")).and_then(Value::as_object_mut);
    let Some(meta) = meta else {
        return Err(ApiError::invalid(rt.kind, "", vec![("metadata".into(), "Required value".into())]));
    };
    if meta.get("name").and_then(Value::as_str).unwrap_or_default().is_empty() {
        match meta.get("generateName").and_then(Value::as_str) {
            Some(g) if !g.is_empty() => {
                let name = format!("{g}{suffix}");
                meta.insert("name".into(), Value::String(name));
            }
            _ => {
                return Err(ApiError::invalid(
                    rt.kind,
                    "",
                    vec![("metadata.name".into(), "Required value: name or generateName is required".into())],
                ))
            }
        }
    }
    if rt.namespaced {
        let url_ns = namespace.unwrap_or("default");
        match meta.get("namespace").and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() && ns != url_ns => {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({ns}) does not match the namespace sent on the request ({url_ns})"
                )))
            }
            _ => {
                meta.insert("namespace".into(), Value::String(url_ns.to_string()));
            }
        }
    } else {
        meta.remove("namespace");
    }
    meta.insert("uid".into(), Value::String(uid.to_string()));
    meta.insert("creationTimestamp".into(), Value::String(now.to_string()));
    for k in ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"] {
        meta.remove(k);
    }
    if has_generation(rt.kind) {
        meta.insert("generation".into(), json!(1));
    } else {
        meta.remove("generation");
    }
    set_api_version_kind(rt, &mut obj);
    if rt.kind == "Job" && obj["spec"]["manualSelector"] != true {
        // Kubernetes selects a Job's pods by its uid, so two Jobs never adopt
        // each other's pods, and labels the template to match.
        let name = obj["metadata"]["name"].clone();
        obj["spec"]["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
        let t = &mut obj["spec"]["template"];
        if !t["metadata"].is_object() {
            t["metadata"] = json!({});
        }
        for (k, v) in [
            ("batch.kubernetes.io/controller-uid", json!(uid)),
            ("batch.kubernetes.io/job-name", name.clone()),
            ("controller-uid", json!(uid)),
            ("job-name", name),
        ] {
            t["metadata"]["labels"][k] = v;
        }
    }
    if rt.subresources.contains(&"status") && rt.kind != "Node" {
        // Status is the system's to write (through /status), never the
        // creator's — except a Node's, which its agent registers with.
        if let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
    }
    default_object(rt.kind, &mut obj);
    super::storage::on_create(rt.kind, &mut obj);
    if rt.kind == "Namespace" {
        // Kubernetes' namespace strategy: every namespace is emptied before
        // it goes, whatever spec it was created with (`kubectl create ns`
        // sends an empty one).
        obj["spec"]["finalizers"] = json!([NAMESPACE_FINALIZER]);
    }
    validate(rt, &obj)?;
    Ok(obj)
}

/// The finalizer the namespace controller removes once a namespace is empty.
pub const NAMESPACE_FINALIZER: &str = "kubernetes";

/// Merges an update onto the stored object: identity and system fields
/// stay, `generation` moves when the spec changes, and the main resource
/// and its `status` subresource each change only their own part.
pub fn prepare_update(
    rt: &ResourceType,
    old: &Value,
    mut new: Value,
    subresource: Option<&str>,
) -> Result<Value, ApiError> {
    if !new.get("metadata").is_some_and(Value::is_object) {
        return Err(ApiError::invalid(rt.kind, "", vec![("metadata".into(), "Required value".into())]));
    }
    let name = old["metadata"]["name"].as_str().unwrap_or_default().to_string();
    match new["metadata"]["name"].as_str() {
        Some(n) if n == name => {}
        None | Some("") => {}
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )))
        }
    }
    set_api_version_kind(rt, &mut new);
    let has_status_sub = rt.subresources.contains(&"status");
    if subresource == Some("ephemeralcontainers") {
        // Only spec.ephemeralContainers moves, and only by additions.
        let list = new["spec"]["ephemeralContainers"].take();
        check_ephemeral(&old["spec"], &list).map_err(|errs| ApiError::invalid(rt.kind, &name, errs))?;
        // (The resourceVersion precondition was checked against the body.)
        let mut merged = old.clone();
        merged["spec"]["ephemeralContainers"] = list;
        new = merged;
    } else if rt.kind == "Pod" {
        // As in Kubernetes, a pod update keeps the ephemeral containers
        // (they change through pods/ephemeralcontainers only).
        match old["spec"].get("ephemeralContainers") {
            Some(e) => new["spec"]["ephemeralContainers"] = e.clone(),
            None => {
                if let Some(s) = new["spec"].as_object_mut() {
                    s.remove("ephemeralContainers");
                }
            }
        }
    }
    if let Some(obj) = new.as_object_mut() {
        match subresource {
            Some("status") => {
                // Only status moves; everything else is the stored object's.
                let status = obj.remove("status");
                let mut merged = old.as_object().cloned().unwrap_or_default();
                match status {
                    Some(s) => merged.insert("status".into(), s),
                    None => merged.remove("status"),
                };
                // Labels, annotations and finalizers may be set through status too.
                *obj = merged;
            }
            _ if has_status_sub => match old.get("status") {
                Some(s) => {
                    obj.insert("status".into(), s.clone());
                }
                None => {
                    obj.remove("status");
                }
            },
            _ => {}
        }
    }
    let (old_meta, new_meta) = (&old["metadata"], &mut new["metadata"]);
    for k in ["uid", "creationTimestamp", "name", "namespace", "deletionTimestamp", "deletionGracePeriodSeconds"] {
        match old_meta.get(k) {
            Some(v) => new_meta[k] = v.clone(),
            None => {
                if let Some(m) = new_meta.as_object_mut() {
                    m.remove(k);
                }
            }
        }
    }
    if rt.kind == "Service" {
        // The cluster IP is claimed at create (objects::claims) and immutable.
        for f in ["clusterIP", "clusterIPs"] {
            let old_v = &old["spec"][f];
            match new["spec"].get(f) {
                None | Some(Value::Null) => new["spec"][f] = old_v.clone(),
                Some(v) if v == old_v || (v == "" && f == "clusterIP") => new["spec"][f] = old_v.clone(),
                Some(_) => {
                    return Err(ApiError::invalid(
                        rt.kind,
                        &name,
                        vec![(format!("spec.{f}"), "Invalid value: field is immutable".into())],
                    ))
                }
            }
        }
    }
    if rt.kind == "Node" {
        // A node's pod CIDR is claimed in the store and routed to; once set
        // it stays (Kubernetes: "node updates may not change podCIDR except
        // from \"\" to valid"). An update that leaves it out keeps it.
        for f in ["podCIDR", "podCIDRs"] {
            let old_v = &old["spec"][f];
            let unset = old_v.is_null() || *old_v == "" || old_v.as_array().is_some_and(Vec::is_empty);
            match new["spec"].get(f) {
                _ if unset => {}
                None | Some(Value::Null) => new["spec"][f] = old_v.clone(),
                Some(v) if v == old_v => {}
                Some(_) => {
                    let msg = format!("Forbidden: node updates may not change {f} except from \"\" to valid");
                    return Err(ApiError::invalid(rt.kind, &name, vec![(format!("spec.{f}"), msg)]));
                }
            }
        }
    }
    if rt.kind == "Namespace" && subresource != Some("finalize") {
        // spec.finalizers change only through namespaces/finalize.
        new["spec"]["finalizers"] = old["spec"]["finalizers"].clone();
    }
    if rt.kind == "PriorityClass" && new["value"] != old["value"] {
        return Err(ApiError::invalid(
            rt.kind,
            &name,
            vec![("value".into(), "Forbidden: may not be changed in an update.".into())],
        ));
    }
    if new_meta_missing_managed_fields(&new) {
        if let Some(mf) = old["metadata"].get("managedFields") {
            new["metadata"]["managedFields"] = mf.clone();
        }
    }
    if has_generation(rt.kind) {
        let gen = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let changed = spec_of(old) != spec_of(&new);
        new["metadata"]["generation"] = json!(if changed { gen + 1 } else { gen });
    } else if let Some(m) = new["metadata"].as_object_mut() {
        m.remove("generation");
    }
    if let Some(m) = new["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    default_object(rt.kind, &mut new);
    if rt.kind == "Pod" && subresource.is_none() {
        if let Some(why) = pod_spec_change(&old["spec"], &new["spec"]) {
            return Err(ApiError::invalid(rt.kind, &name, vec![("spec".into(), why)]));
        }
    }
    let errs = super::storage::check_update(rt.kind, old, &new);
    if !errs.is_empty() {
        return Err(ApiError::invalid(rt.kind, &name, errs));
    }
    validate(rt, &new)?;
    Ok(new)
}

/// Kubernetes' rule for pod updates: a pod's spec is fixed once it exists
/// (the node runs what it was given), but for container images,
/// `activeDeadlineSeconds`, `terminationGracePeriodSeconds`, added
/// tolerations and removed scheduling gates. (Ephemeral containers change
/// through their subresource; the node through `pods/binding`.)
pub fn pod_spec_change(old: &Value, new: &Value) -> Option<String> {
    let tolerations = |s: &Value| s["tolerations"].as_array().cloned().unwrap_or_default();
    let now = tolerations(new);
    let kept = tolerations(old).iter().all(|t| now.contains(t));
    let mutable = |spec: &Value| {
        let mut s = spec.clone();
        if let Some(m) = s.as_object_mut() {
            for f in ["activeDeadlineSeconds", "terminationGracePeriodSeconds", "tolerations", "schedulingGates"] {
                m.remove(f);
            }
        }
        for list in ["containers", "initContainers"] {
            for c in s[list].as_array_mut().into_iter().flatten() {
                if let Some(m) = c.as_object_mut() {
                    m.remove("image");
                }
            }
        }
        s
    };
    if kept && mutable(old) == mutable(new) {
        return None;
    }
    Some(
        "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, \
         `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to \
         existing tolerations), `spec.terminationGracePeriodSeconds`"
            .into(),
    )
}

/// An update that omits managedFields keeps the stored ones (Kubernetes:
/// only an explicit list replaces them).
fn new_meta_missing_managed_fields(new: &Value) -> bool {
    new["metadata"].get("managedFields").is_none_or(Value::is_null)
}

/// Everything but metadata and status: what `generation` counts changes of.
fn spec_of(v: &Value) -> Map<String, Value> {
    let mut m = v.as_object().cloned().unwrap_or_default();
    m.remove("metadata");
    m.remove("status");
    m
}

fn set_api_version_kind(rt: &ResourceType, obj: &mut Value) {
    obj["apiVersion"] = Value::String(rt.api_version());
    obj["kind"] = Value::String(rt.kind.to_string());
}

// ---------------------------------------------------------------------------
// Defaulting (as Kubernetes' SetDefaults_* and admission plugins do).

fn set_default(obj: &mut Value, key: &str, v: Value) {
    if let Some(m) = obj.as_object_mut() {
        if m.get(key).is_none_or(Value::is_null) {
            m.insert(key.to_string(), v);
        }
    }
}

pub fn default_object(kind: &str, obj: &mut Value) {
    apply_defaults(kind, obj);
    strip_nulls(obj);
}

/// In Kubernetes JSON a null field is an absent one; drop them so stored
/// objects have one spelling.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn apply_defaults(kind: &str, obj: &mut Value) {
    match kind {
        "Pod" => {
            default_pod_spec(&mut obj["spec"], true);
            let status = &mut obj["status"];
            if !status.is_object() {
                *status = json!({});
            }
            set_default(status, "phase", json!("Pending"));
        }
        "Deployment" => {
            let spec = &mut obj["spec"];
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            set_default(spec, "strategy", json!({}));
            set_default(&mut spec["strategy"], "type", json!("RollingUpdate"));
            if spec["strategy"]["type"] == "RollingUpdate" {
                set_default(&mut spec["strategy"], "rollingUpdate", json!({}));
                let ru = &mut spec["strategy"]["rollingUpdate"];
                set_default(ru, "maxSurge", json!("25%"));
                set_default(ru, "maxUnavailable", json!("25%"));
            }
            default_template(spec);
        }
        "ReplicaSet" => {
            set_default(&mut obj["spec"], "replicas", json!(1));
            default_template(&mut obj["spec"]);
        }
        "DaemonSet" => {
            let spec = &mut obj["spec"];
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "updateStrategy", json!({}));
            set_default(&mut spec["updateStrategy"], "type", json!("RollingUpdate"));
            if spec["updateStrategy"]["type"] == "RollingUpdate" {
                set_default(&mut spec["updateStrategy"], "rollingUpdate", json!({}));
                let ru = &mut spec["updateStrategy"]["rollingUpdate"];
                set_default(ru, "maxUnavailable", json!(1));
                set_default(ru, "maxSurge", json!(0));
            }
            default_template(spec);
        }
        "StatefulSet" => {
            let spec = &mut obj["spec"];
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "podManagementPolicy", json!("OrderedReady"));
            set_default(spec, "updateStrategy", json!({}));
            set_default(&mut spec["updateStrategy"], "type", json!("RollingUpdate"));
            if spec["updateStrategy"]["type"] == "RollingUpdate" {
                set_default(&mut spec["updateStrategy"], "rollingUpdate", json!({"partition": 0}));
            }
            set_default(
                spec,
                "persistentVolumeClaimRetentionPolicy",
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
            default_template(spec);
        }
        "Job" => default_job_spec(&mut obj["spec"]),
        "CronJob" => {
            let spec = &mut obj["spec"];
            set_default(spec, "concurrencyPolicy", json!("Allow"));
            set_default(spec, "suspend", json!(false));
            set_default(spec, "successfulJobsHistoryLimit", json!(3));
            set_default(spec, "failedJobsHistoryLimit", json!(1));
            if spec["jobTemplate"].is_object() {
                default_job_spec(&mut spec["jobTemplate"]["spec"]);
            }
        }
        "Service" => {
            let spec = &mut obj["spec"];
            if !spec.is_object() {
                *spec = json!({});
            }
            set_default(spec, "type", json!("ClusterIP"));
            set_default(spec, "sessionAffinity", json!("None"));
            set_default(spec, "internalTrafficPolicy", json!("Cluster"));
            set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
            set_default(spec, "ipFamilies", json!(["IPv4"]));
            if let Some(ports) = spec["ports"].as_array_mut() {
                for p in ports {
                    set_default(p, "protocol", json!("TCP"));
                    let port = p["port"].clone();
                    set_default(p, "targetPort", port);
                }
            }
        }
        "Namespace" => {
            set_default(obj, "spec", json!({}));
            set_default(obj, "status", json!({"phase": "Active"}));
            let name = obj["metadata"]["name"].clone();
            set_default(&mut obj["metadata"], "labels", json!({}));
            set_default(&mut obj["metadata"]["labels"], "kubernetes.io/metadata.name", name);
        }
        "Secret" => {
            set_default(obj, "type", json!("Opaque"));
            // stringData is write-only: folded into data (base64), as Kubernetes does.
            if let Some(Value::Object(sd)) = obj.as_object_mut().and_then(|o| o.remove("stringData")) {
                use base64::Engine;
                set_default(obj, "data", json!({}));
                for (k, v) in sd {
                    let text = v.as_str().unwrap_or_default().to_string();
                    obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
                }
            }
        }
        "PersistentVolume" | "PersistentVolumeClaim" | "StorageClass" => super::storage::apply_defaults(kind, obj),
        _ => {}
    }
}

fn default_template(spec: &mut Value) {
    if spec["template"].is_object() {
        default_pod_spec(&mut spec["template"]["spec"], false);
    }
}

fn default_job_spec(spec: &mut Value) {
    set_default(spec, "parallelism", json!(1));
    if spec.get("completions").is_none_or(Value::is_null) && spec["parallelism"] == 1 {
        spec["completions"] = json!(1);
    }
    set_default(spec, "backoffLimit", json!(6));
    set_default(spec, "completionMode", json!("NonIndexed"));
    set_default(spec, "suspend", json!(false));
    default_template(spec);
}

/// `pod` = a Pod (not a template): admission-time fields (service account,
/// default tolerations, priority) are set only on pods.
fn default_pod_spec(spec: &mut Value, pod: bool) {
    if !spec.is_object() {
        return;
    }
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec[list].as_array_mut() {
            cs.iter_mut().for_each(default_container);
        }
    }
    if pod {
        // The deprecated `serviceAccount` alone names the account too.
        if spec["serviceAccountName"].as_str().is_none_or(str::is_empty) {
            if let Some(sa) = spec["serviceAccount"].as_str().filter(|s| !s.is_empty()) {
                spec["serviceAccountName"] = json!(sa);
            }
        }
        set_default(spec, "serviceAccountName", json!("default"));
        let sa = spec["serviceAccountName"].clone();
        set_default(spec, "serviceAccount", sa);
        set_default(spec, "enableServiceLinks", json!(true));
        // priority and preemptionPolicy come from the pod's PriorityClass (`priority.rs`).
        // DefaultTolerationSeconds: evict 300 s after the node goes NotReady/unreachable.
        set_default(spec, "tolerations", json!([]));
        if let Some(t) = spec["tolerations"].as_array_mut() {
            for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
                if !t.iter().any(|x| x["key"] == key) {
                    t.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
                }
            }
        }
    }
}

fn default_container(c: &mut Value) {
    let image = c["image"].as_str().unwrap_or_default();
    let last = image.rsplit('/').next().unwrap_or_default();
    let tagless = !last.contains(':') && !image.contains('@');
    let policy = if tagless || last.ends_with(":latest") { "Always" } else { "IfNotPresent" };
    set_default(c, "imagePullPolicy", json!(policy));
    set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(c, "terminationMessagePolicy", json!("File"));
    set_default(c, "resources", json!({}));
    if let Some(ports) = c["ports"].as_array_mut() {
        ports.iter_mut().for_each(|p| set_default(p, "protocol", json!("TCP")));
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let p = &mut c[probe];
        if p.is_object() {
            set_default(p, "timeoutSeconds", json!(1));
            set_default(p, "periodSeconds", json!(10));
            set_default(p, "successThreshold", json!(1));
            set_default(p, "failureThreshold", json!(3));
            if p["httpGet"].is_object() {
                set_default(&mut p["httpGet"], "scheme", json!("HTTP"));
            }
        } else if let Some(m) = c.as_object_mut() {
            if m.get(probe).is_some_and(Value::is_null) {
                m.remove(probe);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Validation.

/// RFC 1123 label: at most 63 lowercase alphanumerics or '-', alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label value or the name part of a key: at most 63 of [A-Za-z0-9_.-],
/// alphanumeric at both ends (values may be empty).
fn is_qualified_part(s: &str) -> bool {
    s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

fn is_qualified_name(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_qualified_part(name)
}

fn name_rule(kind: &str) -> (fn(&str) -> bool, &'static str) {
    match kind {
        "Namespace" | "Service" => (
            is_dns_label,
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        ),
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => {
            (|s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('%'), "may not contain '/' or '%'")
        }
        _ => (
            is_dns_subdomain,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ),
    }
}

/// Checks a name from a URL or body before it is used as a store key.
pub fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let (ok, why) = name_rule(kind);
    if ok(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(kind, name, vec![("metadata.name".into(), format!("Invalid value: {name:?}: {why}"))]))
    }
}

pub fn validate(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    let mut errs: Vec<(String, String)> = Vec::new();
    let (ok, why) = name_rule(rt.kind);
    if !ok(name) {
        errs.push(("metadata.name".into(), format!("Invalid value: {name:?}: {why}")));
    }
    if let Some(labels) = meta["labels"].as_object() {
        for (k, v) in labels {
            if !is_qualified_name(k) {
                errs.push(("metadata.labels".into(), format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")));
            }
            if !v.as_str().is_some_and(is_qualified_part) {
                errs.push(("metadata.labels".into(), format!("Invalid value: {v}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character")));
            }
        }
    }
    if let Some(ann) = meta["annotations"].as_object() {
        let mut total = 0;
        for (k, v) in ann {
            total += k.len() + v.as_str().map_or(0, str::len);
            if !is_qualified_name(k) {
                errs.push((
                    "metadata.annotations".into(),
                    format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.'"),
                ));
            }
        }
        if total > 256 * 1024 {
            errs.push(("metadata.annotations".into(), "Too long: must have at most 262144 bytes".into()));
        }
    }
    match rt.kind {
        "Pod" => validate_pod_spec(&obj["spec"], "spec", &mut errs),
        "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" => {
            let spec = &obj["spec"];
            let selector = &spec["selector"];
            if !selector.is_object() {
                errs.push(("spec.selector".into(), "Required value".into()));
            } else if let Some(ml) = selector["matchLabels"].as_object() {
                let labels = &spec["template"]["metadata"]["labels"];
                if ml.iter().any(|(k, v)| labels.get(k) != Some(v)) {
                    errs.push((
                        "spec.template.metadata.labels".into(),
                        format!("Invalid value: {}: `selector` does not match template `labels`", labels),
                    ));
                }
            }
            if spec["replicas"].as_i64().is_some_and(|r| r < 0) {
                errs.push(("spec.replicas".into(), "Invalid value: must be greater than or equal to 0".into()));
            }
            validate_pod_spec(&spec["template"]["spec"], "spec.template.spec", &mut errs);
        }
        "Job" => validate_pod_spec(&obj["spec"]["template"]["spec"], "spec.template.spec", &mut errs),
        "PriorityClass" => super::priority::validate_class(obj, &mut errs),
        "PersistentVolume" | "PersistentVolumeClaim" | "StorageClass" => {
            super::storage::validate(rt.kind, obj, &mut errs)
        }
        "CronJob" => {
            let spec = &obj["spec"];
            let schedule = spec["schedule"].as_str().unwrap_or_default();
            let tz = spec["timeZone"].as_str();
            if let Err(e) = crate::controllers::cronjob::due_times(schedule, tz, chrono::Utc::now(), chrono::Utc::now())
            {
                let field = if e.contains("time zone") { "spec.timeZone" } else { "spec.schedule" };
                errs.push((field.into(), format!("Invalid value: {e}")));
            }
            validate_pod_spec(
                &spec["jobTemplate"]["spec"]["template"]["spec"],
                "spec.jobTemplate.spec.template.spec",
                &mut errs,
            )
        }
        "Service" => {
            for (i, p) in obj["spec"]["ports"].as_array().into_iter().flatten().enumerate() {
                if !p["port"].as_i64().is_some_and(|n| (1..=65535).contains(&n)) {
                    errs.push((
                        format!("spec.ports[{i}].port"),
                        "Invalid value: must be between 1 and 65535, inclusive".into(),
                    ));
                }
            }
        }
        "ConfigMap" | "Secret" => {
            for field in ["data", "binaryData", "stringData"] {
                for k in obj[field].as_object().into_iter().flatten().map(|m| m.0) {
                    let ok = !k.is_empty()
                        && k.len() <= 253
                        && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                    if !ok {
                        errs.push((format!("{field}[{k}]"), format!("Invalid value: {k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'")));
                    }
                }
            }
        }
        _ => {}
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(rt.kind, name, errs))
    }
}

/// `kubectl debug`'s ephemeral containers, as Kubernetes validates them:
/// existing ones unchanged, new ones with a unique name and an image, and
/// none of what only long-lived containers have.
pub fn check_ephemeral(old_spec: &Value, list: &Value) -> Result<(), Vec<(String, String)>> {
    let mut errs = Vec::new();
    let at = "spec.ephemeralContainers";
    let new: &[Value] = match list {
        Value::Null => &[],
        Value::Array(a) => a,
        _ => return Err(vec![(at.into(), "Invalid value: must be a list".into())]),
    };
    for o in old_spec["ephemeralContainers"].as_array().into_iter().flatten() {
        let name = o["name"].as_str().unwrap_or_default();
        match new.iter().find(|n| n["name"] == o["name"]) {
            None => {
                errs.push((at.into(), format!("Forbidden: existing ephemeral container {name:?} may not be removed")))
            }
            Some(n) if n != o => {
                errs.push((at.into(), format!("Forbidden: existing ephemeral container {name:?} may not be changed")))
            }
            Some(_) => {}
        }
    }
    let mut names: std::collections::HashSet<String> = ["containers", "initContainers"]
        .iter()
        .flat_map(|l| old_spec[*l].as_array().into_iter().flatten())
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    for (i, c) in new.iter().enumerate() {
        let name = c["name"].as_str().unwrap_or_default();
        if !is_dns_label(name) {
            errs.push((
                format!("{at}[{i}].name"),
                format!("Invalid value: {name:?}: a lowercase RFC 1123 label is required"),
            ));
        } else if !names.insert(name.to_string()) {
            errs.push((format!("{at}[{i}].name"), format!("Duplicate value: {name:?}")));
        }
        if c["image"].as_str().unwrap_or_default().trim().is_empty() {
            errs.push((format!("{at}[{i}].image"), "Required value".into()));
        }
        for f in ["ports", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle"] {
            if c.get(f).is_some_and(|v| !v.is_null()) {
                errs.push((format!("{at}[{i}].{f}"), "Forbidden: cannot be set for an Ephemeral Container".into()));
            }
        }
        if c["resources"].as_object().is_some_and(|r| r.values().any(|v| !v.is_null() && v != &json!({}))) {
            errs.push((format!("{at}[{i}].resources"), "Forbidden: cannot be set for an Ephemeral Container".into()));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

fn validate_pod_spec(spec: &Value, at: &str, errs: &mut Vec<(String, String)>) {
    let Some(containers) = spec["containers"].as_array().filter(|c| !c.is_empty()) else {
        errs.push((format!("{at}.containers"), "Required value".into()));
        return;
    };
    let mut names = std::collections::HashSet::new();
    let init = spec["initContainers"].as_array().map(Vec::as_slice).unwrap_or_default();
    for (list, items) in [("initContainers", init), ("containers", containers.as_slice())] {
        for (i, c) in items.iter().enumerate() {
            let name = c["name"].as_str().unwrap_or_default();
            if !is_dns_label(name) {
                errs.push((
                    format!("{at}.{list}[{i}].name"),
                    format!("Invalid value: {name:?}: a lowercase RFC 1123 label is required"),
                ));
            } else if !names.insert(name.to_string()) {
                errs.push((format!("{at}.{list}[{i}].name"), format!("Duplicate value: {name:?}")));
            }
            if c["image"].as_str().unwrap_or_default().trim().is_empty() {
                errs.push((format!("{at}.{list}[{i}].image"), "Required value".into()));
            }
        }
    }
    if let Some(p) = spec["restartPolicy"].as_str() {
        if !matches!(p, "Always" | "OnFailure" | "Never") {
            errs.push((format!("{at}.restartPolicy"), format!("Unsupported value: {p:?}")));
        }
    }
    for (i, v) in spec["volumes"].as_array().into_iter().flatten().enumerate() {
        // Claims are named after their volumes: `<pod>-<volume>` for an
        // ephemeral one, whose template is the claim.
        if v["ephemeral"].is_object() && !v["ephemeral"]["volumeClaimTemplate"].is_object() {
            errs.push((format!("{at}.volumes[{i}].ephemeral.volumeClaimTemplate"), "Required value".into()));
        }
        if v["persistentVolumeClaim"].is_object()
            && v["persistentVolumeClaim"]["claimName"].as_str().is_none_or(str::is_empty)
        {
            errs.push((format!("{at}.volumes[{i}].persistentVolumeClaim.claimName"), "Required value".into()));
        }
    }
}

// ---------------------------------------------------------------------------
// Deletion.

/// What a DELETE does to an object.
#[derive(Debug, Clone, PartialEq)]
pub enum DeletePlan {
    /// Remove it now.
    Now,
    /// Write this: the object marked for deletion (`deletionTimestamp`,
    /// finalizers); whoever owns a finalizer removes it, the last removal deletes.
    Mark(Value),
    /// Already being deleted; nothing to write.
    Pending,
}

/// Kubernetes' graceful deletion rules: finalizers and the propagation
/// policy's finalizer keep the object (marked) until they are removed;
/// namespaces are emptied first; pods bound to a node get their grace
/// period for the node agent to stop them.
pub fn plan_delete(kind: &str, obj: &Value, policy: Option<&str>, grace: Option<i64>, now: &str) -> DeletePlan {
    let meta = &obj["metadata"];
    let pod_bound = kind == "Pod"
        && obj["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty())
        && !matches!(obj["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
    if meta["deletionTimestamp"].is_string() {
        // A second delete with grace 0 forces a stuck pod out, as in Kubernetes.
        let only_pod_grace = meta["finalizers"].as_array().is_none_or(|f| f.is_empty());
        return if kind == "Pod" && grace == Some(0) && only_pod_grace { DeletePlan::Now } else { DeletePlan::Pending };
    }
    let mut finalizers: Vec<Value> = meta["finalizers"].as_array().cloned().unwrap_or_default();
    let add = |f: &mut Vec<Value>, name: &str| {
        if !f.iter().any(|x| x == name) {
            f.push(json!(name));
        }
    };
    match policy {
        Some("Foreground") => add(&mut finalizers, "foregroundDeletion"),
        Some("Orphan") => add(&mut finalizers, "orphan"),
        _ => {}
    }
    let grace_secs = if pod_bound {
        grace.unwrap_or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30)).max(0)
    } else {
        0
    };
    let namespace = kind == "Namespace";
    if finalizers.is_empty() && !namespace && grace_secs == 0 {
        return DeletePlan::Now;
    }
    let mut marked = obj.clone();
    let at = if grace_secs > 0 {
        chrono::DateTime::parse_from_rfc3339(now)
            .map(|t| (t + chrono::Duration::seconds(grace_secs)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|_| now.to_string())
    } else {
        now.to_string()
    };
    marked["metadata"]["deletionTimestamp"] = json!(at);
    marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace_secs);
    if !finalizers.is_empty() {
        marked["metadata"]["finalizers"] = Value::Array(finalizers);
    }
    if namespace {
        marked["status"]["phase"] = json!("Terminating");
        // Emptied before it goes, even if it was made without the finalizer.
        let f = &mut marked["spec"]["finalizers"];
        if !f.as_array().is_some_and(|l| l.iter().any(|x| x == NAMESPACE_FINALIZER)) {
            let mut list = f.as_array().cloned().unwrap_or_default();
            list.push(json!(NAMESPACE_FINALIZER));
            *f = Value::Array(list);
        }
    }
    DeletePlan::Mark(marked)
}

/// Sets (or replaces) a condition in `status.conditions`.
/// What a new pod gets at admission beyond its own spec: its
/// ServiceAccount (and token volume) and its priority.
pub async fn admit_pod(api: &super::ApiServer, pod: Value) -> Result<Value, ApiError> {
    let pod = super::serviceaccount::admit_pod(api, pod, super::serviceaccount::DEFAULT_ACCOUNT_WAIT).await?;
    super::priority::admit_pod(api, pod).await
}

/// The admission plugins that read other objects, for a new object of any
/// kind: pods (ServiceAccount, priority), claims (default StorageClass).
pub async fn admit_new(api: &super::ApiServer, rt: &ResourceType, obj: Value) -> Result<Value, ApiError> {
    match rt.kind {
        "Pod" => admit_pod(api, obj).await,
        "PersistentVolumeClaim" => super::storage::admit_claim(api, obj).await,
        _ => Ok(obj),
    }
}

pub fn set_condition(obj: &mut Value, ty: &str, status: &str, reason: Option<&str>, now: &str) {
    if !obj["status"].is_object() {
        obj["status"] = json!({});
    }
    if !obj["status"]["conditions"].is_array() {
        obj["status"]["conditions"] = json!([]);
    }
    let mut c = json!({"type": ty, "status": status, "lastTransitionTime": now, "lastProbeTime": null});
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    if let Some(list) = obj["status"]["conditions"].as_array_mut() {
        match list.iter_mut().find(|x| x["type"] == ty) {
            Some(existing) if existing["status"] == status => {}
            Some(existing) => *existing = c,
            None => list.push(c),
        }
    }
}

/// Fields Kubernetes defines that Capstan keeps but does not act on, as
/// warnings (the `Warning` header) so nobody relies on them unknowingly.
pub fn not_acted_on(kind: &str, obj: &Value) -> Vec<String> {
    let spec_path = match kind {
        "Pod" => Some(("spec", &obj["spec"])),
        "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" | "Job" => {
            Some(("spec.template.spec", &obj["spec"]["template"]["spec"]))
        }
        "CronJob" => {
            Some(("spec.jobTemplate.spec.template.spec", &obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        }
        _ => None,
    };
    let Some((at, spec)) = spec_path else { return vec![] };
    const POD_FIELDS: &[&str] = &[
        "runtimeClassName",
        "overhead",
        "os",
        "hostUsers",
        "hostIPC",
        "hostPID",
        "shareProcessNamespace",
        "setHostnameAsFQDN",
        "dnsConfig",
        "resourceClaims",
        "readinessGates",
        "priorityClassName",
    ];
    const CONTAINER_SECURITY: &[&str] =
        &["seLinuxOptions", "seccompProfile", "appArmorProfile", "windowsOptions", "procMount"];
    let mut out: Vec<String> = POD_FIELDS
        .iter()
        .filter(|f| spec.get(**f).is_some_and(|v| !v.is_null()))
        .map(|f| format!("{at}.{f} is kept but not acted on by Capstan"))
        .collect();
    for list in ["containers", "initContainers"] {
        for (i, c) in spec[list].as_array().into_iter().flatten().enumerate() {
            for f in CONTAINER_SECURITY {
                if c["securityContext"].get(*f).is_some_and(|v| !v.is_null()) {
                    out.push(format!("{at}.{list}[{i}].securityContext.{f} is kept but not acted on by Capstan"));
                }
            }
            if c.get("volumeDevices").is_some_and(|v| !v.is_null()) {
                out.push(format!("{at}.{list}[{i}].volumeDevices is kept but not acted on by Capstan"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::k8s::registry::by_kind;

    #[test]
    fn a_pod_s_spec_changes_only_where_kubernetes_allows() {
        let rt = by_kind("v1", "Pod").unwrap();
        let pod = json!({"metadata": {"name": "p", "namespace": "d", "uid": "u"},
            "spec": {"containers": [{"name": "c", "image": "busybox:1"}], "tolerations": [{"key": "a", "operator": "Exists"}]}});
        let mut created = pod.clone();
        default_object("Pod", &mut created);
        let change = |f: &dyn Fn(&mut Value)| {
            let mut n = created.clone();
            f(&mut n);
            prepare_update(rt, &created, n, None)
        };
        assert!(change(&|n| n["spec"]["containers"][0]["image"] = json!("busybox:2")).is_ok());
        assert!(change(&|n| n["spec"]["activeDeadlineSeconds"] = json!(30)).is_ok());
        assert!(change(&|n| n["metadata"]["labels"] = json!({"x": "y"})).is_ok());
        let more = json!([{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "Exists"}]);
        assert!(change(&|n| n["spec"]["tolerations"] = more.clone()).is_ok(), "tolerations may be added");
        // A client that leaves out defaulted fields changes nothing.
        assert!(change(&|n| {
            n["spec"].as_object_mut().unwrap().remove("dnsPolicy");
        })
        .is_ok());
        for forbidden in [
            change(&|n| n["spec"]["containers"][0]["command"] = json!(["sh"])),
            change(&|n| n["spec"]["restartPolicy"] = json!("Never")),
            change(&|n| n["spec"]["tolerations"] = json!([])),
            change(&|n| n["spec"]["nodeName"] = json!("node-1")),
        ] {
            let e = forbidden.unwrap_err();
            assert_eq!(e.code, 422);
            assert!(e.message.contains("pod updates may not change fields"), "{}", e.message);
        }
    }

    #[test]
    fn ephemeral_containers_are_added_through_their_subresource_only() {
        let rt = by_kind("v1", "Pod").unwrap();
        let mut pod = json!({"metadata": {"name": "p", "namespace": "d", "uid": "u"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}, "status": {"phase": "Running"}});
        default_object("Pod", &mut pod);
        let debugger = json!({"name": "debugger", "image": "busybox", "stdin": true, "tty": true});
        let mut asked = pod.clone();
        asked["spec"]["ephemeralContainers"] = json!([debugger]);
        asked["spec"]["containers"][0]["image"] = json!("ignored");
        let added = prepare_update(rt, &pod, asked.clone(), Some("ephemeralcontainers")).unwrap();
        assert_eq!(added["spec"]["ephemeralContainers"], json!([debugger]));
        assert_eq!(added["spec"]["containers"][0]["image"], "busybox", "only the ephemeral containers move");
        assert_eq!(added["status"], pod["status"]);
        // A plain update keeps them as they are, either way.
        let plain = prepare_update(rt, &pod, asked, None).unwrap();
        assert!(plain["spec"].get("ephemeralContainers").is_none(), "{plain}");
        let kept = prepare_update(rt, &added, pod.clone(), None).unwrap();
        assert_eq!(kept["spec"]["ephemeralContainers"], json!([debugger]));

        let refused = |list: Value| {
            let mut body = added.clone();
            body["spec"]["ephemeralContainers"] = list;
            let e = prepare_update(rt, &added, body, Some("ephemeralcontainers")).unwrap_err();
            assert_eq!(e.code, 422);
            e.message
        };
        assert!(refused(json!([])).contains("may not be removed"));
        let changed = json!({"name": "debugger", "image": "other"});
        assert!(refused(json!([changed])).contains("may not be changed"));
        let clash = json!({"name": "c", "image": "busybox"});
        assert!(refused(json!([debugger, clash])).contains("Duplicate value"));
        let probed = json!({"name": "d2", "image": "busybox", "readinessProbe": {"exec": {"command": ["true"]}}});
        assert!(refused(json!([debugger, probed])).contains("cannot be set for an Ephemeral Container"));
        let no_image = json!({"name": "d3"});
        assert!(refused(json!([debugger, no_image])).contains("image"));
    }

    #[test]
    fn create_sets_system_fields_and_defaults() {
        let rt = by_kind("apps/v1", "Deployment").unwrap();
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"generateName": "web-", "uid": "forged"},
            "spec": {"selector": {"matchLabels": {"app": "w"}}, "template": {"metadata": {"labels": {"app": "w"}},
              "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}});
        let out = prepare_create(rt, Some("ns"), d, "2026-01-01T00:00:00Z", "u-1", "abcde").unwrap();
        assert_eq!(out["metadata"]["name"], "web-abcde");
        assert_eq!(out["metadata"]["namespace"], "ns");
        assert_eq!(out["metadata"]["uid"], "u-1");
        assert_eq!(out["metadata"]["generation"], 1);
        assert_eq!(out["spec"]["replicas"], 1);
        assert_eq!(out["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let c = &out["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "Always");
        assert!(out["spec"]["template"]["spec"].get("tolerations").is_none(), "templates get no admission tolerations");
    }

    #[test]
    fn update_bumps_generation_only_on_spec_change_and_keeps_identity() {
        let rt = by_kind("apps/v1", "Deployment").unwrap();
        let d = json!({"metadata": {"name": "web"}, "spec": {"selector": {"matchLabels": {"app": "w"}},
            "template": {"metadata": {"labels": {"app": "w"}}, "spec": {"containers": [{"name": "c", "image": "nginx:1"}]}}}});
        let old = prepare_create(rt, Some("d"), d, "t0", "u", "x").unwrap();
        let mut new = old.clone();
        new["metadata"]["labels"] = json!({"a": "b"});
        new["metadata"]["uid"] = json!("other");
        new["status"] = json!({"replicas": 5});
        let same = prepare_update(rt, &old, new.clone(), None).unwrap();
        assert_eq!(same["metadata"]["generation"], 1);
        assert_eq!(same["metadata"]["uid"], "u");
        assert!(same.get("status").is_none(), "status changes only through /status");
        new["spec"]["replicas"] = json!(3);
        assert_eq!(prepare_update(rt, &old, new.clone(), None).unwrap()["metadata"]["generation"], 2);
        let st = prepare_update(rt, &old, new, Some("status")).unwrap();
        assert_eq!(st["status"]["replicas"], 5);
        assert_eq!(st["spec"]["replicas"], 1, "status updates do not touch the spec");
    }

    #[test]
    fn a_nodes_pod_cidr_is_set_once() {
        let rt = by_kind("v1", "Node").unwrap();
        let bare = prepare_create(rt, None, json!({"metadata": {"name": "n1"}}), "t0", "u", "x").unwrap();
        let mut assigned = bare.clone();
        assigned["spec"] = json!({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]});
        let set = prepare_update(rt, &bare, assigned.clone(), None).unwrap();
        assert_eq!(set["spec"]["podCIDR"], "10.244.1.0/24", "from unset to a value is allowed");
        let mut moved = set.clone();
        moved["spec"]["podCIDR"] = json!("10.244.2.0/24");
        let err = prepare_update(rt, &set, moved, None).unwrap_err();
        assert_eq!(err.code, 422);
        assert!(err.message.contains("spec.podCIDR"), "{}", err.message);
        let mut dropped = set.clone();
        dropped["spec"] = json!({"unschedulable": true});
        let kept = prepare_update(rt, &set, dropped, None).unwrap();
        assert_eq!(kept["spec"]["podCIDRs"], json!(["10.244.1.0/24"]), "an update leaving it out keeps it");
        assert_eq!(kept["spec"]["unschedulable"], true);
    }

    #[test]
    fn delete_plans() {
        let now = "2026-01-01T00:00:00Z";
        let cm = json!({"metadata": {"name": "c"}});
        assert_eq!(plan_delete("ConfigMap", &cm, None, None, now), DeletePlan::Now);
        let DeletePlan::Mark(m) = plan_delete("ConfigMap", &cm, Some("Foreground"), None, now) else { panic!() };
        assert_eq!(m["metadata"]["finalizers"], json!(["foregroundDeletion"]));
        assert_eq!(m["metadata"]["deletionTimestamp"], now);
        let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 10}, "status": {"phase": "Running"}});
        let DeletePlan::Mark(m) = plan_delete("Pod", &pod, None, None, now) else { panic!() };
        assert_eq!(m["metadata"]["deletionTimestamp"], "2026-01-01T00:00:10Z");
        assert_eq!(plan_delete("Pod", &pod, None, Some(0), now), DeletePlan::Now);
        assert_eq!(plan_delete("Pod", &m, None, None, now), DeletePlan::Pending);
        assert_eq!(plan_delete("Pod", &m, None, Some(0), now), DeletePlan::Now);
        let unbound = json!({"metadata": {"name": "p"}, "spec": {}});
        assert_eq!(plan_delete("Pod", &unbound, None, None, now), DeletePlan::Now);
        let DeletePlan::Mark(ns) = plan_delete("Namespace", &json!({"metadata": {"name": "x"}}), None, None, now)
        else {
            panic!()
        };
        assert_eq!(ns["status"]["phase"], "Terminating");
        assert_eq!(
            ns["spec"]["finalizers"],
            json!([NAMESPACE_FINALIZER]),
            "made before the finalizer was: emptied anyway"
        );
    }

    /// `kubectl create ns` sends `spec: {}`; the namespace is still emptied
    /// before it goes, and only namespaces/finalize changes that.
    #[test]
    fn namespaces_always_carry_their_finalizer() {
        let rt = by_kind("v1", "Namespace").unwrap();
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}, "spec": {}, "status": {}});
        let made = prepare_create(rt, None, ns.clone(), "t", "u", "").unwrap();
        assert_eq!(made["spec"]["finalizers"], json!([NAMESPACE_FINALIZER]));
        let edited = prepare_update(rt, &made, ns.clone(), None).unwrap();
        assert_eq!(edited["spec"]["finalizers"], json!([NAMESPACE_FINALIZER]), "a plain update keeps it");
        let finalized = prepare_update(rt, &made, ns, Some("finalize")).unwrap();
        assert!(finalized["spec"]["finalizers"].is_null(), "namespaces/finalize removes it");
    }

    #[test]
    fn validation_names_each_bad_field() {
        let rt = by_kind("v1", "Pod").unwrap();
        let p = json!({"metadata": {"name": "Bad_Name", "labels": {"ok": "-bad"}},
            "spec": {"containers": [{"name": "a", "image": ""}, {"name": "a", "image": "x"}],
                "volumes": [{"name": "e", "ephemeral": {}}, {"name": "c", "persistentVolumeClaim": {}}]}});
        let e = prepare_create(rt, Some("d"), p, "t", "u", "x").unwrap_err();
        assert_eq!(e.code, 422);
        for f in [
            "metadata.name",
            "metadata.labels",
            "spec.containers[0].image",
            "spec.containers[1].name",
            "spec.volumes[0].ephemeral.volumeClaimTemplate",
            "spec.volumes[1].persistentVolumeClaim.claimName",
        ] {
            assert!(e.message.contains(f), "{f} in {}", e.message);
        }
        assert!(check_name("Namespace", "a.b").is_err());
        let pod = json!({"spec": {"hostIPC": true, "containers": [{"securityContext": {"seccompProfile": {}}}]}});
        let w = not_acted_on("Pod", &pod);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(check_name("ConfigMap", "a.b").is_ok());
        assert!(is_qualified_name("app.kubernetes.io/name"));
        assert!(!is_qualified_name("a/b/c"));
    }
}
