//! The scheduler's cache: every node and every pod holding a place on one,
//! kept up to date incrementally from informer changes (never rebuilt per
//! pod), plus the pods this scheduler has *assumed* onto a node while their
//! binding is in flight — counted at once, so concurrent bindings never
//! overcommit a node, and forgotten if the binding fails.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::model::{NodeInfo, PodInfo};

struct Placement {
    node: String,
    pod: Arc<PodInfo>,
    assumed: bool,
}

/// No domain: the node lacks the topology key.
pub const NO_DOMAIN: u32 = u32::MAX;

/// One topology key's domains: for each node (by index in
/// [`Cache::nodes`]) the id of its label value, ids dense from 0.
#[derive(Debug)]
pub struct Topology {
    pub domain_of: Vec<u32>,
    pub domains: usize,
}

#[derive(Default)]
pub struct Cache {
    pub nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    placed: HashMap<String, Placement>,
    /// How many placed pods have required anti-affinity (every incoming
    /// pod is checked against their terms: the rule is symmetric).
    anti_pods: usize,
    /// Topologies by key, built on first use and dropped when nodes change.
    topologies: Mutex<HashMap<String, Arc<Topology>>>,
}

impl Cache {
    pub fn node(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn upsert_node(&mut self, fresh: NodeInfo) {
        if let Some(&i) = self.index.get(&fresh.name) {
            if self.nodes[i].labels != fresh.labels {
                self.topologies.get_mut().clear();
            }
            self.nodes[i].update_from(fresh);
            return;
        }
        self.topologies.get_mut().clear();
        let mut n = fresh;
        let here: Vec<Arc<PodInfo>> =
            self.placed.values().filter(|p| p.node == n.name).map(|p| p.pod.clone()).collect();
        for p in here {
            n.add(p);
        }
        self.index.insert(n.name.clone(), self.nodes.len());
        self.nodes.push(n);
    }

    /// The node is gone; pods that named it keep their placement (they are
    /// counted again if it returns).
    pub fn remove_node(&mut self, name: &str) {
        let Some(i) = self.index.remove(name) else { return };
        self.topologies.get_mut().clear();
        self.nodes.swap_remove(i);
        if let Some(moved) = self.nodes.get(i) {
            self.index.insert(moved.name.clone(), i);
        }
    }

    /// `pod` holds a place on `node` (observed from the store, or assumed).
    pub fn place(&mut self, pod: Arc<PodInfo>, node: &str, assumed: bool) {
        self.remove_pod(&pod.key);
        if let Some(&i) = self.index.get(node) {
            self.nodes[i].add(pod.clone());
        }
        self.anti_pods += usize::from(!pod.anti_affinity.is_empty());
        self.placed.insert(pod.key.clone(), Placement { node: node.to_string(), pod, assumed });
    }

    pub fn remove_pod(&mut self, key: &str) -> bool {
        let Some(p) = self.placed.remove(key) else { return false };
        if let Some(&i) = self.index.get(&p.node) {
            self.nodes[i].remove(key);
        }
        self.anti_pods -= usize::from(!p.pod.anti_affinity.is_empty());
        true
    }

    pub fn anti_pods(&self) -> usize {
        self.anti_pods
    }

    /// The domains of topology key `key`.
    pub fn topology(&self, key: &str) -> Arc<Topology> {
        if let Some(t) = self.topologies.lock().get(key) {
            return t.clone();
        }
        let mut ids: HashMap<&str, u32> = HashMap::new();
        let domain_of = self
            .nodes
            .iter()
            .map(|n| match n.label(key) {
                Some(v) => {
                    let next = ids.len() as u32;
                    *ids.entry(v).or_insert(next)
                }
                None => NO_DOMAIN,
            })
            .collect();
        let t = Arc::new(Topology { domain_of, domains: ids.len() });
        self.topologies.lock().insert(key.to_string(), t.clone());
        t
    }

    /// Whether `key` is assumed (binding in flight, not yet observed bound).
    pub fn is_assumed(&self, key: &str) -> bool {
        self.placed.get(key).is_some_and(|p| p.assumed)
    }

    #[cfg(test)]
    pub fn placed_count(&self) -> usize {
        self.placed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::pod;
    use super::*;
    use serde_json::json;

    fn node(name: &str) -> NodeInfo {
        NodeInfo::new(&json!({"metadata": {"name": name}, "status": {"allocatable": {"cpu": "4", "memory": "4Gi"}}}))
    }

    #[test]
    fn placements_follow_nodes_and_pods() {
        let mut c = Cache::default();
        let p = pod(json!({"metadata": {"name": "a", "namespace": "d"},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]}}));
        c.place(p.clone(), "n1", true);
        assert!(c.is_assumed("d/a"));
        c.upsert_node(node("n1"));
        assert_eq!(c.nodes[0].used_cpu, 1000, "a pod placed before its node appeared counts once it does");
        c.place(p.clone(), "n1", false);
        assert_eq!(c.nodes[0].used_cpu, 1000, "observing the assumed binding does not count it twice");
        assert!(!c.is_assumed("d/a"));
        c.upsert_node(node("n1"));
        assert_eq!(c.nodes[0].used_cpu, 1000, "a node update keeps its pods");
        c.upsert_node(node("n2"));
        c.remove_node("n1");
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(c.node("n2"), Some(0));
        c.upsert_node(node("n1"));
        assert_eq!(c.nodes[c.node("n1").unwrap()].pods.len(), 1);
        let host = c.topology("kubernetes.io/hostname");
        assert_eq!((host.domains, host.domain_of.clone()), (0, vec![NO_DOMAIN, NO_DOMAIN]));
        let mut labelled = node("n3");
        labelled.labels.insert("kubernetes.io/hostname".into(), "n3".into());
        c.upsert_node(labelled);
        let host = c.topology("kubernetes.io/hostname");
        assert_eq!(host.domains, 1, "a new node drops the cached topology");
        assert_eq!(host.domain_of[c.node("n3").unwrap()], 0);
        assert!(c.remove_pod("d/a"));
        assert_eq!(c.nodes[c.node("n1").unwrap()].used_cpu, 0);
        assert_eq!(c.placed_count(), 0);
    }
}
