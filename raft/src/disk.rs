//! Free disk space as a cluster-wide alarm.
//!
//! RocksDB cannot write on a full disk, and a master whose log append fails
//! stops. The quota (`Limits::quota_*`) bounds the data, not the disk
//! (something else may fill it: logs, another process), so each master also
//! watches the free space of its data dir's filesystem. Below
//! `Limits::min_free_disk_bytes` it raises a disk alarm, and writes that
//! would grow the data are refused with etcd's NOSPACE error ("database
//! space exceeded") — on every master, not only the full one: every write
//! is replicated to every master's disk. Deletes, lease revokes and
//! compaction still pass (they are how space is given back).
//!
//! How the alarm reaches the others: writes are proposed by the leader
//! (followers forward theirs), so the leader alone needs to know. Each
//! master measures every [`CHECK_EVERY`] and, while low, reports to the
//! leader; a report holds for [`REPORT_TTL`], so an alarm clears by itself
//! once its master stops reporting (space freed, or the master gone — a
//! master that stops cannot fill up). A new leader learns within one
//! period. Nothing is written to the store for it: raising an alarm must
//! not take the space it warns about.
//!
//! [`DiskAlarms`] and [`grows`] are pure; [`free_bytes`] is the IO.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::types::{Command, NodeId, Op};

/// How often each master measures its free space.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long one report of a low disk holds.
pub const REPORT_TTL: Duration = Duration::from_secs(3);

/// Whether `cmd` may add data (refused while an alarm is raised): anything
/// but deletes (and reads), compaction and lease revokes.
pub fn grows(cmd: &Command) -> bool {
    match cmd {
        Command::Txn(t) => !t.success.iter().chain(&t.failure).all(|op| matches!(op, Op::Delete(_) | Op::Range(_))),
        Command::Compact { .. } | Command::LeaseRevoke { .. } => false,
        Command::LeaseGrant { .. } => true,
        Command::Batch(cmds) => cmds.iter().any(grows),
    }
}

/// The leader's view: which masters reported a low disk, and when.
#[derive(Debug, Default)]
pub struct DiskAlarms {
    reported: HashMap<NodeId, Instant>,
}

impl DiskAlarms {
    /// `id` measured its disk at `now`: low or not.
    pub fn report(&mut self, id: NodeId, low: bool, now: Instant) {
        if low {
            self.reported.insert(id, now);
        } else {
            self.reported.remove(&id);
        }
    }

    /// Masters whose disk is low, as of `now` (sorted).
    pub fn active(&self, now: Instant) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self
            .reported
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) < REPORT_TTL)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// Bytes available to this (unprivileged-reserve-respecting) process on
/// the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a buffer statvfs
    // fills; it is read only when the call succeeded.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{DeleteRequest, KeyRange, PutRequest, TxnRequest};
    use bytes::Bytes;

    fn txn(ops: Vec<Op>) -> Command {
        Command::Txn(TxnRequest { compare: vec![], success: ops, failure: vec![] })
    }

    #[test]
    fn only_writes_that_may_add_data_are_refused() {
        let put = Op::Put(PutRequest {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            lease: 0,
            prev_kv: false,
            ignore_value: false,
            ignore_lease: false,
        });
        let del = Op::Delete(DeleteRequest { range: KeyRange::key(Bytes::from_static(b"k")), prev_kv: false });
        assert!(grows(&txn(vec![put.clone()])));
        assert!(!grows(&txn(vec![del.clone()])));
        assert!(grows(&txn(vec![del.clone(), put])));
        assert!(!grows(&Command::Compact { revision: 3 }));
        assert!(!grows(&Command::LeaseRevoke { id: 1 }));
        assert!(grows(&Command::LeaseGrant { id: 1, ttl: 5 }));
        assert!(!grows(&Command::Batch(vec![txn(vec![del]), Command::LeaseRevoke { id: 2 }])));
        assert!(grows(&Command::Batch(vec![Command::LeaseRevoke { id: 2 }, Command::LeaseGrant { id: 1, ttl: 5 }])));
    }

    #[test]
    fn a_report_holds_for_its_ttl_and_a_good_one_clears_it() {
        let t0 = Instant::now();
        let mut a = DiskAlarms::default();
        assert!(a.active(t0).is_empty());
        a.report(2, true, t0);
        a.report(3, true, t0);
        assert_eq!(a.active(t0 + Duration::from_secs(1)), [2, 3]);
        a.report(3, false, t0 + Duration::from_secs(1));
        assert_eq!(a.active(t0 + Duration::from_secs(1)), [2]);
        // Master 2 stops reporting (freed, or gone): its alarm lapses.
        assert!(a.active(t0 + REPORT_TTL).is_empty());
        a.report(2, true, t0 + Duration::from_secs(10));
        assert_eq!(a.active(t0 + Duration::from_secs(11)), [2]);
    }

    #[test]
    fn free_space_is_measured_where_the_data_is() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
