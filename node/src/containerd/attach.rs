//! Attach: input to a container's main process (`kubectl attach -i`,
//! `kubectl run -it`). Output does not come from here: the agent follows
//! the container's log (see `streams.rs`), so a process keeps one writer
//! for its output whether or not anyone is attached.
//!
//! A container created with `stdin: true` gets a FIFO,
//! `<data-dir>/io/<container id>/stdin`, as its task's stdin. The shim
//! opens both ends of it: a reader that copies into the process (or its
//! terminal), and a writer it keeps until `CloseIO`, so the process never
//! sees end-of-file because an attach (or the agent) went away. An attach
//! opens another writer for as long as it lasts; with `stdinOnce` the agent
//! closes the process's stdin (`CloseIO`) when that first attach ends, as
//! the kubelet does.
//!
//! Output normally goes to the log driver the shim runs (`binary://`), but
//! containerd 1.6's binary IO has no stdin without a terminal. So a
//! container with stdin and no terminal gets FIFOs for stdout and stderr
//! too, and the agent starts the log driver on them itself, in a session
//! of its own: like the shim's driver it outlives an agent restart and
//! ends when the shim closes the FIFOs after the process.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use containerd_client::services::v1::{CloseIoRequest, ResizePtyRequest};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;

use super::{Containerd, LogDriver};
use crate::logdriver::LogDriverConfig;
use crate::runtime::{AttachInput, ContainerConfig, RuntimeError};

fn io_dir(c: &Containerd, id: &str) -> PathBuf {
    c.data_dir.join("io").join(id)
}

fn fifo_path(c: &Containerd, id: &str) -> PathBuf {
    io_dir(c, id).join("stdin")
}

/// A task's stdio, and the log driver the agent started for it (if any).
pub(super) struct TaskIo {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub driver: Option<Child>,
}

impl TaskIo {
    /// The task started: the driver is left to run, reaped when it ends.
    pub fn started(self) {
        if let Some(mut d) = self.driver {
            std::thread::spawn(move || d.wait());
        }
    }

    /// The task never started: nothing will open the FIFOs' other ends.
    pub fn abandon(self) {
        if let Some(mut d) = self.driver {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

/// The stdio of container `id`'s task: its log (`log_uri`), and FIFOs
/// when it takes stdin.
pub(super) fn task_io(c: &Containerd, id: &str, cfg: &ContainerConfig, log_uri: &str) -> Result<TaskIo, RuntimeError> {
    // With a terminal, stdout carries both streams.
    let stderr = if cfg.tty { String::new() } else { log_uri.to_string() };
    let mut io = TaskIo { stdin: String::new(), stdout: log_uri.to_string(), stderr, driver: None };
    if !cfg.stdin {
        return Ok(io);
    }
    let dir = io_dir(c, id);
    std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::Other(format!("create {}: {e}", dir.display())))?;
    let fifo = |name: &str| -> Result<PathBuf, RuntimeError> {
        let p = dir.join(name);
        super::exec::mkfifo(&p)?;
        Ok(p)
    };
    let s = |p: &Path| p.to_string_lossy().into_owned();
    io.stdin = s(&fifo("stdin")?);
    // A terminal's copy (and the shim's file IO) take a stdin FIFO next to
    // the log; the binary log driver's IO does not.
    let LogDriver::Binary(program) = &c.log_driver else { return Ok(io) };
    if cfg.tty {
        return Ok(io);
    }
    let (out, err) = (fifo("stdout")?, fifo("stderr")?);
    let mut driver = LogDriverConfig::new(cfg.log_path.clone());
    driver.fifos = Some([out.clone(), err.clone()]);
    let json = serde_json::to_string(&driver).map_err(|e| RuntimeError::Other(e.to_string()))?;
    let mut cmd = Command::new(program);
    cmd.args(["log-driver", &json]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid only, between fork and exec: signals for the agent's
    // process group (a terminal's Ctrl-C) do not reach the driver.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child =
        cmd.spawn().map_err(|e| RuntimeError::Other(format!("start the log driver {}: {e}", program.display())))?;
    io.stdout = s(&out);
    io.stderr = s(&err);
    io.driver = Some(child);
    Ok(io)
}

/// Forgets the FIFOs of a removed container (if it had any).
pub(super) fn remove_io(c: &Containerd, id: &str) {
    let _ = std::fs::remove_dir_all(io_dir(c, id));
}

/// Feeds stdin until the input ends (then closes the process's stdin if
/// asked) and resizes the terminal until the resizes end.
pub async fn attach(c: &Containerd, id: &str, input: AttachInput) -> Result<(), RuntimeError> {
    let AttachInput { stdin, resize, close_stdin } = input;
    let writer =
        match &stdin {
            None => None,
            // Write-only and non-blocking: fails (ENXIO, or not found) unless
            // the shim holds the read end, i.e. the task was made with it.
            Some(_) => Some(pipe::OpenOptions::new().open_sender(fifo_path(c, id)).map_err(|e| {
                RuntimeError::Container(format!("container {id} has no stdin open to attach to ({e})"))
            })?),
        };
    let feed = async {
        if let (Some(mut rx), Some(mut w)) = (stdin, writer) {
            while let Some(b) = rx.recv().await {
                if w.write_all(&b).await.is_err() {
                    break;
                }
            }
        }
        if !close_stdin {
            return Ok(());
        }
        c.tasks()
            .close_io(c.req(CloseIoRequest { container_id: id.to_string(), exec_id: String::new(), stdin: true }))
            .await
            .map(|_| ())
            .map_err(|e| super::grpc(format!("close the stdin of {id}"), e))
    };
    let sizes = async {
        let Some(mut rx) = resize else { return };
        let mut tasks = c.tasks();
        while let Some((cols, rows)) = rx.recv().await {
            let req = ResizePtyRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                width: cols as u32,
                height: rows as u32,
            };
            let _ = tasks.resize_pty(c.req(req)).await;
        }
    };
    let (fed, ()) = tokio::join!(feed, sizes);
    fed
}
