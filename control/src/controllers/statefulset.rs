//! StatefulSet controller: pods with stable identities `<set>-<ordinal>`
//! (hostname the pod's name, subdomain `spec.serviceName`, labels
//! `statefulset.kubernetes.io/pod-name` and `apps.kubernetes.io/pod-index`),
//! created and removed in ordinal order.
//!
//! - `OrderedReady` creates ordinal `i` only once `0..i` are Running and
//!   Ready (and available for `minReadySeconds`), and removes surplus pods
//!   from the highest ordinal down, one at a time, each gone before the next.
//!   `Parallel` creates and removes without waiting.
//! - Template versions are ControllerRevisions named `<set>-<hash>`, owned
//!   by the set, whose `data` is the patch that restores the template
//!   (`{"spec":{"template":{…,"$patch":"replace"}}}`) — what `kubectl
//!   rollout undo sts` applies. Pods carry their revision's name in
//!   `controller-revision-hash`; status names `currentRevision` and
//!   `updateRevision`; `revisionHistoryLimit` prunes revisions no pod uses.
//! - `RollingUpdate` replaces pods whose revision is not the update revision,
//!   from the highest ordinal down to `partition`, one at a time, each
//!   Ready (and available for `minReadySeconds`) before the next.
//!   `rollingUpdate.maxUnavailable` (alpha in Kubernetes) is ignored: always
//!   one at a time. `OnDelete` only recreates pods that were deleted, at the
//!   update revision.
//! - Failed or Succeeded pods are deleted and recreated.
//! - `volumeClaimTemplates`: each pod gets claims `<template>-<set>-<ordinal>`
//!   (labelled with the set's selector), created before the pod and named
//!   by its volume of the template's name, so a replaced pod finds its
//!   data again. A claim being deleted holds its pod's creation until it
//!   is gone. `persistentVolumeClaimRetentionPolicy`: `whenDeleted: Delete`
//!   makes the set an owner of the claims it creates (the garbage collector
//!   deletes them with it); `whenScaled: Delete` deletes the claims of
//!   ordinals scaled away once their pods are gone. `Retain` (the default)
//!   keeps them.
//! - Orphans (no controller) matched by the set's selector are adopted —
//!   pods only if named as its members, and ControllerRevisions — as after
//!   `kubectl delete sts --cascade=orphan` and a new apply. A member's name taken by a pod that cannot be adopted
//!   stops that ordinal's creation (a retried error) until the pod goes.
//!
//! [`plan`] is pure: the set, the pods and revisions it controls and `now`
//! in; what to write and the status out (no IO in it). The
//! [`StatefulSetController`] shell reads informers, carries the plan out and
//! waits, with expectations, until its writes are visible before planning
//! again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::daemonset::HASH_LABEL;
use super::deployment::template_hash;
use super::events::{EventRecorder, EventType};
use super::informer::{Cached, Informer};
use super::owned::{self, Expectations, Start};
use super::replicaset::{condition_true, is_available};
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::{internal, ApiServer};

pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
const MANAGER: &str = "statefulset-controller";
/// Pods one pass creates at most (Parallel): a huge `replicas` is worked
/// through in batches instead of planned all at once.
const MAX_CREATES: usize = 500;

/// What one pass writes, in order: revisions first (pods name them), then
/// pods, then status, then history pruning.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// A new ControllerRevision for the set's template.
    pub create_revision: Option<Value>,
    /// An older revision whose template the set has again (a rollback):
    /// its name and its new `revision` number.
    pub renumber_revision: Option<(String, i64)>,
    /// Claims to create (before the pods).
    pub create_claims: Vec<Value>,
    /// Pods to create.
    pub create: Vec<Value>,
    /// Claims of ordinals scaled away (`whenScaled: Delete`).
    pub delete_claims: Vec<String>,
    /// Names of pods to delete.
    pub delete: Vec<String>,
    pub status: Value,
    /// Names of revisions past `revisionHistoryLimit` that no pod uses.
    pub prune_revisions: Vec<String>,
    /// Look again after this even if nothing changes (a pod becoming
    /// available after `minReadySeconds`).
    pub requeue: Option<Duration>,
}

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn terminating(p: &Value) -> bool {
    p["metadata"]["deletionTimestamp"].is_string()
}

