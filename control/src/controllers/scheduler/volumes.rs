//! Volume binding as the scheduler sees it (Kubernetes' VolumeBinding
//! plugin), pure: the claims, volumes and classes the informers report,
//! and what a pod's claims require of a node.
//!
//! - A bound claim's volume may have node affinity (a local-path volume
//!   lives on one node): the pod goes only where it admits.
//! - An unbound claim of a `WaitForFirstConsumer` class waits for this
//!   decision: the pod may go where a free static volume that fits the
//!   claim admits, or — for the `local-path` class — to any node whose
//!   agent announced a local-path directory. The chosen node is then
//!   written on the claim (`volume.kubernetes.io/selected-node`) before
//!   the pod is bound, and assumed meanwhile, so the next pod sharing the
//!   claim follows it there. The volume controller binds or provisions.
//! - An unbound claim of an `Immediate` class (or none), a missing claim,
//!   or one being deleted: the pod waits, saying so, until that changes.

use std::collections::HashMap;

use serde_json::Value;

use super::model::{NodeInfo, NodeSelectorTerm, PodInfo};
use crate::api::storage::LOCAL_PATH_PROVISIONER;
use crate::controllers::volume::{claim_class, fits, volume_node_terms, SELECTED_NODE};

pub const VOLUME_CONFLICT: &str = "node(s) had volume node affinity conflict";
pub const NO_VOLUMES: &str = "node(s) didn't find available persistent volumes to bind";

/// What one claim of a pod needs of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Need {
    /// Bound: where its volume's node affinity admits (None: anywhere).
    Bound(Option<Vec<NodeSelectorTerm>>),
    /// A node was already selected for it.
    Selected(String),
    /// Not bound yet: a node one of the free volumes that fit admits
    /// (each's node terms), or, if `provision`, one that can provision it.
    Unbound { candidates: Vec<Option<Vec<NodeSelectorTerm>>>, provision: bool },
}

/// The storage objects, as the informers last reported them.
#[derive(Default)]
pub struct Volumes {
    claims: HashMap<String, Value>,
    volumes: HashMap<String, Value>,
    classes: HashMap<String, Value>,
    /// Claims this scheduler selected a node for, until the claim says so.
    assumed: HashMap<String, String>,
}

fn set(map: &mut HashMap<String, Value>, key: &str, v: Option<Value>) {
    match v {
        Some(v) => map.insert(key.to_string(), v),
        None => map.remove(key),
    };
}

fn selected_node(claim: &Value) -> Option<&str> {
    claim["metadata"]["annotations"][SELECTED_NODE].as_str().filter(|n| !n.is_empty())
}

fn volume_name(claim: &Value) -> Option<&str> {
    claim["spec"]["volumeName"].as_str().filter(|n| !n.is_empty())
}

impl Volumes {
    pub fn set_claim(&mut self, key: &str, claim: Option<Value>) {
        if claim.as_ref().is_none_or(|c| selected_node(c).is_some() || volume_name(c).is_some()) {
            self.assumed.remove(key);
        }
        set(&mut self.claims, key, claim);
    }

    pub fn set_volume(&mut self, name: &str, volume: Option<Value>) {
        set(&mut self.volumes, name, volume);
    }

    pub fn set_class(&mut self, name: &str, class: Option<Value>) {
        set(&mut self.classes, name, class);
    }

    fn waits_for_consumer(&self, claim: &Value) -> bool {
        self.classes.get(claim_class(claim)).is_some_and(|c| c["volumeBindingMode"] == "WaitForFirstConsumer")
    }

    /// What the pod's claims need of a node, or why no node will do now.
    pub fn needs(&self, pod: &PodInfo) -> Result<Vec<Need>, String> {
        let mut out = Vec::with_capacity(pod.claims.len());
        for name in &pod.claims {
            let key = format!("{}/{name}", pod.namespace);
            let Some(claim) = self.claims.get(&key) else {
                return Err(format!("persistentvolumeclaim \"{name}\" not found"));
            };
            if claim["metadata"]["deletionTimestamp"].is_string() {
                return Err(format!("persistentvolumeclaim \"{name}\" is being deleted"));
            }
            if let Some(v) = volume_name(claim) {
                let Some(pv) = self.volumes.get(v) else {
                    return Err(format!("persistentvolume \"{v}\" not found"));
                };
                out.push(Need::Bound(volume_node_terms(pv)));
                continue;
            }
            if !self.waits_for_consumer(claim) {
                return Err("pod has unbound immediate PersistentVolumeClaims".into());
            }
            if let Some(node) = self.assumed.get(&key).map(String::as_str).or_else(|| selected_node(claim)) {
                out.push(Need::Selected(node.to_string()));
                continue;
            }
            let candidates = self.volumes.values().filter(|pv| fits(pv, claim, None)).map(volume_node_terms).collect();
            let provision =
                self.classes.get(claim_class(claim)).is_some_and(|c| c["provisioner"] == LOCAL_PATH_PROVISIONER);
            out.push(Need::Unbound { candidates, provision });
        }
        Ok(out)
    }

    /// The pod goes to `node`: its claims waiting for a node get this one
    /// (assumed until the claims say so). Returns their keys, to annotate.
    pub fn assume(&mut self, pod: &PodInfo, node: &str) -> Vec<String> {
        let mut out = Vec::new();
        for name in &pod.claims {
            let key = format!("{}/{name}", pod.namespace);
            let Some(claim) = self.claims.get(&key) else { continue };
            if volume_name(claim).is_some() || selected_node(claim).is_some() || !self.waits_for_consumer(claim) {
                continue;
            }
            self.assumed.entry(key.clone()).or_insert_with(|| node.to_string());
            out.push(key);
        }
        out
    }

