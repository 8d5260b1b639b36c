//! The PersistentVolume controller: binds claims to volumes, provisions
//! volumes for the `local-path` class, reclaims released volumes, and
//! keeps claims and volumes in use from going (Kubernetes' persistent
//! volume binder, its pvc/pv-protection controllers and, for `local-path`,
//! the local-path provisioner of k3s and kind).
//!
//! - A claim binds to the smallest Available volume that fits it: same
//!   class and volume mode, every access mode it asks for, at least its
//!   request, its selector — and for a `WaitForFirstConsumer` class, node
//!   affinity that admits the node the scheduler picked
//!   (`volume.kubernetes.io/selected-node`). A volume already naming the
//!   claim (pre-bound) wins. Binding writes the volume's `claimRef` first:
//!   the volume's resourceVersion guards it, so two claims never take one.
//! - No fitting volume and the class's provisioner is
//!   [`LOCAL_PATH_PROVISIONER`]: once the scheduler has picked a node, a
//!   volume `pvc-<claim uid>` is created there — a `hostPath` directory
//!   `<root>/<volume>_<namespace>_<claim>` (`DirectoryOrCreate`) under the
//!   root the node's agent announces (annotation [`LOCAL_PATH_ROOT`]), with
//!   node affinity to that node, pre-bound to the claim. The node agent
//!   creates the directory when a pod mounts it and removes it once the
//!   volume is gone.
//! - A bound volume whose claim is gone is Released; then reclaimed by its
//!   policy: `Delete` deletes it, `Retain` keeps it (an administrator's to
//!   clean up), `Recycle` is not supported (Failed).
//! - A claim being deleted loses `kubernetes.io/pvc-protection` once no
//!   pod that has not finished names it; a volume being deleted loses
//!   `kubernetes.io/pv-protection` once it is not Bound.
//!
//! Decisions are pure ([`plan_claim`], [`plan_volume`]); one step per pass,
//! level-triggered: each write changes a claim or a volume, whose change
//! brings the next pass. Keys are `namespace/name` for claims and `name`
//! for volumes (cluster-scoped).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::events::{EventRecorder, EventType};
use super::informer::{Cached, Change, Informer};
use super::runtime::{ReconcileResult, Reconciler};
use super::scheduler::model::{parse_quantity, LabelSelector, NodeInfo, NodeSelectorTerm};
use crate::api::objects::revision_of;
use crate::api::storage::{LOCAL_PATH_PROVISIONER, PVC_PROTECTION, PV_PROTECTION};
use crate::api::{internal, ApiServer};
pub use capstan_proto::k8s::storage::{LOCAL_PATH_ROOT, PROVISIONED_BY};

pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
pub const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
const MANAGER: &str = "persistent-volume-binder";

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace_of(v: &Value) -> &str {
    v["metadata"]["namespace"].as_str().unwrap_or_default()
}

fn uid_of(v: &Value) -> &str {
    v["metadata"]["uid"].as_str().unwrap_or_default()
}

fn deleting(v: &Value) -> bool {
    v["metadata"]["deletionTimestamp"].is_string()
}

fn has_finalizer(v: &Value, f: &str) -> bool {
    v["metadata"]["finalizers"].as_array().is_some_and(|l| l.iter().any(|x| x == f))
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str).collect()
}

/// A claim's class: `spec.storageClassName`, `""` for none.
pub fn claim_class(pvc: &Value) -> &str {
    pvc["spec"]["storageClassName"].as_str().unwrap_or_default()
}

fn volume_mode(spec: &Value) -> &str {
    spec["volumeMode"].as_str().unwrap_or("Filesystem")
}

fn claim_request(pvc: &Value) -> i64 {
    parse_quantity(&pvc["spec"]["resources"]["requests"]["storage"], false).unwrap_or(0)
}

fn volume_capacity(pv: &Value) -> i64 {
    parse_quantity(&pv["spec"]["capacity"]["storage"], false).unwrap_or(0)
}

/// Whether `pv`'s `claimRef` names `pvc` (by uid when it has one: a claim
/// deleted and made again under the same name is another claim).
pub fn refers_to(pv: &Value, pvc: &Value) -> bool {
    let r = &pv["spec"]["claimRef"];
    r["name"] == pvc["metadata"]["name"]
        && r["namespace"] == pvc["metadata"]["namespace"]
        && r["uid"].as_str().is_none_or(|u| u.is_empty() || u == uid_of(pvc))
}

