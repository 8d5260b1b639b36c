//! The pod worker's decisions, pure: given a pod (desired state from the
//! masters), what the runtime reports about it, the worker's own memory
//! (back-offs, probe results, start errors) and `now`, [`plan`] says what to
//! do next and [`status`] what to report. The shell (`agent.rs`) executes
//! actions against a [`Runtime`](crate::runtime::Runtime) and calls again.
//!
//! Kubernetes' rules, as the kubelet applies them:
//! - a sandbox first; init containers one at a time, in order, each to
//!   success; then every app container; ephemeral containers (`kubectl
//!   debug`) once each, never restarted, whenever they are added;
//! - restartPolicy Always restarts any exited container, OnFailure only a
//!   failed one, Never none; the first restart is immediate, later ones
//!   back off 10 s doubling to 5 min (reason `CrashLoopBackOff` while
//!   waiting), reset after 10 min of running;
//! - a failing liveness (or startup) probe kills the container, which the
//!   restart policy then handles; readiness gates the Ready condition;
//! - a pod being deleted, or finished for good, has its containers stopped
//!   (grace period honoured), then its sandbox removed; a deleted one is then
//!   reported terminated so the master removes the object.
//!
//! Each attempt of a container is a separate runtime container labelled
//! with its attempt number (= restartCount); the previous attempt is kept
//! for `lastState` and `kubectl logs --previous`, older ones are removed.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::runtime::{ContainerState, ContainerStatus, PullPolicy, Sandbox};

pub const BACKOFF_START: Duration = Duration::from_secs(10);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long without exiting resets its back-off.
pub const BACKOFF_RESET: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// The parts of a container spec the worker decides on.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub pull_policy: PullPolicy,
    /// The container's spec as JSON (command, env, probes, ...).
    pub raw: Value,
}

/// A pod as the worker sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSpec {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub init: Vec<ContainerSpec>,
    pub containers: Vec<ContainerSpec>,
    /// `kubectl debug`'s containers: run once, never restarted or probed.
    pub ephemeral: Vec<ContainerSpec>,
    pub restart_policy: RestartPolicy,
    pub grace: Duration,
    pub deleting: bool,
    pub host_network: bool,
    /// The whole pod (for status, volumes, env).
    pub raw: Value,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("pod {0}: {1}")]
pub struct SpecError(String, String);

fn pull_policy(c: &Value, image: &str) -> PullPolicy {
    match c["imagePullPolicy"].as_str() {
        Some("Always") => PullPolicy::Always,
        Some("Never") => PullPolicy::Never,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        // Kubernetes' default: Always for :latest or no tag, else IfNotPresent.
        _ => {
            let last = image.rsplit('/').next().unwrap_or(image);
            if image.contains('@') || (last.contains(':') && !last.ends_with(":latest")) {
                PullPolicy::IfNotPresent
            } else {
                PullPolicy::Always
            }
        }
    }
}

impl PodSpec {
    pub fn parse(pod: &Value) -> Result<PodSpec, SpecError> {
        let meta = &pod["metadata"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let key = format!("{}/{}", s(&meta["namespace"]), s(&meta["name"]));
        let containers = |list: &str| -> Result<Vec<ContainerSpec>, SpecError> {
            pod["spec"][list]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let name = s(&c["name"]);
                    let image = s(&c["image"]);
                    if name.is_empty() || image.is_empty() {
                        return Err(SpecError(key.clone(), format!("a container in {list} has no name or image")));
                    }
                    Ok(ContainerSpec { pull_policy: pull_policy(c, &image), name, image, raw: c.clone() })
                })
                .collect()
        };
        let restart_policy = match pod["spec"]["restartPolicy"].as_str() {
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            _ => RestartPolicy::Always,
        };
        let grace = meta["deletionGracePeriodSeconds"]
            .as_i64()
            .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30)
            .max(0);
        let spec = PodSpec {
            uid: s(&meta["uid"]),
            namespace: s(&meta["namespace"]),
            name: s(&meta["name"]),
            init: containers("initContainers")?,
            containers: containers("containers")?,
            ephemeral: containers("ephemeralContainers")?,
            restart_policy,
            grace: Duration::from_secs(grace as u64),
            deleting: meta["deletionTimestamp"].is_string(),
            host_network: pod["spec"]["hostNetwork"].as_bool().unwrap_or(false),
            raw: pod.clone(),
        };
        if spec.uid.is_empty() || spec.containers.is_empty() {
            return Err(SpecError(key, "no uid or no containers".into()));
        }
        Ok(spec)
    }

    /// Every container the pod names: init, app, then ephemeral.
    pub fn all(&self) -> impl Iterator<Item = &ContainerSpec> {
        self.init.iter().chain(&self.containers).chain(&self.ephemeral)
    }
}

