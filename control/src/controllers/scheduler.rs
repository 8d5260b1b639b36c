//! The scheduler: binds pending pods to nodes.
//!
//! A pipeline of filters, each able to say why it rejects a node, then
//! least-allocated / balanced scoring (pure: [`schedule`]). The shell runs
//! a pass over every pending pod whenever pods or nodes change, accounts
//! each binding at once (so one pass never overcommits a node), binds
//! through the pod's `binding` semantics (the pod must still be unbound:
//! optimistic concurrency), and reports pods that fit nowhere with
//! `PodScheduled=False` and Kubernetes' message ("0/5 nodes are available:
//! 3 Insufficient cpu, 2 node(s) had untolerated taint ...").

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::informer::Informer;
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::ApiServer;

/// A Kubernetes quantity in milli-units (cpu: millicores; memory: milli-bytes
/// would overflow, so memory is parsed to bytes with `scale = 1`).
pub fn parse_quantity(q: &Value, milli: bool) -> Option<i64> {
    let s = match q {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let (num, suffix) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let mult: f64 = match suffix {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        _ => return None,
    };
    let v: f64 = num.parse().ok()?;
    let v = v * mult * if milli { 1000.0 } else { 1.0 };
    v.is_finite().then_some(v.ceil() as i64)
}

/// Requests of a pod: (millicores, bytes), the larger of the sum of its
/// containers and its largest init container, as Kubernetes computes it.
pub fn pod_requests(pod: &Value) -> (i64, i64) {
    let sum = |list: &str| -> (i64, i64) {
        pod["spec"][list].as_array().into_iter().flatten().fold((0, 0), |(c, m), ct| {
            let r = &ct["resources"]["requests"];
            (c + parse_quantity(&r["cpu"], true).unwrap_or(0), m + parse_quantity(&r["memory"], false).unwrap_or(0))
        })
    };
    let max_init = pod["spec"]["initContainers"].as_array().into_iter().flatten().fold((0, 0), |(c, m), ct| {
        let r = &ct["resources"]["requests"];
        (c.max(parse_quantity(&r["cpu"], true).unwrap_or(0)), m.max(parse_quantity(&r["memory"], false).unwrap_or(0)))
    });
    let (c, m) = sum("containers");
    (c.max(max_init.0), m.max(max_init.1))
}

/// A node as the scheduler sees it: allocatable and what is already placed.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub node: Value,
    pub alloc_cpu: i64,
    pub alloc_mem: i64,
    pub alloc_pods: i64,
    pub used_cpu: i64,
    pub used_mem: i64,
    /// Usage counting requestless pods as 100m / 200Mi (scoring only).
    pub scored_cpu: i64,
    pub scored_mem: i64,
    pub pods: i64,
}

/// Kubernetes scores a pod without requests as if it asked for 100m CPU and
/// 200 MiB, so requestless pods still spread over nodes.
fn non_zero(pod: &Value) -> (i64, i64) {
    let (c, m) = pod_requests(pod);
    (if c == 0 { 100 } else { c }, if m == 0 { 200 << 20 } else { m })
}

impl NodeInfo {
    pub fn new(node: &Value) -> NodeInfo {
        let a = if node["status"]["allocatable"].is_object() {
            &node["status"]["allocatable"]
        } else {
            &node["status"]["capacity"]
        };
        NodeInfo {
            name: node["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            node: node.clone(),
            alloc_cpu: parse_quantity(&a["cpu"], true).unwrap_or(0),
            alloc_mem: parse_quantity(&a["memory"], false).unwrap_or(0),
            alloc_pods: parse_quantity(&a["pods"], false).unwrap_or(110),
            used_cpu: 0,
            used_mem: 0,
            scored_cpu: 0,
            scored_mem: 0,
            pods: 0,
        }
    }

    pub fn add(&mut self, pod: &Value) {
        let (c, m) = pod_requests(pod);
        self.used_cpu += c;
        self.used_mem += m;
        let (sc, sm) = non_zero(pod);
        self.scored_cpu += sc;
        self.scored_mem += sm;
        self.pods += 1;
    }
}

/// The toleration (if any) that tolerates `taint`, Kubernetes' matching:
/// key (empty = any with Exists), operator Exists or Equal value, effect
/// (empty = any).
pub fn toleration_for<'a>(tolerations: &'a [Value], taint: &Value) -> Option<&'a Value> {
    tolerations.iter().find(|t| {
        let key_ok = t["key"].as_str().is_none_or(|k| k.is_empty() || Some(k) == taint["key"].as_str());
        let op_ok = match t["operator"].as_str().unwrap_or("Equal") {
            "Exists" => true,
            _ => t["value"].as_str().unwrap_or_default() == taint["value"].as_str().unwrap_or_default(),
        };
        let effect_ok = t["effect"].as_str().is_none_or(|e| e.is_empty() || Some(e) == taint["effect"].as_str());
        let wildcard = t["key"].as_str().is_none_or(str::is_empty) && t["operator"] == "Exists";
        wildcard || (key_ok && op_ok && effect_ok)
    })
}

