//! `capstan-bench scheduler`: the scheduler's throughput and latency, as
//! Kubernetes' scheduler_perf measures it — Node objects only (no agents),
//! pods created through the API as fast as `--clients` can, bindings
//! observed through a watch.
//!
//! 1. `--nodes` Nodes (32 CPUs, 256 GiB, 110 pods; labelled with hostname
//!    and one of 10 zones), created concurrently.
//! 2. A watch on the bench namespace's pods, then `--pods` pods created
//!    concurrently. Each pod's latency runs from just before its POST to
//!    the watch event that shows it bound.
//! 3. Throughput: bound pods per second from the first POST to the last
//!    binding (and the create rate alone, which bounds it).
//! 4. With `--metrics`: the scheduler's own time per pod, and the CPU each
//!    master (`process_cpu_seconds_total`) and the bench itself spent in
//!    that phase — on a machine they share, CPU per pod is the steadier
//!    figure; throughput follows the machine's speed.
//!
//! `--mode plain`: 100m/64Mi pods. `--mode anti`: the same with required
//! pod anti-affinity on the hostname (at most one per node) and a zone
//! topology spread constraint (maxSkew 1, DoNotSchedule).
//!
//! Nodes without heartbeats are tainted unreachable after the masters'
//! `--node-monitor-grace-period` (40 s): keep a run shorter than that, or
//! start the masters with a longer grace. Nodes and the namespace are
//! deleted at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::api::{load, percentiles, Kube};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// kubeconfig with the server, its CA and a client certificate (`capstan up` writes one).
    #[arg(long)]
    pub kubeconfig: std::path::PathBuf,
    #[arg(long, default_value_t = 5000)]
    pub nodes: u64,
    #[arg(long, default_value_t = 10_000)]
    pub pods: u64,
    /// plain | anti (required anti-affinity on hostname + zone spread).
    #[arg(long, default_value = "plain")]
    pub mode: String,
    /// Concurrent clients creating pods.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 10)]
    pub conns: usize,
    /// The masters' metrics addresses (host:port, comma-separated; see
    /// `<data-dir>/prometheus.yml`): reports the scheduler's own time per
    /// pod from `scheduler_scheduling_algorithm_duration_seconds`.
    #[arg(long, value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Give up waiting for bindings after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

fn node(n: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("bench-node-{n}"), "labels": {
            "kubernetes.io/hostname": format!("bench-node-{n}"), "topology.kubernetes.io/zone": format!("zone-{}", n % 10),
            "capstan.dev/bench": "scheduler"}},
        "status": {"capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "Bench"}]}})
}

fn pod(n: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("pod-{n}"), "labels": {"app": "bench"}},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0",
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}})
}

fn anti_pod(n: u64) -> Value {
    let mut p = pod(n);
    p["spec"]["affinity"] = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "bench"}}, "topologyKey": "kubernetes.io/hostname"}]}});
    p["spec"]["topologySpreadConstraints"] = json!([{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "bench"}}}]);
    p
}

/// Follows the namespace's pods from `rv`, recording when each is first
/// seen bound, until `want` are or the stream ends.
async fn watch_bindings(
    kube: Arc<Kube>,
    ns: String,
    rv: String,
    want: u64,
    bound: Arc<Mutex<HashMap<String, Instant>>>,
) -> Result<()> {
    let url =
        format!("{}/api/v1/namespaces/{ns}/pods?watch=1&resourceVersion={rv}&allowWatchBookmarks=true", kube.server);
    let mut r = kube.clients[0].get(&url).timeout(Duration::from_secs(3600)).send().await?;
    if !r.status().is_success() {
        bail!("watch: {}", r.status());
    }
    // Only the name and node of each event's pod are read: the bench shares
    // the machine with the masters, so its own parsing is kept small.
    #[derive(serde::Deserialize)]
    struct Line {
        object: Pod,
    }
    #[derive(serde::Deserialize)]
    struct Pod {
        #[serde(default)]
        metadata: Meta,
        #[serde(default)]
        spec: Spec,
    }
    #[derive(serde::Deserialize, Default)]
    struct Meta {
        #[serde(default)]
        name: String,
    }
    #[derive(serde::Deserialize, Default)]
    struct Spec {
        #[serde(default, rename = "nodeName")]
        node_name: Option<String>,
    }
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        buf.extend_from_slice(&chunk);
        let mut done = 0;
        while let Some(i) = memchr::memchr(b'\n', &buf[done..]) {
            let line = &buf[done..done + i];
            done += i + 1;
            // Bookmarks and errors have other shapes: skipped.
            let Ok(ev) = serde_json::from_slice::<Line>(line) else { continue };
            if ev.object.spec.node_name.is_some_and(|n| !n.is_empty()) {
                let mut b = bound.lock();
                b.entry(ev.object.metadata.name).or_insert_with(Instant::now);
                if b.len() as u64 >= want {
                    return Ok(());
                }
            }
        }
        buf.drain(..done);
    }
    Ok(())
}

/// What the bench reads from one master's `/metrics`.
#[derive(Default, Clone, Copy)]
struct Scrape {
    /// Scheduling algorithm time and attempts.
    algo_s: f64,
    attempts: f64,
    /// The master's CPU time (user + system).
    cpu_s: f64,
}

/// Each master's metrics now; `None` for one that could not be read (so
/// no difference is taken against zeros).
async fn scrape(targets: &[String]) -> Vec<Option<Scrape>> {
    let mut out = Vec::new();
    for t in targets {
        out.push(scrape_one(t).await);
    }
    out
}

