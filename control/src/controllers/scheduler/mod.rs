//! The scheduler: binds pending pods to nodes, as kube-scheduler does.
//!
//! - `model.rs`: pods and nodes parsed once per change into plain fields.
//! - `cache.rs`: nodes and every pod holding a place, updated
//!   incrementally; pods whose binding is in flight are *assumed* there.
//! - `queue.rs`: active (priority heap), backoff and unschedulable queues.
//! - `framework.rs`: pre-filter, filters with Kubernetes' reasons, scores,
//!   node sampling, preemption — pure, tested without sockets.
//! - `volumes.rs`: what pods' PersistentVolumeClaims need of a node; the
//!   node chosen for a claim waiting for its first consumer is written on
//!   the claim before the pod is bound.
//! - `binding.rs`: a binding edited into the stored pod's JSON text.
//!
//! This file is the shell. A feed task applies informer changes to the
//! cache and queue on every master (warm on failover). On the lease
//! holder, a pass pops pods one at a time, runs the framework on the
//! cache, assumes the pod onto the chosen node and hands the binding to a
//! task of its own — up to [`BINDS_IN_FLIGHT`] at once, so Raft commits
//! overlap while the next pod is scheduled. A failed binding forgets the
//! assumption and retries the pod after its backoff. A pod that fits
//! nowhere gets `PodScheduled=False` with Kubernetes' message, and, if
//! it may, preempts lower-priority pods (they are deleted gracefully and
//! the pod is nominated to their node).

mod binding;
pub mod cache;
pub mod framework;
pub mod model;
pub mod queue;
pub mod volumes;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::Addr;
use capstan_proto::k8s::stored::StoredObject;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Semaphore;

pub use self::framework::eligible;
pub use self::model::{toleration_for, NodeInfo, PodInfo};

