//! The node protocol: what a node agent and a master's node gateway say to
//! each other over their one QUIC connection (mutual TLS; the agent's
//! certificate names it `system:node:<name>`).
//!
//! Every exchange is one bidirectional QUIC stream, so slow ones (a log
//! follow, an exec) never hold up heartbeats or status updates:
//!
//! - agent -> master: one [`NodeRequest`], answered by one [`NodeResponse`].
//!   `WatchPods` is answered by `Watching` and then a sequence of
//!   [`PodFrame`]s (rkyv archives: the pods inside are the store's own
//!   [`StoredObject`] archives, forwarded as they are); `WatchServices`
//!   likewise, with Services and Endpoints.
//! - master -> agent: one [`AgentRequest`] (logs, exec, port-forward),
//!   answered by one [`AgentResponse`] and then raw bytes (logs, a
//!   forwarded connection) or [`ExecFrame`]s (exec).
//! - master -> master: `NodeRequest::Relay` asks the master holding a
//!   node's connection to splice this stream onto a new stream to the
//!   agent, so the API server of any master reaches any node.
//!
//! Every message and frame is length-prefixed ([`write_frame`]), so a
//! stream stays open for what follows its first message.
//!
//! [`StoredObject`]: crate::k8s::stored::StoredObject

use rkyv::rancor;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request or response accepted (a Node status, a Secret).
pub const MAX_MESSAGE: usize = 8 << 20;
/// Largest request accepted on a connection without a node certificate.
pub const MAX_ANONYMOUS_MESSAGE: usize = 64 << 10;
/// Largest single pod frame (a reset listing of many pods).
pub const MAX_FRAME: usize = 256 << 20;

/// The identity in a node's client certificate.
pub const NODE_USER_PREFIX: &str = "system:node:";
pub const NODES_GROUP: &str = "system:nodes";
/// Usage a bootstrap token must carry to admit a node.
pub const NODE_TOKEN_USAGE: &str = "node";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// Anonymous: exchange a bootstrap token for a node certificate.
    Join { token: String, name: String, csr_pem: String },
    /// Create or refresh the agent's Node object (JSON of a Node: labels,
    /// status with capacity, allocatable, addresses, nodeInfo, conditions).
    Register { node: Vec<u8> },
    /// Renew the node's Lease; `status` (JSON NodeStatus) when it changed.
    Heartbeat { status: Option<Vec<u8>> },
    /// A pod's status as the agent observes it (JSON PodStatus). `uid`
    /// guards against writing onto a newer pod of the same name.
    PodStatus { namespace: String, name: String, uid: String, status: Vec<u8> },
    /// An object the node's pods need (`resource`): a Secret or ConfigMap
    /// ("secrets" | "configmaps") or PersistentVolumeClaim
    /// ("persistentvolumeclaims") one of them references, or a
    /// PersistentVolume ("persistentvolumes", empty `namespace`) bound to
    /// such a claim or pinned to the node.
    Get { resource: String, namespace: String, name: String },
    /// The node's pods: a full listing, then every change.
    WatchPods,
    /// Every Service and Endpoints of the cluster (what the agent's service
    /// proxy needs): answered like `WatchPods`, with frames whose event keys
    /// are `Service/<namespace>/<name>` and `Endpoints/<namespace>/<name>`.
    WatchServices,
    /// The pod (being deleted) has no running containers left: remove it.
    PodTerminated { namespace: String, name: String, uid: String },
    /// Resource usage of the node and its pods (served as metrics.k8s.io).
    Usage { usage: NodeUsage },
    /// From a master: join this stream to a new stream to `node`'s agent.
    Relay { node: String },
    /// A token for the ServiceAccount of one of the node's pods, bound to
    /// the pod (a projected `serviceAccountToken` volume). Answered with
    /// `Object` holding `{"token", "expirationTimestamp"}`.
    Token { namespace: String, pod: String, uid: String, audience: Option<String>, expiration_seconds: i64 },
    /// What happened to the node's pods (the kubelet's Events: Pulled,
    /// Started, Killing, Unhealthy, BackOff, ...), batched.
    Events { events: Vec<AgentEvent> },
}

