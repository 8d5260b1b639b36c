//! `capstan-bench pod-startup`: how long a pod takes from its create
//! request to Running, on real nodes (containerd), observed through a watch.
//!
//! Kubernetes' pod startup SLI (SIG Scalability, "schedulable stateless
//! pods"; p99 <= 5 s) runs from the pod's creation to all its containers
//! reported started as observed by a watch, *excluding* image pulls and
//! init containers. This bench measures it with these choices:
//!
//! - Start: just before the POST on the client's monotonic clock, so the
//!   API create (admission, the replicated write) is included; Kubernetes
//!   starts at `creationTimestamp`, after the write.
//! - End: the first watch event carrying `status.phase == Running` (and,
//!   reported apart, the first with the `Ready` condition True). Included:
//!   scheduling and binding, the agent learning of the pod, sandbox and
//!   network setup, container create and start, the status write, and the
//!   watch delivering it to this client.
//! - Excluded: image pulls (the image is already on the node and
//!   `imagePullPolicy: IfNotPresent`), init containers (none), readiness
//!   probes (none, so Ready follows Running), and any queueing in this
//!   client before the POST (`--concurrency` bounds the creates in flight;
//!   `--rate` paces them instead, for latency at a steady load rather than
//!   the time a burst takes to work through).
//!
//! Pods: `--image` running `sleep 3600`, `terminationGracePeriodSeconds:
//! 0`, labelled with this run so only they are watched. After they run
//! they are deleted and the bench waits for their DELETED events. With a
//! zero grace period the object can go before the agent has stopped the
//! containers, so it then waits (up to 60 s) for the containers' log
//! drivers to exit too (`containers_gone_s`). The RSS of the cluster's
//! agents, log drivers and masters (processes whose arguments mention
//! `--cluster-dir`) is reported before the pods, while they run, and after
//! they go (`procs.rs`). Prints one JSON object on stdout; progress on stderr.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::Kube;
use crate::stats::{secs3, summary_json};
use crate::{procs, watch};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// kubeconfig with the server, its CA and a client certificate (`capstan up` writes one).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Pods to create.
    #[arg(long, default_value_t = 100)]
    pub pods: u64,
    /// Creates (and deletes) in flight at once.
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
    /// Create at this steady rate (pods per second) instead of as fast as
    /// `--concurrency` allows: pod n is sent n/rate seconds after the first,
    /// as Kubernetes' density tests pace creates when they measure startup
    /// latency (a burst measures how long the node takes to work through
    /// the whole batch instead).
    #[arg(long)]
    pub rate: Option<f64>,
    /// An image already on the nodes (`capstan up` imports busybox:stable).
    #[arg(long, default_value = "busybox:stable")]
    pub image: String,
    /// Namespace for the pods (created if missing, kept afterwards).
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    /// Give up waiting for the pods to start, and again to go, after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Report the RSS of processes whose arguments contain this path
    /// [default: the kubeconfig's directory, which `capstan up` makes the
    /// cluster's]; `/` takes every Capstan process on the machine.
    #[arg(long)]
    pub cluster_dir: Option<PathBuf>,
}

/// Container states that will not turn into Running by themselves (or not
/// within a bench): the pod counts as failed, with the reason.
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerError",
    "CreateContainerConfigError",
    "RunContainerError",
    "CrashLoopBackOff",
];

#[derive(Clone, Debug, Default)]
struct PodTimes {
    sent: Option<Instant>,
    create_failed: bool,
    running: Option<Instant>,
    ready: Option<Instant>,
    failed: Option<String>,
    delete_sent: Option<Instant>,
    gone: Option<Instant>,
}

impl PodTimes {
    fn settled(&self) -> bool {
        self.create_failed || self.failed.is_some() || (self.running.is_some() && self.ready.is_some())
    }
}

/// What is known of each pod of the run, fed by the creators and the
/// watch; no IO, times are passed in.
#[derive(Default)]
pub(crate) struct Tracker {
    pods: HashMap<String, PodTimes>,
}

impl Tracker {
    pub fn sent(&mut self, name: &str, at: Instant) {
        self.pods.entry(name.to_string()).or_default().sent = Some(at);
    }

    pub fn create_failed(&mut self, name: &str) {
        self.pods.entry(name.to_string()).or_default().create_failed = true;
    }

