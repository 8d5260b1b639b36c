//! Containers: create and start (container record, rootfs snapshot, task),
//! stop, remove, list with state, and usage from the cgroup.
//!
//! A container's id is also its snapshot key; its cgroup is
//! `/capstan/<pod-uid>/<id>` (runc's cgroupfs driver). What list needs
//! later is kept in the container's labels (sandbox, log path, image id,
//! cgroup, start time), so any `Containerd` on the socket can report it.
//!
//! OOM kills are read from the cgroup (v1 `memory.oom_control` `oom_kill`,
//! v2 `memory.events`) when a stopped task is listed, not from the
//! `/tasks/oom` event stream: the counter is level-triggered and survives
//! an agent restart (the cgroup lives until the task is deleted), while an
//! event missed while the agent was down is gone for good.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use containerd_client::services::v1::{
    containers_client::ContainersClient, tasks_client::TasksClient, Container, CreateContainerRequest,
    CreateTaskRequest, DeleteContainerRequest, DeleteTaskRequest, GetContainerRequest, GetRequest, KillRequest,
    ListContainersRequest, ListTasksRequest, StartRequest, UpdateContainerRequest, WaitRequest,
};
use containerd_client::types::v1::{Process, Status as TaskStatus};

use super::spec::{self, HostDevice, HostFacts, SpecInput};
use super::{grpc, is_not_found, new_id, reference, Containerd, LogDriver, CGROUP_PARENT, SNAPSHOTTER};
use crate::runtime::{
    ContainerConfig, ContainerState, ContainerStatus, RuntimeError, Sandbox, Usage, LABEL_ATTEMPT,
    LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID,
};

pub const LABEL_SANDBOX_ID: &str = "io.capstan.sandbox.id";
pub const LABEL_LOG_PATH: &str = "io.capstan.log.path";
pub const LABEL_IMAGE_ID: &str = "io.capstan.image.id";
pub const LABEL_CGROUP: &str = "io.capstan.cgroup";
/// Unix nanoseconds of the task's start (tasks do not report it).
pub const LABEL_STARTED_AT: &str = "io.capstan.started-at";

const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl Containerd {
    fn containers(&self) -> ContainersClient<tonic::transport::Channel> {
        ContainersClient::new(self.channel.clone())
    }

    pub(super) fn tasks(&self) -> TasksClient<tonic::transport::Channel> {
        TasksClient::new(self.channel.clone())
    }

    pub(super) async fn get_container(&self, id: &str) -> Result<Container, RuntimeError> {
        self.containers()
            .get(self.req(GetContainerRequest { id: id.to_string() }))
            .await
            .map_err(|e| grpc(format!("container {id}"), e))?
            .into_inner()
            .container
            .ok_or_else(|| RuntimeError::NotFound(format!("container {id}")))
    }

    /// The container's task (init process), None when it has none.
    async fn task(&self, id: &str) -> Result<Option<Process>, RuntimeError> {
        match self.tasks().get(self.req(GetRequest { container_id: id.to_string(), exec_id: String::new() })).await {
            Ok(r) => Ok(r.into_inner().process),
            Err(s) if is_not_found(&s) => Ok(None),
            Err(s) => Err(grpc(format!("task {id}"), s)),
        }
    }

    fn log_uri(&self, log_path: &Path) -> Result<String, RuntimeError> {
        let bad = |e: String| RuntimeError::Container(format!("log path {}: {e}", log_path.display()));
        if !log_path.is_absolute() {
            return Err(bad("not absolute".into()));
        }
        match &self.log_driver {
            LogDriver::File => reqwest::Url::from_file_path(log_path)
                .map(|u| u.to_string())
                .map_err(|()| bad("not a valid file URI".into())),
            LogDriver::Binary(program) => {
                if !program.is_absolute() {
                    return Err(bad(format!("log driver {} is not absolute", program.display())));
                }
                let cfg = crate::logdriver::LogDriverConfig::new(log_path.to_path_buf());
                Ok(crate::logdriver::log_uri(program, &cfg))
            }
        }
    }

    /// Deletes the task, the container record and its snapshot; each step
    /// tolerates the thing being gone already.
    async fn delete_all(&self, id: &str) -> Result<(), RuntimeError> {
        match self.tasks().delete(self.req(DeleteTaskRequest { container_id: id.to_string() })).await {
            Ok(_) => {}
            Err(s) if is_not_found(&s) => {}
            Err(s) => return Err(grpc(format!("delete task {id}"), s)),
        }
        super::attach::remove_io(self, id);
        match self.containers().delete(self.req(DeleteContainerRequest { id: id.to_string() })).await {
            Ok(_) => {}
            Err(s) if is_not_found(&s) => {}
            Err(s) => return Err(grpc(format!("delete container {id}"), s)),
        }
        self.remove_snapshot(id).await
    }

    async fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        let r = self
            .tasks()
            .kill(self.req(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal: signal as u32,
                all,
            }))
            .await;
        match r {
            Ok(_) => Ok(()),
            // Gone or already exited: what a kill wanted.
            Err(s) if is_not_found(&s) || s.code() == tonic::Code::FailedPrecondition => Ok(()),
            Err(s) if s.message().contains("process already finished") => Ok(()),
            Err(s) => Err(grpc(format!("kill {id}"), s)),
        }
    }

    /// Waits up to `timeout` for the task to exit; true if it did.
    async fn wait_exit(&self, id: &str, timeout: Duration) -> Result<bool, RuntimeError> {
        let mut tasks = self.tasks();
        let wait = tasks.wait(self.req(WaitRequest { container_id: id.to_string(), exec_id: String::new() }));
        match tokio::time::timeout(timeout, wait).await {
            Err(_) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(s)) if is_not_found(&s) => Ok(true),
            Ok(Err(s)) => Err(grpc(format!("wait {id}"), s)),
        }
    }
}