/// One Event about a pod on the node, or one of its containers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// The container it is about (`involvedObject.fieldPath`
    /// `spec.containers{name}`), if any.
    pub container: Option<String>,
    /// `Warning` rather than `Normal`.
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeResponse {
    Joined {
        cert_pem: String,
        ca_pem: String,
    },
    Registered {
        pod_cidr: String,
    },
    Done,
    Object {
        json: Vec<u8>,
    },
    /// Pod frames follow on this stream.
    Watching,
    /// Refused or failed; `code` and `reason` as in a Kubernetes Status.
    Error {
        code: u16,
        reason: String,
        message: String,
    },
}

impl NodeResponse {
    pub fn error(code: u16, reason: &str, message: impl Into<String>) -> NodeResponse {
        NodeResponse::Error { code, reason: reason.to_string(), message: message.into() }
    }
}

/// CPU and memory in use, sampled at `timestamp` (RFC 3339) over `window_seconds`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeUsage {
    pub timestamp: String,
    pub window_seconds: u32,
    pub cpu_nanocores: u64,
    pub memory_bytes: u64,
    pub pods: Vec<PodUsage>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodUsage {
    pub namespace: String,
    pub name: String,
    /// (container name, CPU nanocores, memory working set bytes)
    pub containers: Vec<(String, u64, u64)>,
}

/// One change to the node's pods, or (with `reset`) all of them.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct PodFrame {
    /// `events` lists every pod bound to the node now (all puts): the agent
    /// forgets any pod not in it.
    pub reset: bool,
    pub events: Vec<PodEvent>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct PodEvent {
    /// `namespace/name`.
    pub key: String,
    pub delete: bool,
    /// The pod's store revision (its resourceVersion); 0 for a delete.
    pub mod_revision: i64,
    /// The pod as the store holds it (a `StoredObject` archive); empty for a delete.
    pub object: Vec<u8>,
}

impl PodFrame {
    pub fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rancor::Error>(self).map(|b| b.into_vec()).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<PodFrame, WireError> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<PodFrame, rancor::Error>(&aligned).map_err(|e| WireError::Decode(e.to_string()))
    }
}

/// Master -> agent requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentRequest {
    Logs(LogRequest),
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

/// `kubectl port-forward`: one TCP connection to `port` on the pod's
/// loopback (inside its network namespace, as the kubelet connects). After
/// `Streaming` the stream carries the connection's raw bytes both ways;
/// finishing a direction half-closes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PortForwardRequest {
    pub namespace: String,
    pub pod: String,
    pub port: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogRequest {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub since_seconds: Option<u64>,
    pub limit_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub command: Vec<String>,
    pub stdin: bool,
    pub tty: bool,
}

/// `kubectl attach`: the container's main process. Output is what it
/// writes from now on; stdin and resizes travel as in an exec
/// ([`ExecFrame`]s), and the last frame is `Exit(0)` when the container
/// stops (Kubernetes reports success for an attach that ran its course).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl AttachRequest {
    /// Why this attach cannot be served, given whether the container was
    /// made with stdin (None: it can).
    pub fn refusal(&self, has_stdin: bool) -> Option<String> {
        if !self.stdin && !self.stdout && !self.stderr {
            return Some("you must specify at least one of stdin, stdout, stderr".into());
        }
        if self.stdin && !has_stdin {
            return Some(format!(
                "container {} in pod {} was not created with stdin: true; there is no stdin to attach to",
                self.container, self.pod
            ));
        }
        None
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentResponse {
    /// The stream carries the output now.
    Streaming,
    Error {
        code: u16,
        reason: String,
        message: String,
    },
}

/// Exec traffic in both directions after `Streaming` (length-prefixed postcard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExecFrame {
    Stdin(Vec<u8>),
    StdinClosed,
    Resize {
        cols: u16,
        rows: u16,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended with this exit code (last frame).
    Exit(i32),
    /// The exec failed (last frame).
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("message of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed message: {0}")]
    Decode(String),
}

