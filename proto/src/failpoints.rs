//! The names of the store's crash points: the contract between a master's
//! `/debug/failpoints` endpoint (`capstan_raft::failpoints`, which places
//! them) and the chaos harness (which arms them), kept here because the
//! harness does not link the store.

/// Every crash point, in the order of `capstan_raft::failpoints`' tour.
pub const NAMES: &[&str] = &[
    "raft::log_append_before_fsync",
    "raft::log_append_after_fsync",
    "raft::apply_before_write",
    "raft::apply_before_notify",
    "raft::snapshot_build",
    "raft::snapshot_install",
    "raft::compaction",
];
