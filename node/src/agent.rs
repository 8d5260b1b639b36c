//! The agent: joins, registers its Node, heartbeats, watches its pods and
//! runs one worker per pod. Workers apply `pods::plan` against the runtime
//! and report `pods::status`; all decisions live in `pods.rs`.
//!
//! Besides: housekeeping (what belongs to no pod the masters listed is
//! removed), the masters' log/exec/attach streams, and the local-path
//! reclaimer (`localpath.rs`: directories of deleted PersistentVolumes).
//! The Node it registers carries its labels and the local-path root
//! (annotation `capstan.io/local-path-root`).
//!
//! Fail-static: when every master is unreachable, workers keep the last
//! pods they were given (running containers keep running and are restarted
//! by their policy); status reports wait for a master to return. A pod is
//! only torn down because a master said so (deleted, or absent from a fresh
//! listing), never because the masters are gone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use capstan_proto::k8s::stored::StoredObject;
use capstan_proto::nodewire::{NodeRequest, NodeResponse, PodFrame};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::conn::Masters;
use crate::pods::{self, Action, Memory, Observed, PodSpec, Waiting};
use crate::runtime::*;
use crate::volumes::{self, SourceKind};

/// How often the Lease is renewed (a quarter of Kubernetes' 40 s grace).
const HEARTBEAT: Duration = Duration::from_secs(10);
/// NodeStatus is re-sent at least this often even when unchanged.
const STATUS_REFRESH: Duration = Duration::from_secs(60);
/// Observed runtime state is shared by the workers for this long.
const OBSERVE_TTL: Duration = Duration::from_millis(500);
/// A container whose volumes are not ready (a claim the binder has not
/// bound yet, a ConfigMap not created yet) is retried from 1 s, doubling,
/// up to 30 s: what it waits for usually comes within seconds, and the
/// crash back-off (10 s to 5 min) would start the pod late.
const MOUNT_RETRY_START: Duration = Duration::from_secs(1);
const MOUNT_RETRY_MAX: Duration = Duration::from_secs(30);

/// Why a container's configuration could not be made.
enum ConfigError {
    /// A volume is not ready or not possible (the kubelet's FailedMount).
    Mount(volumes::VolumeError),
    /// Its env, or anything else.
    Other(RuntimeError),
}

/// What the node reports about itself.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub host_ip: String,
    pub cpu: String,
    pub memory: String,
    pub pods: u32,
    pub runtime_version: String,
    /// Labels besides the well-known ones (`kubernetes.io/hostname`, os, arch).
    pub labels: Vec<(String, String)>,
    /// Where the masters' local-path provisioner puts this node's
    /// PersistentVolumes (advertised as [`crate::localpath::ANNOTATION`]).
    pub local_path_root: Option<PathBuf>,
}

impl NodeInfo {
    /// Capacity read from the host.
    pub fn from_host(name: &str, host_ip: &str, runtime_version: &str) -> NodeInfo {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
            })
            .unwrap_or(0);
        NodeInfo {
            name: name.to_string(),
            host_ip: host_ip.to_string(),
            cpu: cpus.to_string(),
            memory: format!("{mem_kib}Ki"),
            pods: 110,
            runtime_version: runtime_version.to_string(),
            labels: vec![],
            local_path_root: None,
        }
    }

    /// The Node's labels: the well-known ones, then `labels` (which win).
    pub fn all_labels(&self) -> std::collections::BTreeMap<String, String> {
        let well_known = [
            ("kubernetes.io/hostname", self.name.as_str()),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", "amd64"),
            ("beta.kubernetes.io/os", "linux"),
            ("beta.kubernetes.io/arch", "amd64"),
        ];
        let mut out: std::collections::BTreeMap<String, String> =
            well_known.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        out.extend(self.labels.iter().cloned());
        out
    }

    /// The Node object the agent registers (pure).
    pub fn node_object(&self, now: &str) -> Value {
        let mut metadata = json!({"name": self.name, "labels": self.all_labels()});
        if let Some(root) = &self.local_path_root {
            metadata["annotations"] = json!({crate::localpath::ANNOTATION: root.to_string_lossy()});
        }
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": metadata,
            "spec": {},
            "status": self.status(now),
        })
    }

    /// NodeStatus: capacity, addresses, versions and the Ready condition.
    pub fn status(&self, now: &str) -> Value {
        let resources = json!({"cpu": self.cpu, "memory": self.memory, "pods": self.pods.to_string()});
        let cond = |t: &str, s: &str, reason: &str, msg: &str| {
            json!({"type": t, "status": s, "reason": reason, "message": msg,
                   "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        let (kernel, os_image) = host_versions();
        json!({
            "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": self.host_ip}, {"type": "Hostname", "address": self.name}],
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "capstan-node has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "capstan-node has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "capstan-node has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "capstan-node is posting ready status"),
            ],
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "",
                "kernelVersion": kernel, "osImage": os_image,
                "containerRuntimeVersion": self.runtime_version,
                "kubeletVersion": "v1.32.0-capstan", "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": "amd64",
            },
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        })
    }
}

fn host_versions() -> (String, String) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string())))
        .unwrap_or_else(|| "Linux".into());
    (kernel, os)
}

/// Transition times in `status` carried over from `prev` where a condition
/// kept its status (so a heartbeat does not look like a flap).
fn keep_transitions(status: &mut Value, prev: &Value) {
    let Some(conds) = status["conditions"].as_array_mut() else { return };
    for c in conds {
        let old = prev["conditions"].as_array().into_iter().flatten().find(|o| o["type"] == c["type"]);
        if let Some(o) = old.filter(|o| o["status"] == c["status"]) {
            c["lastTransitionTime"] = o["lastTransitionTime"].clone();
        }
    }
}

/// Probes of a pod's containers, by (container id, kind).
type Probes = HashMap<(String, crate::prober::Kind), (crate::prober::Probe, crate::prober::Tracker)>;

pub(crate) struct Observation {
    at: Instant,
    pub sandboxes: Vec<Sandbox>,
    pub containers: Vec<ContainerStatus>,
}

pub struct Agent<R: Runtime> {
    pub info: NodeInfo,
    pub(crate) masters: Arc<Masters>,
    pub(crate) rt: Arc<R>,
    data_dir: PathBuf,
    /// Workers by pod uid, and which uid each `namespace/name` is now.
    pub(crate) workers: Mutex<HashMap<String, watch::Sender<Option<Arc<PodSpec>>>>>,
    pub(crate) keys: Mutex<HashMap<String, String>>,
    observed: tokio::sync::Mutex<Option<Arc<Observation>>>,
    /// A listing from a master has arrived (orphans may be collected).
    listed: std::sync::atomic::AtomicBool,
    /// The agent is shutting down: workers stop acting.
    stopping: std::sync::atomic::AtomicBool,
    pub(crate) metrics: crate::metrics::AgentMetrics,
    /// Sandbox and container starts admitted first come, first served, a
    /// few at a time: they are CPU-bound (runc, CNI), and a burst run all
    /// at once finishes all at once, late; admitted in order, the first
    /// pods run early at the same throughput.
    starts: tokio::sync::Semaphore,
    pub(crate) events: crate::events::Recorder,
    /// The node's own resolver configuration (/etc/resolv.conf at start):
    /// what pods' resolv.conf extends, where cluster DNS forwards.
    host_dns: crate::dns::ResolvConf,
    /// The recorder's queue, until `run` starts its sender.
    events_queue: Mutex<Option<tokio::sync::mpsc::Receiver<capstan_proto::nodewire::AgentEvent>>>,
}

