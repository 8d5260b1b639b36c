//! The agent's side of the node protocol (`capstan_proto::nodewire`): its
//! identity on disk, joining with a bootstrap token, and the one QUIC
//! connection to a master, moved to the next master in the list whenever
//! the current one goes away.
//!
//! Data dir layout:
//! ```text
//! <data-dir>/node.json        name and the masters' gateway addresses
//! <data-dir>/pki/ca.crt       the cluster CA (pinned by the token at join)
//! <data-dir>/pki/node.crt     client certificate for system:node:<name>
//! <data-dir>/pki/node.key
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use capstan_proto::nodewire::{
    read_frame, read_message, write_message, NodeRequest, NodeResponse, PodFrame, WireError, MAX_FRAME, MAX_MESSAGE,
};
use capstan_raft::bootstrap::{host_of, write_private, JoinToken};
use capstan_raft::pki::{self, CertifiedKey};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeFile {
    pub name: String,
    pub servers: Vec<String>,
}

pub struct Identity {
    pub file: NodeFile,
    pub ca_pem: String,
    pub cert: CertifiedKey,
}

impl std::fmt::Debug for Identity {
    // Never prints the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("file", &self.file).finish_non_exhaustive()
    }
}

fn pki_dir(dir: &Path) -> PathBuf {
    dir.join("pki")
}

/// The identity in `dir`, if the agent has joined before.
pub fn load(dir: &Path) -> anyhow::Result<Option<Identity>> {
    let nf = dir.join("node.json");
    if !nf.exists() {
        return Ok(None);
    }
    let file: NodeFile = serde_json::from_slice(&std::fs::read(&nf)?).with_context(|| format!("{}", nf.display()))?;
    let read = |n: &str| {
        let p = pki_dir(dir).join(n);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    Ok(Some(Identity {
        file,
        ca_pem: read("ca.crt")?,
        cert: CertifiedKey { cert_pem: read("node.crt")?, key_pem: read("node.key")? },
    }))
}

fn save(dir: &Path, id: &Identity) -> anyhow::Result<()> {
    std::fs::create_dir_all(pki_dir(dir))?;
    write_private(&pki_dir(dir).join("ca.crt"), &id.ca_pem)?;
    write_private(&pki_dir(dir).join("node.crt"), &id.cert.cert_pem)?;
    write_private(&pki_dir(dir).join("node.key"), &id.cert.key_pem)?;
    // node.json last: its presence means the identity is complete.
    capstan_raft::bootstrap::write_durable(&dir.join("node.json"), &serde_json::to_vec_pretty(&id.file)?)?;
    Ok(())
}

fn bind_for(addr: &SocketAddr) -> SocketAddr {
    if addr.is_ipv6() {
        "[::]:0".parse().expect("static")
    } else {
        "0.0.0.0:0".parse().expect("static")
    }
}

async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(addr).await?.next().with_context(|| format!("{addr} resolves to nothing"))
}