fn names_uid(pv: &Value) -> bool {
    pv["spec"]["claimRef"]["uid"].as_str().is_some_and(|u| !u.is_empty())
}

/// The node terms a volume's `nodeAffinity` requires (None: any node).
pub fn volume_node_terms(pv: &Value) -> Option<Vec<NodeSelectorTerm>> {
    pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        .as_array()
        .map(|t| t.iter().map(NodeSelectorTerm::parse).collect())
}

/// Whether the volume may be used on `node`.
pub fn volume_admits(pv: &Value, node: &NodeInfo) -> bool {
    volume_node_terms(pv).is_none_or(|terms| terms.iter().any(|t| t.matches(&node.labels, &node.name)))
}

/// Whether `pv` can serve `pvc`: free (or pre-bound to it), same class and
/// mode, enough room, every mode asked for, the claim's selector, and (for
/// a claim waiting for its first consumer) the chosen node.
pub fn fits(pv: &Value, pvc: &Value, node: Option<&NodeInfo>) -> bool {
    let (spec, want) = (&pv["spec"], &pvc["spec"]);
    let free = spec["claimRef"].is_null() || refers_to(pv, pvc);
    let available = matches!(pv["status"]["phase"].as_str(), None | Some("Pending" | "Available"));
    let modes = strs(&spec["accessModes"]);
    let selector = match &want["selector"] {
        Value::Null => true,
        s => LabelSelector::parse(s).is_some_and(|s| s.matches(&super::scheduler::model::object_labels(pv))),
    };
    free && available
        && !deleting(pv)
        && spec["storageClassName"].as_str().unwrap_or_default() == claim_class(pvc)
        && volume_mode(spec) == volume_mode(want)
        && strs(&want["accessModes"]).iter().all(|m| modes.contains(m))
        && volume_capacity(pv) >= claim_request(pvc)
        && selector
        && node.is_none_or(|n| volume_admits(pv, n))
}

/// The volume to bind `pvc` to among `volumes`: a pre-bound one first, then
/// the smallest that fits, then by name.
pub fn best_volume<'a>(pvc: &Value, volumes: &'a [Value], node: Option<&NodeInfo>) -> Option<&'a Value> {
    volumes
        .iter()
        .filter(|pv| fits(pv, pvc, node))
        .min_by_key(|pv| (!refers_to(pv, pvc), volume_capacity(pv), name_of(pv).to_string()))
}

/// The world one claim is planned in.
pub struct ClaimWorld<'a> {
    pub pvc: &'a Value,
    /// Every volume (the claim's own, and candidates).
    pub volumes: &'a [Value],
    /// The claim's StorageClass, if it exists.
    pub class: Option<&'a Value>,
    /// The node the scheduler selected for it, if any and if it exists.
    pub node: Option<&'a Value>,
    /// A pod that has not finished names the claim.
    pub in_use: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClaimStep {
    Nothing,
    /// Remove `kubernetes.io/pvc-protection` (the claim then goes).
    Release,
    /// Write the claim's status.
    Status(Value),
    /// Set the volume's claimRef to the claim (`volume` is its name).
    ClaimVolume(String),
    /// Set the claim's `volumeName` (its volume names it already).
    NameVolume(String),
    /// Create this volume, pre-bound to the claim.
    Provision(Value),
    /// Nothing to write; tell the claim's watchers why it waits.
    Wait {
        warning: bool,
        reason: &'static str,
        message: String,
    },
}

fn bound_status(pv: &Value) -> Value {
    json!({"phase": "Bound", "accessModes": pv["spec"]["accessModes"], "capacity": pv["spec"]["capacity"]})
}

fn wait(reason: &'static str, message: impl Into<String>) -> ClaimStep {
    ClaimStep::Wait { warning: false, reason, message: message.into() }
}

fn fail(reason: &'static str, message: impl Into<String>) -> ClaimStep {
    ClaimStep::Wait { warning: true, reason, message: message.into() }
}

