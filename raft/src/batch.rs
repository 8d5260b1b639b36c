//! Amortising per-request costs over concurrent requests.
//!
//! openraft 0.9 appends and fsyncs every proposal before it takes the next
//! one, so one proposal per client write caps writes at one per fsync.
//! [`ProposalBatcher`] instead packs the writes that arrive while earlier
//! proposals are in flight into one log entry (`Command::Batch`); apply
//! still gives each command its own revision, in order.
//!
//! [`Coalescer`] does the same for ReadIndex: every read that arrives while
//! a leadership confirmation is in flight waits for the *next* one (a round
//! that started before a read arrived cannot vouch for it), so one round
//! serves all of them.

use std::future::Future;
use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use parking_lot::Mutex;
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::node::{Forward, StoreError};
use crate::types::*;

/// Most commands in one log entry.
const MAX_BATCH: usize = 1024;
/// Most bytes (encoded commands) in one log entry, unless one command alone is larger.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Proposals in flight at once; more pending writes wait and join a batch.
const MAX_IN_FLIGHT: usize = 4;

type Reply = oneshot::Sender<Result<CommandResult, Forward>>;

struct Pending {
    cmd: Command,
    size: usize,
    reply: Reply,
}

pub(crate) struct ProposalBatcher {
    tx: mpsc::UnboundedSender<Pending>,
}

impl ProposalBatcher {
    pub(crate) fn start(raft: Raft, id: NodeId, committed: IntCounter, failed: IntCounter) -> ProposalBatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, id, rx, Counters { committed, failed }));
        ProposalBatcher { tx }
    }

    /// Propose `cmd` (of encoded `size`) and wait for its applied result.
    pub(crate) async fn propose(&self, cmd: Command, size: usize) -> Result<CommandResult, Forward> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Pending { cmd, size, reply }).is_err() {
            return Err(Forward::Failed(StoreError::Internal("proposal batcher stopped".into())));
        }
        rx.await.unwrap_or_else(|_| Err(Forward::Failed(StoreError::Indeterminate("proposal dropped".into()))))
    }
}

#[derive(Clone)]
struct Counters {
    committed: IntCounter,
    failed: IntCounter,
}

async fn run(raft: Raft, id: NodeId, mut rx: mpsc::UnboundedReceiver<Pending>, counters: Counters) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Waiting for a slot is what lets a batch grow under load.
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) if bytes + p.size > MAX_BATCH_BYTES => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.size;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (raft, counters) = (raft.clone(), counters.clone());
        tokio::spawn(async move {
            let n = batch.len() as u64;
            if propose_batch(&raft, id, batch).await {
                counters.committed.inc_by(n);
            } else {
                counters.failed.inc_by(n);
            }
            drop(permit);
        });
    }
}

fn forward_of(e: &RaftError<NodeId, ClientWriteError<NodeId, Member>>, id: NodeId) -> Forward {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => match (f.leader_id, &f.leader_node) {
            (Some(l), Some(node)) if l != id => Forward::To(node.clone()),
            _ => Forward::Unknown,
        },
        e => Forward::Failed(StoreError::Indeterminate(e.to_string())),
    }
}

/// Proposes the batch and answers every caller; true if it committed.
async fn propose_batch(raft: &Raft, id: NodeId, batch: Vec<Pending>) -> bool {
    if batch.len() == 1 {
        let p = batch.into_iter().next().expect("one element");
        let r = raft.client_write(p.cmd).await.map(|r| r.data).map_err(|e| forward_of(&e, id));
        let ok = r.is_ok();
        let _ = p.reply.send(r);
        return ok;
    }
    let (cmds, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    match raft.client_write(Command::Batch(cmds)).await {
        Ok(resp) => {
            let mut results = resp.data.batch.into_iter();
            for reply in replies {
                let r =
                    results.next().ok_or_else(|| Forward::Failed(StoreError::Internal("short batch result".into())));
                let _ = reply.send(r);
            }
            true
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(forward_of(&e, id)));
            }
            false
        }
    }
}

/// Runs one `round` for every group of callers that arrived while the
/// previous round was running; each caller gets its round's result.
pub(crate) struct Coalescer<T> {
    state: Mutex<(bool, Vec<oneshot::Sender<T>>)>,
}

impl<T> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer { state: Mutex::new((false, Vec::new())) }
    }
}

impl<T: Clone + Send + 'static> Coalescer<T> {
    /// `round` must give the same answer whichever caller's copy runs it.
    pub(crate) async fn join<F, Fut>(self: &Arc<Self>, round: F, on_drop: T) -> T
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock();
            st.1.push(tx);
            !std::mem::replace(&mut st.0, true)
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let waiters = {
                        let mut st = me.state.lock();
                        if st.1.is_empty() {
                            st.0 = false;
                            return;
                        }
                        std::mem::take(&mut st.1)
                    };
                    let r = round().await;
                    for w in waiters {
                        let _ = w.send(r.clone());
                    }
                }
            });
        }
        rx.await.unwrap_or(on_drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn coalescer_serves_concurrent_callers_with_few_rounds() {
        let c: Arc<Coalescer<u64>> = Arc::default();
        let rounds = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (c, rounds) = (c.clone(), rounds.clone());
            tasks.push(tokio::spawn(async move {
                let r2 = rounds.clone();
                let got = c
                    .join(
                        move || {
                            let r = r2.clone();
                            async move {
                                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                                r.fetch_add(1, Ordering::SeqCst) + 1
                            }
                        },
                        0,
                    )
                    .await;
                (got, rounds.load(Ordering::SeqCst))
            }));
        }
        for t in tasks {
            let (got, _) = t.await.unwrap();
            assert!(got >= 1);
        }
        let n = rounds.load(Ordering::SeqCst);
        assert!(n < 50, "200 concurrent callers took {n} rounds");
    }

    #[tokio::test]
    async fn a_round_never_serves_a_caller_that_arrived_after_it_started() {
        let c: Arc<Coalescer<u64>> = Arc::default();
        let started = Arc::new(AtomicU64::new(0));
        let s = started.clone();
        let round = move || {
            let s = s.clone();
            async move {
                let n = s.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                n
            }
        };
        let first = tokio::spawn({
            let (c, round) = (c.clone(), round.clone());
            async move { c.join(round, 0).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        // Round 1 is running: this caller must get round 2.
        let second = c.join(round, 0).await;
        assert_eq!(first.await.unwrap(), 1);
        assert_eq!(second, 2);
    }
}
