//! Types shared by every part of the store: the openraft type configuration,
//! the commands carried in the Raft log, and their results.
//!
//! Commands mirror the etcd v3 request shapes closely (so the gRPC layer is a
//! thin translation) but are Capstan's own types: the log must not depend on
//! generated protobuf code. They are serialized with postcard in the log and
//! on the peer wire.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// `v` in postcard, into a buffer sized for it up front. Log entries and
/// peer frames run to hundreds of KiB (a batch of writes): growing a Vec by
/// doubling reallocated and page-faulted fresh memory for every step, which
/// cost a follower a tenth of its CPU in encoding alone.
pub fn postcard_sized<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    let len = postcard::experimental::serialized_size(v)?;
    postcard::to_extend(v, Vec::with_capacity(len))
}

/// Raft node id of a master.
pub type NodeId = u64;

/// What the cluster knows about a master: carried in the Raft membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// QUIC peer address (`host:port`).
    pub peer_addr: String,
    /// etcd v3 gRPC address clients use (`https://host:port`).
    pub client_url: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_addr)
    }
}

openraft::declare_raft_types!(
    /// Capstan's openraft configuration.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::snapfile::Region,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;

/// A key range in etcd's convention: `end` empty = the single key `start`;
/// `end == [0]` = every key >= `start`; otherwise `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    pub start: Bytes,
    pub end: Bytes,
}

impl KeyRange {
    pub fn key(k: impl Into<Bytes>) -> Self {
        KeyRange { start: k.into(), end: Bytes::new() }
    }

    /// Every key starting with `prefix` (etcdctl's `--prefix`).
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let start: Bytes = prefix.into();
        KeyRange { end: prefix_end(&start), start }
    }

    pub fn is_single(&self) -> bool {
        self.end.is_empty()
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            return key == &self.start[..];
        }
        if key < &self.start[..] {
            return false;
        }
        self.end[..] == [0] || key < &self.end[..]
    }
}

/// The smallest key greater than every key with this prefix; `[0]` (= "to the
/// end") when the prefix is empty or all 0xff, as etcd does.
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last < 0xff {
            *last += 1;
            return Bytes::from(end);
        }
        end.pop();
    }
    Bytes::from_static(&[0])
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    pub range: KeyRange,
    /// 0 = no limit.
    pub limit: i64,
    /// 0 = current revision.
    pub revision: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    pub key: Bytes,
    pub value: Bytes,
    pub lease: i64,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRequest {
    pub range: KeyRange,
    pub prev_kv: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRequest),
    Txn(TxnRequest),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    Create(i64),
    Mod(i64),
    Value(Bytes),
    Lease(i64),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub range: KeyRange,
    pub result: CompareResult,
    pub target: CompareTarget,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

/// One entry of the replicated log's application data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Txn(TxnRequest),
    Compact {
        revision: i64,
    },
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    /// Also used by the leader to expire a lease: expiry is decided once, by
    /// the leader, and replicated like any other write.
    LeaseRevoke {
        id: i64,
    },
    /// Several commands in one log entry (see `batch.rs`); applied in order,
    /// each with its own result and revision.
    Batch(Vec<Command>),
}

impl Command {
    /// Bytes this command carries (keys, values, ranges) plus a small
    /// constant per operation: what request-size limits and batch sizes are
    /// measured in, without encoding the command.
    pub fn approx_size(&self) -> usize {
        fn range(r: &KeyRange) -> usize {
            r.start.len() + r.end.len()
        }
        fn ops(ops: &[Op]) -> usize {
            ops.iter()
                .map(|op| {
                    16 + match op {
                        Op::Range(r) => range(&r.range),
                        Op::Put(p) => p.key.len() + p.value.len(),
                        Op::Delete(d) => range(&d.range),
                        Op::Txn(t) => txn(t),
                    }
                })
                .sum()
        }
        fn txn(t: &TxnRequest) -> usize {
            let compares: usize = t
                .compare
                .iter()
                .map(|c| 16 + range(&c.range) + if let CompareTarget::Value(v) = &c.target { v.len() } else { 0 })
                .sum();
            compares + ops(&t.success) + ops(&t.failure)
        }
        match self {
            Command::Txn(t) => 8 + txn(t),
            Command::Compact { .. } | Command::LeaseGrant { .. } | Command::LeaseRevoke { .. } => 24,
            Command::Batch(cmds) => 8 + cmds.iter().map(Command::approx_size).sum::<usize>(),
        }
    }
}

/// A key's value at one revision, as etcd's `mvccpb.KeyValue`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Bytes,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub value: Bytes,
    pub lease: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub count: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResponse {
    Range(RangeResponse),
    Put { prev_kv: Option<KeyValue> },
    Delete { deleted: i64, prev_kvs: Vec<KeyValue> },
    Txn(TxnResponse),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub responses: Vec<OpResponse>,
}

/// Why a command was rejected by the state machine. Rejected commands change
/// nothing (they still occupy a log index).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MvccError {
    #[error("mvcc: required revision has been compacted (compacted at {compacted})")]
    Compacted { compacted: i64 },
    #[error("mvcc: required revision is a future revision (current {current})")]
    FutureRevision { current: i64 },
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: too many operations in txn request (max {max})")]
    TooManyOps { max: usize },
    #[error("etcdserver: value is provided / no previous key for ignore flag")]
    KeyNotFoundForIgnore,
    #[error("etcdserver: nested txn is not supported")]
    NestedTxn,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: invalid argument: {0}")]
    Invalid(String),
}

/// Result of applying one log entry; `revision` is the store revision after it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub revision: i64,
    pub outcome: Option<Result<Outcome, MvccError>>,
    /// One result per command of a `Command::Batch`.
    #[serde(default)]
    pub batch: Vec<CommandResult>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Txn(TxnResponse),
    Compacted,
    LeaseGranted { id: i64, ttl: i64 },
    LeaseRevoked,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approx_size_bounds_the_encoding() {
        let put = |k: &str, v: usize| {
            Op::Put(PutRequest {
                key: Bytes::copy_from_slice(k.as_bytes()),
                value: Bytes::from(vec![7u8; v]),
                ..Default::default()
            })
        };
        for cmd in [
            Command::Txn(TxnRequest { success: vec![put("a", 10)], ..Default::default() }),
            Command::Txn(TxnRequest { success: vec![put("key", 100_000), put("k2", 5)], ..Default::default() }),
            Command::Batch(vec![Command::LeaseGrant { id: 1, ttl: 5 }, Command::Compact { revision: 9 }]),
        ] {
            let encoded = postcard::to_stdvec(&cmd).unwrap().len();
            // Never far below what is actually encoded (limits stay meaningful).
            assert!(cmd.approx_size() + 64 >= encoded, "{} vs {encoded}", cmd.approx_size());
        }
    }
}