fn tolerates(tolerations: &[Value], taint: &Value) -> bool {
    toleration_for(tolerations, taint).is_some()
}

fn match_expression(labels: &Value, e: &Value) -> bool {
    let key = e["key"].as_str().unwrap_or_default();
    let got = labels.get(key).and_then(Value::as_str);
    let values: Vec<&str> = e["values"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    match e["operator"].as_str().unwrap_or_default() {
        "In" => got.is_some_and(|g| values.contains(&g)),
        "NotIn" => got.is_none_or(|g| !values.contains(&g)),
        "Exists" => got.is_some(),
        "DoesNotExist" => got.is_none(),
        "Gt" | "Lt" => {
            let (Some(g), Some(v)) =
                (got.and_then(|g| g.parse::<i64>().ok()), values.first().and_then(|v| v.parse::<i64>().ok()))
            else {
                return false;
            };
            if e["operator"] == "Gt" {
                g > v
            } else {
                g < v
            }
        }
        _ => false,
    }
}

/// One filter's verdict on one node: `Err(reason)` as Kubernetes words it.
type Filter = fn(&Value, &NodeInfo) -> Result<(), String>;

fn node_name(pod: &Value, n: &NodeInfo) -> Result<(), String> {
    match pod["spec"]["nodeName"].as_str() {
        Some(want) if !want.is_empty() && want != n.name => Err("node(s) didn't match the requested node name".into()),
        _ => Ok(()),
    }
}

fn unschedulable(pod: &Value, n: &NodeInfo) -> Result<(), String> {
    let taint = json!({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"});
    let tolerations = pod["spec"]["tolerations"].as_array().cloned().unwrap_or_default();
    if n.node["spec"]["unschedulable"] == true && !tolerates(&tolerations, &taint) {
        return Err("node(s) were unschedulable".into());
    }
    Ok(())
}

fn node_affinity(pod: &Value, n: &NodeInfo) -> Result<(), String> {
    let labels = &n.node["metadata"]["labels"];
    let selector_ok =
        pod["spec"]["nodeSelector"].as_object().is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let required =
        &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    let affinity_ok = required.as_array().filter(|t| !t.is_empty()).is_none_or(|terms| {
        terms
            .iter()
            .any(|t| t["matchExpressions"].as_array().into_iter().flatten().all(|e| match_expression(labels, e)))
    });
    if selector_ok && affinity_ok {
        Ok(())
    } else {
        Err("node(s) didn't match Pod's node affinity/selector".into())
    }
}

fn taints(pod: &Value, n: &NodeInfo) -> Result<(), String> {
    let tolerations = pod["spec"]["tolerations"].as_array().cloned().unwrap_or_default();
    for t in n.node["spec"]["taints"].as_array().into_iter().flatten() {
        let hard = matches!(t["effect"].as_str(), Some("NoSchedule" | "NoExecute"));
        if hard && !tolerates(&tolerations, t) {
            return Err(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                t["key"].as_str().unwrap_or_default(),
                t["value"].as_str().unwrap_or_default()
            ));
        }
    }
    Ok(())
}

fn resources(pod: &Value, n: &NodeInfo) -> Result<(), String> {
    let (c, m) = pod_requests(pod);
    if n.pods + 1 > n.alloc_pods {
        return Err("Too many pods".into());
    }
    if c > 0 && n.used_cpu + c > n.alloc_cpu {
        return Err("Insufficient cpu".into());
    }
    if m > 0 && n.used_mem + m > n.alloc_mem {
        return Err("Insufficient memory".into());
    }
    Ok(())
}

const FILTERS: &[Filter] = &[node_name, unschedulable, node_affinity, taints, resources];

/// Whether `pod` may run on `n` at all, resources aside (DaemonSets place
/// their pods on every such node).
pub fn eligible(pod: &Value, n: &NodeInfo) -> bool {
    [node_name as Filter, unschedulable, node_affinity, taints].iter().all(|f| f(pod, n).is_ok())
}

/// Least allocated plus balanced allocation, 0..=200.
fn score(pod: &Value, n: &NodeInfo) -> i64 {
    let (c, m) = non_zero(pod);
    let frac = |used: i64, alloc: i64| if alloc <= 0 { 1.0 } else { (used as f64 / alloc as f64).min(1.0) };
    let (fc, fm) = (frac(n.scored_cpu + c, n.alloc_cpu), frac(n.scored_mem + m, n.alloc_mem));
    let least = (1.0 - (fc + fm) / 2.0) * 100.0;
    let balanced = (1.0 - (fc - fm).abs()) * 100.0;
    (least + balanced) as i64
}

/// The chosen node, or why none fits.
pub fn schedule(pod: &Value, nodes: &[NodeInfo]) -> Result<usize, String> {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(i64, usize)> = None;
    for (i, n) in nodes.iter().enumerate() {
        match FILTERS.iter().try_for_each(|f| f(pod, n)) {
            Ok(()) => {
                let s = score(pod, n);
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, i));
                }
            }
            Err(r) => *reasons.entry(r).or_default() += 1,
        }
    }
    match best {
        Some((_, i)) => Ok(i),
        None => {
            let mut parts: Vec<(usize, String)> = reasons.into_iter().map(|(r, n)| (n, r)).collect();
            parts.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let list: Vec<String> = parts.iter().map(|(n, r)| format!("{n} {r}")).collect();
            Err(format!("0/{} nodes are available: {}.", nodes.len(), list.join(", ")))
        }
    }
}

