//! The real container runtime: `Runtime` over containerd's gRPC API.
//!
//! Tour:
//! - `mod.rs` (here): the `Containerd` handle (channel, namespace
//!   `capstan`, the agent's data dir), request helpers, error mapping, and
//!   the `Runtime` impl, which only delegates.
//! - `daemon.rs`: the agent's own containerd (config, supervised child) and
//!   why containers outlive it.
//! - `reference.rs`: image reference normalisation (pure).
//! - `archive.rs`: reading OCI image-layout and docker-archive tars.
//! - `content.rs`: the content store (leases, blob writes and reads, GC labels).
//! - `image.rs`: unpacking layers into the snapshotter,
//!   image records, `ensure_image`, the image directory watcher.
//! - `registry.rs`: pulling over the OCI distribution API.
//! - `spec.rs`: the OCI runtime spec of a container (pure, unit-tested).
//! - `container.rs`: create/start/stop/remove/list containers, OOM, usage.
//! - `exec.rs`: exec with FIFOs, tty and resize.
//! - `sandbox.rs`: sandboxes (no pause container: a network namespace file
//!   plus /etc files), persisted as JSON, and the `PodNetwork` seam.
//!
//! Everything lives in containerd namespace `capstan`. What containerd
//! stores (containers with labels, tasks in shims, images, snapshots) is
//! the source of truth; the agent keeps only sandbox records on disk, so a
//! restarted agent (or a second `Containerd` on the same socket) adopts
//! what runs.

mod archive;
mod attach;
mod container;
mod content;
mod daemon;
mod exec;
mod image;
pub mod reference;
mod registry;
mod sandbox;
pub mod spec;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_client::tonic::{self, transport::Channel, Code, Request, Status};

pub use daemon::{config_toml, Daemon, DaemonPaths};
pub use sandbox::{PodNetwork, PodNetworkSetup};

use crate::runtime::{
    AttachInput, ContainerConfig, ContainerStatus, ExecIo, ExitCode, PullPolicy, RegistryAuth, Runtime, RuntimeError,
    Sandbox, SandboxConfig, Usage,
};

/// The containerd namespace every Capstan object lives in.
pub const NAMESPACE: &str = "capstan";
/// The snapshotter images are unpacked into and rootfs are prepared from.
pub const SNAPSHOTTER: &str = "overlayfs";
/// Parent of every container's cgroup: `/capstan/<pod-uid>/<container-id>`.
pub const CGROUP_PARENT: &str = "/capstan";

/// Where a container's stdout and stderr go (the task's stdio URIs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogDriver {
    /// `file://<log_path>`: the shim appends raw output (no CRI framing).
    File,
    /// `binary://<program>?log-driver=<config>` (`logdriver::log_uri`): the
    /// shim runs `<program> log-driver <config JSON>` with the container's
    /// stdout on fd 3, stderr on fd 4, and fd 5 to close once ready
    /// (containerd's runtime/v2/logging protocol). It writes the CRI log
    /// format with rotation and lives with the shim, not the agent, so
    /// output keeps flowing while the agent restarts.
    Binary(PathBuf),
}

/// A connection to containerd plus the agent's own state for it.
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
    /// The agent's files: sandbox records, exec FIFOs.
    data_dir: PathBuf,
    log_driver: LogDriver,
    network: Option<Arc<dyn PodNetwork>>,
    host: spec::HostFacts,
    /// One import or pull at a time: they share ingest refs and unpack
    /// the same chains.
    import_lock: tokio::sync::Mutex<()>,
    http: reqwest::Client,
    daemon: Option<Daemon>,
}

impl Containerd {
    /// Starts the agent's own containerd under `<data_dir>/containerd/`
    /// and connects to it.
    pub async fn start_own(data_dir: &Path) -> Result<Containerd, RuntimeError> {
        let daemon = Daemon::start(data_dir).await?;
        let socket = daemon.paths.socket.clone();
        let mut c = Containerd::connect(&socket, data_dir).await?;
        c.daemon = Some(daemon);
        Ok(c)
    }

