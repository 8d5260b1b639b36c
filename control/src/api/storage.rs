//! Storage objects at admission: PersistentVolumes, PersistentVolumeClaims
//! and StorageClasses get Kubernetes' defaults, validation, immutability
//! rules and protection finalizers here; what binds and provisions them is
//! the volume controller (`controllers/volume.rs`).
//!
//! - Every cluster has a default StorageClass, [`LOCAL_PATH_CLASS`]: volumes
//!   are directories on the node the first pod using the claim is
//!   scheduled to (`WaitForFirstConsumer`), as the local-path provisioner
//!   of k3s and kind does. A claim without `storageClassName` gets the
//!   default class (Kubernetes' DefaultStorageClass admission plugin); an
//!   explicit `""` asks for no class (static volumes only).
//! - New claims and volumes carry `kubernetes.io/pvc-protection` and
//!   `kubernetes.io/pv-protection`, so deleting a claim a pod still uses,
//!   or a volume still bound, waits until that is no longer so.
//!
//! Pure but for [`admit_claim`], which reads the classes.

use capstan_proto::k8s::storage::volume_sources;
pub use capstan_proto::k8s::storage::LOCAL_PATH_PROVISIONER;
use serde_json::{json, Value};

use super::status::ApiError;
use super::ApiServer;

pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
pub const PV_PROTECTION: &str = "kubernetes.io/pv-protection";
pub const DEFAULT_CLASS_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";
/// The default class's name (its provisioner is the volume controller).
pub const LOCAL_PATH_CLASS: &str = "local-path";

const ACCESS_MODES: &[&str] = &["ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"];

/// The default StorageClass every cluster starts with.
pub fn builtin_class() -> Value {
    json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": LOCAL_PATH_CLASS, "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
        "provisioner": LOCAL_PATH_PROVISIONER, "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer", "allowVolumeExpansion": false})
}

pub fn is_default_class(sc: &Value) -> bool {
    sc["metadata"]["annotations"][DEFAULT_CLASS_ANNOTATION] == "true"
}

fn set_default(obj: &mut Value, key: &str, v: Value) {
    if obj.is_object() && obj.get(key).is_none_or(Value::is_null) {
        obj[key] = v;
    }
}

/// Kubernetes' SetDefaults for the storage kinds.
pub fn apply_defaults(kind: &str, obj: &mut Value) {
    match kind {
        "PersistentVolume" => {
            set_default(obj, "spec", json!({}));
            let spec = &mut obj["spec"];
            set_default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
            set_default(spec, "volumeMode", json!("Filesystem"));
            set_default(obj, "status", json!({}));
            set_default(&mut obj["status"], "phase", json!("Pending"));
        }
        "PersistentVolumeClaim" => {
            set_default(obj, "spec", json!({}));
            set_default(&mut obj["spec"], "volumeMode", json!("Filesystem"));
            set_default(obj, "status", json!({}));
            set_default(&mut obj["status"], "phase", json!("Pending"));
        }
        "StorageClass" => {
            set_default(obj, "reclaimPolicy", json!("Delete"));
            set_default(obj, "volumeBindingMode", json!("Immediate"));
        }
        _ => {}
    }
}

/// What only a new object gets: its protection finalizer.
pub fn on_create(kind: &str, obj: &mut Value) {
    let finalizer = match kind {
        "PersistentVolume" => PV_PROTECTION,
        "PersistentVolumeClaim" => PVC_PROTECTION,
        _ => return,
    };
    let meta = &mut obj["metadata"];
    if !meta["finalizers"].is_array() {
        meta["finalizers"] = json!([]);
    }
    if let Some(f) = meta["finalizers"].as_array_mut() {
        if !f.iter().any(|x| x == finalizer) {
            f.push(json!(finalizer));
        }
    }
}

/// A storage quantity in bytes (positive), or None.
pub fn storage_bytes(q: &Value) -> Option<i64> {
    crate::controllers::scheduler::model::parse_quantity(q, false).filter(|b| *b > 0)
}

