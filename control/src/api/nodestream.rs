//! `pods/log`, `pods/exec` and `pods/attach`: the API server's half of
//! streams served by the pod's node agent. The gateway gives a QUIC stream
//! to the agent (direct, or relayed by the master holding the agent's
//! connection); logs come back as a chunked `text/plain` body, exec and
//! attach are bridged between the client's WebSocket (Kubernetes'
//! `v5.channel.k8s.io` / `v4`) and the agent's `ExecFrame`s.
//!
//! Channel protocol (first byte of each binary WebSocket message): 0 stdin,
//! 1 stdout, 2 stderr, 3 error/status (a `Status` JSON, sent once at the
//! end), 4 resize (`{"Width":w,"Height":h}`), 255 close (v5: `[255, 0]`
//! closes stdin).

use capstan_proto::nodewire::{
    read_message, write_message, AgentRequest, AgentResponse, AttachRequest, ExecFrame, ExecRequest, LogRequest,
    MAX_MESSAGE,
};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

use super::status::ApiError;
use super::{ApiServer, Ctx, Reply, ReplyBody};

pub const V5: &str = "v5.channel.k8s.io";
pub const V4: &str = "v4.channel.k8s.io";

/// A client's request to switch protocols: to a WebSocket, or (older
/// clients' streaming) to SPDY/3.1.
pub struct WsUpgrade {
    pub(super) on: hyper::upgrade::OnUpgrade,
    pub(super) key: String,
    /// Sec-WebSocket-Protocol, or for SPDY the X-Stream-Protocol-Version
    /// values, comma-separated.
    pub(super) protocols: String,
    pub(super) spdy: bool,
}

impl std::fmt::Debug for WsUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsUpgrade").field("protocols", &self.protocols).finish()
    }
}

impl WsUpgrade {
    /// Takes the upgrade out of a request that asks for a WebSocket or
    /// for SPDY/3.1.
    pub fn take(parts: &mut http::request::Parts) -> Option<WsUpgrade> {
        let h = &parts.headers;
        let upgrade = h.get(http::header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let spdy = upgrade.eq_ignore_ascii_case("SPDY/3.1");
        if !spdy && !upgrade.eq_ignore_ascii_case("websocket") {
            return None;
        }
        let text = |n: http::header::HeaderName| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let key = text(http::header::SEC_WEBSOCKET_KEY);
        let protocols = if spdy {
            let all = h.get_all("x-stream-protocol-version").iter().filter_map(|v| v.to_str().ok());
            all.collect::<Vec<_>>().join(",")
        } else {
            text(http::header::SEC_WEBSOCKET_PROTOCOL)
        };
        let on = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
        Some(WsUpgrade { on, key, protocols, spdy })
    }
}

/// The channel protocol to speak, from the client's offer (v5 preferred).
pub fn choose_protocol(offer: &str) -> Option<&'static str> {
    let offered: Vec<&str> = offer.split(',').map(str::trim).collect();
    [V5, V4].into_iter().find(|p| offered.contains(p))
}

fn agent_error(code: u16, reason: &str, message: String) -> ApiError {
    let reason = match (code, reason) {
        (404, _) => "NotFound",
        (400, _) => "BadRequest",
        (503, _) => "ServiceUnavailable",
        _ => "InternalError",
    };
    ApiError::new(code, reason, message)
}

/// What a stream is for: a container of a pod on a node, and the
/// subresource (`log`, `exec` or `attach`).
pub struct Target<'a> {
    pub node: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub container: &'a str,
    /// The container's spec in the pod.
    pub spec: &'a Value,
    pub sub: &'a str,
}