/// Pods the scheduler is responsible for now.
pub fn is_pending(pod: &Value) -> bool {
    pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty)
        && pod["spec"]["schedulerName"].as_str().is_none_or(|s| s == "default-scheduler")
        && !pod["metadata"]["deletionTimestamp"].is_string()
        && !matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

pub struct Scheduler {
    pub api: Arc<ApiServer>,
    pub pods: Arc<Informer>,
    pub nodes: Arc<Informer>,
    /// Revision of the last binding, which the pod informer must reach
    /// before the next pass counts node usage.
    expect: Mutex<i64>,
    /// Last unschedulable message per pod, so it is written once.
    reported: Mutex<HashMap<String, String>>,
    metrics: super::metrics::ControllerMetrics,
}

pub const PASS_KEY: &str = "pass";

impl Scheduler {
    pub fn new(
        api: Arc<ApiServer>,
        pods: Arc<Informer>,
        nodes: Arc<Informer>,
        metrics: super::metrics::ControllerMetrics,
    ) -> Scheduler {
        Scheduler { api, pods, nodes, expect: Mutex::new(0), reported: Mutex::default(), metrics }
    }

    async fn pass(self: Arc<Self>) -> ReconcileResult {
        if self.pods.revision() < *self.expect.lock() {
            return Ok(Some(Duration::from_millis(10)));
        }
        let mut infos: Vec<NodeInfo> = self.nodes.list().iter().map(|n| NodeInfo::new(&n.object())).collect();
        let index: HashMap<String, usize> = infos.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect();
        let mut pending = Vec::new();
        for p in self.pods.list() {
            if p.node_name().is_empty() {
                if !p.deleting() {
                    pending.push(p);
                }
                continue;
            }
            let obj = p.object();
            if let Some(&i) = index.get(p.node_name()) {
                if super::replicaset::is_active(&obj) {
                    infos[i].add(&obj);
                }
            }
        }
        // Higher priority first, then oldest.
        let mut pending: Vec<(Value, i64)> =
            pending.iter().map(|p| (p.object(), p.mod_revision)).filter(|(p, _)| is_pending(p)).collect();
        pending.sort_by(|(a, _), (b, _)| {
            b["spec"]["priority"].as_i64().unwrap_or(0).cmp(&a["spec"]["priority"].as_i64().unwrap_or(0)).then_with(
                || a["metadata"]["creationTimestamp"].as_str().cmp(&b["metadata"]["creationTimestamp"].as_str()),
            )
        });
        let mut unschedulable = 0;
        self.metrics.pending.with_label_values(&["active"]).set(pending.len() as i64);
        for (pod, rev) in pending {
            let key = format!(
                "{}/{}",
                pod["metadata"]["namespace"].as_str().unwrap_or_default(),
                pod["metadata"]["name"].as_str().unwrap_or_default()
            );
            match schedule(&pod, &infos) {
                Ok(i) => {
                    let mut bound = pod.clone();
                    bound["spec"]["nodeName"] = json!(infos[i].name);
                    crate::api::admission::set_condition(
                        &mut bound,
                        "PodScheduled",
                        "True",
                        None,
                        &crate::api::handlers::now(),
                    );
                    match self.api.objects.update(self.pods.rt, bound, rev).await {
                        Ok(b) => {
                            infos[i].add(&pod);
                            self.metrics.attempts.with_label_values(&["scheduled"]).inc();
                            if let Some(created) = pod["metadata"]["creationTimestamp"]
                                .as_str()
                                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            {
                                let secs = (chrono::Utc::now() - created.with_timezone(&chrono::Utc)).num_milliseconds()
                                    as f64
                                    / 1000.0;
                                self.metrics.scheduling.observe(secs.max(0.0));
                            }
                            let r = crate::api::objects::revision_of(&b);
                            let mut e = self.expect.lock();
                            *e = (*e).max(r);
                            self.reported.lock().remove(&key);
                        }
                        Err(e) if e.code == 409 || e.code == 404 => {}
                        Err(e) => {
                            self.metrics.attempts.with_label_values(&["error"]).inc();
                            return Err(e.to_string());
                        }
                    }
                }
                Err(why) => {
                    unschedulable += 1;
                    self.metrics.attempts.with_label_values(&["unschedulable"]).inc();
                    if self.reported.lock().get(&key) == Some(&why) {
                        continue;
                    }
                    let mut obj = pod.clone();
                    crate::api::admission::set_condition(
                        &mut obj,
                        "PodScheduled",
                        "False",
                        Some("Unschedulable"),
                        &crate::api::handlers::now(),
                    );
                    if let Some(c) = obj["status"]["conditions"]
                        .as_array_mut()
                        .and_then(|c| c.iter_mut().find(|c| c["type"] == "PodScheduled"))
                    {
                        c["message"] = json!(why);
                    }
                    let found = Found { object: pod.clone(), mod_revision: rev };
                    if crate::api::internal::write_status(&self.api, self.pods.rt, &found, obj["status"].clone())
                        .await
                        .is_ok()
                    {
                        self.reported.lock().insert(key, why);
                    }
                }
            }
        }
        // Unschedulable pods are retried when nodes or pods change; and
        // periodically, in case what changed was not seen.
        self.metrics.pending.with_label_values(&["unschedulable"]).set(unschedulable);
        self.metrics.pending.with_label_values(&["active"]).set(0);
        Ok((unschedulable > 0).then(|| Duration::from_secs(5)))
    }
}