/// Back-off of one container's restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub delay: Duration,
    /// No restart before this.
    pub until: SystemTime,
}

/// Why a container is waiting (image pull or create errors), kept until it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
    /// Retry no earlier than this.
    pub retry_at: SystemTime,
    pub delay: Duration,
}

/// What the worker remembers between rounds (the runtime holds the rest).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    pub backoff: HashMap<String, Backoff>,
    pub waiting: HashMap<String, Waiting>,
    /// Container id -> ready (readiness probe; true when it has none).
    pub ready: HashMap<String, bool>,
    /// Container ids whose liveness or startup probe failed: to be killed.
    pub unhealthy: HashMap<String, String>,
    /// Container ids whose startup probe succeeded (or that have none).
    pub started: HashMap<String, bool>,
    /// Containers this worker already asked to stop (id -> when).
    pub stopping: HashMap<String, SystemTime>,
    pub sandbox_error: Option<Waiting>,
    pub start_time: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    RunSandbox,
    /// Pull if needed, create and start container `name` as attempt `attempt`.
    Start {
        name: String,
        init: bool,
        attempt: u32,
    },
    Stop {
        id: String,
        grace: Duration,
    },
    Remove {
        id: String,
    },
    RemoveSandbox,
    /// Everything is gone: tell the masters the pod may be removed.
    Terminated,
}

/// The pod's containers as the runtime reports them, latest attempt first per name.
pub struct Observed<'a> {
    pub sandbox: Option<&'a Sandbox>,
    pub containers: Vec<&'a ContainerStatus>,
}

impl<'a> Observed<'a> {
    /// Attempts of container `name`, newest first.
    fn attempts(&self, name: &str) -> Vec<&'a ContainerStatus> {
        let mut v: Vec<&ContainerStatus> = self.containers.iter().copied().filter(|c| c.name == name).collect();
        v.sort_by_key(|c| std::cmp::Reverse(c.attempt));
        v
    }

    fn latest(&self, name: &str) -> Option<&'a ContainerStatus> {
        self.attempts(name).into_iter().next()
    }
}

fn running(c: &ContainerStatus) -> bool {
    matches!(c.state, ContainerState::Running { .. } | ContainerState::Created)
}

fn exit_code(c: &ContainerStatus) -> Option<i32> {
    match c.state {
        ContainerState::Exited { exit_code, .. } => Some(exit_code),
        ContainerState::Unknown => Some(-1),
        _ => None,
    }
}

/// Whether an exited container restarts under `policy`.
pub fn restarts(policy: RestartPolicy, code: i32) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => code != 0,
        RestartPolicy::Never => false,
    }
}

/// The next back-off after a container exits at `now` having run `ran`:
/// the first restart is immediate (as the kubelet's), then 10 s doubling
/// to 5 min; a long run starts over.
pub fn next_backoff(prev: Option<&Backoff>, ran: Duration, now: SystemTime) -> Backoff {
    let delay = match prev {
        Some(b) if ran < BACKOFF_RESET && b.delay.is_zero() => BACKOFF_START,
        Some(b) if ran < BACKOFF_RESET => (b.delay * 2).min(BACKOFF_MAX),
        _ => Duration::ZERO,
    };
    Backoff { delay, until: now + delay }
}

/// Has the pod finished for good (nothing will run again)?
pub fn finished(pod: &PodSpec, obs: &Observed) -> Option<&'static str> {
    let inits_failed = pod.restart_policy == RestartPolicy::Never
        && pod.init.iter().any(|c| obs.latest(&c.name).and_then(exit_code).is_some_and(|code| code != 0));
    if inits_failed {
        return Some("Failed");
    }
    let mut all_done = true;
    let mut any_failed = false;
    for c in &pod.containers {
        match obs.latest(&c.name).and_then(exit_code) {
            Some(code) if !restarts(pod.restart_policy, code) => any_failed |= code != 0,
            _ => all_done = false,
        }
    }
    all_done.then_some(if any_failed { "Failed" } else { "Succeeded" })
}

