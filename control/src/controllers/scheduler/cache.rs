//! The scheduler's cache: every node and every pod holding a place on one,
//! kept up to date incrementally from informer changes (never rebuilt per
//! pod), plus the pods this scheduler has *assumed* onto a node while their
//! binding is in flight — counted at once, so concurrent bindings never
//! overcommit a node, and forgotten if the binding fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use super::model::{NamespaceLabels, NodeInfo, PodInfo, PodTerm};

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

/// A term whose matching placed pods are counted per node: every one, or
/// only those not being deleted (topology spread skips terminating pods).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TermKey {
    pub term: PodTerm,
    pub live_only: bool,
}

impl TermKey {
    fn counts(&self, pod: &PodInfo, ns: &NamespaceLabels) -> bool {
        (!self.live_only || !pod.deleting) && self.term.matches(pod, ns)
    }
}

/// Pods per node index, kept current as pods are placed and removed, so a
/// pre-filter reads a vector instead of matching every placed pod.
#[derive(Default)]
struct TermCounts {
    /// Terms pre-filters asked about (built on first use).
    by_term: HashMap<TermKey, Vec<i64>>,
    /// The distinct required anti-affinity terms of placed pods: how many
    /// pods carry each, per node (always kept).
    anti: HashMap<PodTerm, Vec<i64>>,
    /// Likewise the terms placed pods score by (a signed weight each):
    /// scoring is symmetric, so a pod a placed pod prefers (or avoids)
    /// scores towards (or away from) it.
    soft: HashMap<(PodTerm, i64), Vec<i64>>,
}

impl TermCounts {
    /// Every per-node vector, to follow a node added or removed.
    fn each_vec(&mut self, mut f: impl FnMut(&mut Vec<i64>)) {
        self.by_term.values_mut().chain(self.anti.values_mut()).chain(self.soft.values_mut()).for_each(&mut f);
    }
}

/// The terms by which a placed pod pulls or pushes pods it matches, with a
/// signed weight, as Kubernetes' InterPodAffinity score: its preferred
/// affinity (+weight) and anti-affinity (-weight), and its required
/// affinity (+1, the default hardPodAffinityWeight).
fn scoring_terms(pod: &PodInfo) -> impl Iterator<Item = (PodTerm, i64)> + '_ {
    let preferred = pod.preferred_affinity.iter().map(|t| (t.clone(), t.weight));
    let avoided = pod.preferred_anti_affinity.iter().map(|t| (t.clone(), -t.weight));
    let required = pod.affinity.iter().map(|t| (t.clone(), 1));
    preferred.chain(avoided).chain(required)
}

/// Terms tracked at most; past this the lazily built ones are dropped.
const MAX_TERMS: usize = 512;

#[derive(Default)]
pub struct Cache {
    pub nodes: Vec<NodeInfo>,
    /// Claims, volumes and classes, for pods with PersistentVolumeClaims.
    pub volumes: super::volumes::Volumes,
    index: HashMap<String, usize>,
    placed: HashMap<String, Placement>,
    /// Topologies by key, built on first use and dropped when nodes change.
    topologies: Mutex<HashMap<String, Arc<Topology>>>,
    /// Per node index; they follow nodes as they come and go.
    terms: Mutex<TermCounts>,
    /// Pending pods nominated to a node by preemption: node -> pods.
    nominated: HashMap<String, HashMap<String, Arc<PodInfo>>>,
    /// Namespace labels, for terms with a namespace selector.
    namespaces: NamespaceLabels,
}

impl Cache {
    pub fn namespaces(&self) -> &NamespaceLabels {
        &self.namespaces
    }

