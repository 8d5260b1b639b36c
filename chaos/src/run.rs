//! One chaos run: a `capstan up` cluster, a seeded KV workload with
//! watchers, a fault schedule, then the checkers and a JSON report.
//!
//! Figures (RELIABILITY.md): linearizability of the KV history;
//! `acked_writes_lost` (every acknowledged put read back at its revision on
//! every master); the nine watch guarantees for resumable watchers;
//! `split_brain` (revisions whose events differ between masters, plus
//! terms in which masters named two different leaders); recovery
//! time from each fault to the first acknowledged write sent after it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capstan_proto::etcd::etcdserverpb as pb;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::cluster::{cluster_dir, UpCluster};
use crate::history::{Input, Op, Output};
use crate::hosts::Hosts;
use crate::kubeapi::{self, ApiReport, ApiTraffic};
use crate::lazyfs::CutStats;
use crate::linearizability::{self, Verdict};
use crate::orchestration::{self, Orchestration, PodSightings};
use crate::proxy::{Impairment, PeerProxy};
use crate::watch_check::{self, Event, Response, WatchReport, WatchSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Scenario {
    /// No faults: the baseline every figure must meet too.
    Steady,
    /// kill -9 the leader (it is restarted), repeatedly.
    KillLeader,
    /// kill -9 a follower (it is restarted), repeatedly.
    KillFollower,
    /// SIGSTOP the leader for 3 s, then SIGCONT, repeatedly.
    PauseLeader,
    /// Cut the leader off from the other masters for 4 s (nftables), while
    /// clients can still reach it: a deposed leader must not serve stale reads.
    PartitionLeader,
    /// The leader hears nothing from the other masters for 4 s, while what
    /// it sends still arrives (asymmetric partition).
    DeafLeader,
    /// The leader and one follower cannot reach each other for 4 s; both
    /// still reach the third master (a bridge).
    BridgePartition,
    /// A master (seeded choice) cut off for 400 ms, back for 400 ms, for 6 s.
    FlappingPartition,
    /// 30% of all peer packets lost at random for 6 s.
    PacketLoss,
    /// Master-3's data dir (a 512 MiB tmpfs) filled to the last byte for
    /// 6 s, then freed: it must fail writes, not acknowledge or corrupt
    /// them, and rejoin.
    DiskFull,
    /// The leader's wall clock 30 s ahead or behind (seeded) for 6 s
    /// (libfaketime, `capstan up --faketime`): nothing may depend on it.
    ClockSkew,
    /// Compaction storms (every 250 ms, to 20 revisions behind the head,
    /// for 4 s) while two of the watchers read slowly: lagging watchers are
    /// caught up from history or told "compacted", never silently skipped.
    Compaction,
    /// A follower (master-3) cut off from its peers while the workload and
    /// 500 sequential writes (one log entry each) carry the leader's
    /// snapshot and log purge past it (masters snapshot every 100 entries):
    /// it must catch up by installing a snapshot, with two watchers pinned
    /// to it throughout (scenario 5).
    SnapshotCatchUp,
    /// The failpoint crash matrix: the store's crash points
    /// (`capstan_proto::failpoints::NAMES`) in a seeded order, each armed with
    /// `1*return` on the leader or a follower (alternately), provoked until
    /// that master aborts there and `capstan up` restarts it. Needs `capstan`
    /// built with `--features failpoints`.
    FailpointCrash,
    /// A follower replaced by a new master under load (join with a token,
    /// become a voter, remove the old one, which must stop by itself), with
    /// the leader killed -9 in the middle of the change: while the new
    /// master is being added, or while the old one is removed (seeded).
    /// Scenario 9.
    MemberReplace,
    /// Scenario 10: two hollow node agents (`--runtime sim`) run a
    /// Deployment of 6 while, in turn, an agent is killed -9, an agent is
    /// cut off from every master for 20 s (past the 12 s node grace, which
    /// must exceed the agents' 10 s heartbeat, and the pods' 2 s toleration, so its
    /// pods are evicted and replaced), and all three masters are killed -9
    /// at once. Checked besides the store: no pod is ever bound to two
    /// nodes, and the Deployment converges once the faults heal.
    AgentFaults,
    /// Every peer datagram through the harness's UDP proxy ([`PeerProxy`]),
    /// impaired for 6 s per fault, alternately: 20-120 ms delay (jitter, so
    /// reordering) with 10% duplicated, within what the masters are tuned
    /// for (`--heartbeat-interval 300 --election-timeout 3000`), so writes
    /// go on; and 200-600 ms delay with 5% lost, beyond it: only safety is
    /// expected.
    NetworkImpairment,
    /// A power cut: all three masters killed -9 at once, and every write
    /// they had not fsynced lost, as their data dirs sit on a lazy
    /// filesystem ([`crate::lazyfs`]) that forgets unsynced data; then
    /// restarted. Nothing acknowledged may be lost: a write is acknowledged
    /// only once a quorum has it on disk. The negative control for a
    /// skipped fsync (kill -9 alone keeps the page cache, so it cannot
    /// catch one).
    PowerCut,
}

/// Node agents in the `AgentFaults` cluster.
const AGENTS: usize = 2;

/// The masters' node grace in `AgentFaults`: more than the agents' 10 s
/// heartbeat (shorter, and healthy nodes would go Unknown between beats).
const AGENT_GRACE: &str = "--node-monitor-grace-period=12";

/// How long `AgentFaults` cuts an agent off: past the grace and the pods'
/// 2 s toleration, so they are evicted and replaced elsewhere.
const AGENT_CUT: Duration = Duration::from_secs(20);

/// The crash points the `FailpointCrash` scenario cycles through.
pub use capstan_proto::failpoints::NAMES as FAILPOINTS;

/// `--snapshot-every` for the `FailpointCrash` masters: small, so snapshots
/// are built every few seconds and a follower cut off for a few hundred
/// entries must catch up by snapshot (the leader keeps 256 entries behind
/// its snapshot).
const FAILPOINT_SNAPSHOT_EVERY: u64 = 100;

/// Sequential writes (one log entry each) the harness adds to provoke a
/// snapshot: past `FAILPOINT_SNAPSHOT_EVERY` + 256 kept entries.
const FAILPOINT_PAD_WRITES: usize = 500;

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub capstan: PathBuf,
    pub scenario: Scenario,
    pub seed: u64,
    pub duration: Duration,
    pub clients: usize,
    pub keys: usize,
    /// Time between faults.
    pub interval: Duration,
    /// `FailpointCrash` only: arm just these points (default: all of
    /// [`FAILPOINTS`]), still in a seeded order.
    pub failpoints: Vec<String>,
    /// Every process on 127.0.0.1 (faults by port) instead of a host each
    /// (network namespaces; faults by address).
    pub loopback: bool,
}