/// What to do next, and when to look again at the latest.
pub fn plan(pod: &PodSpec, obs: &Observed, mem: &Memory, now: SystemTime) -> (Vec<Action>, Option<Duration>) {
    let mut actions = Vec::new();
    let mut wake: Option<Duration> = None;
    let mut wake_at = |t: SystemTime| {
        let d = t.duration_since(now).unwrap_or_default();
        wake = Some(wake.map_or(d, |w: Duration| w.min(d)));
    };
    // Garbage: attempts older than the previous one, once exited.
    for spec in pod.all() {
        for old in obs.attempts(&spec.name).into_iter().skip(2) {
            if !running(old) {
                actions.push(Action::Remove { id: old.id.clone() });
            }
        }
    }
    // Containers the pod no longer names (or with no name) are stopped and removed.
    for c in &obs.containers {
        let known = pod.all().any(|s| s.name == c.name);
        if !known {
            if running(c) {
                actions.push(Action::Stop { id: c.id.clone(), grace: pod.grace });
            } else {
                actions.push(Action::Remove { id: c.id.clone() });
            }
        }
    }

    if pod.deleting || finished(pod, obs).is_some() {
        let live: Vec<&&ContainerStatus> = obs.containers.iter().filter(|c| running(c)).collect();
        for c in &live {
            if !mem.stopping.contains_key(&c.id) {
                actions.push(Action::Stop { id: c.id.clone(), grace: pod.grace });
            }
        }
        if live.is_empty() {
            if pod.deleting {
                for c in &obs.containers {
                    actions.push(Action::Remove { id: c.id.clone() });
                }
                if obs.sandbox.is_some() {
                    actions.push(Action::RemoveSandbox);
                }
                actions.push(Action::Terminated);
            } else if obs.sandbox.is_some() {
                // Finished: the containers stay (for logs and status), the network goes.
                actions.push(Action::RemoveSandbox);
            }
        } else {
            wake = Some(Duration::from_secs(1));
        }
        return (dedup(actions), wake);
    }

    // Liveness/startup failures: stop, the restart policy decides the rest.
    for c in &obs.containers {
        if running(c) && mem.unhealthy.contains_key(&c.id) && !mem.stopping.contains_key(&c.id) {
            actions.push(Action::Stop { id: c.id.clone(), grace: pod.grace });
        }
    }

    if obs.sandbox.is_none() {
        match &mem.sandbox_error {
            Some(w) if w.retry_at > now => wake_at(w.retry_at),
            _ => actions.push(Action::RunSandbox),
        }
        return (dedup(actions), wake);
    }

    // Init containers, one at a time.
    for spec in &pod.init {
        match obs.latest(&spec.name) {
            None => {
                if let Some(a) = start_or_wait(spec, true, 0, mem, now, &mut wake_at) {
                    actions.push(a);
                }
                return (dedup(actions), wake);
            }
            Some(c) if running(c) => return (dedup(actions), wake),
            Some(c) => {
                let code = exit_code(c).unwrap_or(-1);
                if code == 0 {
                    continue;
                }
                if pod.restart_policy == RestartPolicy::Never {
                    return (dedup(actions), wake); // finished() reports Failed
                }
                if let Some(a) = restart(spec, true, c, mem, now, &mut wake_at) {
                    actions.push(a);
                }
                return (dedup(actions), wake);
            }
        }
    }

    for spec in &pod.containers {
        match obs.latest(&spec.name) {
            None => actions.extend(start_or_wait(spec, false, 0, mem, now, &mut wake_at)),
            Some(c) if running(c) => {}
            Some(c) => {
                if restarts(pod.restart_policy, exit_code(c).unwrap_or(-1)) {
                    actions.extend(restart(spec, false, c, mem, now, &mut wake_at));
                }
            }
        }
    }
    // Ephemeral containers run once: started when first seen, never again.
    for spec in &pod.ephemeral {
        if obs.latest(&spec.name).is_none() {
            actions.extend(start_or_wait(spec, false, 0, mem, now, &mut wake_at));
        }
    }
    (dedup(actions), wake)
}

