//! DaemonSet controller: one pod per eligible node — nodes its node
//! selector and required node affinity match and whose NoSchedule/NoExecute
//! taints it tolerates (the scheduler's own filters decide eligibility) —
//! placed directly on the node. RollingUpdate replaces pods of an old
//! template at most `maxUnavailable` at a time; OnDelete waits for the
//! user to delete them. Status carries what `kubectl rollout status ds`
//! reads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::deployment::{int_or_percent, template_hash};
use super::events::EventRecorder;
use super::informer::Informer;
use super::owned::{self, Expectations, Start};
use super::runtime::{ReconcileResult, Reconciler};
use super::scheduler::{eligible, NodeInfo, PodInfo};
use crate::api::objects::Found;
use crate::api::{internal, ApiServer};

pub const HASH_LABEL: &str = "controller-revision-hash";

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Nodes to create a pod on.
    pub create: Vec<String>,
    /// Pods to delete (misplaced, duplicates, or old template during a rollout).
    pub delete: Vec<String>,
    pub status: Value,
}

fn node_of(p: &Value) -> &str {
    p["spec"]["nodeName"].as_str().unwrap_or_default()
}

fn name_of(p: &Value) -> String {
    p["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

/// The pod a DaemonSet wants on every eligible node (to test eligibility).
fn template_pod(ds: &Value) -> Value {
    let mut spec = ds["spec"]["template"]["spec"].clone();
    // DaemonSet pods tolerate the node-condition taints, as Kubernetes adds.
    if !spec["tolerations"].is_array() {
        spec["tolerations"] = json!([]);
    }
    if let Some(t) = spec["tolerations"].as_array_mut() {
        for key in
            ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable", "node.kubernetes.io/unschedulable"]
        {
            t.push(json!({"key": key, "operator": "Exists"}));
        }
    }
    json!({"metadata": ds["spec"]["template"]["metadata"], "spec": spec})
}

/// `pods`: the pods this DaemonSet controls; `nodes`: every node.
pub fn plan(ds: &Value, pods: &[Value], nodes: &[Value]) -> Plan {
    let now = Utc::now();
    let hash = template_hash(&ds["spec"]["template"]);
    let want = PodInfo::parse(&template_pod(ds));
    let eligible_nodes: Vec<String> =
        nodes.iter().map(NodeInfo::new).filter(|n| eligible(&want, n)).map(|n| n.name).collect();
    let active: Vec<&Value> = pods.iter().filter(|p| super::replicaset::is_active(p)).collect();
    let mut by_node: HashMap<&str, Vec<&Value>> = HashMap::new();
    for p in &active {
        by_node.entry(node_of(p)).or_default().push(p);
    }
    let mut create = Vec::new();
    let mut delete = Vec::new();
    let mut misscheduled = 0;
    for (node, ps) in &by_node {
        if !eligible_nodes.iter().any(|n| n == node) {
            misscheduled += ps.len();
            delete.extend(ps.iter().map(|p| name_of(p)));
        } else if ps.len() > 1 {
            // Keep the oldest, delete duplicates.
            let mut sorted = ps.clone();
            sorted.sort_by_key(|p| p["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string());
            delete.extend(sorted[1..].iter().map(|p| name_of(p)));
        }
    }
    for n in &eligible_nodes {
        if !by_node.contains_key(n.as_str()) {
            create.push(n.clone());
        }
    }
    let is_new = |p: &Value| p["metadata"]["labels"][HASH_LABEL].as_str() == Some(&hash);
    let desired = eligible_nodes.len() as i64;
    let on_eligible: Vec<&&Value> = active.iter().filter(|p| eligible_nodes.iter().any(|n| n == node_of(p))).collect();
    let min_ready = ds["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
    let available = on_eligible.iter().filter(|p| super::replicaset::is_available(p, min_ready, now)).count() as i64;
    // Rolling update: replace old pods while at most maxUnavailable are down.
    if ds["spec"]["updateStrategy"]["type"] != "OnDelete" {
        let max_unavailable =
            int_or_percent(&ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], desired, false, "1")
                .max(1);
        let unavailable = desired - available;
        let mut budget = (max_unavailable - unavailable).max(0);
        for p in on_eligible.iter().filter(|p| !is_new(p)) {
            let down = !super::replicaset::is_available(p, min_ready, now);
            if down || budget > 0 {
                if !down {
                    budget -= 1;
                }
                delete.push(name_of(p));
            }
        }
    }
    delete.sort();
    delete.dedup();
    let status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": on_eligible.len(),
        "numberMisscheduled": misscheduled,
        "numberReady": on_eligible.iter().filter(|p| super::replicaset::is_ready(p)).count(),
        "numberAvailable": available,
        "numberUnavailable": (desired - available).max(0),
        "updatedNumberScheduled": on_eligible.iter().filter(|p| is_new(p)).count(),
        "observedGeneration": ds["metadata"]["generation"].as_i64().unwrap_or(1),
    });
    Plan { create, delete, status }
}

/// The DaemonSet's pod for `node`.
pub fn pod_for(ds: &Value, node: &str) -> Value {
    let name = ds["metadata"]["name"].as_str().unwrap_or_default();
    let mut pod = template_pod(ds);
    let mut meta = if pod["metadata"].is_object() { pod["metadata"].clone() } else { json!({}) };
    meta["generateName"] = json!(format!("{name}-"));
    meta["namespace"] = ds["metadata"]["namespace"].clone();
    meta["labels"][HASH_LABEL] = json!(template_hash(&ds["spec"]["template"]));
    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": name,
        "uid": ds["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]);
    pod["metadata"] = meta;
    pod["spec"]["nodeName"] = json!(node);
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod
}

pub struct DaemonSetController {
    pub api: Arc<ApiServer>,
    pub daemonsets: Arc<Informer>,
    pub pods: Arc<Informer>,
    pub nodes: Arc<Informer>,
    pub recorder: EventRecorder,
    expectations: Expectations,
}

impl DaemonSetController {
    pub fn new(
        api: Arc<ApiServer>,
        daemonsets: Arc<Informer>,
        pods: Arc<Informer>,
        nodes: Arc<Informer>,
        recorder: EventRecorder,
    ) -> Self {
        DaemonSetController { api, daemonsets, pods, nodes, recorder, expectations: Expectations::default() }
    }

    pub fn keys_for_pod(&self, pod: &super::informer::Cached) -> Vec<String> {
        owned::owner_keys(&self.daemonsets, pod)
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let cached = match self.expectations.start(&self.daemonsets, &self.pods, &key) {
            Start::Nothing => return Ok(None),
            Start::Wait => return Ok(Some(Duration::from_millis(20))),
            Start::Go(c) => c,
        };
        let ds = cached.object();
        let pods = owned::dependents_of(&self.pods, &cached);
        let nodes: Vec<Value> = self.nodes.list().iter().map(|n| n.object()).collect();
        let p = plan(&ds, &pods, &nodes);
        let creates = p.create.iter().map(|node| pod_for(&ds, node)).collect();
        let told = Some((&self.recorder, &ds));
        let last = owned::create_all(&self.api, &self.pods, creates, "daemonset-controller", told).await?;
        owned::delete_all(&self.api, &self.pods, cached.namespace(), &p.delete, told).await?;
        self.expectations.wrote(&key, last);
        let changed = [
            "desiredNumberScheduled",
            "currentNumberScheduled",
            "numberMisscheduled",
            "numberReady",
            "numberAvailable",
            "updatedNumberScheduled",
            "observedGeneration",
        ]
        .iter()
        .any(|k| ds["status"][*k].as_i64().unwrap_or(0) != p.status[*k].as_i64().unwrap_or(0));
        if changed {
            let found = Found { object: ds.clone(), mod_revision: cached.mod_revision };
            internal::write_status(&self.api, self.daemonsets.rt, &found, p.status).await.map_err(|e| e.to_string())?;
        }
        Ok(None)
    }
}

impl Reconciler for DaemonSetController {
    fn name(&self) -> &'static str {
        "daemonset"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.daemonsets.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: Value, taints: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints},
            "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"}}})
    }

    fn ds(image: &str) -> Value {
        json!({"metadata": {"name": "agent", "namespace": "d", "uid": "ds1", "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
              "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"nodeSelector": {"disk": "ssd"},
                "containers": [{"name": "c", "image": image}]}}}})
    }

    fn running(mut pod: Value) -> Value {
        pod["metadata"]["name"] = json!(format!("p-{}", pod["spec"]["nodeName"].as_str().unwrap()));
        pod["status"] = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
        pod
    }

    #[test]
    fn one_pod_per_matching_tolerated_node() {
        let nodes = [
            node("a", json!({"disk": "ssd"}), json!([])),
            node("b", json!({"disk": "hdd"}), json!([])),
            node("c", json!({"disk": "ssd"}), json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}])),
            node("d", json!({"disk": "ssd"}), json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}])),
        ];
        let p = plan(&ds("v1"), &[], &nodes);
        assert_eq!(p.create, ["a", "d"], "hdd is not selected, the dedicated taint is not tolerated");
        assert_eq!(p.status["desiredNumberScheduled"], 2);
        let pods = [running(pod_for(&ds("v1"), "a")), running(pod_for(&ds("v1"), "b"))];
        let p = plan(&ds("v1"), &pods, &nodes);
        assert_eq!(p.create, ["d"]);
        assert_eq!(p.delete, ["p-b"], "a pod on a node that no longer matches goes");
    }

    #[test]
    fn rolling_update_replaces_one_at_a_time() {
        let nodes = [node("a", json!({"disk": "ssd"}), json!([])), node("b", json!({"disk": "ssd"}), json!([]))];
        let pods = [running(pod_for(&ds("v1"), "a")), running(pod_for(&ds("v1"), "b"))];
        let p = plan(&ds("v2"), &pods, &nodes);
        assert_eq!(p.delete.len(), 1, "maxUnavailable 1");
        assert_eq!(p.status["updatedNumberScheduled"], 0);
        let mut ondelete = ds("v2");
        ondelete["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
        assert!(plan(&ondelete, &pods, &nodes).delete.is_empty());
    }
}
