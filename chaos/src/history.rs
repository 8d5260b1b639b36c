//! Client operation histories as recorded by workloads: what was asked,
//! when the call started and returned, and what came back.

use serde::{Deserialize, Serialize};

/// What a client asked for, on one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Input {
    Get,
    /// Values are unique per write, so a read names the write it saw.
    Put(String),
    Delete,
    /// Compare-and-set on the value.
    Cas {
        expect: String,
        new: String,
    },
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Output {
    /// A read: the value, or None if the key was absent.
    Value(Option<String>),
    /// A write acknowledged.
    Ok,
    /// A CAS acknowledged: whether it swapped.
    Cas(bool),
    /// The request failed: a write may or may not have happened; a read saw nothing.
    Failed,
    /// Outcome unknown (timeout); treated like `Failed`.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub client: u32,
    pub key: String,
    /// Monotonic time (ns) the call started.
    pub call: u64,
    /// Monotonic time (ns) the answer arrived.
    pub ret: u64,
    pub input: Input,
    pub output: Output,
}
