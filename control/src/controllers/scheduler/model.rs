//! What the scheduler knows of a pod and a node, parsed once from JSON when
//! the informer reports a change, so the per-node filter loop touches only
//! plain fields (no JSON lookups, no allocation).
//!
//! Parsing is forgiving: a malformed field is read as absent (admission
//! validated the object; the scheduler must never fail on one).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub use capstan_proto::k8s::selector::{NodeSelectorTerm, Op, Requirement};
use serde_json::Value;

/// A Kubernetes quantity: milli-units when `milli` (cpu in millicores),
/// else whole units rounded up (memory in bytes, pod counts).
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
    let req = |ct: &Value| {
        let r = &ct["resources"]["requests"];
        (parse_quantity(&r["cpu"], true).unwrap_or(0), parse_quantity(&r["memory"], false).unwrap_or(0))
    };
    let list = |name: &str| pod["spec"][name].as_array().into_iter().flatten().map(req);
    let (c, m) = list("containers").fold((0, 0), |(c, m), (x, y)| (c + x, m + y));
    let (ic, im) = list("initContainers").fold((0, 0), |(c, m), (x, y)| (c.max(x), m.max(y)));
    (c.max(ic), m.max(im))
}

/// The toleration (if any) that tolerates `taint`, Kubernetes' matching:
/// an empty key with Exists tolerates everything; otherwise the key must
/// match, Equal compares values, and an empty effect matches any effect.
pub fn toleration_for<'a>(tolerations: &'a [Value], taint: &Value) -> Option<&'a Value> {
    tolerations.iter().find(|t| {
        Toleration::parse(t).tolerates(&Taint {
            key: str_of(&taint["key"]),
            value: str_of(&taint["value"]),
            effect: str_of(&taint["effect"]),
        })
    })
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// An object's `metadata.labels`.
pub fn object_labels(obj: &Value) -> BTreeMap<String, String> {
    string_map(&obj["metadata"]["labels"])
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object().into_iter().flatten().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Toleration {
    key: String,
    exists: bool,
    value: String,
    effect: String,
}

impl Toleration {
    fn parse(t: &Value) -> Toleration {
        Toleration {
            key: str_of(&t["key"]),
            exists: t["operator"] == "Exists",
            value: str_of(&t["value"]),
            effect: str_of(&t["effect"]),
        }
    }

    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.key.is_empty() && self.exists {
            return self.effect.is_empty() || self.effect == taint.effect;
        }
        self.key == taint.key
            && (self.exists || self.value == taint.value)
            && (self.effect.is_empty() || self.effect == taint.effect)
    }
}

/// A metav1.LabelSelector. `None` fields in the API mean "matches nothing"
/// for affinity terms; an empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LabelSelector {
    pub reqs: Vec<Requirement>,
}

impl LabelSelector {
    pub fn parse(v: &Value) -> Option<LabelSelector> {
        if !v.is_object() {
            return None;
        }
        let mut reqs: Vec<Requirement> = string_map(&v["matchLabels"])
            .into_iter()
            .map(|(key, val)| Requirement { key, op: Op::In, values: vec![val] })
            .collect();
        reqs.extend(v["matchExpressions"].as_array().into_iter().flatten().map(Requirement::parse));
        Some(LabelSelector { reqs })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| r.matches(labels.get(&r.key).map(String::as_str)))
    }
}

/// Labels of every namespace, by name (the scheduler's Namespace informer).
pub type NamespaceLabels = HashMap<String, BTreeMap<String, String>>;

/// A pod (anti-)affinity term: pods matching `selector` in `namespaces`
/// or in the namespaces `namespace_selector` picks, within the same
/// `topology_key` domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodTerm {
    pub selector: LabelSelector,
    /// Listed namespaces; with no selector and no list, the pod's own.
    pub namespaces: Vec<String>,
    /// `namespaceSelector`: namespaces by their labels, besides the listed
    /// ones (`{}` picks every namespace).
    pub namespace_selector: Option<LabelSelector>,
    pub topology_key: String,
    pub weight: i64,
}