impl<R: Runtime> Agent<R> {
    pub fn new(
        info: NodeInfo,
        masters: Arc<Masters>,
        rt: Arc<R>,
        data_dir: PathBuf,
        metrics: crate::metrics::AgentMetrics,
    ) -> Arc<Agent<R>> {
        let (events, events_queue) = crate::events::Recorder::new();
        Arc::new(Agent {
            info,
            masters,
            rt,
            data_dir,
            workers: Mutex::default(),
            keys: Mutex::default(),
            observed: tokio::sync::Mutex::new(None),
            host_dns: crate::dns::ResolvConf::parse(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
            listed: Default::default(),
            stopping: Default::default(),
            metrics,
            starts: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()).max(2)),
            events,
            events_queue: Mutex::new(Some(events_queue)),
        })
    }

    /// Health checks: (name, failure) for `/readyz`.
    pub async fn readiness(&self) -> Vec<crate::metrics::Check> {
        let master = match self.masters.connected_to() {
            Some(_) => None,
            None => Some("not connected to any master".to_string()),
        };
        let runtime = match tokio::time::timeout(Duration::from_secs(2), self.rt.list_sandboxes()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("the runtime did not answer in 2 s".into()),
        };
        vec![("ping", None), ("master", master), ("runtime", runtime)]
    }

    /// Stops every pod worker (before a teardown, so none restarts what is torn down).
    pub fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Release);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Registers, then heartbeats, watches and collects orphans until the process ends.
    pub async fn run(self: Arc<Self>) -> anyhow::Result<()> {
        let cidr = self.register().await;
        self.rt.set_pod_cidr(&cidr);
        tokio::spawn(self.clone().heartbeats());
        tokio::spawn(self.clone().housekeeping());
        if let Some(root) = self.info.local_path_root.clone().filter(|_| self.rt.materializes_volumes()) {
            tokio::spawn(self.clone().reclaim_local_paths(root));
        }
        tokio::spawn(self.clone().serve_masters());
        if self.rt.has_pod_network() {
            let dns = self.start_dns(&cidr);
            tokio::spawn(crate::services::run(self.masters.clone(), crate::proxy::table_name(&self.info.name), dns));
        }
        if let Some(queue) = self.events_queue.lock().take() {
            tokio::spawn(crate::events::send(self.masters.clone(), queue));
        }
        tokio::spawn(crate::usage::report_loop(self.rt.clone(), self.masters.clone()));
        self.watch().await;
        Ok(())
    }

    /// Starts this node's cluster DNS on its pod gateway address (see
    /// dns.rs); None (pods then cannot resolve cluster names) when the
    /// pod CIDR is unusable or no port can be bound.
    fn start_dns(&self, cidr: &str) -> Option<crate::services::LocalDns> {
        let ip = match crate::cni::PodCidr::parse(cidr) {
            Ok(c) => c.gateway(),
            Err(e) => {
                tracing::error!(%cidr, error = %e, "no cluster DNS: the pod CIDR is unusable");
                return None;
            }
        };
        let listeners = match crate::dns::bind(ip, &[53, 0]) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%ip, error = %e, "cluster DNS not served");
                return None;
            }
        };
        let addr = listeners.addr;
        let zone = Arc::new(crate::dns::ZoneCell::default());
        let upstreams = crate::dns::upstreams(&self.host_dns);
        let metrics = self.metrics.dns_responses.clone();
        tokio::spawn(crate::dns::serve(listeners, zone.clone(), upstreams, Some(metrics)));
        Some(crate::services::LocalDns { addr, zone })
    }

    async fn register(&self) -> String {
        let mut delay = Duration::from_millis(200);
        loop {
            let node = self.info.node_object(&now());
            let req = NodeRequest::Register { node: serde_json::to_vec(&node).unwrap_or_default() };
            match self.masters.expect(&req).await {
                Ok(NodeResponse::Registered { pod_cidr }) => {
                    tracing::info!(node = %self.info.name, %pod_cidr, "registered");
                    return pod_cidr;
                }
                Ok(other) => tracing::warn!(?other, "unexpected answer to register"),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "register failed; retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn heartbeats(self: Arc<Self>) {
        let mut last_status: Option<(Instant, Value)> = None;
        loop {
            let mut status = self.info.status(&now());
            if let Some((_, prev)) = &last_status {
                keep_transitions(&mut status, prev);
            }
            self.metrics.master_connected.set(i64::from(self.masters.connected_to().is_some()));
            if let Some(rtt) = self.masters.rtt() {
                self.metrics.master_rtt.set(rtt.as_secs_f64());
            }
            let due = last_status.as_ref().is_none_or(|(at, _)| at.elapsed() >= STATUS_REFRESH);
            let send = due.then(|| serde_json::to_vec(&status).unwrap_or_default());
            match self.masters.expect(&NodeRequest::Heartbeat { status: send.clone() }).await {
                Ok(_) if send.is_some() => last_status = Some((Instant::now(), status)),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "heartbeat failed"),
            }
            tokio::time::sleep(HEARTBEAT).await;
        }
    }

    /// Watches the node's pods, re-watching (from a fresh listing) whenever
    /// the stream ends; each change is handed to its pod's worker.
    async fn watch(self: Arc<Self>) {
        self.masters.follow(&NodeRequest::WatchPods, "pod", |frame| self.apply(frame)).await;
    }

    fn apply(self: &Arc<Self>, frame: PodFrame) {
        if frame.reset {
            let listed: HashSet<&str> = frame.events.iter().map(|e| e.key.as_str()).collect();
            let gone: Vec<String> = self.keys.lock().keys().filter(|k| !listed.contains(k.as_str())).cloned().collect();
            for k in gone {
                self.forget(&k);
            }
        }
        for ev in frame.events {
            if ev.delete {
                self.forget(&ev.key);
                continue;
            }
            let pod = match StoredObject::decode(&ev.object, ev.mod_revision) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(pod = %ev.key, error = %e, "undecodable pod");
                    continue;
                }
            };
            let spec = match PodSpec::parse(&pod) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!(error = %e, "pod cannot be run");
                    continue;
                }
            };
            let previous = self.keys.lock().insert(ev.key.clone(), spec.uid.clone());
            if let Some(old) = previous.filter(|u| *u != spec.uid) {
                self.stop_worker(&old);
            }
            let mut workers = self.workers.lock();
            match workers.get(&spec.uid) {
                Some(tx) => {
                    let _ = tx.send(Some(spec));
                }
                None => {
                    let (tx, rx) = watch::channel(Some(spec.clone()));
                    workers.insert(spec.uid.clone(), tx);
                    tokio::spawn(self.clone().worker(spec.uid.clone(), rx));
                }
            }
        }
        if frame.reset {
            self.listed.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// The pod is gone from the masters: its worker tears it down.
    fn forget(&self, key: &str) {
        if let Some(uid) = self.keys.lock().remove(key) {
            self.stop_worker(&uid);
        }
    }

    fn stop_worker(&self, uid: &str) {
        if let Some(tx) = self.workers.lock().get(uid) {
            let _ = tx.send(None);
        }
    }

    /// The runtime's state, shared by all workers for `OBSERVE_TTL`.
    /// `fresh`: a listing that began after this call (workers that just
    /// acted); otherwise one at most `OBSERVE_TTL` old. Callers queue on one
    /// lock, so a burst of workers shares a listing instead of each making one.
    pub(crate) async fn observe(&self, fresh: bool) -> anyhow::Result<Arc<Observation>> {
        let asked = Instant::now();
        let mut cached = self.observed.lock().await;
        if let Some(o) = cached.as_ref().filter(|o| o.at >= asked || (!fresh && o.at.elapsed() < OBSERVE_TTL)) {
            return Ok(o.clone());
        }
        let o = Arc::new(Observation {
            at: Instant::now(),
            sandboxes: self.rt.list_sandboxes().await?,
            containers: self.rt.list_containers().await?,
        });
        *cached = Some(o.clone());
        Ok(o)
    }

    /// One pod's worker: plan, act, report, until the pod is gone.
    async fn worker(self: Arc<Self>, uid: String, mut rx: watch::Receiver<Option<Arc<PodSpec>>>) {
        let mut mem = Memory { start_time: Some(SystemTime::now()), ..Default::default() };
        let mut last: Arc<PodSpec> = match rx.borrow().clone() {
            Some(s) => s,
            None => return,
        };
        let mut reported = last.raw["status"].clone();
        let mut seen_exits: HashSet<String> = HashSet::new();
        let mut probes: Probes = HashMap::new();
        let seen_at = Instant::now();
        let mut start_recorded = false;
        let mut fresh = true;
        let mut volumes_refreshed = Instant::now();
        loop {
            if self.stopping() {
                return;
            }
            let removed = rx.borrow().is_none();
            let spec = match rx.borrow().clone() {
                Some(s) => s,
                None => {
                    // Deleted from the store: tear down with the pod's grace.
                    let mut s = (*last).clone();
                    s.deleting = true;
                    Arc::new(s)
                }
            };
            last = spec.clone();
            let obs = match self.observe(fresh).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, "runtime unavailable");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let sandbox = obs.sandboxes.iter().find(|s| s.pod_uid == uid);
            let mine: Vec<&ContainerStatus> = obs.containers.iter().filter(|c| c.pod_uid == uid).collect();
            self.note_exits(&spec, &mine, &mut mem, &mut seen_exits);
            if !spec.deleting {
                self.probe(&spec, sandbox, &mine, &mut mem, &mut probes).await;
            }
            if !start_recorded {
                let all_running = spec.containers.iter().all(|c| {
                    mine.iter().any(|m| m.name == c.name && matches!(m.state, ContainerState::Running { .. }))
                });
                if all_running {
                    self.metrics.pod_start.observe(seen_at.elapsed().as_secs_f64());
                    start_recorded = true;
                }
            }
            let observed = Observed { sandbox, containers: mine.clone() };
            let now = SystemTime::now();
            let (actions, wake) = pods::plan(&spec, &observed, &mem, now);
            let status = pods::status(&spec, &observed, &mem, now, &self.info.host_ip, &reported);
            let acted = !actions.is_empty();
            let mut terminated = false;
            for a in actions {
                if self.stopping() {
                    return;
                }
                if a == Action::Terminated {
                    terminated = true;
                    continue;
                }
                self.act(&spec, sandbox, &mine, a, &mut mem).await;
            }
            if !removed && status != reported && !acted {
                let req = NodeRequest::PodStatus {
                    namespace: spec.namespace.clone(),
                    name: spec.name.clone(),
                    uid: uid.clone(),
                    status: serde_json::to_vec(&status).unwrap_or_default(),
                };
                match self.masters.request(&req).await {
                    Ok(NodeResponse::Done) => reported = status,
                    Ok(NodeResponse::Error { code: 404, .. }) => reported = status,
                    Ok(other) => tracing::debug!(pod = %spec.name, ?other, "status not written"),
                    Err(e) => tracing::debug!(pod = %spec.name, error = %e, "status not written"),
                }
            }
            if terminated {
                self.cleanup_volumes(&uid).await;
                let done = removed || {
                    let req = NodeRequest::PodTerminated {
                        namespace: spec.namespace.clone(),
                        name: spec.name.clone(),
                        uid: uid.clone(),
                    };
                    matches!(self.masters.request(&req).await, Ok(NodeResponse::Done))
                };
                if done {
                    self.workers.lock().remove(&uid);
                    return;
                }
            }
            if volumes_refreshed.elapsed() >= volumes::REFRESH && !spec.deleting {
                volumes_refreshed = Instant::now();
                let running = mine.iter().any(|c| matches!(c.state, ContainerState::Running { .. }));
                if running && volumes::refreshable(&spec.raw) {
                    self.refresh_volumes(&spec).await;
                }
            }
            fresh = acted;
            if acted {
                continue;
            }
            let wait = wake.unwrap_or(Duration::from_secs(1)).clamp(Duration::from_millis(50), Duration::from_secs(1));
            tokio::select! {
                _ = rx.changed() => fresh = true,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs the probes that are due for the pod's running containers and
    /// turns their verdicts into readiness, startedness and unhealthiness.
    async fn probe(
        &self,
        spec: &PodSpec,
        sandbox: Option<&Sandbox>,
        mine: &[&ContainerStatus],
        mem: &mut Memory,
        probes: &mut Probes,
    ) {
        use crate::prober::{self, Kind, Probe, Tracker};
        let now = Instant::now();
        let running: Vec<&ContainerStatus> =
            mine.iter().copied().filter(|c| matches!(c.state, ContainerState::Running { .. })).collect();
        probes.retain(|(id, _), _| running.iter().any(|c| c.id == *id));
        let pod_ip = if spec.host_network { self.info.host_ip.parse().ok() } else { sandbox.and_then(|s| s.ip) };
        let mut due = Vec::new();
        for c in &running {
            let Some(cs) = container_spec(spec, &c.name) else { continue };
            for kind in [Kind::Startup, Kind::Liveness, Kind::Readiness] {
                if let Some(p) = Probe::parse(&cs.raw, kind) {
                    probes.entry((c.id.clone(), kind)).or_insert_with(|| {
                        let t = Tracker::new(&p, now);
                        (p, t)
                    });
                }
            }
            let startup = probes.get(&(c.id.clone(), Kind::Startup)).map(|(_, t)| t.verdict);
            let started = startup.is_none_or(|v| v == Some(true));
            mem.started.insert(c.id.clone(), started);
            let kinds: &[Kind] = if started { &[Kind::Liveness, Kind::Readiness] } else { &[Kind::Startup] };
            for kind in kinds {
                if let Some((p, t)) = probes.get(&(c.id.clone(), *kind)) {
                    if t.due(now) {
                        due.push((c.id.clone(), c.name.clone(), *kind, p.clone()));
                    }
                }
            }
        }
        let results = futures::future::join_all(due.iter().map(|(id, _, kind, p)| {
            let rt = self.rt.clone();
            let id = id.clone();
            prober::run(p, *kind, pod_ip, move |cmd, _timeout| exec_quiet(rt, id, cmd))
        }))
        .await;
        for ((id, name, kind, p), (ok, message)) in due.into_iter().zip(results) {
            let Some((_, t)) = probes.get_mut(&(id.clone(), kind)) else { continue };
            if !ok {
                // Every failed run, as the kubelet: the masters aggregate repeats.
                self.events.warning(spec, Some(&name), "Unhealthy", message.clone());
            }
            t.record(&p, ok, message, Instant::now());
            match (kind, t.verdict) {
                (Kind::Readiness, v) => {
                    mem.ready.insert(id, v == Some(true));
                }
                (Kind::Liveness | Kind::Startup, Some(false)) => {
                    tracing::info!(pod = %spec.name, container = %id, reason = %t.last_message, "unhealthy: restarting");
                    mem.unhealthy.insert(id, t.last_message.clone());
                }
                _ => {}
            }
        }
    }

    /// Exits seen for the first time start a back-off and clear probe state.
    fn note_exits(&self, spec: &PodSpec, mine: &[&ContainerStatus], mem: &mut Memory, seen: &mut HashSet<String>) {
        let now = SystemTime::now();
        for c in mine {
            match c.state {
                ContainerState::Running { .. } => {
                    // No readiness probe: ready while running (probes come from prober.rs).
                    let has_probe = container_spec(spec, &c.name).is_some_and(|s| s.raw["readinessProbe"].is_object());
                    mem.ready.entry(c.id.clone()).or_insert(!has_probe);
                    mem.started.entry(c.id.clone()).or_insert(true);
                }
                ContainerState::Exited { started_at, finished_at, exit_code, .. } if seen.insert(c.id.clone()) => {
                    let ran = started_at.and_then(|s| finished_at.duration_since(s).ok()).unwrap_or_default();
                    let recent = now.duration_since(finished_at).unwrap_or_default() < pods::BACKOFF_MAX;
                    if recent {
                        let b = pods::next_backoff(mem.backoff.get(&c.name), ran, finished_at);
                        if !b.delay.is_zero() && pods::restarts(spec.restart_policy, exit_code) {
                            let msg = format!("Back-off restarting failed container {} in pod {}", c.name, spec.name);
                            self.events.warning(spec, Some(&c.name), "BackOff", msg);
                        }
                        mem.backoff.insert(c.name.clone(), b);
                    }
                    mem.ready.remove(&c.id);
                    mem.unhealthy.remove(&c.id);
                    mem.stopping.remove(&c.id);
                }
                _ => {}
            }
        }
    }

    async fn act(
        &self,
        spec: &PodSpec,
        sandbox: Option<&Sandbox>,
        mine: &[&ContainerStatus],
        a: Action,
        mem: &mut Memory,
    ) {
        let result = match &a {
            Action::RunSandbox => {
                let cfg = SandboxConfig {
                    pod_uid: spec.uid.clone(),
                    namespace: spec.namespace.clone(),
                    name: spec.name.clone(),
                    hostname: spec.raw["spec"]["hostname"].as_str().unwrap_or(&spec.name).to_string(),
                    port_mappings: host_ports(&spec.raw),
                    host_network: spec.host_network,
                    resolv_conf: Some(crate::dns::pod_resolv_conf(&spec.raw["spec"], &spec.namespace, &self.host_dns)),
                    domain: crate::dns::pod_domain(&spec.raw["spec"], &spec.namespace),
                };
                let _turn = self.starts.acquire().await;
                match self.rt.run_sandbox(&cfg).await {
                    Ok(_) => {
                        mem.sandbox_error = None;
                        Ok(())
                    }
                    Err(e) => {
                        let msg = format!("Failed to create pod sandbox: {e}");
                        self.events.warning(spec, None, "FailedCreatePodSandBox", msg);
                        let delay = mem
                            .sandbox_error
                            .as_ref()
                            .map_or(pods::BACKOFF_START, |w| (w.delay * 2).min(pods::BACKOFF_MAX));
                        mem.sandbox_error = Some(Waiting {
                            reason: "FailedCreatePodSandBox".into(),
                            message: e.to_string(),
                            retry_at: SystemTime::now() + delay,
                            delay,
                        });
                        Err(e)
                    }
                }
            }
            Action::Start { name, attempt, .. } => match (sandbox, container_spec(spec, name)) {
                (Some(sb), Some(c)) => self.start(spec, sb, c, *attempt, mem).await,
                _ => Ok(()),
            },
            Action::Stop { id, grace } => {
                mem.stopping.insert(id.clone(), SystemTime::now());
                let mut grace = *grace;
                let running = mine.iter().find(|c| c.id == *id && matches!(c.state, ContainerState::Running { .. }));
                if let Some(cs) = running.and_then(|c| container_spec(spec, &c.name)) {
                    // preStop runs within the grace period; the kubelet
                    // then allows at least 2 s more for SIGTERM.
                    let began = Instant::now();
                    let ip = sandbox.and_then(|s| s.ip);
                    let why = match mem.unhealthy.get(id) {
                        Some(_) => {
                            format!("Container {} failed a liveness or startup probe, will be restarted", cs.name)
                        }
                        None => format!("Stopping container {}", cs.name),
                    };
                    self.events.normal(spec, Some(&cs.name), "Killing", why);
                    if let Err(e) = self.hook(cs, "preStop", id, ip, grace).await {
                        tracing::warn!(pod = %spec.name, container = %cs.name, error = %e, "preStop hook failed");
                        self.events.warning(
                            spec,
                            Some(&cs.name),
                            "FailedPreStopHook",
                            format!("PreStopHook failed: {e}"),
                        );
                    }
                    grace = grace.saturating_sub(began.elapsed()).max(Duration::from_secs(2).min(grace));
                }
                self.rt.stop_container(id, grace).await
            }
            Action::Remove { id } => self.rt.remove_container(id).await,
            Action::RemoveSandbox => match sandbox {
                Some(sb) => self.rt.remove_sandbox(&sb.id).await,
                None => Ok(()),
            },
            Action::Terminated => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(pod = %format!("{}/{}", spec.namespace, spec.name), action = ?a, error = %e, "action failed");
        }
    }

    async fn start(
        &self,
        spec: &PodSpec,
        sb: &Sandbox,
        c: &pods::ContainerSpec,
        attempt: u32,
        mem: &mut Memory,
    ) -> Result<(), RuntimeError> {
        let fail_after = |mem: &mut Memory, reason: &str, message: String, (first, max): (Duration, Duration)| {
            let delay = mem.waiting.get(&c.name).map_or(first, |w| (w.delay * 2).clamp(first, max));
            mem.waiting.insert(
                c.name.clone(),
                Waiting { reason: reason.into(), message, retry_at: SystemTime::now() + delay, delay },
            );
        };
        let fail = |mem: &mut Memory, reason: &str, e: &RuntimeError| {
            fail_after(mem, reason, e.to_string(), (pods::BACKOFF_START, pods::BACKOFF_MAX))
        };
        let auth = self.pull_auth(spec).await;
        let began = Instant::now();
        let (image, _id) = match self.rt.ensure_image(&c.image, c.pull_policy, &auth).await {
            Ok(i) => {
                let msg = format!("Container image {:?} ready in {:.3}s", c.image, began.elapsed().as_secs_f64());
                self.events.normal(spec, Some(&c.name), "Pulled", msg);
                i
            }
            Err(e) => {
                let reason = if c.pull_policy == PullPolicy::Never { "ErrImageNeverPull" } else { "ErrImagePull" };
                let msg = format!("Failed to pull image {:?}: {e}", c.image);
                self.events.warning(spec, Some(&c.name), "Failed", msg);
                fail(mem, reason, &e);
                return Err(e);
            }
        };
        let cfg = match self.container_config(spec, c, attempt, image).await {
            Ok(cfg) => cfg,
            Err(ConfigError::Other(e)) => {
                self.events.warning(spec, Some(&c.name), "Failed", format!("Error: {e}"));
                fail(mem, "CreateContainerConfigError", &e);
                return Err(e);
            }
            Err(ConfigError::Mount(e)) => {
                // The kubelet's event for a volume that cannot be set up. A
                // claim waiting for its volume is no error: the pod is still
                // being created, as the kubelet shows it (and tools do not
                // count it stuck); anything else keeps the reason a missing
                // ConfigMap always gave.
                self.events.warning(spec, Some(&c.name), "FailedMount", format!("MountVolume.SetUp failed: {e}"));
                let reason = match e {
                    volumes::VolumeError::NotBound { .. } => "ContainerCreating",
                    _ => "CreateContainerConfigError",
                };
                fail_after(mem, reason, e.to_string(), (MOUNT_RETRY_START, MOUNT_RETRY_MAX));
                return Err(RuntimeError::Other(e.to_string()));
            }
        };
        let started = {
            let _turn = self.starts.acquire().await;
            self.rt.start_container(sb, &cfg).await
        };
        match started {
            Ok(id) => {
                mem.waiting.remove(&c.name);
                self.events.normal(spec, Some(&c.name), "Created", format!("Created container: {}", c.name));
                self.events.normal(spec, Some(&c.name), "Started", format!("Started container {}", c.name));
                // postStart runs right after the start; if it fails the
                // container is killed and its restart policy decides.
                if let Err(e) = self.hook(c, "postStart", &id, sb.ip, Duration::from_secs(30)).await {
                    tracing::warn!(pod = %spec.name, container = %c.name, error = %e, "postStart hook failed: killing it");
                    let msg = format!("PostStartHook failed: {e}");
                    self.events.warning(spec, Some(&c.name), "FailedPostStartHook", msg);
                    self.rt.stop_container(&id, Duration::ZERO).await?;
                }
                Ok(())
            }
            Err(e) => {
                self.events.warning(spec, Some(&c.name), "Failed", format!("Error: {e}"));
                fail(mem, "RunContainerError", &e);
                Err(e)
            }
        }
    }

    /// The runtime's view of a container: env resolved (ConfigMaps and
    /// Secrets fetched through the node authorizer), volumes mounted,
    /// resources, log path.
    async fn container_config(
        &self,
        spec: &PodSpec,
        c: &pods::ContainerSpec,
        attempt: u32,
        image: String,
    ) -> Result<ContainerConfig, ConfigError> {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
        };
        let env = self.env(spec, &c.raw).await.map_err(ConfigError::Other)?;
        let mounts = self.mounts(spec, &c.raw, &env).await?;
        let res = &c.raw["resources"];
        let labels = [
            (LABEL_POD_UID, spec.uid.clone()),
            (LABEL_POD_NAMESPACE, spec.namespace.clone()),
            (LABEL_POD_NAME, spec.name.clone()),
            (LABEL_CONTAINER_NAME, c.name.clone()),
            (LABEL_ATTEMPT, attempt.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let share_pid_with = match c.raw["targetContainerName"].as_str().filter(|t| !t.is_empty()) {
            None => None,
            Some(target) => match self.running_attempt(spec, target).await {
                Some(r) => Some(r.id),
                None => {
                    let e = RuntimeError::Container(format!("the target container {target:?} is not running"));
                    return Err(ConfigError::Other(e));
                }
            },
        };
        let sc = &c.raw["securityContext"];
        let psc = &spec.raw["spec"]["securityContext"];
        let caps = |k: &str| strings(&sc["capabilities"][k]);
        Ok(ContainerConfig {
            pod_uid: spec.uid.clone(),
            namespace: spec.namespace.clone(),
            pod_name: spec.name.clone(),
            name: c.name.clone(),
            attempt,
            image,
            command: strings(&c.raw["command"]),
            args: strings(&c.raw["args"]),
            env,
            working_dir: c.raw["workingDir"].as_str().map(str::to_string),
            mounts,
            cpu_limit_millis: res["limits"]["cpu"].as_str().and_then(millicores),
            cpu_request_millis: res["requests"]["cpu"].as_str().and_then(millicores),
            memory_limit_bytes: res["limits"]["memory"].as_str().and_then(bytes_of),
            security: Security {
                run_as_user: sc["runAsUser"].as_u64().or(psc["runAsUser"].as_u64()).map(|u| u as u32),
                run_as_group: sc["runAsGroup"].as_u64().or(psc["runAsGroup"].as_u64()).map(|g| g as u32),
                supplemental_groups: psc["supplementalGroups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g.as_u64().map(|g| g as u32))
                    .collect(),
                privileged: sc["privileged"].as_bool().unwrap_or(false),
                read_only_root: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
                add_capabilities: caps("add"),
                drop_capabilities: caps("drop"),
            },
            tty: c.raw["tty"].as_bool().unwrap_or(false),
            stdin: c.raw["stdin"].as_bool().unwrap_or(false),
            share_pid_with,
            log_path: self.log_path(spec, &c.name, attempt),
            labels,
        })
    }

    /// `<data-dir>/pods/<namespace>_<name>_<uid>/<container>/<attempt>.log`, as the kubelet lays them out.
    pub fn log_path(&self, spec: &PodSpec, container: &str, attempt: u32) -> PathBuf {
        self.data_dir
            .join("pods")
            .join(format!("{}_{}_{}", spec.namespace, spec.name, spec.uid))
            .join(container)
            .join(format!("{attempt}.log"))
    }

    /// The container's volume mounts, the pod's volumes prepared first
    /// (refreshed at every start); none on a hollow runtime.
    async fn mounts(&self, spec: &PodSpec, c: &Value, env: &[(String, String)]) -> Result<Vec<Mount>, ConfigError> {
        if !self.rt.materializes_volumes() {
            return Ok(vec![]);
        }
        let fetch = |s: volumes::SourceRef| async move { self.fetch_source(spec, s).await };
        let prepared = volumes::prepare(&spec.raw, &self.data_dir, &self.info, fetch).await;
        prepared.and_then(|p| volumes::mounts_for(c, env, &p)).map_err(ConfigError::Mount)
    }

    /// What a volume reads: a ConfigMap, Secret, PersistentVolumeClaim or
    /// PersistentVolume, or a token for the pod's ServiceAccount bound to
    /// the pod.
    async fn fetch_source(&self, spec: &PodSpec, s: volumes::SourceRef) -> Result<Option<Value>, String> {
        if s.kind != volumes::SourceKind::Token {
            let ns = if s.kind.namespaced() { spec.namespace.as_str() } else { "" };
            return self.fetch(s.kind.resource(), ns, &s.name).await.map_err(|e| e.to_string());
        }
        let (audience, expiration_seconds) = volumes::token_source_parts(&s.name);
        let req = NodeRequest::Token {
            namespace: spec.namespace.clone(),
            pod: spec.name.clone(),
            uid: spec.uid.clone(),
            audience,
            expiration_seconds,
        };
        match self.masters.request(&req).await {
            Ok(NodeResponse::Object { json }) => serde_json::from_slice(&json).map(Some).map_err(|e| e.to_string()),
            Ok(NodeResponse::Error { code: 404, .. }) => Ok(None),
            Ok(NodeResponse::Error { message, .. }) => Err(message),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    /// Rewrites the running pod's ConfigMap, Secret and downward API files
    /// that changed (atomically: containers see the old or the new set).
    async fn refresh_volumes(&self, spec: &PodSpec) {
        if !self.rt.materializes_volumes() {
            return;
        }
        let fetch = |s: volumes::SourceRef| async move { self.fetch_source(spec, s).await };
        if let Err(e) = volumes::prepare(&spec.raw, &self.data_dir, &self.info, fetch).await {
            tracing::debug!(pod = %format!("{}/{}", spec.namespace, spec.name), error = %e, "volumes not refreshed");
        }
    }

    /// Unmounts and removes a pod's volumes, once it is gone for good.
    async fn cleanup_volumes(&self, uid: &str) {
        if !self.rt.materializes_volumes() {
            return;
        }
        let (dir, id) = (self.data_dir.clone(), uid.to_string());
        let res = tokio::task::spawn_blocking(move || volumes::cleanup(&dir, &id)).await;
        if let Some(e) = res.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())).err() {
            tracing::warn!(pod_uid = %uid, error = %e, "volume cleanup failed; housekeeping retries");
        }
    }

    /// Runs a container's lifecycle hook (`postStart` or `preStop`), if it has one.
    async fn hook(
        &self,
        c: &pods::ContainerSpec,
        which: &str,
        id: &str,
        pod_ip: Option<std::net::IpAddr>,
        timeout: Duration,
    ) -> Result<(), String> {
        let h = &c.raw["lifecycle"][which];
        if !h.is_object() {
            return Ok(());
        }
        if let Some(secs) = h["sleep"]["seconds"].as_u64() {
            tokio::time::sleep(Duration::from_secs(secs).min(timeout)).await;
            return Ok(());
        }
        let action = crate::prober::Action::parse(h, &c.raw).ok_or("unsupported or invalid handler")?;
        let (rt, id) = (self.rt.clone(), id.to_string());
        crate::prober::run_action(&action, timeout, pod_ip, move |cmd, _| exec_quiet(rt, id, cmd)).await
    }

    /// Registry credentials from the pod's imagePullSecrets.
    async fn pull_auth(&self, spec: &PodSpec) -> Vec<RegistryAuth> {
        let mut out = Vec::new();
        for s in spec.raw["spec"]["imagePullSecrets"].as_array().into_iter().flatten() {
            let Some(name) = s["name"].as_str() else { continue };
            match self.fetch("secrets", &spec.namespace, name).await {
                Ok(Some(secret)) => out.extend(registry_auths(&secret)),
                Ok(None) => tracing::warn!(pod = %spec.name, secret = name, "imagePullSecret not found"),
                Err(e) => tracing::warn!(pod = %spec.name, secret = name, error = %e, "imagePullSecret unreadable"),
            }
        }
        out
    }

    async fn fetch(&self, resource: &str, ns: &str, name: &str) -> Result<Option<Value>, RuntimeError> {
        let req = NodeRequest::Get { resource: resource.into(), namespace: ns.into(), name: name.into() };
        match self.masters.request(&req).await {
            Ok(NodeResponse::Object { json }) => serde_json::from_slice(&json)
                .map(Some)
                .map_err(|e| RuntimeError::Other(format!("{resource} {ns}/{name}: {e}"))),
            Ok(NodeResponse::Error { code: 404, .. }) => Ok(None),
            Ok(NodeResponse::Error { message, .. }) => Err(RuntimeError::Other(message)),
            Ok(other) => Err(RuntimeError::Other(format!("unexpected answer {other:?}"))),
            Err(e) => Err(RuntimeError::Other(format!("{e:#}"))),
        }
    }

    /// A key of a ConfigMap (data or binaryData) or Secret (base64 data).
    async fn key_of(&self, kind: SourceKind, ns: &str, sel: &Value) -> Result<Option<String>, RuntimeError> {
        let name = sel["name"].as_str().unwrap_or_default();
        let key = sel["key"].as_str().unwrap_or_default();
        let optional = sel["optional"].as_bool().unwrap_or(false);
        let obj = self.fetch(kind.resource(), ns, name).await?;
        let value = obj.as_ref().and_then(|o| data_of(kind, o).remove(key));
        let what = kind.singular();
        match value {
            Some(v) => Ok(Some(v)),
            None if optional => Ok(None),
            None if obj.is_none() => Err(RuntimeError::Other(format!("{what} {name:?} not found"))),
            None => Err(RuntimeError::Other(format!("couldn't find key {key} in {what} {ns}/{name}"))),
        }
    }

    async fn env(&self, spec: &PodSpec, c: &Value) -> Result<Vec<(String, String)>, RuntimeError> {
        let ns = spec.namespace.as_str();
        let mut out: Vec<(String, String)> = Vec::new();
        for from in c["envFrom"].as_array().into_iter().flatten() {
            let prefix = from["prefix"].as_str().unwrap_or_default();
            for (kind, field) in [(SourceKind::ConfigMap, "configMapRef"), (SourceKind::Secret, "secretRef")] {
                let sel = &from[field];
                let Some(name) = sel["name"].as_str() else { continue };
                match self.fetch(kind.resource(), ns, name).await? {
                    Some(obj) => out.extend(data_of(kind, &obj).into_iter().map(|(k, v)| (format!("{prefix}{k}"), v))),
                    None if sel["optional"].as_bool().unwrap_or(false) => {}
                    None => return Err(RuntimeError::Other(format!("{} {name:?} not found", kind.singular()))),
                }
            }
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let Some(name) = e["name"].as_str() else { continue };
            let from = &e["valueFrom"];
            let value = if let Some(v) = e["value"].as_str() {
                Some(expand(v, &out))
            } else if from["configMapKeyRef"].is_object() {
                self.key_of(SourceKind::ConfigMap, ns, &from["configMapKeyRef"]).await?
            } else if from["secretKeyRef"].is_object() {
                self.key_of(SourceKind::Secret, ns, &from["secretKeyRef"]).await?
            } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                Some(field_ref(&spec.raw, path, &self.info))
            } else if from.is_object() {
                None
            } else {
                Some(String::new())
            };
            if let Some(v) = value {
                out.retain(|(k, _)| k != name);
                out.push((name.to_string(), v));
            }
        }
        Ok(out)
    }

    /// Stops and removes what belongs to no pod the masters listed.
    async fn housekeeping(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if !self.listed.load(std::sync::atomic::Ordering::Acquire) {
                continue;
            }
            let Ok(obs) = self.observe(true).await else { continue };
            let known: HashSet<String> = self.workers.lock().keys().cloned().collect();
            for c in obs.containers.iter().filter(|c| !known.contains(&c.pod_uid)) {
                tracing::info!(container = %c.id, pod_uid = %c.pod_uid, "removing a container of no known pod");
                let _ = self.rt.stop_container(&c.id, Duration::from_secs(2)).await;
                let _ = self.rt.remove_container(&c.id).await;
            }
            for s in obs.sandboxes.iter().filter(|s| !known.contains(&s.pod_uid)) {
                let _ = self.rt.remove_sandbox(&s.id).await;
            }
            for uid in volumes::pods_with_volumes(&self.data_dir).iter().filter(|u| !known.contains(*u)) {
                if !self.workers.lock().contains_key(uid) {
                    self.cleanup_volumes(uid).await;
                }
            }
            release_free_memory();
        }
    }

    /// Removes the local-path directories of deleted PersistentVolumes
    /// (`localpath.rs`): first once the pod listing is in (so the pods'
    /// hostPaths are known), then every `RECLAIM_EVERY`.
    async fn reclaim_local_paths(self: Arc<Self>, root: PathBuf) {
        while !self.listed.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let this = &self;
        loop {
            let lookup = |pv: String| async move {
                match this.fetch("persistentvolumes", "", &pv).await {
                    Ok(Some(_)) => crate::localpath::Lookup::Exists,
                    Ok(None) => crate::localpath::Lookup::Gone,
                    Err(e) => crate::localpath::Lookup::Failed(e.to_string()),
                }
            };
            crate::localpath::reclaim(&root, lookup, || self.paths_in_use()).await;
            tokio::time::sleep(crate::localpath::RECLAIM_EVERY).await;
        }
    }

    /// The host paths this node's pods use: what their claim volumes
    /// resolved to (recorded on disk, so it holds across agent restarts)
    /// and the hostPath volumes of every pod it knows.
    fn paths_in_use(&self) -> Vec<PathBuf> {
        let mut paths = volumes::claimed_paths(&self.data_dir);
        for tx in self.workers.lock().values() {
            paths.extend(tx.borrow().iter().flat_map(|spec| volumes::host_paths(&spec.raw)));
        }
        paths
    }
}

/// Runs `cmd` in container `id`, discarding its output; its exit code.
async fn exec_quiet<R: Runtime>(rt: Arc<R>, id: String, cmd: Vec<String>) -> Result<i32, String> {
    let (otx, mut orx) = tokio::sync::mpsc::channel(16);
    let (etx, mut erx) = tokio::sync::mpsc::channel(16);
    let io = ExecIo { stdin: None, stdout: otx, stderr: etx, resize: None };
    let drain = async {
        while orx.recv().await.is_some() {}
        while erx.recv().await.is_some() {}
    };
    let (r, ()) = tokio::join!(rt.exec(&id, &cmd, false, io), drain);
    r.map_err(|e| e.to_string())
}

/// Credentials in a `kubernetes.io/dockerconfigjson` (or legacy
/// `dockercfg`) Secret: per registry, a username and password, or `auth`
/// (base64 of `user:password`).
pub fn registry_auths(secret: &Value) -> Vec<RegistryAuth> {
    let data = data_of(SourceKind::Secret, secret);
    let parsed: Option<Value> = data
        .get(".dockerconfigjson")
        .and_then(|j| serde_json::from_str::<Value>(j).ok())
        .map(|v| v["auths"].clone())
        .or_else(|| data.get(".dockercfg").and_then(|j| serde_json::from_str(j).ok()));
    let mut out = Vec::new();
    for (registry, a) in parsed.as_ref().and_then(Value::as_object).into_iter().flatten() {
        let (mut user, mut pass) = (
            a["username"].as_str().unwrap_or_default().to_string(),
            a["password"].as_str().unwrap_or_default().to_string(),
        );
        if let Some(auth) = a["auth"].as_str() {
            use base64::Engine;
            if let Some((u, p)) = base64::engine::general_purpose::STANDARD
                .decode(auth)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())))
            {
                (user, pass) = (u, p);
            }
        }
        let registry = registry.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
        let registry = registry.split('/').next().unwrap_or(registry).to_string();
        if !user.is_empty() {
            out.push(RegistryAuth { registry, username: user, password: pass });
        }
    }
    out
}

