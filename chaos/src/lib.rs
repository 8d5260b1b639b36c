//! `capstan-chaos`: proof that a Capstan cluster loses nothing under faults.
//!
//! Tour (this crate grows with the harness; see the chaos issue):
//! - [`history`]: client operation histories as workloads record them.
//! - [`linearizability`]: a porcupine-style checker (per key, Wing–Gong
//!   search with memoisation) and a brute-force one it is cross-checked
//!   against on small histories.
//! - [`watch_check`]: the nine watch guarantees of RELIABILITY.md, each
//!   counted, from the stored revision history and what watchers received.
//!
//! - [`cluster`]: the cluster under test (`capstan up`, killed masters kept
//!   down past the election timeout) and its faults, plus masters the
//!   harness joins itself to replace removed ones.
//! - [`run`]: one scenario: workload + watchers + faults, then the checkers
//!   and a JSON report. `FailpointCrash` arms the store's crash points
//!   (`capstan_raft::failpoints`) through a master's `/debug/failpoints`
//!   and reports, per arming, whether the master died there and came back.
//!
//! - [`hosts`]: every master, agent and the clients on a host of its own:
//!   a network namespace on a bridge, so faults cut hosts apart by address
//!   (nftables inside the host), not ports on one loopback.
//! - [`kubeapi`]: Kubernetes-style traffic through the API servers
//!   (optimistic updates of one counter, consistent lists, a resumed
//!   watch) in every scenario, checked for lost, phantom and doubly
//!   acknowledged updates, watch gaps and stale lists.
//! - [`proxy`]: a UDP proxy in front of each master's peer port that
//!   delays, reorders, duplicates and drops datagrams (no netem here).
//! - [`orchestration`]: scenario 10's Deployment on hollow node agents and
//!   the orchestration invariants (a pod on one node only; convergence).
//! - [`lazyfs`]: a LazyFS-style FUSE passthrough for power cuts: file
//!   writes stay in memory until fsync, so [`lazyfs::LazyFs::power_cut`]
//!   (after kill -9 of the processes on the mount) loses exactly what was
//!   never fsynced, which kill -9 alone cannot (the page cache survives).
//!   Metadata is durable at once; the extent logic is pure and tested.
//!
//! Checkers are pure functions over recorded data: no sockets, no clocks.

pub mod cluster;
pub mod history;
pub mod hosts;
pub mod kubeapi;
pub mod lazyfs;
pub mod linearizability;
pub mod orchestration;
pub mod proxy;
pub mod run;
pub mod watch_check;
