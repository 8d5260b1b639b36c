//! Negative control: with the planted "skip-fsync" bug (the Raft log's
//! write-ahead log written to the OS but never synced) a power cut must
//! lose acknowledged writes, and the chaos checkers must say so. kill -9
//! alone could not show it (the page cache survives a killed process); the
//! masters' data dirs on the harness's lazy filesystem can. Built and run
//! only with `--features planted-bugs`; needs root and /dev/fuse.
#![cfg(feature = "planted-bugs")]

use std::time::Duration;

use capstan_chaos::run::{run, RunConfig, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_skipped_fsync_loses_acknowledged_writes_in_a_power_cut() {
    // Inherited by `capstan up` and its masters.
    std::env::set_var("CAPSTAN_PLANTED_BUG", "skip-fsync");
    let cfg = RunConfig::new(env!("CARGO_BIN_EXE_capstan").into(), Scenario::PowerCut, 1, Duration::from_secs(16));
    let report = run(cfg).await.expect("chaos run");
    println!("{}", serde_json::to_string(&report).unwrap());
    assert!(report.faults >= 1, "the power was cut: {report:?}");
    assert!(report.power_cut_lost.is_some_and(|c| c.bytes > 0), "the cut dropped unsynced data: {report:?}");
    assert!(report.acked_writes_lost > 0, "the checker counts the lost acknowledged writes: {report:?}");
    assert!(report.api.lost_updates > 0, "and the lost ConfigMap updates: {report:?}");
    assert!(!report.passed, "{report:?}");
}