    /// A selection that could not be written.
    pub fn forget(&mut self, keys: &[String]) {
        for k in keys {
            self.assumed.remove(k);
        }
    }
}

fn terms_admit(terms: &Option<Vec<NodeSelectorTerm>>, n: &NodeInfo) -> bool {
    terms.as_ref().is_none_or(|t| t.iter().any(|t| t.matches(&n.labels, &n.name)))
}

/// Whether node `n` serves every need, with Kubernetes' reason if not.
pub fn admits(needs: &[Need], n: &NodeInfo) -> Result<(), &'static str> {
    for need in needs {
        let ok = match need {
            Need::Bound(terms) => terms_admit(terms, n),
            Need::Selected(node) => *node == n.name,
            Need::Unbound { candidates, provision } => {
                if (*provision && n.local_path) || candidates.iter().any(|t| terms_admit(t, n)) {
                    true
                } else {
                    return Err(NO_VOLUMES);
                }
            }
        };
        if !ok {
            return Err(VOLUME_CONFLICT);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::storage::builtin_class;
    use crate::controllers::volume::LOCAL_PATH_ROOT;
    use serde_json::json;

    fn pod_with(claims: &[&str]) -> PodInfo {
        let vols: Vec<Value> =
            claims.iter().map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}})).collect();
        PodInfo::parse(&json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"volumes": vols}}))
    }

    fn node(name: &str, local_path: bool) -> NodeInfo {
        let mut n = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}});
        if local_path {
            n["metadata"]["annotations"] = json!({LOCAL_PATH_ROOT: "/var/lib/lp"});
        }
        NodeInfo::new(&n)
    }

    fn claim(class: &str, extra: Value) -> Value {
        let mut c = json!({"metadata": {"name": "c", "namespace": "d", "uid": "u"},
            "spec": {"storageClassName": class, "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}}}});
        json_patch::merge(&mut c, &extra);
        c
    }

    fn pinned_volume(name: &str, on: &str, class: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"storageClassName": class, "accessModes": ["ReadWriteOnce"],
            "capacity": {"storage": "1Gi"}, "hostPath": {"path": "/x"}, "nodeAffinity": {"required": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [on]}]}]}}},
            "status": {"phase": "Available"}})
    }

    #[test]
    fn claims_that_cannot_be_served_now_say_why() {
        let mut v = Volumes::default();
        let pod = pod_with(&["c"]);
        assert_eq!(v.needs(&pod).unwrap_err(), "persistentvolumeclaim \"c\" not found");
        v.set_claim("d/c", Some(claim("", json!({}))));
        assert_eq!(v.needs(&pod).unwrap_err(), "pod has unbound immediate PersistentVolumeClaims");
        v.set_claim("d/c", Some(claim("", json!({"spec": {"volumeName": "gone"}}))));
        assert_eq!(v.needs(&pod).unwrap_err(), "persistentvolume \"gone\" not found");
        v.set_claim("d/c", Some(claim("", json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}))));
        assert_eq!(v.needs(&pod).unwrap_err(), "persistentvolumeclaim \"c\" is being deleted");
        assert_eq!(v.needs(&pod_with(&[])).unwrap(), vec![], "no claims, no needs");
    }

    #[test]
    fn a_bound_volume_pins_the_pod_to_its_node() {
        let mut v = Volumes::default();
        v.set_volume("pv", Some(pinned_volume("pv", "n2", "")));
        v.set_claim("d/c", Some(claim("", json!({"spec": {"volumeName": "pv"}}))));
        let needs = v.needs(&pod_with(&["c"])).unwrap();
        assert_eq!(admits(&needs, &node("n1", true)), Err(VOLUME_CONFLICT));
        assert_eq!(admits(&needs, &node("n2", false)), Ok(()));
    }

    #[test]
    fn first_consumer_picks_the_node_and_the_next_follows() {
        let mut v = Volumes::default();
        v.set_class("local-path", Some(builtin_class()));
        v.set_claim("d/c", Some(claim("local-path", json!({}))));
        let pod = pod_with(&["c"]);
        let needs = v.needs(&pod).unwrap();
        assert_eq!(admits(&needs, &node("n1", false)), Err(NO_VOLUMES), "no local-path directory there");
        assert_eq!(admits(&needs, &node("n2", true)), Ok(()));
        // A free static volume on n1 makes n1 possible too.
        v.set_volume("pv", Some(pinned_volume("pv", "n1", "local-path")));
        assert_eq!(admits(&v.needs(&pod).unwrap(), &node("n1", false)), Ok(()));

        // Chosen: n2. A second pod sharing the claim must follow.
        assert_eq!(v.assume(&pod, "n2"), ["d/c"]);
        let needs = v.needs(&pod).unwrap();
        assert_eq!(needs, vec![Need::Selected("n2".into())]);
        assert_eq!(admits(&needs, &node("n1", true)), Err(VOLUME_CONFLICT));
        assert!(v.assume(&pod, "n1").contains(&"d/c".to_string()));
        assert_eq!(v.needs(&pod).unwrap(), vec![Need::Selected("n2".into())], "the first choice stands");
        // The annotation written, the assumption gives way to it.
        v.set_claim("d/c", Some(claim("local-path", json!({"metadata": {"annotations": {SELECTED_NODE: "n2"}}}))));
        assert!(v.assumed.is_empty());
        assert_eq!(v.needs(&pod).unwrap(), vec![Need::Selected("n2".into())]);
        assert!(v.assume(&pod, "n2").is_empty(), "already selected: nothing to write");
        // A failed write forgets the choice.
        v.set_claim("d/c", Some(claim("local-path", json!({}))));
        let keys = v.assume(&pod, "n2");
        v.forget(&keys);
        assert!(matches!(v.needs(&pod).unwrap()[0], Need::Unbound { .. }));
    }
}
