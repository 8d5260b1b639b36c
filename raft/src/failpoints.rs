//! Crash points for the chaos harness's failpoint matrix (RELIABILITY.md:
//! "crash at exact code points").
//!
//! Compiled in only with the `failpoints` feature (the `fail` crate with its
//! own `failpoints` feature); in a normal build [`crash_point!`] expands to
//! nothing and the `fail` crate is not even a dependency. The names exist in
//! every build so that tools can list them.
//!
//! Every point is armed at run time with a `fail` action string, e.g. by
//! `PUT /debug/failpoints/<name>` on a master built with the feature (see
//! `control/src/health.rs`). The `return` action means "the process dies
//! exactly here": it calls [`crash`], which aborts (no destructors, no
//! flushes, like `kill -9` at that instruction), so `name=1*return` crashes
//! at the next hit. The other `fail` actions keep their usual meaning
//! (`sleep(ms)` and `delay(ms)` stall the caller, `off` disarms, `pause`
//! blocks until re-armed, `panic`, `print`). Most points run on a tokio
//! worker thread, so `sleep` and `pause` stall that whole worker, not just
//! one task: use them for short stalls only.
//!
//! # The points, and why each is an interesting place to die
//!
//! - `raft::log_append_before_fsync`: the log-fsync thread has entries that
//!   were written to RocksDB but not yet synced and not yet reported to
//!   openraft. Nobody has counted them towards a quorum, so losing them must
//!   be harmless; a crash here checks that nothing treats written as durable.
//! - `raft::log_append_after_fsync`: the WAL is synced but openraft has not
//!   been told (`log_io_completed` not called): the entries are durable but
//!   unacknowledged. After restart the node must keep them and not vote or
//!   truncate as if they never existed.
//! - `raft::apply_before_write`: a batch of committed entries has been
//!   applied to the in-memory MVCC state but its rows and the `applied`
//!   index are not written. Restart must replay those entries from the log,
//!   exactly once (no revision applied twice, none skipped). There is no
//!   separate mid-batch point: the batch is one atomic RocksDB `WriteBatch`,
//!   so a crash between its entries is this same point.
//! - `raft::apply_before_notify`: the batch is written (it survives a
//!   process crash: RocksDB's WAL is in the OS's hands) but watchers have
//!   not been notified. Watchers of the dead process reconnect elsewhere and
//!   resume; a revision that was applied but never published must still be
//!   delivered (watch "reliable": no gaps), and not twice after restart.
//! - `raft::snapshot_build`: the snapshot image is encoded but its file is
//!   not written (the previous `snapshot.bin` stays). A half-built snapshot
//!   must never be offered to a follower or purge the log behind it.
//! - `raft::snapshot_install`: a follower has staged the leader's snapshot
//!   and replaced its kv and lease rows with it (synced) but has not made it
//!   its current snapshot (`snapshot.bin`) nor reset its watch hub. Restart
//!   must come back at the installed revision with a matching snapshot
//!   file. This point found a real bug: the old snapshot file stayed
//!   current, openraft purged the log past it at start, and its RaftCore
//!   panicked, leaving a master that was up but never applied again.
//! - `raft::compaction`: an MVCC compaction has been computed in memory but
//!   its row deletions and the new compacted revision are not written.
//!   etcd has had "revision decreasing after a crash during compaction": the
//!   restarted node must replay the compaction and never report an older
//!   revision than before.

/// Every crash point in this crate, in the order of the tour above.
pub use capstan_proto::failpoints::NAMES;

/// Is `name` one of this crate's crash points?
pub fn is_known(name: &str) -> bool {
    NAMES.contains(&name)
}

/// Arms (or, with `off`, disarms) crash point `name` with a `fail` action
/// string. Unknown names and malformed actions are errors, not panics: the
/// input comes from the network.
#[cfg(feature = "failpoints")]
pub fn arm(name: &str, actions: &str) -> Result<(), String> {
    if !is_known(name) {
        return Err(format!("unknown failpoint {name:?}; known: {}", NAMES.join(", ")));
    }
    fail::cfg(name, actions).map_err(|e| format!("bad action {actions:?} for {name}: {e}"))
}

/// The armed points and their action strings.
#[cfg(feature = "failpoints")]
pub fn armed() -> Vec<(String, String)> {
    let mut v = fail::list();
    v.sort();
    v
}

/// The `return` action of every crash point: die now. Called only when a
/// point is armed with `return`, so never in a normal run.
#[cfg(feature = "failpoints")]
pub fn crash(name: &str) {
    // stderr is unbuffered: the line reaches the log before the abort.
    eprintln!("failpoint {name}: aborting the process");
    std::process::abort();
}

/// A crash point: with the `failpoints` feature, evaluates the `fail` point
/// `$name` and aborts on its `return` action; without it, nothing.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            debug_assert!($crate::failpoints::is_known($name), "crash point {} not in NAMES", $name);
            let _ = fail::eval($name, |_| $crate::failpoints::crash($name));
        }
    };
}
pub(crate) use crash_point;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_namespaced() {
        let mut sorted = NAMES.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), NAMES.len());
        assert!(NAMES.iter().all(|n| n.starts_with("raft::")));
        assert!(is_known("raft::compaction") && !is_known("raft::nope") && !is_known(""));
    }

    /// With the feature, a point armed with `sleep` stalls its caller and one
    /// armed with `off` does nothing (the `return` action aborts, so it is
    /// exercised by the chaos harness, not here).
    #[cfg(feature = "failpoints")]
    #[test]
    fn non_crash_actions_work() {
        fail::cfg("raft::snapshot_build", "1*sleep(200)").unwrap();
        let t = std::time::Instant::now();
        crash_point!("raft::snapshot_build");
        assert!(t.elapsed() >= std::time::Duration::from_millis(200));
        let t = std::time::Instant::now();
        crash_point!("raft::snapshot_build");
        assert!(t.elapsed() < std::time::Duration::from_millis(200), "1* means once");
        fail::cfg("raft::snapshot_build", "off").unwrap();
        crash_point!("raft::snapshot_build");
        fail::remove("raft::snapshot_build");
    }
}