use self::cache::Cache;
use self::queue::SchedulingQueue;
use super::events::{EventRecorder, EventType, ObjectRef};
use super::informer::{Cached, Change, Informer};
use super::runtime::{ControllerActor, Enqueue, ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::ApiServer;

pub const PASS_KEY: &str = "pass";

/// Bindings (Raft writes) in flight at once.
pub const BINDS_IN_FLIGHT: usize = 256;

/// What the feed keeps about a pending pod: its parsed form and the cached
/// object the binding is written against.
type Pending = (Arc<PodInfo>, Arc<Cached>);

#[derive(Default)]
struct State {
    cache: Cache,
    queue: SchedulingQueue,
    pending: HashMap<String, Pending>,
    /// Where the next pod's node search starts (Kubernetes rotates it).
    next_start: usize,
    /// The unschedulable message last written per pod, so it is written once.
    reported: HashMap<String, String>,
    /// Bindings being written: the pod's text as the binding stores it and
    /// the pod as that text parses ([`binding::bound_info`]), so the change
    /// a binding makes is not parsed again (half of the feed's parsing on
    /// the lease holder).
    writing: HashMap<String, (Vec<u8>, Arc<PodInfo>)>,
}

impl State {
    /// Applies a pod change; returns whether pods became active.
    fn on_pod(&mut self, key: &str, new: Option<&Arc<Cached>>, now: Instant) -> bool {
        let Some(c) = new else {
            self.writing.remove(key);
            self.cache.unnominate(key);
            self.pending.remove(key);
            self.queue.remove(key);
            self.reported.remove(key);
            // Room freed: every unschedulable pod may fit now.
            if self.cache.remove_pod(key) {
                self.queue.move_unschedulable(now, |_| true);
            }
            return true;
        };
        let json = c.archived().json.as_slice();
        let info = match self.writing.remove(key) {
            Some((text, info)) if text == json => info,
            _ => Arc::new(PodInfo::from_json(json)),
        };
        if info.pending() {
            self.cache.nominate(&info);
        } else {
            self.cache.unnominate(key);
        }
        if !info.node_name.is_empty() {
            self.pending.remove(key);
            self.queue.remove(key);
            self.reported.remove(key);
            if info.terminal {
                if self.cache.remove_pod(key) {
                    self.queue.move_unschedulable(now, |_| true);
                }
            } else {
                let node = info.node_name.clone();
                self.cache.place(info, &node, false);
                // A new neighbour only helps pods that want one.
                let pending = &self.pending;
                self.queue.move_unschedulable(now, |k| pending.get(k).is_some_and(|(p, _)| !p.affinity.is_empty()));
            }
            return false;
        }
        if !info.pending() {
            self.pending.remove(key);
            self.queue.remove(key);
            if !self.cache.is_assumed(key) {
                self.cache.remove_pod(key);
            }
            return false;
        }
        let changed = self.pending.get(key).is_none_or(|(old, _)| !old.same_placement_needs(&info));
        let priority = info.priority;
        self.pending.insert(key.to_string(), (info, c.clone()));
        // A pod whose binding is in flight stays where it was assumed.
        if !self.cache.is_assumed(key) {
            self.queue.add(key, priority, changed, now);
        }
        true
    }

    /// Applies a node change; returns whether pods became active.
    fn on_node(&mut self, name: &str, new: Option<&Arc<Cached>>, now: Instant) -> bool {
        match new {
            None => self.cache.remove_node(name),
            Some(c) => {
                let fresh = NodeInfo::new(&c.object());
                // Heartbeats change only conditions: not a reason to retry.
                let same = self.cache.node(name).is_some_and(|i| {
                    let n = &self.cache.nodes[i];
                    n.labels == fresh.labels
                        && n.taints == fresh.taints
                        && n.unschedulable == fresh.unschedulable
                        && (n.alloc_cpu, n.alloc_mem, n.alloc_pods)
                            == (fresh.alloc_cpu, fresh.alloc_mem, fresh.alloc_pods)
                });
                self.cache.upsert_node(fresh);
                if same {
                    return false;
                }
            }
        }
        self.queue.move_unschedulable(now, |_| true);
        true
    }
}

impl State {
    /// Applies a namespace change; returns whether pods became active (a
    /// namespace selector in some term may now pick different pods).
    fn on_namespace(&mut self, name: &str, new: Option<&Arc<Cached>>, now: Instant) -> bool {
        let labels = new.map(|c| model::object_labels(&c.object()));
        if !self.cache.set_namespace(name, labels) {
            return false;
        }
        let pending = &self.pending;
        let selects = |p: &PodInfo| p.affinity.iter().chain(&p.anti_affinity).any(|t| t.namespace_selector.is_some());
        self.queue.move_unschedulable(now, |k| pending.get(k).is_some_and(|(p, _)| selects(p)));
        true
    }
}

impl State {
    /// Pods with claims may fit now that a claim, volume or class changed.
    fn retry_claimants(&mut self, now: Instant) -> bool {
        let pending = &self.pending;
        self.queue.move_unschedulable(now, |k| pending.get(k).is_some_and(|(p, _)| !p.claims.is_empty()));
        true
    }

    fn on_claim(&mut self, key: &str, new: Option<&Arc<Cached>>, now: Instant) -> bool {
        self.cache.volumes.set_claim(key, new.map(|c| c.object()));
        self.retry_claimants(now)
    }

    fn on_volume(&mut self, key: &str, new: Option<&Arc<Cached>>, now: Instant) -> bool {
        self.cache.volumes.set_volume(key, new.map(|c| c.object()));
        self.retry_claimants(now)
    }

    fn on_class(&mut self, key: &str, new: Option<&Arc<Cached>>, now: Instant) -> bool {
        self.cache.volumes.set_class(key, new.map(|c| c.object()));
        self.retry_claimants(now)
    }
}

type OnChange = fn(&mut State, &str, Option<&Arc<Cached>>, Instant) -> bool;

/// One scheduling decision, carried out outside the state lock.
enum Step {
    /// `claims`: keys of claims to write the chosen node on first.
    Bind {
        key: String,
        pending: Pending,
        node: String,
        claims: Vec<String>,
    },
    Unschedulable {
        pending: Pending,
        why: String,
        preempt: Option<(String, Vec<String>)>,
    },
}

pub struct Scheduler {
    pub api: Arc<ApiServer>,
    pub pods: Arc<Informer>,
    pub nodes: Arc<Informer>,
    /// PodDisruptionBudgets, which preemption weighs.
    pub budgets: Arc<Informer>,
    /// Namespaces, whose labels namespace selectors in pod affinity match.
    pub namespaces: Arc<Informer>,
    /// PersistentVolumeClaims, PersistentVolumes and StorageClasses.
    pub storage: [Arc<Informer>; 3],
    metrics: super::metrics::ControllerMetrics,
    pub recorder: EventRecorder,
    state: Mutex<State>,
    /// The store's runtime: bindings run there, not on the actor thread.
    runtime: tokio::runtime::Handle,
    binds: Arc<Semaphore>,
    actor: OnceLock<Addr<ControllerActor>>,
}

impl Scheduler {
    /// Call on the store's runtime.
    pub fn new(
        api: Arc<ApiServer>,
        inf: &super::informer::Informers,
        metrics: super::metrics::ControllerMetrics,
        recorder: EventRecorder,
    ) -> Scheduler {
        Scheduler {
            api,
            pods: inf.get("Pod").clone(),
            nodes: inf.get("Node").clone(),
            budgets: inf.get("PodDisruptionBudget").clone(),
            namespaces: inf.get("Namespace").clone(),
            storage: ["PersistentVolumeClaim", "PersistentVolume", "StorageClass"].map(|k| inf.get(k).clone()),
            metrics,
            recorder,
            state: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
            binds: Arc::new(Semaphore::new(BINDS_IN_FLIGHT)),
            actor: OnceLock::new(),
        }
    }

    /// The disruption budgets now (decoded: preemption is rare).
    fn budgets(&self) -> Vec<framework::Budget> {
        self.budgets.list().iter().filter_map(|b| framework::Budget::parse(&b.object())).collect()
    }

    fn wake(&self) {
        if let Some(a) = self.actor.get() {
            a.do_send(Enqueue(PASS_KEY.to_string()));
        }
    }

    /// Starts the feed: informer changes into the cache and queue, and a
    /// pass on the actor when pods become active.
    pub fn feed(self: Arc<Self>, actor: Addr<ControllerActor>) {
        let _ = self.actor.set(actor);
        let mut pods = self.pods.subscribe();
        let mut nodes = self.nodes.subscribe();
        let mut namespaces = self.namespaces.subscribe();
        let [mut claims, mut volumes, mut classes] = [0, 1, 2].map(|i| self.storage[i].subscribe());
        tokio::spawn(async move {
            // Changes from before the subscription are in these lists; ones
            // after are in the channels (applying one twice is harmless).
            {
                let now = Instant::now();
                let mut st = self.state.lock();
                for ns in self.namespaces.list() {
                    st.on_namespace(&ns.key, Some(&ns), now);
                }
                let ons: [OnChange; 3] = [State::on_claim, State::on_volume, State::on_class];
                for (inf, on) in self.storage.iter().zip(ons) {
                    for c in inf.list() {
                        on(&mut st, &c.key, Some(&c), now);
                    }
                }
                for n in self.nodes.list() {
                    st.on_node(&n.key, Some(&n), now);
                }
                for p in self.pods.list() {
                    st.on_pod(&p.key, Some(&p), now);
                }
            }
            self.wake();
            loop {
                let woke = tokio::select! {
                    Some(c) = pods.recv() => self.apply(c, &mut pods, State::on_pod),
                    Some(c) = nodes.recv() => self.apply(c, &mut nodes, State::on_node),
                    Some(c) = namespaces.recv() => self.apply(c, &mut namespaces, State::on_namespace),
                    Some(c) = claims.recv() => self.apply(c, &mut claims, State::on_claim),
                    Some(c) = volumes.recv() => self.apply(c, &mut volumes, State::on_volume),
                    Some(c) = classes.recv() => self.apply(c, &mut classes, State::on_class),
                    else => return,
                };
                if woke {
                    self.wake();
                }
            }
        });
    }

    /// Applies one change and what else is already waiting in `rx` (up
    /// to a bound), under one lock.
    fn apply(&self, first: Change, rx: &mut UnboundedReceiver<Change>, on: OnChange) -> bool {
        let now = Instant::now();
        let mut st = self.state.lock();
        let mut woke = on(&mut st, &first.key, first.new.as_ref(), now);
        for _ in 0..1024 {
            let Ok(c) = rx.try_recv() else { break };
            woke |= on(&mut st, &c.key, c.new.as_ref(), now);
        }
        woke
    }

    async fn pass(self: Arc<Self>) -> ReconcileResult {
        let mut scheduled = 0u32;
        loop {
            let Ok(permit) = self.binds.clone().acquire_owned().await else { break };
            let now = Instant::now();
            let step = {
                let mut st = self.state.lock();
                let st = &mut *st;
                st.queue.retry_stale(now);
                let Some(key) = st.queue.pop(now) else { break };
                let Some(pending) = st.pending.get(&key).cloned() else {
                    st.queue.remove(&key);
                    continue;
                };
                let timer = self.metrics.algorithm.start_timer();
                let decision = framework::schedule(&pending.0, &st.cache, st.next_start);
                let step = match decision {
                    Ok(chosen) => {
                        st.next_start = chosen.next_start;
                        let node = st.cache.nodes[chosen.node].name.clone();
                        st.cache.place(pending.0.clone(), &node, true);
                        let claims = st.cache.volumes.assume(&pending.0, &node);
                        Step::Bind { key, pending, node, claims }
                    }
                    Err(fit) => {
                        st.queue.unschedulable(&key, now);
                        let info = &pending.0;
                        // Budgets are decoded only when preemption is possible.
                        let preempt = framework::may_preempt(info, &st.cache)
                            .then(|| framework::preempt(info, &st.cache, &self.budgets()))
                            .flatten()
                            .map(|p| {
                                let victims = p.victims.iter().map(|v| v.key.clone()).collect();
                                (st.cache.nodes[p.node].name.clone(), victims)
                            });
                        Step::Unschedulable { pending, why: fit.to_string(), preempt }
                    }
                };
                timer.observe_duration();
                step
            };
            match step {
                Step::Bind { key, pending, node, claims } => {
                    let me = self.clone();
                    self.runtime.spawn(async move {
                        me.bind(key, pending, node, claims).await;
                        drop(permit);
                    });
                }
                Step::Unschedulable { pending, why, preempt } => {
                    self.metrics.attempts.with_label_values(&["unschedulable"]).inc();
                    let me = self.clone();
                    self.runtime.spawn(async move {
                        me.report(pending, why, preempt).await;
                        drop(permit);
                    });
                }
            }
            scheduled += 1;
            // Other controllers share this actor thread.
            if scheduled.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
        let st = self.state.lock();
        let d = st.queue.depths();
        for (q, n) in [("active", d.active), ("backoff", d.backoff), ("unschedulable", d.unschedulable)] {
            self.metrics.pending.with_label_values(&[q]).set(n as i64);
        }
        Ok(st.queue.next_due().map(|at| at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))
    }

    /// Writes the binding: the pod, still unbound at the revision it was
    /// scheduled from (or re-read once if it changed meanwhile), gets its
    /// node and `PodScheduled=True`.
    async fn bind(&self, key: String, (info, cached): Pending, node: String, claims: Vec<String>) {
        // The Event is about the pod as it was scheduled.
        let a = cached.archived();
        let mut involved = ObjectRef {
            kind: "Pod".into(),
            api_version: "v1".into(),
            namespace: a.namespace.to_string(),
            name: a.name.to_string(),
            uid: a.uid.to_string(),
            resource_version: cached.mod_revision.to_string(),
            field_path: String::new(),
        };
        let mut result = self.select_node(&claims, &node).await;
        if result.is_err() {
            self.state.lock().cache.volumes.forget(&claims);
        } else {
            result = self.write_stored_binding(&info, &cached, &node).await;
        }
        if matches!(&result, Err(e) if e.code == 409) {
            let (ns, name) = (info.namespace.as_str(), info.name.as_str());
            if let Ok(Some(fresh)) = self.api.objects.get(self.pods.rt, Some(ns), name).await {
                let same_pod = fresh.object["metadata"]["uid"] == cached.uid();
                let unbound = fresh.object["spec"]["nodeName"].as_str().is_none_or(str::is_empty);
                if same_pod && unbound {
                    involved = ObjectRef::of(&fresh.object);
                    result = self.write_binding(fresh, &node).await;
                }
            }
        }
        match result {
            Ok(_) => {
                let msg = format!("Successfully assigned {}/{} to {node}", info.namespace, info.name);
                self.recorder.record(involved, String::new(), EventType::Normal, "Scheduled", msg);
                self.metrics.attempts.with_label_values(&["scheduled"]).inc();
                if let Ok(created) = chrono::DateTime::parse_from_rfc3339(&info.created) {
                    let ms = (chrono::Utc::now() - created.with_timezone(&chrono::Utc)).num_milliseconds();
                    self.metrics.scheduling.observe((ms as f64 / 1000.0).max(0.0));
                }
            }
            Err(e) => {
                if e.code != 404 && e.code != 409 {
                    self.metrics.attempts.with_label_values(&["error"]).inc();
                    tracing::warn!(pod = key, node, "binding failed: {e}");
                }
                let mut st = self.state.lock();
                if st.cache.is_assumed(&key) {
                    st.cache.remove_pod(&key);
                }
                if st.pending.contains_key(&key) {
                    st.queue.failed(&key, Instant::now());
                }
                drop(st);
                self.wake();
            }
        }
    }

    /// Writes the chosen node on claims waiting for their first consumer,
    /// so the volume controller binds or provisions a volume there.
    async fn select_node(&self, claims: &[String], node: &str) -> Result<Value, crate::api::status::ApiError> {
        let rt = self.storage[0].rt;
        for key in claims {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            let Some(cur) = self.api.objects.get(rt, Some(ns), name).await? else {
                return Err(crate::api::status::ApiError::not_found("", rt.plural, name));
            };
            let mut claim = cur.object.clone();
            if claim["metadata"]["annotations"][super::volume::SELECTED_NODE].as_str().is_some_and(|n| !n.is_empty()) {
                continue;
            }
            claim["metadata"]["annotations"][super::volume::SELECTED_NODE] = json!(node);
            crate::api::internal::write(&self.api, rt, Some(&cur), claim, "default-scheduler").await?;
        }
        Ok(Value::Null)
    }

    /// [`Scheduler::write_binding`] edited into the stored pod's text (see
    /// `binding.rs`), falling back to the decoded pod.
    async fn write_stored_binding(
        &self,
        info: &Arc<PodInfo>,
        cached: &Cached,
        node: &str,
    ) -> Result<Value, crate::api::status::ApiError> {
        let now = crate::api::handlers::now();
        let a = cached.archived();
        let Some(json) = binding::bound_json(&a.json, node, &now) else {
            return self.write_binding(cached.found(), node).await;
        };
        let mut stored =
            StoredObject::from_archived(a).map_err(|e| crate::api::status::ApiError::internal(e.to_string()))?;
        stored.node_name = node.to_string();
        let bound = Arc::new(binding::bound_info(info, node));
        self.state.lock().writing.insert(info.key.clone(), (json.clone(), bound));
        stored.json = json;
        let written = self.api.objects.update_stored(self.pods.rt, stored, cached.mod_revision).await;
        if written.is_err() {
            self.state.lock().writing.remove(&info.key);
        }
        written.map(|_| Value::Null)
    }

    async fn write_binding(&self, cur: Found, node: &str) -> Result<Value, crate::api::status::ApiError> {
        let mut bound = cur.object;
        // Indexing to assign panics on anything but an object (or null):
        // a stored pod of another shape is refused, not written.
        if !bound.is_object() || !(bound["spec"].is_object() || bound["spec"].is_null()) {
            return Err(crate::api::status::ApiError::internal("the stored pod is not a pod object"));
        }
        bound["spec"]["nodeName"] = json!(node);
        let now = crate::api::handlers::now();
        crate::api::admission::set_condition(&mut bound, "PodScheduled", "True", None, &now);
        self.api.objects.update(self.pods.rt, bound, cur.mod_revision).await
    }

    /// Tells the pod why it fits nowhere (once per distinct reason) and
    /// carries out a preemption: victims deleted gracefully, the pod
    /// nominated to their node.
    async fn report(&self, (info, cached): Pending, why: String, preempt: Option<(String, Vec<String>)>) {
        let key = info.key.clone();
        let cur = cached.found();
        self.recorder.event(&cur.object, EventType::Warning, "FailedScheduling", why.as_str());
        let nominate = preempt.as_ref().map(|(node, _)| node.clone());
        if let Some((node, victims)) = &preempt {
            for v in victims {
                let Some(victim) = self.pods.get(v) else { continue };
                tracing::info!(pod = key, victim = v, node, "preempting");
                let found = victim.found();
                match crate::api::internal::delete(&self.api, self.pods.rt, &found).await {
                    Ok(()) => {
                        let msg = format!("Preempted by pod {} on node {node}", cached.uid());
                        self.recorder.event(&found.object, EventType::Normal, "Preempted", msg);
                    }
                    Err(e) => tracing::warn!(pod = key, victim = v, "preemption delete failed: {e}"),
                }
            }
        }
        let stated = format!("{why}{}", nominate.as_deref().unwrap_or_default());
        if self.state.lock().reported.get(&key) == Some(&stated) {
            return;
        }
        let mut status = cur.object["status"].clone();
        if !status.is_object() {
            status = json!({});
        }
        let mut obj = json!({"status": status});
        let now = crate::api::handlers::now();
        crate::api::admission::set_condition(&mut obj, "PodScheduled", "False", Some("Unschedulable"), &now);
        if let Some(c) =
            obj["status"]["conditions"].as_array_mut().and_then(|c| c.iter_mut().find(|c| c["type"] == "PodScheduled"))
        {
            c["message"] = json!(why);
        }
        if let Some(node) = nominate {
            obj["status"]["nominatedNodeName"] = json!(node);
        }
        match crate::api::internal::write_status(&self.api, self.pods.rt, &cur, obj["status"].take()).await {
            Ok(_) => {
                self.state.lock().reported.insert(key, stated);
            }
            Err(e) if e.code == 409 || e.code == 404 => {}
            Err(e) => tracing::warn!(pod = key, "could not report unschedulable pod: {e}"),
        }
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
    use capstan_proto::k8s::stored::StoredObject;

    fn cached(obj: Value) -> Arc<Cached> {
        let bytes = StoredObject::from_object(&obj).unwrap().encode();
        let key = match obj["metadata"]["namespace"].as_str() {
            Some(ns) => format!("{ns}/{}", obj["metadata"]["name"].as_str().unwrap()),
            None => obj["metadata"]["name"].as_str().unwrap().to_string(),
        };
        Arc::new(Cached::new(key, 1, &bytes).unwrap())
    }

    fn node(cpu: &str, extra: Value) -> Arc<Cached> {
        let mut n =
            json!({"metadata": {"name": "n1", "uid": "u"}, "status": {"allocatable": {"cpu": cpu, "memory": "1Gi"}}});
        json_patch::merge(&mut n, &extra);
        cached(n)
    }

    fn pod(name: &str, node: &str) -> Arc<Cached> {
        cached(json!({"metadata": {"name": name, "namespace": "d", "uid": name},
            "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]}}))
    }

    /// A namespace selector picks namespaces by their labels, as they are
    /// now: relabelling a namespace moves its pods in or out of a term.
    #[test]
    fn namespace_selectors_follow_namespace_labels() {
        let now = Instant::now();
        let mut st = State::default();
        let ns = |name: &str, env: &str| cached(json!({"metadata": {"name": name, "labels": {"env": env}}}));
        st.on_namespace("prod", Some(&ns("prod", "prod")), now);
        st.on_node("n1", Some(&node("4", json!({"metadata": {"labels": {"kubernetes.io/hostname": "n1"}}}))), now);
        let db = json!({"metadata": {"name": "db", "namespace": "prod", "uid": "db", "labels": {"app": "db"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]}});
        st.on_pod("prod/db", Some(&cached(db)), now);
        let wants_away_from = |env: &str| {
            cached(json!({"metadata": {"name": "p", "namespace": "d", "uid": "p"},
                "spec": {"containers": [{"name": "c"}], "affinity": {"podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [{
                        "labelSelector": {"matchLabels": {"app": "db"}},
                        "namespaceSelector": {"matchLabels": {"env": env}},
                        "topologyKey": "kubernetes.io/hostname"}]}}}}))
        };
        st.on_pod("d/p", Some(&wants_away_from("prod")), now);
        assert!(framework::schedule(&st.pending["d/p"].0, &st.cache, 0).is_err(), "prod's db pod repels it");
        st.on_pod("d/p", Some(&wants_away_from("staging")), now);
        assert!(framework::schedule(&st.pending["d/p"].0, &st.cache, 0).is_ok(), "no staging pod on n1");
        // prod relabelled as staging: the same term now picks its db pod.
        assert!(st.on_namespace("prod", Some(&ns("prod", "staging")), now));
        assert!(framework::schedule(&st.pending["d/p"].0, &st.cache, 0).is_err(), "counts follow the relabel");
        assert!(!st.on_namespace("prod", Some(&ns("prod", "staging")), now), "unchanged labels change nothing");
        assert!(st.on_namespace("prod", None, now));
        assert!(framework::schedule(&st.pending["d/p"].0, &st.cache, 0).is_ok(), "a deleted namespace has no labels");
    }

    /// The change a binding makes is taken from what its writer already
    /// knew when the text is exactly what it wrote, and parsed otherwise.
    #[test]
    fn a_binding_seen_as_written_is_not_parsed_again() {
        let now = Instant::now();
        let mut st = State::default();
        st.on_node("n1", Some(&node("1", json!({}))), now);
        let bound = pod("a", "n1");
        let text = bound.archived().json.to_vec();
        // A marker (cpu) tells which of the two was used.
        let known = || Arc::new(PodInfo { cpu: 7, ..PodInfo::from_json(&text) });
        st.writing.insert("d/a".into(), (text.clone(), known()));
        assert!(!st.on_pod("d/a", Some(&bound), now));
        assert_eq!(st.cache.nodes[0].used_cpu, 7);
        assert!(st.writing.is_empty());
        st.writing.insert("d/a".into(), (b"{}".to_vec(), known()));
        st.on_pod("d/a", Some(&bound), now);
        assert_eq!(st.cache.nodes[0].used_cpu, 1000);
        assert!(st.writing.is_empty(), "a change other than the binding consumes it too");
        st.writing.insert("d/a".into(), (text.clone(), known()));
        st.on_pod("d/a", None, now);
        assert!(st.writing.is_empty(), "a deleted pod's binding is forgotten");
    }

    #[test]
    fn the_feed_keeps_cache_and_queue_in_step() {
        let now = Instant::now();
        let mut st = State::default();
        assert!(st.on_node("n1", Some(&node("1", json!({}))), now));
        assert!(st.on_pod("d/a", Some(&pod("a", "")), now), "a new pending pod is active");
        let key = st.queue.pop(now).unwrap();
        let chosen = framework::schedule(&st.pending[&key].0, &st.cache, 0).unwrap();
        assert_eq!(chosen.node, 0);
        st.cache.place(st.pending[&key].0.clone(), "n1", true);
        // An update of the pod while its binding is in flight keeps it assumed and out of the queue.
        assert!(st.on_pod("d/a", Some(&pod("a", "")), now));
        assert_eq!(st.queue.pop(now), None);
        assert_eq!(st.cache.nodes[0].used_cpu, 1000);
        // The binding observed: counted once, no longer pending.
        assert!(!st.on_pod("d/a", Some(&pod("a", "n1")), now));
        assert_eq!(st.cache.nodes[0].used_cpu, 1000);
        assert!(st.pending.is_empty());

        // A second pod does not fit; a heartbeat does not retry it...
        st.on_pod("d/b", Some(&pod("b", "")), now);
        let b = st.queue.pop(now).unwrap();
        assert!(framework::schedule(&st.pending[&b].0, &st.cache, 0).is_err());
        st.queue.unschedulable(&b, now);
        let later = now + Duration::from_secs(2);
        assert!(!st.on_node("n1", Some(&node("1", json!({"status": {"conditions": [{"type": "Ready"}]}}))), later));
        assert_eq!(st.queue.pop(later), None);
        // ...but freeing room does.
        assert!(st.on_pod("d/a", None, later));
        assert_eq!(st.cache.nodes[0].used_cpu, 0);
        assert_eq!(st.queue.pop(later).as_deref(), Some("d/b"));
        st.queue.unschedulable("d/b", later);
        // And so does a bigger node.
        assert!(st.on_node("n1", Some(&node("4", json!({}))), later + Duration::from_secs(5)));
        assert_eq!(st.queue.pop(later + Duration::from_secs(5)).as_deref(), Some("d/b"));
    }
}
