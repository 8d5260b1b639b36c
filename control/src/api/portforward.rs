//! `pods/portforward`: `kubectl port-forward`.
//!
//! kubectl 1.31+ opens a WebSocket with the subprotocol
//! `SPDY/3.1+portforward.k8s.io` and speaks SPDY inside it (`spdy.rs`).
//! For every local connection it opens two SPDY streams with headers
//! `streamtype: error|data`, `port: <n>`, `requestid: <id>`; the server
//! answers each SYN_STREAM with a SYN_REPLY and, once both of a request
//! are there, asks the pod's node agent for one TCP connection to that
//! port on the pod's loopback (`AgentRequest::PortForward` over the node
//! gateway, like exec). Bytes then flow between the data stream and the
//! agent's QUIC stream; a FIN either way half-closes the other side. When
//! the pod side is done the server ends the data stream, then the error
//! stream (kubectl waits for both); a connection that cannot be made is
//! reported as text on the error stream, which kubectl prints.
//!
//! Clients that upgrade the HTTP connection to SPDY/3.1 itself
//! (`X-Stream-Protocol-Version: portforward.k8s.io`: kubectl before 1.31,
//! or with `KUBECTL_PORT_FORWARD_WEBSOCKETS=false`, and client-go's SPDY
//! dialer in other tools) get the same session on the raw connection.
//! Kubernetes' WebSocket-only port-forward protocol
//! (`v4.portforward.k8s.io`, channels per port) is not served.
//!
//! [`session`] is independent of where connections lead (a [`Dial`]), so
//! it is tested against plain TCP below; [`serve`] is the wiring.

use std::collections::HashMap;
use std::sync::Arc;

use capstan_proto::nodewire::{
    read_message, write_message, AgentRequest, AgentResponse, PortForwardRequest, MAX_MESSAGE,
};
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

use super::spdy::{self, Codec, Frame};
use super::status::ApiError;
use super::{ApiServer, Ctx, Reply, ReplyBody};

/// The WebSocket subprotocol kubectl tunnels SPDY in.
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// The stream protocol of a plain SPDY upgrade (X-Stream-Protocol-Version).
pub const SPDY_PROTOCOL: &str = "portforward.k8s.io";
/// Bytes per DATA frame sent to the client.
const CHUNK: usize = 32 << 10;
/// Requests whose second stream has not come yet. kubectl opens both
/// streams of a request back to back; a client that keeps opening halves
/// is refused past this instead of growing the session without bound.
const MAX_UNPAIRED: usize = 256;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;
/// Opens one connection to a port of the pod; Err is the message kubectl
/// shows.
pub type Dial = Arc<dyn Fn(u16) -> BoxFuture<'static, Result<(Reader, Writer), String>> + Send + Sync>;

/// Streams of one request id seen so far.
#[derive(Default)]
struct Pair {
    error: Option<u32>,
    data: Option<(u32, mpsc::Receiver<Vec<u8>>)>,
    port: u16,
}