/// The next step for one claim.
pub fn plan_claim(w: &ClaimWorld) -> ClaimStep {
    let pvc = w.pvc;
    if deleting(pvc) {
        return if has_finalizer(pvc, PVC_PROTECTION) && !w.in_use { ClaimStep::Release } else { ClaimStep::Nothing };
    }
    let status = |s: Value| {
        let mut now = pvc["status"].clone();
        if !now.is_object() {
            now = json!({});
        }
        let changed = ["phase", "accessModes", "capacity"].iter().any(|k| now[*k] != s[*k]);
        if changed {
            ClaimStep::Status(s)
        } else {
            ClaimStep::Nothing
        }
    };
    let was_bound = pvc["metadata"]["annotations"][BIND_COMPLETED].is_string() || pvc["status"]["phase"] == "Bound";
    if let Some(volume) = pvc["spec"]["volumeName"].as_str().filter(|v| !v.is_empty()) {
        let Some(pv) = w.volumes.iter().find(|pv| name_of(pv) == volume) else {
            return if was_bound {
                status(json!({"phase": "Lost"}))
            } else {
                wait("FailedBinding", format!("volume \"{volume}\" not found"))
            };
        };
        if pv["spec"]["claimRef"].is_null() || (refers_to(pv, pvc) && !names_uid(pv)) {
            // The user named the volume (or an administrator the claim):
            // bind it to this claim, by uid.
            return ClaimStep::ClaimVolume(volume.to_string());
        }
        if !refers_to(pv, pvc) {
            return if was_bound {
                status(json!({"phase": "Lost"}))
            } else {
                fail("FailedBinding", format!("volume \"{volume}\" already bound to a different claim."))
            };
        }
        return status(bound_status(pv));
    }
    let wait_for_consumer = w.class.is_some_and(|c| c["volumeBindingMode"] == "WaitForFirstConsumer");
    let selected = pvc["metadata"]["annotations"][SELECTED_NODE].as_str().filter(|n| !n.is_empty());
    if wait_for_consumer && selected.is_none() {
        return wait("WaitForFirstConsumer", "waiting for first consumer to be created before binding");
    }
    let node = match (wait_for_consumer, selected) {
        (true, Some(name)) => match w.node {
            Some(n) if name_of(n) == name => Some(NodeInfo::new(n)),
            _ => return fail("ProvisioningFailed", format!("the selected node \"{name}\" does not exist")),
        },
        _ => None,
    };
    if let Some(pv) = best_volume(pvc, w.volumes, node.as_ref()) {
        // Pre-bound to this claim already: the claim's side follows.
        // Pre-bound to this claim by uid (provisioned for it, or claimed by
        // an earlier pass): the claim's side follows. Pre-bound by name
        // only: the uid is written first, so that once this claim goes the
        // volume is Released, not handed to a new claim of the same name.
        return if refers_to(pv, pvc) && names_uid(pv) {
            ClaimStep::NameVolume(name_of(pv).to_string())
        } else {
            ClaimStep::ClaimVolume(name_of(pv).to_string())
        };
    }
    let class_name = claim_class(pvc);
    match w.class {
        _ if class_name.is_empty() => {
            wait("FailedBinding", "no persistent volumes available for this claim and no storage class is set")
        }
        None => fail("ProvisioningFailed", format!("storageclass.storage.k8s.io \"{class_name}\" not found")),
        Some(class) if class["provisioner"] != LOCAL_PATH_PROVISIONER => wait(
            "ExternalProvisioning",
            format!(
                "Waiting for a volume to be created either by the external provisioner '{}' or manually by the system administrator. If volume creation is delayed, please verify that the provisioner is running and correctly registered.",
                class["provisioner"].as_str().unwrap_or_default()
            ),
        ),
        Some(class) => match (w.node, node) {
            (Some(n), Some(_)) => match local_path_volume(pvc, class, n) {
                Ok(pv) => ClaimStep::Provision(pv),
                Err(why) => fail("ProvisioningFailed", why),
            },
            _ => fail(
                "ProvisioningFailed",
                format!("the {LOCAL_PATH_PROVISIONER} provisioner needs a node: its class needs volumeBindingMode WaitForFirstConsumer"),
            ),
        },
    }
}