/// Only [A-Za-z0-9_-] in cgroup path components built from API input.
fn safe_component(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

pub async fn start_container(c: &Containerd, sandbox: &Sandbox, cfg: &ContainerConfig) -> Result<String, RuntimeError> {
    let name = reference::normalize(&cfg.image)
        .map_err(|e| RuntimeError::Image { image: cfg.image.clone(), reason: format!("InvalidImageName: {e}") })?;
    let image = match c.local_image(&name).await {
        Ok(i) => i,
        Err(RuntimeError::NotFound(_)) => {
            return Err(RuntimeError::Image {
                image: cfg.image.clone(),
                reason: "ErrImageNotPresent: the image is not present on the node (ensure_image first)".into(),
            });
        }
        Err(e) => return Err(e),
    };
    let sb = c.sandbox_spec(sandbox)?;
    let id = new_id();
    let cgroups_path = format!("{CGROUP_PARENT}/{}/{id}", safe_component(&cfg.pod_uid));

    let named_user = !image.config.user.is_empty()
        && cfg.security.run_as_user.is_none()
        && image.config.user.split(':').any(|p| !p.is_empty() && p.parse::<u32>().is_err());
    let (passwd, group) = if named_user { read_image_etc(c, &image.chain_id).await } else { (None, None) };
    let pid_namespace = match &cfg.share_pid_with {
        None => None,
        Some(target) => match c.task(target).await? {
            Some(t) if t.pid > 0 => Some(format!("/proc/{}/ns/pid", t.pid)),
            _ => return Err(RuntimeError::Container(format!("the target container {target} is not running"))),
        },
    };
    let spec = spec::build_spec(&SpecInput {
        cfg,
        image: &image.config,
        passwd: passwd.as_deref(),
        group: group.as_deref(),
        sandbox: &sb,
        cgroups_path: &cgroups_path,
        host: &c.host,
        pid_namespace: pid_namespace.as_deref(),
    })
    .map_err(RuntimeError::Container)?;
    let spec_bytes = serde_json::to_vec(&spec).map_err(|e| RuntimeError::Other(e.to_string()))?;

    let mut labels: HashMap<String, String> = cfg.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (k, v) in [
        (LABEL_POD_UID, cfg.pod_uid.clone()),
        (LABEL_POD_NAMESPACE, cfg.namespace.clone()),
        (LABEL_POD_NAME, cfg.pod_name.clone()),
        (LABEL_CONTAINER_NAME, cfg.name.clone()),
        (LABEL_ATTEMPT, cfg.attempt.to_string()),
        (LABEL_SANDBOX_ID, sandbox.id.clone()),
        (LABEL_LOG_PATH, cfg.log_path.to_string_lossy().to_string()),
        (LABEL_IMAGE_ID, image.id.clone()),
        (LABEL_CGROUP, cgroups_path.clone()),
    ] {
        labels.insert(k.to_string(), v);
    }
    let log_uri = c.log_uri(&cfg.log_path)?;
    if let Some(dir) = cfg.log_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::Other(format!("create {}: {e}", dir.display())))?;
    }

    let container = Container {
        id: id.clone(),
        labels,
        image: name.clone(),
        runtime: Some(ContainerRuntime { name: RUNC_RUNTIME.into(), options: None }),
        spec: Some(prost_types::Any { type_url: spec::SPEC_TYPE_URL.into(), value: spec_bytes }),
        snapshotter: SNAPSHOTTER.into(),
        snapshot_key: id.clone(),
        ..Default::default()
    };
    // The record first: it references the snapshot key, which keeps the
    // snapshot from the garbage collector from the moment it exists.
    c.containers()
        .create(c.req(CreateContainerRequest { container: Some(container) }))
        .await
        .map_err(|e| grpc(format!("create container {}", cfg.name), e))?;

    let mut started = SystemTime::now();
    let mut task_io = None;
    let r = async {
        let mounts = c
            .snapshots_prepare(&id, &image.chain_id)
            .await
            .map_err(|e| RuntimeError::Container(format!("prepare rootfs: {e}")))?;
        let io = task_io.insert(super::attach::task_io(c, &id, cfg, &log_uri)?);
        c.tasks()
            .create(c.req(CreateTaskRequest {
                container_id: id.clone(),
                rootfs: mounts,
                stdin: io.stdin.clone(),
                stdout: io.stdout.clone(),
                stderr: io.stderr.clone(),
                terminal: cfg.tty,
                ..Default::default()
            }))
            .await
            .map_err(|e| RuntimeError::Container(format!("create task: {}", e.message())))?;
        // Taken before the start, so it never comes after the exit.
        started = SystemTime::now();
        c.tasks()
            .start(c.req(StartRequest { container_id: id.clone(), exec_id: String::new() }))
            .await
            .map_err(|e| RuntimeError::Container(format!("start task: {}", e.message())))?;
        Ok::<_, RuntimeError>(())
    }
    .await;
    if let Some(io) = task_io {
        if r.is_ok() {
            io.started();
        } else {
            io.abandon();
        }
    }
    if let Err(e) = r {
        // Kubernetes would keep a container that failed to start; here it
        // is removed and the error carries the reason, so nothing leaks.
        if let Err(d) = c.delete_all(&id).await {
            tracing::warn!(container = %id, error = %d, "cleanup after failed start");
        }
        return Err(e);
    }
    let now = started.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let update = Container {
        id: id.clone(),
        labels: HashMap::from([(LABEL_STARTED_AT.to_string(), now.to_string())]),
        ..Default::default()
    };
    let r = c
        .containers()
        .update(c.req(UpdateContainerRequest {
            container: Some(update),
            update_mask: Some(prost_types::FieldMask { paths: vec![format!("labels.{LABEL_STARTED_AT}")] }),
        }))
        .await;
    if let Err(e) = r {
        tracing::warn!(container = %id, error = %e, "recording the start time failed");
    }
    Ok(id)
}