fn finished(p: &Value) -> bool {
    matches!(p["status"]["phase"].as_str(), Some("Failed" | "Succeeded"))
}

fn running_and_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running" && condition_true(p, "Ready").is_some()
}

/// Running, Ready for `min_ready` seconds, and not on its way out.
fn healthy(p: &Value, min_ready: i64, now: DateTime<Utc>) -> bool {
    running_and_ready(p) && is_available(p, min_ready, now) && !terminating(p)
}

fn pod_revision(p: &Value) -> &str {
    p["metadata"]["labels"][HASH_LABEL].as_str().unwrap_or_default()
}

/// The ordinal of a pod named `<set>-<n>` (exactly: `web-01` is no member).
pub fn ordinal_of(set: &str, pod: &str) -> Option<i64> {
    let n = pod.strip_prefix(set)?.strip_prefix('-')?;
    let ord: i64 = n.parse().ok().filter(|o| *o >= 0)?;
    (ord.to_string() == n).then_some(ord)
}

/// The template a revision restores (its data without the `$patch`).
pub fn revision_template(rev: &Value) -> Value {
    let mut t = rev["data"]["spec"]["template"].clone();
    if let Some(m) = t.as_object_mut() {
        m.remove("$patch");
    }
    t
}

fn revision_number(rev: &Value) -> i64 {
    rev["revision"].as_i64().unwrap_or(0)
}

/// The revision's name for `template`: FNV over the template and, after
/// name collisions, the collision count (as Kubernetes does).
pub fn revision_name(set: &str, template: &Value, collisions: i64) -> String {
    let hash = if collisions == 0 {
        template_hash(template)
    } else {
        template_hash(&json!({"template": template, "collisionCount": collisions}))
    };
    format!("{set}-{hash}")
}

fn owner_ref(sts: &Value) -> Value {
    json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name_of(sts),
        "uid": sts["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}])
}

/// A ControllerRevision recording `sts`'s template as revision `number`.
pub fn new_revision(sts: &Value, name: &str, number: i64) -> Value {
    let template = &sts["spec"]["template"];
    let mut labels = template["metadata"]["labels"].as_object().cloned().unwrap_or_default();
    let hash = name.strip_prefix(&format!("{}-", name_of(sts))).unwrap_or(name);
    labels.insert(HASH_LABEL.into(), json!(hash));
    let mut data_template = template.clone();
    if !data_template.is_object() {
        data_template = json!({});
    }
    data_template["$patch"] = json!("replace");
    json!({
        "apiVersion": "apps/v1", "kind": "ControllerRevision",
        "metadata": {"name": name, "namespace": sts["metadata"]["namespace"], "labels": labels,
            "ownerReferences": owner_ref(sts)},
        "data": {"spec": {"template": data_template}},
        "revision": number,
    })
}

/// The claim of template `t` for the set's pod `ordinal`.
pub fn claim_name(t: &Value, set: &str, ordinal: i64) -> String {
    format!("{}-{set}-{ordinal}", name_of(t))
}

fn claim_templates(sts: &Value) -> &[Value] {
    sts["spec"]["volumeClaimTemplates"].as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The claim for template `t` and `ordinal`: the template's metadata and
/// spec, the selector's labels, and the set as an owner if the claims go
/// with it (`whenDeleted: Delete`).
pub fn claim_for(sts: &Value, t: &Value, ordinal: i64) -> Value {
    let mut meta = json!({"name": claim_name(t, name_of(sts), ordinal), "namespace": sts["metadata"]["namespace"]});
    for k in ["labels", "annotations"] {
        if t["metadata"][k].is_object() {
            meta[k] = t["metadata"][k].clone();
        }
    }
    for (k, v) in sts["spec"]["selector"]["matchLabels"].as_object().into_iter().flatten() {
        meta["labels"][k] = v.clone();
    }
    if sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete" {
        meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name_of(sts),
            "uid": sts["metadata"]["uid"], "blockOwnerDeletion": true}]);
    }
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": t["spec"]})
}

