//! The node gateway: a QUIC listener on every master that node agents
//! (`capstan-node`) hold one connection to.
//!
//! - A connection without a client certificate may only `Join`: a bootstrap
//!   token with usage `node` buys a client certificate for
//!   `system:node:<name>` (the CA picks the subject; only the key comes
//!   from the agent's CSR).
//! - A node certificate may register its Node (the gateway gives it a pod
//!   CIDR, claimed in the store so no two nodes share one), renew its Lease,
//!   report its status and its pods' statuses, confirm a deleted pod's
//!   containers are gone, read the Secrets, ConfigMaps and
//!   PersistentVolumeClaims its pods reference and the PersistentVolumes
//!   those claims are bound to or that are pinned to it (the node
//!   authorizer, `authz.rs`; a PersistentVolume that does not exist is a
//!   plain 404), watch its pods, and report its usage (kept in the store
//!   on a lease for `metrics.k8s.io`). Its Node's labels and annotations
//!   are the agent's to set (the local-path root, for one).
//! - Pod watches are fed by this master's pod informer through one router
//!   task: each change goes only to the sessions of the node(s) it names.
//!   A session starts with a listing of the node's pods taken atomically
//!   with its registration (`Informer::attach`), so it sees every later
//!   change once and no earlier one. A session that falls too far behind is
//!   closed; the agent re-watches and gets a fresh listing.
//! - The gateway keeps each node's connection so the API server can open
//!   log and exec streams to the agent (`open_agent_stream`). The master
//!   holding a node's connection records itself in the store
//!   (`/capstan/gateway/nodes/<node>`); any other master reaches the agent
//!   by asking that master, over its node gateway with a master
//!   certificate, to relay a stream (`NodeRequest::Relay`).
//!
//! Writes go through the API's in-process admission path (`api::internal`).

pub mod authz;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capstan_proto::k8s::registry::ResourceType;
use capstan_proto::nodewire::{
    read_message, write_frame, write_message, AgentEvent, NodeRequest, NodeResponse, NodeUsage, PodEvent, PodFrame,
    WireError, MAX_ANONYMOUS_MESSAGE, MAX_MESSAGE, NODES_GROUP, NODE_TOKEN_USAGE, NODE_USER_PREFIX,
};
use capstan_raft::bootstrap::{JoinToken, Pki};
use capstan_raft::types::{KeyRange, RangeRequest};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use self::authz::ClusterCidr;
use crate::api::objects::Found;
use crate::api::status::ApiError;
use crate::api::{internal, ApiServer};
use crate::controllers::events::{EventRecorder, EventType, ObjectRef};
use crate::controllers::informer::{Cached, Change, Informer};
use crate::controllers::nodelifecycle::LEASE_NAMESPACE;

/// Events a session may have queued before it is closed (the agent then
/// re-watches and receives a fresh listing instead).
const SESSION_QUEUE: usize = 4096;
/// Events in one report (the agent batches what queued up meanwhile).
pub const MAX_EVENTS: usize = 256;
/// Lease duration a node's heartbeat claims (Kubernetes' default).
const LEASE_SECONDS: i64 = 40;
const MANAGER: &str = "capstan-node";

struct Session {
    id: u64,
    /// Changes numbered up to here are in the listing the session began with.
    floor: u64,
    tx: mpsc::Sender<PodEvent>,
}

/// What one pod lets its node read.
type References = Arc<BTreeSet<authz::Reference>>;

pub struct Gateway {
    api: Arc<ApiServer>,
    pods: Arc<Informer>,
    nodes: Arc<Informer>,
    /// Services and Endpoints, streamed to every agent's service proxy.
    services: [Arc<Informer>; 2],
    pki: Arc<Pki>,
    cidr: ClusterCidr,
    sessions: Mutex<HashMap<String, Vec<Session>>>,
    conns: Mutex<HashMap<String, quinn::Connection>>,
    /// This master's node gateway address (what other masters dial for relays).
    address: String,
    /// Client endpoint (master certificate) for relays, and its connections.
    relay_endpoint: quinn::Endpoint,
    relays: Mutex<HashMap<String, quinn::Connection>>,
    cidr_cache: Mutex<Option<(std::time::Instant, BTreeSet<String>)>>,
    /// What each pod lets its node read, by pod key, for the revision it
    /// was computed at: a node's Gets then decode only pods that changed.
    /// A pod's entry goes with the pod (`route`).
    references: Mutex<HashMap<String, (i64, References)>>,
    next_session: AtomicU64,
    /// Writes the Events agents report, as the kubelet.
    events: EventRecorder,
    metrics: Metrics,
}

struct Metrics {
    connected: prometheus::IntGauge,
    requests: prometheus::IntCounterVec,
    watch_sessions: prometheus::IntGauge,
}