impl Containerd {
    async fn snapshots_prepare(
        &self,
        key: &str,
        parent: &str,
    ) -> Result<Vec<containerd_client::types::Mount>, RuntimeError> {
        let mut client =
            containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        client
            .prepare(self.req(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: HashMap::new(),
            }))
            .await
            .map(|r| r.into_inner().mounts)
            .map_err(|e| grpc(format!("prepare snapshot {key}"), e))
    }
}

/// The image's /etc/passwd and /etc/group, read from the layer
/// directories of a temporary view of its top snapshot, upper layers
/// first (no mount needed). Only regular files are read: a symlink in an
/// image must never make the agent read a host file. Missing gives None.
async fn read_image_etc(c: &Containerd, chain_id: &str) -> (Option<String>, Option<String>) {
    if chain_id.is_empty() {
        return (None, None);
    }
    let key = format!("capstan-view-{}", &new_id()[..16]);
    let mut client =
        containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient::new(c.channel.clone());
    let view = client
        .view(c.req(containerd_client::services::v1::snapshots::ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.clone(),
            parent: chain_id.to_string(),
            labels: HashMap::new(),
        }))
        .await;
    let mounts = match view {
        Ok(r) => r.into_inner().mounts,
        Err(e) => {
            tracing::warn!(error = %e, "snapshot view for /etc/passwd");
            return (None, None);
        }
    };
    let _ = c.remove_snapshot(&key).await;
    let dirs = layer_dirs(&mounts);
    let read = |name: &str| {
        dirs.iter().find_map(|d| {
            let p = d.join(name);
            let md = std::fs::symlink_metadata(&p).ok()?;
            if md.is_file() {
                std::fs::read_to_string(&p).ok()
            } else {
                None
            }
        })
    };
    (read("etc/passwd"), read("etc/group"))
}