fn dedup(actions: Vec<Action>) -> Vec<Action> {
    let mut out: Vec<Action> = Vec::with_capacity(actions.len());
    for a in actions {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

fn start_or_wait(
    spec: &ContainerSpec,
    init: bool,
    attempt: u32,
    mem: &Memory,
    now: SystemTime,
    wake_at: &mut impl FnMut(SystemTime),
) -> Option<Action> {
    match mem.waiting.get(&spec.name) {
        Some(w) if w.retry_at > now => {
            wake_at(w.retry_at);
            None
        }
        _ => Some(Action::Start { name: spec.name.clone(), init, attempt }),
    }
}

fn restart(
    spec: &ContainerSpec,
    init: bool,
    last: &ContainerStatus,
    mem: &Memory,
    now: SystemTime,
    wake_at: &mut impl FnMut(SystemTime),
) -> Option<Action> {
    if let Some(b) = mem.backoff.get(&spec.name) {
        if b.until > now {
            wake_at(b.until);
            return None;
        }
    }
    start_or_wait(spec, init, last.attempt + 1, mem, now, wake_at)
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn terminated(c: &ContainerStatus) -> Option<Value> {
    let ContainerState::Exited { started_at, finished_at, exit_code, oom_killed } = c.state else {
        return None;
    };
    let reason = if oom_killed {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    };
    let mut t = json!({
        "exitCode": exit_code, "reason": reason, "finishedAt": rfc3339(finished_at), "containerID": container_id(c),
    });
    if let Some(s) = started_at {
        t["startedAt"] = json!(rfc3339(s));
    }
    Some(t)
}

pub fn container_id(c: &ContainerStatus) -> String {
    format!("containerd://{}", c.id)
}

fn state_of(c: &ContainerStatus) -> Value {
    match &c.state {
        ContainerState::Running { started_at } => json!({"running": {"startedAt": rfc3339(*started_at)}}),
        ContainerState::Created => json!({"waiting": {"reason": "ContainerCreating"}}),
        ContainerState::Unknown => json!({"terminated": {"exitCode": 255, "reason": "Unknown"}}),
        ContainerState::Exited { .. } => json!({"terminated": terminated(c)}),
    }
}

/// One entry of containerStatuses / initContainerStatuses.
fn container_status(
    pod: &PodSpec,
    spec: &ContainerSpec,
    obs: &Observed,
    mem: &Memory,
    now: SystemTime,
    init: bool,
) -> Value {
    let attempts = obs.attempts(&spec.name);
    let latest = attempts.first().copied();
    let mut st = json!({
        "name": spec.name, "image": spec.image, "imageID": "", "restartCount": latest.map_or(0, |c| c.attempt),
        "ready": false, "started": false,
    });
    if let Some(prev) = attempts.get(1) {
        if let Some(t) = terminated(prev) {
            st["lastState"] = json!({"terminated": t});
        }
    }
    let waiting_reason = |mem: &Memory| mem.waiting.get(&spec.name).map(|w| (w.reason.clone(), w.message.clone()));
    match latest {
        None => {
            let (reason, message) = waiting_reason(mem).unwrap_or(("PodInitializing".into(), String::new()));
            let reason = if init || reason != "PodInitializing" { reason } else { "ContainerCreating".into() };
            st["state"] = waiting_state(&reason, &message);
        }
        Some(c) => {
            st["imageID"] = json!(c.image_id);
            st["containerID"] = json!(container_id(c));
            let in_backoff = mem.backoff.get(&spec.name).is_some_and(|b| b.until > now);
            let will_restart = exit_code(c).is_some_and(|code| {
                if init {
                    code != 0 && pod.restart_policy != RestartPolicy::Never
                } else {
                    restarts(pod.restart_policy, code)
                }
            });
            if will_restart && (in_backoff || mem.waiting.contains_key(&spec.name)) {
                // Waiting to restart: the exit moves to lastState.
                let (reason, message) = waiting_reason(mem).unwrap_or_else(|| {
                    let delay = mem.backoff.get(&spec.name).map_or(BACKOFF_START, |b| b.delay);
                    let message = format!(
                        "back-off {}s restarting failed container={} pod={}_{}({})",
                        delay.as_secs(),
                        spec.name,
                        pod.name,
                        pod.namespace,
                        pod.uid
                    );
                    ("CrashLoopBackOff".into(), message)
                });
                st["state"] = json!({"waiting": {"reason": reason, "message": message}});
                if let Some(t) = terminated(c) {
                    st["lastState"] = json!({"terminated": t});
                }
            } else {
                st["state"] = state_of(c);
            }
            let is_running = matches!(c.state, ContainerState::Running { .. });
            st["started"] = json!(is_running && mem.started.get(&c.id).copied().unwrap_or(true));
            st["ready"] = json!(is_running && !init && mem.ready.get(&c.id).copied().unwrap_or(false));
            if init {
                st["ready"] = json!(exit_code(c) == Some(0));
            }
        }
    }
    st
}

/// A `waiting` state, with its message when there is one.
fn waiting_state(reason: &str, message: &str) -> Value {
    let mut w = json!({"waiting": {"reason": reason}});
    if !message.is_empty() {
        w["waiting"]["message"] = json!(message);
    }
    w
}

/// One entry of ephemeralContainerStatuses: its state as it is (never
/// restarted, never ready: Kubernetes reports them so).
fn ephemeral_status(spec: &ContainerSpec, obs: &Observed, mem: &Memory) -> Value {
    let mut st = json!({
        "name": spec.name, "image": spec.image, "imageID": "", "restartCount": 0, "ready": false,
    });
    match obs.latest(&spec.name) {
        None => {
            let (reason, message) = mem
                .waiting
                .get(&spec.name)
                .map_or(("ContainerCreating".into(), String::new()), |w| (w.reason.clone(), w.message.clone()));
            st["state"] = waiting_state(&reason, &message);
        }
        Some(c) => {
            st["imageID"] = json!(c.image_id);
            st["containerID"] = json!(container_id(c));
            st["state"] = state_of(c);
        }
    }
    st
}

/// The PodStatus to report; `prev` is the last one reported (condition
/// transition times carry over while a condition holds).
pub fn status(pod: &PodSpec, obs: &Observed, mem: &Memory, now: SystemTime, host_ip: &str, prev: &Value) -> Value {
    let inits: Vec<Value> = pod.init.iter().map(|c| container_status(pod, c, obs, mem, now, true)).collect();
    let apps: Vec<Value> = pod.containers.iter().map(|c| container_status(pod, c, obs, mem, now, false)).collect();
    let initialized = pod.init.iter().all(|c| obs.latest(&c.name).and_then(exit_code) == Some(0));
    let ready = initialized && apps.iter().all(|c| c["ready"] == json!(true));
    let any_running = pod.containers.iter().any(|c| obs.latest(&c.name).is_some_and(running));
    let phase = match finished(pod, obs) {
        Some(p) => p,
        None if initialized && (any_running || apps.iter().any(|c| c["restartCount"].as_u64() > Some(0))) => "Running",
        None => "Pending",
    };
    let cond = |t: &str, ok: bool, reason: Option<&str>| {
        let mut c = json!({"type": t, "status": if ok { "True" } else { "False" }, "lastProbeTime": null});
        if let Some(r) = reason.filter(|_| !ok) {
            c["reason"] = json!(r);
        }
        c
    };
    let not_ready_reason =
        if phase == "Succeeded" || phase == "Failed" { "PodCompleted" } else { "ContainersNotReady" };
    let mut conditions = vec![
        cond("PodReadyToStartContainers", obs.sandbox.is_some(), None),
        cond("Initialized", initialized, Some("ContainersNotInitialized")),
        cond("Ready", ready, Some(not_ready_reason)),
        cond("ContainersReady", ready, Some(not_ready_reason)),
        cond("PodScheduled", true, None),
    ];
    // Keep the transition times the masters already hold when nothing changed.
    let old: BTreeMap<String, Value> = prev["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["type"].as_str()?.to_string(), c.clone())))
        .collect();
    for c in &mut conditions {
        let t = c["type"].as_str().unwrap_or_default().to_string();
        let same = old.get(&t).filter(|o| o["status"] == c["status"]);
        c["lastTransitionTime"] = same.map_or_else(|| json!(rfc3339(now)), |o| o["lastTransitionTime"].clone());
    }
    let mut st = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "containerStatuses": apps,
        "qosClass": qos_class(&pod.raw),
    });
    if !inits.is_empty() {
        st["initContainerStatuses"] = json!(inits);
    }
    if !pod.ephemeral.is_empty() {
        let eph: Vec<Value> = pod.ephemeral.iter().map(|c| ephemeral_status(c, obs, mem)).collect();
        st["ephemeralContainerStatuses"] = json!(eph);
    }
    if let Some(t) = mem.start_time {
        st["startTime"] = json!(rfc3339(t));
    }
    let ip = if pod.host_network {
        Some(host_ip.to_string())
    } else {
        obs.sandbox.and_then(|s| s.ip).map(|ip| ip.to_string())
    };
    if let Some(ip) = ip {
        st["podIP"] = json!(ip);
        st["podIPs"] = json!([{"ip": ip}]);
    }
    if let Some(w) = &mem.sandbox_error {
        st["message"] = json!(w.message);
        st["reason"] = json!(w.reason);
    }
    st
}

/// Kubernetes' QoS class from requests and limits.
pub fn qos_class(pod: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|l| pod["spec"][*l].as_array().into_iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        for res in ["cpu", "memory"] {
            let req = &c["resources"]["requests"][res];
            let lim = &c["resources"]["limits"][res];
            any |= !req.is_null() || !lim.is_null();
            if lim.is_null() || (!req.is_null() && req != lim) {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

#[cfg(test)]
#[path = "pods_test.rs"]
mod tests;