fn check_access_modes(modes: &Value, at: &str, errs: &mut Vec<(String, String)>) {
    let list = modes.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        errs.push((at.into(), "Required value: at least 1 access mode is required".into()));
    }
    for m in list {
        if !m.as_str().is_some_and(|m| ACCESS_MODES.contains(&m)) {
            let supported = ACCESS_MODES.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", ");
            errs.push((at.into(), format!("Unsupported value: {m}: supported values: {supported}")));
        }
    }
    if list.len() > 1 && list.iter().any(|m| m == "ReadWriteOncePod") {
        errs.push((at.into(), "Forbidden: may not use ReadWriteOncePod with other access modes".into()));
    }
}

fn check_one_of(v: &Value, at: &str, allowed: &[&str], errs: &mut Vec<(String, String)>) {
    if let Some(s) = v.as_str() {
        if !allowed.contains(&s) {
            let supported = allowed.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", ");
            errs.push((at.into(), format!("Unsupported value: {s:?}: supported values: {supported}")));
        }
    }
}

/// Validation of the storage kinds, Kubernetes' messages.
pub fn validate(kind: &str, obj: &Value, errs: &mut Vec<(String, String)>) {
    let spec = &obj["spec"];
    match kind {
        "PersistentVolumeClaim" => {
            check_access_modes(&spec["accessModes"], "spec.accessModes", errs);
            let req = &spec["resources"]["requests"]["storage"];
            if req.is_null() {
                errs.push(("spec.resources[storage]".into(), "Required value".into()));
            } else if storage_bytes(req).is_none() {
                errs.push((
                    "spec.resources[storage]".into(),
                    format!("Invalid value: {req}: must be greater than zero"),
                ));
            }
            check_one_of(&spec["volumeMode"], "spec.volumeMode", &["Block", "Filesystem"], errs);
        }
        "PersistentVolume" => {
            check_access_modes(&spec["accessModes"], "spec.accessModes", errs);
            let cap = &spec["capacity"]["storage"];
            if cap.is_null() {
                errs.push(("spec.capacity".into(), "Required value".into()));
            } else if storage_bytes(cap).is_none() {
                errs.push((
                    "spec.capacity[storage]".into(),
                    format!("Invalid value: {cap}: must be greater than zero"),
                ));
            }
            check_one_of(
                &spec["persistentVolumeReclaimPolicy"],
                "spec.persistentVolumeReclaimPolicy",
                &["Delete", "Recycle", "Retain"],
                errs,
            );
            check_one_of(&spec["volumeMode"], "spec.volumeMode", &["Block", "Filesystem"], errs);
            match volume_sources(spec).as_slice() {
                [] => errs.push(("spec".into(), "Required value: must specify a volume type".into())),
                [_] => {}
                [_, more @ ..] => errs
                    .push((format!("spec.{}", more[0]), "Forbidden: may not specify more than 1 volume type".into())),
            }
            for source in ["hostPath", "local"] {
                if spec[source].is_object() {
                    let path = spec[source]["path"].as_str().unwrap_or_default();
                    if path.is_empty() {
                        errs.push((format!("spec.{source}.path"), "Required value".into()));
                    } else if path.split('/').any(|p| p == "..") {
                        errs.push((
                            format!("spec.{source}.path"),
                            format!("Invalid value: {path:?}: must not contain '..'"),
                        ));
                    }
                }
            }
            if spec["local"].is_object() && !spec["nodeAffinity"].is_object() {
                errs.push(("spec.nodeAffinity".into(), "Required value: Local volume requires node affinity".into()));
            }
        }
        "StorageClass" => {
            if obj["provisioner"].as_str().is_none_or(str::is_empty) {
                errs.push(("provisioner".into(), "Required value".into()));
            }
            check_one_of(&obj["reclaimPolicy"], "reclaimPolicy", &["Delete", "Retain"], errs);
            check_one_of(&obj["volumeBindingMode"], "volumeBindingMode", &["Immediate", "WaitForFirstConsumer"], errs);
        }
        _ => {}
    }
}

