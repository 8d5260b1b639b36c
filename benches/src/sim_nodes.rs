//! `capstan-bench sim-nodes`: many hollow nodes against a `capstan up`
//! cluster — how long until they are all Ready, what they cost the masters
//! (RSS, gateway connections) and, with `--hold`, the steady heartbeat load.
//!
//! One `capstan-node --runtime sim --sim-nodes N` process hosts the nodes
//! (`<name>-0` .. `<name>-<N-1>`, labelled `capstan.io/runtime=sim`), each
//! with its own connection to the masters' node gateways, joined with one
//! bootstrap token from `capstan token create`. Nodes are watched through
//! the Kubernetes API from before the process starts, so each node's
//! registration (first seen) and first Ready are timed from its start.
//! That process joins its nodes one after another, so the gaps between
//! registrations (`join_interval_ms`) are its per-node join cost.
//!
//! At the end the process is killed (SIGKILL: hollow nodes have nothing to
//! tear down), its Nodes are deleted `--batch` at a time, and its
//! directory is removed. Prints one JSON object on stdout; progress on stderr.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::api::Kube;
use crate::metrics::{self, r1};
use crate::procs::{self, mib, Role};
use crate::stats::{secs3, summary_json};
use crate::watch;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `capstan up` data directory (`master-*/endpoints.json`, `kubeconfig`).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Hollow nodes to host.
    #[arg(long, default_value_t = 5000)]
    pub nodes: u64,
    /// Report the time at every this many Ready nodes, and delete the Nodes
    /// this many at a time.
    #[arg(long, default_value_t = 250)]
    pub batch: u64,
    /// Keep the nodes this many seconds once all are Ready, measuring the
    /// heartbeat load on the masters.
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Node name prefix.
    #[arg(long, default_value = "sim")]
    pub name: String,
    /// `capstan-node` [default: next to this binary].
    #[arg(long)]
    pub node_binary: Option<PathBuf>,
    /// `capstan`, for `token create` [default: next to this binary].
    #[arg(long)]
    pub capstan_binary: Option<PathBuf>,
    /// Give up waiting for the nodes after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
}

/// One master as its `endpoints.json` describes it.
struct MasterEndpoints {
    node_addr: String,
    metrics_url: String,
}

fn masters(data_dir: &Path) -> Result<Vec<MasterEndpoints>> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .with_context(|| format!("reading {}", data_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("master-")))
        .collect();
    dirs.sort();
    for d in dirs {
        let Ok(raw) = std::fs::read(d.join("endpoints.json")) else { continue };
        let v: Value = serde_json::from_slice(&raw).with_context(|| format!("{}/endpoints.json", d.display()))?;
        let field = |k: &str| v[k].as_str().map(str::to_string).with_context(|| format!("{}: no {k}", d.display()));
        out.push(MasterEndpoints { node_addr: field("node_addr")?, metrics_url: field("metrics_url")? });
    }
    if out.is_empty() {
        bail!("no master-*/endpoints.json under {} (is `capstan up` running there?)", data_dir.display());
    }
    Ok(out)
}

fn sibling(given: &Option<PathBuf>, name: &str) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let p = std::env::current_exe()?.with_file_name(name);
    if !p.exists() {
        bail!("{} not found: build it into the same target dir, or pass its path", p.display());
    }
    Ok(p)
}

/// The names `capstan-node --sim-nodes n --name base` gives its nodes.
fn node_names(base: &str, n: u64) -> Vec<String> {
    if n == 1 {
        vec![base.to_string()]
    } else {
        (0..n).map(|i| format!("{base}-{i}")).collect()
    }
}

/// Registration and first Ready of each expected node, from watch events;
/// no IO.
pub(crate) struct NodeTracker {
    start: Instant,
    expected: std::collections::HashSet<String>,
    seen: HashMap<String, Instant>,
    ready: HashMap<String, Instant>,
}

impl NodeTracker {
    pub fn new(start: Instant, names: &[String]) -> NodeTracker {
        NodeTracker { start, expected: names.iter().cloned().collect(), seen: HashMap::new(), ready: HashMap::new() }
    }