impl RunConfig {
    /// `scenario` for `duration` with the defaults of `capstan-chaos run`:
    /// 8 clients on 20 keys, a fault every 5 s, on hosts of their own.
    pub fn new(capstan: PathBuf, scenario: Scenario, seed: u64, duration: Duration) -> RunConfig {
        RunConfig {
            capstan,
            scenario,
            seed,
            duration,
            clients: 8,
            keys: 20,
            interval: Duration::from_secs(5),
            failpoints: Vec::new(),
            loopback: false,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub seed: u64,
    pub duration_s: f64,
    pub operations: usize,
    pub acknowledged_writes: usize,
    pub faults: usize,
    pub linearizable: bool,
    pub verdict: Verdict,
    pub acked_writes_lost: u64,
    pub watch: WatchReport,
    /// The highest revision the run compacted to (0: none), and how many
    /// times a watcher was told its revisions were compacted.
    pub compacted_to: i64,
    pub watch_compacted: usize,
    pub split_brain: u64,
    /// Raft terms the leader observer saw, and those with two leaders
    /// (counted in `split_brain` too).
    pub terms_observed: usize,
    pub terms_with_two_leaders: u64,
    pub recovery_ms: Option<Recovery>,
    /// `FailpointCrash`: each armed point, and whether the master died there.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failpoints: Vec<FailpointHit>,
    /// `AgentFaults`: the Deployment's pods and convergence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchestration: Option<Orchestration>,
    /// The Kubernetes API traffic's figures ([`crate::kubeapi`]).
    pub api: ApiReport,
    /// `PowerCut`: unsynced data the cuts dropped, over all masters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_cut_lost: Option<CutStats>,
    pub pass: BTreeMap<&'static str, bool>,
    pub passed: bool,
}

/// One arming of a crash point in the `FailpointCrash` scenario.
#[derive(Clone, Debug, Serialize)]
pub struct FailpointHit {
    pub name: String,
    /// 1-based, as in the masters' names.
    pub master: usize,
    /// "leader" or "follower" when armed.
    pub role: &'static str,
    /// The master aborted at this point (its log says so).
    pub hit: bool,
    /// `capstan up` restarted it (a new process serves its data dir).
    pub restarted: bool,
    /// The restarted master answers a linearizable read (ReadIndex through
    /// Raft): it rejoined, not merely came up.
    pub serving: bool,
    /// From arming to the restarted master answering that read.
    pub crash_to_serving_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Recovery {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

struct Shared {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    /// Acknowledged puts: key, value, revision.
    acked: Mutex<Vec<(String, String, i64)>>,
    /// (sent, acknowledged) of acknowledged puts, for recovery times.
    ack_times: Mutex<Vec<(Instant, Instant)>>,
    stop: AtomicBool,
}

impl Shared {
    fn ns(&self, t: Instant) -> u64 {
        t.duration_since(self.start).as_nanos() as u64
    }
}

fn progress(msg: &str) {
    eprintln!("[capstan-chaos] {msg}");
}

async fn connect(cluster: &UpCluster, url: &str) -> Option<Channel> {
    cluster.channel(url).await.ok()
}

async fn client(cluster: Arc<UpCluster>, shared: Arc<Shared>, id: u32, seed: u64, keys: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9e37_79b9));
    // One channel per master slot; a failed one is re-dialled from the
    // slot's current endpoints (its master may have been replaced).
    let mut chans: Vec<Option<Channel>> = vec![None; cluster.masters];
    let mut last_seen: BTreeMap<String, String> = BTreeMap::new();
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let i = rng.gen_range(0..chans.len());
        if chans[i].is_none() {
            if let Some(ep) = cluster.endpoints(i) {
                chans[i] = connect(&cluster, &ep.etcd_url).await;
            }
        }
        let Some(ch) = chans[i].clone() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut kv = pb::kv_client::KvClient::new(ch);
        let key = format!("chaos/{}", rng.gen_range(0..keys));
        n += 1;
        let value = format!("c{id}-{n}");
        let roll = rng.gen_range(0..10);
        let sent = Instant::now();
        let (input, output, failed) = if roll < 4 {
            match kv.range(pb::RangeRequest { key: key.clone().into_bytes(), ..Default::default() }).await {
                Ok(r) => {
                    let v = r.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    if let Some(v) = &v {
                        last_seen.insert(key.clone(), v.clone());
                    }
                    (Input::Get, Output::Value(v), false)
                }
                Err(_) => (Input::Get, Output::Failed, true),
            }
        } else if roll < 8 || !last_seen.contains_key(&key) {
            let put = pb::PutRequest {
                key: key.clone().into_bytes(),
                value: value.clone().into_bytes(),
                ..Default::default()
            };
            match kv.put(put).await {
                Ok(r) => {
                    let rev = r.into_inner().header.map_or(0, |h| h.revision);
                    shared.acked.lock().expect("not poisoned").push((key.clone(), value.clone(), rev));
                    shared.ack_times.lock().expect("not poisoned").push((sent, Instant::now()));
                    last_seen.insert(key.clone(), value.clone());
                    (Input::Put(value), Output::Ok, false)
                }
                Err(_) => (Input::Put(value), Output::Failed, true),
            }
        } else {
            let expect = last_seen[&key].clone();
            let txn = pb::TxnRequest {
                compare: vec![pb::Compare {
                    key: key.clone().into_bytes(),
                    result: pb::compare::CompareResult::Equal as i32,
                    target: pb::compare::CompareTarget::Value as i32,
                    target_union: Some(pb::compare::TargetUnion::Value(expect.clone().into_bytes())),
                    range_end: vec![],
                }],
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: key.clone().into_bytes(),
                        value: value.clone().into_bytes(),
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            };
            let input = Input::Cas { expect, new: value.clone() };
            match kv.txn(txn).await {
                Ok(r) => {
                    let ok = r.into_inner().succeeded;
                    if ok {
                        last_seen.insert(key.clone(), value);
                    }
                    (input, Output::Cas(ok), false)
                }
                Err(_) => (input, Output::Failed, true),
            }
        };
        if failed {
            chans[i] = None;
        }
        let op = Op { client: id, key, call: shared.ns(sent), ret: shared.ns(Instant::now()), input, output };
        shared.ops.lock().expect("not poisoned").push(op);
    }
}

/// A received etcd watch event in the checker's terms.
pub fn to_event(e: &capstan_proto::etcd::mvccpb::Event) -> Option<Event> {
    let kv = e.kv.as_ref()?;
    Some(Event {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        delete: e.r#type == 1,
        value: String::from_utf8_lossy(&kv.value).into_owned(),
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
        version: kv.version,
        prev_value: e.prev_kv.as_ref().map(|p| String::from_utf8_lossy(&p.value).into_owned()),
    })
}

/// The store's current revision, from the first master that answers.
async fn head_revision(cluster: &UpCluster) -> Option<i64> {
    for url in cluster.urls() {
        if let Some(ch) = connect(cluster, &url).await {
            let r = pb::kv_client::KvClient::new(ch)
                .range(pb::RangeRequest { key: b"chaos/".to_vec(), ..Default::default() })
                .await;
            if let Ok(r) = r {
                return r.into_inner().header.map(|h| h.revision);
            }
        }
    }
    None
}

/// Watchers opened at random revisions around the current one
/// (RELIABILITY.md's workload), besides the long ones from the start.
struct TransientWatchers {
    task: tokio::task::JoinHandle<Vec<Transient>>,
    stop: Arc<AtomicBool>,
}

/// One of them: its start revision, the revision it reads up to (lowered
/// to the final revision at the end), and what it received.
struct Transient {
    start: i64,
    until: Arc<Mutex<Option<i64>>>,
    received: tokio::task::JoinHandle<Vec<Response>>,
}

/// Revisions a transient watcher reads, and how far back from the head it
/// may start.
const TRANSIENT_SPAN: i64 = 40;
const TRANSIENT_BACK: i64 = 30;

impl TransientWatchers {
    /// Every 1.5 s one more, from the head minus up to [`TRANSIENT_BACK`]
    /// revisions (never before `from`), for [`TRANSIENT_SPAN`] revisions,
    /// resuming on another master when its own fails.
    fn start(cluster: Arc<UpCluster>, seed: u64, from: i64) -> TransientWatchers {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7a7a);
            let mut all = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let Some(head) = head_revision(&cluster).await else { continue };
                let start = (head - rng.gen_range(0..=TRANSIENT_BACK)).max(from);
                let until = Arc::new(Mutex::new(Some(start + TRANSIENT_SPAN)));
                let deadline = Instant::now() + Duration::from_secs(45);
                let w = watcher(cluster.clone(), rng.gen(), start, until.clone(), deadline, None, None);
                all.push(Transient { start, until, received: tokio::spawn(w) });
            }
            all
        });
        TransientWatchers { task, stop }
    }

    /// Stops opening more (the workload stopped).
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Each reads at most up to `final_rev`; what they read is collected
    /// with [`Transients::collect`].
    async fn bound(self, final_rev: i64) -> anyhow::Result<Transients> {
        self.stop();
        let all = self.task.await?;
        for t in &all {
            let mut until = t.until.lock().expect("not poisoned");
            *until = until.map(|u| u.min(final_rev));
        }
        Ok(Transients(all))
    }
}

struct Transients(Vec<Transient>);

impl Transients {
    /// (start revision, responses) per watcher, once each is done.
    async fn collect(self) -> anyhow::Result<Vec<(i64, Vec<Response>)>> {
        let mut out = Vec::new();
        for t in self.0 {
            out.push((t.start, t.received.await?));
        }
        Ok(out)
    }
}

