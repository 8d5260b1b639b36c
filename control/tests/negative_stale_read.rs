//! Negative control: with the planted "stale-read" bug (reads skip
//! ReadIndex) the linearizability checker must fail on an ordinary
//! workload. Built and run only with `--features planted-bugs`.
//!
//! A follower is cut off from its peers for part of the run, so its reads
//! are stale for certain (on loopback a follower otherwise lags by a
//! millisecond, and whether a read lands in it was luck: the control
//! failed to fail about one run in ten).
#![cfg(feature = "planted-bugs")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use capstan_chaos::history::{Input, Op, Output};
use capstan_chaos::linearizability::{check, Verdict};
use capstan_proto::etcd::etcdserverpb as pb;
use common::*;
use parking_lot::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_reads_are_caught() {
    std::env::set_var("CAPSTAN_PLANTED_BUG", "stale-read");
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.leader().await;
    let start = Instant::now();
    let history: Arc<Mutex<Vec<Op>>> = Default::default();
    let ns = move |t: Instant| t.duration_since(start).as_nanos() as u64;
    let deadline = Instant::now() + Duration::from_secs(6);
    let lagging = (leader + 1) % 3;
    let peer = endpoints(&cluster.masters[lagging].dir).unwrap().peer;
    let port: u16 = peer.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap();
    let cutter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let cut = capstan_chaos::cluster::Partition::isolate(port).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(cut);
    });
    let mut tasks = Vec::new();
    for c in 0..12u32 {
        // writers through the leader, readers through the followers
        let target = if c < 6 { leader } else { (leader + 1 + (c as usize % 2)) % 3 };
        let ch = cluster.client(target).await;
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline {
                let key = format!("k{}", i % 3);
                let sent = Instant::now();
                let (input, output) = if c < 6 {
                    let v = format!("{c}-{i}");
                    let put = pb::PutRequest { key: key.clone().into(), value: v.clone().into(), ..Default::default() };
                    let out = if kv(&ch).put(put).await.is_ok() { Output::Ok } else { Output::Failed };
                    (Input::Put(v), out)
                } else {
                    match kv(&ch).range(pb::RangeRequest { key: key.clone().into(), ..Default::default() }).await {
                        Ok(r) => {
                            let v =
                                r.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                            (Input::Get, Output::Value(v))
                        }
                        Err(_) => continue,
                    }
                };
                let op = Op { client: c, key, call: ns(sent), ret: ns(Instant::now()), input, output };
                history.lock().push(op);
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    cutter.await.unwrap();
    let ops = history.lock().clone();
    let verdict = check(&ops);
    println!("planted stale reads: {} operations, verdict {verdict:?}", ops.len());
    assert!(matches!(verdict, Verdict::Illegal { .. }), "the checker missed stale reads");
}
