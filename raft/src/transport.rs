//! Peer transport between masters: QUIC (quinn) with mutual TLS.
//!
//! One QUIC connection per peer pair, cached and re-dialled on failure with
//! backoff; every RPC is one bidirectional stream carrying one postcard
//! request and one postcard response, each delimited by the stream's FIN.
//! Streams are independent, so append entries, votes, snapshot chunks and
//! forwarded client writes are pipelined over one connection without
//! head-of-line blocking.
//!
//! This module only moves bytes; `node.rs` decides what a request means and
//! who may send it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::types::*;

/// Largest frame accepted on a stream (a snapshot chunk or an append batch).
pub const MAX_FRAME: usize = 256 << 20;
/// Largest frame accepted from a peer without a master certificate (a join request).
pub const MAX_ANONYMOUS_FRAME: usize = 64 << 10;

/// QUIC settings for peer connections: keep-alives well inside the idle
/// timeout, so a dead peer is noticed in about a second, and enough
/// concurrent streams for many forwarded client requests.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(250)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(1000))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(8192));
    Arc::new(t)
}

/// QUIC settings for node agent connections (the masters' node gateway and
/// `capstan-node`): keep-alives notice a dead master or agent within 15 s
/// (well inside the 40 s node grace period) while 5,000 idle nodes cost a
/// master about 1,700 packets a second, and there are enough streams for a
/// node's log and exec streams.
pub fn node_transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(3)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(15_000))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    Arc::new(t)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub name: String,
    pub csr_pem: String,
    pub peer_addr: String,
    pub client_url: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    pub id: NodeId,
    pub cert_pem: String,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client write forwarded to the leader.
    ClientWrite(Command),
    /// ReadIndex: the leader confirms leadership and answers its commit index.
    ReadIndex,
    LeaseKeepAlive {
        id: i64,
    },
    LeaseTimeToLive {
        id: i64,
    },
    /// From a master that has no certificate yet (anonymous connection).
    Join(JoinRequest),
    /// From a joined master once it runs: add it as learner, then voter.
    Promote {
        id: NodeId,
        member: Member,
    },
    RemoveMember {
        id: NodeId,
    },
    /// A master's data disk is (or no longer is) below its free-space
    /// floor; sent to the leader every second while low (see `disk.rs`).
    DiskAlarm {
        id: NodeId,
        low: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    ClientWrite(CommandResult),
    ReadIndex(u64),
    /// Remaining TTL in seconds; `-1` when the lease does not exist.
    LeaseTtl {
        ttl: i64,
        granted: i64,
    },
    Join(JoinResponse),
    Done,
    /// The request failed; the text says why.
    Error(String),
    /// To a vote or append from a master this one saw removed from the
    /// cluster: it never heard (the leader stops replicating to a removed
    /// member), so it is told here, and stops.
    Removed,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("peer {addr}: {reason}")]
    Stream { addr: String, reason: String },
    #[error("malformed frame: {0}")]
    Decode(String),
}

/// Read a whole request/response frame from a stream.
/// Read a whole frame of at most `max` bytes from a stream.
pub async fn read_frame<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<T, TransportError> {
    let buf = recv.read_to_end(max).await.map_err(|e| TransportError::Decode(e.to_string()))?;
    postcard::from_bytes(&buf).map_err(|e| TransportError::Decode(e.to_string()))
}

pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, v: &T) -> Result<(), TransportError> {
    let buf = crate::types::postcard_sized(v).map_err(|e| TransportError::Decode(e.to_string()))?;
    send.write_all(&buf).await.map_err(|e| TransportError::Decode(e.to_string()))?;
    send.finish().map_err(|e| TransportError::Decode(e.to_string()))?;
    Ok(())
}

struct Cached {
    conn: Option<quinn::Connection>,
    /// A dial task is running; waiters are woken through `ready`.
    dialing: bool,
    ready: Arc<Notify>,
    /// No redial before this instant (backoff after a failed dial).
    retry_at: Instant,
    backoff: Duration,
}

struct Inner {
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<String, Cached>>,
    /// Set when a peer answers [`PeerResponse::Removed`] to any request.
    removed: tokio::sync::watch::Sender<bool>,
}

/// Dials peers and caches one connection per address.
///
/// Dials run in their own tasks: a caller that gives up (openraft bounds
/// every RPC, heartbeats by 100 ms) does not abort the dial, and a dead peer
/// answers `Unreachable` at once while backing off, so openraft backs off
/// too instead of keeping a replication permanently in flight.
#[derive(Clone)]
pub struct PeerClients {
    inner: Arc<Inner>,
}

const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

impl PeerClients {
    /// `endpoint` must have a default client config (mutual TLS).
    pub fn new(endpoint: quinn::Endpoint) -> PeerClients {
        let (removed, _) = tokio::sync::watch::channel(false);
        PeerClients { inner: Arc::new(Inner { endpoint, conns: Mutex::new(HashMap::new()), removed }) }
    }

