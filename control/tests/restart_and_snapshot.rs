//! Restarting every master from disk loses nothing; a follower stopped while
//! 5,000 writes happen catches up by snapshot (the leader's log behind the
//! snapshot is purged, so replication alone could not catch it up).

mod common;

use std::time::{Duration, Instant};

use capstan_proto::etcd::etcdserverpb as pb;
use common::*;

async fn put_many(ch: &tonic::transport::Channel, prefix: &str, n: usize) -> i64 {
    let mut rev = 0;
    let mut set = tokio::task::JoinSet::new();
    for c in 0..8 {
        let ch = ch.clone();
        let prefix = prefix.to_string();
        set.spawn(async move {
            let mut last = 0;
            for i in (c..n).step_by(8) {
                let r = kv(&ch)
                    .put(pb::PutRequest {
                        key: format!("{prefix}{i:05}").into(),
                        value: format!("value-{i}").into(),
                        ..Default::default()
                    })
                    .await
                    .expect("put acknowledged");
                last = last.max(r.into_inner().header.unwrap().revision);
            }
            last
        });
    }
    while let Some(r) = set.join_next().await {
        rev = rev.max(r.unwrap());
    }
    rev
}

async fn count(ch: &tonic::transport::Channel, prefix: &str, serializable: bool) -> (i64, i64) {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let r = kv(ch)
        .range(pb::RangeRequest {
            key: prefix.into(),
            range_end: end,
            count_only: true,
            serializable,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (r.count, r.header.unwrap().revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_all_then_follower_catches_up_by_snapshot() {
    let mut cluster = Cluster::start(3, &["--snapshot-every", "500"]);
    let ch = cluster.client(0).await;
    let rev = put_many(&ch, "a/", 1000).await;

    // Full restart: every master from its data dir alone.
    for i in 0..3 {
        cluster.stop(i);
    }
    for i in 0..3 {
        cluster.restart(i);
    }
    for i in 0..3 {
        let ch = cluster.client(i).await;
        let (n, r) = count(&ch, "a/", false).await;
        assert_eq!(n, 1000, "master {i} lost keys across a full restart");
        assert!(r >= rev);
    }

    // Stop a follower, write 5,000 more, restart it.
    let leader = cluster.leader().await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    cluster.stop(follower);
    let ch = cluster.client(leader).await;
    let mut rev = put_many(&ch, "b/", 5000).await;
    // The leader purges its log only between replication attempts to the
    // dead member (see transport.rs, backoff); a few spaced writes give it
    // those moments.
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let put = pb::PutRequest { key: format!("c/{i}").into(), value: b"x".to_vec(), ..Default::default() };
        let r = kv(&ch).put(put).await.unwrap();
        rev = rev.max(r.into_inner().header.unwrap().revision);
    }
    cluster.restart(follower);
    let ch = cluster.client(follower).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (n, r) = count(&ch, "b/", true).await;
        if n == 5000 && r >= rev {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "follower did not catch up: {n} keys at {r}:\n{}\nleader:\n{}",
            log_tail(&cluster.masters[follower].dir),
            log_tail(&cluster.masters[leader].dir)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(cluster.masters[follower].dir.join("server.log")).unwrap();
    let leader_log = std::fs::read_to_string(cluster.masters[leader].dir.join("server.log")).unwrap_or_default();
    let leader_lines: Vec<&str> = leader_log
        .lines()
        .filter(|l| l.contains("purge") || l.contains("snapshot") || l.contains("ERROR"))
        .map(|l| &l[..l.len().min(300)])
        .collect();
    assert!(
        log.contains("installed snapshot"),
        "follower caught up without a snapshot:\n{}\nleader:\n{}",
        log_tail(&cluster.masters[follower].dir),
        leader_lines.join("\n")
    );
    // And its copy is complete, value by value.
    let r = kv(&ch)
        .range(pb::RangeRequest {
            key: b"b/".to_vec(),
            range_end: b"b0".to_vec(),
            serializable: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kvs.len(), 5000);
    for kv in &r.kvs {
        let i: usize = std::str::from_utf8(&kv.key[2..]).unwrap().parse().unwrap();
        assert_eq!(kv.value, format!("value-{i}").into_bytes());
    }
}