/// What an update may not change, Kubernetes' rules: a claim's spec is
/// fixed but for a larger request (when its class allows expansion — not
/// supported here, so never) and the volume it binds to (set once); a
/// volume's source, and its node affinity once set; a class's provisioner,
/// parameters, reclaim policy and binding mode.
pub fn check_update(kind: &str, old: &Value, new: &Value) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    match kind {
        "PersistentVolumeClaim" => {
            let (mut o, mut n) = (old["spec"].clone(), new["spec"].clone());
            // The binder sets volumeName once, on an unbound claim.
            if o["volumeName"].as_str().is_none_or(str::is_empty) {
                if let (Some(a), Some(b)) = (o.as_object_mut(), n.as_object_mut()) {
                    a.remove("volumeName");
                    b.remove("volumeName");
                }
            }
            if o != n {
                let why = if o["resources"] != n["resources"] && strip(&o, "resources") == strip(&n, "resources") {
                    "Forbidden: only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize"
                } else {
                    "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims"
                };
                errs.push(("spec".into(), why.into()));
            }
        }
        "PersistentVolume" => {
            let (o, n) = (&old["spec"], &new["spec"]);
            let sources =
                |s: &Value| volume_sources(s).into_iter().map(|k| (k.to_string(), s[k].clone())).collect::<Vec<_>>();
            if sources(o) != sources(n) {
                errs.push((
                    "spec.persistentvolumesource".into(),
                    "Forbidden: spec.persistentvolumesource is immutable after creation".into(),
                ));
            }
            if o["nodeAffinity"].is_object() && o["nodeAffinity"] != n["nodeAffinity"] {
                errs.push(("spec.nodeAffinity".into(), "Invalid value: field is immutable".into()));
            }
        }
        "StorageClass" => {
            for f in ["parameters", "provisioner", "reclaimPolicy"] {
                if old[f] != new[f] {
                    errs.push((f.into(), format!("Forbidden: updates to {f} are forbidden.")));
                }
            }
            if old["volumeBindingMode"] != new["volumeBindingMode"] {
                errs.push((
                    "volumeBindingMode".into(),
                    format!("Invalid value: {}: field is immutable", new["volumeBindingMode"]),
                ));
            }
        }
        _ => {}
    }
    errs
}

fn strip(v: &Value, key: &str) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove(key);
    }
    v
}