impl Reconciler for Scheduler {
    fn name(&self) -> &'static str {
        "scheduler"
    }
    fn reconcile(self: Arc<Self>, _key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.pass())
    }
    fn all_keys(&self) -> Vec<String> {
        vec![PASS_KEY.to_string()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: &str, extra: Value) -> NodeInfo {
        let mut n = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"allocatable": {"cpu": cpu, "memory": "4Gi", "pods": "110"}}});
        json_patch::merge(&mut n, &extra);
        NodeInfo::new(&n)
    }

    fn pod(cpu: &str) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": "100Mi"}}}]}})
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity(&json!("100m"), true), Some(100));
        assert_eq!(parse_quantity(&json!("2"), true), Some(2000));
        assert_eq!(parse_quantity(&json!("0.5"), true), Some(500));
        assert_eq!(parse_quantity(&json!("64Mi"), false), Some(64 << 20));
        assert_eq!(parse_quantity(&json!("1G"), false), Some(1_000_000_000));
        assert_eq!(parse_quantity(&json!(3), false), Some(3));
        assert_eq!(parse_quantity(&json!("lots"), false), None);
    }

    #[test]
    fn filters_explain_and_scoring_spreads() {
        let mut nodes = vec![
            node("small", "500m", json!({})),
            node("tainted", "8", json!({"spec": {"taints": [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]}})),
            node("cordoned", "8", json!({"spec": {"unschedulable": true}})),
            node("big", "4", json!({})),
            node("other", "4", json!({})),
        ];
        let i = schedule(&pod("1"), &nodes).unwrap();
        assert!(["big", "other"].contains(&nodes[i].name.as_str()));
        nodes[i].add(&pod("1"));
        let j = schedule(&pod("1"), &nodes).unwrap();
        assert_ne!(i, j, "least allocated spreads");
        let bare = json!({"metadata": {"name": "b"}, "spec": {"containers": [{"name": "c"}]}});
        let mut two = vec![node("a", "4", json!({})), node("b", "4", json!({}))];
        let first = schedule(&bare, &two).unwrap();
        two[first].add(&bare);
        assert_ne!(schedule(&bare, &two).unwrap(), first, "requestless pods spread too");
        let e = schedule(&pod("16"), &nodes).unwrap_err();
        assert_eq!(e, "0/5 nodes are available: 3 Insufficient cpu, 1 node(s) had untolerated taint {gpu: yes}, 1 node(s) were unschedulable.");
        let mut tolerant = pod("1");
        tolerant["spec"]["tolerations"] = json!([{"key": "gpu", "operator": "Exists"}]);
        tolerant["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": "tainted"});
        assert_eq!(nodes[schedule(&tolerant, &nodes).unwrap()].name, "tainted");
        tolerant["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["nowhere"]}]}]}}});
        assert!(schedule(&tolerant, &nodes).unwrap_err().contains("didn't match Pod's node affinity/selector"));
    }
}