/// Serves the SPDY port-forward protocol on `reader`/`writer` until the
/// client goes away, opening connections with `dial`.
pub async fn session<R, W>(mut reader: R, mut writer: W, dial: Dial)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, mut queue) = mpsc::channel::<Frame>(256);
    // One writer: frames go out in the order their header blocks were
    // compressed (the compression stream spans the connection).
    let writing = tokio::spawn(async move {
        let mut codec = Codec::default();
        while let Some(frame) = queue.recv().await {
            let bytes = match codec.encode(&frame) {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(error = %e, "port-forward frame not encoded");
                    break;
                }
            };
            if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut codec = Codec::default();
    let mut buf = Vec::with_capacity(64 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut to_pod: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut forwards = tokio::task::JoinSet::new();
    'conn: loop {
        let frame = loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "port-forward client sent a bad frame");
                    let _ = out.send(Frame::GoAway { last_stream: 0, status: 1 }).await;
                    break 'conn;
                }
            }
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break 'conn,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        match frame {
            Frame::SynStream { stream, fin, headers } => {
                let _ = out.send(Frame::SynReply { stream, fin: false, headers: vec![] }).await;
                let port = spdy::header(&headers, "port").and_then(|p| p.parse::<u16>().ok()).filter(|p| *p != 0);
                let kind = spdy::header(&headers, "streamtype").unwrap_or_default().to_string();
                let (Some(port), true) = (port, kind == "error" || kind == "data") else {
                    let _ = out.send(Frame::RstStream { stream, status: spdy::PROTOCOL_ERROR }).await;
                    continue;
                };
                // Clients before requestid paired streams by port.
                let id = spdy::header(&headers, "requestid").map_or_else(|| format!("port-{port}"), str::to_string);
                if !pairs.contains_key(&id) && pairs.len() >= MAX_UNPAIRED {
                    let _ = out.send(Frame::RstStream { stream, status: spdy::PROTOCOL_ERROR }).await;
                    continue;
                }
                let pair = pairs.entry(id.clone()).or_default();
                pair.port = port;
                if kind == "error" {
                    pair.error = Some(stream);
                } else {
                    let (tx, rx) = mpsc::channel(64);
                    if !fin {
                        to_pod.insert(stream, tx);
                    }
                    pair.data = Some((stream, rx));
                }
                if pair.error.is_some() && pair.data.is_some() {
                    let Some(Pair { error: Some(error), data: Some((data, rx)), port }) = pairs.remove(&id) else {
                        continue;
                    };
                    forwards.spawn(forward(dial.clone(), port, error, data, rx, out.clone()));
                }
            }
            Frame::Data { stream, fin, data } => {
                if let Some(tx) = to_pod.get(&stream) {
                    if !data.is_empty() && tx.send(data).await.is_err() {
                        to_pod.remove(&stream);
                    }
                }
                if fin {
                    to_pod.remove(&stream);
                }
            }
            Frame::RstStream { stream, .. } => {
                to_pod.remove(&stream);
            }
            Frame::Ping(id) => {
                let _ = out.send(Frame::Ping(id)).await;
            }
            Frame::GoAway { .. } => break,
            Frame::SynReply { .. } | Frame::Headers { .. } | Frame::Ignored(_) => {}
        }
    }
    forwards.abort_all();
    drop(out);
    let _ = writing.await;
}

