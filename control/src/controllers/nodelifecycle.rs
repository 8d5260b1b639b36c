//! Node lifecycle: a node whose agent stops heartbeating (its Lease in
//! `kube-node-lease`, or its Ready condition's heartbeat) for longer than
//! the grace period (40 s by default) turns Ready=Unknown and gets the
//! `node.kubernetes.io/unreachable:NoExecute` taint; a node reporting
//! Ready=False gets `not-ready:NoExecute`. Pods on a NoExecute-tainted node
//! are evicted at once unless they tolerate the taint, or after their
//! `tolerationSeconds` (300 s by the default tolerations admission adds).
//! When heartbeats return, the taints go and the node is Ready again.
//!
//! Silence is measured from when *this controller* saw a node's heartbeat
//! advance, on its own monotonic clock ([`Sightings`], Kubernetes'
//! probeTimestamp), never from the timestamp in the heartbeat: a master
//! that takes over after the control plane was down (or failed over) gives
//! every node a full grace period to reconnect, instead of finding every
//! lease stale and evicting every pod; and neither the agent's clock nor a
//! jump of the master's wall clock counts.
//!
//! [`plan`] and [`Sightings`] are pure; the shell writes the node and
//! evicts (deletes) pods.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::events::{self, EventRecorder, EventType};
use super::informer::Informer;
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::{internal, ApiServer};

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The node's Ready condition to write, if it changes.
    pub ready: Option<Value>,
    /// The node's taints to write, if they change.
    pub taints: Option<Vec<Value>>,
    /// Pods (`namespace/name`) to evict now.
    pub evict: Vec<String>,
    /// When to look again (heartbeat expiry, pending evictions).
    pub requeue: Duration,
}

fn time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc))
}

