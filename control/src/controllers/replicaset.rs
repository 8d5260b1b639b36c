//! ReplicaSet controller: keeps `spec.replicas` pods built from the
//! template, owned by the ReplicaSet, and reports their counts in status.
//!
//! [`plan`] is the pure core (the ReplicaSet, its pods and `now` in, what to
//! create, delete and report out); [`ReplicaSetController`] reads informers
//! and carries the plan out, with expectations: after its own writes it
//! waits until the pod informer has seen them before planning again, so it
//! never creates or deletes twice for one need.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::events::EventRecorder;
use super::informer::Informer;
use super::owned::{self, Expectations, Start};
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::{internal, ApiServer};

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Pods to create (each built from the template).
    pub create: usize,
    /// Names of pods to delete, most expendable first.
    pub delete: Vec<String>,
    pub status: Value,
}

pub fn is_active(pod: &Value) -> bool {
    !pod["metadata"]["deletionTimestamp"].is_string()
        && !matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

pub fn condition_true(obj: &Value, ty: &str) -> Option<DateTime<Utc>> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == ty && c["status"] == "True").map(|c| {
        c["lastTransitionTime"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or(DateTime::<Utc>::MIN_UTC, |t| t.with_timezone(&Utc))
    })
}

pub fn is_ready(pod: &Value) -> bool {
    condition_true(pod, "Ready").is_some()
}

/// Ready for at least `min_ready` seconds.
pub fn is_available(pod: &Value, min_ready: i64, now: DateTime<Utc>) -> bool {
    condition_true(pod, "Ready")
        .is_some_and(|since| min_ready == 0 || since + chrono::Duration::seconds(min_ready) <= now)
}