    /// Becomes true when a peer says this master was removed from the
    /// cluster (or [`PeerClients::mark_removed`] is called).
    pub fn removed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.removed.subscribe()
    }

    pub fn mark_removed(&self) {
        self.inner.removed.send_replace(true);
    }

    async fn connection(&self, addr: &str) -> Result<quinn::Connection, TransportError> {
        let unreachable = |reason: &str| TransportError::Unreachable { addr: addr.to_string(), reason: reason.into() };
        loop {
            let ready = {
                let mut conns = self.inner.conns.lock();
                let e = conns.entry(addr.to_string()).or_insert_with(|| Cached {
                    conn: None,
                    dialing: false,
                    ready: Arc::new(Notify::new()),
                    retry_at: Instant::now(),
                    backoff: Duration::from_millis(50),
                });
                if let Some(conn) = &e.conn {
                    if conn.close_reason().is_none() {
                        return Ok(conn.clone());
                    }
                    e.conn = None;
                }
                if !e.dialing {
                    if Instant::now() < e.retry_at {
                        return Err(unreachable("backing off after a failed dial"));
                    }
                    e.dialing = true;
                    tokio::spawn(self.clone().dial(addr.to_string()));
                }
                e.ready.clone()
            };
            let notified = ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The dial may have finished between unlocking and enabling.
            let done = self.inner.conns.lock().get(addr).is_none_or(|e| !e.dialing);
            if !done {
                notified.await;
            }
        }
    }

    async fn dial(self, addr: String) {
        let result: Result<quinn::Connection, String> = async {
            let sock: SocketAddr =
                tokio::net::lookup_host(&addr).await.map_err(|e| e.to_string())?.next().ok_or("no address")?;
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h).trim_matches(['[', ']']);
            let connecting = self.inner.endpoint.connect(sock, host).map_err(|e| e.to_string())?;
            match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("dial timed out".into()),
            }
        }
        .await;
        let mut conns = self.inner.conns.lock();
        let Some(e) = conns.get_mut(&addr) else { return };
        e.dialing = false;
        match result {
            Ok(conn) => {
                e.conn = Some(conn);
                e.backoff = Duration::from_millis(50);
            }
            Err(reason) => {
                tracing::debug!(peer = %addr, %reason, "dial failed");
                e.retry_at = Instant::now() + e.backoff;
                e.backoff = (e.backoff * 2).min(Duration::from_secs(1));
            }
        }
        e.ready.notify_waiters();
    }

    /// Round-trip time of each live peer connection.
    pub fn rtts(&self) -> Vec<(String, Duration)> {
        let conns = self.inner.conns.lock();
        conns
            .iter()
            .filter_map(|(addr, c)| {
                c.conn.as_ref().filter(|c| c.close_reason().is_none()).map(|c| (addr.clone(), c.rtt()))
            })
            .collect()
    }

    /// One RPC on a fresh stream of the cached connection.
    pub async fn call(&self, addr: &str, req: &PeerRequest, timeout: Duration) -> Result<PeerResponse, TransportError> {
        let conn = self.connection(addr).await?;
        let fut = async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| TransportError::Unreachable { addr: addr.to_string(), reason: e.to_string() })?;
            write_frame(&mut send, req).await?;
            read_frame::<PeerResponse>(&mut recv, MAX_FRAME).await
        };
        let result = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Stream { addr: addr.to_string(), reason: "timed out".into() }),
        };
        if matches!(result, Ok(PeerResponse::Removed)) && !*self.inner.removed.borrow() {
            tracing::error!(peer = %addr, "a peer says this master was removed from the cluster");
            self.mark_removed();
        }
        if result.is_err() {
            // The peer may have restarted on the same address: its new process
            // cannot reset our old connection, so drop it and redial next time.
            let mut conns = self.inner.conns.lock();
            if let Some(c) = conns.get_mut(addr) {
                if c.conn.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
                    c.conn = None;
                }
            }
            conn.close(0u32.into(), b"rpc failed");
        }
        result
    }
}

/// openraft's network factory over [`PeerClients`].
#[derive(Clone)]
pub struct Network {
    pub clients: Arc<PeerClients>,
}

pub struct PeerConn {
    target: NodeId,
    addr: String,
    clients: Arc<PeerClients>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerConn {
        PeerConn { target, addr: node.peer_addr.clone(), clients: self.clients.clone() }
    }
}

type RpcErr<E = RaftError<NodeId>> = RPCError<NodeId, Member, E>;

impl PeerConn {
    async fn rpc<E: std::error::Error>(&self, req: PeerRequest, option: &RPCOption) -> Result<PeerResponse, RpcErr<E>> {
        match self.clients.call(&self.addr, &req, option.hard_ttl()).await {
            Ok(PeerResponse::Error(e)) => Err(RPCError::Network(NetworkError::new(&std::io::Error::other(e)))),
            // `call` has marked this master removed.
            Ok(PeerResponse::Removed) => {
                Err(RPCError::Network(NetworkError::new(&std::io::Error::other("removed from the cluster"))))
            }
            Ok(r) => Ok(r),
            Err(e @ TransportError::Unreachable { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(&self) -> RpcErr<E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other("unexpected response kind")))
    }
}

impl RaftNetwork<TypeConfig> for PeerConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self.rpc(PeerRequest::AppendEntries(rpc), &option).await? {
            PeerResponse::AppendEntries(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<RaftError<NodeId, InstallSnapshotError>>> {
        match self.rpc(PeerRequest::InstallSnapshot(rpc), &option).await? {
            PeerResponse::InstallSnapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.unexpected()),
        }
    }

    /// Back off from an unreachable peer: 200 ms doubling to 2 s. While
    /// backing off no replication to it is in flight, which is what lets
    /// the leader purge its log behind a snapshot while a member is down
    /// (openraft never purges entries an in-flight replication uses).
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(
            (0..).map(|i: u32| Duration::from_millis(200 * 2u64.pow(i.min(3))).min(Duration::from_secs(2))),
        )
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.rpc(PeerRequest::Vote(rpc), &option).await? {
            PeerResponse::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.unexpected()),
        }
    }
}