async fn scrape_one(target: &str) -> Option<Scrape> {
    let r = reqwest::get(format!("http://{target}/metrics")).await.ok()?.error_for_status().ok()?;
    let mut s = Scrape::default();
    for line in r.text().await.ok()?.lines() {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(v)) = (parts.next(), parts.next().and_then(|v| v.parse::<f64>().ok())) else {
            continue;
        };
        match name {
            "scheduler_scheduling_algorithm_duration_seconds_sum" => s.algo_s += v,
            "scheduler_scheduling_algorithm_duration_seconds_count" => s.attempts += v,
            "process_cpu_seconds_total" => s.cpu_s = v,
            _ => {}
        }
    }
    Some(s)
}

/// This process's CPU time (user + system), seconds.
fn own_cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(u.ru_utime) + s(u.ru_stime)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn delete_all(kube: &Arc<Kube>, paths: Vec<String>, clients: usize) {
    let paths = Arc::new(Mutex::new(paths));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (kube, paths) = (kube.clone(), paths.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(p) = paths.lock().pop() else { break };
                let _ = kube.clients[c % kube.clients.len()].delete(format!("{}{p}", kube.server)).send().await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

pub async fn run(a: Args) -> Result<Value> {
    let make: fn(u64) -> Value = match a.mode.as_str() {
        "plain" => pod,
        "anti" => anti_pod,
        m => bail!("unknown --mode {m} (plain | anti)"),
    };
    if a.mode == "anti" && a.pods > a.nodes {
        bail!("--mode anti places at most one pod per node: --pods must be <= --nodes");
    }
    let kube = Arc::new(Kube::new(&a.kubeconfig, a.conns)?);
    eprintln!("creating {} nodes", a.nodes);
    let nodes = load(&kube, a.clients, a.nodes, "/api/v1/nodes".into(), node).await?;
    let ns = format!("bench-sched-{}", std::process::id());
    let created = kube
        .post_json(0, "/api/v1/namespaces", &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        .await?;
    let rv = created["metadata"]["resourceVersion"].as_str().context("namespace without resourceVersion")?.to_string();
    // Let the scheduler's cache take in the nodes before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (before, bench_before) = (scrape(&a.metrics).await, own_cpu_s());
    let bound = Arc::new(Mutex::new(HashMap::new()));
    let watcher = tokio::spawn(watch_bindings(kube.clone(), ns.clone(), rv, a.pods, bound.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    eprintln!("creating {} pods ({}) with {} clients", a.pods, a.mode, a.clients);
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let start = Instant::now();
    let sent_for_make = sent.clone();
    let creates = load(&kube, a.clients, a.pods, format!("/api/v1/namespaces/{ns}/pods"), move |n| {
        sent_for_make.lock().insert(format!("pod-{n}"), Instant::now());
        make(n)
    })
    .await?;
    eprintln!("created; waiting for bindings");
    let waited = tokio::time::timeout(Duration::from_secs(a.timeout), watcher).await;
    let bound = bound.lock().clone();
    let sent = sent.lock().clone();
    let mut h = Histogram::<u64>::new(3)?;
    let mut last = start;
    for (name, at) in &bound {
        if let Some(t) = sent.get(name) {
            h.record(at.saturating_duration_since(*t).as_micros() as u64)?;
        }
        last = last.max(*at);
    }
    let secs = last.duration_since(start).as_secs_f64().max(1e-9);
    let (after, bench_after) = (scrape(&a.metrics).await, own_cpu_s());
    // Per master, when it was read both times.
    let delta = |f: fn(&Scrape) -> f64| {
        after.iter().zip(&before).map(|(x, y)| Some(f(x.as_ref()?) - f(y.as_ref()?))).collect::<Vec<Option<f64>>>()
    };
    let total = |d: Vec<Option<f64>>| d.into_iter().flatten().sum::<f64>();
    let (algo_s, attempts) = (total(delta(|s| s.algo_s)), total(delta(|s| s.attempts)));
    let algorithm = (attempts > 0.0).then(|| {
        json!({"attempts": attempts, "busy_s": round3(algo_s),
            "us_per_pod": (algo_s / attempts * 1e7).round() / 10.0, "capacity_per_s": (attempts / algo_s).round()})
    });
    // CPU from just before the first create to the last binding seen: what
    // each pod cost the masters and this client, on a shared machine.
    let masters_cpu = delta(|s| s.cpu_s);
    let bench_cpu = bench_after - bench_before;
    let all_cpu = masters_cpu.iter().flatten().sum::<f64>() + bench_cpu;
    let cpu = json!({"masters_s": masters_cpu.iter().map(|c| c.map(round3)).collect::<Vec<_>>(),
        "bench_s": round3(bench_cpu),
        "ms_per_pod": (!bound.is_empty()).then(|| round3(all_cpu * 1000.0 / bound.len() as f64))});
    let out = json!({
        "mode": a.mode, "nodes": a.nodes, "pods": a.pods, "clients": a.clients,
        "node_creates": nodes,
        "pod_creates": creates,
        "bound": bound.len(),
        "timed_out": waited.is_err(),
        "duration_s": round3(secs),
        "bound_per_s": (bound.len() as f64 / secs).round(),
        "latency_ms": percentiles(&h),
        "algorithm": algorithm,
        "cpu": cpu,
    });
    eprintln!("deleting namespace {ns} and {} nodes", a.nodes);
    let _ = kube.clients[0].delete(format!("{}/api/v1/namespaces/{ns}", kube.server)).send().await;
    delete_all(&kube, (0..a.nodes).map(|n| format!("/api/v1/nodes/bench-node-{n}")).collect(), a.clients).await;
    Ok(out)
}
