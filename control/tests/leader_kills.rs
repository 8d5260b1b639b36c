//! Three real masters on loopback; 10,000 writes through random masters while
//! the leader is killed -9 twice. Afterwards every acknowledged write is on
//! every master at its acknowledged revision, each revision hashes the same
//! everywhere, and watchers saw every revision exactly once, in order.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capstan_chaos::history::{Input, Op, Output};
use capstan_proto::etcd::etcdserverpb as pb;
use capstan_proto::etcd::mvccpb;
use common::*;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

const WRITES: usize = 10_000;
const CLIENTS: usize = 16;

/// Client history for the linearizability checker.
struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
}

impl History {
    fn record(&self, key: &str, sent: Instant, input: Input, output: Output) {
        let ns = |t: Instant| t.duration_since(self.start).as_nanos() as u64;
        let op = Op { client: 0, key: key.to_string(), call: ns(sent), ret: ns(Instant::now()), input, output };
        self.ops.lock().push(op);
    }
}

/// A write we got an answer for: key, value, revision.
type Acked = (String, String, i64);

/// Keeps a watch on every key open across master deaths, resuming from the
/// last revision seen; returns (revision, events) in delivery order.
async fn resilient_watcher(
    urls: Vec<String>,
    master1: std::path::PathBuf,
    until: Arc<Mutex<Option<i64>>>,
) -> Vec<(i64, Vec<mvccpb::Event>)> {
    let mut seen: Vec<(i64, Vec<mvccpb::Event>)> = Vec::new();
    let mut next_rev = 1i64;
    let mut which = 0usize;
    let deadline = Instant::now() + Duration::from_secs(240);
    'outer: loop {
        assert!(Instant::now() < deadline, "watcher did not finish");
        if let Some(end) = *until.lock() {
            if next_rev > end {
                break;
            }
        }
        which = (which + 1) % urls.len();
        let Ok(ch) = try_connect(&urls[which], &master1).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: vec![0],
                range_end: vec![0],
                start_revision: next_rev,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut client = pb::watch_client::WatchClient::new(ch);
        let Ok(resp) = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await else {
            continue;
        };
        let mut stream = resp.into_inner();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(3), stream.message()).await;
            let msg = match msg {
                Ok(Ok(Some(m))) => m,
                // stream ended, errored, or went quiet: check for the end, else reconnect
                _ => continue 'outer,
            };
            assert!(!msg.canceled, "watch canceled: {}", msg.cancel_reason);
            if msg.events.is_empty() {
                continue;
            }
            let rev = msg.events[0].kv.as_ref().unwrap().mod_revision;
            assert!(msg.events.iter().all(|e| e.kv.as_ref().unwrap().mod_revision == rev), "one revision per response");
            seen.push((rev, msg.events));
            next_rev = rev + 1;
            if let Some(end) = *until.lock() {
                if next_rev > end {
                    break 'outer;
                }
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_masters_survive_two_leader_kills() {
    let mut cluster = Cluster::start(3, &[]);
    let master1 = cluster.masters[0].dir.clone();
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let until = Arc::new(Mutex::new(None));
    let watchers: Vec<_> =
        (0..2).map(|_| tokio::spawn(resilient_watcher(urls.clone(), master1.clone(), until.clone()))).collect();

    let acked: Arc<Mutex<Vec<Acked>>> = Default::default();
    let issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let history = Arc::new(History { start: Instant::now(), ops: Default::default() });
    // (sent, acknowledged) of every acknowledged attempt
    let ack_times: Arc<Mutex<Vec<(Instant, Instant)>>> = Default::default();
    let mut writers = Vec::new();
    for c in 0..CLIENTS {
        let (urls, master1, acked, issued, ack_times, history) =
            (urls.clone(), master1.clone(), acked.clone(), issued.clone(), ack_times.clone(), history.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
            let mut chans: Vec<Option<tonic::transport::Channel>> = vec![None, None, None];
            loop {
                let n = issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= WRITES {
                    return;
                }
                let (key, value) = (format!("k/{:05}", n % 4000), format!("v-{n}"));
                // Retry on other masters until acknowledged; a failed attempt
                // may have happened anyway, so it is retried with a new value.
                for attempt in 0.. {
                    assert!(attempt < 400, "write {n} never acknowledged");
                    let i = rng.gen_range(0..3);
                    if chans[i].is_none() {
                        chans[i] = try_connect(&urls[i], &master1).await.ok();
                    }
                    let Some(ch) = chans[i].clone() else { continue };
                    let value = format!("{value}-{attempt}");
                    let sent = Instant::now();
                    match kv(&ch)
                        .put(pb::PutRequest {
                            key: key.clone().into(),
                            value: value.clone().into(),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(r) => {
                            let rev = r.into_inner().header.unwrap().revision;
                            history.record(&key, sent, Input::Put(value.clone()), Output::Ok);
                            acked.lock().push((key.clone(), value, rev));
                            ack_times.lock().push((sent, Instant::now()));
                            break;
                        }
                        Err(_) => {
                            // May or may not have happened: indeterminate.
                            history.record(&key, sent, Input::Put(value.clone()), Output::Failed);
                            chans[i] = None;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        }));
    }

    // Linearizable readers on random keys through random masters.
    let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut readers = Vec::new();
    for c in 0..4u64 {
        let (urls, master1, history, reading) = (urls.clone(), master1.clone(), history.clone(), reading.clone());
        readers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + c);
            let mut chans: Vec<Option<tonic::transport::Channel>> = vec![None, None, None];
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                let i = rng.gen_range(0..3);
                if chans[i].is_none() {
                    chans[i] = try_connect(&urls[i], &master1).await.ok();
                }
                let Some(ch) = chans[i].clone() else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let key = format!("k/{:05}", rng.gen_range(0..4000));
                let sent = Instant::now();
                match kv(&ch).range(pb::RangeRequest { key: key.clone().into(), ..Default::default() }).await {
                    Ok(r) => {
                        let v = r.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                        history.record(&key, sent, Input::Get, Output::Value(v));
                    }
                    Err(_) => chans[i] = None, // a failed read observed nothing
                }
            }
        }));
    }

    // Kill the leader twice, at about a third and two thirds of the writes.
    let mut recoveries = Vec::new();
    for third in [1, 2] {
        while acked.lock().len() < WRITES * third / 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let leader = cluster.leader().await;
        let t0 = Instant::now();
        cluster.kill9(leader);
        // The first write *sent* after the kill that was acknowledged.
        let recovery = loop {
            let first = ack_times.lock().iter().filter(|(sent, _)| *sent > t0).map(|(_, acked)| *acked).min();
            if let Some(at) = first {
                break at.duration_since(t0);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        println!("kill -9 of leader {} -> next acknowledged write after {:?}", cluster.masters[leader].name, recovery);
        recoveries.push(recovery);
        cluster.restart(leader);
    }
    for w in writers {
        w.await.unwrap();
    }
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let ops = history.ops.lock().clone();
    let verdict = capstan_chaos::linearizability::check(&ops);
    println!("linearizability: {} operations, verdict {verdict:?}", ops.len());
    assert_eq!(verdict, capstan_chaos::linearizability::Verdict::Ok);
    let acked = acked.lock().clone();
    assert_eq!(acked.len(), WRITES);
    let final_rev = acked.iter().map(|a| a.2).max().unwrap();
    *until.lock() = Some(final_rev);

    // Every master: wait until caught up, then check each acknowledged write
    // at its revision and collect the full history.
    let mut histories = Vec::new();
    for i in 0..3 {
        let ch = cluster.client(i).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = kv(&ch)
                .range(pb::RangeRequest {
                    key: b"k/".to_vec(),
                    range_end: b"k0".to_vec(),
                    serializable: true,
                    count_only: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if r.header.unwrap().revision >= final_rev {
                break;
            }
            assert!(Instant::now() < deadline, "master {i} did not catch up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (key, value, rev) in &acked {
            let r = kv(&ch)
                .range(pb::RangeRequest {
                    key: key.clone().into(),
                    revision: *rev,
                    serializable: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let kv = &r.kvs[0];
            assert_eq!(
                (kv.value.as_slice(), kv.mod_revision),
                (value.as_bytes(), *rev),
                "master {i}: acknowledged write lost"
            );
        }
        // History by revision, hashed per revision.
        let mut by_rev: BTreeMap<i64, u64> = BTreeMap::new();
        let r = kv(&ch)
            .range(pb::RangeRequest {
                key: vec![0],
                range_end: vec![0],
                serializable: true,
                revision: final_rev,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for kv in r.kvs {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (kv.key, kv.value, kv.version, kv.create_revision).hash(&mut h);
            *by_rev.entry(kv.mod_revision).or_default() ^= h.finish();
        }
        let hash = pb::maintenance_client::MaintenanceClient::new(ch.clone())
            .hash_kv(pb::HashKvRequest { revision: final_rev })
            .await
            .unwrap()
            .into_inner()
            .hash;
        histories.push((by_rev, hash));
    }
    assert_eq!(histories[0], histories[1], "masters 1 and 2 disagree");
    assert_eq!(histories[0], histories[2], "masters 1 and 3 disagree");

    // Watchers: every revision from 2 to the end exactly once, in order.
    for w in watchers {
        let seen = w.await.unwrap();
        // The masters write too (API objects, the controller lease), so a
        // watcher may already be past the workload's last revision.
        let revs: Vec<i64> = seen.iter().map(|(r, _)| *r).filter(|r| *r <= final_rev).collect();
        let want: Vec<i64> = (2..=final_rev).collect();
        assert_eq!(revs, want, "watcher skipped or repeated a revision");
    }
    recoveries.sort();
    println!("recovery after leader kill: min {:?} max {:?}", recoveries[0], recoveries[recoveries.len() - 1]);
}
