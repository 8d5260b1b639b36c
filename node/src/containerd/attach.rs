//! Attach: input to a container's main process (`kubectl attach -i`,
//! `kubectl run -it`). Output does not come from here: the agent follows
//! the container's log (see `streams.rs`), so a process keeps one writer
//! for its output whether or not anyone is attached.
//!
//! A container created with `stdin: true` and `tty: true` gets a FIFO,
//! `<data-dir>/stdin/<container id>`, as its task's stdin. The shim opens
//! both ends of it: a reader that copies into the terminal, and a writer it
//! keeps until `CloseIO`, so the process never sees end-of-file because an
//! attach (or the agent) went away. An attach opens another writer for as
//! long as it lasts; with `stdinOnce` the agent closes the process's stdin
//! (`CloseIO`) when that first attach ends, as the kubelet does.
//!
//! Without a terminal the shim hands the container's output to the log
//! driver (`binary://`), and containerd 1.6's binary IO has no stdin: the
//! process reads end-of-file at once. So stdin reaches a main process only
//! with a terminal; `streams.rs` refuses `attach -i` to other containers
//! with a message that says so.

use std::path::PathBuf;

use containerd_client::services::v1::{CloseIoRequest, ResizePtyRequest};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;

use super::Containerd;
use crate::runtime::{AttachInput, RuntimeError};

fn fifo_path(c: &Containerd, id: &str) -> PathBuf {
    c.data_dir.join("stdin").join(id)
}

/// Makes the stdin FIFO of container `id`; its path goes into the task.
pub(super) fn prepare_stdin(c: &Containerd, id: &str) -> Result<String, RuntimeError> {
    let path = fifo_path(c, id);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::Other(format!("create {}: {e}", dir.display())))?;
    }
    super::exec::mkfifo(&path)?;
    Ok(path.to_string_lossy().into_owned())
}

/// Forgets the stdin FIFO of a removed container (if it had one).
pub(super) fn remove_stdin(c: &Containerd, id: &str) {
    let _ = std::fs::remove_file(fifo_path(c, id));
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
