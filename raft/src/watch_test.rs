use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

use super::*;
use crate::mvcc::Mvcc;
use crate::storage::SmState;
use crate::types::*;

fn put(k: &str, v: &str) -> Command {
    Command::Txn(TxnRequest {
        success: vec![Op::Put(PutRequest {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
            ..Default::default()
        })],
        ..Default::default()
    })
}

struct Fixture {
    hub: Arc<WatchHub>,
    state: SharedState,
}

impl Fixture {
    fn new(capacity: usize) -> Fixture {
        let hub = Arc::new(WatchHub::new(capacity));
        let state = Arc::new(RwLock::new(SmState { mvcc: Mvcc::default(), ..Default::default() }));
        hub.attach(state.clone());
        Fixture { hub, state }
    }
    fn apply(&self, cmd: Command) {
        let a = self.state.write().mvcc.apply(&cmd);
        if !a.events.is_empty() {
            self.hub.publish(a.result.revision, a.events);
        }
    }
}

async fn next(w: &mut Watcher) -> WatchMessage {
    tokio::time::timeout(std::time::Duration::from_secs(5), w.rx.recv())
        .await
        .expect("watch message in time")
        .expect("open")
}

fn revs(msgs: &[WatchMessage]) -> Vec<i64> {
    msgs.iter()
        .map(|m| match m {
            WatchMessage::Events { revision, .. } => *revision,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn history_then_live_without_gap_or_repeat() {
    let f = Fixture::new(1024);
    for i in 0..5 {
        f.apply(put("a", &i.to_string())); // revisions 2..=6
    }
    let mut w = f.hub.watch(WatchRequest {
        range: KeyRange::prefix(Bytes::from_static(b"a")),
        start_revision: 3,
        prev_kv: true,
        ..Default::default()
    });
    // give the watcher time to subscribe, then write concurrently with its history read
    for i in 5..10 {
        f.apply(put("a", &i.to_string())); // 7..=11
    }
    let mut got = Vec::new();
    for _ in 0..9 {
        got.push(next(&mut w).await);
    }
    assert_eq!(revs(&got), (3..=11).collect::<Vec<_>>());
    if let WatchMessage::Events { events, .. } = &got[0] {
        assert_eq!(events[0].prev_kv.as_ref().unwrap().value, Bytes::from_static(b"0"));
    }
}

#[tokio::test]
async fn frames_are_shared_not_copied() {
    let f = Fixture::new(16);
    let mut a = f.hub.frames();
    let mut b = f.hub.frames();
    f.apply(put("k", "v"));
    let (fa, fb) = (a.recv().await.unwrap(), b.recv().await.unwrap());
    assert_eq!(fa.bytes.as_ptr(), fb.bytes.as_ptr(), "every subscriber sees the same buffer");
    let arch = fa.archived().unwrap();
    assert_eq!(arch.revision.to_native(), 2);
    assert_eq!(&arch.events[0].kv.key[..], b"k");
}

#[tokio::test]
async fn slow_watcher_catches_up_from_history() {
    let f = Fixture::new(2);
    let mut w = f.hub.watch(WatchRequest { range: KeyRange::prefix(Bytes::new()), ..Default::default() });
    tokio::task::yield_now().await;
    for i in 0..50 {
        f.apply(put(&format!("k{}", i % 7), "v")); // 2..=51, far beyond the ring
    }
    let mut got = Vec::new();
    while got.len() < 50 {
        got.push(next(&mut w).await);
    }
    assert_eq!(revs(&got), (2..=51).collect::<Vec<_>>());
}

#[tokio::test]
async fn compacted_start_is_an_explicit_error_and_filters_apply() {
    let f = Fixture::new(16);
    for i in 0..5 {
        f.apply(put("x", &i.to_string()));
    }
    f.state.write().mvcc.apply(&Command::Compact { revision: 4 });
    let mut w = f.hub.watch(WatchRequest {
        range: KeyRange::key(Bytes::from_static(b"x")),
        start_revision: 2,
        ..Default::default()
    });
    assert_eq!(
        next(&mut w).await,
        WatchMessage::Canceled { reason: "mvcc: required revision has been compacted".into(), compact_revision: 4 }
    );
    // no_put filter: only the delete comes through; progress reports the last revision seen
    let mut w = f.hub.watch(WatchRequest {
        range: KeyRange::key(Bytes::from_static(b"x")),
        no_put: true,
        ..Default::default()
    });
    tokio::task::yield_now().await;
    f.apply(put("x", "again"));
    f.apply(Command::Txn(TxnRequest {
        success: vec![Op::Delete(DeleteRequest { range: KeyRange::key(Bytes::from_static(b"x")), prev_kv: false })],
        ..Default::default()
    }));
    match next(&mut w).await {
        WatchMessage::Events { revision, events } => {
            assert_eq!(revision, 8);
            assert_eq!(events[0].kind, EventKind::Delete);
            assert!(events[0].prev_kv.is_none(), "prev_kv only when asked");
        }
        other => panic!("unexpected {other:?}"),
    }
    w.request_progress();
    assert_eq!(next(&mut w).await, WatchMessage::Progress { revision: 8 });
}
