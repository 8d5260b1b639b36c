//! Generic ephemeral volumes (Kubernetes' ephemeral volume controller): a
//! pod volume with `ephemeral.volumeClaimTemplate` becomes a claim named
//! `<pod>-<volume>`, owned by the pod (controller), so it is provisioned
//! like any claim and deleted with the pod by the garbage collector.
//!
//! A claim of that name that the pod does not own is never taken over: the
//! pod waits (its node agent refuses the volume) and an event says why.
//! [`claims_for`] is pure; the shell creates what is missing.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::events::{EventRecorder, EventType};
use super::informer::{Change, Informer};
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::{internal, ApiServer};

const MANAGER: &str = "ephemeral-volume-controller";

/// The claims `pod`'s ephemeral volumes need, as they are to be created.
pub fn claims_for(pod: &Value) -> Vec<Value> {
    let meta = &pod["metadata"];
    let pod_name = meta["name"].as_str().unwrap_or_default();
    let owner = json!([{"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": meta["uid"],
        "controller": true, "blockOwnerDeletion": true}]);
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["ephemeral"]["volumeClaimTemplate"].is_object())
        .filter_map(|v| {
            let t = &v["ephemeral"]["volumeClaimTemplate"];
            let name = v["name"].as_str().filter(|n| !n.is_empty())?;
            let mut claim_meta = json!({"name": format!("{pod_name}-{name}"), "namespace": meta["namespace"],
                "ownerReferences": owner});
            for k in ["labels", "annotations"] {
                if t["metadata"][k].is_object() {
                    claim_meta[k] = t["metadata"][k].clone();
                }
            }
            Some(
                json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": claim_meta, "spec": t["spec"]}),
            )
        })
        .collect()
}

fn owned_by(claim: &Value, pod: &Value) -> bool {
    claim["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["uid"] == pod["metadata"]["uid"] && o["controller"] == true)
}

pub struct EphemeralController {
    pub api: Arc<ApiServer>,
    pub pods: Arc<Informer>,
    pub claims: Arc<Informer>,
    pub recorder: EventRecorder,
}

impl EphemeralController {
    /// Only new or changed pods with ephemeral volumes concern it.
    pub fn keys_for_pod(c: &Change) -> Vec<String> {
        match &c.new {
            Some(p) if !p.deleting() && c.old.is_none() && p.mentions(b"\"ephemeral\"") => {
                let pod = p.object();
                let has = pod["spec"]["volumes"].as_array().into_iter().flatten().any(|v| v["ephemeral"].is_object());
                if has {
                    vec![c.key.clone()]
                } else {
                    vec![]
                }
            }
            _ => vec![],
        }
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let Some(cached) = self.pods.get(&key) else { return Ok(None) };
        if cached.deleting() {
            return Ok(None);
        }
        let pod = cached.object();
        let ns = cached.namespace().to_string();
        for claim in claims_for(&pod) {
            let name = claim["metadata"]["name"].as_str().unwrap_or_default().to_string();
            if let Some(existing) = self.claims.get(&format!("{ns}/{name}")) {
                if !owned_by(&existing.object(), &pod) {
                    let msg = format!("PVC {ns}/{name} was not created for pod {key} (pod is not owner)");
                    self.recorder.event(&pod, EventType::Warning, "FailedBinding", msg);
                }
                continue;
            }
            match internal::write(&self.api, self.claims.rt, None, claim, MANAGER).await {
                Ok(_) => {}
                // Made by an earlier pass, or by someone else: the next pass looks.
                Err(e) if e.code == 409 => return Ok(Some(std::time::Duration::from_millis(100))),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(None)
    }
}

impl Reconciler for EphemeralController {
    fn name(&self) -> &'static str {
        "ephemeral-volume"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.pods.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ephemeral_volume_is_a_claim_the_pod_owns() {
        let pod = json!({"metadata": {"name": "web", "namespace": "d", "uid": "u1"}, "spec": {"volumes": [
            {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"metadata": {"labels": {"t": "s"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}},
            {"name": "cfg", "configMap": {"name": "c"}},
            {"name": "broken", "ephemeral": {}},
        ]}});
        let claims = claims_for(&pod);
        assert_eq!(claims.len(), 1);
        let c = &claims[0];
        assert_eq!(c["metadata"]["name"], "web-scratch");
        assert_eq!(c["metadata"]["namespace"], "d");
        assert_eq!(c["metadata"]["labels"], json!({"t": "s"}));
        assert_eq!(c["spec"]["resources"]["requests"]["storage"], "1Gi");
        assert!(owned_by(c, &pod));
        let mut other = pod.clone();
        other["metadata"]["uid"] = json!("u2");
        assert!(!owned_by(c, &other), "a pod of the same name made anew does not own it");
        // The names are the ones pods, the scheduler and the node authorizer
        // use (admission refuses an ephemeral volume without a template).
        assert_eq!(super::super::volume::pod_claims(&pod), ["web-scratch", "web-broken"]);
    }
}
