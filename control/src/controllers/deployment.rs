//! Deployment controller: rolls a Deployment's pod template out through
//! ReplicaSets — one per template version, named `<deployment>-<hash>` and
//! labelled `pod-template-hash` — with the RollingUpdate (maxSurge,
//! maxUnavailable) or Recreate strategy, revision history
//! (`deployment.kubernetes.io/revision`, `revisionHistoryLimit`), pause, and
//! the status and conditions `kubectl rollout status` and `kubectl wait
//! --for=condition=Available` read. `kubectl rollout undo` patches the
//! template back; the matching old ReplicaSet then becomes the new one.
//!
//! [`plan`] is pure (Deployment, its ReplicaSets, `now` in; actions and
//! status out). The shell carries it out with expectations like the
//! ReplicaSet controller.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::events::{EventRecorder, EventType};
use super::informer::Informer;
use super::owned::{self, Expectations, Start};
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::{internal, ApiServer};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const HASH_LABEL: &str = "pod-template-hash";

/// Kubernetes' pod-template-hash: FNV-1a of the template, its decimal
/// digits mapped onto the alphabet without vowels and look-alikes.
pub fn template_hash(template: &Value) -> String {
    let mut t = template.clone();
    if let Some(l) = t["metadata"]["labels"].as_object_mut() {
        l.remove(HASH_LABEL);
    }
    let mut h: u32 = 0x811c9dc5;
    for b in serde_json::to_vec(&t).unwrap_or_default() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x01000193);
    }
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string().bytes().map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char).collect()
}

/// An int-or-percent of `total`; percentages round up for surge, down for
/// unavailability (Kubernetes' rules).
pub fn int_or_percent(v: &Value, total: i64, round_up: bool, default: &str) -> i64 {
    let v = if v.is_null() { json!(default) } else { v.clone() };
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => match s.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()) {
            Some(p) => {
                let x = p * total as f64 / 100.0;
                (if round_up { x.ceil() } else { x.floor() }) as i64
            }
            None => s.parse().unwrap_or(0),
        },
        _ => 0,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    CreateReplicaSet(Value),
    /// Set a ReplicaSet's replicas (and revision annotation).
    Scale {
        name: String,
        replicas: i64,
        revision: Option<i64>,
    },
    DeleteReplicaSet(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: Value,
    /// The revision annotation the Deployment itself should carry.
    pub revision: i64,
}

fn i(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn revision_of(rs: &Value) -> i64 {
    rs["metadata"]["annotations"][REVISION].as_str().and_then(|r| r.parse().ok()).unwrap_or(0)
}

fn name_of(v: &Value) -> String {
    v["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

fn new_replicaset(d: &Value, hash: &str, replicas: i64, revision: i64) -> Value {
    let dname = name_of(d);
    let mut template = d["spec"]["template"].clone();
    template["metadata"]["labels"][HASH_LABEL] = json!(hash);
    let mut selector = d["spec"]["selector"].clone();
    selector["matchLabels"][HASH_LABEL] = json!(hash);
    let mut labels = template["metadata"]["labels"].clone();
    labels[HASH_LABEL] = json!(hash);
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": format!("{dname}-{hash}"), "namespace": d["metadata"]["namespace"], "labels": labels,
            "annotations": {REVISION: revision.to_string(), "deployment.kubernetes.io/desired-replicas": i(&d["spec"]["replicas"]).to_string()},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": dname, "uid": d["metadata"]["uid"],
                "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"replicas": replicas, "minReadySeconds": d["spec"]["minReadySeconds"].as_i64().unwrap_or(0),
            "selector": selector, "template": template},
    })
}