    pub fn observe(&mut self, at: Instant, kind: &str, node: &Value) {
        let Some(name) = node["metadata"]["name"].as_str().filter(|n| self.expected.contains(*n)) else { return };
        if kind == "DELETED" {
            return;
        }
        self.seen.entry(name.to_string()).or_insert(at);
        let ready = node["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        if ready {
            self.ready.entry(name.to_string()).or_insert(at);
        }
    }

    pub fn ready_count(&self) -> usize {
        self.ready.len()
    }

    pub fn all_ready(&self) -> bool {
        self.ready.len() >= self.expected.len()
    }

    fn sorted_secs(&self, m: &HashMap<String, Instant>) -> Vec<f64> {
        let mut v: Vec<f64> = m.values().map(|t| t.saturating_duration_since(self.start).as_secs_f64()).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Seconds from the start to every `batch`-th Ready node (and the last).
    pub fn ready_curve(&self, batch: u64) -> Vec<Value> {
        let times = self.sorted_secs(&self.ready);
        let batch = batch.max(1) as usize;
        let mut out: Vec<Value> =
            (batch..=times.len()).step_by(batch).map(|k| json!({"ready": k, "s": secs3(times[k - 1])})).collect();
        if !times.is_empty() && !times.len().is_multiple_of(batch) {
            out.push(json!({"ready": times.len(), "s": secs3(times[times.len() - 1])}));
        }
        out
    }

    pub fn report(&self) -> Value {
        let seen = self.sorted_secs(&self.seen);
        let ready = self.sorted_secs(&self.ready);
        let gaps: Vec<f64> = seen.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect();
        let ready_after_seen: Vec<f64> = self
            .ready
            .iter()
            .filter_map(|(n, r)| Some(r.saturating_duration_since(*self.seen.get(n)?).as_secs_f64() * 1000.0))
            .collect();
        let span = match (seen.first(), seen.last()) {
            (Some(f), Some(l)) if seen.len() > 1 => Some((l - f) / (seen.len() - 1) as f64 * 1000.0),
            _ => None,
        };
        json!({
            "registered": seen.len(),
            "ready": ready.len(),
            "first_registered_s": seen.first().map(|s| secs3(*s)),
            "all_ready_s": (self.all_ready()).then(|| ready.last().map(|s| secs3(*s))).flatten(),
            // Mean time between consecutive registrations: the sequential join cost per node.
            "join_interval_mean_ms": span.map(|v| (v * 10.0).round() / 10.0),
            "join_interval_ms": summary_json(gaps),
            "registered_to_ready_ms": summary_json(ready_after_seen),
        })
    }
}

struct Sim {
    child: Child,
    pid: u32,
    dir: PathBuf,
}

async fn start_sim(a: &Args, servers: &[MasterEndpoints], token: &str) -> Result<Sim> {
    let bin = sibling(&a.node_binary, "capstan-node")?;
    let dir = std::env::temp_dir().join(format!("capstan-bench-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("sim.log"))?;
    let servers: Vec<&str> = servers.iter().map(|m| m.node_addr.as_str()).collect();
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args(["--log-level", "warn", "--runtime", "sim", "--name", &a.name])
        .arg("--sim-nodes")
        .arg(a.nodes.to_string())
        .arg("--data-dir")
        .arg(dir.join("state"))
        .arg("--server")
        .arg(servers.join(","))
        .args(["--token", token])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    // If the bench dies, its hollow nodes must not linger.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().context("sim process exited at once")?;
    Ok(Sim { child, pid, dir })
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("sim.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// RSS of this cluster's masters and of the sim process.
fn rss(data_dir: &Path, sim_pid: Option<u32>) -> Value {
    let dir = data_dir.display().to_string();
    let masters: Vec<_> = procs::scan(Some(&dir)).into_iter().filter(|p| p.role == Role::Master).collect();
    json!({
        "masters_mib": masters.iter().map(|p| mib(p.rss_kib)).collect::<Vec<_>>(),
        "masters_total_mib": mib(masters.iter().map(|p| p.rss_kib).sum()),
        "sim_mib": sim_pid.and_then(procs::rss_kib).map(mib),
    })
}

/// Waits for every node to be Ready; the sim process dying ends it early.
async fn wait_ready(
    a: &Args,
    sim: &mut Sim,
    rx: &mut mpsc::UnboundedReceiver<watch::Event>,
    tracker: &mut NodeTracker,
) -> Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut next_mark = a.batch.max(1) as usize;
    while !tracker.all_ready() {
        if Instant::now() >= deadline {
            return Ok(false);
        }
        if let Some(status) = sim.child.try_wait()? {
            bail!("the sim process exited ({status}); its log ends:\n{}", log_tail(&sim.dir));
        }
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(ev)) => tracker.observe(ev.at, &ev.kind, &ev.object),
            Ok(None) => bail!("the node watch ended"),
            Err(_) => {}
        }
        if tracker.ready_count() >= next_mark {
            eprintln!("  {} ready after {:.1}s", tracker.ready_count(), tracker.start.elapsed().as_secs_f64());
            next_mark += a.batch.max(1) as usize;
        }
    }
    Ok(true)
}

/// Heartbeats, store revisions and raft commits per second over `hold`.
async fn hold(urls: &[String], secs: u64) -> Value {
    let before = metrics::scrape(urls).await;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let after = metrics::scrape(urls).await;
    let s = t.elapsed().as_secs_f64();
    let rate = |name: &str, labels: &[(&str, &str)]| {
        r1((metrics::sum_all(&after, name, labels) - metrics::sum_all(&before, name, labels)) / s)
    };
    json!({
        "secs": secs3(s),
        "heartbeats_per_s": rate("capstan_gateway_requests_total", &[("request", "heartbeat")]),
        "gateway_requests_per_s": rate("capstan_gateway_requests_total", &[]),
        // Every write (heartbeat status, leases, events) moves the revision once.
        "store_writes_per_s": r1((metrics::max_of(&after, "capstan_store_revision")
            - metrics::max_of(&before, "capstan_store_revision"))
            / s),
        "raft_commits_per_s": r1((metrics::max_of(&after, "capstan_raft_proposals_committed_total")
            - metrics::max_of(&before, "capstan_raft_proposals_committed_total"))
            / s),
    })
}

async fn measure(
    a: &Args,
    kube: &Arc<Kube>,
    urls: &[String],
    sim: &mut Sim,
    rx: &mut mpsc::UnboundedReceiver<watch::Event>,
    tracker: &mut NodeTracker,
) -> Result<Value> {
    let all_ready = wait_ready(a, sim, rx, tracker).await?;
    let scrape = metrics::scrape(urls).await;
    let mut out = json!({
        "nodes": a.nodes,
        "timed_out": !all_ready,
        "startup": tracker.report(),
        "ready_curve": tracker.ready_curve(a.batch),
        "connected_nodes": metrics::sum_all(&scrape, "capstan_gateway_connected_nodes", &[]),
        "rss_ready": rss(&a.data_dir, Some(sim.pid)),
    });
    if a.hold > 0 {
        eprintln!("holding {} nodes for {}s", tracker.ready_count(), a.hold);
        out["hold"] = hold(urls, a.hold).await;
        // Nodes whose heartbeats fell behind the masters' grace period.
        let (items, _) = watch::list(kube, "/api/v1/nodes?labelSelector=capstan.io%2Fruntime%3Dsim").await?;
        let ready = |n: &Value| {
            n["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        };
        out["hold"]["still_ready"] = json!(items
            .iter()
            .filter(|n| tracker.expected.contains(n["metadata"]["name"].as_str().unwrap_or_default()) && ready(n))
            .count());
        out["hold"]["rss"] = rss(&a.data_dir, Some(sim.pid));
    }
    Ok(out)
}

pub async fn run(a: Args) -> Result<Value> {
    let masters = masters(&a.data_dir)?;
    let urls: Vec<String> = masters.iter().map(|m| m.metrics_url.clone()).collect();
    let kube = Arc::new(Kube::new(&a.data_dir.join("kubeconfig"), 4)?);
    let names = node_names(&a.name, a.nodes);
    let nodes_path = "/api/v1/nodes";
    let query = "labelSelector=capstan.io%2Fruntime%3Dsim".to_string();
    let (existing, rv) = watch::list(&kube, &format!("{nodes_path}?{query}")).await?;
    let clash = existing.iter().filter_map(|n| n["metadata"]["name"].as_str()).find(|n| names.iter().any(|m| m == n));
    if let Some(n) = clash {
        bail!("Node {n} already exists: delete the earlier run's nodes, or pass another --name");
    }
    // Joins are sequential: the token must outlive them all.
    let ttl = (a.timeout + 600).max(3600);
    let capstan = sibling(&a.capstan_binary, "capstan")?;
    let out = tokio::process::Command::new(&capstan)
        .args(["token", "create", "--ttl", &ttl.to_string(), "--data-dir"])
        .arg(a.data_dir.join("master-1"))
        .output()
        .await
        .with_context(|| format!("running {} token create", capstan.display()))?;
    if !out.status.success() {
        bail!("capstan token create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let token = String::from_utf8(out.stdout)?.trim().to_string();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch::follow(kube.clone(), nodes_path.into(), query, rv, tx));
    let rss_before = rss(&a.data_dir, None);
    eprintln!("starting {} hollow nodes against {} masters", a.nodes, masters.len());
    let start = Instant::now();
    let mut sim = start_sim(&a, &masters, &token).await?;
    let mut tracker = NodeTracker::new(start, &names);
    let result = measure(&a, &kube, &urls, &mut sim, &mut rx, &mut tracker).await;

    eprintln!("killing the sim process {} and deleting its nodes", sim.pid);
    let _ = sim.child.kill().await;
    watcher.abort();
    let t = Instant::now();
    futures::stream::iter(names)
        .for_each_concurrent(a.batch.max(1) as usize, |n| {
            let kube = kube.clone();
            async move {
                if let Err(e) = kube.delete(0, &format!("{nodes_path}/{n}")).await {
                    eprintln!("{e:#}");
                }
            }
        })
        .await;
    let deleted_s = secs3(t.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&sim.dir);
    let mut out = result?;
    out["rss_before"] = rss_before;
    out["delete_s"] = json!(deleted_s);
    out["masters"] = json!(masters.len());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool) -> Value {
        json!({"metadata": {"name": name}, "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    #[test]
    fn names_as_the_agent_gives_them() {
        assert_eq!(node_names("sim", 1), vec!["sim"]);
        assert_eq!(node_names("sim", 3), vec!["sim-0", "sim-1", "sim-2"]);
    }

    #[test]
    fn tracks_registration_ready_and_the_join_gaps() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = NodeTracker::new(t0, &node_names("sim", 3));
        t.observe(at(100), "ADDED", &node("sim-0", false));
        t.observe(at(150), "MODIFIED", &node("sim-0", true));
        t.observe(at(300), "ADDED", &node("sim-1", true));
        t.observe(at(50), "ADDED", &node("other", true));
        assert!(!t.all_ready());
        t.observe(at(500), "ADDED", &node("sim-2", false));
        t.observe(at(700), "MODIFIED", &node("sim-2", true));
        t.observe(at(900), "MODIFIED", &node("sim-2", true));
        assert!(t.all_ready());
        let r = t.report();
        assert_eq!(r["registered"], 3);
        assert_eq!(r["first_registered_s"], 0.1);
        assert_eq!(r["all_ready_s"], 0.7);
        assert_eq!(r["join_interval_mean_ms"], 200.0);
        assert_eq!(r["join_interval_ms"]["max"], 200.0);
        assert_eq!(r["registered_to_ready_ms"]["max"], 200.0);
        assert_eq!(t.ready_curve(2), vec![json!({"ready": 2, "s": 0.3}), json!({"ready": 3, "s": 0.7})]);
        assert_eq!(t.ready_curve(3), vec![json!({"ready": 3, "s": 0.7})]);
    }
}
