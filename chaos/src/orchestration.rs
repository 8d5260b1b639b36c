//! Scenario 10's Kubernetes side: a Deployment on the cluster's (hollow)
//! node agents while agents are killed or cut off and all masters are
//! restarted at once, and the orchestration invariants of RELIABILITY.md:
//! every pod is bound to at most one node over its whole life, and the
//! Deployment converges (every replica ready, nothing left over) once the
//! faults heal.
//!
//! The API is read with the real kubectl; [`PodSightings`] and
//! [`converged`] are pure, over what it printed.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

/// The Deployment the scenario keeps running. Its pods tolerate an
/// unreachable or not-ready node for 2 s only, so a partitioned agent's
/// pods are evicted and replaced elsewhere within the fault.
pub const DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: chaos-web, namespace: default}
spec:
  replicas: 6
  selector: {matchLabels: {app: chaos-web}}
  template:
    metadata: {labels: {app: chaos-web}}
    spec:
      terminationGracePeriodSeconds: 1
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      - {key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      containers:
      - {name: web, image: "busybox:stable", command: ["sleep", "3600"]}
"#;

pub const REPLICAS: usize = 6;
pub const SELECTOR: &str = "app=chaos-web";

/// Every node each pod (by uid) was seen bound to.
#[derive(Debug, Default)]
pub struct PodSightings {
    nodes: BTreeMap<String, BTreeSet<String>>,
}

impl PodSightings {
    /// Records one `kubectl get pods -o json` listing.
    pub fn record(&mut self, list: &Value) {
        for p in list["items"].as_array().into_iter().flatten() {
            let (Some(uid), Some(node)) = (p["metadata"]["uid"].as_str(), p["spec"]["nodeName"].as_str()) else {
                continue;
            };
            self.nodes.entry(uid.to_string()).or_default().insert(node.to_string());
        }
    }

    pub fn pods(&self) -> usize {
        self.nodes.len()
    }

    /// Pods seen on more than one node.
    pub fn on_two_nodes(&self) -> usize {
        self.nodes.values().filter(|n| n.len() > 1).count()
    }
}

/// What the scenario reports about the Deployment.
#[derive(Debug, Default, Serialize)]
pub struct Orchestration {
    /// Distinct pods seen over the run.
    pub pods_seen: usize,
    pub pods_on_two_nodes: usize,
    /// Whether the Deployment converged after the last fault healed, and
    /// how long that took.
    pub converged: bool,
    pub converge_ms: Option<u64>,
    /// Why not, when it did not.
    pub last_state: String,
    /// Agents cut off from the masters during the run: only their pods may
    /// be evicted and replaced.
    pub agents_cut_off: usize,
}

impl Orchestration {
    /// Pods replaced beyond what the cut-off agents can explain (at most
    /// every replica per cut): a killed agent, or masters restarting,
    /// must not cost any pod.
    pub fn needless_replacements(&self, replicas: usize) -> usize {
        self.pods_seen.saturating_sub(replicas).saturating_sub(replicas * self.agents_cut_off)
    }
}

/// Whether the Deployment is converged: its status counts all `want`, and
/// exactly `want` pods exist, none terminating (evicted pods are gone once
/// their node is back), each Running and Ready on a node whose Ready
/// condition is True. Otherwise, why not.
pub fn converged(deployment: &Value, pods: &Value, nodes: &Value, want: usize) -> Result<(), String> {
    let st = &deployment["status"];
    let count = |k: &str| st[k].as_u64().unwrap_or(0) as usize;
    let counts = [count("replicas"), count("readyReplicas"), count("updatedReplicas"), count("availableReplicas")];
    if counts.iter().any(|c| *c != want) {
        return Err(format!("deployment status replicas/ready/updated/available = {counts:?}, want {want}"));
    }
    let ready_nodes: BTreeSet<&str> = nodes["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| condition(n, "Ready"))
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect();
    let all: Vec<&Value> = pods["items"].as_array().into_iter().flatten().collect();
    if all.len() != want {
        return Err(format!("{} pods, want {want}", all.len()));
    }
    for p in all {
        let name = p["metadata"]["name"].as_str().unwrap_or("?");
        if !p["metadata"]["deletionTimestamp"].is_null() {
            return Err(format!("pod {name} is still terminating"));
        }
        let node = p["spec"]["nodeName"].as_str().unwrap_or("");
        if p["status"]["phase"] != "Running" || !condition(p, "Ready") {
            return Err(format!("pod {name} is not running and ready"));
        }
        if !ready_nodes.contains(node) {
            return Err(format!("pod {name} is on {node:?}, not a Ready node"));
        }
    }
    Ok(())
}

fn condition(obj: &Value, kind: &str) -> bool {
    obj["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == kind && c["status"] == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str, node: &str, ready: bool) -> Value {
        json!({"metadata": {"name": format!("p-{uid}"), "uid": uid}, "spec": {"nodeName": node},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    fn list(items: Vec<Value>) -> Value {
        json!({ "items": items })
    }

    #[test]
    fn only_cut_off_agents_explain_replacements() {
        let o = |pods_seen, agents_cut_off| Orchestration { pods_seen, agents_cut_off, ..Default::default() };
        assert_eq!(o(6, 0).needless_replacements(6), 0);
        assert_eq!(o(12, 0).needless_replacements(6), 6, "masters restarted and every pod was replaced");
        assert_eq!(o(9, 1).needless_replacements(6), 0);
        assert_eq!(o(15, 1).needless_replacements(6), 3);
    }

    #[test]
    fn a_pod_seen_on_two_nodes_is_counted() {
        let mut s = PodSightings::default();
        s.record(&list(vec![pod("a", "n1", true), pod("b", "n2", true)]));
        s.record(&list(vec![pod("a", "n1", true), pod("b", "n2", true), json!({"metadata": {"uid": "c"}})]));
        assert_eq!((s.pods(), s.on_two_nodes()), (2, 0), "unbound pods are not sightings");
        s.record(&list(vec![pod("a", "n2", true)]));
        assert_eq!((s.pods(), s.on_two_nodes()), (2, 1));
    }

    #[test]
    fn convergence_needs_status_pods_and_nodes_to_agree() {
        let deploy = |ready: u64| json!({"status": {"replicas": 2, "readyReplicas": ready, "updatedReplicas": 2, "availableReplicas": ready}});
        let node = |name: &str, ready: &str| json!({"metadata": {"name": name}, "status": {"conditions": [{"type": "Ready", "status": ready}]}});
        let nodes = list(vec![node("n1", "True"), node("n2", "Unknown")]);
        let pods = list(vec![pod("a", "n1", true), pod("b", "n1", true)]);
        assert_eq!(converged(&deploy(2), &pods, &nodes, 2), Ok(()));
        assert!(converged(&deploy(1), &pods, &nodes, 2).unwrap_err().contains("deployment status"));
        let mut leftover = pods.clone();
        leftover["items"].as_array_mut().unwrap().push(pod("c", "n1", true));
        assert!(converged(&deploy(2), &leftover, &nodes, 2).unwrap_err().contains("3 pods"));
        let mut terminating = pods.clone();
        terminating["items"][1]["metadata"]["deletionTimestamp"] = json!("2026-11-26T00:00:00Z");
        assert!(converged(&deploy(2), &terminating, &nodes, 2).unwrap_err().contains("still terminating"));
        let on_lost_node = list(vec![pod("a", "n1", true), pod("b", "n2", true)]);
        assert!(converged(&deploy(2), &on_lost_node, &nodes, 2).unwrap_err().contains("not a Ready node"));
        let unready = list(vec![pod("a", "n1", true), pod("b", "n1", false)]);
        assert!(converged(&deploy(2), &unready, &nodes, 2).unwrap_err().contains("not running and ready"));
    }
}
