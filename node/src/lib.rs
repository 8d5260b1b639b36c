//! Capstan's node agent (the kubelet, built the Capstan way).
//!
//! - `conn.rs`: the agent's identity, joining, and its one QUIC connection
//!   to the masters (moved to the next master when one dies).
//! - `agent.rs`: registration, heartbeats, the pod watch and one worker
//!   per pod; `pods.rs` the workers' decisions, pure.
//! - `events.rs`: the kubelet's Events (Pulled, Started, Killing,
//!   Unhealthy, BackOff...), queued and sent to the masters in batches.
//! - `metrics.rs`: the agent's /metrics (kubelet names) and health checks;
//!   `Instrumented` times every runtime operation.
//! - `prober.rs`: liveness, readiness and startup probes (exec, httpGet,
//!   tcpSocket), verdicts pure; `streams.rs` the masters' log, exec and
//!   attach streams; `podnet.rs` pod networking for containerd (netns + CNI).
//! - `runtime.rs`: the container runtime contract (CRI-shaped) the pod
//!   workers drive; `sim.rs` a hollow runtime for scale tests;
//!   `containerd/` the real one over containerd's gRPC API, `cni.rs` pod
//!   networking with the standard CNI plugins.
//! - `netns.rs`: named network namespaces (bind-mounted nsfs files under
//!   our data dir), the pods' network namespaces.
//! - `logdriver.rs`: containerd's `binary://` log driver writing the CRI log
//!   format with rotation (`capstan-node log-driver`); `podlogs.rs` reads
//!   those files back for `kubectl logs` (tail, since, timestamps, follow)
//!   and follows them for `kubectl attach`.
//! - `volumes.rs`: pod volumes (emptyDir, hostPath, configMap, secret,
//!   downwardAPI, projected, persistentVolumeClaim and ephemeral on
//!   hostPath/local PersistentVolumes): a pure planner, the kubelet's
//!   on-disk layout and atomic file sets, tmpfs mounts, volumeMounts with
//!   subPath; `localpath.rs` the local-path root advertised on the Node and
//!   the removal of deleted PersistentVolumes' directories there.
//! - `services.rs`: every Service and Endpoints, watched from the masters
//!   and turned into this node's service rules (`proxy.rs`).
//! - `proxy.rs`: Services as kube-proxy's nftables mode does them (cluster
//!   IPs and NodePorts DNATed to ready endpoints, masqueraded, the rest of
//!   the service CIDR rejected): a pure planner of one `nft -f` script and
//!   the `nft` runs that apply and remove it.
//! - `usage.rs`: CPU and memory usage of the node and its containers,
//!   reported every 15 s (served by the masters as `metrics.k8s.io`).
//! - `testimage.rs`: a busybox OCI image archive built locally, for the
//!   tests of every crate that runs containers; `testregistry.rs`: a real
//!   registry on loopback (docker-registry, skopeo) for their pull tests.

pub mod agent;
pub mod cni;
pub mod conn;
pub mod containerd;
pub mod dns;
pub mod events;
pub mod localpath;
pub mod logdriver;
pub mod metrics;
pub mod netns;
pub mod podlogs;
pub mod podnet;
pub mod pods;
pub mod prober;
pub mod proxy;
pub mod runtime;
pub mod services;
pub mod sim;
pub mod streams;
pub mod testimage;
pub mod testregistry;
pub mod usage;
pub mod volumes;