    pub fn delete_sent(&mut self, name: &str, at: Instant) {
        if let Some(p) = self.pods.get_mut(name) {
            p.delete_sent = Some(at);
        }
    }

    /// A watch event on one of the run's pods (others are ignored).
    pub fn observe(&mut self, at: Instant, kind: &str, pod: &Value) {
        let Some(p) = pod["metadata"]["name"].as_str().and_then(|n| self.pods.get_mut(n)) else { return };
        if kind == "DELETED" {
            p.gone.get_or_insert(at);
            return;
        }
        let status = &pod["status"];
        match status["phase"].as_str() {
            Some("Running") => {
                p.running.get_or_insert(at);
            }
            Some(phase @ ("Failed" | "Succeeded")) => {
                p.failed.get_or_insert_with(|| format!("phase {phase}"));
            }
            _ => {}
        }
        let ready = status["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        if ready {
            p.ready.get_or_insert(at);
        }
        if p.running.is_none() {
            let stuck = status["containerStatuses"].as_array().into_iter().flatten().find_map(|c| {
                c["state"]["waiting"]["reason"].as_str().filter(|r| STUCK.contains(r)).map(str::to_string)
            });
            if let Some(reason) = stuck {
                p.failed.get_or_insert(reason);
            }
        }
    }

    /// All `total` pods were sent, and each runs and is ready, failed, or
    /// was never created.
    pub fn settled(&self, total: usize) -> bool {
        self.pods.len() >= total && self.pods.values().all(PodTimes::settled)
    }

    /// Pods the API accepted.
    pub fn created(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.pods.iter().filter(|(_, p)| !p.create_failed).map(|(n, _)| n.clone()).collect();
        names.sort();
        names
    }

    /// Every deleted pod is gone.
    pub fn all_gone(&self) -> bool {
        self.pods.values().filter(|p| p.delete_sent.is_some()).all(|p| p.gone.is_some())
    }

    /// Counts and latencies of the start (ms), and the Running throughput.
    pub fn startup_report(&self) -> Value {
        let since = |end: Option<Instant>, start: Option<Instant>| Some(end?.saturating_duration_since(start?));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let startup: Vec<f64> = self.pods.values().filter_map(|p| since(p.running, p.sent)).map(ms).collect();
        let ready: Vec<f64> = self.pods.values().filter_map(|p| since(p.ready, p.sent)).map(ms).collect();
        let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
        for p in self.pods.values() {
            if let Some(r) = &p.failed {
                *reasons.entry(r.clone()).or_default() += 1;
            }
        }
        let create_errors = self.pods.values().filter(|p| p.create_failed).count();
        let not_running = self.pods.values().filter(|p| !p.create_failed && p.running.is_none()).count();
        let first = self.pods.values().filter_map(|p| p.sent).min();
        let last = self.pods.values().filter_map(|p| p.running).max();
        let per_s = match (first, last) {
            (Some(f), Some(l)) if l > f => {
                Some((startup.len() as f64 / l.duration_since(f).as_secs_f64() * 10.0).round() / 10.0)
            }
            _ => None,
        };
        json!({
            "created": self.pods.len() - create_errors,
            "create_errors": create_errors,
            "running": startup.len(),
            "ready": ready.len(),
            // Created but never Running: stuck (by reason) or still pending at the timeout.
            "failures": create_errors + not_running,
            "failure_reasons": reasons,
            "duration_s": match (first, last) { (Some(f), Some(l)) => Some(secs3(l.saturating_duration_since(f).as_secs_f64())), _ => None },
            "running_per_s": per_s,
            "startup_ms": summary_json(startup),
            "ready_ms": summary_json(ready),
        })
    }

    /// DELETE request to DELETED event (ms).
    pub fn delete_report(&self) -> Value {
        let gone: Vec<f64> = self
            .pods
            .values()
            .filter_map(|p| Some(p.gone?.saturating_duration_since(p.delete_sent?).as_secs_f64() * 1000.0))
            .collect();
        let deleted = self.pods.values().filter(|p| p.delete_sent.is_some()).count();
        json!({"deleted": deleted, "gone": gone.len(), "gone_ms": summary_json(gone)})
    }
}

fn pod(name: &str, run: &str, image: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"capstan.dev/bench-run": run}},
        "spec": {"terminationGracePeriodSeconds": 0, "containers": [{"name": "sleep", "image": image,
            "imagePullPolicy": "IfNotPresent", "command": ["sleep", "3600"]}]}})
}