fn secs(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// When this controller last saw each node's heartbeat change.
#[derive(Debug, Default)]
pub struct Sightings {
    seen: HashMap<String, (Option<DateTime<Utc>>, Instant)>,
}

impl Sightings {
    /// How long `node`'s heartbeat (`beat`) has stood still, as of `now`;
    /// a first sighting or a changed heartbeat starts the count again.
    pub fn silent_for(&mut self, node: &str, beat: Option<DateTime<Utc>>, now: Instant) -> Duration {
        match self.seen.get(node) {
            Some((last, at)) if *last == beat => now.saturating_duration_since(*at),
            _ => {
                self.seen.insert(node.to_string(), (beat, now));
                Duration::ZERO
            }
        }
    }

    pub fn forget(&mut self, node: &str) {
        self.seen.remove(node);
    }

    /// On taking over: nothing seen before counts.
    pub fn forget_all(&mut self) {
        self.seen.clear();
    }
}

/// The latest sign of life: lease renewal, Ready heartbeat, or creation.
fn heartbeat(node: &Value, lease: Option<&Value>) -> Option<DateTime<Utc>> {
    let ready = node["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
    [
        lease.and_then(|l| time(&l["spec"]["renewTime"])),
        ready.and_then(|r| time(&r["lastHeartbeatTime"])),
        time(&node["metadata"]["creationTimestamp"]),
    ]
    .into_iter()
    .flatten()
    .max()
}

/// `Some(seconds)` if a toleration covers the taint (`None` seconds = forever).
fn tolerates(tolerations: &[Value], taint: &Value) -> Option<Option<i64>> {
    super::scheduler::toleration_for(tolerations, taint).map(|t| t["tolerationSeconds"].as_i64())
}

/// What to do about `node`, whose heartbeat has not advanced for `silent`
/// (see [`Sightings`]); `now` dates taints and conditions.
pub fn plan(node: &Value, silent: Duration, pods: &[Value], now: DateTime<Utc>, grace: Duration) -> Plan {
    let stale = silent > grace;
    let ready = node["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready")).cloned();
    let reported = ready.as_ref().and_then(|r| r["status"].as_str()).unwrap_or("Unknown").to_string();
    let mut new_ready = None;
    if stale && (reported != "Unknown" || ready.is_none()) {
        let mut c = ready.clone().unwrap_or_else(|| json!({"type": "Ready"}));
        c["status"] = json!("Unknown");
        c["reason"] = json!("NodeStatusUnknown");
        c["message"] = json!("Kubelet stopped posting node status.");
        c["lastTransitionTime"] = json!(secs(now));
        new_ready = Some(c);
    }
    // A node that has not reported yet is given the grace period before
    // any verdict (its agent may still be starting).
    let effective = match (stale, &ready) {
        (true, _) => "Unknown",
        (false, None) => "True",
        (false, Some(_)) => reported.as_str(),
    };
    let current: Vec<Value> = node["spec"]["taints"].as_array().cloned().unwrap_or_default();
    let mut taints: Vec<Value> =
        current.iter().filter(|t| !matches!(t["key"].as_str(), Some(UNREACHABLE | NOT_READY))).cloned().collect();
    let keep_or_new = |key: &str, effect: &str| {
        current.iter().find(|t| t["key"] == key && t["effect"] == effect).cloned().unwrap_or_else(|| {
            let mut t = json!({"key": key, "effect": effect});
            if effect == "NoExecute" {
                t["timeAdded"] = json!(secs(now));
            }
            t
        })
    };
    // NoSchedule keeps new pods off (Kubernetes' taint-by-condition),
    // NoExecute moves running ones away.
    let key = match effective {
        "Unknown" => Some(UNREACHABLE),
        "False" => Some(NOT_READY),
        _ => None,
    };
    if let Some(key) = key {
        taints.push(keep_or_new(key, "NoSchedule"));
        taints.push(keep_or_new(key, "NoExecute"));
    }
    let mut requeue =
        if stale { Duration::from_secs(5) } else { grace.saturating_sub(silent) + Duration::from_millis(100) };
    let mut evict = Vec::new();
    let name = node["metadata"]["name"].as_str().unwrap_or_default();
    for pod in pods.iter().filter(|p| p["spec"]["nodeName"] == name && super::replicaset::is_active(p)) {
        let tolerations = pod["spec"]["tolerations"].as_array().cloned().unwrap_or_default();
        let mut due: Option<DateTime<Utc>> = None;
        for t in taints.iter().filter(|t| t["effect"] == "NoExecute") {
            let added = time(&t["timeAdded"]).unwrap_or(now);
            let at = match tolerates(&tolerations, t) {
                None => Some(now),
                Some(Some(s)) => Some(added + chrono::Duration::seconds(s.max(0))),
                Some(None) => None,
            };
            due = match (due, at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        match due {
            Some(at) if at <= now => {
                evict.push(format!(
                    "{}/{}",
                    pod["metadata"]["namespace"].as_str().unwrap_or_default(),
                    pod["metadata"]["name"].as_str().unwrap_or_default()
                ));
            }
            Some(at) => requeue = requeue.min((at - now).to_std().unwrap_or_default() + Duration::from_millis(50)),
            None => {}
        }
    }
    let taints = (taints != current).then_some(taints);
    Plan { ready: new_ready, taints, evict, requeue }
}

fn condition_status<'a>(node: &'a Value, ty: &str) -> Option<&'a str> {
    node["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == ty)?["status"].as_str()
}

pub struct NodeLifecycleController {
    pub api: Arc<ApiServer>,
    pub nodes: Arc<Informer>,
    pub leases: Arc<Informer>,
    pub pods: Arc<Informer>,
    pub grace: Duration,
    pub recorder: EventRecorder,
    pub sightings: parking_lot::Mutex<Sightings>,
}

impl NodeLifecycleController {
    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let Some(cached) = self.nodes.get(&key) else {
            self.sightings.lock().forget(&key);
            return Ok(None);
        };
        let node = cached.object();
        let lease = self.leases.get(&format!("{LEASE_NAMESPACE}/{key}")).map(|l| l.object());
        let pods: Vec<Value> = self.pods.list_node(&key).iter().map(|p| p.object()).collect();
        let silent = self.sightings.lock().silent_for(&key, heartbeat(&node, lease.as_ref()), Instant::now());
        let p = plan(&node, silent, &pods, Utc::now(), self.grace);
        let err = |e: crate::api::status::ApiError| e.to_string();
        let mut found = Found { object: node.clone(), mod_revision: cached.mod_revision };
        if let Some(taints) = p.taints {
            let mut next = node.clone();
            next["spec"]["taints"] = Value::Array(taints);
            let written = internal::write(&self.api, self.nodes.rt, Some(&found), next, "node-lifecycle-controller")
                .await
                .map_err(err)?;
            let rev = crate::api::objects::revision_of(&written);
            found = Found { object: written, mod_revision: rev };
        }
        if let Some(ready) = p.ready {
            let was_ready = condition_status(&found.object, "Ready") == Some("True");
            let not_ready = ready["status"] != "True";
            let mut status = found.object["status"].clone();
            if !status["conditions"].is_array() {
                status["conditions"] = json!([]);
            }
            if let Some(list) = status["conditions"].as_array_mut() {
                list.retain(|c| c["type"] != "Ready");
                list.push(ready);
            }
            internal::write_status(&self.api, self.nodes.rt, &found, status).await.map_err(err)?;
            if was_ready && not_ready {
                let msg = format!("Node {key} status is now: NodeNotReady");
                self.recorder.event(&events::node_ref(&key), EventType::Normal, "NodeNotReady", msg);
            }
        }
        let taints = self.recorder.as_component("taint-eviction-controller");
        for key in &p.evict {
            if let Some(c) = self.pods.get(key) {
                let f = c.found();
                internal::delete(&self.api, self.pods.rt, &f).await.map_err(err)?;
                let msg = format!("Marking for deletion Pod {key}");
                taints.event(&f.object, EventType::Normal, "TaintManagerEviction", msg);
                tracing::info!(pod = key.as_str(), node = cached.key.as_str(), "evicted from a NoExecute-tainted node");
            }
        }
        Ok(Some(p.requeue))
    }
}

impl Reconciler for NodeLifecycleController {
    fn name(&self) -> &'static str {
        "nodelifecycle"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.nodes.list().iter().map(|c| c.key.clone()).collect()
    }

    fn on_leading(&self) {
        self.sightings.lock().forget_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn node(beat: i64, status: &str) -> Value {
        json!({"metadata": {"name": "n1", "creationTimestamp": secs(at(0))}, "spec": {},
            "status": {"conditions": [{"type": "Ready", "status": status, "lastHeartbeatTime": secs(at(beat))}]}})
    }

    fn pod(name: &str, tolerations: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "d"}, "spec": {"nodeName": "n1", "tolerations": tolerations}, "status": {"phase": "Running"}})
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn silent_nodes_turn_unknown_and_tainted_then_pods_leave_on_schedule() {
        let grace = Duration::from_secs(40);
        let fresh = plan(&node(100, "True"), s(20), &[], at(120), grace);
        assert_eq!((fresh.ready.clone(), fresh.taints.clone()), (None, None));
        assert!(fresh.requeue <= Duration::from_secs(21));
        let p = plan(&node(100, "True"), s(41), &[], at(141), grace);
        assert_eq!(p.ready.as_ref().unwrap()["status"], "Unknown");
        let taints = p.taints.clone().unwrap();
        assert_eq!((taints[0]["key"].as_str(), taints[0]["effect"].as_str()), (Some(UNREACHABLE), Some("NoSchedule")));
        assert_eq!((taints[1]["key"].as_str(), taints[1]["effect"].as_str()), (Some(UNREACHABLE), Some("NoExecute")));
        // The taint is on: pods without a toleration go now, tolerating ones on time.
        let mut tainted = node(100, "Unknown");
        tainted["spec"]["taints"] = Value::Array(taints);
        let pods = [
            pod("plain", json!([])),
            pod(
                "patient",
                json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]),
            ),
            pod("forever", json!([{"operator": "Exists"}])),
        ];
        let p = plan(&tainted, s(50), &pods, at(150), grace);
        assert_eq!(p.evict, ["d/plain"]);
        assert!(p.requeue <= Duration::from_secs(292));
        assert_eq!(plan(&tainted, s(341), &pods, at(141 + 300), grace).evict, ["d/plain", "d/patient"]);
        // A fresh lease alone does not undo the Unknown verdict...
        assert_eq!(plan(&tainted, s(5), &pods, at(505), grace).taints, None);
        // ...the agent reporting Ready again does: the taints go.
        let mut back = node(500, "True");
        back["spec"]["taints"] = tainted["spec"]["taints"].clone();
        let p = plan(&back, s(5), &pods, at(505), grace);
        assert_eq!(p.taints, Some(vec![]));
        assert!(p.evict.is_empty());
    }

    /// Silence counts from when the controller saw a heartbeat change, on
    /// its own clock: a heartbeat from long ago, first seen now (a master
    /// taking over after an outage), is fresh.
    #[test]
    fn silence_is_counted_from_sightings_not_timestamps() {
        let mut seen = Sightings::default();
        let t0 = Instant::now();
        let old = Some(at(100));
        assert_eq!(seen.silent_for("n1", old, t0), Duration::ZERO, "first sighting, however old the heartbeat");
        assert_eq!(seen.silent_for("n1", old, t0 + s(30)), s(30));
        assert_eq!(seen.silent_for("n1", Some(at(101)), t0 + s(31)), Duration::ZERO, "the heartbeat advanced");
        assert_eq!(seen.silent_for("n1", Some(at(101)), t0 + s(45)), s(14));
        seen.forget_all();
        assert_eq!(seen.silent_for("n1", Some(at(101)), t0 + s(100)), Duration::ZERO, "a new leader starts over");
        // The old way would have judged this node dead on sight:
        assert!(plan(&node(100, "True"), Duration::ZERO, &[], at(100_000), s(40)).taints.is_none());
    }

    #[test]
    fn a_new_node_gets_the_grace_period() {
        let new = json!({"metadata": {"name": "n1", "creationTimestamp": secs(at(0))}, "spec": {}, "status": {}});
        let p = plan(&new, s(10), &[], at(10), Duration::from_secs(40));
        assert_eq!((p.ready, p.taints), (None, None));
        let p = plan(&new, s(41), &[], at(41), Duration::from_secs(40));
        assert_eq!(p.ready.unwrap()["status"], "Unknown");
    }

    #[test]
    fn a_not_ready_report_taints_not_ready() {
        let p = plan(&node(100, "False"), s(1), &[], at(101), Duration::from_secs(40));
        assert_eq!(p.taints.unwrap()[1]["key"], NOT_READY);
        assert!(p.ready.is_none(), "the agent's own report stands");
    }
}