/// Deletion order, Kubernetes' ranking: unscheduled, then pending, then
/// not ready, then the most recently created.
fn expendability(pod: &Value) -> (u8, u8, u8, std::cmp::Reverse<String>) {
    let scheduled = pod["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
    let running = pod["status"]["phase"] == "Running";
    (
        u8::from(scheduled),
        u8::from(running),
        u8::from(is_ready(pod)),
        std::cmp::Reverse(pod["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string()),
    )
}

/// `pods`: the pods this ReplicaSet controls (any state).
pub fn plan(rs: &Value, pods: &[Value], now: DateTime<Utc>) -> Plan {
    let desired = rs["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
    let min_ready = rs["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
    let mut active: Vec<&Value> = pods.iter().filter(|p| is_active(p)).collect();
    let (create, delete) = if active.len() < desired {
        (desired - active.len(), vec![])
    } else {
        active.sort_by_key(|p| expendability(p));
        let extra = active.len() - desired;
        (0, active[..extra].iter().map(|p| p["metadata"]["name"].as_str().unwrap_or_default().to_string()).collect())
    };
    let labels = rs["spec"]["template"]["metadata"]["labels"].as_object().cloned().unwrap_or_default();
    let fully_labeled =
        active.iter().filter(|p| labels.iter().all(|(k, v)| p["metadata"]["labels"].get(k) == Some(v))).count();
    let mut status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": fully_labeled,
        "readyReplicas": active.iter().filter(|p| is_ready(p)).count(),
        "availableReplicas": active.iter().filter(|p| is_available(p, min_ready, now)).count(),
        "observedGeneration": rs["metadata"]["generation"].as_i64().unwrap_or(1),
    });
    if let Some(c) = rs["status"].get("conditions") {
        status["conditions"] = c.clone();
    }
    Plan { create, delete, status }
}

/// A pod built from the ReplicaSet's template, owned by it.
pub fn pod_from_template(rs: &Value) -> Value {
    let t = &rs["spec"]["template"];
    let name = rs["metadata"]["name"].as_str().unwrap_or_default();
    let mut meta = t["metadata"].clone();
    if !meta.is_object() {
        meta = json!({});
    }
    meta["generateName"] = json!(format!("{name}-"));
    meta["namespace"] = rs["metadata"]["namespace"].clone();
    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name,
        "uid": rs["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": t["spec"]})
}

pub struct ReplicaSetController {
    pub api: Arc<ApiServer>,
    pub replicasets: Arc<Informer>,
    pub pods: Arc<Informer>,
    pub recorder: EventRecorder,
    expectations: Expectations,
}

impl ReplicaSetController {
    pub fn new(api: Arc<ApiServer>, replicasets: Arc<Informer>, pods: Arc<Informer>, recorder: EventRecorder) -> Self {
        ReplicaSetController { api, replicasets, pods, recorder, expectations: Expectations::default() }
    }

    /// The ReplicaSets a pod change concerns: its owner's key.
    pub fn keys_for_pod(&self, pod: &super::informer::Cached) -> Vec<String> {
        owned::owner_keys(&self.replicasets, pod)
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let cached = match self.expectations.start(&self.replicasets, &self.pods, &key) {
            Start::Nothing => return Ok(None),
            Start::Wait => return Ok(Some(Duration::from_millis(20))),
            Start::Go(c) => c,
        };
        let rs = cached.object();
        let uid = cached.uid().to_string();
        // Only the pods it controls (ownerReference with controller: true).
        let pods: Vec<Value> = owned::dependents_of(&self.pods, &cached)
            .into_iter()
            .filter(|p| {
                p["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|o| o["uid"] == uid && o["controller"] == true)
            })
            .collect();
        let p = plan(&rs, &pods, Utc::now());
        let creates = (0..p.create.min(500)).map(|_| pod_from_template(&rs)).collect();
        let told = Some((&self.recorder, &rs));
        let mut last = owned::create_all(&self.api, &self.pods, creates, "replicaset-controller", told).await?;
        owned::delete_all(&self.api, &self.pods, cached.namespace(), &p.delete, told).await?;
        if !p.delete.is_empty() {
            // A delete's revision is not returned; the store's current one bounds it.
            last = last.max(self.api.objects.revision());
        }
        self.expectations.wrote(&key, last);
        if rs["status"] != p.status && status_differs(&rs["status"], &p.status) {
            let found = Found { object: rs.clone(), mod_revision: cached.mod_revision };
            internal::write_status(&self.api, self.replicasets.rt, &found, p.status)
                .await
                .map_err(|e| e.to_string())?;
        }
        // Pods become available minReadySeconds after Ready: look again then.
        let min_ready = rs["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
        Ok((min_ready > 0).then(|| Duration::from_secs(min_ready as u64)))
    }
}

/// Compares the fields the controller owns (not conditions others set).
fn status_differs(old: &Value, new: &Value) -> bool {
    ["replicas", "fullyLabeledReplicas", "readyReplicas", "availableReplicas", "observedGeneration"]
        .iter()
        .any(|k| old[*k].as_i64().unwrap_or(0) != new[*k].as_i64().unwrap_or(0))
}

impl Reconciler for ReplicaSetController {
    fn name(&self) -> &'static str {
        "replicaset"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.replicasets.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(replicas: i64) -> Value {
        json!({"metadata": {"name": "web-abc", "namespace": "d", "uid": "rs1", "generation": 2},
            "spec": {"replicas": replicas, "template": {"metadata": {"labels": {"app": "web"}},
              "spec": {"containers": [{"name": "c", "image": "i"}]}}}})
    }

    fn pod(name: &str, node: Option<&str>, ready: bool, created: &str) -> Value {
        let mut p = json!({"metadata": {"name": name, "labels": {"app": "web"}, "creationTimestamp": created},
            "spec": {}, "status": {"phase": if node.is_some() { "Running" } else { "Pending" }}});
        if let Some(n) = node {
            p["spec"]["nodeName"] = json!(n);
        }
        if ready {
            p["status"]["conditions"] =
                json!([{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
        }
        p
    }

    #[test]
    fn creates_the_missing_and_deletes_the_most_expendable() {
        let now = Utc::now();
        let p = plan(&rs(3), &[pod("a", Some("n1"), true, "t1")], now);
        assert_eq!((p.create, p.delete.len()), (2, 0));
        assert_eq!(p.status["replicas"], 1);
        assert_eq!(p.status["readyReplicas"], 1);
        assert_eq!(p.status["observedGeneration"], 2);
        let pods = [
            pod("old-ready", Some("n1"), true, "t1"),
            pod("new-ready", Some("n1"), true, "t3"),
            pod("unscheduled", None, false, "t2"),
            pod("notready", Some("n2"), false, "t1"),
        ];
        let p = plan(&rs(1), &pods, now);
        assert_eq!(p.delete, ["unscheduled", "notready", "new-ready"]);
        let mut gone = pod("x", Some("n1"), true, "t");
        gone["status"]["phase"] = json!("Failed");
        assert_eq!(plan(&rs(1), &[gone], now).create, 1, "failed pods do not count");
    }

    #[test]
    fn availability_waits_for_min_ready_seconds() {
        let mut r = rs(1);
        r["spec"]["minReadySeconds"] = json!(30);
        let ready_at = "2026-01-01T00:00:00Z";
        let p = pod("a", Some("n"), true, ready_at);
        let t0 = DateTime::parse_from_rfc3339(ready_at).unwrap().with_timezone(&Utc);
        assert_eq!(
            plan(&r, std::slice::from_ref(&p), t0 + chrono::Duration::seconds(10)).status["availableReplicas"],
            0
        );
        assert_eq!(plan(&r, &[p], t0 + chrono::Duration::seconds(31)).status["availableReplicas"], 1);
    }

    #[test]
    fn pods_from_the_template_are_owned() {
        let p = pod_from_template(&rs(1));
        assert_eq!(p["metadata"]["generateName"], "web-abc-");
        assert_eq!(p["metadata"]["ownerReferences"][0]["uid"], "rs1");
        assert_eq!(p["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(p["spec"]["containers"][0]["image"], "i");
    }
}