/// Feeds watch events to the tracker until `done` holds or `deadline`
/// passes (false). Stops early if the watch ends (its error is returned).
async fn drain_until(
    rx: &mut mpsc::UnboundedReceiver<watch::Event>,
    tracker: &Mutex<Tracker>,
    deadline: Instant,
    done: impl Fn(&Tracker) -> bool,
) -> Result<bool, &'static str> {
    loop {
        if done(&tracker.lock()) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        // A short wait, so creators' failures are noticed without events.
        match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            Ok(Some(ev)) => tracker.lock().observe(ev.at, &ev.kind, &ev.object),
            Ok(None) => return Err("the watch ended"),
            Err(_) => {}
        }
    }
}

pub async fn run(a: Args) -> Result<Value> {
    let kube = Arc::new(Kube::new(&a.kubeconfig, a.concurrency.clamp(1, 10))?);
    let ns = a.namespace.clone();
    if kube.get_json(&format!("/api/v1/namespaces/{ns}")).await.is_err() {
        kube.post(0, "/api/v1/namespaces", &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .await?;
    }
    let run = format!("pod-startup-{}", std::process::id());
    let pods_path = format!("/api/v1/namespaces/{ns}/pods");
    let query = format!("labelSelector=capstan.dev/bench-run%3D{run}");
    let (_, rv) = watch::list(&kube, &format!("{pods_path}?{query}")).await?;
    let cluster_dir = match &a.cluster_dir {
        Some(d) => d.clone(),
        None => std::fs::canonicalize(&a.kubeconfig)?.parent().map(PathBuf::from).unwrap_or_default(),
    };
    let under = cluster_dir.display().to_string();
    let scan = || procs::scan(Some(&under));
    let before = scan();
    let rss_before = procs::report(&before);

    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch::follow(kube.clone(), pods_path.clone(), query, rv, tx));
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    eprintln!("creating {} pods ({}) in {ns}, {} at a time", a.pods, a.image, a.concurrency);
    let creators = {
        let (kube, tracker, pods_path, run, image) =
            (kube.clone(), tracker.clone(), pods_path.clone(), run.clone(), a.image.clone());
        let concurrency = a.concurrency.max(1);
        let (first, rate) = (tokio::time::Instant::now(), a.rate.filter(|r| *r > 0.0));
        tokio::spawn(futures::stream::iter(0..a.pods).for_each_concurrent(concurrency, move |n| {
            let (kube, tracker, pods_path) = (kube.clone(), tracker.clone(), pods_path.clone());
            let name = format!("{run}-{n}");
            let body = pod(&name, &run, &image);
            async move {
                if let Some(rate) = rate {
                    tokio::time::sleep_until(first + Duration::from_secs_f64(n as f64 / rate)).await;
                }
                tracker.lock().sent(&name, Instant::now());
                if let Err(e) = kube.post(n as usize, &pods_path, &body).await {
                    eprintln!("create {name}: {e:#}");
                    tracker.lock().create_failed(&name);
                }
            }
        }))
    };
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let total = a.pods as usize;
    let started = drain_until(&mut rx, &tracker, deadline, |t| t.settled(total)).await;
    creators.await?;
    let rss_running = procs::report(&scan());
    let mut out = tracker.lock().startup_report();
    out["timed_out"] = json!(started == Ok(false));
    eprintln!("started: {}", out["startup_ms"]);

    let names = tracker.lock().created();
    eprintln!("deleting {} pods", names.len());
    let delete_start = Instant::now();
    futures::stream::iter(names)
        .for_each_concurrent(a.concurrency.max(1), |name| {
            let (kube, tracker) = (kube.clone(), tracker.clone());
            let path = format!("{pods_path}/{name}");
            async move {
                tracker.lock().delete_sent(&name, Instant::now());
                if let Err(e) = kube.delete(0, &path).await {
                    eprintln!("{e:#}");
                }
            }
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let gone = match started {
        Ok(_) => drain_until(&mut rx, &tracker, deadline, Tracker::all_gone).await,
        Err(e) => Err(e),
    };
    let mut deletion = tracker.lock().delete_report();
    deletion["duration_s"] = json!(secs3(delete_start.elapsed().as_secs_f64()));
    deletion["timed_out"] = json!(gone == Ok(false));
    let drivers = |ps: &[procs::Proc]| ps.iter().filter(|p| p.role == procs::Role::LogDriver).count();
    let drivers_before = drivers(&before);
    let deadline = Instant::now() + Duration::from_secs(60);
    while drivers(&scan()) > drivers_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = scan();
    deletion["containers_gone_s"] =
        json!((drivers(&after) <= drivers_before).then(|| secs3(delete_start.elapsed().as_secs_f64())));
    drop(rx);
    let watch_error = match (started, gone) {
        (Err(_), _) | (_, Err(_)) => Some(match watcher.await {
            Ok(Err(e)) => format!("{e:#}"),
            _ => "the watch ended".to_string(),
        }),
        _ => {
            watcher.abort();
            None
        }
    };
    let mut report = json!({
        "pods": a.pods, "concurrency": a.concurrency, "rate_per_s": a.rate, "image": a.image, "namespace": ns,
    });
    for (k, v) in out.as_object().cloned().unwrap_or_default() {
        report[k] = v;
    }
    report["delete"] = deletion;
    report["watch_error"] = json!(watch_error);
    report["rss"] =
        json!({"cluster_dir": under, "before": rss_before, "running": rss_running, "after": procs::report(&after)});
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, phase: &str, ready: bool) -> Value {
        json!({"metadata": {"name": name}, "status": {"phase": phase,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    #[test]
    fn startup_runs_from_send_to_first_running_event() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = Tracker::default();
        t.sent("a", at(0));
        t.sent("b", at(10));
        t.observe(at(5), "ADDED", &status("a", "Pending", false));
        t.observe(at(100), "MODIFIED", &status("a", "Running", false));
        t.observe(at(150), "MODIFIED", &status("a", "Running", true));
        // A later Running event does not move the first one.
        t.observe(at(900), "MODIFIED", &status("a", "Running", true));
        t.observe(at(210), "MODIFIED", &status("b", "Running", true));
        // Other pods are none of the run's business.
        t.observe(at(50), "ADDED", &status("other", "Running", true));
        assert!(t.settled(2));
        assert!(!t.settled(3));
        let r = t.startup_report();
        assert_eq!(r["running"], 2);
        assert_eq!(r["failures"], 0);
        assert_eq!(r["startup_ms"]["p50"], 100.0);
        assert_eq!(r["startup_ms"]["max"], 200.0);
        assert_eq!(r["ready_ms"]["max"], 200.0);
        // 2 pods from t0 to 210 ms.
        assert_eq!(r["running_per_s"], 9.5);
    }

    #[test]
    fn failures_settle_and_are_counted_by_reason() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.sent("a", t0);
        t.sent("b", t0);
        t.sent("c", t0);
        t.create_failed("c");
        assert!(!t.settled(3));
        let stuck = json!({"metadata": {"name": "a"}, "status": {"phase": "Pending",
            "containerStatuses": [{"state": {"waiting": {"reason": "ErrImageNeverPull"}}}]}});
        t.observe(t0, "MODIFIED", &stuck);
        let creating = json!({"metadata": {"name": "b"}, "status": {"phase": "Pending",
            "containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]}});
        t.observe(t0, "MODIFIED", &creating);
        assert!(!t.settled(3));
        t.observe(t0, "MODIFIED", &status("b", "Failed", false));
        assert!(t.settled(3));
        let r = t.startup_report();
        assert_eq!(r["created"], 2);
        assert_eq!(r["create_errors"], 1);
        assert_eq!(r["failures"], 3);
        assert_eq!(r["failure_reasons"], json!({"ErrImageNeverPull": 1, "phase Failed": 1}));
        assert_eq!(r["startup_ms"], Value::Null);
        assert_eq!(t.created(), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn deletion_waits_for_deleted_events() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.sent("a", t0);
        t.sent("b", t0);
        assert!(t.all_gone(), "nothing deleted yet, nothing to wait for");
        t.delete_sent("a", t0);
        t.delete_sent("b", t0);
        t.observe(t0 + Duration::from_millis(30), "DELETED", &status("a", "Running", true));
        assert!(!t.all_gone());
        t.observe(t0 + Duration::from_millis(40), "DELETED", &status("b", "Running", true));
        assert!(t.all_gone());
        assert_eq!(t.delete_report()["gone_ms"]["max"], 40.0);
    }
}