/// The set's pod for `ordinal`, built from `template` of revision `revision`.
pub fn pod_for(sts: &Value, template: &Value, revision: &str, ordinal: i64) -> Value {
    let set = name_of(sts);
    let name = format!("{set}-{ordinal}");
    let mut meta = if template["metadata"].is_object() { template["metadata"].clone() } else { json!({}) };
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    meta["labels"][HASH_LABEL] = json!(revision);
    meta["labels"][POD_NAME_LABEL] = json!(name);
    meta["labels"][POD_INDEX_LABEL] = json!(ordinal.to_string());
    meta["name"] = json!(name);
    meta["namespace"] = sts["metadata"]["namespace"].clone();
    meta["ownerReferences"] = owner_ref(sts);
    let mut spec = if template["spec"].is_object() { template["spec"].clone() } else { json!({}) };
    spec["hostname"] = json!(name);
    if let Some(svc) = sts["spec"]["serviceName"].as_str().filter(|s| !s.is_empty()) {
        spec["subdomain"] = json!(svc);
    }
    // Each claim template is a volume of its name, replacing one the pod
    // template may have under that name.
    for t in claim_templates(sts) {
        let volume = json!({"name": name_of(t), "persistentVolumeClaim": {"claimName": claim_name(t, set, ordinal)}});
        let mut volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        volumes.retain(|v| v["name"] != volume["name"]);
        volumes.push(volume);
        spec["volumes"] = json!(volumes);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
}

/// Which revision the set's template is, and what that takes.
struct Revisions {
    update: String,
    current: String,
    /// The template of the current revision (for ordinals below the partition).
    current_template: Value,
    collisions: i64,
    create: Option<Value>,
    renumber: Option<(String, i64)>,
}

fn resolve_revisions(sts: &Value, revisions: &[&Value]) -> Revisions {
    let set = name_of(sts);
    let template = &sts["spec"]["template"];
    let next = revisions.last().map_or(1, |r| revision_number(r) + 1);
    let mut collisions = sts["status"]["collisionCount"].as_i64().unwrap_or(0).max(0);
    let equal = revisions.iter().rposition(|r| revision_template(r) == *template);
    let (update, create, renumber) = match equal {
        // The latest revision: the template has not changed.
        Some(i) if i + 1 == revisions.len() => (name_of(revisions[i]).to_string(), None, None),
        // An older one: a rollback, which makes it the latest again.
        Some(i) => {
            let name = name_of(revisions[i]).to_string();
            (name.clone(), None, Some((name, next)))
        }
        None => {
            // A name already taken by another template: count the collision.
            let mut name = revision_name(set, template, collisions);
            while collisions < 1000 && revisions.iter().any(|r| name_of(r) == name) {
                collisions += 1;
                name = revision_name(set, template, collisions);
            }
            let rev = new_revision(sts, &name, next);
            (name, Some(rev), None)
        }
    };
    let wanted = sts["status"]["currentRevision"].as_str().unwrap_or_default();
    let (current, current_template) = match revisions.iter().find(|r| !wanted.is_empty() && name_of(r) == wanted) {
        Some(r) => (wanted.to_string(), revision_template(r)),
        None => (update.clone(), template.clone()),
    };
    Revisions { update, current, current_template, collisions, create, renumber }
}

/// `pods` and `revisions`: those `sts` controls (any state); `claims`:
/// the claims of the set's namespace (any owner).
pub fn plan(sts: &Value, pods: &[Value], revisions: &[Value], claims: &[Value], now: DateTime<Utc>) -> Plan {
    let set = name_of(sts);
    let spec = &sts["spec"];
    let replicas = spec["replicas"].as_i64().unwrap_or(1).max(0);
    let start = spec["ordinals"]["start"].as_i64().unwrap_or(0).max(0);
    let end = start.saturating_add(replicas);
    let monotonic = spec["podManagementPolicy"] != "Parallel";
    let on_delete = spec["updateStrategy"]["type"] == "OnDelete";
    let partition =
        if on_delete { 0 } else { spec["updateStrategy"]["rollingUpdate"]["partition"].as_i64().unwrap_or(0).max(0) };
    let min_ready = spec["minReadySeconds"].as_i64().unwrap_or(0).max(0);
    let history_limit = spec["revisionHistoryLimit"].as_i64().unwrap_or(10).max(0) as usize;

    let mut revs: Vec<&Value> = revisions.iter().collect();
    revs.sort_by(|a, b| {
        let key = |r: &Value| {
            (revision_number(r), r["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string())
        };
        key(a).cmp(&key(b)).then_with(|| name_of(a).cmp(name_of(b)))
    });
    let r = resolve_revisions(sts, &revs);

    // Members: pods named `<set>-<ordinal>`; others are not the set's to manage.
    let members: BTreeMap<i64, &Value> =
        pods.iter().filter_map(|p| ordinal_of(set, name_of(p)).map(|o| (o, p))).collect();
    let in_range: BTreeMap<i64, &Value> =
        members.iter().filter(|(o, _)| (start..end).contains(*o)).map(|(o, p)| (*o, *p)).collect();
    let condemned: Vec<&Value> = members.iter().filter(|(o, _)| !(start..end).contains(*o)).map(|(_, p)| *p).collect();

    let mut status = json!({
        "observedGeneration": sts["metadata"]["generation"].as_i64().unwrap_or(1),
        "replicas": members.len(),
        "readyReplicas": members.values().filter(|p| running_and_ready(p)).count(),
        "availableReplicas": members.values().filter(|p| running_and_ready(p) && is_available(p, min_ready, now)).count(),
        "currentReplicas": members.values().filter(|p| !terminating(p) && pod_revision(p) == r.current).count(),
        "updatedReplicas": members.values().filter(|p| !terminating(p) && pod_revision(p) == r.update).count(),
        "currentRevision": r.current,
        "updateRevision": r.update,
        "collisionCount": r.collisions,
    });
    if !on_delete && status["updatedReplicas"] == status["replicas"] && status["readyReplicas"] == status["replicas"] {
        // The rollout is complete: the update revision becomes the current one.
        status["currentReplicas"] = status["updatedReplicas"].clone();
        status["currentRevision"] = json!(r.update);
    }
    if let Some(c) = sts["status"].get("conditions") {
        status["conditions"] = c.clone();
    }

    let claim_by_name: BTreeMap<&str, &Value> = claims.iter().map(|c| (name_of(c), c)).collect();
    let mut create_claims = Vec::new();
    // The claims ordinal `o`'s pod needs made, or None while one is being deleted.
    let mut claims_for = |o: i64| -> Option<()> {
        let mut missing = Vec::new();
        for t in claim_templates(sts) {
            match claim_by_name.get(claim_name(t, set, o).as_str()) {
                Some(c) if terminating(c) => return None,
                Some(_) => {}
                None => missing.push(claim_for(sts, t, o)),
            }
        }
        create_claims.extend(missing);
        Some(())
    };
    let mut create = Vec::new();
    let mut delete: Vec<String> = Vec::new();
    // A pod for `ordinal`: below the partition it stays at the current revision.
    let new_pod = |ordinal: i64| {
        if !on_delete && ordinal < partition {
            pod_for(sts, &r.current_template, &r.current, ordinal)
        } else {
            pod_for(sts, &spec["template"], &r.update, ordinal)
        }
    };
    'work: {
        for ordinal in start..end {
            let Some(p) = in_range.get(&ordinal) else {
                if claims_for(ordinal).is_none() {
                    // Its claim is on its way out: made anew once gone.
                    if monotonic {
                        break 'work;
                    }
                    continue;
                }
                create.push(new_pod(ordinal));
                if monotonic || create.len() >= MAX_CREATES {
                    break 'work;
                }
                continue;
            };
            if finished(p) {
                // Recreated once it is gone.
                if !terminating(p) {
                    delete.push(name_of(p).to_string());
                }
                if monotonic {
                    break 'work;
                }
                continue;
            }
            if monotonic && !healthy(p, min_ready, now) {
                break 'work;
            }
        }
        // Surplus pods go from the highest ordinal down. In OrderedReady an
        // unhealthy one blocks the others unless it is the lowest unhealthy.
        let first_unhealthy = condemned.iter().find(|p| !running_and_ready(p) || terminating(p));
        for p in condemned.iter().rev() {
            if terminating(p) {
                if monotonic {
                    break 'work;
                }
                continue;
            }
            let is_first_unhealthy = first_unhealthy.is_some_and(|f| std::ptr::eq(*f, *p));
            if monotonic && !running_and_ready(p) && !is_first_unhealthy {
                break 'work;
            }
            delete.push(name_of(p).to_string());
            if monotonic {
                break 'work;
            }
        }
        if on_delete {
            break 'work;
        }
        // Rolling update: the highest pod not at the update revision goes,
        // once every pod above it is healthy.
        for ordinal in (start.max(partition)..end).rev() {
            let Some(p) = in_range.get(&ordinal) else { break 'work };
            if pod_revision(p) != r.update && !terminating(p) {
                delete.push(name_of(p).to_string());
                break 'work;
            }
            if !healthy(p, min_ready, now) {
                break 'work;
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    delete.retain(|n| seen.insert(n.clone()));

    // History: revisions neither current, nor the update, nor any pod's.
    let live = |name: &str| {
        name == r.current
            || name == r.update
            || status["currentRevision"] == name
            || pods.iter().any(|p| pod_revision(p) == name)
    };
    let history: Vec<&str> = revs.iter().map(|r| name_of(r)).filter(|n| !live(n)).collect();
    let prune_revisions =
        history[..history.len().saturating_sub(history_limit)].iter().map(|n| n.to_string()).collect();

    // A ready pod becomes available minReadySeconds after turning Ready.
    let requeue = members
        .values()
        .filter(|p| running_and_ready(p) && !is_available(p, min_ready, now))
        .filter_map(|p| condition_true(p, "Ready"))
        .map(|since| since + chrono::Duration::seconds(min_ready) - now)
        .filter_map(|d| d.to_std().ok())
        .min()
        .map(|d| d + Duration::from_millis(10));

    // whenScaled Delete: claims of ordinals scaled away whose pods are gone.
    let delete_claims = if spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Delete" {
        claims
            .iter()
            .filter(|c| !terminating(c) && super::disruption::selects(&spec["selector"], &c["metadata"]["labels"]))
            .filter(|c| {
                claim_templates(sts).iter().any(|t| {
                    let ord =
                        name_of(c).strip_prefix(&format!("{}-", name_of(t))).and_then(|rest| ordinal_of(set, rest));
                    ord.is_some_and(|o| !(start..end).contains(&o) && !members.contains_key(&o))
                })
            })
            .map(|c| name_of(c).to_string())
            .collect()
    } else {
        vec![]
    };

    Plan {
        create_revision: r.create,
        renumber_revision: r.renumber,
        create_claims,
        create,
        delete_claims,
        delete,
        status,
        prune_revisions,
        requeue,
    }
}

/// Compares the fields the controller owns (not conditions others set).
fn status_differs(old: &Value, new: &Value) -> bool {
    [
        "observedGeneration",
        "replicas",
        "readyReplicas",
        "availableReplicas",
        "currentReplicas",
        "updatedReplicas",
        "currentRevision",
        "updateRevision",
        "collisionCount",
    ]
    .iter()
    .any(|k| old[*k] != new[*k] && !(old[*k].is_null() && new[*k] == 0))
}

/// A pod or ControllerRevision (`kind`) `sts` may adopt: no controller,
/// selected by it, and for a pod a member's name.
pub fn adoptable(sts: &Value, kind: &str, obj: &Value) -> bool {
    let has_controller =
        obj["metadata"]["ownerReferences"].as_array().into_iter().flatten().any(|o| o["controller"] == true);
    !has_controller
        && !terminating(obj)
        && (kind != "Pod" || ordinal_of(name_of(sts), name_of(obj)).is_some())
        && super::disruption::selects(&sts["spec"]["selector"], &obj["metadata"]["labels"])
}

fn controlled_by(obj: &Value, uid: &str) -> bool {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["uid"] == uid && o["controller"] == true)
}

pub struct StatefulSetController {
    pub api: Arc<ApiServer>,
    pub statefulsets: Arc<Informer>,
    pub pods: Arc<Informer>,
    pub revisions: Arc<Informer>,
    pub claims: Arc<Informer>,
    pub recorder: EventRecorder,
    pod_writes: Expectations,
    revision_writes: Expectations,
}

impl StatefulSetController {
    pub fn new(
        api: Arc<ApiServer>,
        statefulsets: Arc<Informer>,
        pods: Arc<Informer>,
        revisions: Arc<Informer>,
        claims: Arc<Informer>,
        recorder: EventRecorder,
    ) -> Self {
        StatefulSetController {
            api,
            statefulsets,
            pods,
            revisions,
            claims,
            recorder,
            pod_writes: Expectations::default(),
            revision_writes: Expectations::default(),
        }
    }

    /// The StatefulSets a pod or ControllerRevision change concerns.
    pub fn keys_for_dependent(&self, obj: &Cached) -> Vec<String> {
        owned::owner_keys(&self.statefulsets, obj)
    }

    /// The sets of a namespace a claim going away may unblock.
    pub fn keys_for_claim(&self, c: &super::informer::Change) -> Vec<String> {
        if c.new.as_ref().is_some_and(|n| !n.deleting()) {
            return vec![];
        }
        let ns = c.key.split_once('/').map(|(ns, _)| ns).unwrap_or_default();
        self.statefulsets.list_namespace(ns).iter().map(|s| s.key.clone()).collect()
    }

    /// Makes the set the controller of its adoptable revisions and pods;
    /// whether any was.
    async fn adopt_orphans(&self, sts: &Value, key: &str, ns: &str) -> Result<bool, String> {
        let mut adopted = false;
        for (inf, writes) in [(&self.revisions, &self.revision_writes), (&self.pods, &self.pod_writes)] {
            let mut last = 0;
            for c in inf.list_namespace(ns) {
                let mut obj = c.object();
                if !adoptable(sts, inf.rt.kind, &obj) {
                    continue;
                }
                let mut refs = obj["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
                refs.extend(owner_ref(sts).as_array().cloned().unwrap_or_default());
                obj["metadata"]["ownerReferences"] = json!(refs);
                let w = internal::write(&self.api, inf.rt, Some(&c.found()), obj, MANAGER)
                    .await
                    .map_err(|e| e.to_string())?;
                last = last.max(crate::api::objects::revision_of(&w));
            }
            writes.wrote(key, last);
            adopted |= last > 0;
        }
        Ok(adopted)
    }

    /// Kubernetes' StatefulPodControl event: "create Pod web-0 in
    /// StatefulSet web successful" (or "... failed error: ...").
    fn tell(&self, sts: &Value, verb: &str, pod: &str, failed: Option<&crate::api::status::ApiError>) {
        let (reason, set) = (if verb == "create" { "Create" } else { "Delete" }, name_of(sts));
        match failed {
            None => self.recorder.event(
                sts,
                EventType::Normal,
                &format!("Successful{reason}"),
                format!("{verb} Pod {pod} in StatefulSet {set} successful"),
            ),
            Some(e) => self.recorder.event(
                sts,
                EventType::Warning,
                &format!("Failed{reason}"),
                format!("{verb} Pod {pod} in StatefulSet {set} failed error: {e}"),
            ),
        }
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let cached = match self.pod_writes.start(&self.statefulsets, &self.pods, &key) {
            Start::Nothing => return Ok(None),
            Start::Wait => return Ok(Some(Duration::from_millis(20))),
            Start::Go(c) => c,
        };
        if let Start::Wait = self.revision_writes.start(&self.statefulsets, &self.revisions, &key) {
            return Ok(Some(Duration::from_millis(20)));
        }
        let sts = cached.object();
        let uid = cached.uid().to_string();
        let ns = cached.namespace().to_string();
        let controlled = |inf: &Informer| -> Vec<Value> {
            owned::dependents_of(inf, &cached).into_iter().filter(|o| controlled_by(o, &uid)).collect()
        };
        if self.adopt_orphans(&sts, &key, &ns).await? {
            return Ok(Some(Duration::from_millis(20)));
        }
        let (pods, revisions) = (controlled(&self.pods), controlled(&self.revisions));
        let claims: Vec<Value> = self.claims.list_namespace(&ns).iter().map(|c| c.object()).collect();
        let p = plan(&sts, &pods, &revisions, &claims, Utc::now());
        let err = |e: crate::api::status::ApiError| e.to_string();
        let found = Found { object: sts.clone(), mod_revision: cached.mod_revision };

        let rev_rt = self.revisions.rt;
        let mut last_rev = 0;
        if let Some(rev) = &p.create_revision {
            match internal::write(&self.api, rev_rt, None, rev.clone(), MANAGER).await {
                Ok(w) => last_rev = crate::api::objects::revision_of(&w),
                Err(e) if e.code == 409 => {
                    // Taken by an object this set does not control: count the
                    // collision, so the next pass picks another name.
                    let mut status = p.status.clone();
                    status["collisionCount"] = json!(p.status["collisionCount"].as_i64().unwrap_or(0) + 1);
                    status["currentRevision"] = sts["status"]["currentRevision"].clone();
                    status["updateRevision"] = sts["status"]["updateRevision"].clone();
                    internal::write_status(&self.api, self.statefulsets.rt, &found, status).await.map_err(err)?;
                    return Ok(Some(Duration::from_millis(20)));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if let Some((name, number)) = &p.renumber_revision {
            if let Some(c) = self.revisions.get(&format!("{ns}/{name}")) {
                let mut rev = c.object();
                rev["revision"] = json!(number);
                let w = internal::write(&self.api, rev_rt, Some(&c.found()), rev, MANAGER).await.map_err(err)?;
                last_rev = crate::api::objects::revision_of(&w);
            }
        }
        self.revision_writes.wrote(&key, last_rev);

        for claim in &p.create_claims {
            match internal::write(&self.api, self.claims.rt, None, claim.clone(), MANAGER).await {
                // Made by an earlier pass the informer has not shown yet.
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => {
                    let msg =
                        format!("create Claim {} for StatefulSet {} failed error: {e}", name_of(claim), name_of(&sts));
                    self.recorder.event(&sts, EventType::Warning, "FailedCreate", msg);
                    return Err(e.to_string());
                }
            }
        }
        let mut last_pod = 0;
        for pod in &p.create {
            match internal::write(&self.api, self.pods.rt, None, pod.clone(), MANAGER).await {
                Ok(w) => {
                    self.tell(&sts, "create", name_of(pod), None);
                    last_pod = last_pod.max(crate::api::objects::revision_of(&w));
                }
                Err(e) if e.code == 409 => {
                    return Err(format!("pod {} exists and is not controlled by statefulset {key}", name_of(pod)))
                }
                Err(e) => {
                    self.tell(&sts, "create", name_of(pod), Some(&e));
                    return Err(e.to_string());
                }
            }
        }
        for name in &p.delete {
            let Some(c) = self.pods.get(&format!("{ns}/{name}")) else { continue };
            match internal::delete(&self.api, self.pods.rt, &c.found()).await {
                Ok(()) => self.tell(&sts, "delete", name, None),
                Err(e) if e.code == 404 => {}
                Err(e) => {
                    self.tell(&sts, "delete", name, Some(&e));
                    return Err(e.to_string());
                }
            }
        }
        if !p.delete.is_empty() {
            // A delete's revision is not returned; the store's current one bounds it.
            last_pod = last_pod.max(self.api.objects.revision());
        }
        self.pod_writes.wrote(&key, last_pod);

        if status_differs(&sts["status"], &p.status) {
            internal::write_status(&self.api, self.statefulsets.rt, &found, p.status).await.map_err(err)?;
        }
        owned::delete_all(&self.api, &self.revisions, &ns, &p.prune_revisions, None).await?;
        owned::delete_all(&self.api, &self.claims, &ns, &p.delete_claims, None).await?;
        Ok(p.requeue)
    }
}

impl Reconciler for StatefulSetController {
    fn name(&self) -> &'static str {
        "statefulset"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.statefulsets.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
#[path = "statefulset_test.rs"]
mod tests;