/// A ConfigMap's or Secret's data as strings (the volume code's decoding).
pub fn data_of(kind: SourceKind, obj: &Value) -> std::collections::BTreeMap<String, String> {
    volumes::data_bytes(kind, obj).into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned())).collect()
}

/// `$(VAR)` references to earlier variables, as Kubernetes expands them
/// (`$$` escapes; unknown references stay as written).
pub fn expand(v: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(end) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let name = &after[1..end + 1];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, val)) => out.push_str(val),
                None => out.push_str(&rest[i..i + end + 3]),
            }
            rest = &after[end + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The downward API's fieldRef values.
pub fn field_ref(pod: &Value, path: &str, node: &NodeInfo) -> String {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    match path {
        "metadata.name" => s(&pod["metadata"]["name"]),
        "metadata.namespace" => s(&pod["metadata"]["namespace"]),
        "metadata.uid" => s(&pod["metadata"]["uid"]),
        "spec.nodeName" => node.name.clone(),
        "spec.serviceAccountName" => s(&pod["spec"]["serviceAccountName"]),
        "status.hostIP" | "status.hostIPs" => node.host_ip.clone(),
        "status.podIP" | "status.podIPs" => s(&pod["status"]["podIP"]),
        p => {
            let label = |kind: &str| {
                p.strip_prefix(&format!("metadata.{kind}['"))
                    .and_then(|r| r.strip_suffix("']"))
                    .map(|k| s(&pod["metadata"][kind][k]))
            };
            label("labels").or_else(|| label("annotations")).unwrap_or_default()
        }
    }
}

fn host_ports(pod: &Value) -> Vec<PortMapping> {
    let mut out = Vec::new();
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        for p in c["ports"].as_array().into_iter().flatten() {
            let (Some(cp), Some(hp)) = (p["containerPort"].as_u64(), p["hostPort"].as_u64()) else { continue };
            if hp == 0 || hp > 65535 || cp > 65535 {
                continue;
            }
            out.push(PortMapping {
                container_port: cp as u16,
                host_port: hp as u16,
                protocol: p["protocol"].as_str().unwrap_or("TCP").to_string(),
                host_ip: p["hostIP"].as_str().and_then(|h| h.parse().ok()),
            });
        }
    }
    out
}