pub async fn serve(api: &ApiServer, target: Target<'_>, ctx: Ctx) -> Result<Reply, ApiError> {
    let Target { node, namespace: ns, pod, container, spec: container_spec, sub } = target;
    let gateway = api.gateway.get().ok_or_else(|| ApiError::unavailable("the node gateway is starting"))?;
    let q = &ctx.query;
    if sub == "log" {
        let num = |k: &str| -> Result<Option<u64>, ApiError> {
            q.get(k)
                .map(|v| v.parse::<u64>().map_err(|_| ApiError::bad_request(format!("{k}: {v:?} is not a number"))))
                .transpose()
        };
        let req = LogRequest {
            namespace: ns.into(),
            pod: pod.into(),
            container: container.into(),
            follow: q.flag("follow"),
            previous: q.flag("previous"),
            timestamps: q.flag("timestamps"),
            tail_lines: num("tailLines")?,
            since_seconds: num("sinceSeconds")?,
            limit_bytes: num("limitBytes")?,
        };
        return logs(gateway, node, req).await;
    }
    let (namespace, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
    let (request, command) = if sub == "attach" {
        // kubectl sends stdout=true (and stderr=true unless a terminal merges them).
        let req = AttachRequest {
            namespace,
            pod,
            container,
            stdin: q.flag("stdin"),
            stdout: q.flag("stdout"),
            stderr: q.flag("stderr"),
            tty: q.flag("tty"),
        };
        // Refused here too, not only by the agent: kubectl retries a failed
        // WebSocket attach over SPDY, and the reason must survive that.
        if let Some(why) = req.refusal(container_spec["stdin"].as_bool() == Some(true)) {
            return Err(ApiError::bad_request(why));
        }
        (AgentRequest::Attach(req), None)
    } else {
        let req = ExecRequest {
            namespace,
            pod,
            container,
            command: q.all("command"),
            stdin: q.flag("stdin"),
            tty: q.flag("tty"),
        };
        if req.command.is_empty() {
            return Err(ApiError::bad_request("you must specify at least 1 command"));
        }
        let command = req.command.clone();
        (AgentRequest::Exec(req), Some(command))
    };
    let upgrade = ctx.upgrade.filter(|u| !u.spdy).ok_or_else(|| {
        // kubectl falls back to SPDY when its WebSocket request fails, and
        // then shows only this answer: say where the real reason is.
        ApiError::bad_request(format!(
            "{sub} needs a WebSocket upgrade (Upgrade: websocket, {V5}); SPDY is not served. A client that fell \
             back to SPDY had its WebSocket request refused first: that answer says why (kubectl -v=6 shows it)"
        ))
    })?;
    let protocol = choose_protocol(&upgrade.protocols)
        .ok_or_else(|| ApiError::bad_request(format!("no supported {sub} protocol offered (want {V5} or {V4})")))?;
    // Reach the agent before switching protocols, so failures are plain HTTP errors.
    let (mut send, mut recv) = gateway.open_agent_stream(node).await?;
    write_message(&mut send, &request).await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    match read_message::<AgentResponse, _>(&mut recv, MAX_MESSAGE).await {
        Ok(AgentResponse::Streaming) => {}
        Ok(AgentResponse::Error { code, reason, message }) => return Err(agent_error(code, &reason, message)),
        Err(e) => return Err(ApiError::unavailable(format!("node agent: {e}"))),
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(upgrade.key.as_bytes());
    let v5 = protocol == V5;
    tokio::spawn(async move {
        match upgrade.on.await {
            Ok(io) => bridge(hyper_util::rt::TokioIo::new(io), send, recv, v5, command).await,
            Err(e) => tracing::debug!(error = %e, "exec upgrade failed"),
        }
    });
    Ok(Reply {
        code: http::StatusCode::SWITCHING_PROTOCOLS,
        body: ReplyBody::Switching(accept, protocol),
        warnings: vec![],
    })
}

async fn logs(gateway: &crate::gateway::Gateway, node: &str, req: LogRequest) -> Result<Reply, ApiError> {
    let (mut send, mut recv) = gateway.open_agent_stream(node).await?;
    write_message(&mut send, &AgentRequest::Logs(req)).await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    let _ = send.finish();
    match read_message::<AgentResponse, _>(&mut recv, MAX_MESSAGE).await {
        Ok(AgentResponse::Streaming) => {}
        Ok(AgentResponse::Error { code, reason, message }) => return Err(agent_error(code, &reason, message)),
        Err(e) => return Err(ApiError::unavailable(format!("node agent: {e}"))),
    }
    let chunks = futures::stream::unfold(recv, |mut r| async move {
        match r.read_chunk(64 << 10, true).await {
            Ok(Some(c)) => Some((Ok::<_, std::io::Error>(c.bytes), r)),
            _ => None,
        }
    });
    Ok(Reply {
        code: http::StatusCode::OK,
        body: ReplyBody::Stream(axum::body::Body::from_stream(chunks), "text/plain"),
        warnings: vec![],
    })
}

/// The final status message of an exec (channel 3).
pub fn exit_status(frame: &ExecFrame, command: &[String]) -> Value {
    match frame {
        ExecFrame::Exit(0) => json!({"metadata": {}, "status": "Success"}),
        ExecFrame::Exit(code) => json!({
            "metadata": {}, "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        ExecFrame::Failed(m) => json!({"metadata": {}, "status": "Failure", "message": m, "reason": "InternalError"}),
        _ => json!({"metadata": {}, "status": "Failure", "message": "the exec ended without a status"}),
    }
}

/// A client message, translated for the agent (None: nothing to send).
pub fn from_client(msg: &[u8], v5: bool) -> Option<ExecFrame> {
    let (&channel, data) = msg.split_first()?;
    match channel {
        0 => Some(ExecFrame::Stdin(data.to_vec())),
        4 => {
            let v: Value = serde_json::from_slice(data).ok()?;
            let dim = |k: &str| v[k].as_u64().and_then(|n| u16::try_from(n).ok());
            Some(ExecFrame::Resize { cols: dim("Width")?, rows: dim("Height")? })
        }
        255 if v5 && data.first() == Some(&0) => Some(ExecFrame::StdinClosed),
        _ => None,
    }
}

/// How long after the switch to WebSocket the first output waits.
/// client-go's WebSocket executor (kubectl 1.30-1.32) starts reading the
/// connection before it has registered its streams, and drops messages for
/// streams it does not know yet ("Unknown stream id 1, discarding
/// message"): a command that answers within a millisecond of the switch
/// (a hollow node's, a fast `echo`) lost its output and its exit status,
/// and kubectl reported success with no output. Kubernetes' own path is
/// slow enough (apiserver -> kubelet SPDY -> runtime) to hide the race;
/// ours is not, so the first message waits a moment.
const FIRST_OUTPUT_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Bridges the client's WebSocket and the agent's stream. `command` is the
/// exec's (None for an attach).
async fn bridge<S>(
    io: S,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    v5: bool,
    command: Option<Vec<String>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let first_output = tokio::time::Instant::now() + FIRST_OUTPUT_DELAY;
    let (mut sink, mut stream) = ws.split();
    let client = async {
        while let Some(Ok(msg)) = stream.next().await {
            let data = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            if let Some(frame) = from_client(&data, v5) {
                if write_message(&mut send, &frame).await.is_err() {
                    break;
                }
            }
        }
        let _ = write_message(&mut send, &ExecFrame::StdinClosed).await;
    };
    let agent = async {
        loop {
            let frame = match read_message::<ExecFrame, _>(&mut recv, MAX_MESSAGE).await {
                Ok(f) => f,
                Err(e) => ExecFrame::Failed(format!("node agent: {e}")),
            };
            tokio::time::sleep_until(first_output).await;
            let (channel, data) = match &frame {
                ExecFrame::Stdout(b) => (1u8, b.clone()),
                ExecFrame::Stderr(b) => (2u8, b.clone()),
                ExecFrame::Exit(_) | ExecFrame::Failed(_) => {
                    let status = serde_json::to_vec(&exit_status(&frame, command.as_deref().unwrap_or_default()))
                        .unwrap_or_default();
                    let mut m = vec![3u8];
                    m.extend(status);
                    let _ = sink.send(Message::Binary(m.into())).await;
                    // A normal closure (1000) is how clients learn the streams ended.
                    let close = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                        reason: "".into(),
                    };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    return;
                }
                _ => continue,
            };
            let mut m = Vec::with_capacity(data.len() + 1);
            m.push(channel);
            m.extend(data);
            if let Err(e) = sink.send(Message::Binary(m.into())).await {
                tracing::debug!(error = %e, "exec client gone");
                return;
            }
        }
    };
    // The agent's end decides when an exec is over: once the status is
    // sent. An attach is also over when the client leaves (detaches); the
    // container goes on, and ending our side tells the agent.
    let attach = command.is_none();
    tokio::select! {
        _ = agent => {}
        _ = async { client.await; if !attach { std::future::pending::<()>().await } } => {}
    }
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_and_channel_messages_follow_kubernetes() {
        assert_eq!(choose_protocol("v4.channel.k8s.io, v5.channel.k8s.io"), Some(V5));
        assert_eq!(choose_protocol("v4.channel.k8s.io"), Some(V4));
        assert_eq!(choose_protocol("channel.k8s.io"), None);
        assert_eq!(from_client(&[0, b'h', b'i'], true), Some(ExecFrame::Stdin(b"hi".to_vec())));
        assert_eq!(
            from_client(
                br#"{"Width":80,"Height":24}"#
                    .iter()
                    .fold(vec![4u8], |mut v, b| {
                        v.push(*b);
                        v
                    })
                    .as_slice(),
                true
            ),
            Some(ExecFrame::Resize { cols: 80, rows: 24 })
        );
        assert_eq!(from_client(&[255, 0], true), Some(ExecFrame::StdinClosed));
        assert_eq!(from_client(&[255, 0], false), None, "v4 has no close signal");
        assert_eq!(from_client(&[], true), None);
        assert_eq!(from_client(&[4, b'x'], true), None);
        let cmd = ["sh".to_string(), "-c".into(), "exit 3".into()];
        assert_eq!(exit_status(&ExecFrame::Exit(0), &cmd)["status"], "Success");
        let failed = exit_status(&ExecFrame::Exit(3), &cmd);
        assert!(failed["message"].as_str().unwrap().contains("[sh -c exit 3], exit code 3"), "{failed}");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
    }
}