/// A watcher that resumes on another master from the revision after the
/// last it saw, until `until` (revision) is reached or `stop` and timeout.
async fn watcher(
    cluster: Arc<UpCluster>,
    seed: u64,
    from: i64,
    until: Arc<Mutex<Option<i64>>>,
    deadline: Instant,
    slow: Option<Duration>,
    pinned: Option<usize>,
) -> Vec<Response> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut received = Vec::new();
    let mut next_rev = from;
    'outer: while Instant::now() < deadline {
        if until.lock().expect("not poisoned").is_some_and(|end| next_rev > end) {
            break;
        }
        // A pinned watcher stays on one master (reconnecting to it); the
        // others resume on a random one of those serving now.
        let urls = match pinned {
            Some(i) => cluster.endpoints(i).map(|e| vec![e.etcd_url]).unwrap_or_default(),
            None => cluster.urls(),
        };
        if urls.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let url = &urls[rng.gen_range(0..urls.len())];
        let Some(ch) = connect(&cluster, url).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tx, rx) = mpsc::channel(4);
        let create = pb::WatchCreateRequest {
            key: b"chaos/".to_vec(),
            range_end: b"chaos0".to_vec(),
            start_revision: next_rev,
            prev_kv: true,
            ..Default::default()
        };
        let req = pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) };
        if tx.send(req).await.is_err() {
            continue;
        }
        let Ok(resp) =
            pb::watch_client::WatchClient::new(ch).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await
        else {
            continue;
        };
        let mut stream = resp.into_inner();
        let mut silent = 0;
        loop {
            // Progress answers keep a quiet stream alive: the deadline must
            // end a watch whose end revision never comes (a store that lost
            // acknowledged revisions).
            if Instant::now() >= deadline {
                break 'outer;
            }
            let msg = match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
                Ok(Ok(Some(m))) => m,
                Err(_) if silent < 2 => {
                    // Quiet: ask where the stream stands (the last workload
                    // write need not be the store's last revision).
                    silent += 1;
                    let progress = pb::WatchRequest {
                        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                            pb::WatchProgressRequest {},
                        )),
                    };
                    if tx.send(progress).await.is_err() {
                        continue 'outer;
                    }
                    continue;
                }
                _ => continue 'outer,
            };
            silent = 0;
            if msg.canceled {
                if msg.compact_revision > 0 {
                    // History this watcher needs is gone: it resumes after it.
                    received.push(Response::Compacted { revision: msg.compact_revision });
                    next_rev = next_rev.max(msg.compact_revision + 1);
                }
                continue 'outer;
            }
            if let Some(pause) = slow {
                tokio::time::sleep(pause).await;
                // Now and then a slow watcher goes away for a while and
                // resumes where it was: by then that may be compacted.
                if rng.gen_ratio(1, 40) {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    continue 'outer;
                }
            }
            let events: Vec<Event> = msg.events.iter().filter_map(to_event).collect();
            if let Some(last) = events.iter().map(|e| e.mod_revision).max() {
                next_rev = last + 1;
                received.push(Response::Events(events));
            }
            let end = *until.lock().expect("not poisoned");
            let progressed_past_end = msg.events.is_empty()
                && !msg.created
                && msg.header.as_ref().zip(end).is_some_and(|(h, end)| h.revision >= end);
            if end.is_some_and(|end| next_rev > end) || progressed_past_end {
                break 'outer;
            }
        }
    }
    received
}

/// Every master's full event history (revision -> events), read by a watch
/// from revision `from` (1 unless the scenario compacts) served by that
/// master alone, until the revision `until` is set and reached.
async fn history_of(
    cluster: Arc<UpCluster>,
    url: String,
    from: i64,
    until: Arc<Mutex<Option<i64>>>,
    deadline: Instant,
    incomplete: Arc<AtomicUsize>,
) -> anyhow::Result<BTreeMap<i64, Vec<Event>>> {
    let url = url.as_str();
    let until = || *until.lock().expect("not poisoned");
    let ch = cluster.channel(url).await?;
    let (tx, rx) = mpsc::channel(4);
    let create = pb::WatchCreateRequest {
        key: b"chaos/".to_vec(),
        range_end: b"chaos0".to_vec(),
        start_revision: from,
        prev_kv: true,
        ..Default::default()
    };
    tx.send(pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) }).await?;
    let mut stream = pb::watch_client::WatchClient::new(ch)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut out: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
    // The store has writers besides the workload (the API server's own
    // objects, the controller lease), so the last revision need not be a
    // workload key: the history is complete once a progress notification
    // at or past `until` arrives after every event before it.
    loop {
        if until().is_some_and(|until| out.keys().last().copied().unwrap_or(0) >= until) {
            break;
        }
        if Instant::now() >= deadline {
            // Checked as it is: what it lacks counts as lost, and the run
            // fails `histories_complete`.
            progress(&format!("history of {url} incomplete: it ends at revision {:?}", out.keys().last()));
            incomplete.fetch_add(1, Ordering::Relaxed);
            break;
        }
        let msg = match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
            Ok(m) => m?,
            Err(_) => {
                let progress = pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(pb::WatchProgressRequest {})),
                };
                tx.send(progress).await?;
                continue;
            }
        };
        let Some(msg) = msg else { break };
        anyhow::ensure!(!msg.canceled, "history watch canceled: {}", msg.cancel_reason);
        let progress_only = msg.events.is_empty() && !msg.created;
        for e in msg.events.iter().filter_map(to_event) {
            out.entry(e.mod_revision).or_default().push(e);
        }
        if progress_only && msg.header.as_ref().zip(until()).is_some_and(|(h, until)| h.revision >= until) {
            break;
        }
    }
    Ok(out)
}

