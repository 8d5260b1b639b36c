//! A running master's store: openraft, the state machine, the watch hub and
//! the peer transport wired together, plus what the leader alone decides
//! (lease expiry, automatic compaction).
//!
//! Clients (the etcd API, the Kubernetes API) call [`StoreNode`]:
//! - `write` proposes a command; on a follower it is forwarded to the leader
//!   over the peer transport. It returns only after the entry is committed
//!   (on disk on a quorum) and applied.
//! - `read_index` makes the next local read linearizable (ReadIndex: the
//!   leader confirms it still leads and names the log index to wait for).
//! - reads themselves are served from the local in-memory MVCC (`state()`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{ChangeMembers, ServerState};
use parking_lot::Mutex;

use crate::batch::{Coalescer, ProposalBatcher};
use crate::disk::DiskAlarms;
use crate::metrics::NodeMetrics;
use crate::storage::SharedState;
use crate::transport::{PeerClients, PeerRequest, PeerResponse, TransportError};
use crate::types::*;
use crate::watch::WatchHub;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest accepted write, in bytes of its encoded command.
    pub max_request_bytes: usize,
    /// Over this many bytes of MVCC data writes are slowed and an alarm raised.
    pub quota_soft_bytes: u64,
    /// Over this only deletes, lease revokes and compaction pass.
    pub quota_hard_bytes: u64,
    /// Keep this many revisions of history; older ones are compacted by the
    /// leader. 0 disables automatic compaction.
    pub retain_revisions: i64,
    /// Below this many free bytes on a master's data disk, writes that add
    /// data are refused on every master (see `disk.rs`).
    pub min_free_disk_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 3 * 1024 * 1024 / 2,
            quota_soft_bytes: 6 << 30,
            quota_hard_bytes: 8 << 30,
            retain_revisions: 100_000,
            min_free_disk_bytes: DEFAULT_MIN_FREE_DISK,
        }
    }
}

/// [`Limits::min_free_disk_bytes`] unless configured: room for RocksDB to
/// flush and compact, and for the deletes that give space back.
pub const DEFAULT_MIN_FREE_DISK: u64 = 256 << 20;

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: request is too large ({size} bytes, limit {max})")]
    TooLarge { size: usize, max: usize },
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("{0}")]
    Mvcc(#[from] MvccError),
    /// The request may or may not have been applied.
    #[error("etcdserver: request outcome unknown: {0}")]
    Indeterminate(String),
    #[error("etcdserver: {0}")]
    Internal(String),
}

pub struct StoreNode {
    pub id: NodeId,
    pub raft: Raft,
    pub hub: Arc<WatchHub>,
    pub limits: Limits,
    state: SharedState,
    clients: Arc<PeerClients>,
    /// Leader only: when each lease expires. Rebuilt (full TTL) by a new leader.
    lease_deadlines: Mutex<LeaseClock>,
    pub alarm_nospace: std::sync::atomic::AtomicBool,
    /// This master's data disk is below `min_free_disk_bytes`.
    pub disk_low: std::sync::atomic::AtomicBool,
    /// Masters that reported a low disk (what the leader refuses writes by).
    disk_alarms: Mutex<DiskAlarms>,
    batcher: ProposalBatcher,
    pub metrics: NodeMetrics,
    /// ReadIndex rounds of this node (leader: confirm leadership; follower:
    /// ask the leader), shared by concurrent reads.
    reads: Arc<Coalescer<Result<u64, StoreError>>>,
    /// (term of the stored vote, last log index) when this process started,
    /// read from storage before Raft ran: see [`read_floor`].
    started_at: (u64, u64),
}

/// The least index a leader's ReadIndex may return.
///
/// openraft lets a leader that restarts keep its term and leadership, and
/// then reads at max(the first entry of its term, its commit index) — but
/// the commit index it restarts with is only what was on disk (saved
/// unsynced, as the state machine), and the first entry of its term may be
/// long ago. After a power cut (kill -9 keeps the page cache; a power cut
/// does not) both can be below writes that were acknowledged before it, and
/// a "linearizable" read would miss them: found by the chaos PowerCut
/// scenario. So a leader still in the term it started in reads at least at
/// the end of the log it started with; every acknowledged write is in that
/// log (it led them), and the wait ends once it has committed and applied
/// it again. A leader of a later term was elected and proposed its own
/// first entry after everything it had, which openraft's read index covers.
pub fn read_floor(started_at: (u64, u64), current_term: u64) -> u64 {
    let (term, last_index) = started_at;
    if current_term == term {
        last_index
    } else {
        0
    }
}

