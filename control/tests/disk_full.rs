//! A master's data disk running out of space, on a real filesystem: the
//! third master's data dir is a small tmpfs mounted for the test, filled
//! by a ballast file as something else on a host would fill it. Writes
//! stop on every master with etcd's NOSPACE error before RocksDB hits the
//! wall; reads, deletes and compaction go on; freeing the space lets writes
//! resume; no acknowledged write is lost and no master stops.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capstan_proto::etcd::etcdserverpb as pb;
use common::*;
use tonic::Code;

const FLOOR: u64 = 64 << 20;

/// The tmpfs at `dir`, unmounted (lazily: a master may still hold it) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs at {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn put(ch: &tonic::transport::Channel, key: &str) -> Result<i64, tonic::Status> {
    let r = kv(ch).put(pb::PutRequest { key: key.into(), value: vec![b'v'; 100], ..Default::default() }).await?;
    Ok(r.into_inner().header.map_or(0, |h| h.revision))
}

/// Polls `f` (async) until it returns Some, for at most `secs`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(secs: u64, what: &str, f: impl Fn() -> F) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn alarmed_members(ch: &tonic::transport::Channel) -> Vec<u64> {
    let r = pb::maintenance_client::MaintenanceClient::new(ch.clone()).alarm(pb::AlarmRequest::default()).await;
    r.map(|r| r.into_inner().alarms.iter().map(|a| a.member_id).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_on_any_master_stops_writes_everywhere_until_space_is_freed() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: mounting a tmpfs needs root");
        return;
    }
    let floor = FLOOR.to_string();
    let mut cluster = Cluster::start(2, &["--min-free-disk-bytes", &floor]);
    let small = cluster.tmp.path().join("master-3");
    let _fs = Tmpfs::mount(&small, 160);
    cluster.add_master(3);
    let third = endpoints(&small).unwrap().id;
    let chans = [cluster.client(0).await, cluster.client(1).await, cluster.client(2).await];

    let mut acked = Vec::new();
    for i in 0..50 {
        acked.push((format!("k/{i}"), put(&chans[i % 3], &format!("k/{i}")).await.unwrap()));
    }

    // Something else fills master-3's disk to below the floor.
    let free = capstan_raft::disk::free_bytes(&small).unwrap();
    let ballast = small.join("ballast");
    let fill = free.saturating_sub(FLOOR / 2);
    std::fs::write(&ballast, vec![0u8; fill as usize]).unwrap();
    assert!(capstan_raft::disk::free_bytes(&small).unwrap() < FLOOR);

    // Writes through any master are refused, with etcd's error.
    for (i, ch) in chans.iter().enumerate() {
        let e = eventually(10, "writes to be refused", || async { put(ch, &format!("refused/{i}")).await.err() }).await;
        assert_eq!((e.code(), e.message()), (Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded"));
    }
    let seen = eventually(10, "the alarm to be listed", || async {
        for ch in &chans {
            let ids = alarmed_members(ch).await;
            if ids.contains(&third) {
                return Some(ids);
            }
        }
        None
    })
    .await;
    assert_eq!(seen, [third], "only master-3's disk is low");
    let (_, metrics) = http_get(&format!("{}/metrics", endpoints(&small).unwrap().metrics_url)).unwrap();
    assert!(metrics.contains("capstan_store_alarm_disk_low 1"), "the full master says so");

    // Reads, deletes and compaction still work: they are how space is freed.
    let r = kv(&chans[2]).range(pb::RangeRequest { key: b"k/1".to_vec(), ..Default::default() }).await.unwrap();
    assert_eq!(r.into_inner().kvs.len(), 1);
    kv(&chans[0])
        .delete_range(pb::DeleteRangeRequest { key: b"k/0".to_vec(), ..Default::default() })
        .await
        .expect("a delete passes the alarm");
    acked.retain(|(k, _)| k != "k/0");
    let rev = revision(&chans[0]).await;
    kv(&chans[0]).compact(pb::CompactionRequest { revision: rev, physical: false }).await.expect("compaction passes");

    // Space freed: writes resume on every master, and the alarm clears.
    std::fs::remove_file(&ballast).unwrap();
    for (i, ch) in chans.iter().enumerate() {
        let key = format!("after/{i}");
        let rev = eventually(15, "writes to resume", || async { put(ch, &key).await.ok() }).await;
        acked.push((key, rev));
    }
    eventually(10, "the alarm to clear", || async {
        for ch in &chans {
            if !alarmed_members(ch).await.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;

    // No master stopped, and every acknowledged write is on each of them.
    for (i, ch) in chans.iter().enumerate() {
        assert!(cluster.running().contains(&i), "master-{} stopped", i + 1);
        for (key, rev) in &acked {
            let r = kv(ch)
                .range(pb::RangeRequest { key: key.clone().into(), serializable: false, ..Default::default() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.kvs.first().map(|kv| kv.mod_revision), Some(*rev), "{key} on master-{}", i + 1);
        }
    }
}