/// Exchanges the bootstrap token for a node certificate through the first
/// master that answers, and saves the identity in `dir`.
pub async fn join(dir: &Path, servers: &[String], token: &str, name: &str) -> anyhow::Result<Identity> {
    let parsed = JoinToken::parse(token)?;
    let (key_pem, csr_pem) = pki::make_csr(&format!("system:node:{name}"), &[])?;
    let req = NodeRequest::Join { token: token.to_string(), name: name.to_string(), csr_pem };
    let mut last = String::from("no server given");
    for attempt in 0..30 {
        // Masters whose certificate the token's CA pin rejected this round:
        // retrying cannot change that, so a round of only those ends the join.
        let mut untrusted = 0;
        for server in servers {
            let result: anyhow::Result<NodeResponse> = async {
                let addr = resolve(server).await?;
                let mut ep = quinn::Endpoint::client(bind_for(&addr))?;
                let mut cfg = pki::quic_anonymous_client_config(&parsed.ca_fingerprint)?;
                cfg.transport_config(capstan_raft::transport::node_transport_config());
                ep.set_default_client_config(cfg);
                let conn = tokio::time::timeout(Duration::from_secs(5), ep.connect(addr, &host_of(server))?)
                    .await
                    .context("connect timed out")??;
                let resp = call(&conn, &req).await?;
                conn.close(0u32.into(), b"joined");
                ep.wait_idle().await;
                Ok(resp)
            }
            .await;
            match result {
                Ok(NodeResponse::Joined { cert_pem, ca_pem }) => {
                    if pki::fingerprint_pem(&ca_pem)? != parsed.ca_fingerprint {
                        bail!("the master sent a CA that does not match the token's fingerprint");
                    }
                    let id = Identity {
                        file: NodeFile { name: name.to_string(), servers: servers.to_vec() },
                        ca_pem,
                        cert: CertifiedKey { cert_pem, key_pem },
                    };
                    save(dir, &id)?;
                    return Ok(id);
                }
                Ok(NodeResponse::Error { code, message, .. }) if code == 401 || code == 422 => {
                    bail!("join refused by {server}: {message}")
                }
                Ok(other) => last = format!("{server}: unexpected answer {other:?}"),
                Err(e) => {
                    untrusted += usize::from(is_tls_rejection(&e));
                    last = format!("{server}: {e:#}");
                }
            }
        }
        if untrusted == servers.len() {
            bail!(
                "could not join: no master presented a certificate from the CA the token pins \
                 (is the token from this cluster?): {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1).min(10))).await;
    }
    bail!("could not join: {last}")
}

/// Whether a dial failed because the TLS handshake refused the peer's
/// certificate (a crypto alert, RFC 9001 section 4.8), not for want of a route.
fn is_tls_rejection(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<quinn::ConnectionError>(),
            Some(quinn::ConnectionError::TransportError(t)) if (0x100..0x200).contains(&u64::from(t.code)))
    })
}

/// One request on its own stream, one answer.
pub async fn call(conn: &quinn::Connection, req: &NodeRequest) -> Result<NodeResponse, WireError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| WireError::Io(std::io::Error::other(e)))?;
    write_message(&mut send, req).await?;
    send.finish().map_err(|e| WireError::Io(std::io::Error::other(e)))?;
    tokio::time::timeout(Duration::from_secs(30), read_message(&mut recv, MAX_MESSAGE))
        .await
        .map_err(|_| WireError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 30 s")))?
}

/// The connection to the masters: one at a time, re-dialled (next master in
/// the list first) whenever it is lost.
pub struct Masters {
    name: String,
    servers: Vec<String>,
    endpoint: quinn::Endpoint,
    /// This node's TLS identity (the endpoint may be shared by hollow nodes).
    client: quinn::ClientConfig,
    current: Mutex<Option<(usize, quinn::Connection)>>,
    dial: tokio::sync::Mutex<()>,
    /// Each new connection, for the task serving the masters' streams on it.
    connected: tokio::sync::watch::Sender<Option<quinn::Connection>>,
}

impl Masters {
    pub fn new(id: &Identity) -> anyhow::Result<Arc<Masters>> {
        Masters::with_endpoint(id, quinn::Endpoint::client("0.0.0.0:0".parse().expect("static"))?)
    }

