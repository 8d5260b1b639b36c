//! `capstan-raft`: the replicated store every Capstan master embeds instead
//! of etcd.
//!
//! Tour, bottom up:
//! - [`types`]: openraft type configuration, the commands in the Raft log and
//!   their results (etcd v3 shapes, Capstan's own types).
//! - [`mvcc`]: etcd's MVCC data model as a pure in-memory state machine
//!   (revisions, history, compaction, leases); no IO.
//! - [`storage`]: RocksDB behind openraft's log and state-machine traits
//!   (column families and key layout documented there); passes openraft's
//!   storage conformance suite. `snapfile` is the snapshot on disk, which
//!   openraft reads and writes through a file region, never whole in memory;
//!   `logcache` keeps the log's newest entries decoded for apply and
//!   replication.
//! - [`watch`]: the watch hub; each committed revision is one immutable rkyv
//!   frame in a `Bytes`, shared by every watcher.
//! - [`pki`]: the cluster CA and TLS configurations; master certificates
//!   name their Raft member id, so a removed master is refused by its peers.
//! - [`backup`]: the backup file format of `etcdctl snapshot save`.
//! - [`transport`]: QUIC peer transport (openraft's network) and the peer
//!   protocol messages; [`peer`] serves them and decides who may send what.
//! - [`node`]: a running master's store: writes (forwarded to the leader),
//!   ReadIndex reads, leases, leader duties; `batch` packs concurrent writes
//!   into one log entry and concurrent reads into one ReadIndex round.
//! - [`bootstrap`]: init / join with a token / restart from the data dir /
//!   restore from a backup.
//! - [`metrics`]: Prometheus metrics of all of the above (registered by the
//!   binary that serves `/metrics`).
//! - [`failpoints`]: named crash points (log append around fsync, apply,
//!   apply -> watch notify, snapshot build / install, compaction) for the
//!   chaos harness; code only with the `failpoints` feature.
//! - `planted` (feature `planted-bugs` only): deliberate bugs for the
//!   checkers' negative controls; absent from normal builds.
//!
//! openraft is pinned to 0.9.25, its newest stable release: 0.10 is still an
//! alpha and nothing here needs its additions (storage v2 and chunked
//! snapshot transfer are in 0.9). 0.9's RaftCore waits for each log flush
//! before taking the next proposal; `batch` is how throughput survives that.

pub mod backup;
mod batch;
pub mod bootstrap;
pub mod disk;
pub mod failpoints;
mod logcache;
pub mod metrics;
pub mod mvcc;
pub mod node;
pub mod peer;
pub mod pki;
#[cfg(feature = "planted-bugs")]
mod planted;
mod snapfile;
pub mod storage;
pub mod transport;
pub mod types;
pub mod watch;

pub use node::{Limits, StoreError, StoreNode};
