//! Scheduling one pod, pure: Kubernetes' framework of pre-filter, filter,
//! score and post-filter (preemption) over the cache.
//!
//! - *PreFilter* ([`PreState::new`]) looks at the whole cluster once per
//!   pod: which topology domains hold pods its (anti-)affinity terms name,
//!   which domains existing pods' anti-affinity closes to it, and how its
//!   spread constraints' pods are counted per domain.
//! - *Filter* checks nodes starting where the previous pod stopped, and
//!   stops once it has found enough feasible ones (Kubernetes' adaptive
//!   `percentageOfNodesToScore`: all nodes up to 100, 50% minus one point
//!   per 125 nodes, never under 5% or 100 nodes). Every rejection has the
//!   reason Kubernetes gives.
//! - *Score*: least allocated and balanced allocation (weight 1 each),
//!   preferred node affinity (2), PreferNoSchedule taints (3), preferred
//!   pod (anti-)affinity (2) and soft spread (2), each normalised to 0..100.
//!   Pod (anti-)affinity scores both ways, as Kubernetes': the pod's own
//!   preferred terms, and placed pods' preferred terms (and required
//!   affinity, weight 1) that match the pod.
//! - *PostFilter*: when a pod fits nowhere and may preempt, the node where
//!   evicting the fewest, least important lower-priority pods makes room,
//!   breaking the fewest PodDisruptionBudgets. The preemptor is nominated
//!   there, and less important pods may not take the room it waits for.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::cache::{Cache, TermKey, Topology, NO_DOMAIN};
use super::model::{unschedulable_taint, LabelSelector, NodeInfo, PodInfo, PodTerm, SpreadConstraint, Taint};
use super::volumes::{admits, Need};

pub const NODE_NAME: &str = "node(s) didn't match the requested node name";
pub const UNSCHEDULABLE: &str = "node(s) were unschedulable";
pub const NODE_AFFINITY: &str = "node(s) didn't match Pod's node affinity/selector";
pub const TOO_MANY_PODS: &str = "Too many pods";
pub const INSUFFICIENT_CPU: &str = "Insufficient cpu";
pub const INSUFFICIENT_MEMORY: &str = "Insufficient memory";
pub const POD_AFFINITY: &str = "node(s) didn't match pod affinity rules";
pub const POD_ANTI_AFFINITY: &str = "node(s) didn't match pod anti-affinity rules";
pub const EXISTING_ANTI_AFFINITY: &str = "node(s) didn't satisfy existing pods anti-affinity rules";
pub const SPREAD: &str = "node(s) didn't match pod topology spread constraints";
pub const SPREAD_LABEL: &str = "node(s) didn't match pod topology spread constraints (missing required label)";

/// How many feasible nodes to look for among `n`.
pub fn nodes_to_find(n: usize) -> usize {
    if n < 100 {
        return n;
    }
    let pct = 50usize.saturating_sub(n / 125).max(5);
    (n * pct / 100).max(100)
}

/// Node affinity and selector: where the pod may run at all.
pub fn node_matches(pod: &PodInfo, n: &NodeInfo) -> bool {
    pod.node_selector.iter().all(|(k, v)| n.label(k) == Some(v.as_str()))
        && pod.node_terms.as_ref().is_none_or(|terms| terms.iter().any(|t| t.matches(&n.labels, &n.name)))
}

fn untolerated_hard_taint<'a>(pod: &PodInfo, n: &'a NodeInfo) -> Option<&'a Taint> {
    n.taints.iter().find(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute") && !pod.tolerates(t))
}

/// The filters a pod's own spec decides, independent of other pods; a
/// node failing one of these cannot be helped by preemption.
fn static_filters(pod: &PodInfo, n: &NodeInfo) -> Result<(), String> {
    if !pod.node_name.is_empty() && pod.node_name != n.name {
        return Err(NODE_NAME.into());
    }
    if n.unschedulable && !pod.tolerates(&unschedulable_taint()) {
        return Err(UNSCHEDULABLE.into());
    }
    if !node_matches(pod, n) {
        return Err(NODE_AFFINITY.into());
    }
    if let Some(t) = untolerated_hard_taint(pod, n) {
        return Err(format!("node(s) had untolerated taint {{{}: {}}}", t.key, t.value));
    }
    Ok(())
}

/// Whether the pod may run on the node, resources and other pods aside
/// (DaemonSets place their pods on every such node).
pub fn eligible(pod: &PodInfo, n: &NodeInfo) -> bool {
    static_filters(pod, n).is_ok()
}

fn fits_resources(pod: &PodInfo, n: &NodeInfo) -> Result<(), &'static str> {
    fits_with(pod, n, Reserved::default())
}

/// Room held on a node for pods nominated to it (by preemption).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Reserved {
    pub cpu: i64,
    pub mem: i64,
    pub pods: i64,
}