    /// A namespace's labels (None: it is gone); whether they changed. Term
    /// counts with a namespace selector may change with them: the lazily
    /// built counts start over (the anti-affinity ones count pods carrying
    /// a term, not pods it matches, and stay).
    pub fn set_namespace(&mut self, name: &str, labels: Option<BTreeMap<String, String>>) -> bool {
        let changed = match labels {
            Some(l) => self.namespaces.insert(name.to_string(), l.clone()).is_none_or(|old| old != l),
            None => self.namespaces.remove(name).is_some(),
        };
        if changed {
            self.terms.get_mut().by_term.retain(|k, _| k.term.namespace_selector.is_none());
        }
        changed
    }

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
        for p in &here {
            n.add(p.clone());
        }
        let i = self.nodes.len();
        self.index.insert(n.name.clone(), i);
        self.nodes.push(n);
        // The new node takes the next index: every count grows by one
        // slot, then its pods (placed before it appeared) are counted.
        // Nothing else moves, so no count is rebuilt (a rebuild per node
        // event is nodes x pods: minutes for 5,000 nodes joining a cluster
        // of 10,000 pods).
        self.terms.get_mut().each_vec(|v| v.push(0));
        for p in &here {
            self.count(p, i, 1);
        }
    }

    /// Adds `delta` for `pod` on node `i` to every count it belongs to.
    fn count(&mut self, pod: &PodInfo, i: usize, delta: i64) {
        let n = self.nodes.len();
        let tc = self.terms.get_mut();
        for (k, v) in tc.by_term.iter_mut() {
            if k.counts(pod, &self.namespaces) {
                v[i] += delta;
            }
        }
        for t in &pod.anti_affinity {
            let v = tc.anti.entry(t.clone()).or_insert_with(|| vec![0; n]);
            v[i] += delta;
            if delta < 0 && v.iter().all(|&c| c == 0) {
                tc.anti.remove(t);
            }
        }
        for key in scoring_terms(pod) {
            let v = tc.soft.entry(key.clone()).or_insert_with(|| vec![0; n]);
            v[i] += delta;
            if delta < 0 && v.iter().all(|&c| c == 0) {
                tc.soft.remove(&key);
            }
        }
    }

    /// Placed pods `key` counts, per node index.
    pub fn with_term_counts<R>(&self, key: &TermKey, f: impl FnOnce(&[i64]) -> R) -> R {
        let mut tc = self.terms.lock();
        if !tc.by_term.contains_key(key) {
            if tc.by_term.len() >= MAX_TERMS {
                tc.by_term.clear();
            }
            let v = self
                .nodes
                .iter()
                .map(|n| n.pods.iter().filter(|p| key.counts(p, &self.namespaces)).count() as i64)
                .collect();
            tc.by_term.insert(key.clone(), v);
        }
        f(&tc.by_term[key])
    }

    /// The distinct required anti-affinity terms of placed pods, each with
    /// how many pods carry it per node index.
    pub fn with_anti_terms<R>(&self, f: impl FnOnce(&HashMap<PodTerm, Vec<i64>>) -> R) -> R {
        f(&self.terms.lock().anti)
    }

    /// The terms placed pods score by, each with its signed weight and how
    /// many pods carry it per node index.
    pub fn with_scoring_terms<R>(&self, f: impl FnOnce(&HashMap<(PodTerm, i64), Vec<i64>>) -> R) -> R {
        f(&self.terms.lock().soft)
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
        // Counts move the way the nodes did; a term only the removed
        // node's pods carried is forgotten.
        let tc = self.terms.get_mut();
        tc.each_vec(|v| {
            v.swap_remove(i);
        });
        tc.anti.retain(|_, v| v.iter().any(|&c| c != 0));
        tc.soft.retain(|_, v| v.iter().any(|&c| c != 0));
    }

    /// `pod` holds a place on `node` (observed from the store, or assumed).
    pub fn place(&mut self, pod: Arc<PodInfo>, node: &str, assumed: bool) {
        self.remove_pod(&pod.key);
        if let Some(&i) = self.index.get(node) {
            self.nodes[i].add(pod.clone());
            self.count(&pod, i, 1);
        }
        self.placed.insert(pod.key.clone(), Placement { node: node.to_string(), pod, assumed });
    }

    pub fn remove_pod(&mut self, key: &str) -> bool {
        let Some(p) = self.placed.remove(key) else { return false };
        if let Some(&i) = self.index.get(&p.node) {
            self.nodes[i].remove(key);
            self.count(&p.pod, i, -1);
        }
        true
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

    /// `pod` waits for room preemption made on its nominated node.
    pub fn nominate(&mut self, pod: &Arc<PodInfo>) {
        self.unnominate(&pod.key);
        if !pod.nominated.is_empty() {
            self.nominated.entry(pod.nominated.clone()).or_default().insert(pod.key.clone(), pod.clone());
        }
    }

    pub fn unnominate(&mut self, key: &str) {
        self.nominated.retain(|_, pods| {
            pods.remove(key);
            !pods.is_empty()
        });
    }

    /// Room on `node` held for nominated pods at least as important as
    /// `pod` (other than `pod` itself).
    pub fn reserved(&self, node: &str, pod: &PodInfo) -> super::framework::Reserved {
        let mut r = super::framework::Reserved::default();
        if self.nominated.is_empty() {
            return r; // the common case: no lookup per node
        }
        for p in self.nominated.get(node).into_iter().flat_map(|m| m.values()) {
            if p.key != pod.key && p.priority >= pod.priority {
                r.cpu += p.cpu;
                r.mem += p.mem;
                r.pods += 1;
            }
        }
        r
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
        // Counts by term follow placements, and survive node changes.
        let anti = pod(json!({"metadata": {"name": "w", "namespace": "d", "labels": {"app": "web"}},
            "spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}},
                "containers": [{"name": "c"}]}}));
        let key = TermKey { term: anti.anti_affinity[0].clone(), live_only: false };
        let n3 = c.node("n3").unwrap();
        assert_eq!(c.with_term_counts(&key, |v| v.iter().sum::<i64>()), 0);
        c.place(anti.clone(), "n3", true);
        assert_eq!(c.with_term_counts(&key, |v| v[n3]), 1);
        assert_eq!(c.with_anti_terms(|t| t[&key.term][n3]), 1);
        c.upsert_node(node("n4"));
        let n3 = c.node("n3").unwrap();
        assert_eq!(c.with_term_counts(&key, |v| v[n3]), 1, "rebuilt after a node change");
        assert_eq!(c.with_anti_terms(|t| t[&key.term][n3]), 1);
        c.remove_pod("d/w");
        assert_eq!(c.with_term_counts(&key, |v| v.iter().sum::<i64>()), 0);
        assert!(c.with_anti_terms(|t| t.is_empty()), "a term no pod carries is forgotten");
        assert!(c.remove_pod("d/a"));
        assert_eq!(c.nodes[c.node("n1").unwrap()].used_cpu, 0);
        assert_eq!(c.placed_count(), 0);
    }

    type Counts<K> = HashMap<K, Vec<i64>>;

    /// What the incremental counts must equal: counted from scratch.
    fn rebuilt(c: &Cache) -> (Counts<PodTerm>, Counts<(PodTerm, i64)>) {
        let n = c.nodes.len();
        let (mut anti, mut soft) = (HashMap::new(), HashMap::new());
        for (i, node) in c.nodes.iter().enumerate() {
            for p in &node.pods {
                for t in &p.anti_affinity {
                    anti.entry(t.clone()).or_insert_with(|| vec![0; n])[i] += 1;
                }
                for key in scoring_terms(p) {
                    soft.entry(key).or_insert_with(|| vec![0; n])[i] += 1;
                }
            }
        }
        (anti, soft)
    }

    #[test]
    fn term_counts_follow_nodes_coming_and_going() {
        use rand::{Rng, SeedableRng};
        let term = |app: &str| json!({"labelSelector": {"matchLabels": {"app": app}}, "topologyKey": "zone"});
        let mk = |i: usize| {
            let app = ["web", "db", "cache"][i % 3];
            pod(json!({"metadata": {"name": format!("p{i}"), "namespace": "d", "labels": {"app": app}},
                "spec": {"affinity": {"podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [term(app)],
                    "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 5, "podAffinityTerm": term("db")}]}},
                    "containers": [{"name": "c"}]}}))
        };
        let pods: Vec<_> = (0..12).map(mk).collect();
        let lazy = TermKey { term: pods[0].anti_affinity[0].clone(), live_only: false };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut c = Cache::default();
        for step in 0..2000 {
            let name = format!("n{}", rng.gen_range(0..6));
            let p = &pods[rng.gen_range(0..pods.len())];
            match rng.gen_range(0..5) {
                0 => c.upsert_node(node(&name)),
                1 => c.remove_node(&name),
                2 => {
                    c.remove_pod(&p.key);
                }
                _ => c.place(p.clone(), &name, rng.gen_bool(0.5)),
            }
            if step % 3 == 0 {
                c.with_term_counts(&lazy, |_| ()); // built lazily, then kept in step
            }
            let (anti, soft) = rebuilt(&c);
            assert_eq!(c.with_anti_terms(|t| t.clone()), anti, "step {step}");
            assert_eq!(c.with_scoring_terms(|t| t.clone()), soft, "step {step}");
            let expected: Vec<i64> = c
                .nodes
                .iter()
                .map(|n| n.pods.iter().filter(|p| lazy.counts(p, &c.namespaces)).count() as i64)
                .collect();
            assert_eq!(c.with_term_counts(&lazy, |v| v.to_vec()), expected, "step {step}");
        }
        assert!(c.placed_count() > 0 && !c.nodes.is_empty(), "the walk ends with pods on nodes");
    }
}
