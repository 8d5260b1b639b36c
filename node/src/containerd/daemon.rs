//! The agent's own containerd: its config, the child process, and the
//! supervisor that restarts it when it dies.
//!
//! Why containers outlive both containerd and the agent: containerd starts
//! one shim per container (`containerd-shim-runc-v2 start`), which
//! re-executes itself in its own process group and exits, so the real shim
//! is reparented to init. The shim, not containerd, is the container's
//! parent and holds its stdio; a restarted containerd reconnects to the
//! shims through their sockets. containerd itself runs in its own process
//! group (so a Ctrl-C to the agent's group does not reach it) and without a
//! parent-death signal: if the agent is killed with SIGKILL, containerd
//! keeps running, and the next agent finds it through the pid file and
//! replaces it with a supervised child (the containers do not notice).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::runtime::RuntimeError;

/// Paths of an agent-owned containerd, all under `<data_dir>/containerd/`.
#[derive(Clone, Debug)]
pub struct DaemonPaths {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pid_file: PathBuf,
    pub log: PathBuf,
}

impl DaemonPaths {
    pub fn new(data_dir: &Path) -> DaemonPaths {
        let dir = data_dir.join("containerd");
        DaemonPaths {
            config: dir.join("config.toml"),
            socket: dir.join("containerd.sock"),
            pid_file: dir.join("containerd.pid"),
            log: dir.join("containerd.log"),
            dir,
        }
    }
}

/// containerd's config: private root, state, sockets and plugin dirs so it
/// never meets a system containerd, and no CRI plugin (the agent is the CRI).
pub fn config_toml(p: &DaemonPaths) -> String {
    let d = p.dir.display();
    format!(
        r#"# Written by capstan-node; rewritten at every start.
version = 2
root = "{d}/root"
state = "{d}/state"
plugin_dir = "{d}/plugins"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
oom_score = -999

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        sock = p.socket.display()
    )
}

/// The supervised containerd child. Dropping it stops containerd (by PID);
/// the containers keep running in their shims.
pub struct Daemon {
    pid: Arc<AtomicU32>,
    stop: watch::Sender<bool>,
    pub paths: DaemonPaths,
}

/// Unix sockets paths are limited to 108 bytes (sun_path).
const MAX_SOCKET_PATH: usize = 100;

impl Daemon {
    /// Writes the config, replaces a containerd a killed agent left behind,
    /// starts containerd and waits until its socket answers.
    pub async fn start(data_dir: &Path) -> Result<Daemon, RuntimeError> {
        let paths = DaemonPaths::new(data_dir);
        let sock_len = paths.socket.as_os_str().len() + ".ttrpc".len();
        if sock_len > MAX_SOCKET_PATH {
            return Err(RuntimeError::Other(format!(
                "containerd socket path {} is too long for a unix socket; use a shorter data dir",
                paths.socket.display()
            )));
        }
        for sub in ["", "root", "state", "plugins", "opt"] {
            std::fs::create_dir_all(paths.dir.join(sub))
                .map_err(|e| RuntimeError::Other(format!("create {}: {e}", paths.dir.join(sub).display())))?;
        }
        std::fs::write(&paths.config, config_toml(&paths))
            .map_err(|e| RuntimeError::Other(format!("write {}: {e}", paths.config.display())))?;
        stop_stale(&paths).await;

        let child = spawn(&paths)?;
        let pid = Arc::new(AtomicU32::new(child.id().unwrap_or(0)));
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(supervise(child, paths.clone(), pid.clone(), stop_rx));
        let daemon = Daemon { pid, stop, paths };
        wait_for_socket(&daemon.paths.socket, Duration::from_secs(30)).await?;
        Ok(daemon)
    }

    /// The current containerd pid (it changes when the supervisor restarts it).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// Stops supervising and leaves containerd running, as an agent killed
    /// with SIGKILL does (or one handing over to its next version); the
    /// next `start` on the data dir replaces it.
    pub fn disown(&self) {
        let _ = self.stop.send(true);
        self.pid.store(0, Ordering::SeqCst);
    }

    /// Stops containerd: SIGTERM, then SIGKILL after 5 s.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let pid = self.pid.swap(0, Ordering::SeqCst);
        if pid != 0 {
            terminate(pid, Duration::from_secs(5)).await;
        }
        let _ = std::fs::remove_file(&self.paths.pid_file);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let pid = self.pid.swap(0, Ordering::SeqCst);
        if pid != 0 {
            // Synchronous: Drop may run outside the runtime. SIGTERM lets
            // containerd close its database cleanly; the shims stay.
            // SAFETY: kill(2) with a pid we started; no memory is touched.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let _ = std::fs::remove_file(&self.paths.pid_file);
        }
    }
}

fn spawn(paths: &DaemonPaths) -> Result<tokio::process::Child, RuntimeError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .map_err(|e| RuntimeError::Other(format!("open {}: {e}", paths.log.display())))?;
    let log2 = log.try_clone().map_err(|e| RuntimeError::Other(format!("containerd log: {e}")))?;
    // A stale socket makes containerd fail to listen.
    let _ = std::fs::remove_file(&paths.socket);
    let child = tokio::process::Command::new("containerd")
        .arg("--config")
        .arg(&paths.config)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| RuntimeError::Other(format!("start containerd: {e}")))?;
    if let Some(pid) = child.id() {
        let _ = std::fs::write(&paths.pid_file, pid.to_string());
    }
    Ok(child)
}

/// Restarts containerd when it exits on its own, with a backoff so a
/// containerd that cannot start does not spin.
async fn supervise(
    child: tokio::process::Child,
    paths: DaemonPaths,
    pid: Arc<AtomicU32>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    let mut child = Some(child);
    loop {
        let started = Instant::now();
        if let Some(c) = child.as_mut() {
            tokio::select! {
                status = c.wait() => {
                    if *stop.borrow() {
                        return;
                    }
                    tracing::warn!(?status, "containerd exited; restarting it");
                }
                _ = stop.changed() => return,
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
        child = match spawn(&paths) {
            Ok(c) => {
                pid.store(c.id().unwrap_or(0), Ordering::SeqCst);
                Some(c)
            }
            Err(e) => {
                tracing::error!(error = %e, "restarting containerd failed");
                None
            }
        };
    }
}

/// A containerd left running by an agent that was killed: stop it if the
/// pid file names a containerd using our config (never another process).
async fn stop_stale(paths: &DaemonPaths) {
    let Ok(text) = std::fs::read_to_string(&paths.pid_file) else { return };
    let Ok(pid) = text.trim().parse::<u32>() else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("containerd") && cmdline.contains(&*paths.config.to_string_lossy()) {
        tracing::info!(pid, "stopping the containerd a previous agent left running");
        terminate(pid, Duration::from_secs(10)).await;
    }
}

/// SIGTERM, wait up to `grace` for the process to go, then SIGKILL.
async fn terminate(pid: u32, grace: Duration) {
    let alive = || std::path::Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid);
    // SAFETY: kill(2) on a pid we own; no memory is touched.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if alive() {
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Polls until containerd's socket serves the Version API.
pub async fn wait_for_socket(socket: &Path, timeout: Duration) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("socket not created");
    while Instant::now() < deadline {
        if socket.exists() {
            match containerd_client::connect(socket).await {
                Ok(ch) => {
                    let mut v = containerd_client::services::v1::version_client::VersionClient::new(ch);
                    match v.version(()).await {
                        Ok(_) => return Ok(()),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(RuntimeError::Other(format!("containerd at {} did not come up: {last}", socket.display())))
}