/// The default class's name for a claim that names none, as Kubernetes'
/// DefaultStorageClass plugin picks it: among classes annotated default,
/// the newest (then by name).
pub fn default_class_name(classes: &[Value]) -> Option<String> {
    classes
        .iter()
        .filter(|c| is_default_class(c))
        .max_by(|a, b| {
            let created = |c: &Value| c["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string();
            created(a)
                .cmp(&created(b))
                .then_with(|| b["metadata"]["name"].as_str().cmp(&a["metadata"]["name"].as_str()))
        })
        .and_then(|c| c["metadata"]["name"].as_str().map(str::to_string))
}

/// Admits a new claim: one without `storageClassName` gets the default class.
pub async fn admit_claim(api: &ApiServer, mut pvc: Value) -> Result<Value, ApiError> {
    if pvc["spec"].get("storageClassName").is_some_and(|c| !c.is_null()) {
        return Ok(pvc);
    }
    let rt = capstan_proto::k8s::registry::by_kind("storage.k8s.io/v1", "StorageClass")
        .ok_or_else(|| ApiError::internal("StorageClass is not served"))?;
    let page = api.objects.list_local(rt, None, None, None, &|kv| {
        let v = super::objects::decode_kv(kv)?;
        Ok(is_default_class(&v).then_some(v))
    })?;
    if let Some(name) = default_class_name(&page.items) {
        pvc["spec"]["storageClassName"] = json!(name);
    }
    Ok(pvc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(kind: &str, obj: Value) -> Vec<String> {
        let mut e = Vec::new();
        validate(kind, &obj, &mut e);
        e.into_iter().map(|(f, m)| format!("{f}: {m}")).collect()
    }

    #[test]
    fn claims_need_modes_and_a_size() {
        let ok = json!({"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}});
        assert!(errs("PersistentVolumeClaim", ok).is_empty());
        let e = errs("PersistentVolumeClaim", json!({"spec": {}}));
        assert_eq!(
            e,
            [
                "spec.accessModes: Required value: at least 1 access mode is required",
                "spec.resources[storage]: Required value"
            ]
        );
        let e = errs(
            "PersistentVolumeClaim",
            json!({"spec": {"accessModes": ["ReadWriteOncePod", "Sideways"], "resources": {"requests": {"storage": "0"}}}}),
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains("Unsupported value: \"Sideways\""), "{e:?}");
        assert!(e[1].contains("ReadWriteOncePod with other"), "{e:?}");
        assert!(e[2].contains("must be greater than zero"), "{e:?}");
    }

    #[test]
    fn volumes_need_exactly_one_source() {
        let base = json!({"spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"},
            "hostPath": {"path": "/srv/a"}}});
        assert!(errs("PersistentVolume", base.clone()).is_empty());
        let mut none = base.clone();
        none["spec"].as_object_mut().unwrap().remove("hostPath");
        assert_eq!(errs("PersistentVolume", none), ["spec: Required value: must specify a volume type"]);
        let mut two = base.clone();
        two["spec"]["nfs"] = json!({"server": "x", "path": "/"});
        assert_eq!(errs("PersistentVolume", two), ["spec.nfs: Forbidden: may not specify more than 1 volume type"]);
        let mut local = base.clone();
        local["spec"].as_object_mut().unwrap().remove("hostPath");
        local["spec"]["local"] = json!({"path": "/srv/../etc"});
        let e = errs("PersistentVolume", local);
        assert!(e.iter().any(|e| e.contains("must not contain '..'")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("Local volume requires node affinity")), "{e:?}");
    }

    #[test]
    fn immutable_fields() {
        let pvc = json!({"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}});
        let mut bound = pvc.clone();
        bound["spec"]["volumeName"] = json!("pv1");
        assert!(check_update("PersistentVolumeClaim", &pvc, &bound).is_empty(), "the binder names the volume once");
        let mut rebound = bound.clone();
        rebound["spec"]["volumeName"] = json!("pv2");
        assert_eq!(check_update("PersistentVolumeClaim", &bound, &rebound).len(), 1);
        let mut bigger = bound.clone();
        bigger["spec"]["resources"]["requests"]["storage"] = json!("2Gi");
        let e = check_update("PersistentVolumeClaim", &bound, &bigger);
        assert!(e[0].1.contains("can be resized"), "{e:?}");

        let pv = json!({"spec": {"hostPath": {"path": "/a"}, "capacity": {"storage": "1Gi"}}});
        let mut moved = pv.clone();
        moved["spec"]["hostPath"]["path"] = json!("/b");
        assert_eq!(check_update("PersistentVolume", &pv, &moved)[0].0, "spec.persistentvolumesource");
        let mut claimed = pv.clone();
        claimed["spec"]["claimRef"] = json!({"name": "c", "namespace": "d"});
        assert!(check_update("PersistentVolume", &pv, &claimed).is_empty());

        let sc = builtin_class();
        let mut changed = sc.clone();
        changed["provisioner"] = json!("other");
        changed["volumeBindingMode"] = json!("Immediate");
        let e = check_update("StorageClass", &sc, &changed);
        assert_eq!(e.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["provisioner", "volumeBindingMode"]);
        let mut annotated = sc.clone();
        annotated["metadata"]["annotations"][DEFAULT_CLASS_ANNOTATION] = json!("false");
        assert!(check_update("StorageClass", &sc, &annotated).is_empty());
    }

    #[test]
    fn the_newest_default_class_wins() {
        let class = |name: &str, default: bool, created: &str| {
            json!({"metadata": {"name": name, "creationTimestamp": created,
                "annotations": {DEFAULT_CLASS_ANNOTATION: if default { "true" } else { "false" }}}})
        };
        assert_eq!(default_class_name(&[class("a", false, "2026-01-01T00:00:00Z")]), None);
        let classes = [
            class("old", true, "2026-01-01T00:00:00Z"),
            class("new", true, "2026-02-01T00:00:00Z"),
            class("newest-but-not-default", false, "2026-03-01T00:00:00Z"),
        ];
        assert_eq!(default_class_name(&classes).as_deref(), Some("new"));
    }

    #[test]
    fn new_claims_and_volumes_are_protected_once() {
        let mut pvc = json!({"metadata": {"name": "c", "finalizers": ["x"]}});
        on_create("PersistentVolumeClaim", &mut pvc);
        on_create("PersistentVolumeClaim", &mut pvc);
        assert_eq!(pvc["metadata"]["finalizers"], json!(["x", PVC_PROTECTION]));
        let mut pv = json!({"metadata": {"name": "v"}});
        on_create("PersistentVolume", &mut pv);
        assert_eq!(pv["metadata"]["finalizers"], json!([PV_PROTECTION]));
        let mut cm = json!({"metadata": {"name": "m"}});
        on_create("ConfigMap", &mut cm);
        assert!(cm["metadata"]["finalizers"].is_null());
    }
}