fn fits_with(pod: &PodInfo, n: &NodeInfo, r: Reserved) -> Result<(), &'static str> {
    if n.pods.len() as i64 + r.pods + 1 > n.alloc_pods {
        return Err(TOO_MANY_PODS);
    }
    if pod.cpu > 0 && n.used_cpu + r.cpu + pod.cpu > n.alloc_cpu {
        return Err(INSUFFICIENT_CPU);
    }
    if pod.mem > 0 && n.used_mem + r.mem + pod.mem > n.alloc_mem {
        return Err(INSUFFICIENT_MEMORY);
    }
    Ok(())
}

/// Per topology domain (by id, see [`Topology`]): a count or a flag.
struct PerDomain<T> {
    topo: Arc<Topology>,
    values: Vec<T>,
}

impl<T: Copy + Default> PerDomain<T> {
    fn new(topo: Arc<Topology>) -> PerDomain<T> {
        PerDomain { values: vec![T::default(); topo.domains], topo }
    }

    /// The value for node `i`'s domain; `None` if the node lacks the key.
    fn at(&self, i: usize) -> Option<T> {
        let d = self.topo.domain_of.get(i).copied().unwrap_or(NO_DOMAIN);
        (d != NO_DOMAIN).then(|| self.values[d as usize])
    }

    fn at_mut(&mut self, i: usize) -> Option<&mut T> {
        let d = self.topo.domain_of.get(i).copied().unwrap_or(NO_DOMAIN);
        self.values.get_mut(d as usize)
    }
}

struct Spread {
    /// Matching pods per domain, over the nodes the constraint counts.
    counts: PerDomain<i64>,
    /// The smallest count (0 when fewer domains than minDomains exist).
    min: i64,
    /// The pod matches its own selector (it adds one where it goes).
    self_match: i64,
}

/// What the whole cluster says about one pod, computed once per attempt.
/// Domains are ids from the cache's [`Topology`] maps, so the per-node
/// filter loop indexes vectors instead of looking up and hashing labels.
pub struct PreState {
    /// Per required affinity term: domains holding a matching pod.
    affinity: Vec<PerDomain<bool>>,
    /// No pod matches any required affinity term, and the pod matches its
    /// own terms: the first of its group may go anywhere.
    affinity_first: bool,
    /// Per required anti-affinity term: domains holding a matching pod.
    anti: Vec<PerDomain<bool>>,
    /// Domains that placed pods' anti-affinity closes, per topology key.
    closed: Vec<PerDomain<bool>>,
    spread: Vec<Spread>,
    /// Per preferred term (affinity, then anti-affinity): weight (negative
    /// for anti-affinity) and matching pods per domain.
    preferred: Vec<(i64, PerDomain<i64>)>,
    /// What the pod's PersistentVolumeClaims need of a node, or why no
    /// node will do until they change.
    volumes: Result<Vec<Need>, String>,
}

/// Pods matching `term` per domain of its topology key.
fn domain_counts(cache: &Cache, term: &PodTerm) -> PerDomain<i64> {
    let mut d = PerDomain::new(cache.topology(&term.topology_key));
    let key = TermKey { term: PodTerm { weight: 0, ..term.clone() }, live_only: false };
    cache.with_term_counts(&key, |per_node| {
        for (i, &c) in per_node.iter().enumerate().filter(|(_, &c)| c != 0) {
            if let Some(v) = d.at_mut(i) {
                *v += c;
            }
        }
    });
    d
}

fn present(d: PerDomain<i64>) -> PerDomain<bool> {
    PerDomain { values: d.values.iter().map(|&c| c > 0).collect(), topo: d.topo }
}

impl PreState {
    pub fn new(pod: &PodInfo, cache: &Cache) -> PreState {
        let affinity: Vec<PerDomain<bool>> = pod.affinity.iter().map(|t| present(domain_counts(cache, t))).collect();
        let affinity_first = affinity.iter().all(|d| !d.values.contains(&true))
            && pod.affinity.iter().all(|t| t.matches(pod, cache.namespaces()));
        let anti = pod.anti_affinity.iter().map(|t| present(domain_counts(cache, t))).collect();
        // Existing pods' anti-affinity: the rule is symmetric.
        let mut closed: HashMap<String, PerDomain<bool>> = HashMap::new();
        cache.with_anti_terms(|terms| {
            for (t, per_node) in terms.iter().filter(|(t, _)| t.matches(pod, cache.namespaces())) {
                let d = closed
                    .entry(t.topology_key.clone())
                    .or_insert_with(|| PerDomain::new(cache.topology(&t.topology_key)));
                for (i, _) in per_node.iter().enumerate().filter(|(_, &c)| c > 0) {
                    if let Some(v) = d.at_mut(i) {
                        *v = true;
                    }
                }
            }
        });
        let spread = pod.spread.iter().map(|c| spread_state(pod, c, cache)).collect();
        let mut preferred: Vec<(i64, PerDomain<i64>)> = pod
            .preferred_affinity
            .iter()
            .map(|t| (t.weight, t))
            .chain(pod.preferred_anti_affinity.iter().map(|t| (-t.weight, t)))
            .map(|(w, t)| (w, domain_counts(cache, t)))
            .collect();
        // Symmetric: placed pods whose terms match this one pull or push it
        // towards their domains.
        cache.with_scoring_terms(|terms| {
            for ((t, w), per_node) in terms.iter().filter(|((t, _), _)| t.matches(pod, cache.namespaces())) {
                let mut d = PerDomain::new(cache.topology(&t.topology_key));
                for (i, &c) in per_node.iter().enumerate().filter(|(_, &c)| c > 0) {
                    if let Some(v) = d.at_mut(i) {
                        *v += c;
                    }
                }
                preferred.push((*w, d));
            }
        });
        let volumes = cache.volumes.needs(pod);
        PreState { affinity, affinity_first, anti, closed: closed.into_values().collect(), spread, preferred, volumes }
    }
}

