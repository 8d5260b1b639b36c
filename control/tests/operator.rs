//! Operator commands against real masters: status, member list, and a
//! backup taken under write load restored into a new cluster that serves
//! exactly the same keys.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use capstan_proto::etcd::etcdserverpb as pb;
use common::*;

fn capstan(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run capstan");
    assert!(
        out.status.success(),
        "capstan {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn all_keys(ch: &tonic::transport::Channel, revision: i64) -> Vec<(Vec<u8>, Vec<u8>, i64, i64, i64)> {
    let r = kv(ch)
        .range(pb::RangeRequest { key: vec![0], range_end: vec![0], revision, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    r.kvs.into_iter().map(|kv| (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_members_and_backup_restore_under_load() {
    let cluster = Cluster::start(3, &[]);
    let m1 = cluster.masters[0].dir.clone();
    let m1s = m1.to_str().unwrap().to_string();

    let status = capstan(&["status", "--data-dir", &m1s]);
    assert_eq!(status.lines().filter(|l| l.contains(" leader ")).count(), 1, "{status}");
    assert_eq!(status.lines().filter(|l| l.starts_with("master-")).count(), 3, "{status}");
    let members = capstan(&["member", "list", "--data-dir", &m1s]);
    for n in ["master-1", "master-2", "master-3"] {
        assert!(members.contains(n), "{members}");
    }

    // Tokens: create, list, delete; a deleted token no longer joins.
    let token = capstan(&["token", "create", "--usage", "master", "--data-dir", &m1s]).trim().to_string();
    let id = token.split('.').nth(1).unwrap().to_string();
    let list = capstan(&["token", "list", "--data-dir", &m1s]);
    assert!(list.lines().any(|l| l.starts_with(&id) && l.contains("master")), "{list}");
    capstan(&["token", "delete", "--data-dir", &m1s, &token]);
    assert!(!capstan(&["token", "list", "--data-dir", &m1s]).contains(&id));
    let out = Command::new(BIN).args(["token", "delete", "--data-dir", &m1s, &id]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no token"));

    // Writers keep going while the backup is taken.
    let ch = cluster.client(1).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (ch, stop) = (ch.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let put = pb::PutRequest {
                    key: format!("k/{w}/{}", i % 300).into(),
                    value: format!("v{i}").into(),
                    ..Default::default()
                };
                kv(&ch).put(put).await.unwrap();
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let backup = cluster.tmp.path().join("backup.db");
    let saved = capstan(&["snapshot", "save", backup.to_str().unwrap(), "--data-dir", &m1s]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let revision: i64 = saved.split("revision ").nth(1).and_then(|s| s.split(',').next()).unwrap().parse().unwrap();

    // Restore into a new data dir, run it, compare every key.
    let dir = cluster.tmp.path().join("restored");
    let d = dir.to_str().unwrap();
    capstan(&[
        "snapshot",
        "restore",
        backup.to_str().unwrap(),
        "--data-dir",
        d,
        "--name",
        "r1",
        "--peer-listen",
        "127.0.0.1:0",
        "--etcd-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
    ]);
    let mut child = Command::new(BIN)
        .args(["server", "--data-dir", d])
        .stderr(std::fs::File::create(dir.join("run.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ep = loop {
        if let Some(ep) = endpoints(&dir) {
            if ep.pid == child.id() {
                break ep;
            }
        }
        assert!(Instant::now() < deadline, "restored master did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    let restored = connect(&ep.etcd_url, &dir).await;
    let want = all_keys(&ch, revision).await;
    // Read at the backed-up revision: a master that starts writes at once
    // (its API server lease, the kubernetes Service's endpoints).
    let got = all_keys(&restored, revision).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(want.len() >= 100, "the load wrote keys before the backup");
    assert_eq!(got, want, "the restored cluster serves exactly the backed-up revision");
}