impl Metrics {
    fn new(registry: &prometheus::Registry) -> anyhow::Result<Metrics> {
        let connected =
            prometheus::IntGauge::new("capstan_gateway_connected_nodes", "Node agents connected to this master")?;
        let requests = prometheus::IntCounterVec::new(
            prometheus::Opts::new("capstan_gateway_requests_total", "Node agent requests by kind and result code"),
            &["request", "code"],
        )?;
        let watch_sessions =
            prometheus::IntGauge::new("capstan_gateway_pod_watches", "Pod watches node agents hold on this master")?;
        registry.register(Box::new(connected.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(watch_sessions.clone()))?;
        Ok(Metrics { connected, requests, watch_sessions })
    }
}

fn api_error(e: ApiError) -> NodeResponse {
    NodeResponse::error(e.code, e.reason, e.message)
}

fn forbidden(message: String) -> NodeResponse {
    NodeResponse::error(403, "Forbidden", message)
}

impl Gateway {
    pub fn new(
        api: Arc<ApiServer>,
        informers: &crate::controllers::informer::Informers,
        pki: Arc<Pki>,
        cidr: ClusterCidr,
        address: String,
        events: EventRecorder,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Arc<Gateway>> {
        let mut client = capstan_raft::pki::quic_client_config(pki.ca.cert_pem(), &pki.identity)?;
        client.transport_config(capstan_raft::transport::node_transport_config());
        let mut relay_endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
        relay_endpoint.set_default_client_config(client);
        let gw = Arc::new(Gateway {
            api,
            pods: informers.get("Pod").clone(),
            nodes: informers.get("Node").clone(),
            services: ["Service", "Endpoints"].map(|k| informers.get(k).clone()),
            pki,
            cidr,
            sessions: Mutex::default(),
            conns: Mutex::default(),
            address,
            relay_endpoint,
            relays: Mutex::default(),
            cidr_cache: Mutex::default(),
            references: Mutex::default(),
            next_session: AtomicU64::new(1),
            events,
            metrics: Metrics::new(registry)?,
        });
        let changes = gw.pods.subscribe();
        tokio::spawn(gw.clone().route(changes));
        Ok(gw)
    }

    /// The connection of `node`'s agent, if it is connected to this master.
    pub fn connection(&self, node: &str) -> Option<quinn::Connection> {
        self.conns.lock().get(node).filter(|c| c.close_reason().is_none()).cloned()
    }

    /// Accept loop; runs until the endpoint closes.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let gw = self.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => gw.connection_loop(conn).await,
                    Err(e) => tracing::debug!(error = %e, "node handshake failed"),
                }
            });
        }
    }

    async fn connection_loop(self: Arc<Self>, conn: quinn::Connection) {
        let info =
            capstan_raft::pki::peer_leaf(&conn).and_then(|leaf| capstan_raft::pki::cert_info(leaf.as_ref()).ok());
        let node = info.as_ref().and_then(authz::node_identity);
        let master = info
            .as_ref()
            .is_some_and(|i| i.server_auth && i.common_name.starts_with(capstan_raft::bootstrap::MASTER_CN_PREFIX));
        if let Some(n) = &node {
            tracing::info!(node = %n, remote = %conn.remote_address(), "node connected");
            if let Some(old) = self.conns.lock().insert(n.clone(), conn.clone()) {
                old.close(0u32.into(), b"replaced by a newer connection");
            }
            self.metrics.connected.inc();
            let (gw, n) = (self.clone(), n.clone());
            tokio::spawn(async move { gw.record_holder(&n).await });
        }
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (gw, node) = (self.clone(), node.clone());
            tokio::spawn(async move {
                if master {
                    gw.relay(send, recv).await
                } else {
                    gw.stream(node, send, recv).await
                }
            });
        }
        if let Some(n) = &node {
            self.metrics.connected.dec();
            let mut conns = self.conns.lock();
            if conns.get(n).is_some_and(|c| c.stable_id() == conn.stable_id()) {
                conns.remove(n);
            }
            tracing::info!(node = %n, reason = ?conn.close_reason(), "node disconnected");
        }
    }

    /// Records in the store that this master holds `node`'s connection.
    async fn record_holder(&self, node: &str) {
        use capstan_raft::types::{Command, Op, PutRequest, TxnRequest};
        let put = PutRequest {
            key: bytes::Bytes::from(holder_key(node)),
            value: bytes::Bytes::from(self.address.clone()),
            ..Default::default()
        };
        let txn = TxnRequest { compare: vec![], success: vec![Op::Put(put)], failure: vec![] };
        if let Err(e) = self.api.node.write(Command::Txn(txn)).await {
            tracing::warn!(node, error = %e, "could not record the node's gateway");
        }
    }

    /// A stream to `node`'s agent: on this master's connection to it, or
    /// relayed by the master that holds it.
    pub async fn open_agent_stream(&self, node: &str) -> Result<(quinn::SendStream, quinn::RecvStream), ApiError> {
        let unavailable =
            |why: String| ApiError::unavailable(format!("the node agent of node {node} is unreachable: {why}"));
        if let Some(c) = self.connection(node) {
            return c.open_bi().await.map_err(|e| unavailable(e.to_string()));
        }
        let holder = self
            .api
            .objects
            .range(&RangeRequest { range: KeyRange::key(bytes::Bytes::from(holder_key(node))), ..Default::default() })
            .ok()
            .and_then(|(kvs, _, _)| kvs.into_iter().next())
            .and_then(|kv| String::from_utf8(kv.value.to_vec()).ok())
            .filter(|h| *h != self.address)
            .ok_or_else(|| unavailable("it is not connected to any master".into()))?;
        let conn = self.relay_connection(&holder).await.map_err(|e| unavailable(format!("{holder}: {e:#}")))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unavailable(e.to_string()))?;
        write_message(&mut send, &NodeRequest::Relay { node: node.to_string() })
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        match read_message::<NodeResponse, _>(&mut recv, MAX_MESSAGE).await {
            Ok(NodeResponse::Done) => Ok((send, recv)),
            Ok(NodeResponse::Error { message, .. }) => Err(unavailable(message)),
            Ok(other) => Err(unavailable(format!("unexpected relay answer {other:?}"))),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    async fn relay_connection(&self, addr: &str) -> anyhow::Result<quinn::Connection> {
        if let Some(c) = self.relays.lock().get(addr).filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let sock: std::net::SocketAddr = addr.parse()?;
        let host = sock.ip().to_string();
        let c = tokio::time::timeout(std::time::Duration::from_secs(3), self.relay_endpoint.connect(sock, &host)?)
            .await??;
        self.relays.lock().insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Another master's stream: splice it onto a new stream to the agent.
    async fn relay(self: Arc<Self>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let node = match read_message::<NodeRequest, _>(&mut recv, MAX_MESSAGE).await {
            Ok(NodeRequest::Relay { node }) => node,
            Ok(_) => {
                let _ = reply(&mut send, &forbidden("masters may only relay".into())).await;
                return;
            }
            Err(e) => {
                let _ = reply(&mut send, &NodeResponse::error(400, "BadRequest", e.to_string())).await;
                return;
            }
        };
        let agent = match self.connection(&node) {
            Some(c) => c.open_bi().await.ok(),
            None => None,
        };
        let Some((mut to_agent, mut from_agent)) = agent else {
            let msg = format!("node {node} is not connected here");
            let _ = reply(&mut send, &NodeResponse::error(503, "ServiceUnavailable", msg)).await;
            return;
        };
        if write_message(&mut send, &NodeResponse::Done).await.is_err() {
            return;
        }
        let up = async {
            let _ = tokio::io::copy(&mut recv, &mut to_agent).await;
            let _ = to_agent.finish();
        };
        let down = async {
            let _ = tokio::io::copy(&mut from_agent, &mut send).await;
            let _ = send.finish();
        };
        tokio::join!(up, down);
    }

    async fn stream(self: Arc<Self>, node: Option<String>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let max = if node.is_some() { MAX_MESSAGE } else { MAX_ANONYMOUS_MESSAGE };
        let req = match read_message::<NodeRequest, _>(&mut recv, max).await {
            Ok(r) => r,
            Err(e) => {
                let _ = reply(&mut send, &NodeResponse::error(400, "BadRequest", e.to_string())).await;
                return;
            }
        };
        let kind = request_kind(&req);
        let resp = match (node, req) {
            (_, NodeRequest::Join { token, name, csr_pem }) => self.join(&token, &name, &csr_pem).await,
            (None, _) => NodeResponse::error(401, "Unauthorized", "a node certificate is required (join first)"),
            (Some(n), NodeRequest::WatchPods) => {
                self.metrics.requests.with_label_values(&[kind, "200"]).inc();
                self.watch_pods(&n, send).await;
                return;
            }
            (Some(_), NodeRequest::WatchServices) => {
                // Any node may read Services and Endpoints (Kubernetes'
                // system:node role does), as its proxy needs them all.
                self.metrics.requests.with_label_values(&[kind, "200"]).inc();
                self.watch_services(send).await;
                return;
            }
            (Some(n), req) => self.handle(&n, req).await,
        };
        let code = match &resp {
            NodeResponse::Error { code, .. } => code.to_string(),
            _ => "200".to_string(),
        };
        self.metrics.requests.with_label_values(&[kind, &code]).inc();
        let _ = reply(&mut send, &resp).await;
    }

    async fn handle(&self, node: &str, req: NodeRequest) -> NodeResponse {
        let result = match req {
            NodeRequest::Register { node: obj } => self.register(node, &obj).await,
            NodeRequest::Heartbeat { status } => self.heartbeat(node, status.as_deref()).await,
            NodeRequest::PodStatus { namespace, name, uid, status } => {
                self.pod_status(node, &namespace, &name, &uid, &status).await
            }
            NodeRequest::PodTerminated { namespace, name, uid } => {
                self.pod_terminated(node, &namespace, &name, &uid).await
            }
            NodeRequest::Get { resource, namespace, name } => self.get(node, &resource, &namespace, &name).await,
            NodeRequest::Usage { usage } => self.usage(node, &usage).await,
            NodeRequest::Token { namespace, pod, uid, audience, expiration_seconds } => {
                self.token(node, &namespace, &pod, &uid, audience, expiration_seconds).await
            }
            NodeRequest::Events { events } => self.pod_events(node, events),
            NodeRequest::Join { .. }
            | NodeRequest::WatchPods
            | NodeRequest::WatchServices
            | NodeRequest::Relay { .. } => Ok(NodeResponse::error(400, "BadRequest", "unexpected request")),
        };
        result.unwrap_or_else(api_error)
    }

    /// Stores the node's latest usage report where every master can serve
    /// it (`metrics.k8s.io`, `api/resource_metrics.rs`); it expires with its
    /// lease when the node stops reporting.
    async fn usage(&self, node: &str, usage: &NodeUsage) -> Result<NodeResponse, ApiError> {
        let report = serde_json::to_vec(usage).map_err(|e| ApiError::internal(e.to_string()))?;
        self.api.objects.put_node_metrics(node, report).await?;
        Ok(NodeResponse::Done)
    }

    /// Checks the bootstrap token and signs the agent's CSR as `system:node:<name>`.
    async fn join(&self, token: &str, name: &str, csr_pem: &str) -> NodeResponse {
        if !authz::valid_node_name(name) {
            return NodeResponse::error(422, "Invalid", format!("node name {name:?} is not a DNS-1123 subdomain"));
        }
        let token = match JoinToken::parse(token) {
            Ok(t) => t,
            Err(e) => return NodeResponse::error(401, "Unauthorized", e.to_string()),
        };
        if let Err(e) = self.api.objects.sync().await {
            return api_error(e);
        }
        let stored = self
            .api
            .objects
            .range(&RangeRequest { range: KeyRange::key(bytes::Bytes::from(token.store_key())), ..Default::default() })
            .ok()
            .and_then(|(kvs, _, _)| kvs.into_iter().next().map(|kv| kv.value));
        match stored {
            Some(v) if token.verify(&v, NODE_TOKEN_USAGE) => {}
            _ => return NodeResponse::error(401, "Unauthorized", "unknown, expired or non-node bootstrap token"),
        }
        let user = format!("{NODE_USER_PREFIX}{name}");
        match self.pki.ca.sign_client_csr(csr_pem, &user, &[NODES_GROUP.to_string()]) {
            Ok(cert_pem) => {
                tracing::info!(node = %name, "node joined");
                NodeResponse::Joined { cert_pem, ca_pem: self.pki.ca.cert_pem().to_string() }
            }
            Err(e) => NodeResponse::error(400, "BadRequest", format!("certificate request: {e}")),
        }
    }

    /// Creates or refreshes the node's Node: labels and status from the
    /// agent; a pod CIDR from the cluster's range if it has none.
    async fn register(&self, node: &str, body: &[u8]) -> Result<NodeResponse, ApiError> {
        let mut obj: Value =
            serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("Node is not JSON: {e}")))?;
        if obj["metadata"]["name"].as_str() != Some(node) {
            return Ok(forbidden(format!("node {node:?} may only register itself")));
        }
        authz::check_registration(&obj).map_err(ApiError::bad_request)?;
        let rt = crate::api::serviceaccount::kind("v1", "Node")?;
        let status = obj["status"].take();
        for _ in 0..8 {
            let cur = self.api.objects.get(rt, None, node).await?;
            let result = match &cur {
                None => self.create_node(rt, node, obj.clone()).await,
                Some(cur) => self.refresh_node(rt, node, cur, &obj).await,
            };
            match result {
                Ok(cidr) => {
                    self.write_node_status(node, &status).await?;
                    // An agent registers once per start: the kubelet's "Starting" event.
                    let started = format!("Starting node agent on {node}, pod CIDR {cidr}.");
                    let involved = ObjectRef::of(&crate::controllers::events::node_ref(node));
                    self.events.record(involved, node.to_string(), EventType::Normal, "Starting", started);
                    return Ok(NodeResponse::Registered { pod_cidr: cidr });
                }
                Err(e) if e.code == 409 || e.code == 422 => {
                    self.cidr_cache.lock().take();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::new(409, "Conflict", format!("node {node:?}: too many concurrent registrations")))
    }

    /// The pod CIDRs nodes hold, recomputed at most once a second: decoding
    /// every Node per registration made a burst of 5,000 registrations
    /// quadratic. A stale set only costs a retry (the claim in the store
    /// decides).
    fn used_cidrs(&self) -> BTreeSet<String> {
        let mut cache = self.cidr_cache.lock();
        if let Some((_, used)) = cache.as_ref().filter(|(at, _)| at.elapsed() < std::time::Duration::from_secs(1)) {
            return used.clone();
        }
        let used: BTreeSet<String> = self
            .nodes
            .list()
            .iter()
            .filter_map(|n| n.object()["spec"]["podCIDR"].as_str().map(str::to_string))
            .collect();
        *cache = Some((std::time::Instant::now(), used.clone()));
        used
    }

    /// A free block (racing registrations on other masters are settled by
    /// the claim in the store: the loser retries with the next block).
    fn pick_cidr(&self) -> Option<String> {
        let start = rand::random::<u32>() % self.cidr.blocks().max(1);
        let used = self.used_cidrs();
        self.cidr.free_block(&used, start).or_else(|| self.cidr.free_block(&used, 0))
    }

    async fn create_node(&self, rt: &ResourceType, node: &str, mut obj: Value) -> Result<String, ApiError> {
        let cidr = self.pick_cidr().unwrap_or_default();
        if cidr.is_empty() {
            tracing::warn!(node, "the cluster CIDR has no free pod CIDR left; node registered without one");
        } else {
            obj["spec"]["podCIDR"] = json!(cidr);
            obj["spec"]["podCIDRs"] = json!([cidr]);
        }
        internal::write(&self.api, rt, None, obj, MANAGER).await?;
        tracing::info!(node, pod_cidr = %cidr, "node registered");
        Ok(cidr)
    }

    async fn refresh_node(
        &self,
        rt: &ResourceType,
        node: &str,
        cur: &Found,
        agent: &Value,
    ) -> Result<String, ApiError> {
        let mut want = cur.object.clone();
        for field in ["labels", "annotations"] {
            for (k, v) in agent["metadata"][field].as_object().into_iter().flatten() {
                want["metadata"][field][k] = v.clone();
            }
        }
        let mut cidr = cur.object["spec"]["podCIDR"].as_str().unwrap_or_default().to_string();
        if cidr.is_empty() {
            if let Some(c) = self.pick_cidr() {
                let claim = crate::api::objects::pod_cidr_claim(&c);
                let owner = crate::api::objects::key(rt, None, node);
                if !self.api.objects.put_if_absent(claim.to_vec(), owner).await? {
                    self.cidr_cache.lock().take();
                    return Err(ApiError::new(409, "Conflict", "pod CIDR taken concurrently"));
                }
                want["spec"]["podCIDR"] = json!(c);
                want["spec"]["podCIDRs"] = json!([c]);
                cidr = c;
            }
        }
        if want != cur.object {
            internal::write(&self.api, rt, Some(cur), want, MANAGER).await?;
        }
        Ok(cidr)
    }

    /// Writes the agent's view of the node's status, keeping what the
    /// masters own (the node lifecycle controller's taints live in spec).
    async fn write_node_status(&self, node: &str, status: &Value) -> Result<(), ApiError> {
        if !status.is_object() {
            return Ok(());
        }
        let rt = crate::api::serviceaccount::kind("v1", "Node")?;
        for _ in 0..8 {
            let Some(cur) = self.api.objects.get(rt, None, node).await? else {
                return Err(ApiError::not_found("", "nodes", node));
            };
            let merged = merged_status(&cur.object["status"], status);
            if merged == cur.object["status"] {
                return Ok(());
            }
            match internal::write_status(&self.api, rt, &cur, merged).await {
                Err(e) if e.code == 409 => continue,
                r => return r.map(|_| ()),
            }
        }
        Err(ApiError::new(409, "Conflict", format!("node {node:?}: status kept changing")))
    }

    async fn heartbeat(&self, node: &str, status: Option<&[u8]>) -> Result<NodeResponse, ApiError> {
        if let Some(s) = status {
            let s: Value =
                serde_json::from_slice(s).map_err(|e| ApiError::bad_request(format!("NodeStatus is not JSON: {e}")))?;
            self.write_node_status(node, &s).await?;
        }
        let rt = crate::api::serviceaccount::kind("coordination.k8s.io/v1", "Lease")?;
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
        for _ in 0..8 {
            let cur = self.api.objects.get(rt, Some(LEASE_NAMESPACE), node).await?;
            let result = match &cur {
                None => {
                    let lease = json!({
                        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": node, "namespace": LEASE_NAMESPACE},
                        "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now},
                    });
                    internal::write(&self.api, rt, None, lease, MANAGER).await
                }
                Some(cur) => {
                    let mut lease = cur.object.clone();
                    lease["spec"]["holderIdentity"] = json!(node);
                    lease["spec"]["leaseDurationSeconds"] = json!(LEASE_SECONDS);
                    lease["spec"]["renewTime"] = json!(now);
                    internal::write(&self.api, rt, Some(cur), lease, MANAGER).await
                }
            };
            match result {
                Ok(_) => return Ok(NodeResponse::Done),
                Err(e) if e.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::new(409, "Conflict", format!("lease of node {node:?} kept changing")))
    }

    /// Records the Events an agent reports about its pods. A node speaks
    /// only about pods bound to it (checked against the pod informer, so a
    /// batch costs no store reads): the others are refused (403 naming
    /// them) while its own are still recorded, as the agent cannot do
    /// better with a batch that straddles a pod's deletion.
    fn pod_events(&self, node: &str, events: Vec<AgentEvent>) -> Result<NodeResponse, ApiError> {
        if events.len() > MAX_EVENTS {
            return Err(ApiError::bad_request(format!("at most {MAX_EVENTS} events per report")));
        }
        for e in &events {
            authz::check_event(e).map_err(ApiError::bad_request)?;
        }
        let mut refused = BTreeSet::new();
        for e in events {
            let key = format!("{}/{}", e.namespace, e.pod);
            let bound = self.pods.get(&key).is_some_and(|p| p.node_name() == node && p.uid() == e.uid);
            if !bound {
                refused.insert(key);
                continue;
            }
            let involved = ObjectRef {
                kind: "Pod".into(),
                api_version: "v1".into(),
                namespace: e.namespace,
                name: e.pod,
                uid: e.uid,
                resource_version: String::new(),
                field_path: e.container.map(|c| format!("spec.containers{{{c}}}")).unwrap_or_default(),
            };
            let type_ = if e.warning { EventType::Warning } else { EventType::Normal };
            self.events.record(involved, node.to_string(), type_, &e.reason, e.message);
        }
        if refused.is_empty() {
            return Ok(NodeResponse::Done);
        }
        let pods = refused.into_iter().collect::<Vec<_>>().join(", ");
        Ok(forbidden(format!("events about pods not bound to node {node:?} were not recorded: {pods}")))
    }

    /// The pod, if it is bound to `node` and is the one with `uid`.
    async fn own_pod(&self, node: &str, ns: &str, name: &str, uid: &str) -> Result<Option<Found>, ApiError> {
        let rt = crate::api::serviceaccount::kind("v1", "Pod")?;
        let Some(cur) = self.api.objects.get(rt, Some(ns), name).await? else { return Ok(None) };
        let bound = cur.object["spec"]["nodeName"].as_str() == Some(node);
        if !bound {
            return Err(ApiError::forbidden(format!("pod {ns}/{name} is not bound to node {node:?}")));
        }
        Ok((cur.object["metadata"]["uid"].as_str() == Some(uid)).then_some(cur))
    }

    async fn pod_status(
        &self,
        node: &str,
        ns: &str,
        name: &str,
        uid: &str,
        status: &[u8],
    ) -> Result<NodeResponse, ApiError> {
        let status: Value =
            serde_json::from_slice(status).map_err(|e| ApiError::bad_request(format!("PodStatus is not JSON: {e}")))?;
        let rt = crate::api::serviceaccount::kind("v1", "Pod")?;
        for _ in 0..8 {
            let Some(cur) = self.own_pod(node, ns, name, uid).await? else {
                // Gone or replaced: the status is about a pod that no longer exists.
                return Ok(NodeResponse::error(404, "NotFound", format!("pod {ns}/{name} with uid {uid} not found")));
            };
            let merged = merged_status(&cur.object["status"], &status);
            if merged == cur.object["status"] {
                return Ok(NodeResponse::Done);
            }
            match internal::write_status(&self.api, rt, &cur, merged).await {
                Ok(_) => return Ok(NodeResponse::Done),
                Err(e) if e.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::new(409, "Conflict", format!("pod {ns}/{name}: status kept changing")))
    }

    /// The agent stopped every container of a pod being deleted: finish the delete.
    async fn pod_terminated(&self, node: &str, ns: &str, name: &str, uid: &str) -> Result<NodeResponse, ApiError> {
        let rt = crate::api::serviceaccount::kind("v1", "Pod")?;
        for _ in 0..8 {
            let Some(cur) = self.own_pod(node, ns, name, uid).await? else { return Ok(NodeResponse::Done) };
            let now = crate::api::handlers::now();
            let plan = crate::api::admission::plan_delete("Pod", &cur.object, None, Some(0), &now);
            let result = match plan {
                crate::api::admission::DeletePlan::Now => {
                    self.api.objects.delete(rt, &cur.object, cur.mod_revision).await.map(|_| ())
                }
                crate::api::admission::DeletePlan::Mark(m) => {
                    self.api.objects.update(rt, m, cur.mod_revision).await.map(|_| ())
                }
                crate::api::admission::DeletePlan::Pending => Ok(()),
            };
            match result {
                Ok(()) => return Ok(NodeResponse::Done),
                Err(e) if e.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::new(409, "Conflict", format!("pod {ns}/{name} kept changing")))
    }

    /// A token for the ServiceAccount of a pod bound to `node`, bound to that pod.
    async fn token(
        &self,
        node: &str,
        ns: &str,
        pod: &str,
        uid: &str,
        audience: Option<String>,
        seconds: i64,
    ) -> Result<NodeResponse, ApiError> {
        let Some(cur) = self.own_pod(node, ns, pod, uid).await? else {
            return Ok(NodeResponse::error(404, "NotFound", format!("pod {ns}/{pod} with uid {uid} not found")));
        };
        let sa = cur.object["spec"]["serviceAccountName"].as_str().filter(|s| !s.is_empty()).unwrap_or("default");
        let mut spec = json!({
            "expirationSeconds": seconds,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid},
        });
        if let Some(a) = audience {
            spec["audiences"] = json!([a]);
        }
        let spec = crate::api::serviceaccount::token_spec(&spec)
            .map_err(|errs| ApiError::invalid("TokenRequest", sa, errs))?;
        let issued = crate::api::serviceaccount::issue(&self.api, ns, sa, &spec).await?;
        let body = json!({"token": issued.token, "expirationTimestamp": issued.expires});
        Ok(NodeResponse::Object { json: serde_json::to_vec(&body).unwrap_or_default() })
    }

    /// What pod `p` lets its node read (see `references`).
    fn references(&self, p: &crate::controllers::informer::Cached) -> References {
        if let Some((rev, refs)) = self.references.lock().get(&p.key) {
            if *rev == p.mod_revision {
                return refs.clone();
            }
        }
        let refs = Arc::new(authz::references(&p.object()));
        self.references.lock().insert(p.key.clone(), (p.mod_revision, refs.clone()));
        refs
    }

    /// A Secret, ConfigMap or PersistentVolumeClaim, if a pod bound to
    /// `node` references it; a PersistentVolume (`persistent_volume`).
    async fn get(&self, node: &str, resource: &str, ns: &str, name: &str) -> Result<NodeResponse, ApiError> {
        if resource == "persistentvolumes" {
            return self.persistent_volume(node, name).await;
        }
        let Some((resource, kind)) = authz::readable(resource) else {
            return Ok(forbidden(format!("nodes may not read {resource}")));
        };
        let wanted = (resource, name.to_string());
        let allowed = self
            .pods
            .list_node(node)
            .iter()
            .filter(|p| p.namespace() == ns)
            .any(|p| self.references(p).contains(&wanted));
        if !allowed {
            return Ok(forbidden(format!(
                "node {node:?} may not read {resource} {ns}/{name}: no pod bound to it references it"
            )));
        }
        match self.api.objects.get(crate::api::serviceaccount::kind("v1", kind)?, Some(ns), name).await? {
            Some(f) => Ok(NodeResponse::Object { json: serde_json::to_vec(&f.object).unwrap_or_default() }),
            None => Err(ApiError::not_found("", resource, name)),
        }
    }

    /// A PersistentVolume, if a claim of one of `node`'s pods is bound to
    /// it or it is pinned to `node`. One that does not exist is a 404 to
    /// any node: the agent's reclaimer removes a deleted volume's directory
    /// on that answer only (a 403 would keep it forever), and all a node
    /// learns from it is that the name is free.
    async fn persistent_volume(&self, node: &str, name: &str) -> Result<NodeResponse, ApiError> {
        let rt = crate::api::serviceaccount::kind("v1", "PersistentVolume")?;
        let Some(pv) = self.api.objects.get(rt, None, name).await? else {
            return Err(ApiError::not_found("", "persistentvolumes", name));
        };
        if authz::pinned_to(&pv.object, node) || self.claimed_on(node, &pv.object, name).await? {
            return Ok(NodeResponse::Object { json: serde_json::to_vec(&pv.object).unwrap_or_default() });
        }
        Ok(forbidden(format!(
            "node {node:?} may not read persistentvolumes {name}: it is neither pinned to the node nor bound to a claim of its pods"
        )))
    }

    /// Whether a claim that a pod bound to `node` uses names PersistentVolume
    /// `name` (`pv`) as its volume.
    async fn claimed_on(&self, node: &str, pv: &Value, name: &str) -> Result<bool, ApiError> {
        let mut claims: Vec<(String, String)> = Vec::new();
        for p in self.pods.list_node(node).iter() {
            let refs = self.references(p);
            let pvcs = refs.iter().filter(|(r, _)| *r == "persistentvolumeclaims");
            claims.extend(pvcs.map(|(_, c)| (p.namespace().to_string(), c.clone())));
        }
        claims.sort();
        claims.dedup();
        // The claim the volume says it is bound to first: usually the only read.
        let bound_to = authz::claim_ref(pv);
        claims.sort_by_key(|(ns, c)| Some((ns.as_str(), c.as_str())) != bound_to);
        let rt = crate::api::serviceaccount::kind("v1", "PersistentVolumeClaim")?;
        self.api.objects.sync().await?;
        for (ns, c) in &claims {
            let pvc = self.api.objects.get_local(rt, Some(ns), c)?;
            if pvc.as_ref().and_then(|f| authz::claim_volume(&f.object)) == Some(name) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Streams the node's pods: a listing, then its changes, until the
    /// agent goes away or falls behind.
    async fn watch_pods(&self, node: &str, mut send: quinn::SendStream) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
        let listing = self.pods.attach(|pods, seq| {
            self.sessions.lock().entry(node.to_string()).or_default().push(Session { id, floor: seq, tx });
            pods.list_node(node)
        });
        self.metrics.watch_sessions.inc();
        let events = listing
            .iter()
            .map(|p| PodEvent {
                key: p.key.clone(),
                delete: false,
                mod_revision: p.mod_revision,
                object: p.bytes().to_vec(),
            })
            .collect();
        let mut ok = write_message(&mut send, &NodeResponse::Watching).await.is_ok()
            && write_frame(&mut send, &PodFrame { reset: true, events }.encode()).await.is_ok();
        while ok {
            let Some(first) = rx.recv().await else { break };
            let mut events = vec![first];
            while events.len() < 256 {
                match rx.try_recv() {
                    Ok(e) => events.push(e),
                    Err(_) => break,
                }
            }
            ok = write_frame(&mut send, &PodFrame { reset: false, events }.encode()).await.is_ok();
        }
        if let Some(list) = self.sessions.lock().get_mut(node) {
            list.retain(|s| s.id != id);
        }
        self.metrics.watch_sessions.dec();
        let _ = send.finish();
    }

    /// Streams every Service and Endpoints: a listing, then their changes,
    /// until the agent goes away. Event keys are `<Kind>/<namespace>/<name>`.
    async fn watch_services(&self, mut send: quinn::SendStream) {
        let event = |kind: &str, key: &str, new: Option<&Arc<Cached>>| match new {
            Some(c) => PodEvent {
                key: format!("{kind}/{key}"),
                delete: false,
                mod_revision: c.mod_revision,
                object: c.bytes().to_vec(),
            },
            None => PodEvent { key: format!("{kind}/{key}"), delete: true, mod_revision: 0, object: vec![] },
        };
        let [services, endpoints] = &self.services;
        let (svc_list, mut svc_rx) = services.list_and_subscribe();
        let (ep_list, mut ep_rx) = endpoints.list_and_subscribe();
        let listing = svc_list
            .iter()
            .map(|c| event("Service", &c.key, Some(c)))
            .chain(ep_list.iter().map(|c| event("Endpoints", &c.key, Some(c))))
            .collect();
        let mut ok = write_message(&mut send, &NodeResponse::Watching).await.is_ok()
            && write_frame(&mut send, &PodFrame { reset: true, events: listing }.encode()).await.is_ok();
        while ok {
            let first = tokio::select! {
                Some(c) = svc_rx.recv() => event("Service", &c.key, c.new.as_ref()),
                Some(c) = ep_rx.recv() => event("Endpoints", &c.key, c.new.as_ref()),
                else => break,
            };
            let mut events = vec![first];
            while events.len() < 256 {
                match (svc_rx.try_recv(), ep_rx.try_recv()) {
                    (Err(_), Err(_)) => break,
                    (s, e) => {
                        events.extend(s.ok().map(|c| event("Service", &c.key, c.new.as_ref())));
                        events.extend(e.ok().map(|c| event("Endpoints", &c.key, c.new.as_ref())));
                    }
                }
            }
            ok = write_frame(&mut send, &PodFrame { reset: false, events }.encode()).await.is_ok();
        }
        let _ = send.finish();
    }

    /// The router: each pod change goes to the sessions of the nodes it names.
    async fn route(self: Arc<Self>, mut changes: mpsc::UnboundedReceiver<Change>) {
        while let Some(c) = changes.recv().await {
            if c.new.is_none() {
                self.references.lock().remove(&c.key);
            }
            let was = c.old.as_ref().map(|o| o.node_name().to_string()).filter(|n| !n.is_empty());
            let is = c.new.as_ref().map(|n| n.node_name().to_string()).filter(|n| !n.is_empty());
            if was.is_none() && is.is_none() {
                continue;
            }
            let mut sessions = self.sessions.lock();
            for node in [was.as_ref(), is.as_ref()].into_iter().flatten().collect::<BTreeSet<_>>() {
                let Some(list) = sessions.get_mut(node.as_str()) else { continue };
                let event = match &c.new {
                    Some(n) if is.as_ref() == Some(node) => PodEvent {
                        key: c.key.clone(),
                        delete: false,
                        mod_revision: n.mod_revision,
                        object: n.bytes().to_vec(),
                    },
                    _ => PodEvent { key: c.key.clone(), delete: true, mod_revision: 0, object: vec![] },
                };
                // A full queue drops the session: the agent re-watches.
                list.retain(|s| c.seq <= s.floor || s.tx.try_send(event.clone()).is_ok());
                if list.is_empty() {
                    sessions.remove(node.as_str());
                }
            }
        }
    }
}

fn request_kind(req: &NodeRequest) -> &'static str {
    match req {
        NodeRequest::Join { .. } => "join",
        NodeRequest::Register { .. } => "register",
        NodeRequest::Heartbeat { .. } => "heartbeat",
        NodeRequest::PodStatus { .. } => "pod_status",
        NodeRequest::PodTerminated { .. } => "pod_terminated",
        NodeRequest::Get { .. } => "get",
        NodeRequest::WatchPods => "watch_pods",
        NodeRequest::WatchServices => "watch_services",
        NodeRequest::Usage { .. } => "usage",
        NodeRequest::Relay { .. } => "relay",
        NodeRequest::Token { .. } => "token",
        NodeRequest::Events { .. } => "events",
    }
}

/// The agent's status fields over the stored ones (fields the agent does
/// not report, such as a pod's nominatedNodeName, are kept).
fn merged_status(cur: &Value, update: &Value) -> Value {
    let mut merged = if cur.is_object() { cur.clone() } else { json!({}) };
    for (k, v) in update.as_object().into_iter().flatten() {
        merged[k] = v.clone();
    }
    merged
}

fn holder_key(node: &str) -> Vec<u8> {
    format!("/capstan/gateway/nodes/{node}").into_bytes()
}

async fn reply(send: &mut quinn::SendStream, resp: &NodeResponse) -> Result<(), WireError> {
    write_message(send, resp).await?;
    send.finish().map_err(|e| WireError::Io(std::io::Error::other(e)))
}