fn spread_state(pod: &PodInfo, c: &SpreadConstraint, cache: &Cache) -> Spread {
    let mut counts = PerDomain::new(cache.topology(&c.topology_key));
    let mut counted = vec![false; counts.values.len()];
    // The constraint's pods: its selector, in the pod's namespace, not terminating.
    let term = PodTerm {
        selector: c.selector.clone(),
        namespaces: vec![pod.namespace.clone()],
        namespace_selector: None,
        topology_key: c.topology_key.clone(),
        weight: 0,
    };
    let filtered = (c.honor_affinity && (!pod.node_selector.is_empty() || pod.node_terms.is_some())) || c.honor_taints;
    cache.with_term_counts(&TermKey { term, live_only: true }, |per_node| {
        for (i, n) in cache.nodes.iter().enumerate() {
            let d = counts.topo.domain_of[i];
            if d == NO_DOMAIN
                || (filtered
                    && ((c.honor_affinity && !node_matches(pod, n))
                        || (c.honor_taints && untolerated_hard_taint(pod, n).is_some())))
            {
                continue;
            }
            counted[d as usize] = true;
            counts.values[d as usize] += per_node[i];
        }
    });
    let domains = counted.iter().filter(|&&c| c).count() as i64;
    let min = if domains < c.min_domains {
        0
    } else {
        counts.values.iter().zip(&counted).filter(|(_, &c)| c).map(|(&v, _)| v).min().unwrap_or(0)
    };
    Spread { counts, min, self_match: i64::from(c.selector.matches(&pod.labels)) }
}

/// The inter-pod filters for node `i`.
fn pod_filters(pod: &PodInfo, pre: &PreState, i: usize) -> Result<(), &'static str> {
    if !pre.affinity_first && pre.affinity.iter().any(|d| d.at(i) != Some(true)) {
        return Err(POD_AFFINITY);
    }
    if pre.anti.iter().any(|d| d.at(i) == Some(true)) {
        return Err(POD_ANTI_AFFINITY);
    }
    if pre.closed.iter().any(|d| d.at(i) == Some(true)) {
        return Err(EXISTING_ANTI_AFFINITY);
    }
    for (c, s) in pod.spread.iter().zip(&pre.spread).filter(|(c, _)| c.hard) {
        let Some(here) = s.counts.at(i) else { return Err(SPREAD_LABEL) };
        if here + s.self_match - s.min > c.max_skew {
            return Err(SPREAD);
        }
    }
    Ok(())
}

/// Every filter, with the reason for the first that rejects.
pub fn filter(pod: &PodInfo, pre: &PreState, cache: &Cache, i: usize) -> Result<(), String> {
    let n = &cache.nodes[i];
    static_filters(pod, n)?;
    volume_filter(pre, n)?;
    // Pods preemption nominated here, at least as important, keep their room.
    fits_with(pod, n, cache.reserved(&n.name, pod))?;
    pod_filters(pod, pre, i).map_err(str::to_string)
}

/// The pod's claims on node `n` (a pod whose claims fit nowhere never gets here).
fn volume_filter(pre: &PreState, n: &NodeInfo) -> Result<(), &'static str> {
    match &pre.volumes {
        Ok(needs) => admits(needs, n),
        Err(_) => Ok(()),
    }
}

/// Least allocated plus balanced allocation, each 0..=100.
fn resource_score(pod: &PodInfo, n: &NodeInfo) -> i64 {
    let frac = |used: i64, alloc: i64| if alloc <= 0 { 1.0 } else { (used as f64 / alloc as f64).min(1.0) };
    let (fc, fm) = (frac(n.nz_cpu + pod.nz_cpu, n.alloc_cpu), frac(n.nz_mem + pod.nz_mem, n.alloc_mem));
    let least = (1.0 - (fc + fm) / 2.0) * 100.0;
    let balanced = (1.0 - (fc - fm).abs()) * 100.0;
    (least + balanced) as i64
}

