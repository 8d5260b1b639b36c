//! PodDisruptionBudget status (the disruption controller) and the check the
//! eviction API makes against it.
//!
//! For each budget: the pods its selector matches, how many are healthy
//! (Ready), how many must stay healthy (`minAvailable`, or the matching
//! count minus `maxUnavailable`; percentages of the matching count, rounded
//! up), and so how many disruptions are allowed now. An eviction is refused
//! (429) when a budget covering the pod allows none; otherwise the budget's
//! allowance is spent (an optimistic-concurrency status write) before the
//! pod is deleted, so two concurrent evictions cannot both use the last one.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::informer::Informer;
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::{internal, ApiServer};

/// Does `selector` (matchLabels + matchExpressions) select `labels`?
pub fn selects(selector: &Value, labels: &Value) -> bool {
    if !selector.is_object() {
        return false;
    }
    let sel = crate::api::table::selector_string(selector);
    match crate::api::selector::LabelSelector::parse(&sel) {
        // An empty selector selects everything in the namespace (policy/v1).
        Ok(s) => s.matches_json(labels),
        Err(_) => false,
    }
}

fn ceil_percent(v: &Value, total: i64) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => match s.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()) {
            Some(p) => Some((p * total as f64 / 100.0).ceil() as i64),
            None => s.parse().ok(),
        },
        _ => None,
    }
}

/// The budget's status for the pods of its namespace.
pub fn status(pdb: &Value, pods: &[Value]) -> Value {
    let matching: Vec<&Value> = pods
        .iter()
        .filter(|p| super::replicaset::is_active(p) && selects(&pdb["spec"]["selector"], &p["metadata"]["labels"]))
        .collect();
    let expected = matching.len() as i64;
    let healthy = matching.iter().filter(|p| super::replicaset::is_ready(p)).count() as i64;
    let desired = match (
        ceil_percent(&pdb["spec"]["minAvailable"], expected),
        ceil_percent(&pdb["spec"]["maxUnavailable"], expected),
    ) {
        (Some(min), _) => min,
        (None, Some(max_unavailable)) => (expected - max_unavailable).max(0),
        (None, None) => expected, // Kubernetes' default is minAvailable 1; no field at all is rejected upstream
    };
    let allowed = (healthy - desired).max(0);
    json!({
        "observedGeneration": pdb["metadata"]["generation"].as_i64().unwrap_or(1),
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "expectedPods": expected,
        "disruptionsAllowed": allowed,
        "conditions": [{"type": "DisruptionAllowed", "status": if allowed > 0 { "True" } else { "False" },
            "reason": if allowed > 0 { "SufficientPods" } else { "InsufficientPods" }, "message": "",
            "lastTransitionTime": pdb["status"]["conditions"].as_array().and_then(|c| c.first()).map(|c| c["lastTransitionTime"].clone()).unwrap_or(json!(crate::api::handlers::now())),
            "observedGeneration": pdb["metadata"]["generation"].as_i64().unwrap_or(1)}],
    })
}

pub struct DisruptionController {
    pub api: Arc<ApiServer>,
    pub pdbs: Arc<Informer>,
    pub pods: Arc<Informer>,
}

impl DisruptionController {
    /// Budgets in the pod's namespace whose selector matches it.
    /// Runs for every pod change: the pod's labels are read from its
    /// archive, and nothing is decoded in a namespace without budgets.
    pub fn keys_for_pod(&self, pod: &super::informer::Cached) -> Vec<String> {
        let pdbs = self.pdbs.list_namespace(pod.namespace());
        if pdbs.is_empty() {
            return vec![];
        }
        let labels = pod.labels();
        pdbs.into_iter().filter(|b| selects(&b.object()["spec"]["selector"], &labels)).map(|b| b.key.clone()).collect()
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let Some(cached) = self.pdbs.get(&key) else { return Ok(None) };
        let pdb = cached.object();
        let pods: Vec<Value> = self.pods.list_namespace(cached.namespace()).iter().map(|p| p.object()).collect();
        let mut next = status(&pdb, &pods);
        if let Some(c) = next["conditions"][0].as_object_mut() {
            if pdb["status"]["conditions"][0]["status"] != c["status"] {
                c.insert("lastTransitionTime".into(), json!(crate::api::handlers::now()));
            }
        }
        if pdb["status"] != next {
            let found = Found { object: pdb.clone(), mod_revision: cached.mod_revision };
            internal::write_status(&self.api, self.pdbs.rt, &found, next).await.map_err(|e| e.to_string())?;
        }
        Ok(None)
    }
}

impl Reconciler for DisruptionController {
    fn name(&self) -> &'static str {
        "disruption"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.pdbs.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool) -> Value {
        let mut p =
            json!({"metadata": {"name": name, "labels": {"app": "web"}}, "spec": {}, "status": {"phase": "Running"}});
        if ready {
            p["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        }
        p
    }

    #[test]
    fn allowed_disruptions_follow_min_available_and_max_unavailable() {
        let pods = [
            pod("a", true),
            pod("b", true),
            pod("c", false),
            json!({"metadata": {"labels": {"app": "db"}}, "status": {"phase": "Running"}}),
        ];
        let pdb = |spec: Value| json!({"metadata": {"generation": 1}, "spec": spec});
        let s = status(&pdb(json!({"selector": {"matchLabels": {"app": "web"}}, "minAvailable": 2})), &pods);
        assert_eq!(
            (s["expectedPods"].as_i64(), s["currentHealthy"].as_i64(), s["disruptionsAllowed"].as_i64()),
            (Some(3), Some(2), Some(0))
        );
        let s = status(&pdb(json!({"selector": {"matchLabels": {"app": "web"}}, "maxUnavailable": 2})), &pods);
        assert_eq!(s["disruptionsAllowed"], 1, "3 expected - 2 = 1 must stay healthy; 2 are");
        let s = status(&pdb(json!({"selector": {"matchLabels": {"app": "web"}}, "minAvailable": "50%"})), &pods);
        assert_eq!(
            (s["desiredHealthy"].as_i64(), s["disruptionsAllowed"].as_i64()),
            (Some(2), Some(0)),
            "50% of 3 rounds up"
        );
        assert_eq!(s["conditions"][0]["reason"], "InsufficientPods");
    }
}