impl PodTerm {
    fn parse(t: &Value, own_ns: &str, weight: i64) -> Option<PodTerm> {
        // A term without a selector matches no pod.
        let selector = LabelSelector::parse(&t["labelSelector"])?;
        let mut namespaces = strings(&t["namespaces"]);
        let namespace_selector = LabelSelector::parse(&t["namespaceSelector"]);
        if namespaces.is_empty() && namespace_selector.is_none() {
            namespaces.push(own_ns.to_string());
        }
        Some(PodTerm { selector, namespaces, namespace_selector, topology_key: str_of(&t["topologyKey"]), weight })
    }

    /// Whether `pod` is one of the pods this term means; `ns` gives the
    /// labels the namespace selector is matched against (a namespace not
    /// (yet) known has none).
    pub fn matches(&self, pod: &PodInfo, ns: &NamespaceLabels) -> bool {
        let in_scope = self.namespaces.contains(&pod.namespace)
            || self.namespace_selector.as_ref().is_some_and(|sel| match ns.get(&pod.namespace) {
                Some(labels) => sel.matches(labels),
                None => sel.matches(&BTreeMap::new()),
            });
        in_scope && self.selector.matches(&pod.labels)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpreadConstraint {
    pub max_skew: i64,
    pub topology_key: String,
    /// `DoNotSchedule` (a filter) rather than `ScheduleAnyway` (a score).
    pub hard: bool,
    pub selector: LabelSelector,
    pub min_domains: i64,
    /// nodeAffinityPolicy Honor (default): only nodes the pod may use count.
    pub honor_affinity: bool,
    /// nodeTaintsPolicy Honor: only nodes whose taints the pod tolerates count.
    pub honor_taints: bool,
}

/// A pod as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub priority: i64,
    pub preempt_never: bool,
    pub created: String,
    /// Requests (millicores, bytes), and the same with Kubernetes' scoring
    /// defaults for requestless pods (100m, 200 MiB).
    pub cpu: i64,
    pub mem: i64,
    pub nz_cpu: i64,
    pub nz_mem: i64,
    pub node_name: String,
    pub nominated: String,
    pub node_selector: Vec<(String, String)>,
    /// Required node affinity: any term must match (None: no constraint).
    pub node_terms: Option<Vec<NodeSelectorTerm>>,
    pub preferred_nodes: Vec<(i64, NodeSelectorTerm)>,
    pub tolerations: Vec<Toleration>,
    pub affinity: Vec<PodTerm>,
    pub anti_affinity: Vec<PodTerm>,
    pub preferred_affinity: Vec<PodTerm>,
    pub preferred_anti_affinity: Vec<PodTerm>,
    pub spread: Vec<SpreadConstraint>,
    /// Succeeded or Failed: holds no resources.
    pub terminal: bool,
    pub deleting: bool,
    /// Ours to place: default scheduler, not terminal, not being deleted.
    pub ours: bool,
    /// PersistentVolumeClaims its volumes name (in its namespace).
    pub claims: Vec<String>,
}

/// The parts of a pod's JSON that [`PodInfo::parse`] reads, and nothing
/// else: managedFields, images, env, probes and most of status are skipped
/// by the parser instead of built into a `Value` and dropped again (which
/// was most of what a master spent on each pod change in the scheduler,
/// on every master: the followers keep their caches warm too).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct PodView {
    metadata: MetaView,
    spec: SpecView,
    status: StatusView,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct MetaView {
    namespace: Value,
    name: Value,
    labels: Value,
    creation_timestamp: Value,
    deletion_timestamp: Value,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct SpecView {
    containers: Option<Vec<ContainerView>>,
    init_containers: Option<Vec<ContainerView>>,
    affinity: Value,
    topology_spread_constraints: Value,
    node_name: Value,
    scheduler_name: Value,
    priority: Value,
    preemption_policy: Value,
    node_selector: Value,
    tolerations: Value,
    volumes: Option<Vec<VolumeView>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ContainerView {
    resources: ResourcesView,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ResourcesView {
    requests: Value,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct VolumeView {
    name: Value,
    persistent_volume_claim: Value,
    ephemeral: Value,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct StatusView {
    phase: Value,
    nominated_node_name: Value,
}

/// A JSON object of `fields`, moved in (`json!` would copy each `Value`
/// through serialization).
fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

impl PodView {
    /// The pod with only these parts, for [`PodInfo::parse`].
    fn into_value(self) -> Value {
        let (m, sp, st) = (self.metadata, self.spec, self.status);
        let containers = |c: Option<Vec<ContainerView>>| {
            c.map(|c| {
                c.into_iter().map(|c| object([("resources", object([("requests", c.resources.requests)]))])).collect()
            })
            .unwrap_or(Value::Null)
        };
        let volumes = sp.volumes.map(|v| {
            v.into_iter()
                .map(|v| {
                    object([
                        ("name", v.name),
                        ("persistentVolumeClaim", v.persistent_volume_claim),
                        ("ephemeral", v.ephemeral),
                    ])
                })
                .collect::<Value>()
        });
        object([
            (
                "metadata",
                object([
                    ("namespace", m.namespace),
                    ("name", m.name),
                    ("labels", m.labels),
                    ("creationTimestamp", m.creation_timestamp),
                    ("deletionTimestamp", m.deletion_timestamp),
                ]),
            ),
            (
                "spec",
                object([
                    ("containers", containers(sp.containers)),
                    ("initContainers", containers(sp.init_containers)),
                    ("affinity", sp.affinity),
                    ("topologySpreadConstraints", sp.topology_spread_constraints),
                    ("nodeName", sp.node_name),
                    ("schedulerName", sp.scheduler_name),
                    ("priority", sp.priority),
                    ("preemptionPolicy", sp.preemption_policy),
                    ("nodeSelector", sp.node_selector),
                    ("tolerations", sp.tolerations),
                    ("volumes", volumes.unwrap_or(Value::Null)),
                ]),
            ),
            ("status", object([("phase", st.phase), ("nominatedNodeName", st.nominated_node_name)])),
        ])
    }
}

impl PodInfo {
    /// [`PodInfo::parse`] of a pod's JSON, reading only what it needs.
    /// JSON of an unexpected shape (never stored: admission checked it)
    /// is parsed whole, so the result is the same either way.
    pub fn from_json(json: &[u8]) -> PodInfo {
        match serde_json::from_slice::<PodView>(json) {
            Ok(view) => PodInfo::parse(&view.into_value()),
            Err(_) => PodInfo::parse(&serde_json::from_slice(json).unwrap_or(Value::Null)),
        }
    }

    pub fn parse(pod: &Value) -> PodInfo {
        let meta = &pod["metadata"];
        let spec = &pod["spec"];
        let namespace = str_of(&meta["namespace"]);
        let name = str_of(&meta["name"]);
        let (cpu, mem) = pod_requests(pod);
        let labels = string_map(&meta["labels"]);
        let na = &spec["affinity"]["nodeAffinity"];
        let node_terms = na["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            .as_array()
            .map(|t| t.iter().map(NodeSelectorTerm::parse).collect());
        let preferred_nodes = na["preferredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| (p["weight"].as_i64().unwrap_or(0), NodeSelectorTerm::parse(&p["preference"])))
            .collect();
        let terms = |kind: &str, required: bool| -> Vec<PodTerm> {
            let a = &spec["affinity"][kind];
            if required {
                a["requiredDuringSchedulingIgnoredDuringExecution"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| PodTerm::parse(t, &namespace, 0))
                    .collect()
            } else {
                a["preferredDuringSchedulingIgnoredDuringExecution"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| {
                        PodTerm::parse(&t["podAffinityTerm"], &namespace, t["weight"].as_i64().unwrap_or(0))
                    })
                    .collect()
            }
        };
        let (affinity, anti_affinity) = (terms("podAffinity", true), terms("podAntiAffinity", true));
        let (preferred_affinity, preferred_anti_affinity) =
            (terms("podAffinity", false), terms("podAntiAffinity", false));
        let spread = spec["topologySpreadConstraints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let mut selector = LabelSelector::parse(&c["labelSelector"]).unwrap_or_default();
                // matchLabelKeys: the pod's own values for those keys join the selector.
                for k in strings(&c["matchLabelKeys"]) {
                    if let Some(v) = labels.get(&k) {
                        selector.reqs.push(Requirement { key: k, op: Op::In, values: vec![v.clone()] });
                    }
                }
                SpreadConstraint {
                    max_skew: c["maxSkew"].as_i64().unwrap_or(1).max(1),
                    topology_key: str_of(&c["topologyKey"]),
                    hard: c["whenUnsatisfiable"].as_str().unwrap_or("DoNotSchedule") == "DoNotSchedule",
                    selector,
                    min_domains: c["minDomains"].as_i64().unwrap_or(1).max(1),
                    honor_affinity: c["nodeAffinityPolicy"].as_str().unwrap_or("Honor") == "Honor",
                    honor_taints: c["nodeTaintsPolicy"] == "Honor",
                }
            })
            .collect();
        let terminal = matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
        let deleting = meta["deletionTimestamp"].is_string();
        let node_name = str_of(&spec["nodeName"]);
        let ours = spec["schedulerName"].as_str().is_none_or(|s| s.is_empty() || s == "default-scheduler")
            && !terminal
            && !deleting;
        PodInfo {
            key: format!("{namespace}/{name}"),
            namespace,
            name,
            priority: spec["priority"].as_i64().unwrap_or(0),
            preempt_never: spec["preemptionPolicy"] == "Never",
            created: str_of(&meta["creationTimestamp"]),
            cpu,
            mem,
            nz_cpu: if cpu == 0 { 100 } else { cpu },
            nz_mem: if mem == 0 { 200 << 20 } else { mem },
            node_name,
            nominated: str_of(&pod["status"]["nominatedNodeName"]),
            node_selector: string_map(&spec["nodeSelector"]).into_iter().collect(),
            node_terms,
            preferred_nodes,
            tolerations: spec["tolerations"].as_array().into_iter().flatten().map(Toleration::parse).collect(),
            affinity,
            anti_affinity,
            preferred_affinity,
            preferred_anti_affinity,
            spread,
            labels,
            terminal,
            deleting,
            ours,
            claims: crate::controllers::volume::pod_claims(pod),
        }
    }

    /// Waiting for this scheduler to place it.
    pub fn pending(&self) -> bool {
        self.node_name.is_empty() && self.ours
    }

    pub fn tolerates(&self, taint: &Taint) -> bool {
        self.tolerations.iter().any(|t| t.tolerates(taint))
    }

    /// Whether what the scheduler decides on differs (so an unschedulable
    /// pod deserves another attempt).
    pub fn same_placement_needs(&self, o: &PodInfo) -> bool {
        self.labels == o.labels
            && self.cpu == o.cpu
            && self.mem == o.mem
            && self.priority == o.priority
            && self.node_selector == o.node_selector
            && self.node_terms == o.node_terms
            && self.preferred_nodes == o.preferred_nodes
            && self.tolerations == o.tolerations
            && self.affinity == o.affinity
            && self.anti_affinity == o.anti_affinity
            && self.spread == o.spread
            && self.claims == o.claims
    }
}

/// A node as the scheduler sees it, with what is placed on it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    /// Its agent announced a directory for local-path volumes.
    pub local_path: bool,
    pub alloc_cpu: i64,
    pub alloc_mem: i64,
    pub alloc_pods: i64,
    pub used_cpu: i64,
    pub used_mem: i64,
    /// Usage counting requestless pods as 100m / 200 MiB (scoring only).
    pub nz_cpu: i64,
    pub nz_mem: i64,
    pub pods: Vec<Arc<PodInfo>>,
}

impl NodeInfo {
    pub fn new(node: &Value) -> NodeInfo {
        let a = if node["status"]["allocatable"].is_object() {
            &node["status"]["allocatable"]
        } else {
            &node["status"]["capacity"]
        };
        NodeInfo {
            name: str_of(&node["metadata"]["name"]),
            labels: string_map(&node["metadata"]["labels"]),
            taints: node["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| Taint { key: str_of(&t["key"]), value: str_of(&t["value"]), effect: str_of(&t["effect"]) })
                .collect(),
            unschedulable: node["spec"]["unschedulable"] == true,
            local_path: node["metadata"]["annotations"][crate::controllers::volume::LOCAL_PATH_ROOT].is_string(),
            alloc_cpu: parse_quantity(&a["cpu"], true).unwrap_or(0),
            alloc_mem: parse_quantity(&a["memory"], false).unwrap_or(0),
            alloc_pods: parse_quantity(&a["pods"], false).unwrap_or(110),
            used_cpu: 0,
            used_mem: 0,
            nz_cpu: 0,
            nz_mem: 0,
            pods: Vec::new(),
        }
    }

    /// The node's new description, keeping what is placed on it.
    pub fn update_from(&mut self, fresh: NodeInfo) {
        let pods = std::mem::take(&mut self.pods);
        let (used_cpu, used_mem, nz_cpu, nz_mem) = (self.used_cpu, self.used_mem, self.nz_cpu, self.nz_mem);
        *self = NodeInfo { pods, used_cpu, used_mem, nz_cpu, nz_mem, ..fresh };
    }

    pub fn add(&mut self, pod: Arc<PodInfo>) {
        self.used_cpu += pod.cpu;
        self.used_mem += pod.mem;
        self.nz_cpu += pod.nz_cpu;
        self.nz_mem += pod.nz_mem;
        self.pods.push(pod);
    }

    pub fn remove(&mut self, key: &str) -> Option<Arc<PodInfo>> {
        let i = self.pods.iter().position(|p| p.key == key)?;
        let pod = self.pods.swap_remove(i);
        self.used_cpu -= pod.cpu;
        self.used_mem -= pod.mem;
        self.nz_cpu -= pod.nz_cpu;
        self.nz_mem -= pod.nz_mem;
        Some(pod)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// The taint the node lifecycle and `kubectl cordon` imply.
pub fn unschedulable_taint() -> Taint {
    Taint { key: "node.kubernetes.io/unschedulable".into(), value: String::new(), effect: "NoSchedule".into() }
}

#[cfg(test)]
pub fn pod(v: Value) -> Arc<PodInfo> {
    Arc::new(PodInfo::parse(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn tolerations_match_like_kubernetes() {
        let t = |k: &str, v: &str, e: &str| Taint { key: k.into(), value: v.into(), effect: e.into() };
        let tol = |v: Value| Toleration::parse(&v);
        assert!(tol(json!({"operator": "Exists"})).tolerates(&t("a", "b", "NoSchedule")));
        assert!(!tol(json!({"operator": "Exists", "effect": "NoExecute"})).tolerates(&t("a", "b", "NoSchedule")));
        assert!(tol(json!({"key": "a", "operator": "Exists"})).tolerates(&t("a", "x", "NoExecute")));
        assert!(tol(json!({"key": "a", "value": "b"})).tolerates(&t("a", "b", "NoSchedule")));
        assert!(!tol(json!({"key": "a", "value": "c"})).tolerates(&t("a", "b", "NoSchedule")));
        assert!(!tol(json!({"key": "z", "operator": "Exists"})).tolerates(&t("a", "b", "NoSchedule")));
        let tols = vec![json!({"key": "a", "operator": "Exists", "tolerationSeconds": 5})];
        assert_eq!(toleration_for(&tols, &json!({"key": "a", "effect": "NoExecute"})).unwrap()["tolerationSeconds"], 5);
    }

    #[test]
    fn selectors_and_terms() {
        let sel = LabelSelector::parse(&json!({"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}))
        .unwrap();
        let l = |v: Value| string_map(&v);
        assert!(sel.matches(&l(json!({"app": "web"}))));
        assert!(!sel.matches(&l(json!({"app": "web", "tier": "db"}))));
        assert!(!sel.matches(&l(json!({"app": "api"}))));
        assert!(LabelSelector::parse(&json!({})).unwrap().matches(&l(json!({"x": "y"}))));
        assert!(LabelSelector::parse(&Value::Null).is_none());
        let bad = Requirement::parse(&json!({"key": "a", "operator": "Sometimes", "values": ["b"]}));
        assert!(!bad.matches(Some("b")));

        let p = PodInfo::parse(&json!({"metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web"}},
            "spec": {"affinity": {"podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "zone"}, {"topologyKey": "x"}],
                "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 7, "podAffinityTerm": {"labelSelector": {}, "namespaceSelector": {}, "topologyKey": "h"}}]}},
                "containers": [{"name": "c", "resources": {"requests": {"cpu": "250m"}}}]}}));
        assert_eq!(p.anti_affinity.len(), 1, "a term without selector matches nothing and is dropped");
        assert_eq!(p.anti_affinity[0].namespaces, vec!["ns".to_string()]);
        assert!(p.anti_affinity[0].matches(&p, &NamespaceLabels::new()));
        assert_eq!(p.preferred_anti_affinity[0].weight, 7);
        assert_eq!(p.preferred_anti_affinity[0].namespace_selector, Some(LabelSelector::default()));
        assert_eq!((p.cpu, p.nz_cpu, p.mem, p.nz_mem), (250, 250, 0, 200 << 20));
        assert!(p.pending());
    }

    /// Pods using every field the scheduler reads, and some odd shapes:
    /// the pruned parse must agree with the whole one field for field.
    #[test]
    fn parsing_only_what_is_read_gives_the_same_pod() {
        let term = json!({"labelSelector": {"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]},
            "namespaces": ["x"], "namespaceSelector": {"matchLabels": {"team": "t"}}, "topologyKey": "zone"});
        let full = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "d", "uid": "u", "labels": {"app": "web", "v": "1"},
                "creationTimestamp": "2026-11-27T00:00:00Z", "deletionTimestamp": "2026-11-27T00:01:00Z",
                "annotations": {"a": "b"},
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:containers": {}}}}]},
            "spec": {
                "containers": [
                    {"name": "a", "image": "busybox", "env": [{"name": "X", "value": "1"}],
                        "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "1"}}},
                    {"name": "b", "image": "busybox", "resources": {}},
                    {"name": "c", "image": "busybox"}],
                "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]}]},
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 3, "preference": {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}}]},
                    "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term],
                        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 5, "podAffinityTerm": term}]},
                    "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term],
                        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 9, "podAffinityTerm": term}]}},
                "topologySpreadConstraints": [{"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"app": "web"}}, "matchLabelKeys": ["v"], "minDomains": 3,
                    "nodeAffinityPolicy": "Ignore", "nodeTaintsPolicy": "Honor"}],
                "nodeName": "", "schedulerName": "default-scheduler", "priority": 1000, "preemptionPolicy": "Never",
                "nodeSelector": {"disk": "ssd"},
                "tolerations": [{"key": "k", "operator": "Equal", "value": "v", "effect": "NoExecute", "tolerationSeconds": 30}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-0"}},
                    {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
                    {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}]},
            "status": {"phase": "Pending", "nominatedNodeName": "n2", "conditions": [{"type": "PodScheduled"}]},
        });
        let pods = [
            full,
            json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": [{"name": "c"}]}}),
            json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1", "schedulerName": "other"},
                "status": {"phase": "Succeeded"}}),
            json!({"metadata": {"name": "p"}}),
            json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": null, "volumes": null}}),
            // Shapes admission never stores: parsed whole, same answer.
            json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": [null]}}),
            json!({"metadata": null, "spec": "x"}),
            json!([1, 2]),
        ];
        for pod in pods {
            let bytes = serde_json::to_vec(&pod).unwrap();
            assert_eq!(PodInfo::from_json(&bytes), PodInfo::parse(&pod), "{pod}");
        }
        assert_eq!(PodInfo::from_json(b"{not json"), PodInfo::parse(&Value::Null));
    }
}