/// Reads one length-prefixed postcard message of at most `max` bytes.
pub async fn read_message<T: for<'de> Deserialize<'de>, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<T, WireError> {
    let buf = read_frame(r, max).await?.ok_or_else(|| WireError::Decode("the stream ended before a message".into()))?;
    postcard::from_bytes(&buf).map_err(|e| WireError::Decode(e.to_string()))
}

/// Writes one length-prefixed postcard message.
pub async fn write_message<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, v: &T) -> Result<(), WireError> {
    write_frame(w, &encode_message(v)).await
}

/// Encodes a postcard message.
pub fn encode_message<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain types into a Vec cannot fail.
    postcard::to_stdvec(v).unwrap_or_default()
}

/// Writes one length-prefixed frame (u32 big-endian length, then the bytes).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), WireError> {
    let len =
        u32::try_from(bytes.len()).map_err(|_| WireError::TooLarge { size: bytes.len(), max: u32::MAX as usize })?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(bytes).await?;
    Ok(())
}

/// Reads one length-prefixed frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(WireError::TooLarge { size: len, max });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_needs_a_stream_and_stdin_needs_a_container_with_stdin() {
        let req = |stdin: bool, out: bool| AttachRequest {
            namespace: "ns".into(),
            pod: "p".into(),
            container: "c".into(),
            stdin,
            stdout: out,
            stderr: out,
            tty: stdin,
        };
        assert!(req(false, false).refusal(true).unwrap().contains("at least one"));
        assert_eq!(req(false, true).refusal(false), None, "output alone attaches to anything");
        assert!(req(true, true).refusal(false).unwrap().contains("not created with stdin"));
        assert_eq!(req(true, true).refusal(true), None);
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let frame = PodFrame {
            reset: true,
            events: vec![PodEvent { key: "ns/p".into(), delete: false, mod_revision: 7, object: vec![1, 2, 3] }],
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame.encode()).await.unwrap();
        write_frame(&mut buf, b"").await.unwrap();
        let mut r = &buf[..];
        let got = read_frame(&mut r, MAX_FRAME).await.unwrap().unwrap();
        assert_eq!(PodFrame::decode(&got).unwrap(), frame);
        assert_eq!(read_frame(&mut r, MAX_FRAME).await.unwrap(), Some(vec![]));
        assert_eq!(read_frame(&mut r, MAX_FRAME).await.unwrap(), None);
        // A length over the limit is refused before anything is allocated.
        let mut r = &[0xff, 0xff, 0xff, 0xff][..];
        assert!(matches!(read_frame(&mut r, 1024).await, Err(WireError::TooLarge { .. })));
        // A truncated frame is an error, not a clean end.
        let mut r = &[0, 0, 0, 9, 1][..];
        assert!(read_frame(&mut r, 1024).await.is_err());
        assert!(PodFrame::decode(b"garbage").is_err());
    }

    #[tokio::test]
    async fn messages_round_trip_and_oversized_ones_are_refused() {
        let req =
            NodeRequest::PodStatus { namespace: "a".into(), name: "b".into(), uid: "u".into(), status: b"{}".to_vec() };
        let mut bytes = Vec::new();
        write_message(&mut bytes, &req).await.unwrap();
        let got: NodeRequest = read_message(&mut &bytes[..], MAX_MESSAGE).await.unwrap();
        assert_eq!(got, req);
        assert!(matches!(read_message::<NodeRequest, _>(&mut &bytes[..], 3).await, Err(WireError::TooLarge { .. })));
        let garbage = [0, 0, 0, 2, 0xff, 0xff];
        assert!(matches!(read_message::<NodeRequest, _>(&mut &garbage[..], 100).await, Err(WireError::Decode(_))));
        assert!(matches!(read_message::<NodeRequest, _>(&mut &[][..], 100).await, Err(WireError::Decode(_))));
    }
}
