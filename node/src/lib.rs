//! Capstan's node agent (the kubelet, built the Capstan way).
//!
//! - `runtime.rs`: the container runtime contract (CRI-shaped) the pod
//!   workers drive; `sim.rs` a hollow runtime for scale tests;
//!   `containerd/` the real one over containerd's gRPC API, `cni.rs` pod
//!   networking with the standard CNI plugins.

pub mod containerd;
pub mod runtime;