/// Directories of a snapshot's layers, top first: a bind mount's source,
/// or an overlay's upperdir then lowerdirs.
fn layer_dirs(mounts: &[containerd_client::types::Mount]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for m in mounts {
        if m.r#type == "bind" {
            out.push(PathBuf::from(&m.source));
            continue;
        }
        for o in &m.options {
            if let Some(u) = o.strip_prefix("upperdir=") {
                out.insert(0, PathBuf::from(u));
            } else if let Some(l) = o.strip_prefix("lowerdir=") {
                out.extend(l.split(':').map(PathBuf::from));
            }
        }
    }
    out
}

pub async fn stop_container(c: &Containerd, id: &str, grace: Duration) -> Result<(), RuntimeError> {
    let Some(task) = c.task(id).await? else { return Ok(()) };
    if task.status == TaskStatus::Stopped as i32 {
        return Ok(());
    }
    if !grace.is_zero() {
        c.kill(id, libc::SIGTERM, false).await?;
        if c.wait_exit(id, grace).await? {
            return Ok(());
        }
    }
    // `all`: also what the main process left behind in its cgroup.
    c.kill(id, libc::SIGKILL, true).await?;
    if c.wait_exit(id, Duration::from_secs(10)).await? {
        Ok(())
    } else {
        Err(RuntimeError::Other(format!("container {id} did not exit 10 s after SIGKILL")))
    }
}

pub async fn remove_container(c: &Containerd, id: &str) -> Result<(), RuntimeError> {
    if let Some(task) = c.task(id).await? {
        if task.status != TaskStatus::Stopped as i32 {
            c.kill(id, libc::SIGKILL, true).await?;
            c.wait_exit(id, Duration::from_secs(10)).await?;
        }
    }
    c.delete_all(id).await
}

fn timestamp(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let t = t.as_ref()?;
    if t.seconds <= 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.clamp(0, 999_999_999) as u32))
}