/// Scales raw scores to 0..=100, highest best (`reverse`: lowest best).
fn normalise(raw: &[i64], reverse: bool) -> Vec<i64> {
    let (lo, hi) = (raw.iter().copied().min().unwrap_or(0), raw.iter().copied().max().unwrap_or(0));
    raw.iter()
        .map(|&r| {
            if hi == lo {
                return 0;
            }
            let s = (r - lo) * 100 / (hi - lo);
            if reverse {
                100 - s
            } else {
                s
            }
        })
        .collect()
}

fn scores(pod: &PodInfo, pre: &PreState, cache: &Cache, feasible: &[usize]) -> Vec<i64> {
    let nodes: Vec<&NodeInfo> = feasible.iter().map(|&i| &cache.nodes[i]).collect();
    let mut total: Vec<i64> = nodes.iter().map(|n| resource_score(pod, n)).collect();
    let mut add = |raw: Vec<i64>, reverse: bool, weight: i64| {
        for (t, s) in total.iter_mut().zip(normalise(&raw, reverse)) {
            *t += weight * s;
        }
    };
    if !pod.preferred_nodes.is_empty() {
        let raw = nodes
            .iter()
            .map(|n| pod.preferred_nodes.iter().filter(|(_, t)| t.matches(&n.labels, &n.name)).map(|(w, _)| w).sum());
        add(raw.collect(), false, 2);
    }
    if nodes.iter().any(|n| n.taints.iter().any(|t| t.effect == "PreferNoSchedule")) {
        let intolerable =
            |n: &NodeInfo| n.taints.iter().filter(|t| t.effect == "PreferNoSchedule" && !pod.tolerates(t)).count();
        add(nodes.iter().map(|n| intolerable(n) as i64).collect(), true, 3);
    }
    if !pre.preferred.is_empty() {
        let raw = feasible.iter().map(|&i| pre.preferred.iter().map(|(w, d)| d.at(i).map_or(0, |c| w * c)).sum());
        add(raw.collect(), false, 2);
    }
    let soft: Vec<(&SpreadConstraint, &Spread)> = pod.spread.iter().zip(&pre.spread).filter(|(c, _)| !c.hard).collect();
    if !soft.is_empty() {
        let raw = feasible.iter().map(|&i| soft.iter().map(|(_, s)| s.counts.at(i).unwrap_or(0)).sum());
        add(raw.collect(), true, 2);
    }
    total
}

/// Why a pod fits nowhere: reason -> number of nodes, or one reason
/// for all (a pre-filter's, e.g. a missing PersistentVolumeClaim).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FitError {
    pub nodes: usize,
    pub reasons: BTreeMap<String, usize>,
    pub prefilter: Option<String>,
}

impl std::fmt::Display for FitError {
    /// Kubernetes' message: "0/5 nodes are available: 3 Insufficient cpu, ...".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<(&usize, &String)> = self.reasons.iter().map(|(r, n)| (n, r)).collect();
        parts.sort_by(|a, b| b.0.cmp(a.0).then(a.1.cmp(b.1)));
        let list: Vec<String> = parts.iter().map(|(n, r)| format!("{n} {r}")).collect();
        if let Some(why) = &self.prefilter {
            write!(f, "0/{} nodes are available: {why}.", self.nodes)
        } else if list.is_empty() {
            write!(f, "0/{} nodes are available.", self.nodes)
        } else {
            write!(f, "0/{} nodes are available: {}.", self.nodes, list.join(", "))
        }
    }
}

/// The chosen node, and where the next pod's search starts.
#[derive(Debug, PartialEq)]
pub struct Chosen {
    pub node: usize,
    pub next_start: usize,
}

/// Filters nodes from `start` (wrapping) until enough are feasible, scores
/// those, and picks the best (the first found on a tie).
pub fn schedule(pod: &PodInfo, cache: &Cache, start: usize) -> Result<Chosen, FitError> {
    let n = cache.nodes.len();
    let pre = PreState::new(pod, cache);
    if let Err(why) = &pre.volumes {
        return Err(FitError { nodes: n, prefilter: Some(why.clone()), ..Default::default() });
    }
    let want = nodes_to_find(n);
    let mut feasible: Vec<usize> = Vec::with_capacity(want.min(n));
    let mut err = FitError { nodes: n, ..Default::default() };
    let mut examined = 0;
    for k in 0..n {
        let i = (start + k) % n;
        examined += 1;
        match filter(pod, &pre, cache, i) {
            Ok(()) => {
                feasible.push(i);
                if feasible.len() >= want {
                    break;
                }
            }
            Err(r) => *err.reasons.entry(r).or_default() += 1,
        }
    }
    if feasible.is_empty() {
        return Err(err);
    }
    let s = scores(pod, &pre, cache, &feasible);
    let best = (0..feasible.len()).max_by_key(|&k| (s[k], std::cmp::Reverse(k))).unwrap_or(0);
    Ok(Chosen { node: feasible[best], next_start: (start + examined) % n.max(1) })
}