fn container_spec<'a>(spec: &'a PodSpec, name: &str) -> Option<&'a pods::ContainerSpec> {
    spec.all().find(|c| c.name == name)
}

/// Hands the heap's free pages back to the kernel. glibc keeps what a
/// burst of pods freed in its per-thread arenas: an idle agent that had
/// run 100 pods at once held 34 MiB instead of 20. A trim every
/// housekeeping round costs well under a millisecond.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// CPU quantity ("250m", "1", "0.5") in millicores.
pub fn millicores(q: &str) -> Option<u64> {
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    q.parse::<f64>().ok().filter(|v| *v >= 0.0).map(|v| (v * 1000.0).round() as u64)
}

/// Memory quantity ("64Mi", "1G", "1000") in bytes.
pub fn bytes_of(q: &str) -> Option<u64> {
    const UNITS: [(&str, u64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    for (suffix, mult) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().filter(|v| *v >= 0.0).map(|v| (v * mult as f64) as u64);
        }
    }
    q.parse::<f64>().ok().filter(|v| *v >= 0.0).map(|v| v as u64)
}

/// Stops and removes everything the runtime runs for pods, and their
/// volumes (a node leaving for good; `capstan up` stopping).
pub async fn teardown_all<R: Runtime>(rt: &R, data_dir: &std::path::Path) {
    let grace = Duration::from_secs(5);
    if let Ok(containers) = rt.list_containers().await {
        let stops = containers.iter().map(|c| rt.stop_container(&c.id, grace));
        futures::future::join_all(stops).await;
        for c in &containers {
            if let Err(e) = rt.remove_container(&c.id).await {
                tracing::warn!(container = %c.id, error = %e, "teardown: remove failed");
            }
        }
    }
    if let Ok(sandboxes) = rt.list_sandboxes().await {
        for s in sandboxes {
            if let Err(e) = rt.remove_sandbox(&s.id).await {
                tracing::warn!(sandbox = %s.id, error = %e, "teardown: remove failed");
            }
        }
    }
    if rt.materializes_volumes() {
        for uid in volumes::pods_with_volumes(data_dir) {
            if let Err(e) = volumes::cleanup(data_dir, &uid) {
                tracing::warn!(pod_uid = %uid, error = %e, "teardown: volume cleanup failed");
            }
        }
    }
    tracing::info!("torn down every pod of this node");
}