    /// Like `new`, dialling from `endpoint` (one UDP socket and driver for
    /// many hollow nodes, each with its own certificate).
    pub fn with_endpoint(id: &Identity, endpoint: quinn::Endpoint) -> anyhow::Result<Arc<Masters>> {
        let mut client = pki::quic_client_config(&id.ca_pem, &id.cert)?;
        client.transport_config(capstan_raft::transport::node_transport_config());
        if id.file.servers.is_empty() {
            bail!("no master addresses (node.json lists none)");
        }
        Ok(Arc::new(Masters {
            name: id.file.name.clone(),
            servers: id.file.servers.clone(),
            endpoint,
            client,
            current: Mutex::new(None),
            dial: tokio::sync::Mutex::new(()),
            connected: tokio::sync::watch::channel(None).0,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The live connection, dialling the masters in turn if there is none.
    /// Fails only after every master was tried.
    pub async fn connection(&self) -> anyhow::Result<quinn::Connection> {
        if let Some((_, c)) = self.current.lock().as_ref().filter(|(_, c)| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let _one_dialer = self.dial.lock().await;
        let start = match self.current.lock().as_ref() {
            Some((_, c)) if c.close_reason().is_none() => return Ok(c.clone()),
            Some((i, _)) => i + 1,
            None => 0,
        };
        let mut last = String::new();
        for k in 0..self.servers.len() {
            let i = (start + k) % self.servers.len();
            let server = &self.servers[i];
            let dialled: anyhow::Result<quinn::Connection> = async {
                let addr = resolve(server).await?;
                let c = tokio::time::timeout(
                    Duration::from_secs(3),
                    self.endpoint.connect_with(self.client.clone(), addr, &host_of(server))?,
                )
                .await
                .context("connect timed out")??;
                Ok(c)
            }
            .await;
            match dialled {
                Ok(c) => {
                    tracing::info!(master = %server, "connected");
                    *self.current.lock() = Some((i, c.clone()));
                    self.connected.send_replace(Some(c.clone()));
                    return Ok(c);
                }
                Err(e) => last = format!("{server}: {e:#}"),
            }
        }
        // Remember where we stopped so the next round starts further on.
        if let Some((i, _)) = self.current.lock().as_mut() {
            *i = (start + self.servers.len() - 1) % self.servers.len();
        }
        bail!("no master reachable (last: {last})")
    }

    /// The master the agent is connected to now, if any.
    pub fn connected_to(&self) -> Option<String> {
        let cur = self.current.lock();
        cur.as_ref().filter(|(_, c)| c.close_reason().is_none()).map(|(i, _)| self.servers[*i].clone())
    }

    /// Round-trip time of the live connection.
    pub fn rtt(&self) -> Option<Duration> {
        let cur = self.current.lock();
        cur.as_ref().filter(|(_, c)| c.close_reason().is_none()).map(|(_, c)| c.rtt())
    }

    /// A request/answer exchange; a transport failure drops the connection
    /// so the next call moves to another master.
    pub async fn request(&self, req: &NodeRequest) -> anyhow::Result<NodeResponse> {
        let conn = self.connection().await?;
        match call(&conn, req).await {
            Ok(r) => Ok(r),
            Err(e) => {
                conn.close(0u32.into(), b"request failed");
                Err(e.into())
            }
        }
    }

    /// Like `request`, with an `Error` answer turned into an error.
    pub async fn expect(&self, req: &NodeRequest) -> anyhow::Result<NodeResponse> {
        match self.request(req).await? {
            NodeResponse::Error { code, reason, message } => bail!("{code} {reason}: {message}"),
            r => Ok(r),
        }
    }

    /// Opens a pod watch: returns the stream to read frames from.
    pub async fn watch_pods(&self) -> anyhow::Result<quinn::RecvStream> {
        self.watch(&NodeRequest::WatchPods, "pod").await
    }

    /// Follows a watch (`WatchPods`, `WatchServices`) forever: each frame
    /// goes to `apply`; when the stream ends or fails it is opened again
    /// (from a fresh listing, which `apply` sees as a reset frame).
    pub async fn follow(&self, req: &NodeRequest, what: &str, mut apply: impl FnMut(PodFrame)) {
        loop {
            match self.watch(req, what).await {
                Ok(mut recv) => loop {
                    match read_frame(&mut recv, MAX_FRAME).await {
                        Ok(Some(bytes)) => match PodFrame::decode(&bytes) {
                            Ok(frame) => apply(frame),
                            Err(e) => {
                                tracing::warn!(error = %e, "bad {what} frame; re-watching");
                                break;
                            }
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::info!(error = %e, "{what} watch ended; re-watching");
                            break;
                        }
                    }
                },
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "{what} watch failed"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn watch(&self, req: &NodeRequest, what: &str) -> anyhow::Result<quinn::RecvStream> {
        let conn = self.connection().await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(&mut send, req).await?;
        send.finish()?;
        let first = tokio::time::timeout(Duration::from_secs(30), read_message(&mut recv, MAX_MESSAGE))
            .await
            .with_context(|| format!("no answer to the {what} watch"))??;
        match first {
            NodeResponse::Watching => Ok(recv),
            NodeResponse::Error { code, reason, message } => bail!("{code} {reason}: {message}"),
            other => bail!("unexpected answer to the {what} watch: {other:?}"),
        }
    }

    /// Every new connection to a master (the masters open log and exec streams on it).
    pub fn connections(&self) -> tokio::sync::watch::Receiver<Option<quinn::Connection>> {
        self.connected.subscribe()
    }
}
