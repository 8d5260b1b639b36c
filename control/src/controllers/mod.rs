//! Controllers that finish what the API starts. For now: the garbage
//! collector and namespace lifecycle (`gc.rs`), without which deletes with
//! a propagation policy and namespace deletes never complete.
//!
//! Decision logic is pure (`gc::plan`: objects in, actions out); the shell
//! reads this master's applied state, and only the Raft leader acts. Every
//! action is an optimistic-concurrency write, so a former leader still
//! finishing a pass cannot undo or duplicate anything.

pub mod gc;