/// The local-path volume for `pvc` on `node`, pre-bound to it.
pub fn local_path_volume(pvc: &Value, class: &Value, node: &Value) -> Result<Value, String> {
    let node_name = name_of(node);
    let root = node["metadata"]["annotations"][LOCAL_PATH_ROOT].as_str().unwrap_or_default();
    if !root.starts_with('/') {
        return Err(format!(
            "node \"{node_name}\" has no local-path directory (annotation {LOCAL_PATH_ROOT}): is its agent running?"
        ));
    }
    if pvc["spec"]["selector"].is_object() {
        return Err("claim.Spec.Selector is not supported for dynamic provisioning".into());
    }
    let modes = strs(&pvc["spec"]["accessModes"]);
    if let Some(m) = modes.iter().find(|m| !matches!(**m, "ReadWriteOnce" | "ReadWriteOncePod" | "ReadOnlyMany")) {
        return Err(format!("{LOCAL_PATH_PROVISIONER} volumes live on one node: access mode {m} is not supported"));
    }
    if volume_mode(&pvc["spec"]) != "Filesystem" {
        return Err(format!("{LOCAL_PATH_PROVISIONER} provides filesystem volumes only, not Block"));
    }
    let name = format!("pvc-{}", uid_of(pvc));
    let (ns, claim) = (namespace_of(pvc), name_of(pvc));
    // Where the node's agent mounts it: its hostname label if it has one.
    let placement = match node["metadata"]["labels"]["kubernetes.io/hostname"].as_str() {
        Some(h) => json!({"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [h]}]}),
        None => json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node_name]}]}),
    };
    Ok(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {PROVISIONED_BY: LOCAL_PATH_PROVISIONER}},
        "spec": {
            "capacity": {"storage": pvc["spec"]["resources"]["requests"]["storage"]},
            "accessModes": modes,
            "persistentVolumeReclaimPolicy": class["reclaimPolicy"].as_str().unwrap_or("Delete"),
            "storageClassName": name_of(class),
            "volumeMode": "Filesystem",
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns, "name": claim,
                "uid": uid_of(pvc)},
            "hostPath": {"path": format!("{}/{name}_{ns}_{claim}", root.trim_end_matches('/')), "type": "DirectoryOrCreate"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [placement]}},
        },
    }))
}

#[derive(Debug, Clone, PartialEq)]
pub enum VolumeStep {
    Nothing,
    /// Write `status` (phase, and a message for Failed).
    Status(Value),
    /// Remove `kubernetes.io/pv-protection` (the volume then goes).
    Release,
    /// Reclaim policy Delete: delete the volume.
    Delete,
}

/// The next step for one volume; `claim` is the claim its `claimRef` names
/// (by namespace and name), if that exists.
pub fn plan_volume(pv: &Value, claim: Option<&Value>) -> VolumeStep {
    let r = &pv["spec"]["claimRef"];
    let phase = if r.is_null() {
        "Available"
    } else {
        match claim.filter(|c| refers_to(pv, c)) {
            Some(c) if c["spec"]["volumeName"] == pv["metadata"]["name"] => "Bound",
            // Pre-bound, or the claim's side of the binding is to come.
            Some(_) => "Available",
            None if r["uid"].as_str().is_none_or(str::is_empty) => "Available",
            None => "Released",
        }
    };
    if deleting(pv) {
        return if has_finalizer(pv, PV_PROTECTION) && phase != "Bound" {
            VolumeStep::Release
        } else {
            VolumeStep::Nothing
        };
    }
    let current = pv["status"]["phase"].as_str().unwrap_or_default();
    if phase == "Released" && current == "Released" {
        return match pv["spec"]["persistentVolumeReclaimPolicy"].as_str() {
            Some("Delete") => VolumeStep::Delete,
            Some("Recycle") => VolumeStep::Status(json!({"phase": "Failed",
                "message": "Recycle is not supported: use Delete or Retain"})),
            _ => VolumeStep::Nothing,
        };
    }
    if current == "Failed" && phase == "Released" {
        return VolumeStep::Nothing;
    }
    if current != phase {
        return VolumeStep::Status(json!({"phase": phase}));
    }
    VolumeStep::Nothing
}

/// Claim names a pod's volumes use: `persistentVolumeClaim.claimName`, and
/// `<pod>-<volume>` for generic ephemeral volumes.
pub fn pod_claims(pod: &Value) -> Vec<String> {
    let pod_name = name_of(pod);
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            if let Some(c) = v["persistentVolumeClaim"]["claimName"].as_str() {
                Some(c.to_string())
            } else if v["ephemeral"].is_object() {
                v["name"].as_str().filter(|n| !n.is_empty()).map(|n| format!("{pod_name}-{n}"))
            } else {
                None
            }
        })
        .collect()
}