fn condition(ty: &str, status: &str, reason: &str, message: String, now: &str, prev: Option<&Value>) -> Value {
    // lastTransitionTime moves only when the status flips.
    let transition = match prev {
        Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    let update = match prev {
        Some(p) if p["status"] == status && p["reason"] == reason => p["lastUpdateTime"].clone(),
        _ => json!(now),
    };
    json!({"type": ty, "status": status, "reason": reason, "message": message,
        "lastUpdateTime": update, "lastTransitionTime": transition})
}

/// `rss`: the ReplicaSets this Deployment controls.
pub fn plan(d: &Value, rss: &[Value], now: DateTime<Utc>) -> Plan {
    let now_s = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let spec = &d["spec"];
    let replicas = spec["replicas"].as_i64().unwrap_or(1).max(0);
    let hash = template_hash(&spec["template"]);
    let dname = name_of(d);
    let new = rss.iter().find(|r| r["metadata"]["labels"][HASH_LABEL].as_str() == Some(&hash));
    let mut olds: Vec<&Value> = rss.iter().filter(|r| new.is_none_or(|n| name_of(n) != name_of(r))).collect();
    olds.sort_by_key(|r| (revision_of(r), r["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string()));
    let max_old_rev = olds.iter().map(|r| revision_of(r)).max().unwrap_or(0);
    let recreate = spec["strategy"]["type"] == "Recreate";
    let surge = if recreate {
        0
    } else {
        int_or_percent(&spec["strategy"]["rollingUpdate"]["maxSurge"], replicas, true, "25%")
    };
    let mut unavailable = if recreate {
        replicas
    } else {
        int_or_percent(&spec["strategy"]["rollingUpdate"]["maxUnavailable"], replicas, false, "25%")
    };
    if surge == 0 && unavailable == 0 {
        unavailable = 1; // Kubernetes: both zero would never progress
    }
    let mut actions = Vec::new();
    let new_rev = match new {
        Some(n) if revision_of(n) > max_old_rev => revision_of(n),
        _ => max_old_rev + 1,
    };
    let spec_replicas = |r: &Value| i(&r["spec"]["replicas"]);
    let total: i64 = rss.iter().map(spec_replicas).sum();
    let paused = spec["paused"] == true;
    if !paused {
        match new {
            None => {
                let initial = if recreate {
                    if olds.iter().any(|r| spec_replicas(r) > 0 || i(&r["status"]["replicas"]) > 0) {
                        0
                    } else {
                        replicas
                    }
                } else {
                    (replicas + surge - total).clamp(0, replicas)
                };
                actions.push(Action::CreateReplicaSet(new_replicaset(d, &hash, initial, new_rev)));
            }
            Some(n) => {
                let n_name = name_of(n);
                let revision = (revision_of(n) != new_rev).then_some(new_rev);
                if recreate {
                    let old_running = olds.iter().any(|r| spec_replicas(r) > 0 || i(&r["status"]["replicas"]) > 0);
                    for r in olds.iter().filter(|r| spec_replicas(r) > 0) {
                        actions.push(Action::Scale { name: name_of(r), replicas: 0, revision: None });
                    }
                    if !old_running && spec_replicas(n) != replicas {
                        actions.push(Action::Scale { name: n_name, replicas, revision });
                    } else if revision.is_some() {
                        actions.push(Action::Scale { name: n_name, replicas: spec_replicas(n), revision });
                    }
                } else {
                    let new_replicas = spec_replicas(n);
                    let target = if new_replicas < replicas {
                        new_replicas + (replicas + surge - total).clamp(0, replicas - new_replicas)
                    } else {
                        replicas // scale down a new RS above the desired count at once
                    };
                    if target != new_replicas || revision.is_some() {
                        actions.push(Action::Scale { name: n_name.clone(), replicas: target, revision });
                    }
                    if target == new_replicas {
                        // Nothing to surge: scale old ReplicaSets down within the
                        // availability budget, unhealthy replicas first.
                        // A ReplicaSet scaled down but not yet caught up still
                        // reports pods it is about to delete: never count more
                        // available pods than its spec keeps (else two passes
                        // in a row could both spend the same budget).
                        let counted = |r: &Value| i(&r["status"]["availableReplicas"]).min(spec_replicas(r));
                        let available: i64 = rss.iter().map(counted).sum();
                        let min_available = replicas - unavailable;
                        let new_unavailable = (new_replicas - counted(n)).max(0);
                        let mut budget = (total - min_available - new_unavailable).max(0);
                        let mut scaled: HashMap<String, i64> = HashMap::new();
                        for r in &olds {
                            let unhealthy = (spec_replicas(r) - counted(r)).max(0);
                            let cut = unhealthy.min(budget);
                            if cut > 0 {
                                scaled.insert(name_of(r), spec_replicas(r) - cut);
                                budget -= cut;
                            }
                        }
                        let mut avail_budget = (available - min_available).max(0);
                        for r in &olds {
                            let cur = scaled.get(&name_of(r)).copied().unwrap_or_else(|| spec_replicas(r));
                            let cut = cur.min(avail_budget);
                            if cut > 0 {
                                scaled.insert(name_of(r), cur - cut);
                                avail_budget -= cut;
                            }
                        }
                        for r in &olds {
                            if let Some(&to) = scaled.get(&name_of(r)) {
                                actions.push(Action::Scale { name: name_of(r), replicas: to, revision: None });
                            }
                        }
                    }
                }
            }
        }
        // History: keep revisionHistoryLimit scaled-down old ReplicaSets.
        let limit = spec["revisionHistoryLimit"].as_i64().unwrap_or(10).max(0) as usize;
        let idle: Vec<&&Value> =
            olds.iter().filter(|r| spec_replicas(r) == 0 && i(&r["status"]["replicas"]) == 0).collect();
        if idle.len() > limit {
            for r in &idle[..idle.len() - limit] {
                actions.push(Action::DeleteReplicaSet(name_of(r)));
            }
        }
    }

    // Status, from what the ReplicaSets report.
    let sum = |f: &str| -> i64 { rss.iter().map(|r| i(&r["status"][f])).sum() };
    let updated = new.map_or(0, |n| i(&n["status"]["replicas"]));
    let available = sum("availableReplicas");
    let prev =
        |ty: &str| d["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == ty)).cloned();
    let available_cond = if available >= replicas - unavailable {
        condition(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
            &now_s,
            prev("Available").as_ref(),
        )
    } else {
        condition(
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
            &now_s,
            prev("Available").as_ref(),
        )
    };
    let new_name = format!("{dname}-{hash}");
    let complete = new
        .is_some_and(|n| i(&n["status"]["availableReplicas"]) >= replicas && spec_replicas(n) == replicas)
        && olds.iter().all(|r| i(&r["status"]["replicas"]) == 0)
        && updated == replicas;
    let prev_progress = prev("Progressing");
    let deadline = spec["progressDeadlineSeconds"].as_i64().unwrap_or(600);
    let progressing = if paused {
        condition(
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused".into(),
            &now_s,
            prev_progress.as_ref(),
        )
    } else if complete {
        condition(
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            &now_s,
            prev_progress.as_ref(),
        )
    } else {
        let last = prev_progress
            .as_ref()
            .filter(|p| p["status"] == "True")
            .and_then(|p| p["lastUpdateTime"].as_str())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
        let stuck = last.is_some_and(|t| t.with_timezone(&Utc) + chrono::Duration::seconds(deadline) < now)
            && prev_progress.as_ref().is_some_and(|p| p["reason"] == "ReplicaSetUpdated");
        if stuck || prev_progress.as_ref().is_some_and(|p| p["reason"] == "ProgressDeadlineExceeded") {
            condition(
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                &now_s,
                prev_progress.as_ref(),
            )
        } else {
            // Progress moves lastUpdateTime: any change in the counts.
            let mut c = condition(
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{new_name}\" is progressing."),
                &now_s,
                prev_progress.as_ref(),
            );
            let moved = d["status"]["updatedReplicas"] != json!(updated)
                || d["status"]["availableReplicas"] != json!(available)
                || !actions.is_empty();
            if moved {
                c["lastUpdateTime"] = json!(now_s);
            }
            c
        }
    };
    let mut status = json!({
        "observedGeneration": d["metadata"]["generation"].as_i64().unwrap_or(1),
        "replicas": sum("replicas"),
        "updatedReplicas": updated,
        "readyReplicas": sum("readyReplicas"),
        "availableReplicas": available,
        "conditions": [available_cond, progressing],
    });
    let unavailable_count = (replicas.max(sum("replicas")) - available).max(0);
    if unavailable_count > 0 {
        status["unavailableReplicas"] = json!(unavailable_count);
    }
    Plan { actions, status, revision: new_rev }
}

pub struct DeploymentController {
    pub api: Arc<ApiServer>,
    pub deployments: Arc<Informer>,
    pub replicasets: Arc<Informer>,
    pub recorder: EventRecorder,
    expectations: Expectations,
}

impl DeploymentController {
    pub fn new(
        api: Arc<ApiServer>,
        deployments: Arc<Informer>,
        replicasets: Arc<Informer>,
        recorder: EventRecorder,
    ) -> Self {
        DeploymentController { api, deployments, replicasets, recorder, expectations: Expectations::default() }
    }

    pub fn keys_for_replicaset(&self, rs: &super::informer::Cached) -> Vec<String> {
        owned::owner_keys(&self.deployments, rs)
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let cached = match self.expectations.start(&self.deployments, &self.replicasets, &key) {
            Start::Nothing => return Ok(None),
            Start::Wait => return Ok(Some(Duration::from_millis(20))),
            Start::Go(c) => c,
        };
        let d = cached.object();
        let uid = cached.uid().to_string();
        let ns = cached.namespace().to_string();
        let rss: Vec<Value> =
            self.replicasets.list_namespace(&ns).iter().filter(|r| r.owned_by(&uid)).map(|r| r.object()).collect();
        let p = plan(&d, &rss, Utc::now());
        let rs_rt = self.replicasets.rt;
        let mut last_rev = 0;
        let err = |e: crate::api::status::ApiError| e.to_string();
        for a in &p.actions {
            let written = match a {
                Action::CreateReplicaSet(rs) => {
                    let (name, replicas) = (name_of(rs), i(&rs["spec"]["replicas"]));
                    match internal::write(&self.api, rs_rt, None, rs.clone(), "deployment-controller").await {
                        Err(e) if e.code == 409 => continue, // created by an earlier pass; the informer will show it
                        Err(e) => {
                            let msg = format!("Failed to create new replica set {name:?}: {e}");
                            self.recorder.event(&d, EventType::Warning, "ReplicaSetCreateError", msg);
                            return Err(e.to_string());
                        }
                        Ok(w) => {
                            if replicas > 0 {
                                let msg = format!("Scaled up replica set {name} from 0 to {replicas}");
                                self.recorder.event(&d, EventType::Normal, "ScalingReplicaSet", msg);
                            }
                            w
                        }
                    }
                }
                Action::Scale { name, replicas, revision } => {
                    let Some(c) = self.replicasets.get(&format!("{ns}/{name}")) else { continue };
                    let mut rs = c.object();
                    let from = i(&rs["spec"]["replicas"]);
                    rs["spec"]["replicas"] = json!(replicas);
                    if let Some(r) = revision {
                        rs["metadata"]["annotations"][REVISION] = json!(r.to_string());
                    }
                    rs["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] =
                        json!(d["spec"]["replicas"].as_i64().unwrap_or(1).to_string());
                    let found = c.found();
                    let w = internal::write(&self.api, rs_rt, Some(&found), rs, "deployment-controller")
                        .await
                        .map_err(err)?;
                    if from != *replicas {
                        let dir = if from < *replicas { "up" } else { "down" };
                        let msg = format!("Scaled {dir} replica set {name} from {from} to {replicas}");
                        self.recorder.event(&d, EventType::Normal, "ScalingReplicaSet", msg);
                    }
                    w
                }
                Action::DeleteReplicaSet(name) => {
                    let Some(c) = self.replicasets.get(&format!("{ns}/{name}")) else { continue };
                    let found = c.found();
                    internal::delete(&self.api, rs_rt, &found).await.map_err(err)?;
                    continue;
                }
            };
            last_rev = last_rev.max(crate::api::objects::revision_of(&written));
        }
        self.expectations.wrote(&key, last_rev);
        let rev_annotation = d["metadata"]["annotations"][REVISION].as_str().and_then(|s| s.parse::<i64>().ok());
        let found = Found { object: d.clone(), mod_revision: cached.mod_revision };
        if rev_annotation != Some(p.revision) {
            // The Deployment carries its current revision, as in Kubernetes.
            let mut obj = d.clone();
            obj["metadata"]["annotations"][REVISION] = json!(p.revision.to_string());
            internal::write(&self.api, self.deployments.rt, Some(&found), obj, "deployment-controller")
                .await
                .map_err(err)?;
            return Ok(Some(Duration::from_millis(1)));
        }
        if status_changed(&d["status"], &p.status) {
            internal::write_status(&self.api, self.deployments.rt, &found, p.status).await.map_err(err)?;
        }
        // Re-check for the progress deadline and minReadySeconds.
        Ok(Some(Duration::from_secs(5)))
    }
}

fn status_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        for c in v["conditions"].as_array_mut().into_iter().flatten() {
            if let Some(m) = c.as_object_mut() {
                m.remove("lastUpdateTime");
                m.remove("lastTransitionTime");
            }
        }
        v
    };
    strip(old) != strip(new)
}

impl Reconciler for DeploymentController {
    fn name(&self) -> &'static str {
        "deployment"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.deployments.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(replicas: i64, image: &str) -> Value {
        json!({"metadata": {"name": "web", "namespace": "d", "uid": "d1", "generation": 1},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
              "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
              "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": image}]}}}})
    }

    /// A ReplicaSet as the RS controller would report it once settled.
    fn settled(mut rs: Value, ready: i64) -> Value {
        rs["status"] = json!({"replicas": rs["spec"]["replicas"], "readyReplicas": ready, "availableReplicas": ready});
        rs
    }

    /// Every ReplicaSet at its spec, all pods ready.
    fn settle_all(rss: Vec<Value>) -> Vec<Value> {
        rss.into_iter()
            .map(|r| {
                let n = i(&r["spec"]["replicas"]);
                settled(r, n)
            })
            .collect()
    }

    fn apply(rss: &mut Vec<Value>, actions: &[Action]) {
        for a in actions {
            match a {
                Action::CreateReplicaSet(rs) => rss.push(rs.clone()),
                Action::Scale { name, replicas, revision } => {
                    let rs = rss.iter_mut().find(|r| r["metadata"]["name"] == json!(name)).unwrap();
                    rs["spec"]["replicas"] = json!(replicas);
                    if let Some(r) = revision {
                        rs["metadata"]["annotations"][REVISION] = json!(r.to_string());
                    }
                }
                Action::DeleteReplicaSet(name) => rss.retain(|r| r["metadata"]["name"] != json!(name)),
            }
        }
    }

    #[test]
    fn rolling_update_never_exceeds_surge_nor_drops_below_availability() {
        let now = Utc::now();
        let d1 = deploy(3, "v1");
        let p = plan(&d1, &[], now);
        let Action::CreateReplicaSet(rs1) = &p.actions[0] else { panic!("{:?}", p.actions) };
        assert_eq!(rs1["spec"]["replicas"], 3);
        assert_eq!(rs1["metadata"]["annotations"][REVISION], "1");
        assert_eq!(rs1["spec"]["selector"]["matchLabels"][HASH_LABEL], rs1["metadata"]["labels"][HASH_LABEL]);
        let mut rss = vec![settled(rs1.clone(), 3)];
        let p = plan(&d1, &rss, now);
        assert!(p.actions.is_empty());
        assert_eq!(p.status["conditions"][0]["status"], "True");
        assert_eq!(p.status["conditions"][1]["reason"], "NewReplicaSetAvailable");

        // New image: step until done, checking the bounds at every step.
        let d2 = deploy(3, "v2");
        for step in 0..20 {
            let p = plan(&d2, &rss, now);
            apply(&mut rss, &p.actions);
            // The RS controller settles every ReplicaSet; all pods become ready.
            rss = settle_all(rss);
            let total: i64 = rss.iter().map(|r| i(&r["spec"]["replicas"])).sum();
            let available: i64 = rss.iter().map(|r| i(&r["status"]["availableReplicas"])).sum();
            assert!(total <= 4, "step {step}: maxSurge 1 exceeded: {total}");
            assert!(available >= 3, "step {step}: maxUnavailable 0 violated: {available}");
            if p.actions.is_empty() {
                assert_eq!(p.status["updatedReplicas"], 3);
                assert_eq!(p.status["conditions"][1]["reason"], "NewReplicaSetAvailable");
                assert_eq!(p.revision, 2);
                return;
            }
        }
        panic!("rollout did not finish: {rss:?}");
    }

    #[test]
    fn a_lagging_replicaset_status_does_not_spend_the_budget_twice() {
        let now = Utc::now();
        let d2 = deploy(3, "v2");
        let old = new_replicaset(&deploy(3, "v1"), &template_hash(&deploy(3, "v1")["spec"]["template"]), 2, 1);
        // Scaled 3 -> 2 a moment ago; its status still shows 3 available.
        let mut old = settled(old, 3);
        old["status"]["replicas"] = json!(3);
        let mut new = new_replicaset(&d2, &template_hash(&d2["spec"]["template"]), 2, 2);
        new["status"] = json!({"replicas": 2, "availableReplicas": 1});
        let p = plan(&d2, &[old, new], now);
        assert!(!p.actions.iter().any(|a| matches!(a, Action::Scale { replicas: 1, .. })), "{:?}", p.actions);
    }

    #[test]
    fn recreate_waits_for_old_pods_and_history_is_bounded() {
        let now = Utc::now();
        let mut d = deploy(2, "v1");
        d["spec"]["strategy"] = json!({"type": "Recreate"});
        d["spec"]["revisionHistoryLimit"] = json!(1);
        let Action::CreateReplicaSet(rs1) = plan(&d, &[], now).actions[0].clone() else { panic!() };
        let mut rss = vec![settled(rs1, 2)];
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("v2");
        let p = plan(&d, &rss, now);
        let Action::CreateReplicaSet(rs2) = &p.actions[0] else { panic!("{:?}", p.actions) };
        assert_eq!(rs2["spec"]["replicas"], 0, "old pods still run");
        rss.push(settled(rs2.clone(), 0));
        let p = plan(&d, &rss, now);
        assert!(p.actions.iter().any(|a| matches!(a, Action::Scale { replicas: 0, .. })));
        apply(&mut rss, &p.actions);
        rss = settle_all(rss);
        let p = plan(&d, &rss, now);
        assert!(p.actions.iter().any(|a| matches!(a, Action::Scale { replicas: 2, .. })), "{:?}", p.actions);
        // A third template: two idle old ReplicaSets, history limit 1.
        apply(&mut rss, &p.actions);
        rss = settle_all(rss);
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("v3");
        let p = plan(&d, &rss, now);
        assert!(!p.actions.iter().any(|a| matches!(a, Action::DeleteReplicaSet(_))), "only one idle");
        let mut rss2 = rss.clone();
        apply(&mut rss2, &p.actions);
        for r in rss2.iter_mut() {
            if r["metadata"]["name"] != json!(format!("web-{}", template_hash(&d["spec"]["template"]))) {
                r["spec"]["replicas"] = json!(0);
                r["status"] = json!({"replicas": 0});
            }
        }
        let p = plan(&d, &rss2, now);
        assert_eq!(p.actions.iter().filter(|a| matches!(a, Action::DeleteReplicaSet(_))).count(), 1);
    }

    #[test]
    fn rollback_reuses_the_old_replicaset_with_a_new_revision() {
        let now = Utc::now();
        let d1 = deploy(1, "v1");
        let Action::CreateReplicaSet(rs1) = plan(&d1, &[], now).actions[0].clone() else { panic!() };
        let mut rs1 = settled(rs1, 1);
        rs1["spec"]["replicas"] = json!(0);
        rs1["status"] = json!({"replicas": 0});
        let d2 = deploy(1, "v2");
        let mut rs2 = new_replicaset(&d2, &template_hash(&d2["spec"]["template"]), 1, 2);
        rs2 = settled(rs2, 1);
        // Undo: the template is v1 again.
        let p = plan(&d1, &[rs1, rs2], now);
        assert!(p.actions.iter().any(|a| matches!(a, Action::Scale { revision: Some(3), .. })), "{:?}", p.actions);
        assert_eq!(p.revision, 3);
    }

    #[test]
    fn percentages_round_as_kubernetes_does() {
        assert_eq!(int_or_percent(&json!("25%"), 10, true, "0"), 3);
        assert_eq!(int_or_percent(&json!("25%"), 10, false, "0"), 2);
        assert_eq!(int_or_percent(&Value::Null, 4, true, "25%"), 1);
        assert_eq!(int_or_percent(&json!(2), 10, false, "0"), 2);
        assert_eq!(template_hash(&json!({"spec": 1})).len(), template_hash(&json!({"spec": 1})).len());
        assert_ne!(template_hash(&json!({"spec": 1})), template_hash(&json!({"spec": 2})));
    }
}
