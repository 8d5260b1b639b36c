//! Negative control: with the planted "drop-watch-event" bug the watch
//! checker must count violations. Built and run only with
//! `--features planted-bugs`.
#![cfg(feature = "planted-bugs")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use capstan_chaos::watch_check::{check, Event, Response, WatchSpec};
use capstan_proto::etcd::etcdserverpb as pb;
use common::*;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_events_are_caught() {
    std::env::set_var("CAPSTAN_PLANTED_BUG", "drop-watch-event");
    let cluster = Cluster::start(1, &[]);
    let ch = cluster.client(0).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: b"w/".to_vec(),
            range_end: b"w0".to_vec(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = pb::watch_client::WatchClient::new(ch.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().unwrap().created);

    // The truth: every put's revision, as acknowledged.
    let mut stored: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
    for i in 0..200 {
        let key = format!("w/{i}");
        let r =
            kv(&ch).put(pb::PutRequest { key: key.clone().into(), value: b"v".to_vec(), ..Default::default() }).await;
        let rev = r.unwrap().into_inner().header.unwrap().revision;
        let e = Event {
            key,
            delete: false,
            value: "v".into(),
            mod_revision: rev,
            create_revision: rev,
            version: 1,
            prev_value: None,
        };
        stored.insert(rev, vec![e]);
    }
    let last = *stored.keys().last().unwrap();
    let mut received = Vec::new();
    while let Ok(Ok(Some(msg))) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
        let events: Vec<Event> = msg.events.iter().filter_map(capstan_chaos::run::to_event).collect();
        let done = events.iter().any(|e| e.mod_revision == last);
        received.push(Response::Events(events));
        if done {
            break;
        }
    }
    let spec = WatchSpec { start: "w/".into(), end: "w0".into(), start_revision: 0, ..Default::default() };
    let report = check(&spec, &stored, &received);
    println!("planted dropped watch events: {report:?}");
    assert!(report.reliable > 0, "the watch checker missed dropped events: {report:?}");
}