fn finished(pod: &Value) -> bool {
    matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

pub struct VolumeController {
    pub api: Arc<ApiServer>,
    pub claims: Arc<Informer>,
    pub volumes: Arc<Informer>,
    pub classes: Arc<Informer>,
    pub nodes: Arc<Informer>,
    pub pods: Arc<Informer>,
    pub recorder: EventRecorder,
    /// Per key: the revision of our last write, to be seen before planning again.
    written: Mutex<HashMap<String, i64>>,
}

impl VolumeController {
    pub fn new(
        api: Arc<ApiServer>,
        claims: Arc<Informer>,
        volumes: Arc<Informer>,
        classes: Arc<Informer>,
        nodes: Arc<Informer>,
        pods: Arc<Informer>,
        recorder: EventRecorder,
    ) -> VolumeController {
        VolumeController { api, claims, volumes, classes, nodes, pods, recorder, written: Mutex::default() }
    }

    /// Claims not bound yet (a new volume, class or node may serve them).
    pub fn unbound_claims(&self) -> Vec<String> {
        self.claims
            .list()
            .iter()
            .filter(|c| c.object()["spec"]["volumeName"].as_str().is_none_or(str::is_empty))
            .map(|c| c.key.clone())
            .collect()
    }

    /// A volume change concerns the volume and the claim it names.
    pub fn keys_for_volume(c: &Change) -> Vec<String> {
        let mut keys = vec![c.key.clone()];
        for v in c.new.iter().chain(c.old.iter()) {
            let r = &v.object()["spec"]["claimRef"];
            if let (Some(ns), Some(n)) = (r["namespace"].as_str(), r["name"].as_str()) {
                keys.push(format!("{ns}/{n}"));
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// A claim change concerns the claim and the volume it names.
    pub fn keys_for_claim(c: &Change) -> Vec<String> {
        let mut keys = vec![c.key.clone()];
        for v in c.new.iter().chain(c.old.iter()) {
            if let Some(pv) = v.object()["spec"]["volumeName"].as_str().filter(|n| !n.is_empty()) {
                keys.push(pv.to_string());
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// A pod that finishes or goes may let a claim being deleted go.
    pub fn keys_for_pod(c: &Change) -> Vec<String> {
        // Most pods use no claim: ruled out without decoding them.
        let may_claim = |p: &Arc<Cached>| p.mentions(b"\"persistentVolumeClaim\"") || p.mentions(b"\"ephemeral\"");
        if !c.old.iter().chain(c.new.iter()).any(may_claim) {
            return vec![];
        }
        let gone_or_done = c.new.as_ref().is_none_or(|p| finished(&p.object()));
        if !gone_or_done {
            return vec![];
        }
        c.old
            .iter()
            .chain(c.new.iter())
            .flat_map(|p| {
                let pod = p.object();
                pod_claims(&pod).into_iter().map(|n| format!("{}/{n}", namespace_of(&pod))).collect::<Vec<_>>()
            })
            .collect()
    }

    fn in_use(&self, pvc: &Value) -> bool {
        let name = name_of(pvc);
        self.pods.list_namespace(namespace_of(pvc)).iter().any(|p| {
            let pod = p.object();
            !finished(&pod) && pod_claims(&pod).iter().any(|c| c == name)
        })
    }

    fn volumes(&self) -> Vec<Value> {
        self.volumes.list().iter().map(|c| c.object()).collect()
    }

    fn wrote(&self, key: &str, w: &Value) {
        self.written.lock().insert(key.to_string(), revision_of(w));
    }

    async fn claim(&self, key: &str, cached: Arc<Cached>) -> ReconcileResult {
        let pvc = cached.object();
        let class = self.classes.get(claim_class(&pvc)).map(|c| c.object());
        let node =
            pvc["metadata"]["annotations"][SELECTED_NODE].as_str().and_then(|n| self.nodes.get(n)).map(|c| c.object());
        let volumes = self.volumes();
        let in_use = deleting(&pvc) && self.in_use(&pvc);
        let step = plan_claim(&ClaimWorld {
            pvc: &pvc,
            volumes: &volumes,
            class: class.as_ref(),
            node: node.as_ref(),
            in_use,
        });
        let err = |e: crate::api::status::ApiError| e.to_string();
        match step {
            ClaimStep::Nothing => {}
            ClaimStep::Wait { warning, reason, message } => {
                let ty = if warning { EventType::Warning } else { EventType::Normal };
                self.recorder.event(&pvc, ty, reason, message);
                if warning {
                    // A node's agent may announce its directory, a class may appear.
                    return Ok(Some(Duration::from_secs(15)));
                }
            }
            ClaimStep::Release => {
                internal::remove_finalizer(&self.api, self.claims.rt, &cached.found(), PVC_PROTECTION)
                    .await
                    .map_err(err)?;
            }
            ClaimStep::Status(status) => {
                let w =
                    internal::write_status(&self.api, self.claims.rt, &cached.found(), status).await.map_err(err)?;
                self.wrote(key, &w);
            }
            ClaimStep::ClaimVolume(name) => {
                let Some(c) = self.volumes.get(&name) else { return Ok(None) };
                let mut pv = c.object();
                pv["spec"]["claimRef"] = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "namespace": namespace_of(&pvc), "name": name_of(&pvc), "uid": uid_of(&pvc),
                    "resourceVersion": cached.mod_revision.to_string()});
                pv["metadata"]["annotations"][BOUND_BY_CONTROLLER] = json!("yes");
                let w =
                    internal::write(&self.api, self.volumes.rt, Some(&c.found()), pv, MANAGER).await.map_err(err)?;
                self.wrote(key, &w);
            }
            ClaimStep::NameVolume(name) => {
                let mut obj = pvc.clone();
                obj["spec"]["volumeName"] = json!(name);
                obj["metadata"]["annotations"][BIND_COMPLETED] = json!("yes");
                obj["metadata"]["annotations"][BOUND_BY_CONTROLLER] = json!("yes");
                let w = internal::write(&self.api, self.claims.rt, Some(&cached.found()), obj, MANAGER)
                    .await
                    .map_err(err)?;
                self.wrote(key, &w);
            }
            ClaimStep::Provision(pv) => {
                let name = name_of(&pv).to_string();
                match internal::write(&self.api, self.volumes.rt, None, pv, MANAGER).await {
                    Ok(w) => {
                        self.wrote(key, &w);
                        let msg = format!("Successfully provisioned volume {name}");
                        self.recorder.event(&pvc, EventType::Normal, "ProvisioningSucceeded", msg);
                    }
                    // Made by an earlier pass not yet seen: the next pass binds it.
                    Err(e) if e.code == 409 => return Ok(Some(Duration::from_millis(50))),
                    Err(e) => {
                        self.recorder.event(&pvc, EventType::Warning, "ProvisioningFailed", e.to_string());
                        return Err(e.to_string());
                    }
                }
            }
        }
        Ok(None)
    }

    async fn volume(&self, key: &str, cached: Arc<Cached>) -> ReconcileResult {
        let pv = cached.object();
        let r = &pv["spec"]["claimRef"];
        let claim = match (r["namespace"].as_str(), r["name"].as_str()) {
            (Some(ns), Some(n)) => self.claims.get(&format!("{ns}/{n}")).map(|c| c.object()),
            _ => None,
        };
        let err = |e: crate::api::status::ApiError| e.to_string();
        match plan_volume(&pv, claim.as_ref()) {
            VolumeStep::Nothing => {}
            VolumeStep::Status(status) => {
                let w =
                    internal::write_status(&self.api, self.volumes.rt, &cached.found(), status).await.map_err(err)?;
                self.wrote(key, &w);
            }
            VolumeStep::Release => {
                internal::remove_finalizer(&self.api, self.volumes.rt, &cached.found(), PV_PROTECTION)
                    .await
                    .map_err(err)?;
            }
            VolumeStep::Delete => match internal::delete(&self.api, self.volumes.rt, &cached.found()).await {
                Ok(()) | Err(crate::api::status::ApiError { code: 404, .. }) => {}
                Err(e) => return Err(e.to_string()),
            },
        }
        Ok(None)
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let seen = self.claims.revision().min(self.volumes.revision());
        if self.written.lock().get(&key).is_some_and(|rev| seen < *rev) {
            return Ok(Some(Duration::from_millis(20)));
        }
        if key.contains('/') {
            match self.claims.get(&key) {
                Some(c) => self.claim(&key, c).await,
                None => {
                    self.written.lock().remove(&key);
                    Ok(None)
                }
            }
        } else {
            match self.volumes.get(&key) {
                Some(c) => self.volume(&key, c).await,
                None => {
                    self.written.lock().remove(&key);
                    Ok(None)
                }
            }
        }
    }
}

impl Reconciler for VolumeController {
    fn name(&self) -> &'static str {
        "persistentvolume"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.claims.list().iter().chain(self.volumes.list().iter()).map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
#[path = "volume_test.rs"]
mod tests;