/// Starts the agent(s) for the command line.
pub async fn serve<R: Runtime>(
    info: NodeInfo,
    masters: Arc<Masters>,
    rt: Arc<R>,
    data_dir: PathBuf,
    metrics: crate::metrics::AgentMetrics,
) -> anyhow::Result<()> {
    Agent::new(info, masters, rt, data_dir, metrics).run().await.context("agent")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(millicores("250m"), Some(250));
        assert_eq!(millicores("1"), Some(1000));
        assert_eq!(millicores("0.5"), Some(500));
        assert_eq!(millicores("x"), None);
        assert_eq!(bytes_of("64Mi"), Some(64 << 20));
        assert_eq!(bytes_of("1G"), Some(1_000_000_000));
        assert_eq!(bytes_of("1000"), Some(1000));
        assert_eq!(bytes_of("-1"), None);
    }

    #[test]
    fn pull_secrets_give_registry_credentials() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let cfg = json!({"auths": {
            "127.0.0.1:5000": {"auth": b64("alice:pw1")},
            "https://reg.example/v1/": {"username": "bob", "password": "pw2"},
            "anonymous.example": {}
        }});
        let secret =
            json!({"type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": b64(&cfg.to_string())}});
        let mut got: Vec<(String, String, String)> =
            registry_auths(&secret).into_iter().map(|a| (a.registry, a.username, a.password)).collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("127.0.0.1:5000".to_string(), "alice".to_string(), "pw1".to_string()),
                ("reg.example".to_string(), "bob".to_string(), "pw2".to_string())
            ]
        );
        assert!(registry_auths(&json!({"data": {".dockerconfigjson": b64("not json")}})).is_empty());
        assert!(registry_auths(&json!({})).is_empty());
    }

    #[test]
    fn env_references_expand_like_kubernetes() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "x-$(B)-$(A)-$");
        assert_eq!(expand("plain", &env), "plain");
    }

    #[test]
    fn downward_api_and_data_of() {
        let pod = json!({"metadata": {"name": "p", "namespace": "n", "labels": {"app": "web"}}, "status": {"podIP": "1.2.3.4"}});
        let node = NodeInfo::from_host("n1", "10.0.0.9", "sim");
        assert_eq!(field_ref(&pod, "metadata.labels['app']", &node), "web");
        assert_eq!(field_ref(&pod, "spec.nodeName", &node), "n1");
        assert_eq!(field_ref(&pod, "status.hostIP", &node), "10.0.0.9");
        let secret = json!({"data": {"k": "aGVsbG8=", "bad": "%%%"}});
        assert_eq!(
            data_of(SourceKind::Secret, &secret).into_iter().collect::<Vec<_>>(),
            [("k".to_string(), "hello".to_string())]
        );
        let cm = json!({"data": {"a": "1"}, "binaryData": {"b": "Mg=="}});
        assert_eq!(data_of(SourceKind::ConfigMap, &cm).len(), 2);
    }

    #[test]
    fn node_status_keeps_transition_times_of_unchanged_conditions() {
        let node = NodeInfo::from_host("n1", "127.0.0.1", "sim://0");
        let first = node.status("2026-01-01T00:00:00Z");
        let mut second = node.status("2026-01-01T00:01:00Z");
        keep_transitions(&mut second, &first);
        let ready = second["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
        assert_eq!(ready["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(ready["lastHeartbeatTime"], "2026-01-01T00:01:00Z");
        let obj = node.node_object("t");
        assert_eq!(obj["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        assert!(obj["status"]["capacity"]["cpu"].as_str().unwrap().parse::<u32>().unwrap() >= 1);
        assert!(obj["metadata"].get("annotations").is_none());
    }

    #[test]
    fn the_node_advertises_its_labels_and_local_path_root() {
        let mut node = NodeInfo::from_host("n1", "127.0.0.1", "sim://0");
        node.labels.push(("kubernetes.io/arch".into(), "arm64".into()));
        node.labels.push(("zone".into(), "a".into()));
        node.local_path_root = Some(PathBuf::from("/var/lib/capstan/local-path"));
        let obj = node.node_object("t");
        assert_eq!(obj["metadata"]["annotations"]["capstan.io/local-path-root"], "/var/lib/capstan/local-path");
        let labels = &obj["metadata"]["labels"];
        assert_eq!((&labels["kubernetes.io/hostname"], &labels["zone"]), (&json!("n1"), &json!("a")));
        assert_eq!(labels["kubernetes.io/arch"], "arm64", "given labels win over the well-known ones");
        assert_eq!(node.all_labels().len(), 6);
    }
}