    /// Connects to a running containerd; `data_dir` holds the agent's own
    /// files (sandbox records, exec FIFOs).
    pub async fn connect(socket: &Path, data_dir: &Path) -> Result<Containerd, RuntimeError> {
        daemon::wait_for_socket(socket, Duration::from_secs(10)).await?;
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| RuntimeError::Other(format!("connect to containerd at {}: {e}", socket.display())))?;
        for sub in ["sandboxes", "exec"] {
            std::fs::create_dir_all(data_dir.join(sub))
                .map_err(|e| RuntimeError::Other(format!("create {}: {e}", data_dir.join(sub).display())))?;
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| RuntimeError::Other(format!("http client: {e}")))?;
        Ok(Containerd {
            channel,
            socket: socket.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            log_driver: LogDriver::File,
            network: None,
            host: container::host_facts(),
            import_lock: tokio::sync::Mutex::new(()),
            http,
            daemon: None,
        })
    }

    /// Pod networking for sandboxes that are not host-network.
    pub fn with_network(mut self, network: Arc<dyn PodNetwork>) -> Containerd {
        self.network = Some(network);
        self
    }

    pub fn with_log_driver(mut self, log_driver: LogDriver) -> Containerd {
        self.log_driver = log_driver;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The supervised containerd, when this handle started it.
    pub fn daemon(&self) -> Option<&Daemon> {
        self.daemon.as_ref()
    }

    /// Stops the agent's own containerd (containers keep running).
    pub async fn shutdown(&self) {
        if let Some(d) = &self.daemon {
            d.shutdown().await;
        }
    }

    /// A request in our namespace.
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert("containerd-namespace", tonic::metadata::MetadataValue::from_static(NAMESPACE));
        r
    }

    /// A request in our namespace under a lease (what it creates is safe
    /// from containerd's garbage collector until the lease goes).
    fn req_leased<T>(&self, msg: T, lease: &str) -> Request<T> {
        let mut r = self.req(msg);
        if let Ok(v) = lease.parse() {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }
}

/// A gRPC error as a runtime error, with what we were doing.
fn grpc(what: impl std::fmt::Display, s: Status) -> RuntimeError {
    match s.code() {
        Code::NotFound => RuntimeError::NotFound(format!("{what}: {}", s.message())),
        _ => RuntimeError::Other(format!("{what}: {} ({:?})", s.message(), s.code())),
    }
}

fn is_not_found(s: &Status) -> bool {
    s.code() == Code::NotFound
}

/// A fresh 64-hex id, the shape Kubernetes shows for container ids.
fn new_id() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

impl Runtime for Containerd {
    fn set_pod_cidr(&self, cidr: &str) {
        if let Some(n) = &self.network {
            n.set_pod_cidr(cidr);
        }
    }

    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        auth: &[RegistryAuth],
    ) -> Result<(String, String), RuntimeError> {
        image::ensure_image(self, image, policy, auth).await
    }

    async fn run_sandbox(&self, cfg: &SandboxConfig) -> Result<Sandbox, RuntimeError> {
        sandbox::run_sandbox(self, cfg).await
    }

    async fn remove_sandbox(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        sandbox::remove_sandbox(self, sandbox_id).await
    }

    async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, RuntimeError> {
        sandbox::list_sandboxes(self)
    }

    async fn start_container(&self, sandbox: &Sandbox, cfg: &ContainerConfig) -> Result<String, RuntimeError> {
        container::start_container(self, sandbox, cfg).await
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        container::stop_container(self, id, grace).await
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        container::remove_container(self, id).await
    }

    async fn list_containers(&self) -> Result<Vec<ContainerStatus>, RuntimeError> {
        container::list_containers(self).await
    }

    async fn exec(&self, id: &str, cmd: &[String], tty: bool, io: ExecIo) -> Result<ExitCode, RuntimeError> {
        exec::exec(self, id, cmd, tty, io).await
    }

    async fn usage(&self, id: &str) -> Result<Usage, RuntimeError> {
        container::usage(self, id).await
    }

    async fn attach(&self, id: &str, input: AttachInput) -> Result<(), RuntimeError> {
        attach::attach(self, id, input).await
    }
}