/// Asks every master who leads, every 100 ms until `stop`: the leader ids
/// each term was reported with (Status: leader, raft_term).
async fn leader_claims(cluster: Arc<UpCluster>, stop: Arc<AtomicBool>) -> BTreeMap<u64, BTreeSet<u64>> {
    let mut claims: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut chans: Vec<Option<Channel>> = vec![None; cluster.masters];
    while !stop.load(Ordering::Relaxed) {
        for (i, ch) in chans.iter_mut().enumerate() {
            if ch.is_none() {
                if let Some(ep) = cluster.endpoints(i) {
                    *ch = connect(&cluster, &ep.etcd_url).await;
                }
            }
            let Some(c) = ch.clone() else { continue };
            match pb::maintenance_client::MaintenanceClient::new(c).status(pb::StatusRequest::default()).await {
                Ok(st) => {
                    let st = st.into_inner();
                    if st.leader != 0 {
                        claims.entry(st.raft_term).or_default().insert(st.leader);
                    }
                }
                Err(_) => *ch = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    claims
}

async fn leader_index(cluster: &UpCluster) -> Option<usize> {
    for i in 0..cluster.masters {
        let Some(ep) = cluster.endpoints(i) else { continue };
        let Some(ch) = connect(cluster, &ep.etcd_url).await else { continue };
        let Ok(st) = pb::maintenance_client::MaintenanceClient::new(ch).status(pb::StatusRequest::default()).await
        else {
            continue;
        };
        let leader = st.into_inner().leader;
        return (0..cluster.masters).find(|j| cluster.endpoints(*j).is_some_and(|e| e.id == leader));
    }
    None
}

/// The follower the SnapshotCatchUp scenario cuts off and pins watchers to.
const CATCH_UP: usize = 2;

/// The master whose data dir the DiskFull scenario fills.
const FULL_DISK: usize = 2;

/// Compacts the store to `behind` revisions before its head, through
/// master `i`; the revision asked for (a request that fails for us may
/// still have been applied, so it counts as possibly compacted).
async fn compact_behind(cluster: &UpCluster, i: usize, behind: i64) -> Option<i64> {
    let ch = connect(cluster, &cluster.endpoints(i)?.etcd_url).await?;
    let mut kv = pb::kv_client::KvClient::new(ch);
    let head = kv.range(pb::RangeRequest { key: b"chaos/".to_vec(), ..Default::default() }).await.ok()?;
    let rev = head.into_inner().header?.revision - behind;
    if rev <= 1 {
        return None;
    }
    if let Err(e) = kv.compact(pb::CompactionRequest { revision: rev, physical: false }).await {
        progress(&format!("compact to {rev}: {}", e.message()));
    }
    Some(rev)
}

/// Whether master `i` runs under libfaketime reading its offset file, and
/// that file now skews time by `offset` seconds: `date` is run with the
/// master's own libfaketime environment (from /proc). (Its HTTP `Date`
/// header cannot show it: hyper caches the date until the clock passes the
/// next second, so a clock set back freezes it instead.)
async fn skew_seen(cluster: &UpCluster, i: usize, offset: i64) -> bool {
    let Some(ep) = cluster.endpoints(i) else { return false };
    let Ok(environ) = std::fs::read(format!("/proc/{}/environ", ep.pid)) else { return false };
    let vars: Vec<(String, String)> = environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('='))
        .filter(|(k, _)| *k == "LD_PRELOAD" || k.starts_with("FAKETIME"))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if !vars.iter().any(|(k, v)| k == "LD_PRELOAD" && v.contains("faketime")) {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let out = tokio::process::Command::new("date").arg("+%s").envs(vars.iter().cloned()).output().await;
        let theirs = out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<i64>().ok());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if theirs.is_some_and(|t| (t - now - offset).abs() <= 3) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Runs one scenario: on hosts of their own (network namespaces; the
/// harness itself on the client host), or all on 127.0.0.1 with
/// `cfg.loopback`.
pub async fn run(cfg: RunConfig) -> anyhow::Result<Report> {
    if cfg.loopback {
        return run_on(cfg, None).await;
    }
    let agents = if cfg.scenario == Scenario::AgentFaults { AGENTS } else { 0 };
    let hosts = tokio::task::spawn_blocking(move || Hosts::create(3, agents)).await??;
    let on = hosts.clone();
    let report = hosts.in_client(move || run_on(cfg, Some(on))).await;
    // Every process on the hosts was stopped with the cluster; now the
    // namespaces go.
    drop(hosts);
    report
}

async fn run_on(cfg: RunConfig, hosts: Option<Arc<Hosts>>) -> anyhow::Result<Report> {
    let where_ = if hosts.is_some() { "on hosts of their own" } else { "on 127.0.0.1" };
    progress(&format!("starting 3 masters {where_} ({:?}, seed {})", cfg.scenario, cfg.seed));
    let hosts = hosts.as_ref();
    let failpoint_run = cfg.scenario == Scenario::FailpointCrash;
    let snapshot_every = format!("--snapshot-every={FAILPOINT_SNAPSHOT_EVERY}");
    let small_snapshots = failpoint_run || cfg.scenario == Scenario::SnapshotCatchUp;
    let server_args: &[&str] = if small_snapshots { &[&snapshot_every] } else { &[] };
    let mut proxy = None;
    let cluster = Arc::new(match cfg.scenario {
        Scenario::NetworkImpairment => {
            let dir = cluster_dir()?;
            let root = dir.path().to_path_buf();
            let bind = hosts.map_or(std::net::Ipv4Addr::LOCALHOST, |h| h.client().ip);
            let target = move |i: usize| real_peer_addr(&root.join(format!("master-{}", i + 1)));
            let p = PeerProxy::start(3, bind.into(), target, cfg.seed).await?;
            let fronts = p.fronts().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
            proxy = Some(p);
            let hosts = hosts.cloned();
            let capstan = cfg.capstan.clone();
            // Tuned as an operator would for round trips up to ~250 ms
            // (the heartbeat is also the replication round trip's deadline).
            let timing = ["--heartbeat-interval=300", "--election-timeout=3000"];
            tokio::task::spawn_blocking(move || {
                let up_args = ["--nodes", "0", "--peer-advertise", &fronts];
                UpCluster::start_full_in(&capstan, dir, hosts.as_ref(), 3, &timing, &up_args)
            })
            .await??
        }
        Scenario::ClockSkew => UpCluster::start_full(&cfg.capstan, hosts, 3, &[], &["--nodes", "0", "--faketime"])?,
        Scenario::DiskFull => UpCluster::start_small_disk(&cfg.capstan, hosts, 3, FULL_DISK, 512)?,
        Scenario::PowerCut => UpCluster::start_power_cut_disks(&cfg.capstan, hosts, 3)?,
        Scenario::AgentFaults => UpCluster::start_full(
            &cfg.capstan,
            hosts,
            3,
            &[AGENT_GRACE],
            &["--nodes", &AGENTS.to_string(), "--runtime", "sim"],
        )?,
        _ => UpCluster::start_full(&cfg.capstan, hosts, 3, server_args, &["--nodes", "0"])?,
    });
    // Watchers and the stored history start at `watch_from`. The failpoint
    // matrix compacts (to hit `raft::compaction`), but only below this
    // revision, so no history the checkers need is lost: 100 writes outside
    // the watched range first give it revisions to compact.
    let (watch_from, mut matrix_state) = if failpoint_run {
        let base = pad_writes(&cluster, 0, None, 100, Duration::from_secs(60)).await?;
        anyhow::ensure!(base > 100, "padding writes reached only revision {base}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0xfa11);
        let mut order: Vec<String> = if cfg.failpoints.is_empty() {
            FAILPOINTS.iter().map(|s| s.to_string()).collect()
        } else {
            cfg.failpoints.clone()
        };
        if let Some(bad) = order.iter().find(|n| !FAILPOINTS.contains(&n.as_str())) {
            anyhow::bail!("unknown failpoint {bad:?}; known: {}", FAILPOINTS.join(", "));
        }
        // Seeded Fisher-Yates.
        for i in (1..order.len()).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        progress(&format!("failpoint order: {order:?}; watched history from revision {}", base + 1));
        (base + 1, Some(FailpointMatrix { order, next: 0, next_compact: 1, compact_limit: base, hits: Vec::new() }))
    } else {
        (1, None)
    };
    let shared = Arc::new(Shared {
        start: Instant::now(),
        ops: Mutex::default(),
        acked: Mutex::default(),
        ack_times: Mutex::default(),
        stop: AtomicBool::new(false),
    });
    let until = Arc::new(Mutex::new(None));
    let watch_deadline = Instant::now() + cfg.duration + Duration::from_secs(90);
    let compacting = cfg.scenario == Scenario::Compaction;
    // Two watchers read as fast as they can; when compacting, two more
    // read slowly, so the store must catch them up or cancel them.
    let catching_up = cfg.scenario == Scenario::SnapshotCatchUp;
    let watchers: Vec<_> = (0..if compacting || catching_up { 4 } else { 2 })
        .map(|w| {
            let slow = (compacting && w >= 2).then(|| Duration::from_millis(20 * w));
            let pinned = (catching_up && w >= 2).then_some(CATCH_UP);
            let seed = cfg.seed + 1000 + w;
            tokio::spawn(watcher(cluster.clone(), seed, watch_from, until.clone(), watch_deadline, slow, pinned))
        })
        .collect();
    // Histories that could not be read to the end.
    let incomplete = Arc::new(AtomicUsize::new(0));
    // Every master's history is read back through a watch from revision
    // 1: after the run, unless compactions will take the early revisions
    // away first; then it is recorded live from the start.
    let recorders: Vec<_> = if compacting {
        cluster
            .urls()
            .into_iter()
            .map(|u| {
                let h = history_of(cluster.clone(), u, watch_from, until.clone(), watch_deadline, incomplete.clone());
                tokio::spawn(h)
            })
            .collect()
    } else {
        vec![]
    };
    let compacted = Arc::new(AtomicI64::new(0));
    let transients = TransientWatchers::start(cluster.clone(), cfg.seed, watch_from);
    let clients: Vec<_> = (0..cfg.clients)
        .map(|c| tokio::spawn(client(cluster.clone(), shared.clone(), c as u32, cfg.seed, cfg.keys)))
        .collect();
    let api_traffic = ApiTraffic::start(cluster.clone()).await?;
    let observed = Arc::new(AtomicBool::new(false));
    let observer = tokio::spawn(leader_claims(cluster.clone(), observed.clone()));
    let agents = cfg.scenario == Scenario::AgentFaults;
    let sightings = if agents {
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || start_deployment(&c)).await??;
        let (c, stop) = (cluster.clone(), observed.clone());
        Some(tokio::task::spawn_blocking(move || watch_pods(&c, &stop)))
    } else {
        None
    };
    let mut agent_round = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0xa9e7).gen_range(0..3);
    let mut agents_cut_off = 0;

    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let end = Instant::now() + cfg.duration;
    let mut faults = 0;
    // Faults that could not be seen to take effect (a run with any fails).
    let mut unconfirmed = 0;
    let mut power_cut_lost = None;
    let mut fault_times = Vec::new();
    // Leave an interval after the last fault to measure its recovery.
    while Instant::now() + 2 * cfg.interval <= end {
        tokio::time::sleep(cfg.interval).await;
        let Some(leader) = leader_index(&cluster).await else { continue };
        // t0 = the moment the fault is in effect (set by each arm).
        let mut t0 = Instant::now();
        match cfg.scenario {
            Scenario::Steady => continue,
            Scenario::KillLeader | Scenario::KillFollower => {
                let target =
                    if cfg.scenario == Scenario::KillLeader { leader } else { (leader + 1 + rng.gen_range(0..2)) % 3 };
                progress(&format!("kill -9 master-{}", target + 1));
                if let Some(pid) = cluster.kill9(target) {
                    t0 = Instant::now();
                    let c = cluster.clone();
                    tokio::task::spawn_blocking(move || c.wait_restarted(target, pid, Duration::from_secs(60))).await?;
                }
            }
            Scenario::PauseLeader => {
                progress(&format!("SIGSTOP master-{} for 3 s", leader + 1));
                let pid = cluster.endpoints(leader).map(|e| e.pid);
                if let Some(pid) = pid {
                    // SAFETY: signals to a master PID started by this run's `capstan up`.
                    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                    t0 = Instant::now();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                }
            }
            Scenario::PartitionLeader | Scenario::DeafLeader => {
                if cluster.endpoints(leader).is_some() {
                    let (what, cut) = if cfg.scenario == Scenario::PartitionLeader {
                        ("partition", cluster.isolate(leader)?)
                    } else {
                        ("deafen", cluster.deafen(leader)?)
                    };
                    progress(&format!("{what} master-{} for 4 s", leader + 1));
                    t0 = Instant::now();
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    drop(cut);
                }
            }
            Scenario::BridgePartition => {
                let other = (leader + 1 + rng.gen_range(0..2)) % 3;
                if cluster.endpoints(leader).is_some() && cluster.endpoints(other).is_some() {
                    progress(&format!("cut master-{} <-> master-{} for 4 s", leader + 1, other + 1));
                    let cut = cluster.cut_between(leader, other)?;
                    t0 = Instant::now();
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    drop(cut);
                }
            }
            Scenario::FlappingPartition => {
                progress("flapping partitions for 6 s");
                t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(6) {
                    let victim = rng.gen_range(0..3);
                    if cluster.endpoints(victim).is_some() {
                        let cut = cluster.isolate(victim)?;
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        drop(cut);
                    }
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
            }
            Scenario::SnapshotCatchUp => {
                let (Some(_), true) = (cluster.endpoints(CATCH_UP), leader != CATCH_UP) else {
                    progress(&format!("master-{} leads: no follower to cut off this round", CATCH_UP + 1));
                    continue;
                };
                let installs = |c: Arc<UpCluster>| async move {
                    c.metric(CATCH_UP, "capstan_raft_snapshot_install_duration_seconds_count").await.unwrap_or(0.0)
                };
                let before = installs(cluster.clone()).await;
                progress(&format!(
                    "master-{} cut off for {FAILPOINT_PAD_WRITES} sequential writes (2 watchers on it)",
                    CATCH_UP + 1
                ));
                let cut = cluster.isolate(CATCH_UP)?;
                t0 = Instant::now();
                // The workload's writes are batched into few log entries;
                // sequential ones are one entry each, enough to carry the
                // leader's snapshot and log purge past the follower.
                let padded =
                    pad_writes(&cluster, leader, Some(CATCH_UP), FAILPOINT_PAD_WRITES, Duration::from_secs(60)).await;
                // Let the leader build its snapshot and purge before healing.
                tokio::time::sleep(Duration::from_secs(2)).await;
                drop(cut);
                padded?;
                let deadline = Instant::now() + Duration::from_secs(15);
                while installs(cluster.clone()).await <= before && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                if installs(cluster.clone()).await <= before {
                    progress("it caught up without installing a snapshot");
                    unconfirmed += 1;
                }
            }
            Scenario::DiskFull => {
                let role = if leader == FULL_DISK { "leader" } else { "follower" };
                progress(&format!("master-{}'s disk full for 6 s ({role})", FULL_DISK + 1));
                let pid = cluster.endpoints(FULL_DISK).map(|e| e.pid);
                let ballast = cluster.fill_disk(FULL_DISK)?;
                t0 = Instant::now();
                tokio::time::sleep(Duration::from_secs(6)).await;
                std::fs::remove_file(&ballast)?;
                if cluster.endpoints(FULL_DISK).map(|e| e.pid) != pid {
                    progress(&format!("master-{} died with its disk full and was restarted", FULL_DISK + 1));
                }
            }
            Scenario::PowerCut => {
                progress("power cut: every master killed -9, unsynced writes lost");
                let (pids, lost) = cluster.power_cut()?;
                t0 = Instant::now();
                let cut = power_cut_lost.get_or_insert_with(CutStats::default);
                cut.bytes += lost.bytes;
                cut.files += lost.files;
                if !all_restarted(&cluster, pids).await? {
                    progress("a master did not come back after the power cut");
                    unconfirmed += 1;
                }
            }
            Scenario::ClockSkew => {
                let offset = if rng.gen_bool(0.5) { 30 } else { -30 };
                progress(&format!("master-{} clock {offset:+} s for 6 s", leader + 1));
                let file = cluster.master_dir(leader).join("faketime");
                std::fs::write(&file, format!("{offset:+}\n"))?;
                t0 = Instant::now();
                if !skew_seen(&cluster, leader, offset).await {
                    progress("the skew did not show in the master's Date header");
                    unconfirmed += 1;
                }
                tokio::time::sleep(Duration::from_secs(6).saturating_sub(t0.elapsed())).await;
                std::fs::write(&file, "+0\n")?;
            }
            Scenario::Compaction => {
                progress("compaction storm for 4 s");
                t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(4) {
                    if let Some(rev) = compact_behind(&cluster, leader, 20).await {
                        compacted.fetch_max(rev, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
            Scenario::PacketLoss => {
                progress("30% peer packet loss for 6 s");
                let lossy = cluster.lossy(30)?;
                t0 = Instant::now();
                tokio::time::sleep(Duration::from_secs(6)).await;
                drop(lossy);
            }
            Scenario::AgentFaults => {
                agent_round += 1;
                agents_cut_off += usize::from(agent_round % 3 == 1);
                match agent_fault(&cluster, agent_round % 3, rng.gen_range(0..AGENTS)).await? {
                    Some(t) => t0 = t,
                    None => {
                        unconfirmed += 1;
                        continue;
                    }
                }
            }
            Scenario::NetworkImpairment => {
                let Some(p) = proxy.as_ref() else { continue };
                let (imp, what) = if faults % 2 == 0 {
                    let ms = Duration::from_millis;
                    (Impairment { delay: ms(20), jitter: ms(100), duplicate: 0.1, loss: 0.0 }, "20-120 ms, 10% twice")
                } else {
                    let ms = Duration::from_millis;
                    (Impairment { delay: ms(200), jitter: ms(400), duplicate: 0.0, loss: 0.05 }, "200-600 ms, 5% lost")
                };
                progress(&format!("peer network impaired for 6 s: {what}"));
                let before = p.stats().delayed.load(Ordering::Relaxed);
                p.set(imp);
                t0 = Instant::now();
                tokio::time::sleep(Duration::from_secs(6)).await;
                p.set(Impairment::none());
                if p.stats().delayed.load(Ordering::Relaxed) == before {
                    progress("no datagram went through the impaired proxy");
                    unconfirmed += 1;
                }
            }
            Scenario::MemberReplace => match member_replace(&cluster, leader, &mut rng, &mut unconfirmed).await? {
                Some(t) => t0 = t,
                None => continue,
            },
            Scenario::FailpointCrash => {
                let Some(fm) = matrix_state.as_mut() else { continue };
                match failpoint_fault(&cluster, fm, leader, &mut rng).await? {
                    Some(t) => t0 = t,
                    None => continue,
                }
            }
        }
        faults += 1;
        fault_times.push(t0);
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    shared.stop.store(true, Ordering::Relaxed);
    transients.stop();
    for c in clients {
        c.await?;
    }
    let api = kubeapi::check(&api_traffic.finish().await);
    if api.violations() > 0 {
        progress(&format!("API traffic: {api:?}"));
    }
    let orchestration = match sightings {
        Some(watching) => {
            let c = cluster.clone();
            let (converged, converge_ms, last_state) =
                tokio::task::spawn_blocking(move || wait_converged(&c, Duration::from_secs(90))).await?;
            observed.store(true, Ordering::Relaxed);
            let seen = watching.await?;
            progress(&format!(
                "deployment {}: {} pods seen, {} on two nodes",
                if converged { "converged" } else { "did not converge" },
                seen.pods(),
                seen.on_two_nodes()
            ));
            Some(Orchestration {
                pods_seen: seen.pods(),
                pods_on_two_nodes: seen.on_two_nodes(),
                converged,
                converge_ms,
                last_state,
                agents_cut_off,
            })
        }
        None => None,
    };
    observed.store(true, Ordering::Relaxed);
    let claims = observer.await?;
    let terms_with_two_leaders = claims.values().filter(|leaders| leaders.len() > 1).count() as u64;
    let acked = shared.acked.lock().expect("not poisoned").clone();
    // The store's revision now, not the last acknowledged one: a write that
    // failed for its client may still have committed after it.
    let final_rev = acked.iter().map(|a| a.2).max().unwrap_or(1).max(head_revision(&cluster).await.unwrap_or(0));
    *until.lock().expect("not poisoned") = Some(final_rev);
    let transients = transients.bound(final_rev).await?;
    progress(&format!("workload done: {} acknowledged writes, final revision {final_rev}; checking", acked.len()));

    // Histories of every master, compared revision by revision.
    let mut histories = Vec::new();
    if recorders.is_empty() {
        let deadline = Instant::now() + Duration::from_secs(60);
        for url in cluster.urls() {
            let h = history_of(cluster.clone(), url, watch_from, until.clone(), deadline, incomplete.clone());
            histories.push(h.await?);
        }
    } else {
        for r in recorders {
            histories.push(r.await??);
        }
    }
    // Split brain: two leaders reported in one term, or revisions whose
    // events differ between masters.
    let mut split_brain = terms_with_two_leaders;
    for rev in histories[0].keys().chain(histories[1].keys()).chain(histories[2].keys()) {
        let first = histories[0].get(rev);
        if histories.iter().any(|h| h.get(rev) != first) {
            split_brain += 1;
        }
    }
    let truth = &histories[0];
    let mut acked_writes_lost = 0;
    for (key, value, rev) in &acked {
        for h in &histories {
            let found = h.get(rev).is_some_and(|evs| evs.iter().any(|e| &e.key == key && &e.value == value));
            if !found {
                acked_writes_lost += 1;
            }
        }
    }
    let spec = WatchSpec {
        start: "chaos/".into(),
        end: "chaos0".into(),
        start_revision: watch_from,
        prev_kv: true,
        compacted_at_most: compacted.load(Ordering::Relaxed),
        ..Default::default()
    };
    let mut watch = WatchReport::default();
    let mut watch_compacted = 0;
    let transients = transients.collect().await?;
    let mut received_all = Vec::new();
    for w in watchers {
        received_all.push((spec.start_revision, w.await?));
    }
    progress(&format!(
        "{} watchers from the start, {} opened at random revisions",
        received_all.len(),
        transients.len()
    ));
    received_all.extend(transients);
    for (start_revision, received) in received_all {
        watch_compacted += received.iter().filter(|r| matches!(r, Response::Compacted { .. })).count();
        let r = watch_check::check(&WatchSpec { start_revision, ..spec.clone() }, truth, &received);
        watch.filter += r.filter;
        watch.ordered += r.ordered;
        watch.unique += r.unique;
        watch.atomic += r.atomic;
        watch.bookmarkable += r.bookmarkable;
        watch.reliable += r.reliable;
        watch.resumable += r.resumable;
        watch.prev_value += r.prev_value;
        watch.create_flag += r.create_flag;
    }
    let ops = shared.ops.lock().expect("not poisoned").clone();
    let verdict = linearizability::check(&ops);
    if verdict != Verdict::Ok {
        // For a post-mortem: `capstan-chaos check-history <file>`.
        let file = std::env::temp_dir().join(format!("capstan-chaos-{:?}-{}-history.json", cfg.scenario, cfg.seed));
        match std::fs::write(&file, serde_json::to_vec(&ops)?) {
            Ok(()) => progress(&format!("not linearizable ({verdict:?}); history in {}", file.display())),
            Err(e) => progress(&format!("not linearizable ({verdict:?}); writing {}: {e}", file.display())),
        }
    }
    let ack_times = shared.ack_times.lock().expect("not poisoned").clone();
    let mut rec: Vec<u64> = fault_times
        .iter()
        .filter_map(|t0| {
            ack_times
                .iter()
                .filter(|(s, _)| s > t0)
                .map(|(_, a)| *a)
                .min()
                .map(|a| a.duration_since(*t0).as_millis() as u64)
        })
        .collect();
    rec.sort();
    progress(&format!("recovery times (ms) after {} faults: {rec:?}", fault_times.len()));
    let pct = |p: f64| rec[((rec.len() - 1) as f64 * p).round() as usize];
    let recovery_ms = (!rec.is_empty()).then(|| Recovery { p50: pct(0.5), p99: pct(0.99), max: rec[rec.len() - 1] });
    let linearizable = verdict == Verdict::Ok;
    let mut pass = BTreeMap::from([
        ("linearizable", linearizable),
        ("acked_writes_lost", acked_writes_lost == 0),
        ("watch_guarantees", watch.total() == 0),
        ("split_brain", split_brain == 0),
        ("progress", !acked.is_empty()),
        ("faults_in_effect", unconfirmed == 0),
        ("histories_complete", incomplete.load(Ordering::Relaxed) == 0),
        ("api_consistent", api.violations() == 0),
        ("api_progress", api.updates_acked > 0),
    ]);
    let failpoints = matrix_state.map(|m| m.hits).unwrap_or_default();
    if failpoint_run {
        // Every armed point must really have killed its master, and the
        // master must have come back: an unhit point tested nothing.
        pass.insert(
            "failpoints_hit",
            !failpoints.is_empty() && failpoints.iter().all(|h| h.hit && h.restarted && h.serving),
        );
    }
    if let Some(o) = &orchestration {
        pass.insert("pods_on_one_node", o.pods_on_two_nodes == 0);
        pass.insert("deployment_converged", o.converged);
        pass.insert("no_needless_evictions", o.needless_replacements(orchestration::REPLICAS) == 0);
    }
    let passed = pass.values().all(|v| *v);
    Ok(Report {
        scenario: cfg.scenario,
        seed: cfg.seed,
        duration_s: cfg.duration.as_secs_f64(),
        operations: ops.len(),
        acknowledged_writes: acked.len(),
        faults,
        linearizable,
        verdict,
        acked_writes_lost,
        watch,
        compacted_to: spec.compacted_at_most,
        watch_compacted,
        split_brain,
        terms_observed: claims.len(),
        terms_with_two_leaders,
        recovery_ms,
        failpoints,
        orchestration,
        power_cut_lost,
        api,
        pass,
        passed,
    })
}

/// Scenario 9: a follower replaced by a new master while the workload
/// runs, the leader killed -9 mid-change (seeded: while the new master is
/// added, or while the old one is removed). The new master joins through
/// the leader, so the join's own retries meet the kill too. Every step is
/// confirmed (the newcomer listed, then a voter; the old member gone from
/// the list and stopped by itself, not restarted), or counted in
/// `unconfirmed`. Returns when the leader was killed.
async fn member_replace(
    cluster: &Arc<UpCluster>,
    leader: usize,
    rng: &mut rand::rngs::StdRng,
    unconfirmed: &mut usize,
) -> anyhow::Result<Option<Instant>> {
    let victim = (leader + 1 + rng.gen_range(0..2)) % 3;
    let during_add = rng.gen_bool(0.5);
    let Some(old) = cluster.endpoints(victim) else { return Ok(None) };
    let newcomer = cluster.join_master(leader)?;
    let phase = if during_add { "it joins" } else { "the old one is removed" };
    progress(&format!("replace {} by {newcomer}; kill -9 the leader while {phase}", old.name));
    let mut killed = None;
    if during_add {
        if wait_members(cluster, Duration::from_secs(30), |ms| ms.iter().any(|m| m.name == newcomer)).await {
            cluster.kill9(leader);
            killed = Some(Instant::now());
        } else {
            progress(&format!("{newcomer} was never listed as a member"));
            *unconfirmed += 1;
            return Ok(None);
        }
    }
    let voter = |ms: &[pb::Member]| ms.iter().any(|m| m.name == newcomer && !m.is_learner);
    if !wait_members(cluster, Duration::from_secs(90), voter).await {
        progress(&format!("{newcomer} did not become a voter"));
        *unconfirmed += 1;
        return Ok(killed);
    }
    let removal = tokio::spawn(remove_member(cluster.clone(), old.id, victim));
    if !during_add {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..200))).await;
        if let Some(l) = leader_index(cluster).await {
            cluster.kill9(l);
            killed = Some(Instant::now());
        }
    }
    if !removal.await? {
        progress(&format!("{} could not be removed", old.name));
        *unconfirmed += 1;
        return Ok(killed);
    }
    let (c, name) = (cluster.clone(), old.name.clone());
    let departed = tokio::task::spawn_blocking(move || c.wait_departed(&name, Duration::from_secs(30))).await?;
    if !departed {
        progress(&format!("{} was removed but did not stop by itself", old.name));
        *unconfirmed += 1;
    }
    cluster.take_slot(&newcomer, victim);
    progress(&format!("{newcomer} now serves in place of {}", old.name));
    Ok(killed)
}

/// The peer address a master listens on (from its member.json), which the
/// proxy forwards to; None until the master has bootstrapped.
fn real_peer_addr(master_dir: &std::path::Path) -> Option<std::net::SocketAddr> {
    let member: serde_json::Value =
        serde_json::from_slice(&std::fs::read(master_dir.join("member.json")).ok()?).ok()?;
    member["peer_listen"].as_str()?.parse().ok()
}

/// Whether every killed master (slot, PID) was restarted within a minute.
async fn all_restarted(cluster: &Arc<UpCluster>, pids: Vec<(usize, u32)>) -> anyhow::Result<bool> {
    let c = cluster.clone();
    Ok(tokio::task::spawn_blocking(move || {
        pids.iter().all(|(i, pid)| c.wait_restarted(*i, *pid, Duration::from_secs(60)))
    })
    .await?)
}

/// Creates scenario 10's Deployment and waits until it is available.
fn start_deployment(cluster: &UpCluster) -> anyhow::Result<()> {
    cluster.kubectl(&["apply", "-f", "-"], Some(orchestration::DEPLOYMENT))?;
    cluster.kubectl(&["rollout", "status", "deployment/chaos-web", "--timeout=15s"], None).map(|_| ())
}

/// Every second until `stop`: which node each of the Deployment's pods
/// is bound to (a failed listing, e.g. while the masters restart, is
/// skipped).
fn watch_pods(cluster: &UpCluster, stop: &AtomicBool) -> PodSightings {
    let mut seen = PodSightings::default();
    while !stop.load(Ordering::Relaxed) {
        let list = cluster.kubectl(&["get", "pods", "-l", orchestration::SELECTOR, "-o", "json"], None);
        if let Ok(v) = list.and_then(|s| Ok(serde_json::from_str::<serde_json::Value>(&s)?)) {
            seen.record(&v);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    seen
}

/// Waits up to `timeout` for the Deployment to converge: (converged, how
/// long it took, the last reason it had not).
fn wait_converged(cluster: &UpCluster, timeout: Duration) -> (bool, Option<u64>, String) {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        let get = |what: &[&str]| -> anyhow::Result<serde_json::Value> {
            let mut args = vec!["get"];
            args.extend_from_slice(what);
            args.extend(["-o", "json"]);
            Ok(serde_json::from_str(&cluster.kubectl(&args, None)?)?)
        };
        let state = (|| {
            let d = get(&["deployment", "chaos-web"])?;
            let p = get(&["pods", "-l", orchestration::SELECTOR])?;
            let n = get(&["nodes"])?;
            anyhow::Ok(orchestration::converged(&d, &p, &n, orchestration::REPLICAS))
        })();
        match state {
            Ok(Ok(())) => return (true, Some(start.elapsed().as_millis() as u64), String::new()),
            Ok(Err(why)) => last = why,
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    (false, None, last)
}

/// One of scenario 10's faults (`kind` 0: kill -9 agent `k`, restarted by
/// `up`; 1: cut agent `k` off from every master for [`AGENT_CUT`], until its Node is
/// seen not Ready; 2: kill -9 all three masters at once). When it took
/// effect, or None if it could not be seen to.
async fn agent_fault(cluster: &Arc<UpCluster>, kind: usize, k: usize) -> anyhow::Result<Option<Instant>> {
    let node = format!("node-{}", k + 1);
    match kind {
        0 => {
            let Some(pid) = cluster.agent_pid(k) else { return Ok(None) };
            progress(&format!("kill -9 agent {node}"));
            cluster.signal(pid, libc::SIGKILL);
            let t0 = Instant::now();
            let c = cluster.clone();
            let back =
                tokio::task::spawn_blocking(move || c.wait_agent_restarted(k, pid, Duration::from_secs(20))).await?;
            Ok(back.then_some(t0))
        }
        1 => {
            progress(&format!("cut agent {node} off from the masters for {AGENT_CUT:?}"));
            let cut = match cluster.cut_agent(k) {
                Ok(cut) => cut,
                Err(e) => {
                    progress(&format!("cutting {node} off: {e:#}"));
                    return Ok(None);
                }
            };
            let t0 = Instant::now();
            let c = cluster.clone();
            let node_name = node.clone();
            let seen_down = tokio::task::spawn_blocking(move || {
                let jsonpath = r#"-o=jsonpath={.status.conditions[?(@.type=="Ready")].status}"#;
                let deadline = Instant::now() + AGENT_CUT;
                let mut down = false;
                while Instant::now() < deadline {
                    if !down {
                        down =
                            c.kubectl(&["get", "node", &node_name, jsonpath], None).is_ok_and(|s| s.trim() != "True");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                down
            })
            .await?;
            drop(cut);
            if !seen_down {
                progress(&format!("{node} never showed not Ready"));
            }
            Ok(seen_down.then_some(t0))
        }
        _ => {
            progress("kill -9 all three masters");
            let pids = cluster.kill9_all();
            let t0 = Instant::now();
            Ok(all_restarted(cluster, pids).await?.then_some(t0))
        }
    }
}

/// Whether, within `timeout`, some master's member list satisfies `ok`.
async fn wait_members(cluster: &UpCluster, timeout: Duration, ok: impl Fn(&[pb::Member]) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for i in 0..cluster.masters {
            let Some(ep) = cluster.endpoints(i) else { continue };
            let Some(ch) = connect(cluster, &ep.etcd_url).await else { continue };
            let list = pb::cluster_client::ClusterClient::new(ch).member_list(pb::MemberListRequest::default()).await;
            if list.is_ok_and(|l| ok(&l.into_inner().members)) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Removes member `id` through any master but `victim` (its own slot),
/// retrying across kills for a minute. Done once a master says it is no
/// longer a member ("not found" to a retry whose first try went through).
async fn remove_member(cluster: Arc<UpCluster>, id: u64, victim: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        for i in (0..cluster.masters).filter(|i| *i != victim) {
            let Some(ep) = cluster.endpoints(i) else {
                progress(&format!("member remove: slot {i} has no master serving"));
                continue;
            };
            let Some(ch) = connect(&cluster, &ep.etcd_url).await else {
                progress(&format!("member remove: {} does not answer", ep.name));
                continue;
            };
            match pb::cluster_client::ClusterClient::new(ch).member_remove(pb::MemberRemoveRequest { id }).await {
                Ok(_) => return true,
                Err(e) if e.code() == tonic::Code::NotFound => return true,
                Err(e) => progress(&format!("member remove through {}: {}", ep.name, e.message())),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// The failpoint matrix's progress through its seeded order.
struct FailpointMatrix {
    order: Vec<String>,
    /// Armings so far (the next point is `order[next % len]`).
    next: usize,
    /// Next revision to compact to; at most `compact_limit`, below every
    /// revision the checkers read.
    next_compact: i64,
    compact_limit: i64,
    hits: Vec<FailpointHit>,
}

/// A KV client on master `i`.
async fn kv_on(cluster: &UpCluster, i: usize) -> Option<pb::kv_client::KvClient<Channel>> {
    let ep = cluster.endpoints(i)?;
    connect(cluster, &ep.etcd_url).await.map(pb::kv_client::KvClient::new)
}

/// `n` acknowledged sequential puts through master `via` (or, after a
/// failure, the next master that is not `avoid`) to keys outside the
/// watched range (`chaos-pad/`), each its own log entry; returns the last
/// revision. Failed puts are retried until `timeout`.
async fn pad_writes(
    cluster: &UpCluster,
    via: usize,
    avoid: Option<usize>,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<i64> {
    let deadline = Instant::now() + timeout;
    let mut done = 0;
    let mut rev = 0;
    let mut kv = None;
    let mut via = via;
    let mut last_error = String::new();
    while done < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {n} padding writes in {timeout:?} (last error: {last_error})"
        );
        if kv.is_none() {
            kv = kv_on(cluster, via).await;
            if kv.is_none() {
                last_error = format!("master-{} unreachable", via + 1);
            }
        }
        let Some(c) = kv.as_mut() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let put = pb::PutRequest {
            key: format!("chaos-pad/{}", done % 16).into_bytes(),
            value: done.to_string().into_bytes(),
            ..Default::default()
        };
        match c.put(put).await {
            Ok(r) => {
                rev = r.into_inner().header.map_or(rev, |h| h.revision);
                done += 1;
            }
            Err(e) => {
                last_error = format!("master-{}: {}", via + 1, e.message());
                kv = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if kv.is_none() {
            via = (via + 1) % cluster.masters;
            if Some(via) == avoid {
                via = (via + 1) % cluster.masters;
            }
        }
    }
    Ok(rev)
}

/// Does master `i` answer a linearizable read within `timeout`? (A master
/// whose Raft core died still accepts connections, so being up is not enough.)
async fn serves_linearizable_read(cluster: &UpCluster, i: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(mut kv) = kv_on(cluster, i).await {
            if kv.range(pb::RangeRequest { key: b"chaos-pad/0".to_vec(), ..Default::default() }).await.is_ok() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// One step of the failpoint matrix: arm the next point with `1*return` on
/// the leader or a follower (alternately; `snapshot_install` only happens on
/// followers), provoke it if the workload alone does not reach it, and wait
/// for the master to die there and `capstan up` to restart it. Returns the
/// moment the fault is in effect (armed, or the partition healed).
async fn failpoint_fault(
    cluster: &Arc<UpCluster>,
    fm: &mut FailpointMatrix,
    leader: usize,
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<Option<Instant>> {
    let name = fm.order[fm.next % fm.order.len()].clone();
    let follower = (leader + 1 + rng.gen_range(0..2)) % 3;
    let on_leader = name != "raft::snapshot_install" && fm.next.is_multiple_of(2);
    fm.next += 1;
    let target = if on_leader { leader } else { follower };
    // Provoking writes and compactions go through a master that stays up.
    let other = if on_leader { follower } else { leader };
    let Some(old_pid) = cluster.endpoints(target).map(|e| e.pid) else { return Ok(None) };
    let crashes_before = cluster.failpoint_crashes(target, &name);
    let role = if on_leader { "leader" } else { "follower" };
    progress(&format!("arm {name}=1*return on master-{} ({role})", target + 1));
    let armed_at = Instant::now();
    let mut t0 = armed_at;
    match name.as_str() {
        "raft::snapshot_install" => {
            // Cut the follower off while the leader writes past its snapshot
            // and purges the log behind it: on healing, only a snapshot can
            // catch the follower up.
            let cut = cluster.isolate(target)?;
            cluster.arm_failpoint(target, &name, "1*return").await?;
            let pad = pad_writes(cluster, other, Some(target), FAILPOINT_PAD_WRITES, Duration::from_secs(60)).await;
            // Let the leader build its snapshot and purge before healing.
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(cut);
            t0 = Instant::now();
            pad?;
        }
        "raft::snapshot_build" => {
            cluster.arm_failpoint(target, &name, "1*return").await?;
            let n = FAILPOINT_SNAPSHOT_EVERY as usize + 50;
            if let Err(e) = pad_writes(cluster, other, Some(target), n, Duration::from_secs(60)).await {
                // The wait below tells whether the point was hit anyway.
                progress(&format!("provoking a snapshot: {e:#}"));
            }
        }
        "raft::compaction" => {
            anyhow::ensure!(fm.next_compact <= fm.compact_limit, "no revisions left to compact");
            cluster.arm_failpoint(target, &name, "1*return").await?;
            let revision = fm.next_compact;
            fm.next_compact += 1;
            // When the target is the leader its crash can lose the answer to
            // a compaction that did commit; a retry then gets "compacted".
            // Either way, whether the point was hit is what the wait decides.
            for _ in 0..20 {
                if cluster.failpoint_crashes(target, &name) > crashes_before {
                    break;
                }
                if let Some(mut kv) = kv_on(cluster, other).await {
                    match kv.compact(pb::CompactionRequest { revision, physical: false }).await {
                        Ok(_) => break,
                        Err(e) if e.message().contains("compacted") => break,
                        Err(_) => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        // Log appends and applies happen with every write of the workload.
        _ => cluster.arm_failpoint(target, &name, "1*return").await?,
    }
    let c = cluster.clone();
    let restarted =
        tokio::task::spawn_blocking(move || c.wait_restarted(target, old_pid, Duration::from_secs(45))).await?;
    let hit = cluster.failpoint_crashes(target, &name) > crashes_before;
    let serving = restarted && serves_linearizable_read(cluster, target, Duration::from_secs(30)).await;
    if !restarted {
        // Not hit: disarm so it cannot fire during a later step.
        let _ = cluster.arm_failpoint(target, &name, "off").await;
    }
    progress(&format!(
        "{name} on master-{}: {}",
        target + 1,
        match (hit, restarted, serving) {
            (true, true, true) => "crashed there, restarted, serving",
            (true, true, false) => "crashed there, restarted, NOT serving",
            (true, false, _) => "crashed there, NOT restarted",
            (false, _, _) => "NOT hit",
        }
    ));
    fm.hits.push(FailpointHit {
        name,
        master: target + 1,
        role,
        hit,
        restarted,
        serving,
        crash_to_serving_ms: serving.then(|| armed_at.elapsed().as_millis() as u64),
    });
    Ok(Some(t0))
}

/// Runs every scenario with the same seed and renders a Markdown summary.
/// Whether `capstan` was built with the `failpoints` feature (its hidden
/// `build-info` command says).
pub fn has_failpoints(capstan: &std::path::Path) -> bool {
    let out = std::process::Command::new(capstan).arg("build-info").output();
    let info = out.ok().and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
    info.is_some_and(|i| i["failpoints"] == true)
}

pub async fn matrix(base: RunConfig) -> anyhow::Result<(String, bool)> {
    let mut md = String::from(
        "| scenario | seed | s | ops | acked writes | faults | linearizable | acked lost | watch violations | split brain | API updates / violations | recovery p50/p99 ms | pass |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut all = true;
    for scenario in [
        Scenario::Steady,
        Scenario::KillLeader,
        Scenario::KillFollower,
        Scenario::PauseLeader,
        Scenario::PartitionLeader,
        Scenario::DeafLeader,
        Scenario::BridgePartition,
        Scenario::FlappingPartition,
        Scenario::PacketLoss,
        Scenario::SnapshotCatchUp,
        Scenario::DiskFull,
        Scenario::ClockSkew,
        Scenario::Compaction,
        Scenario::MemberReplace,
        Scenario::AgentFaults,
        Scenario::NetworkImpairment,
        Scenario::PowerCut,
        Scenario::FailpointCrash,
    ] {
        if scenario == Scenario::FailpointCrash && !has_failpoints(&base.capstan) {
            progress("FailpointCrash skipped: capstan was built without `--features failpoints`");
            md.push_str(
                "| FailpointCrash | - | - | - | - | - | - | - | - | - | - | - | skipped (no failpoints build) |\n",
            );
            continue;
        }
        let r = run(RunConfig { scenario, ..base.clone() }).await?;
        all &= r.passed;
        let rec = r.recovery_ms.as_ref().map_or("-".to_string(), |x| format!("{}/{}", x.p50, x.p99));
        md.push_str(&format!(
            "| {:?} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |\n",
            r.scenario,
            r.seed,
            r.duration_s,
            r.operations,
            r.acknowledged_writes,
            r.faults,
            r.linearizable,
            r.acked_writes_lost,
            r.watch.total(),
            r.split_brain,
            r.api.updates_acked,
            r.api.violations(),
            rec,
            if r.passed { "PASS" } else { "FAIL" }
        ));
    }
    Ok((md, all))
}