/// A PodDisruptionBudget as preemption weighs it: the pods it selects and
/// how many of them may go now (`status.disruptionsAllowed`).
#[derive(Debug, Clone)]
pub struct Budget {
    pub namespace: String,
    pub selector: LabelSelector,
    pub allowed: i64,
}

impl Budget {
    pub fn parse(pdb: &serde_json::Value) -> Option<Budget> {
        Some(Budget {
            namespace: pdb["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
            selector: LabelSelector::parse(&pdb["spec"]["selector"])?,
            allowed: pdb["status"]["disruptionsAllowed"].as_i64().unwrap_or(0),
        })
    }

    fn covers(&self, p: &PodInfo) -> bool {
        p.namespace == self.namespace && self.selector.matches(&p.labels)
    }
}

/// How many of `victims` go beyond what their budgets allow.
fn violations(victims: &[Arc<PodInfo>], budgets: &[Budget]) -> usize {
    budgets
        .iter()
        .map(|b| {
            let hit = victims.iter().filter(|v| b.covers(v)).count() as i64;
            (hit - b.allowed.max(0)).max(0) as usize
        })
        .sum()
}

/// A preemption: on `node`, evict `victims` (lower priority) to make room.
#[derive(Debug)]
pub struct Preemption {
    pub node: usize,
    pub victims: Vec<Arc<PodInfo>>,
}

/// Whether a pod that fits nowhere may preempt now: not with
/// preemptionPolicy Never, and not while pods it already preempted on its
/// nominated node are still terminating (it waits for them instead).
pub fn may_preempt(pod: &PodInfo, cache: &Cache) -> bool {
    if pod.preempt_never {
        return false;
    }
    let nominated = cache.node(&pod.nominated).map(|i| &cache.nodes[i]);
    !nominated.is_some_and(|n| n.pods.iter().any(|p| p.deleting && p.priority < pod.priority))
}

/// Kubernetes' preemption, for room (cpu, memory, pod count): on every
/// node where the pod's own constraints and other pods' rules already
/// allow it, remove all lower-priority pods, then reprieve as many as
/// still leave room (most important first). The node chosen has the
/// lowest highest-victim priority, then the lowest priority sum, then the
/// fewest victims — after the fewest PodDisruptionBudget violations, as
/// Kubernetes: victims a budget protects are reprieved first, and a node
/// whose victims break fewer budgets wins.
pub fn preempt(pod: &PodInfo, cache: &Cache, budgets: &[Budget]) -> Option<Preemption> {
    let pre = PreState::new(pod, cache);
    let mut best: Option<((usize, i64, i64, usize), Preemption)> = None;
    for (i, n) in cache.nodes.iter().enumerate() {
        if static_filters(pod, n).is_err() || pod_filters(pod, &pre, i).is_err() {
            continue;
        }
        if pre.volumes.is_err() || volume_filter(&pre, n).is_err() {
            continue;
        }
        let mut lower: Vec<Arc<PodInfo>> =
            n.pods.iter().filter(|p| p.priority < pod.priority && !p.deleting).cloned().collect();
        if lower.is_empty() {
            continue;
        }
        let mut trial = n.clone();
        for p in &lower {
            trial.remove(&p.key);
        }
        if fits_resources(pod, &trial).is_err() {
            continue;
        }
        // Reprieve budget-protected pods first, then the most important.
        let protected = |p: &PodInfo| budgets.iter().any(|b| b.covers(p) && b.allowed <= 0);
        lower.sort_by(|a, b| {
            protected(b).cmp(&protected(a)).then(b.priority.cmp(&a.priority)).then_with(|| a.created.cmp(&b.created))
        });
        let mut victims = Vec::new();
        for p in lower {
            trial.add(p.clone());
            if fits_resources(pod, &trial).is_err() {
                trial.remove(&p.key);
                victims.push(p);
            }
        }
        let rank = (
            violations(&victims, budgets),
            victims.iter().map(|v| v.priority).max().unwrap_or(i64::MIN),
            victims.iter().map(|v| v.priority).sum::<i64>(),
            victims.len(),
        );
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((rank, Preemption { node: i, victims }));
        }
    }
    best.map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::super::model::pod;
    use super::*;
    use serde_json::{json, Value};

    fn merged(mut base: Value, extra: Value) -> Value {
        json_patch::merge(&mut base, &extra);
        base
    }