#[derive(Default)]
struct LeaseClock {
    term: u64,
    deadlines: HashMap<i64, Instant>,
}

const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const PEER_RPC_TIMEOUT: Duration = Duration::from_secs(5);

impl StoreNode {
    pub fn new(
        id: NodeId,
        raft: Raft,
        hub: Arc<WatchHub>,
        state: SharedState,
        clients: Arc<PeerClients>,
        limits: Limits,
        started_at: (u64, u64),
    ) -> Arc<StoreNode> {
        let metrics = NodeMetrics::default();
        Arc::new(StoreNode {
            started_at,
            id,
            hub,
            limits,
            state,
            clients,
            lease_deadlines: Mutex::new(LeaseClock::default()),
            alarm_nospace: Default::default(),
            disk_low: Default::default(),
            disk_alarms: Mutex::default(),
            batcher: ProposalBatcher::start(
                raft.clone(),
                id,
                metrics.proposals_committed.clone(),
                metrics.proposals_failed.clone(),
            ),
            metrics,
            reads: Arc::default(),
            raft,
        })
    }

    /// Whether `id` left the cluster in a membership this master applied.
    pub fn is_removed(&self, id: NodeId) -> bool {
        self.state.read().removed.contains(&id)
    }

    pub fn state(&self) -> &SharedState {
        &self.state
    }

    pub fn clients(&self) -> &Arc<PeerClients> {
        &self.clients
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    pub fn leader(&self) -> Option<(NodeId, Member)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let member = m.membership_config.membership().get_node(&id).cloned()?;
        Some((id, member))
    }

