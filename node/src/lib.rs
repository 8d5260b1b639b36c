//! Capstan's node agent (the kubelet, built the Capstan way).
//!
//! - `runtime.rs`: the container runtime contract (CRI-shaped) the pod
//!   workers drive; `sim.rs` a hollow runtime for scale tests;
//!   `containerd/` the real one over containerd's gRPC API, `cni.rs` pod
//!   networking with the standard CNI plugins.
//! - `netns.rs`: named network namespaces (bind-mounted nsfs files under
//!   our data dir), the pods' network namespaces.
//! - `logdriver.rs`: containerd's `binary://` log driver writing the CRI log
//!   format with rotation (`capstan-node log-driver`); `podlogs.rs` reads
//!   those files back for `kubectl logs` (tail, since, timestamps, follow).
//! - `testimage.rs`: a busybox OCI image archive built locally, for the
//!   tests of every crate that runs containers.

pub mod cni;
pub mod logdriver;
pub mod netns;
pub mod podlogs;
pub mod runtime;
pub mod testimage;