pub async fn list_containers(c: &Containerd) -> Result<Vec<ContainerStatus>, RuntimeError> {
    let list = c
        .containers()
        .list(c.req(ListContainersRequest { filters: vec![] }))
        .await
        .map_err(|e| grpc("list containers", e))?
        .into_inner()
        .containers;
    // Every task in one call (a Get per container made each listing O(n)
    // round trips, and pod workers list often).
    let mut tasks: HashMap<String, Process> = c
        .tasks()
        .list(c.req(ListTasksRequest { filter: String::new() }))
        .await
        .map_err(|e| grpc("list tasks", e))?
        .into_inner()
        .tasks
        .into_iter()
        .map(|p| (p.id.clone(), p))
        .collect();
    let mut out = Vec::with_capacity(list.len());
    for ctr in list {
        // Ours only: something else may share the namespace.
        let Some(pod_uid) = ctr.labels.get(LABEL_POD_UID).cloned() else { continue };
        let started_at = ctr
            .labels
            .get(LABEL_STARTED_AT)
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| UNIX_EPOCH + Duration::from_nanos(n));
        let state = match tasks.remove(&ctr.id) {
            None => match started_at {
                None => ContainerState::Created,
                // It ran, and its task is gone (the shim died, the node
                // rebooted): exited for an unknown reason, as containerd's
                // CRI reports it.
                Some(s) => {
                    ContainerState::Exited { started_at: Some(s), finished_at: s, exit_code: 255, oom_killed: false }
                }
            },
            Some(p) => match TaskStatus::try_from(p.status).unwrap_or(TaskStatus::Unknown) {
                TaskStatus::Created => ContainerState::Created,
                TaskStatus::Running | TaskStatus::Paused | TaskStatus::Pausing => {
                    ContainerState::Running { started_at: started_at.unwrap_or(UNIX_EPOCH) }
                }
                TaskStatus::Stopped => ContainerState::Exited {
                    started_at,
                    finished_at: timestamp(&p.exited_at).unwrap_or_else(SystemTime::now),
                    exit_code: p.exit_status as i32,
                    oom_killed: ctr.labels.get(LABEL_CGROUP).is_some_and(|cg| oom_killed(cg)),
                },
                TaskStatus::Unknown => ContainerState::Unknown,
            },
        };
        let labels: BTreeMap<String, String> = ctr.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.push(ContainerStatus {
            id: ctr.id.clone(),
            pod_uid,
            name: labels.get(LABEL_CONTAINER_NAME).cloned().unwrap_or_default(),
            attempt: labels.get(LABEL_ATTEMPT).and_then(|a| a.parse().ok()).unwrap_or(0),
            image: ctr.image.clone(),
            image_id: labels.get(LABEL_IMAGE_ID).cloned().unwrap_or_default(),
            state,
            labels,
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn cgroup_v2() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

fn cgroup_file(controller: &str, cgroup: &str, file: &str) -> PathBuf {
    let rel = cgroup.trim_start_matches('/');
    if cgroup_v2() {
        Path::new(CGROUP_ROOT).join(rel).join(file)
    } else {
        Path::new(CGROUP_ROOT).join(controller).join(rel).join(file)
    }
}

/// `key value` lines (memory.stat, memory.events, memory.oom_control, cpu.stat).
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn oom_killed(cgroup: &str) -> bool {
    let (file, key) = if cgroup_v2() { ("memory.events", "oom_kill") } else { ("memory.oom_control", "oom_kill") };
    std::fs::read_to_string(cgroup_file("memory", cgroup, file))
        .ok()
        .and_then(|t| stat_value(&t, key))
        .is_some_and(|n| n > 0)
}

pub async fn usage(c: &Containerd, id: &str) -> Result<Usage, RuntimeError> {
    let ctr = c.get_container(id).await?;
    let cg = ctr
        .labels
        .get(LABEL_CGROUP)
        .ok_or_else(|| RuntimeError::Other(format!("container {id} has no cgroup label")))?;
    let read = |controller: &str, file: &str| {
        let p = cgroup_file(controller, cg, file);
        std::fs::read_to_string(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RuntimeError::NotFound(format!("cgroup of container {id} (not running?)")),
            _ => RuntimeError::Other(format!("{}: {e}", p.display())),
        })
    };
    if cgroup_v2() {
        let cpu = stat_value(&read("cpu", "cpu.stat")?, "usage_usec").unwrap_or(0) * 1000;
        let current: u64 = read("memory", "memory.current")?.trim().parse().unwrap_or(0);
        let inactive = stat_value(&read("memory", "memory.stat")?, "inactive_file").unwrap_or(0);
        Ok(Usage { cpu_usage_nanos: cpu, memory_working_set_bytes: current.saturating_sub(inactive) })
    } else {
        let cpu = read("cpuacct", "cpuacct.usage")?.trim().parse().unwrap_or(0);
        let current: u64 = read("memory", "memory.usage_in_bytes")?.trim().parse().unwrap_or(0);
        let inactive = stat_value(&read("memory", "memory.stat")?, "total_inactive_file").unwrap_or(0);
        Ok(Usage { cpu_usage_nanos: cpu, memory_working_set_bytes: current.saturating_sub(inactive) })
    }
}

/// Removes a pod's (empty) cgroup parents; busy or missing ones stay.
pub fn remove_pod_cgroups(pod_uid: &str) {
    let rel = format!("{}/{}", CGROUP_PARENT.trim_start_matches('/'), safe_component(pod_uid));
    if cgroup_v2() {
        let _ = std::fs::remove_dir(Path::new(CGROUP_ROOT).join(&rel));
        return;
    }
    if let Ok(rd) = std::fs::read_dir(CGROUP_ROOT) {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir(e.path().join(&rel));
        }
    }
}

/// What the spec builder needs from this host.
pub fn host_facts() -> HostFacts {
    HostFacts {
        swap_accounting: Path::new(CGROUP_ROOT).join("memory/memory.memsw.limit_in_bytes").exists(),
        devices: host_devices(),
    }
}

/// Character and block devices directly under /dev (privileged containers).
fn host_devices() -> Vec<HostDevice> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/dev") else { return out };
    for e in rd.flatten() {
        let Ok(md) = std::fs::symlink_metadata(e.path()) else { continue };
        let ft = md.file_type();
        let kind = if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else {
            continue;
        };
        let dev = md.rdev();
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        out.push(HostDevice { path: e.path(), kind, major, minor, file_mode: md.mode() & 0o7777 });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_values() {
        let t = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(stat_value(t, "oom_kill"), Some(2));
        assert_eq!(stat_value("total_inactive_file 4096\n", "total_inactive_file"), Some(4096));
        assert_eq!(stat_value(t, "missing"), None);
    }

    #[test]
    fn cgroup_components_are_safe() {
        assert_eq!(safe_component("a1-b2_c"), "a1-b2_c");
        assert_eq!(safe_component("../x"), "___x");
    }
}
