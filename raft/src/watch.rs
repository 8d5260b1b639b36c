//! The watch hub: committed revisions fanned out to every watcher.
//!
//! Each committed revision is encoded once, by the apply path, as an
//! immutable [`Frame`]: a `bytes::Bytes` holding an rkyv archive of
//! `{revision, events}`. The hub broadcasts it; every subscriber receives a
//! clone of the same `Bytes` (a reference count, never a copy) and reads the
//! archive in place to filter it.
//!
//! Guarantees, per watcher:
//! - history first (from the MVCC store), then live frames, no gap, no repeat:
//!   a watcher tracks the last revision it processed and drops anything at or
//!   below it, and fills any jump from the store's history;
//! - one revision is never split across messages;
//! - apply never waits for a watcher: the broadcast ring overwrites, a lagging
//!   watcher notices (`Lagged`) and catches up from history, or is cancelled
//!   with the reason `compacted` when that history is gone;
//! - progress notifications carry the last revision the watcher processed, so
//!   no event at or below it can follow.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rkyv::rancor;
use tokio::sync::{broadcast, mpsc};
use tokio::task::AbortHandle;

use crate::mvcc::{Event, EventKind};
use crate::storage::SharedState;
use crate::types::{KeyRange, KeyValue, MvccError};

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
pub struct WireKv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
pub struct WireEvent {
    pub delete: bool,
    pub kv: WireKv,
    pub prev: Option<WireKv>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
pub struct WireFrame {
    pub revision: i64,
    pub events: Vec<WireEvent>,
}

impl WireKv {
    fn from_kv(kv: &KeyValue) -> WireKv {
        WireKv {
            key: kv.key.to_vec(),
            value: kv.value.to_vec(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

impl ArchivedWireKv {
    pub fn to_kv(&self) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(&self.key),
            value: Bytes::copy_from_slice(&self.value),
            create_revision: self.create_revision.to_native(),
            mod_revision: self.mod_revision.to_native(),
            version: self.version.to_native(),
            lease: self.lease.to_native(),
        }
    }
}

/// One committed revision, encoded once and shared by every subscriber.
#[derive(Clone, Debug)]
pub struct Frame {
    pub revision: i64,
    /// When apply published it (for the delivery-lag histogram).
    pub published: std::time::Instant,
    /// The store jumped to `revision` without events (snapshot installed):
    /// subscribers catch up from history.
    pub reset: bool,
    pub bytes: Bytes,
}

impl Frame {
    pub fn encode(revision: i64, events: &[Event]) -> Frame {
        let wire = WireFrame {
            revision,
            events: events
                .iter()
                .map(|e| WireEvent {
                    delete: e.kind == EventKind::Delete,
                    kv: WireKv::from_kv(&e.kv),
                    prev: e.prev_kv.as_ref().map(WireKv::from_kv),
                })
                .collect(),
        };
        // Sized up front: grown from empty, the buffer was reallocated
        // and copied several times for every frame.
        let size: usize = events
            .iter()
            .map(|e| {
                128 + e.kv.key.len() + e.kv.value.len() + e.prev_kv.as_ref().map_or(0, |p| p.key.len() + p.value.len())
            })
            .sum();
        // Serializing plain vectors and integers cannot fail.
        let aligned = rkyv::api::high::to_bytes_in::<_, rancor::Error>(
            &wire,
            rkyv::util::AlignedVec::<16>::with_capacity(64 + size),
        )
        .expect("rkyv encoding of a frame");
        // `from_owner` keeps the AlignedVec's alignment, which in-place access needs.
        Frame { revision, published: std::time::Instant::now(), reset: false, bytes: Bytes::from_owner(aligned) }
    }

    /// The archived frame, validated, read in place.
    pub fn archived(&self) -> Result<&ArchivedWireFrame, rancor::Error> {
        rkyv::access::<ArchivedWireFrame, rancor::Error>(&self.bytes)
    }
}

#[derive(Clone, Debug, Default)]
pub struct WatchRequest {
    pub range: KeyRange,
    /// 0 = from the next revision.
    pub start_revision: i64,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub progress_notify: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum WatchMessage {
    /// All matching events of exactly one revision.
    Events { revision: i64, events: Vec<Event> },
    /// Nothing at or below `revision` is still to come.
    Progress { revision: i64 },
    /// The watch ended; no further messages.
    Canceled { reason: String, compact_revision: i64 },
}

/// Fan-out point for committed revisions.
pub struct WatchHub {
    tx: broadcast::Sender<Frame>,
    state: OnceLock<SharedState>,
    pub progress_interval: Duration,
    metrics: crate::metrics::WatchMetrics,
}

impl WatchHub {
    /// `capacity`: frames buffered before a slow watcher lags.
    pub fn new(capacity: usize) -> WatchHub {
        let (tx, _) = broadcast::channel(capacity.max(1));
        WatchHub {
            tx,
            state: OnceLock::new(),
            progress_interval: Duration::from_secs(10),
            metrics: crate::metrics::WatchMetrics::default(),
        }
    }

    /// Connects the store whose history lagging watchers read.
    pub fn attach(&self, state: SharedState) {
        let _ = self.state.set(state);
    }

    /// Called by apply once the revision is durable in the state machine.
    pub fn publish(&self, revision: i64, events: Vec<Event>) {
        let frame = Frame::encode(revision, &events);
        let _ = self.tx.send(frame);
    }

    pub fn reset(&self, revision: i64) {
        let _ =
            self.tx.send(Frame { revision, published: std::time::Instant::now(), reset: true, bytes: Bytes::new() });
    }

    /// Subscribe to raw frames (in-process consumers such as informers).
    pub fn frames(&self) -> broadcast::Receiver<Frame> {
        self.tx.subscribe()
    }

    pub fn metrics(&self) -> &crate::metrics::WatchMetrics {
        &self.metrics
    }

    /// Starts a watcher task. Dropping the returned [`Watcher`] cancels it.
    pub fn watch(self: &Arc<Self>, req: WatchRequest) -> Watcher {
        let (out_tx, out_rx) = mpsc::channel(64);
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        let rx = self.tx.subscribe();
        let hub = self.clone();
        let task = tokio::spawn(async move { run_watcher(hub, req, rx, out_tx, ctl_rx).await });
        Watcher { rx: out_rx, ctl: ctl_tx, abort: task.abort_handle() }
    }
}

pub struct Watcher {
    pub rx: mpsc::Receiver<WatchMessage>,
    ctl: mpsc::Sender<()>,
    abort: AbortHandle,
}

impl Watcher {
    /// Ask for a progress notification (etcd's WatchProgressRequest).
    pub fn request_progress(&self) {
        let _ = self.ctl.try_send(());
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

fn keep(req: &WatchRequest, e: &Event) -> bool {
    match e.kind {
        EventKind::Put => !req.no_put,
        EventKind::Delete => !req.no_delete,
    }
}

/// Groups history events by revision into messages.
fn history_messages(req: &WatchRequest, events: Vec<(i64, Event)>) -> Vec<WatchMessage> {
    let mut out: Vec<WatchMessage> = Vec::new();
    for (rev, mut e) in events {
        if !keep(req, &e) {
            continue;
        }
        if !req.prev_kv {
            e.prev_kv = None;
        }
        match out.last_mut() {
            Some(WatchMessage::Events { revision, events }) if *revision == rev => events.push(e),
            _ => out.push(WatchMessage::Events { revision: rev, events: vec![e] }),
        }
    }
    out
}

enum Catchup {
    Messages(Vec<WatchMessage>, i64),
    Compacted(i64),
}

fn catch_up(hub: &WatchHub, req: &WatchRequest, from: i64, to: Option<i64>) -> Catchup {
    let Some(state) = hub.state.get() else {
        return Catchup::Compacted(0);
    };
    let st = state.read();
    let to = to.unwrap_or_else(|| st.mvcc.revision());
    if from > to {
        return Catchup::Messages(vec![], to);
    }
    match st.mvcc.history(&req.range, from, to) {
        Ok(ev) => Catchup::Messages(history_messages(req, ev), to),
        Err(MvccError::Compacted { compacted }) => Catchup::Compacted(compacted),
        Err(_) => Catchup::Compacted(st.mvcc.compacted()),
    }
}

/// Keeps the active-watchers gauge right however the watcher task ends.
struct ActiveWatcher<'a>(&'a prometheus::IntGauge);

impl Drop for ActiveWatcher<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn run_watcher(
    hub: Arc<WatchHub>,
    req: WatchRequest,
    mut rx: broadcast::Receiver<Frame>,
    out: mpsc::Sender<WatchMessage>,
    mut ctl: mpsc::Receiver<()>,
) {
    macro_rules! send {
        ($m:expr) => {
            if out.send($m).await.is_err() {
                return;
            }
        };
    }
    macro_rules! cancel_compacted {
        ($c:expr) => {{
            hub.metrics.cancelled.with_label_values(&["compacted"]).inc();
            let _ = out
                .send(WatchMessage::Canceled {
                    reason: "mvcc: required revision has been compacted".into(),
                    compact_revision: $c,
                })
                .await;
            return;
        }};
    }
    hub.metrics.watchers.inc();
    let _active = ActiveWatcher(&hub.metrics.watchers);
    // Subscribed before reading the current revision: nothing falls between.
    let current = match hub.state.get() {
        Some(s) => s.read().mvcc.revision(),
        None => 1,
    };
    let start = if req.start_revision <= 0 { current + 1 } else { req.start_revision };
    let mut last = current.max(start - 1);
    if start <= current {
        match catch_up(&hub, &req, start, Some(current)) {
            Catchup::Messages(msgs, _) => {
                for m in msgs {
                    send!(m);
                }
            }
            Catchup::Compacted(c) => cancel_compacted!(c),
        }
    }
    let mut ticker = tokio::time::interval(hub.progress_interval);
    ticker.tick().await;
    let mut sent_since_tick = false;
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Ok(frame) => {
                    if frame.revision <= last {
                        continue;
                    }
                    if frame.revision > last + 1 || frame.reset {
                        let upto = if frame.reset { frame.revision } else { frame.revision - 1 };
                        match catch_up(&hub, &req, last + 1, Some(upto)) {
                            Catchup::Messages(msgs, _) => {
                                for m in msgs {
                                    sent_since_tick = true;
                                    send!(m);
                                }
                                last = upto;
                            }
                            Catchup::Compacted(c) => cancel_compacted!(c),
                        }
                        if frame.reset {
                            continue;
                        }
                    }
                    let Ok(archived) = frame.archived() else {
                        let _ = out.send(WatchMessage::Canceled { reason: "corrupt watch frame".into(), compact_revision: 0 }).await;
                        return;
                    };
                    let mut events = Vec::new();
                    for e in archived.events.iter() {
                        if !req.range.contains(&e.kv.key) {
                            continue;
                        }
                        let ev = Event {
                            kind: if e.delete { EventKind::Delete } else { EventKind::Put },
                            kv: e.kv.to_kv(),
                            prev_kv: if req.prev_kv { e.prev.as_ref().map(|p| p.to_kv()) } else { None },
                        };
                        if keep(&req, &ev) {
                            events.push(ev);
                        }
                    }
                    last = frame.revision;
                    #[cfg(feature = "planted-bugs")]
                    if crate::planted::armed("drop-watch-event") && frame.revision % 25 == 0 {
                        // Planted bug: lose one revision in 25 on the live path.
                        events.clear();
                    }
                    if !events.is_empty() {
                        hub.metrics.events_sent.inc_by(events.len() as u64);
                        hub.metrics.delivery_lag.observe(frame.published.elapsed().as_secs_f64());
                        sent_since_tick = true;
                        send!(WatchMessage::Events { revision: frame.revision, events });
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    hub.metrics.lagged.inc();
                    match catch_up(&hub, &req, last + 1, None) {
                        Catchup::Messages(msgs, to) => {
                            for m in msgs {
                                sent_since_tick = true;
                                send!(m);
                            }
                            last = to;
                        }
                        Catchup::Compacted(c) => cancel_compacted!(c),
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = out.send(WatchMessage::Canceled { reason: "store shutting down".into(), compact_revision: 0 }).await;
                    return;
                }
            },
            Some(()) = ctl.recv() => {
                send!(WatchMessage::Progress { revision: last });
            }
            _ = ticker.tick(), if req.progress_notify => {
                if !sent_since_tick {
                    send!(WatchMessage::Progress { revision: last });
                }
                sent_since_tick = false;
            }
        }
    }
}

#[cfg(test)]
#[path = "watch_test.rs"]
mod tests;