/// One forwarded connection: `error` and `data` are its streams.
async fn forward(
    dial: Dial,
    port: u16,
    error: u32,
    data: u32,
    mut from_client: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<Frame>,
) {
    let end = |stream: u32| Frame::Data { stream, fin: true, data: vec![] };
    let (mut r, mut w) = match dial(port).await {
        Ok(c) => c,
        Err(message) => {
            let _ = out.send(Frame::Data { stream: error, fin: false, data: message.into_bytes() }).await;
            let _ = out.send(end(error)).await;
            let _ = out.send(end(data)).await;
            return;
        }
    };
    let up = async {
        while let Some(b) = from_client.recv().await {
            if w.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(Frame::Data { stream: data, fin: false, data: buf[..n].to_vec() }).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = out.send(end(data)).await;
    };
    tokio::join!(up, down);
    let _ = out.send(end(error)).await;
}

/// A dialer through the node gateway to the agent of `node`.
fn agent_dial(api: &ApiServer, node: String, namespace: String, pod: String) -> Result<Dial, ApiError> {
    let gateway = api.gateway.get().ok_or_else(|| ApiError::unavailable("the node gateway is starting"))?.clone();
    Ok(Arc::new(move |port: u16| {
        let (gateway, node) = (gateway.clone(), node.clone());
        let req =
            AgentRequest::PortForward(PortForwardRequest { namespace: namespace.clone(), pod: pod.clone(), port });
        Box::pin(async move {
            let (mut send, mut recv) = gateway.open_agent_stream(&node).await.map_err(|e| e.message)?;
            write_message(&mut send, &req).await.map_err(|e| format!("node agent: {e}"))?;
            match read_message::<AgentResponse, _>(&mut recv, MAX_MESSAGE).await {
                Ok(AgentResponse::Streaming) => Ok((Box::new(recv) as Reader, Box::new(send) as Writer)),
                Ok(AgentResponse::Error { message, .. }) => Err(message),
                Err(e) => Err(format!("node agent: {e}")),
            }
        }) as BoxFuture<'static, _>
    }))
}

/// `GET|POST pods/<name>/portforward`: switches to the tunnelled SPDY
/// session for the pod on `node`.
pub async fn serve(api: &ApiServer, node: &str, namespace: &str, pod: &str, ctx: Ctx) -> Result<Reply, ApiError> {
    let upgrade = ctx.upgrade.ok_or_else(|| {
        ApiError::bad_request(format!(
            "portforward needs a protocol upgrade: a WebSocket ({TUNNEL_PROTOCOL}) or SPDY/3.1 ({SPDY_PROTOCOL})"
        ))
    })?;
    let want = if upgrade.spdy { SPDY_PROTOCOL } else { TUNNEL_PROTOCOL };
    if !upgrade.protocols.split(',').map(str::trim).any(|p| p == want) {
        return Err(ApiError::bad_request(format!(
            "no supported portforward protocol offered (want {want}; v4.portforward.k8s.io is not served)"
        )));
    }
    let dial = agent_dial(api, node.to_string(), namespace.to_string(), pod.to_string())?;
    // Plain SPDY runs the session on the upgraded connection itself; the
    // WebSocket tunnel carries it in binary messages.
    let spdy = upgrade.spdy;
    let body = if spdy {
        ReplyBody::SwitchingSpdy(SPDY_PROTOCOL)
    } else {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(upgrade.key.as_bytes());
        ReplyBody::Switching(accept, TUNNEL_PROTOCOL)
    };
    tokio::spawn(async move {
        match upgrade.on.await {
            Ok(io) if spdy => {
                let (r, w) = tokio::io::split(hyper_util::rt::TokioIo::new(io));
                session(r, w, dial).await
            }
            Ok(io) => tunnel(hyper_util::rt::TokioIo::new(io), dial).await,
            Err(e) => tracing::debug!(error = %e, "portforward upgrade failed"),
        }
    });
    Ok(Reply { code: http::StatusCode::SWITCHING_PROTOCOLS, body, warnings: vec![] })
}

/// SPDY inside a WebSocket: binary messages in both directions are
/// pieces of one byte stream.
async fn tunnel<S>(io: S, dial: Dial)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let (mut sink, mut stream) = ws.split();
    let (ours, theirs) = tokio::io::duplex(256 << 10);
    let (mut pipe_read, mut pipe_write) = tokio::io::split(theirs);
    let inbound = async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) if pipe_write.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = pipe_write.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match pipe_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    let (r, w) = tokio::io::split(ours);
    let session = tokio::spawn(session(r, w, dial));
    tokio::join!(inbound, outbound);
    session.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn(stream: u32, kind: &str, port: u16, id: &str) -> Frame {
        Frame::SynStream {
            stream,
            fin: false,
            headers: vec![
                ("streamtype".into(), kind.into()),
                ("port".into(), port.to_string()),
                ("requestid".into(), id.into()),
            ],
        }
    }

    /// A client's view of a session: frames in, frames out.
    struct Client {
        codec: Codec,
        buf: Vec<u8>,
        io: tokio::io::DuplexStream,
    }

    impl Client {
        async fn send(&mut self, f: Frame) {
            let b = self.codec.encode(&f).unwrap();
            self.io.write_all(&b).await.unwrap();
        }
        async fn next(&mut self) -> Frame {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                if let Some(f) = self.codec.decode(&mut self.buf).unwrap() {
                    return f;
                }
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout_at(deadline, self.io.read(&mut chunk))
                    .await
                    .expect("a frame in time")
                    .unwrap();
                assert!(n > 0, "session ended");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
    }

    /// Dials 127.0.0.1:<port> (the "pod" is this test).
    fn tcp_dial() -> Dial {
        Arc::new(|port| {
            Box::pin(async move {
                let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(|e| format!("failed to connect to localhost:{port}: {e}"))?;
                let (r, w) = s.into_split();
                Ok((Box::new(r) as Reader, Box::new(w) as Writer))
            }) as BoxFuture<'static, _>
        })
    }

    #[tokio::test]
    async fn streams_are_paired_and_bytes_flow_both_ways() {
        // The "pod": upper-cases what it reads until EOF, then closes.
        let pod = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = pod.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = pod.accept().await {
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    c.read_to_end(&mut all).await.unwrap();
                    c.write_all(&all.to_ascii_uppercase()).await.unwrap();
                });
            }
        });
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(server_io);
        tokio::spawn(session(r, w, tcp_dial()));
        let mut c = Client { codec: Codec::default(), buf: vec![], io: client_io };

        c.send(Frame::Ping(1)).await;
        assert_eq!(c.next().await, Frame::Ping(1));
        // Two forwarded connections at once, streams interleaved.
        c.send(syn(1, "error", port, "0")).await;
        c.send(syn(3, "error", port, "1")).await;
        c.send(syn(5, "data", port, "1")).await;
        c.send(syn(7, "data", port, "0")).await;
        for want in [1, 3, 5, 7] {
            assert!(matches!(c.next().await, Frame::SynReply { stream, .. } if stream == want));
        }
        c.send(Frame::Data { stream: 1, fin: true, data: vec![] }).await;
        c.send(Frame::Data { stream: 7, fin: false, data: b"hello ".to_vec() }).await;
        c.send(Frame::Data { stream: 5, fin: true, data: b"other".to_vec() }).await;
        c.send(Frame::Data { stream: 7, fin: true, data: b"pod".to_vec() }).await;
        let mut got: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut ended = Vec::new();
        while ended.len() < 4 {
            match c.next().await {
                Frame::Data { stream, fin, data } => {
                    got.entry(stream).or_default().extend(data);
                    if fin {
                        // A data stream ends before its error stream.
                        if stream == 1 {
                            assert!(ended.contains(&7));
                        }
                        if stream == 3 {
                            assert!(ended.contains(&5));
                        }
                        ended.push(stream);
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got[&7], b"HELLO POD");
        assert_eq!(got[&5], b"OTHER");
        assert!(got.get(&1).is_none_or(Vec::is_empty), "no error");
    }

    #[tokio::test]
    async fn a_port_nobody_serves_is_reported_on_the_error_stream() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(server_io);
        tokio::spawn(session(r, w, tcp_dial()));
        let mut c = Client { codec: Codec::default(), buf: vec![], io: client_io };
        c.send(syn(1, "error", closed, "0")).await;
        c.send(syn(3, "data", closed, "0")).await;
        // A bad request: no port.
        c.send(Frame::SynStream { stream: 5, fin: false, headers: vec![("streamtype".into(), "data".into())] }).await;
        let mut error = Vec::new();
        let mut seen = Vec::new();
        while !seen.contains(&"error-end") || !seen.contains(&"rst") {
            match c.next().await {
                Frame::Data { stream: 1, fin, data } => {
                    error.extend(data);
                    if fin {
                        seen.push("error-end");
                    }
                }
                Frame::RstStream { stream: 5, status } => {
                    assert_eq!(status, spdy::PROTOCOL_ERROR);
                    seen.push("rst");
                }
                _ => {}
            }
        }
        // Halves of requests that never pair are refused past the bound.
        for i in 0..=MAX_UNPAIRED as u32 {
            c.send(syn(101 + 2 * i, "error", closed, &format!("lonely-{i}"))).await;
        }
        let last = 101 + 2 * MAX_UNPAIRED as u32;
        loop {
            match c.next().await {
                Frame::RstStream { stream, status } if stream == last => {
                    assert_eq!(status, spdy::PROTOCOL_ERROR);
                    break;
                }
                Frame::RstStream { stream, .. } => panic!("stream {stream} refused before the bound"),
                _ => {}
            }
        }
        let error = String::from_utf8(error).unwrap();
        assert!(error.contains(&format!("failed to connect to localhost:{closed}")), "{error}");
        // Garbage ends the session with a GOAWAY.
        c.io.write_all(&[0x80, 2, 0, 1, 0, 0, 0, 0]).await.unwrap();
        loop {
            if let Frame::GoAway { status, .. } = c.next().await {
                assert_eq!(status, 1);
                break;
            }
        }
    }
}
