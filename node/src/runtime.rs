//! The container runtime contract the pod workers drive (CRI-shaped).
//!
//! A pod is a *sandbox* (its network namespace, IP and shared volumes
//! directory) plus containers created inside it. Everything the runtime
//! creates carries labels naming the pod (uid, namespace, name), the
//! container name and its restart attempt, so that a restarted agent lists
//! what is running and adopts it instead of starting it again.
//!
//! Implementations: `containerd` (real containers) and `sim` (hollow nodes
//! for scale tests: same control path, no processes).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Labels every runtime object carries.
pub const LABEL_POD_UID: &str = "io.capstan.pod.uid";
pub const LABEL_POD_NAMESPACE: &str = "io.capstan.pod.namespace";
pub const LABEL_POD_NAME: &str = "io.capstan.pod.name";
pub const LABEL_CONTAINER_NAME: &str = "io.capstan.container.name";
/// Restart count of the container this object is (0 for the first run).
pub const LABEL_ATTEMPT: &str = "io.capstan.container.attempt";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image does not exist or cannot be pulled (reason `ErrImagePull`).
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },
    /// The container could not be created or started from its spec
    /// (reason `CreateContainerError` / `RunContainerError`), e.g. a command
    /// that does not exist.
    #[error("{0}")]
    Container(String),
    /// Pod networking failed (CNI).
    #[error("network: {0}")]
    Network(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// Anything else from the runtime or the host.
    #[error("{0}")]
    Other(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// Credentials for one registry (from imagePullSecrets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryAuth {
    /// Registry host[:port] as it appears in image references.
    pub registry: String,
    pub username: String,
    pub password: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub container_port: u16,
    pub host_port: u16,
    /// "TCP", "UDP" or "SCTP".
    pub protocol: String,
    pub host_ip: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    pub pod_uid: String,
    pub namespace: String,
    pub name: String,
    pub hostname: String,
    /// Ports with a hostPort, wired with the CNI portmap plugin.
    pub port_mappings: Vec<PortMapping>,
    /// The pod shares the node's network namespace (`hostNetwork: true`).
    pub host_network: bool,
    /// The pod's /etc/resolv.conf (`dns::pod_resolv_conf`); None: the node's.
    pub resolv_conf: Option<String>,
    /// The pod's DNS domain when it names a subdomain
    /// (`<subdomain>.<ns>.svc.cluster.local`): /etc/hosts then lists
    /// `<hostname>.<domain>` too, as the kubelet writes it.
    pub domain: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub pod_uid: String,
    /// The pod's IP (None with hostNetwork).
    pub ip: Option<IpAddr>,
    /// Path of the pod's network namespace (e.g. /var/run/netns/<id>), if any.
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    pub read_only: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Security {
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub supplemental_groups: Vec<u32>,
    pub privileged: bool,
    pub read_only_root: bool,
    /// Capability names without the CAP_ prefix, as Kubernetes writes them.
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerConfig {
    pub pod_uid: String,
    pub namespace: String,
    pub pod_name: String,
    pub name: String,
    /// Restart count this container starts as.
    pub attempt: u32,
    /// The image reference as resolved by `ensure_image`.
    pub image: String,
    /// Kubernetes' `command` (replaces the image's entrypoint when not
    /// empty) and `args` (replace the image's cmd when not empty); the
    /// runtime merges them with the image config as Kubernetes does.
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub mounts: Vec<Mount>,
    /// CPU limit in millicores (cgroup cpu.max), None = unlimited.
    pub cpu_limit_millis: Option<u64>,
    /// CPU request in millicores (cgroup cpu.weight / shares).
    pub cpu_request_millis: Option<u64>,
    /// Memory limit in bytes (cgroup memory.max), None = unlimited.
    pub memory_limit_bytes: Option<u64>,
    pub security: Security,
    pub tty: bool,
    pub stdin: bool,
    /// Join the PID namespace of this (running) container of the pod:
    /// `kubectl debug --target`, so the debugger sees its processes.
    pub share_pid_with: Option<String>,
    /// Where the container's output is written, in the CRI log format.
    pub log_path: PathBuf,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running { started_at: SystemTime },
    Exited { started_at: Option<SystemTime>, finished_at: SystemTime, exit_code: i32, oom_killed: bool },
    Unknown,
}

/// What the runtime reports about one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerStatus {
    pub id: String,
    pub pod_uid: String,
    pub name: String,
    pub attempt: u32,
    pub image: String,
    /// Resolved image id (sha256:...), shown as imageID.
    pub image_id: String,
    pub state: ContainerState,
    pub labels: BTreeMap<String, String>,
}

/// Resource usage of one container, from its cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Cumulative CPU time used.
    pub cpu_usage_nanos: u64,
    /// Working set (memory.current minus inactive file).
    pub memory_working_set_bytes: u64,
}

/// An exec's exit code.
pub type ExitCode = i32;

/// Byte streams of an exec (stdin optional; stdout and stderr as they come).
pub struct ExecIo {
    pub stdin: Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>,
    pub stdout: tokio::sync::mpsc::Sender<bytes::Bytes>,
    pub stderr: tokio::sync::mpsc::Sender<bytes::Bytes>,
    /// Terminal resizes (cols, rows) when tty.
    pub resize: Option<tokio::sync::mpsc::Receiver<(u16, u16)>>,
}

/// Input to a container's main process (`kubectl attach`).
pub struct AttachInput {
    /// Bytes for its stdin; the container must have been made with stdin.
    pub stdin: Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>,
    /// Terminal resizes (cols, rows).
    pub resize: Option<tokio::sync::mpsc::Receiver<(u16, u16)>>,
    /// Close the process's stdin once `stdin` ends (`stdinOnce`).
    pub close_stdin: bool,
}

/// A container runtime. All operations are idempotent where Kubernetes'
/// CRI is (stopping a stopped container, removing a removed one succeed).
pub trait Runtime: Send + Sync + 'static {
    /// The node's pod CIDR, once the masters assigned it (pod IPs come from it).
    fn set_pod_cidr(&self, _cidr: &str) {}

    /// Makes `image` present according to `policy`; returns (resolved
    /// reference, image id).
    fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        auth: &[RegistryAuth],
    ) -> impl Future<Output = Result<(String, String), RuntimeError>> + Send;

    fn run_sandbox(&self, cfg: &SandboxConfig) -> impl Future<Output = Result<Sandbox, RuntimeError>> + Send;
    /// Tears the sandbox's network down and removes it (containers must be removed first).
    fn remove_sandbox(&self, sandbox_id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn list_sandboxes(&self) -> impl Future<Output = Result<Vec<Sandbox>, RuntimeError>> + Send;

    /// Creates and starts the container; returns its id.
    fn start_container(
        &self,
        sandbox: &Sandbox,
        cfg: &ContainerConfig,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// SIGTERM, then SIGKILL after `grace`.
    fn stop_container(&self, id: &str, grace: Duration) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn remove_container(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn list_containers(&self) -> impl Future<Output = Result<Vec<ContainerStatus>, RuntimeError>> + Send;

    fn exec(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
        io: ExecIo,
    ) -> impl Future<Output = Result<ExitCode, RuntimeError>> + Send;
    fn usage(&self, id: &str) -> impl Future<Output = Result<Usage, RuntimeError>> + Send;

    /// Feeds `input` to container `id`'s main process until it ends.
    fn attach(&self, id: &str, input: AttachInput) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Whether pod volumes are made real on this host (directories, tmpfs,
    /// files) and mounted into containers; hollow runtimes say no.
    fn materializes_volumes(&self) -> bool {
        true
    }

    /// Whether pods here have real network namespaces: Services and cluster
    /// DNS must be made reachable from them (the nftables proxy, dns.rs)
    /// and their ports can be forwarded to; hollow runtimes say no.
    fn has_pod_network(&self) -> bool {
        true
    }
}