    fn node(name: &str, cpu: &str, extra: Value) -> NodeInfo {
        NodeInfo::new(&merged(
            json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "status": {"allocatable": {"cpu": cpu, "memory": "4Gi", "pods": "110"}}}),
            extra,
        ))
    }

    fn cache(nodes: Vec<NodeInfo>) -> Cache {
        let mut c = Cache::default();
        for n in nodes {
            c.upsert_node(n);
        }
        c
    }

    fn with_cpu(name: &str, cpu: &str, extra: Value) -> Arc<PodInfo> {
        pod(merged(
            json!({"metadata": {"name": name, "namespace": "d"},
                "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": "100Mi"}}}]}}),
            extra,
        ))
    }

    fn web(name: &str, extra: Value) -> Arc<PodInfo> {
        with_cpu(name, "100m", merged(json!({"metadata": {"labels": {"app": "web"}}}), extra))
    }

    fn chosen<'a>(p: &PodInfo, c: &'a Cache) -> &'a str {
        &c.nodes[schedule(p, c, 0).unwrap().node].name
    }

    fn why(p: &PodInfo, c: &Cache) -> String {
        schedule(p, c, 0).unwrap_err().to_string()
    }

    #[test]
    fn filters_explain_and_scoring_spreads() {
        let mut c = cache(vec![
            node("small", "500m", json!({})),
            node("tainted", "8", json!({"spec": {"taints": [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]}})),
            node("cordoned", "8", json!({"spec": {"unschedulable": true}})),
            node("big", "4", json!({})),
            node("other", "4", json!({})),
        ]);
        let first = chosen(&with_cpu("a", "1", json!({})), &c).to_string();
        assert!(["big", "other"].contains(&first.as_str()));
        c.place(with_cpu("a", "1", json!({})), &first, true);
        assert_ne!(chosen(&with_cpu("b", "1", json!({})), &c), first, "least allocated spreads");

        let bare =
            |n: &str| pod(json!({"metadata": {"name": n, "namespace": "d"}, "spec": {"containers": [{"name": "c"}]}}));
        let mut two = cache(vec![node("a", "4", json!({})), node("b", "4", json!({}))]);
        let n1 = chosen(&bare("x"), &two).to_string();
        two.place(bare("x"), &n1, false);
        assert_ne!(chosen(&bare("y"), &two), n1, "requestless pods spread too");

        assert_eq!(
            why(&with_cpu("huge", "16", json!({})), &c),
            "0/5 nodes are available: 3 Insufficient cpu, 1 node(s) had untolerated taint {gpu: yes}, 1 node(s) were unschedulable."
        );
        let tolerant = with_cpu(
            "t",
            "1",
            json!({"spec": {"tolerations": [{"key": "gpu", "operator": "Exists"}], "nodeSelector": {"kubernetes.io/hostname": "tainted"}}}),
        );
        assert_eq!(chosen(&tolerant, &c), "tainted");
        let nowhere = with_cpu(
            "t",
            "1",
            json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["nowhere"]}]}]}}}}}),
        );
        assert!(why(&nowhere, &c).contains("4 node(s) didn't match Pod's node affinity/selector"));
        let by_field = with_cpu(
            "f",
            "1",
            json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["other"]}]}]}}}}}),
        );
        assert_eq!(chosen(&by_field, &c), "other");
        assert_eq!(chosen(&with_cpu("n", "100m", json!({"spec": {"nodeName": "small"}})), &c), "small");
    }

    #[test]
    fn preferred_node_affinity_and_soft_taints_steer() {
        let c = cache(vec![
            node("a", "4", json!({"metadata": {"labels": {"disk": "hdd"}}})),
            node("b", "4", json!({"metadata": {"labels": {"disk": "ssd"}}})),
            node(
                "c",
                "4",
                json!({"spec": {"taints": [{"key": "spot", "effect": "PreferNoSchedule"}]}, "metadata": {"labels": {"disk": "ssd"}}}),
            ),
        ]);
        let p = with_cpu(
            "p",
            "1",
            json!({"spec": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}}]}}}}),
        );
        assert_eq!(chosen(&p, &c), "b", "preferred label, and the PreferNoSchedule taint avoided");
    }

    fn zoned() -> Cache {
        cache(vec![
            node("a1", "4", json!({"metadata": {"labels": {"zone": "a"}}})),
            node("a2", "4", json!({"metadata": {"labels": {"zone": "a"}}})),
            node("b1", "4", json!({"metadata": {"labels": {"zone": "b"}}})),
        ])
    }

    #[test]
    fn anti_affinity_is_symmetric_and_affinity_follows_its_group() {
        let anti = json!({"spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "zone"}]}}}});
        let mut c = zoned();
        let n1 = chosen(&web("w1", anti.clone()), &c).to_string();
        c.place(web("w1", anti.clone()), &n1, false);
        let n2 = chosen(&web("w2", anti.clone()), &c).to_string();
        let zone = |c: &Cache, n: &str| c.nodes[c.node(n).unwrap()].labels["zone"].clone();
        assert_ne!(zone(&c, &n1), zone(&c, &n2));
        c.place(web("w2", anti.clone()), &n2, true);
        assert_eq!(
            why(&web("w3", anti), &c),
            "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules."
        );
        // A pod without terms of its own is still kept out by theirs.
        assert_eq!(
            why(&web("w4", json!({})), &c),
            "0/3 nodes are available: 3 node(s) didn't satisfy existing pods anti-affinity rules."
        );

        let follow = json!({"spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "zone"}]}}}});
        let mut c = zoned();
        let lone = with_cpu("x", "100m", follow.clone());
        assert_eq!(why(&lone, &c), "0/3 nodes are available: 3 node(s) didn't match pod affinity rules.");
        let first = with_cpu("c1", "100m", merged(follow, json!({"metadata": {"labels": {"app": "cache"}}})));
        assert!(schedule(&first, &c, 0).is_ok(), "the first pod of a self-affine group goes anywhere");
        c.place(with_cpu("c0", "100m", json!({"metadata": {"labels": {"app": "cache"}}})), "b1", false);
        assert_eq!(chosen(&lone, &c), "b1");
    }

    #[test]
    fn topology_spread_filters_and_scores() {
        let spread = |hard: &str| {
            json!({"spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": hard,
                "labelSelector": {"matchLabels": {"app": "web"}}}]}})
        };
        let mut c = zoned();
        c.upsert_node(node("nolabel", "64", json!({})));
        c.place(web("w1", json!({})), "a1", false);
        c.place(web("w2", json!({})), "a2", false);
        // Zone a has 2, zone b none: only b keeps the skew at 1; "nolabel" lacks the key.
        assert_eq!(chosen(&web("w3", spread("DoNotSchedule")), &c), "b1");
        for w in ["w3", "w4", "w5"] {
            c.place(web(w, json!({})), "b1", false);
        }
        // nodeAffinityPolicy Honor (default): zone a's pods do not count for a
        // pod that may only use zone b, so b is fine for it.
        let only_b = web("w6", merged(spread("DoNotSchedule"), json!({"spec": {"nodeSelector": {"zone": "b"}}})));
        assert_eq!(chosen(&only_b, &c), "b1");
        // With Ignore they do: b (3) is two above a (2).
        let mut ignore = merged(spread("DoNotSchedule"), json!({"spec": {"nodeSelector": {"zone": "b"}}}));
        ignore["spec"]["topologySpreadConstraints"][0]["nodeAffinityPolicy"] = json!("Ignore");
        let err = why(&web("w7", ignore), &c);
        assert!(err.contains("3 node(s) didn't match Pod's node affinity/selector"), "{err}");
        assert!(err.contains("1 node(s) didn't match pod topology spread constraints."), "{err}");
        // Soft: the emptier zone is preferred.
        let mut d = zoned();
        d.place(web("w1", json!({})), "b1", false);
        assert!(chosen(&web("w2", spread("ScheduleAnyway")), &d).starts_with('a'));
    }

    #[test]
    fn preferred_anti_affinity_spreads_a_group() {
        let pref = json!({"spec": {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "zone"}}]}}}});
        let mut c = zoned();
        c.place(web("w1", json!({})), "a1", false);
        c.place(web("w0", json!({})), "a2", false);
        // Resources alone would pick b1 anyway; load b1 so only the term decides.
        c.place(with_cpu("big", "3", json!({})), "b1", false);
        assert_eq!(chosen(&web("w2", pref), &c), "b1");
    }

    /// Scoring is symmetric: a placed pod that prefers (or avoids) pods
    /// like the incoming one draws it to (or pushes it from) its domain,
    /// though the incoming pod has no terms of its own.
    #[test]
    fn placed_pods_preferences_score_symmetrically() {
        let term = json!({"weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "zone"}});
        let mut c = zoned();
        let likes =
            json!({"spec": {"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [term]}}}});
        c.place(with_cpu("fan", "3", likes), "b1", false);
        assert_eq!(
            chosen(&web("w", json!({})), &c),
            "b1",
            "drawn to the zone of the pod that prefers it, though loaded"
        );

        let mut c = zoned();
        let avoids = json!({"spec": {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [term]}}}});
        c.place(with_cpu("loner", "0", avoids), "a1", false);
        let other = chosen(&web("w", json!({})), &c);
        assert!(other.starts_with('b'), "pushed out of the zone of the pod that avoids it: {other}");
        assert!(c.remove_pod("d/loner"));
        c.place(with_cpu("big", "3", json!({})), "b1", false);
        c.place(with_cpu("big2", "3", json!({})), "b2", false);
        assert!(chosen(&web("w", json!({})), &c).starts_with('a'), "its removal lifts the push");
    }

    #[test]
    fn sampling_stops_early_and_rotates() {
        assert_eq!(nodes_to_find(50), 50);
        assert_eq!(nodes_to_find(1000), 420);
        assert_eq!(nodes_to_find(5000), 500);
        assert_eq!(nodes_to_find(100_000), 5000);
        let c = cache((0..1000).map(|i| node(&format!("n{i:04}"), "4", json!({}))).collect());
        let p = with_cpu("p", "1", json!({}));
        let first = schedule(&p, &c, 0).unwrap();
        assert_eq!(first.next_start, 420);
        let second = schedule(&p, &c, first.next_start).unwrap();
        assert!((420..840).contains(&second.node));
        assert_eq!(schedule(&p, &c, 900).unwrap().next_start, 320);
    }

    #[test]
    fn a_nominated_pod_keeps_its_room_from_less_important_pods() {
        let mut c = cache(vec![node("a", "2", json!({}))]);
        let preemptor =
            with_cpu("hi", "1500m", json!({"spec": {"priority": 10}, "status": {"nominatedNodeName": "a"}}));
        c.nominate(&preemptor);
        let low = with_cpu("low", "1", json!({"spec": {"priority": 1}}));
        assert_eq!(why(&low, &c), "0/1 nodes are available: 1 Insufficient cpu.");
        assert!(schedule(&preemptor, &c, 0).is_ok(), "its own room");
        let higher = with_cpu("higher", "1", json!({"spec": {"priority": 20}}));
        assert!(schedule(&higher, &c, 0).is_ok(), "a more important pod may take it");
        c.unnominate(&preemptor.key);
        assert!(schedule(&low, &c, 0).is_ok());
    }

    #[test]
    fn preemption_spares_pods_a_disruption_budget_protects() {
        let low = |name: &str, app: &str| {
            with_cpu(name, "1", json!({"metadata": {"labels": {"app": app}}, "spec": {"priority": 1}}))
        };
        let mut c = cache(vec![node("a", "2", json!({})), node("b", "2", json!({}))]);
        c.place(low("db-0", "db"), "a", false);
        c.place(low("db-1", "db"), "a", false);
        c.place(low("web-0", "web"), "b", false);
        c.place(low("web-1", "web"), "b", false);
        let hi = with_cpu("hi", "1500m", json!({"spec": {"priority": 10}}));
        let budget = |app: &str, allowed: i64| {
            Budget::parse(&json!({"metadata": {"namespace": "d"}, "spec": {"selector": {"matchLabels": {"app": app}}},
                "status": {"disruptionsAllowed": allowed}}))
            .unwrap()
        };
        // Equal on priorities; the db budget allows nothing, so node b goes.
        let p = preempt(&hi, &c, &[budget("db", 0), budget("web", 2)]).unwrap();
        assert_eq!(c.nodes[p.node].name, "b");
        // Both budgeted: the one that allows more breaks fewer.
        let p = preempt(&hi, &c, &[budget("db", 1), budget("web", 0)]).unwrap();
        assert_eq!(c.nodes[p.node].name, "a");
        assert_eq!(violations(&p.victims, &[budget("db", 1)]), 1);
        // Within a node, a protected pod is reprieved before an unprotected one of equal priority.
        let mut mixed = cache(vec![node("m", "2", json!({}))]);
        mixed.place(low("db-0", "db"), "m", false);
        mixed.place(low("web-0", "web"), "m", false);
        let small = with_cpu("s", "1", json!({"spec": {"priority": 10}}));
        let p = preempt(&small, &mixed, &[budget("db", 0)]).unwrap();
        assert_eq!(p.victims.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["web-0"]);
    }

    #[test]
    fn preemption_evicts_the_least_important_fewest() {
        let prio = |name: &str, cpu: &str, p: i64| with_cpu(name, cpu, json!({"spec": {"priority": p}}));
        let mut c = cache(vec![node("a", "2", json!({})), node("b", "2", json!({}))]);
        c.place(prio("a-low", "1", 1), "a", false);
        c.place(prio("a-mid", "1", 5), "a", false);
        c.place(prio("b-low1", "1", 1), "b", false);
        c.place(prio("b-low2", "1", 1), "b", false);
        let hi = prio("hi", "1500m", 10);
        assert!(schedule(&hi, &c, 0).is_err());
        // a: both must go (highest victim 5); b: both low ones (highest 1).
        let p = preempt(&hi, &c, &[]).unwrap();
        assert_eq!(c.nodes[p.node].name, "b");
        assert_eq!(p.victims.len(), 2);

        let mut full = cache(vec![node("a", "2", json!({}))]);
        full.place(prio("x", "1", 1), "a", false);
        full.place(prio("y", "1", 3), "a", false);
        let p = preempt(&prio("small", "1", 10), &full, &[]).unwrap();
        let names: Vec<&str> = p.victims.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["x"], "the more important pod is reprieved");
        assert!(preempt(&prio("eq", "1", 1), &full, &[]).is_none(), "only lower priorities are preempted");
        assert!(!may_preempt(
            &with_cpu("n", "1", json!({"spec": {"priority": 10, "preemptionPolicy": "Never"}})),
            &full
        ));
        let mut waiting = full;
        waiting.place(
            pod(json!({"metadata": {"name": "z", "namespace": "d", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"priority": 0, "nodeName": "a", "containers": []}})),
            "a",
            false,
        );
        let nominated = with_cpu("m", "1", json!({"spec": {"priority": 10}, "status": {"nominatedNodeName": "a"}}));
        assert!(!may_preempt(&nominated, &waiting), "waits for its victims to terminate");
    }
}