    /// Voters and learners of the current membership.
    pub fn members(&self) -> Vec<(NodeId, Member, bool)> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership.nodes().map(|(id, n)| (*id, n.clone(), !voters.contains(id))).collect()
    }

    /// Size, quota and disk checks; returns the command's size (`approx_size`).
    fn check_admission(&self, cmd: &Command) -> Result<usize, StoreError> {
        let size = cmd.approx_size();
        if size > self.limits.max_request_bytes {
            return Err(StoreError::TooLarge { size, max: self.limits.max_request_bytes });
        }
        let used = self.state.read().mvcc.size_bytes();
        let over_soft = used > self.limits.quota_soft_bytes;
        self.alarm_nospace.store(over_soft, std::sync::atomic::Ordering::Relaxed);
        if used > self.limits.quota_hard_bytes && crate::disk::grows(cmd) {
            return Err(StoreError::NoSpace);
        }
        self.check_disk(cmd)?;
        Ok(size)
    }

    /// Refuses a write that adds data while this master's disk, or (on the
    /// leader) any master's, is low.
    pub(crate) fn check_disk(&self, cmd: &Command) -> Result<(), StoreError> {
        if !crate::disk::grows(cmd) {
            return Ok(());
        }
        let low_here = self.disk_low.load(std::sync::atomic::Ordering::Relaxed);
        if low_here || (self.is_leader() && !self.disk_alarms.lock().active(Instant::now()).is_empty()) {
            return Err(StoreError::NoSpace);
        }
        Ok(())
    }

    /// Members whose data disk is low, as this master knows (its own, and
    /// on the leader every reported one).
    pub fn disk_alarms(&self) -> Vec<NodeId> {
        let mut ids = self.disk_alarms.lock().active(Instant::now());
        if self.disk_low.load(std::sync::atomic::Ordering::Relaxed) && !ids.contains(&self.id) {
            ids.push(self.id);
            ids.sort_unstable();
        }
        ids
    }

    /// A master's report of its disk (see `disk.rs`).
    pub(crate) fn disk_report(&self, id: NodeId, low: bool) {
        self.disk_alarms.lock().report(id, low, Instant::now());
    }

    /// Measures the data disk every `CHECK_EVERY` and tells the leader
    /// while it is low (and once when it recovers).
    pub async fn watch_disk(self: Arc<Self>, data_dir: std::path::PathBuf) {
        let mut tick = tokio::time::interval(crate::disk::CHECK_EVERY);
        loop {
            tick.tick().await;
            let free = match crate::disk::free_bytes(&data_dir) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(dir = %data_dir.display(), "cannot measure free disk space: {e}");
                    continue;
                }
            };
            let low = free < self.limits.min_free_disk_bytes;
            let was = self.disk_low.swap(low, std::sync::atomic::Ordering::Relaxed);
            if low != was {
                let (free_mib, min_mib) = (free >> 20, self.limits.min_free_disk_bytes >> 20);
                if low {
                    tracing::error!(
                        free_mib,
                        min_mib,
                        "data disk almost full: writes refused (NOSPACE) until space is freed"
                    );
                } else {
                    tracing::warn!(free_mib, min_mib, "data disk has room again: disk alarm cleared");
                }
            }
            if !(low || was) {
                continue;
            }
            self.disk_report(self.id, low);
            if let Some((leader, member)) = self.leader().filter(|(id, _)| *id != self.id) {
                let req = PeerRequest::DiskAlarm { id: self.id, low };
                if let Err(e) = self.clients.call(&member.peer_addr, &req, PEER_RPC_TIMEOUT).await {
                    tracing::debug!(leader, "disk alarm report failed: {e}");
                }
            }
        }
    }

    /// Propose `cmd` and wait until it is committed and applied (here or, for
    /// a follower, on the leader). Retries only while the command has surely
    /// not been accepted by any leader.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, StoreError> {
        let size = self.check_admission(&cmd)?;
        if self.alarm_nospace.load(std::sync::atomic::Ordering::Relaxed) {
            // Soft quota: slow writers down instead of failing them.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = Instant::now() + WRITE_TIMEOUT;
        loop {
            if self.leader_lost_quorum() {
                // Nothing was proposed: a clean failure the client can retry elsewhere.
                return Err(StoreError::NoLeader);
            }
            match self.batcher.propose(cmd.clone(), size).await {
                Ok(r) => return Ok(r),
                Err(Forward::To(member)) => {
                    let req = PeerRequest::ClientWrite(cmd.clone());
                    let call = self.clients.call(&member.peer_addr, &req, WRITE_TIMEOUT);
                    let result = tokio::select! {
                        r = call => r,
                        // A dead leader is noticed by the election long before
                        // the QUIC idle timeout: answer "unknown" then, so the
                        // client retries against the new leader.
                        () = self.leader_changed_from(&member) => {
                            return Err(StoreError::Indeterminate("leader changed while the write was in flight".into()));
                        }
                    };
                    match result {
                        Ok(PeerResponse::ClientWrite(r)) => return Ok(r),
                        Ok(PeerResponse::Error(e)) if e == NOT_LEADER => {}
                        Ok(PeerResponse::Error(e)) if e == NO_SPACE => return Err(StoreError::NoSpace),
                        Ok(PeerResponse::Error(e)) => return Err(StoreError::Internal(e)),
                        Ok(_) => return Err(StoreError::Internal("unexpected peer response".into())),
                        Err(TransportError::Unreachable { .. }) => {}
                        Err(e) => return Err(StoreError::Indeterminate(e.to_string())),
                    }
                }
                Err(Forward::Unknown) => {}
                Err(Forward::Failed(e)) => return Err(e),
            }
            if Instant::now() > deadline {
                return Err(StoreError::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A leader cut off from its quorum (no acknowledgement for longer than
    /// an election timeout) cannot commit: it refuses writes at once, so
    /// clients go to the side that elects a new leader instead of waiting.
    fn leader_lost_quorum(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        // Past the election timeout's upper bound without a quorum
        // acknowledgement, a leader knows it may have been replaced.
        let lost_after = self.raft.config().election_timeout_max;
        m.current_leader == Some(self.id) && m.millis_since_quorum_ack.is_some_and(|ms| ms > lost_after)
    }

    /// Resolves once the known leader is no longer `member`.
    async fn leader_changed_from(&self, member: &Member) {
        let mut rx = self.raft.metrics();
        loop {
            let current = {
                let m = rx.borrow_and_update();
                m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).cloned())
            };
            if current.as_ref().is_some_and(|c| c != member) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Propose on this node only; used for writes forwarded to us.
    pub(crate) async fn write_local(&self, cmd: Command) -> Result<CommandResult, Forward> {
        let size = cmd.approx_size();
        self.batcher.propose(cmd, size).await
    }

    /// Wait until this node's state machine reflects every write committed
    /// before this call (ReadIndex). After it returns, a local read is
    /// linearizable. Concurrent calls share one round (see `batch.rs`).
    pub async fn read_index(self: &Arc<Self>) -> Result<(), StoreError> {
        #[cfg(feature = "planted-bugs")]
        if crate::planted::armed("stale-read") {
            // Planted bug: serve "linearizable" reads from local state as is.
            return Ok(());
        }
        let me = self.clone();
        let round = move || {
            let me = me.clone();
            async move { me.read_index_round().await }
        };
        let idx = self.reads.join(round, Err(StoreError::Internal("read index round dropped".into()))).await?;
        if self.raft.metrics().borrow().last_applied.map_or(0, |l| l.index) >= idx {
            return Ok(());
        }
        let wait = self.raft.wait(Some(WRITE_TIMEOUT));
        wait.applied_index_at_least(Some(idx), "read index").await.map(|_| ()).map_err(|_| StoreError::Timeout)
    }

    /// One ReadIndex round: the log index a read arriving before it must wait for.
    async fn read_index_round(&self) -> Result<u64, StoreError> {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        loop {
            if self.is_leader() {
                match self.raft.ensure_linearizable().await {
                    Ok(log_id) => {
                        let floor = read_floor(self.started_at, self.raft.metrics().borrow().current_term);
                        return Ok(log_id.map_or(0, |l| l.index).max(floor));
                    }
                    Err(e) => tracing::debug!(error = %e, "read index on leader failed; retrying"),
                }
            } else if let Some((_, leader)) = self.leader() {
                match self.clients.call(&leader.peer_addr, &PeerRequest::ReadIndex, PEER_RPC_TIMEOUT).await {
                    Ok(PeerResponse::ReadIndex(idx)) => return Ok(idx),
                    Ok(other) => tracing::debug!(?other, "read index refused; retrying"),
                    Err(e) => tracing::debug!(error = %e, "read index call failed; retrying"),
                }
            }
            if Instant::now() > deadline {
                return Err(StoreError::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Leader side of ReadIndex: confirm leadership, return the index to wait for.
    pub(crate) async fn leader_read_index(self: &Arc<Self>) -> Result<u64, String> {
        if !self.is_leader() {
            return Err(NOT_LEADER.to_string());
        }
        self.read_index_round().await.map_err(|_| NOT_LEADER.to_string())
    }

    /// Renew a lease; returns its TTL, or `None` if it does not exist.
    pub async fn lease_keepalive(&self, id: i64) -> Result<Option<i64>, StoreError> {
        Ok(self.lease_on_leader(id, true).await?.map(|(ttl, _)| ttl))
    }

    /// Remaining TTL (seconds) and granted TTL, or `None` if it does not exist.
    pub async fn lease_time_to_live(&self, id: i64) -> Result<Option<(i64, i64)>, StoreError> {
        self.lease_on_leader(id, false).await
    }

    /// The leader alone keeps lease clocks: answer here or ask it.
    async fn lease_on_leader(&self, id: i64, renew: bool) -> Result<Option<(i64, i64)>, StoreError> {
        if self.is_leader() {
            return Ok(self.lease_local(id, renew));
        }
        let (_, leader) = self.leader().ok_or(StoreError::NoLeader)?;
        let req = if renew { PeerRequest::LeaseKeepAlive { id } } else { PeerRequest::LeaseTimeToLive { id } };
        match self.clients.call(&leader.peer_addr, &req, PEER_RPC_TIMEOUT).await {
            Ok(PeerResponse::LeaseTtl { ttl, granted }) if ttl >= 0 => Ok(Some((ttl, granted))),
            Ok(PeerResponse::LeaseTtl { .. }) => Ok(None),
            Ok(_) => Err(StoreError::NoLeader),
            Err(e) => Err(StoreError::Internal(e.to_string())),
        }
    }

    /// Leader-local lease clock. `renew` resets the deadline to a full TTL.
    pub(crate) fn lease_local(&self, id: i64, renew: bool) -> Option<(i64, i64)> {
        let granted = self.state.read().mvcc.lease(id)?.ttl;
        let now = Instant::now();
        let mut clock = self.lease_deadlines.lock();
        let deadline = clock.deadlines.entry(id).or_insert(now + Duration::from_secs(granted as u64));
        if renew {
            *deadline = now + Duration::from_secs(granted as u64);
        }
        let remaining = deadline.saturating_duration_since(now).as_secs_f64().ceil() as i64;
        Some((remaining, granted))
    }

    /// Bring the state gauges up to date (called before each scrape).
    pub fn refresh_metrics(&self, db_size_bytes: u64) {
        let m = self.raft.metrics().borrow().clone();
        let g = &self.metrics;
        g.term.set(m.current_term as i64);
        g.is_leader.set((m.current_leader == Some(self.id)) as i64);
        g.has_leader.set(m.current_leader.is_some() as i64);
        let last = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        g.last_log_index.set(last as i64);
        g.applied_index.set(applied as i64);
        g.apply_lag.set(last.saturating_sub(applied) as i64);
        g.members.set(m.membership_config.membership().nodes().count() as i64);
        {
            let st = self.state.read();
            g.revision.set(st.mvcc.revision());
            g.compacted_revision.set(st.mvcc.compacted());
            g.keys.set(st.mvcc.live_keys() as i64);
            g.data_bytes.set(st.mvcc.size_bytes() as i64);
        }
        g.db_size_bytes.set(db_size_bytes as i64);
        g.quota_bytes.set(self.limits.quota_hard_bytes as i64);
        g.alarm_nospace.set(self.alarm_nospace.load(std::sync::atomic::Ordering::Relaxed) as i64);
        g.alarm_disk_low.set(self.disk_low.load(std::sync::atomic::Ordering::Relaxed) as i64);
        g.peer_rtt.reset();
        for (peer, rtt) in self.clients.rtts() {
            g.peer_rtt.with_label_values(&[peer.as_str()]).set(rtt.as_secs_f64());
        }
    }

    /// Counts leader changes as they happen (not only at scrapes).
    pub async fn track_leader_changes(self: Arc<Self>) {
        let mut rx = self.raft.metrics();
        let mut last = rx.borrow().current_leader;
        while rx.changed().await.is_ok() {
            let now = rx.borrow().current_leader;
            if now != last {
                if now.is_some() {
                    self.metrics.leader_changes.inc();
                }
                last = now;
            }
        }
    }

    /// A master that applies its own removal (a leader removing itself
    /// does) sets `removed`; one removed behind its back learns it from its
    /// peers (see [`crate::transport::PeerResponse::Removed`]).
    /// Tombstones change only when a membership entry is applied, so the
    /// state is looked at once per applied membership, not per metrics
    /// update (one per applied batch).
    pub async fn watch_own_removal(self: Arc<Self>) {
        let mut rx = self.raft.metrics();
        let mut checked = None;
        loop {
            let membership = {
                let m = rx.borrow_and_update();
                let id = *m.membership_config.log_id();
                (id != checked && m.last_applied >= id).then_some(id)
            };
            if let Some(id) = membership {
                checked = id;
                if self.is_removed(self.id) {
                    tracing::error!("this master applied its own removal from the cluster");
                    self.clients.mark_removed();
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The leader's periodic duties: expire leases, compact old history.
    pub async fn run_leader_duties(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_compact_check = Instant::now();
        loop {
            tick.tick().await;
            let metrics = self.raft.metrics().borrow().clone();
            if metrics.state != ServerState::Leader {
                continue;
            }
            let expired = self.expired_leases(metrics.current_term);
            for id in expired {
                let node = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = node.write(Command::LeaseRevoke { id }).await {
                        tracing::debug!(lease = id, error = %e, "lease expiry proposal failed");
                    }
                });
            }
            if self.limits.retain_revisions > 0 && last_compact_check.elapsed() > Duration::from_secs(5) {
                last_compact_check = Instant::now();
                let (rev, compacted) = {
                    let st = self.state.read();
                    (st.mvcc.revision(), st.mvcc.compacted())
                };
                let target = rev - self.limits.retain_revisions;
                // Compact in steps of at least a tenth of the window, not every tick.
                if target > compacted + self.limits.retain_revisions / 10 {
                    if let Err(e) = self.write(Command::Compact { revision: target }).await {
                        tracing::debug!(error = %e, "automatic compaction failed");
                    }
                }
            }
        }
    }

    fn expired_leases(&self, term: u64) -> Vec<i64> {
        let leases: BTreeMap<i64, i64> = self.state.read().mvcc.leases().map(|(id, l)| (*id, l.ttl)).collect();
        let now = Instant::now();
        let mut clock = self.lease_deadlines.lock();
        if clock.term != term {
            // New leadership: nobody knows when the old leader last saw a
            // keep-alive, so every lease gets its full TTL again (as etcd).
            clock.term = term;
            clock.deadlines.clear();
        }
        clock.deadlines.retain(|id, _| leases.contains_key(id));
        let mut expired = Vec::new();
        for (id, ttl) in leases {
            let d = *clock.deadlines.entry(id).or_insert(now + Duration::from_secs(ttl as u64));
            if d <= now {
                expired.push(id);
                // Do not propose again every tick while the revoke commits.
                clock.deadlines.insert(id, now + Duration::from_secs(2));
            }
        }
        expired
    }

    /// Leader: add `id` as a learner, wait for it to catch up, make it a voter.
    pub(crate) async fn promote(&self, id: NodeId, member: Member) -> Result<(), String> {
        let exists = self.members().iter().any(|(i, _, _)| *i == id);
        if !exists {
            self.raft.add_learner(id, member, true).await.map_err(|e| e.to_string())?;
        }
        let voters: BTreeSet<NodeId> = [id].into();
        self.raft.change_membership(ChangeMembers::AddVoterIds(voters), false).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// One membership change: a voter removed without `retain` also leaves
    /// the node list in it (joint config, then uniform). A second change
    /// would fail when the leader removed itself: by then it steps down
    /// (and openraft's debug builds assert on it).
    pub(crate) async fn remove_member(&self, id: NodeId) -> Result<(), String> {
        let ids: BTreeSet<NodeId> = [id].into();
        let voter = self.members().iter().any(|(i, _, learner)| *i == id && !learner);
        let change = if voter { ChangeMembers::RemoveVoters(ids) } else { ChangeMembers::RemoveNodes(ids) };
        self.raft.change_membership(change, false).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Run a membership change on the leader, forwarding if needed.
    pub async fn membership_call(&self, req: PeerRequest) -> Result<(), StoreError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = if self.is_leader() {
                match &req {
                    PeerRequest::Promote { id, member } => self.promote(*id, member.clone()).await,
                    PeerRequest::RemoveMember { id } => self.remove_member(*id).await,
                    _ => return Err(StoreError::Internal("not a membership request".into())),
                }
            } else if let Some((_, leader)) = self.leader() {
                match self.clients.call(&leader.peer_addr, &req, Duration::from_secs(60)).await {
                    Ok(PeerResponse::Done) => Ok(()),
                    Ok(PeerResponse::Error(e)) => Err(e),
                    Ok(_) => Err("unexpected response".into()),
                    Err(e) => Err(e.to_string()),
                }
            } else {
                Err("no leader".into())
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(error = %e, "membership change not done yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(StoreError::Internal(e)),
            }
        }
    }
}

pub(crate) const NOT_LEADER: &str = "not leader";
/// The leader refused a forwarded write: a disk alarm is raised.
pub(crate) const NO_SPACE: &str = "no space";

pub(crate) enum Forward {
    To(Member),
    Unknown,
    Failed(StoreError),
}

#[cfg(test)]
mod tests {
    use super::read_floor;

    #[test]
    fn a_leader_still_in_its_starting_term_reads_past_the_log_it_started_with() {
        // Restarted in term 7 with entries up to 120: resumed leadership
        // reads at 120 or later, whatever openraft's commit index says.
        assert_eq!(read_floor((7, 120), 7), 120);
        // Elected in a later term: its own first entry bounds the read.
        assert_eq!(read_floor((7, 120), 8), 0);
        // A fresh node.
        assert_eq!(read_floor((0, 0), 1), 0);
    }
}
