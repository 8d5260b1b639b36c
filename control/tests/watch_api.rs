//! etcd Watch over gRPC: several watchers on one stream, filters, prev_kv,
//! progress requests, cancel, and a compacted start revision.

mod common;

use std::time::Duration;

use capstan_proto::etcd::etcdserverpb as pb;
use capstan_proto::etcd::mvccpb::event::EventType;
use common::*;
use pb::watch_request::RequestUnion;
use tokio::sync::mpsc;

fn create(key: &str, prefix: bool, start: i64, filters: Vec<i32>, prev_kv: bool) -> pb::WatchRequest {
    let mut end = key.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    pb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: key.into(),
            range_end: if prefix { end } else { vec![] },
            start_revision: start,
            filters,
            prev_kv,
            ..Default::default()
        })),
    }
}

async fn next(s: &mut tonic::Streaming<pb::WatchResponse>) -> pb::WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message()).await.expect("watch response in time").unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream_semantics() {
    let cluster = Cluster::start(3, &[]);
    let ch = cluster.client(2).await;
    let put = |k: &'static str, v: &'static str| {
        let ch = ch.clone();
        async move {
            kv(&ch)
                .put(pb::PutRequest { key: k.into(), value: v.into(), ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .header
                .unwrap()
                .revision
        }
    };
    let r1 = put("/w/a", "1").await;

    let (tx, rx) = mpsc::channel(8);
    let mut s = pb::watch_client::WatchClient::new(ch.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // watcher 0: prefix from r1 with prev_kv; watcher 1: deletes only
    tx.send(create("/w/", true, r1, vec![], true)).await.unwrap();
    let c0 = next(&mut s).await;
    assert!(c0.created);
    let ev = next(&mut s).await;
    assert_eq!((ev.watch_id, ev.events.len()), (c0.watch_id, 1), "history first");
    tx.send(create("/w/a", false, 0, vec![pb::watch_create_request::FilterType::Noput as i32], false)).await.unwrap();
    let c1 = next(&mut s).await;
    assert!(c1.created && c1.watch_id != c0.watch_id);

    put("/w/a", "2").await;
    let ev = next(&mut s).await;
    assert_eq!(ev.watch_id, c0.watch_id, "the delete-only watcher saw a put");
    assert_eq!(ev.events[0].prev_kv.as_ref().unwrap().value, b"1");
    kv(&ch).delete_range(pb::DeleteRangeRequest { key: b"/w/a".to_vec(), ..Default::default() }).await.unwrap();
    let mut got = vec![next(&mut s).await, next(&mut s).await];
    got.sort_by_key(|r| r.watch_id);
    for r in &got {
        assert_eq!(r.events[0].r#type, EventType::Delete as i32);
    }

    // progress: reports a revision at or above everything delivered
    tx.send(pb::WatchRequest { request_union: Some(RequestUnion::ProgressRequest(pb::WatchProgressRequest {})) })
        .await
        .unwrap();
    let p = next(&mut s).await;
    assert!(p.events.is_empty());
    assert!(p.header.unwrap().revision >= got[0].header.unwrap().revision);
    let _ = next(&mut s).await; // the other watcher's progress

    // cancel watcher 1: confirmed, and it gets nothing more
    tx.send(pb::WatchRequest {
        request_union: Some(RequestUnion::CancelRequest(pb::WatchCancelRequest { watch_id: c1.watch_id })),
    })
    .await
    .unwrap();
    let c = next(&mut s).await;
    assert!(c.canceled && c.watch_id == c1.watch_id);
    put("/w/a", "3").await;
    kv(&ch).delete_range(pb::DeleteRangeRequest { key: b"/w/a".to_vec(), ..Default::default() }).await.unwrap();
    let a = next(&mut s).await;
    let b = next(&mut s).await;
    assert!(a.watch_id == c0.watch_id && b.watch_id == c0.watch_id);

    // compacted start revision: created, then canceled with the compact revision
    let cur = put("/w/z", "z").await;
    kv(&ch).compact(pb::CompactionRequest { revision: cur, physical: false }).await.unwrap();
    // A linearizable read makes this master apply the compaction first.
    kv(&ch).range(pb::RangeRequest { key: b"/w/z".to_vec(), ..Default::default() }).await.unwrap();
    tx.send(create("/w/", true, 2, vec![], false)).await.unwrap();
    let mut saw_cancel = false;
    for _ in 0..6 {
        let r = next(&mut s).await;
        if r.canceled {
            assert_eq!(r.compact_revision, cur);
            assert!(r.cancel_reason.contains("compacted"));
            saw_cancel = true;
            break;
        }
    }
    assert!(saw_cancel);
}
