//! Streams the masters open to the agent: `kubectl logs` (read from the
//! container's CRI log files, followed while it runs), `kubectl exec`
//! (through the runtime, stdin/stdout/stderr/resize as `ExecFrame`s) and
//! `kubectl attach` (output followed from the log as it is written, input
//! through the runtime).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capstan_proto::nodewire::{
    read_message, write_frame, write_message, AgentRequest, AgentResponse, AttachRequest, ExecFrame, ExecRequest,
    LogRequest, PortForwardRequest, MAX_MESSAGE,
};
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::logdriver::Stream;
use crate::podlogs::{self, ReadOptions};
use crate::pods::PodSpec;
use crate::runtime::{AttachInput, ContainerState, ContainerStatus, ExecIo, Runtime};

fn refuse(code: u16, reason: &str, message: String) -> AgentResponse {
    AgentResponse::Error { code, reason: reason.into(), message }
}

impl<R: Runtime> Agent<R> {
    /// Serves the streams masters open, on every connection the agent makes.
    pub(crate) async fn serve_masters(self: Arc<Self>) {
        let mut conns = self.masters.connections();
        loop {
            let conn = conns.borrow_and_update().clone();
            if let Some(conn) = conn {
                let me = self.clone();
                tokio::spawn(async move {
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(me.clone().stream(send, recv));
                    }
                });
            }
            if conns.changed().await.is_err() {
                return;
            }
        }
    }

    async fn stream(self: Arc<Self>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let result = match read_message::<AgentRequest, _>(&mut recv, MAX_MESSAGE).await {
            Ok(AgentRequest::Logs(l)) => self.logs(l, &mut send).await,
            Ok(AgentRequest::Exec(e)) => self.exec(e, &mut send, recv).await,
            Ok(AgentRequest::Attach(a)) => self.attach(a, &mut send, recv).await,
            Ok(AgentRequest::PortForward(p)) => self.port_forward(p, &mut send, recv).await,
            Err(e) => write_message(&mut send, &refuse(400, "BadRequest", e.to_string())).await.map_err(Into::into),
        };
        if let Err(e) = result {
            tracing::debug!(error = %format!("{e:#}"), "master stream ended");
        }
        let _ = send.finish();
    }

    /// One forwarded connection: to `port` on the pod's loopback, then
    /// bytes both ways until both directions are closed.
    async fn port_forward(
        &self,
        req: PortForwardRequest,
        send: &mut quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> anyhow::Result<()> {
        let Some(spec) = self.pod(&req.namespace, &req.pod) else {
            let msg = format!("pod {}/{} is not running on this node", req.namespace, req.pod);
            return Ok(write_message(send, &refuse(404, "NotFound", msg)).await?);
        };
        if !self.rt.has_pod_network() {
            let msg = format!("pod {} runs on a hollow node: it has no ports to forward to", req.pod);
            return Ok(write_message(send, &refuse(400, "BadRequest", msg)).await?);
        }
        let sandbox =
            self.observe(true).await.ok().and_then(|o| o.sandboxes.iter().find(|s| s.pod_uid == spec.uid).cloned());
        let Some(sandbox) = sandbox else {
            let msg = format!("pod {} has no sandbox yet", req.pod);
            return Ok(write_message(send, &refuse(400, "BadRequest", msg)).await?);
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], req.port));
        let timeout = Duration::from_secs(5);
        let connected = match sandbox.netns.clone() {
            Some(ns) => tokio::task::spawn_blocking(move || crate::netns::connect_in(&ns, addr, timeout))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))),
            // hostNetwork: the pod's loopback is the node's.
            None => tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
                .and_then(|s| s.into_std()),
        };
        let conn = match connected.and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(s)
        }) {
            Ok(c) => c,
            Err(e) => {
                // The kubelet's wording, which kubectl prints.
                let msg = format!(
                    "error forwarding port {} to pod {}, uid {}: failed to connect to localhost:{} inside namespace: {e}",
                    req.port, req.pod, spec.uid, req.port
                );
                return Ok(write_message(send, &refuse(500, "InternalError", msg)).await?);
            }
        };
        write_message(send, &AgentResponse::Streaming).await?;
        let (mut from_pod, mut to_pod) = conn.into_split();
        let upstream = async {
            let _ = tokio::io::copy(&mut recv, &mut to_pod).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_pod).await;
        };
        // The pod closing its side ends ours at once (the client may keep
        // its side open until it hears that, as HTTP/1.0 clients do).
        let downstream = async {
            let _ = tokio::io::copy(&mut from_pod, send).await;
            let _ = send.finish();
        };
        tokio::join!(upstream, downstream);
        Ok(())
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<Arc<PodSpec>> {
        let uid = self.keys.lock().get(&format!("{namespace}/{name}")).cloned()?;
        let spec = self.workers.lock().get(&uid)?.borrow().clone();
        spec
    }

    /// Attempts of a container of the pod, newest first.
    async fn attempts(&self, spec: &PodSpec, container: &str) -> Vec<ContainerStatus> {
        let Ok(obs) = self.observe(true).await else { return vec![] };
        let mut v: Vec<ContainerStatus> =
            obs.containers.iter().filter(|c| c.pod_uid == spec.uid && c.name == container).cloned().collect();
        v.sort_by_key(|c| std::cmp::Reverse(c.attempt));
        v
    }

    /// The running attempt of a container of the pod, if any.
    pub(crate) async fn running_attempt(&self, spec: &PodSpec, container: &str) -> Option<ContainerStatus> {
        self.attempts(spec, container).await.into_iter().find(|c| matches!(c.state, ContainerState::Running { .. }))
    }

    async fn logs(&self, req: LogRequest, send: &mut quinn::SendStream) -> anyhow::Result<()> {
        let Some(spec) = self.pod(&req.namespace, &req.pod) else {
            let msg = format!("pod {}/{} is not running on this node", req.namespace, req.pod);
            return Ok(write_message(send, &refuse(404, "NotFound", msg)).await?);
        };
        let attempts = self.attempts(&spec, &req.container).await;
        let chosen = if req.previous { attempts.get(1) } else { attempts.first() };
        let Some(c) = chosen else {
            let msg = if req.previous {
                format!("previous terminated container \"{}\" in pod \"{}\" not found", req.container, req.pod)
            } else {
                format!("container \"{}\" in pod \"{}\" is waiting to start", req.container, req.pod)
            };
            return Ok(write_message(send, &refuse(400, "BadRequest", msg)).await?);
        };
        let path = self.log_path(&spec, &req.container, c.attempt);
        let opts = ReadOptions {
            tail: req.tail_lines.map(|t| t as usize),
            since: req.since_seconds.map(|s| std::time::SystemTime::now() - Duration::from_secs(s)),
            timestamps: req.timestamps,
            limit_bytes: req.limit_bytes.map(|l| l as usize),
        };
        write_message(send, &AgentResponse::Streaming).await?;
        let running = matches!(c.state, ContainerState::Running { .. } | ContainerState::Created);
        if !req.follow || !running {
            let files = crate::logdriver::log_files(&path).unwrap_or_default();
            let out = podlogs::read_logs(&files, &opts)?;
            send.write_all(&out).await?;
            return Ok(());
        }
        // Follow until the client goes away or the container stops.
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        let follow = tokio::spawn(podlogs::follow(path, opts, Duration::from_millis(100), tx));
        let id = c.id.clone();
        let mut check = tokio::time::interval(Duration::from_secs(1));
        let mut stopped_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(b) => send.write_all(&b).await?,
                    None => break,
                },
                _ = check.tick() => {
                    if let Some(at) = stopped_at {
                        // Give the log driver a moment to flush the last lines.
                        if at.elapsed() > Duration::from_millis(1500) {
                            break;
                        }
                    } else if !self.is_running(&id).await {
                        stopped_at = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
        follow.abort();
        Ok(())
    }

    /// The pod and the running attempt of its container, or the refusal.
    async fn running(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<(Arc<PodSpec>, ContainerStatus), AgentResponse> {
        let Some(spec) = self.pod(namespace, pod) else {
            return Err(refuse(404, "NotFound", format!("pod {namespace}/{pod} is not running on this node")));
        };
        match self.running_attempt(&spec, container).await {
            Some(c) => Ok((spec, c)),
            None => Err(refuse(400, "BadRequest", format!("container {container} is not running in pod {pod}"))),
        }
    }

    async fn is_running(&self, id: &str) -> bool {
        match self.observe(false).await {
            Ok(o) => o.containers.iter().any(|c| c.id == id && matches!(c.state, ContainerState::Running { .. })),
            Err(_) => true,
        }
    }

    async fn exec(
        &self,
        req: ExecRequest,
        send: &mut quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> anyhow::Result<()> {
        let c = match self.running(&req.namespace, &req.pod, &req.container).await {
            Ok((_, c)) => c,
            Err(refusal) => return Ok(write_message(send, &refusal).await?),
        };
        if req.command.is_empty() {
            return Ok(write_message(send, &refuse(400, "BadRequest", "no command given".into())).await?);
        }
        write_message(send, &AgentResponse::Streaming).await?;
        let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
        let (resize_tx, resize_rx) = mpsc::channel::<(u16, u16)>(4);
        let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(64);
        let (err_tx, mut err_rx) = mpsc::channel::<Bytes>(64);
        let io = ExecIo {
            stdin: req.stdin.then_some(stdin_rx),
            stdout: out_tx,
            stderr: err_tx,
            resize: req.tty.then_some(resize_rx),
        };
        let input = tokio::spawn(forward_input(recv, stdin_tx, resize_tx));
        let rt = self.rt.clone();
        let (id, cmd, tty) = (c.id.clone(), req.command.clone(), req.tty);
        let run = tokio::spawn(async move { rt.exec(&id, &cmd, tty, io).await });
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            let frame = tokio::select! {
                b = out_rx.recv(), if out_open => match b { Some(b) => ExecFrame::Stdout(b.to_vec()), None => { out_open = false; continue } },
                b = err_rx.recv(), if err_open => match b { Some(b) => ExecFrame::Stderr(b.to_vec()), None => { err_open = false; continue } },
            };
            write_frame(send, &capstan_proto::nodewire::encode_message(&frame)).await?;
        }
        let last = match run.await {
            Ok(Ok(code)) => ExecFrame::Exit(code),
            Ok(Err(e)) => ExecFrame::Failed(e.to_string()),
            Err(e) => ExecFrame::Failed(e.to_string()),
        };
        input.abort();
        write_message(send, &last).await?;
        Ok(())
    }

    async fn attach(
        &self,
        req: AttachRequest,
        send: &mut quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> anyhow::Result<()> {
        let (spec, c) = match self.running(&req.namespace, &req.pod, &req.container).await {
            Ok(found) => found,
            Err(refusal) => return Ok(write_message(send, &refusal).await?),
        };
        let made = spec.all().find(|c| c.name == req.container).map(|c| &c.raw);
        let flag = |k: &str| made.is_some_and(|c| c[k].as_bool() == Some(true));
        let (has_tty, stdin_once) = (flag("tty"), flag("stdinOnce"));
        if let Some(why) = req.refusal(flag("stdin")) {
            return Ok(write_message(send, &refuse(400, "BadRequest", why)).await?);
        }
        write_message(send, &AgentResponse::Streaming).await?;

        let tty = req.tty && has_tty;
        let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
        let (resize_tx, resize_rx) = mpsc::channel::<(u16, u16)>(4);
        let input = AttachInput {
            stdin: req.stdin.then_some(stdin_rx),
            resize: tty.then_some(resize_rx),
            close_stdin: req.stdin && stdin_once,
        };
        let mut client = tokio::spawn(forward_input(recv, stdin_tx, resize_tx));
        let rt = self.rt.clone();
        let id = c.id.clone();
        let mut feed = tokio::spawn(async move { rt.attach(&id, input).await });
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let path = self.log_path(&spec, &req.container, c.attempt);
        let output = tokio::spawn(podlogs::follow_pieces(path, Duration::from_millis(50), out_tx));

        let mut check = tokio::time::interval(Duration::from_secs(1));
        let (mut stopped_at, mut feeding) = (None::<tokio::time::Instant>, true);
        let last = loop {
            tokio::select! {
                piece = out_rx.recv() => match piece {
                    Some((stream, bytes)) => {
                        let frame = match stream {
                            Stream::Stdout if req.stdout => ExecFrame::Stdout(bytes),
                            Stream::Stderr if req.stderr => ExecFrame::Stderr(bytes),
                            _ => continue,
                        };
                        write_frame(send, &capstan_proto::nodewire::encode_message(&frame)).await?;
                    }
                    None => break ExecFrame::Exit(0),
                },
                fed = &mut feed, if feeding => {
                    feeding = false;
                    match fed {
                        Ok(Err(e)) => break ExecFrame::Failed(e.to_string()),
                        Err(e) => break ExecFrame::Failed(e.to_string()),
                        Ok(Ok(())) => {}
                    }
                }
                // The client detached (the master ends its side then).
                _ = &mut client => break ExecFrame::Exit(0),
                _ = check.tick() => {
                    if let Some(at) = stopped_at {
                        // Give the log driver a moment to flush the last output.
                        if at.elapsed() > Duration::from_millis(1500) {
                            break ExecFrame::Exit(0);
                        }
                    } else if !self.is_running(&c.id).await {
                        stopped_at = Some(tokio::time::Instant::now());
                    }
                }
            }
        };
        output.abort();
        // Without the client task the input channels close, and `feed` ends
        // on its own (closing a stdinOnce stdin first).
        client.abort();
        write_message(send, &last).await?;
        Ok(())
    }
}

/// Client -> process: stdin and resizes until the client's side ends
/// (stdin alone ends at `StdinClosed`).
async fn forward_input(
    mut recv: quinn::RecvStream,
    stdin_tx: mpsc::Sender<Bytes>,
    resize_tx: mpsc::Sender<(u16, u16)>,
) {
    let mut stdin = Some(stdin_tx);
    while let Ok(frame) = read_message::<ExecFrame, _>(&mut recv, MAX_MESSAGE).await {
        match frame {
            ExecFrame::Stdin(b) => {
                if let Some(tx) = &stdin {
                    let _ = tx.send(Bytes::from(b)).await;
                }
            }
            ExecFrame::StdinClosed => stdin = None,
            ExecFrame::Resize { cols, rows } => {
                let _ = resize_tx.send((cols, rows)).await;
            }
            _ => {}
        }
    }
}
