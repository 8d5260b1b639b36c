//! Exec: a process in a running container, its stdio through FIFOs the
//! agent makes (the shim opens the other ends), with a terminal and resize.
//!
//! The output FIFOs are opened for reading, non-blocking, before the
//! process exists: a FIFO read end reports neither data nor hang-up until
//! a writer (the shim) has come, and EOF only once every writer left, so
//! the copy ends exactly when the shim has flushed the process's output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use containerd_client::services::v1::{
    CloseIoRequest, DeleteProcessRequest, ExecProcessRequest, ResizePtyRequest, StartRequest, WaitRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use super::spec::{self, PROCESS_TYPE_URL};
use super::{grpc, new_id, Containerd};
use crate::runtime::{ExecIo, ExitCode, RuntimeError};

pub(super) fn mkfifo(path: &Path) -> Result<(), RuntimeError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| RuntimeError::Other(format!("bad fifo path {}", path.display())))?;
    // SAFETY: a valid NUL-terminated path; mkfifo touches no memory of ours.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    if r != 0 {
        return Err(RuntimeError::Other(format!("mkfifo {}: {}", path.display(), std::io::Error::last_os_error())));
    }
    Ok(())
}

/// Copies a FIFO to a channel until EOF. A receiver that went away does
/// not stop the copy: the process must never block on a full pipe.
async fn pump(mut rx: pipe::Receiver, tx: mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut open = true;
    loop {
        match rx.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if open && tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    open = false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Removes the FIFO directory however exec ends.
struct FifoDir(PathBuf);

impl Drop for FifoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn exec(c: &Containerd, id: &str, cmd: &[String], tty: bool, io: ExecIo) -> Result<ExitCode, RuntimeError> {
    let ctr = c.get_container(id).await?;
    let spec_json: serde_json::Value = ctr
        .spec
        .as_ref()
        .map(|a| serde_json::from_slice(&a.value))
        .transpose()
        .map_err(|e| RuntimeError::Other(format!("container {id} spec: {e}")))?
        .ok_or_else(|| RuntimeError::Other(format!("container {id} has no spec")))?;
    let process = spec::exec_process(&spec_json, cmd, tty).map_err(RuntimeError::Container)?;

    let exec_id = format!("exec-{}", &new_id()[..16]);
    let dir = FifoDir(c.data_dir.join("exec").join(&exec_id));
    std::fs::create_dir_all(&dir.0).map_err(|e| RuntimeError::Other(format!("create {}: {e}", dir.0.display())))?;
    let path = |n: &str| dir.0.join(n);
    let open_rx = |p: &Path| {
        pipe::OpenOptions::new().open_receiver(p).map_err(|e| RuntimeError::Other(format!("open {}: {e}", p.display())))
    };

    mkfifo(&path("stdout"))?;
    let stdout_rx = open_rx(&path("stdout"))?;
    // A terminal merges stderr into stdout.
    let stderr_rx = if tty {
        None
    } else {
        mkfifo(&path("stderr"))?;
        Some(open_rx(&path("stderr"))?)
    };
    let stdin_tx = if io.stdin.is_some() {
        mkfifo(&path("stdin"))?;
        // Read-write so opening does not need the shim's end yet; closing
        // it is still the last writer going, which the shim sees as EOF.
        Some(
            pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(path("stdin"))
                .map_err(|e| RuntimeError::Other(format!("open stdin fifo: {e}")))?,
        )
    } else {
        None
    };

    let s = |p: PathBuf| p.to_string_lossy().to_string();
    let value = serde_json::to_vec(&process).map_err(|e| RuntimeError::Other(e.to_string()))?;
    c.tasks()
        .exec(c.req(ExecProcessRequest {
            container_id: id.to_string(),
            stdin: if stdin_tx.is_some() { s(path("stdin")) } else { String::new() },
            stdout: s(path("stdout")),
            stderr: if tty { String::new() } else { s(path("stderr")) },
            terminal: tty,
            spec: Some(prost_types::Any { type_url: PROCESS_TYPE_URL.into(), value }),
            exec_id: exec_id.clone(),
        }))
        .await
        .map_err(|e| match e.code() {
            tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
                RuntimeError::Container(format!("exec in {id}: the container is not running ({})", e.message()))
            }
            _ => grpc(format!("exec in {id}"), e),
        })?;

    let out = tokio::spawn(pump(stdout_rx, io.stdout.clone()));
    let err = stderr_rx.map(|rx| tokio::spawn(pump(rx, io.stderr.clone())));

    let delete = || async {
        let _ = c
            .tasks()
            .delete_process(c.req(DeleteProcessRequest { container_id: id.to_string(), exec_id: exec_id.clone() }))
            .await;
    };
    if let Err(e) =
        c.tasks().start(c.req(StartRequest { container_id: id.to_string(), exec_id: exec_id.clone() })).await
    {
        delete().await;
        out.abort();
        if let Some(e) = &err {
            e.abort();
        }
        return Err(RuntimeError::Container(format!(
            "exec {:?}: {}",
            cmd.first().cloned().unwrap_or_default(),
            e.message()
        )));
    }

    let mut side_tasks = Vec::new();
    if let (Some(mut tx), Some(mut input)) = (stdin_tx, io.stdin) {
        let (c2, id2, exec2) = (c.tasks(), id.to_string(), exec_id.clone());
        let req = c.req(CloseIoRequest { container_id: id2, exec_id: exec2, stdin: true });
        side_tasks.push(tokio::spawn(async move {
            while let Some(b) = input.recv().await {
                if tx.write_all(&b).await.is_err() {
                    break;
                }
            }
            drop(tx);
            let mut c2 = c2;
            let _ = c2.close_io(req).await;
        }));
    }
    if let (true, Some(mut resize)) = (tty, io.resize) {
        let mut tasks = c.tasks();
        let (cid, eid) = (id.to_string(), exec_id.clone());
        let mk = move |w: u16, h: u16| ResizePtyRequest {
            container_id: cid.clone(),
            exec_id: eid.clone(),
            width: w as u32,
            height: h as u32,
        };
        // Each resize is a new request carrying our namespace.
        let ns_req = c.req(()).metadata().clone();
        side_tasks.push(tokio::spawn(async move {
            while let Some((cols, rows)) = resize.recv().await {
                let mut r = tonic::Request::new(mk(cols, rows));
                *r.metadata_mut() = ns_req.clone();
                let _ = tasks.resize_pty(r).await;
            }
        }));
    }

    let waited = c
        .tasks()
        .wait(c.req(WaitRequest { container_id: id.to_string(), exec_id: exec_id.clone() }))
        .await
        .map_err(|e| grpc(format!("wait for exec in {id}"), e));
    // The shim closes the FIFOs once it copied everything; bounded so a
    // process that left children holding its stdout cannot hang us.
    let mut pumps = vec![out];
    pumps.extend(err);
    for mut p in pumps {
        if tokio::time::timeout(Duration::from_secs(5), &mut p).await.is_err() {
            p.abort();
        }
    }
    for t in side_tasks {
        t.abort();
    }
    delete().await;
    Ok(waited?.into_inner().exit_status as i32)
}
