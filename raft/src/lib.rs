//! placeholder; see modules
pub mod metrics;
pub mod mvcc;
pub mod pki;
pub mod storage;
pub mod types;
pub mod watch;
