//! `capstan server`: one master.
//!
//! First start: `--init` (new cluster) or `--join <peer addr> --token <t>`.
//! Later starts need only `--data-dir`: the addresses are kept in
//! `<data-dir>/server.json`. Once serving, the master writes
//! `<data-dir>/endpoints.json` with the addresses it actually bound (ports
//! given as 0 are resolved), which `capstan up` and tests read.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use capstan_raft::bootstrap::{self, Bootstrap, StoreConfig, Timing};
use capstan_raft::Limits;
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::etcd::EtcdApi;

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Directory for this master's state; restarts need only this flag.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Member name (first start only).
    #[arg(long)]
    pub name: Option<String>,
    /// Create a new cluster with this master as its first member.
    #[arg(long, conflicts_with = "join")]
    pub init: bool,
    /// Join an existing cluster through this master's peer address.
    #[arg(long, requires = "token")]
    pub join: Option<String>,
    /// With --init: start the new cluster from a backup taken with
    /// `capstan snapshot save` (or `etcdctl snapshot save` against Capstan).
    #[arg(long, requires = "init")]
    pub restore: Option<PathBuf>,
    /// Prepare the data dir, then stop instead of serving (`capstan snapshot restore`).
    #[arg(long, hide = true)]
    pub exit_when_ready: bool,
    /// Bootstrap token from `capstan token create`.
    #[arg(long)]
    pub token: Option<String>,
    /// QUIC peer listen address (port 0 = pick a free one, kept for restarts).
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
    /// Peer address other masters dial (default: the listen address).
    #[arg(long)]
    pub peer_advertise: Option<String>,
    /// etcd v3 gRPC listen address (TLS, client certificates required).
    #[arg(long)]
    pub etcd_listen: Option<SocketAddr>,
    /// Kubernetes API server listen address (HTTPS) [default: 127.0.0.1:6443].
    #[arg(long)]
    pub api_listen: Option<SocketAddr>,
    /// HTTP listener for /metrics, /livez, /readyz, /healthz [default: 127.0.0.1:2381].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// QUIC listener for node agents (UDP) [default: 127.0.0.1:2382].
    #[arg(long)]
    pub node_listen: Option<SocketAddr>,
    /// The pod network, split into a /24 per node [default: 10.244.0.0/16].
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// Additional plaintext etcd listener; loopback addresses only (benchmarks).
    #[arg(long)]
    pub etcd_plaintext_listen: Option<SocketAddr>,
    /// Largest accepted request in bytes [default: 1572864]. Settings given
    /// once are kept for restarts; a flag given again overrides them.
    #[arg(long)]
    pub max_request_bytes: Option<usize>,
    /// Hard quota of stored data in bytes; 80% of it is the soft quota [default: 8 GiB].
    #[arg(long)]
    pub quota_bytes: Option<u64>,
    /// Free bytes a master's data disk keeps: below it, writes that add
    /// data are refused on every master (etcd's NOSPACE alarm) until space
    /// is freed [default: 256 MiB].
    #[arg(long)]
    pub min_free_disk_bytes: Option<u64>,
    /// Revisions of history to keep; older ones are compacted, 0 = never [default: 100000].
    #[arg(long)]
    pub auto_compaction_revisions: Option<i64>,
    /// Seconds without a node heartbeat before the node is Unknown and
    /// tainted unreachable [default: 40].
    #[arg(long)]
    pub node_monitor_grace_period: Option<u64>,
    /// Raft log entries between snapshots [default: 10000].
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Milliseconds between the leader's heartbeats, as etcd's flag; also
    /// the deadline of one replication round trip, so it must exceed the
    /// round-trip time between masters. Use the same value on every master
    /// [default: 100].
    #[arg(long)]
    pub heartbeat_interval: Option<u64>,
    /// Milliseconds without a leader before a master campaigns (randomised
    /// in [t/2, t]), as etcd's flag; more than twice the heartbeat
    /// interval [default: 1000].
    #[arg(long)]
    pub election_timeout: Option<u64>,
}

/// Tunables, persisted so a restart with `--data-dir` alone keeps them.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Settings {
    #[serde(default = "default_node_grace")]
    pub node_monitor_grace_period: u64,
    pub max_request_bytes: usize,
    pub quota_bytes: u64,
    pub auto_compaction_revisions: i64,
    pub snapshot_every: u64,
    #[serde(default = "default_cluster_cidr")]
    pub cluster_cidr: String,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: u64,
    #[serde(default = "default_election")]
    pub election_timeout: u64,
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk_bytes: u64,
}

fn default_min_free_disk() -> u64 {
    capstan_raft::node::DEFAULT_MIN_FREE_DISK
}

fn default_heartbeat() -> u64 {
    Timing::default().heartbeat_ms
}

fn default_election() -> u64 {
    Timing::default().election_ms
}

fn default_cluster_cidr() -> String {
    "10.244.0.0/16".into()
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            node_monitor_grace_period: default_node_grace(),
            max_request_bytes: 3 * 1024 * 1024 / 2,
            quota_bytes: 8 << 30,
            auto_compaction_revisions: 100_000,
            snapshot_every: 10_000,
            cluster_cidr: default_cluster_cidr(),
            heartbeat_interval: default_heartbeat(),
            election_timeout: default_election(),
            min_free_disk_bytes: default_min_free_disk(),
        }
    }
}

fn default_node_grace() -> u64 {
    40
}

impl Settings {
    fn overridden_by(mut self, a: &ServerArgs) -> Settings {
        self.node_monitor_grace_period = a.node_monitor_grace_period.unwrap_or(self.node_monitor_grace_period);
        self.max_request_bytes = a.max_request_bytes.unwrap_or(self.max_request_bytes);
        self.quota_bytes = a.quota_bytes.unwrap_or(self.quota_bytes);
        self.auto_compaction_revisions = a.auto_compaction_revisions.unwrap_or(self.auto_compaction_revisions);
        self.snapshot_every = a.snapshot_every.unwrap_or(self.snapshot_every);
        self.cluster_cidr = a.cluster_cidr.clone().unwrap_or(self.cluster_cidr);
        self.heartbeat_interval = a.heartbeat_interval.unwrap_or(self.heartbeat_interval);
        self.election_timeout = a.election_timeout.unwrap_or(self.election_timeout);
        self.min_free_disk_bytes = a.min_free_disk_bytes.unwrap_or(self.min_free_disk_bytes);
        self
    }
}

/// Addresses and settings kept across restarts.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ServerFile {
    pub etcd_listen: SocketAddr,
    #[serde(default = "default_api_listen")]
    pub api_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub etcd_plaintext_listen: Option<SocketAddr>,
    #[serde(default = "default_node_listen")]
    pub node_listen: SocketAddr,
    #[serde(default)]
    pub settings: Settings,
}

fn default_node_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 2382))
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6443))
}

/// What a running master actually serves.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Endpoints {
    pub name: String,
    pub id: u64,
    pub peer: String,
    pub etcd_url: String,
    pub etcd_plaintext_url: Option<String>,
    /// Kubernetes API (HTTPS).
    #[serde(default)]
    pub api_url: String,
    pub metrics_url: String,
    /// Node gateway (QUIC) address agents dial.
    #[serde(default)]
    pub node_addr: String,
    pub pid: u32,
}

pub fn read_endpoints(data_dir: &Path) -> anyhow::Result<Endpoints> {
    let p = data_dir.join("endpoints.json");
    let b = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_slice(&b)?)
}

fn free_udp_port(ip: std::net::IpAddr) -> anyhow::Result<u16> {
    Ok(UdpSocket::bind((ip, 0))?.local_addr()?.port())
}

/// Exit status of a master that stopped because it was removed from the
/// cluster; `capstan up` does not restart it.
pub const EXIT_REMOVED: u8 = 3;

/// Why a removed master stopped.
#[derive(Debug, thiserror::Error)]
#[error(
    "this master was removed from the cluster; delete its data dir, or rejoin with a fresh one \
     (`capstan member add`)"
)]
pub struct Removed;

pub async fn run(a: ServerArgs) -> anyhow::Result<()> {
    let bootstrapped = a.data_dir.join("member.json").exists();
    let how = match (a.init, &a.join, bootstrapped) {
        (false, None, true) => Bootstrap::Restart,
        (true, None, false) => Bootstrap::Init,
        (false, Some(addr), false) => {
            Bootstrap::Join { addr: addr.clone(), token: a.token.clone().unwrap_or_default() }
        }
        (_, _, true) => bail!("{} already holds a master: restart it with --data-dir only", a.data_dir.display()),
        (false, None, false) => bail!("{} holds no master: start with --init or --join", a.data_dir.display()),
        (true, Some(_), _) => bail!("--init and --join exclude each other"),
    };
    let (name, peer_listen, server_file) = if bootstrapped {
        let m = bootstrap::load_member(&a.data_dir)?;
        let sf: ServerFile = serde_json::from_slice(&std::fs::read(a.data_dir.join("server.json"))?)?;
        (m.name, m.peer_listen, sf)
    } else {
        let name = a.name.clone().context("--name is required on first start")?;
        let mut peer = a.peer_listen.unwrap_or_else(|| "127.0.0.1:2380".parse().expect("static addr"));
        if peer.port() == 0 {
            peer.set_port(free_udp_port(peer.ip())?);
        }
        let etcd = a.etcd_listen.unwrap_or_else(|| "127.0.0.1:2379".parse().expect("static addr"));
        let metrics = a.metrics_listen.unwrap_or_else(|| "127.0.0.1:2381".parse().expect("static addr"));
        let sf = ServerFile {
            etcd_listen: etcd,
            api_listen: a.api_listen.unwrap_or_else(default_api_listen),
            metrics_listen: metrics,
            etcd_plaintext_listen: a.etcd_plaintext_listen,
            node_listen: a.node_listen.unwrap_or_else(default_node_listen),
            settings: Settings::default(),
        };
        (name, peer, sf)
    };
    let settings = server_file.settings.clone().overridden_by(&a);
    let timing = Timing { heartbeat_ms: settings.heartbeat_interval, election_ms: settings.election_timeout };
    timing.check().context("--heartbeat-interval, --election-timeout")?;
    let cluster_cidr = crate::gateway::authz::ClusterCidr::parse(&settings.cluster_cidr)
        .map_err(|e| anyhow::anyhow!("--cluster-cidr: {e}"))?;
    if let Some(p) = server_file.etcd_plaintext_listen {
        if !p.ip().is_loopback() {
            bail!("--etcd-plaintext-listen must be a loopback address (got {p}); use the TLS listener");
        }
    }
    // Bind the etcd listeners first: with port 0 the actual port goes into
    // this master's advertised client URL.
    let etcd_listener = TcpListener::bind(server_file.etcd_listen)
        .await
        .with_context(|| format!("binding etcd address {}", server_file.etcd_listen))?;
    let etcd_addr = etcd_listener.local_addr()?;
    let plain_listener = match server_file.etcd_plaintext_listen {
        Some(p) => Some(TcpListener::bind(p).await.with_context(|| format!("binding {p}"))?),
        None => None,
    };
    let metrics_listener = TcpListener::bind(server_file.metrics_listen)
        .await
        .with_context(|| format!("binding metrics address {}", server_file.metrics_listen))?;
    let api_listener = TcpListener::bind(server_file.api_listen)
        .await
        .with_context(|| format!("binding API address {}", server_file.api_listen))?;
    let node_socket = UdpSocket::bind(server_file.node_listen)
        .with_context(|| format!("binding node gateway address {}", server_file.node_listen))?;
    let mut persisted = server_file.clone();
    persisted.node_listen = node_socket.local_addr()?;
    persisted.api_listen = api_listener.local_addr()?;
    persisted.metrics_listen = metrics_listener.local_addr()?;
    persisted.settings = settings.clone();
    persisted.etcd_listen = etcd_addr;
    if let Some(l) = &plain_listener {
        persisted.etcd_plaintext_listen = Some(l.local_addr()?);
    }
    let client_url = format!("https://{etcd_addr}");
    let hard = settings.quota_bytes;
    let cfg = StoreConfig {
        name: name.clone(),
        data_dir: a.data_dir.clone(),
        peer_listen,
        peer_advertise: a.peer_advertise.clone(),
        client_url: client_url.clone(),
        // In-cluster clients reach the API as the kubernetes Service.
        extra_sans: [
            persisted.api_listen.ip().to_string(),
            capstan_proto::k8s::network::KUBERNETES_SERVICE_IP.to_string(),
        ]
        .into_iter()
        .chain(["kubernetes", "kubernetes.default", "kubernetes.default.svc"].iter().map(|s| s.to_string()))
        .chain([format!("kubernetes.default.svc.{}", capstan_proto::k8s::network::CLUSTER_DOMAIN)])
        .collect(),
        limits: Limits {
            max_request_bytes: settings.max_request_bytes,
            quota_soft_bytes: hard / 10 * 8,
            quota_hard_bytes: hard,
            retain_revisions: settings.auto_compaction_revisions,
            min_free_disk_bytes: settings.min_free_disk_bytes,
        },
        snapshot_every: settings.snapshot_every,
        timing,
        restore: match &a.restore {
            Some(path) => {
                let bytes = std::fs::read(path).with_context(|| format!("reading backup {}", path.display()))?;
                Some(capstan_raft::backup::decode(&bytes).with_context(|| format!("backup {}", path.display()))?)
            }
            None => None,
        },
    };
    std::fs::create_dir_all(&a.data_dir)?;
    let started = bootstrap::start(cfg, how).await?;
    capstan_raft::bootstrap::write_durable(&a.data_dir.join("server.json"), &serde_json::to_vec_pretty(&persisted)?)?;

    let cluster_id = u64::from_str_radix(&started.pki.ca.fingerprint()[..16], 16).unwrap_or(1);
    let api = EtcdApi { node: started.node.clone(), cluster_id };
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            format!("{}{}", started.pki.identity.cert_pem, started.pki.ca.cert_pem()),
            &started.pki.identity.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(started.pki.ca.cert_pem()));
    let routes = api.clone().routes(settings.max_request_bytes);
    let tls_server = tonic::transport::Server::builder()
        .tls_config(tls)?
        .tcp_nodelay(true)
        .add_routes(routes)
        .serve_with_incoming(TcpListenerStream::new(etcd_listener));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move { tls_server.await.context("etcd TLS listener") });
    let registry = crate::health::registry(&started.node, &started.storage)?;
    let api_tls = capstan_raft::pki::rustls_server_config(
        started.pki.ca.cert_pem(),
        &started.pki.identity,
        true,
        rustls::DEFAULT_VERSIONS,
        &[b"h2", b"http/1.1"],
    )?;
    let api_server = std::sync::Arc::new(crate::api::ApiServer {
        objects: crate::api::objects::Objects::new(started.node.clone()),
        hub: started.node.hub.clone(),
        node: started.node.clone(),
        max_request_bytes: settings.max_request_bytes,
        address: persisted.api_listen.to_string(),
        metrics: crate::api::ApiMetrics::new(&registry)?,
        ca_pem: started.pki.ca.cert_pem().to_string(),
        sa_key: Default::default(),
        bindings: Default::default(),
        gateway: Default::default(),
    });
    tokio::spawn(crate::api::bootstrap::ensure_forever(api_server.clone()));
    tokio::spawn(crate::api::apiservers::run(api_server.clone(), name.clone(), persisted.api_listen));
    let crate::controllers::Started { leading, informers, kubelet_events } = crate::controllers::start(
        api_server.clone(),
        name.clone(),
        &registry,
        std::time::Duration::from_secs(settings.node_monitor_grace_period),
    )?;
    tokio::spawn(crate::controllers::gc::run(api_server.objects.clone(), leading));
    let gateway = crate::gateway::Gateway::new(
        api_server.clone(),
        &informers,
        started.pki.clone(),
        cluster_cidr,
        persisted.node_listen.to_string(),
        kubelet_events,
        &registry,
    )?;
    let node_endpoint = {
        let mut server = capstan_raft::pki::quic_server_config(started.pki.ca.cert_pem(), &started.pki.identity, true)?;
        server.transport_config(capstan_raft::transport::node_transport_config());
        quinn::Endpoint::new(
            bootstrap::quic_endpoint_config(&a.data_dir)?,
            Some(server),
            node_socket,
            std::sync::Arc::new(quinn::TokioRuntime),
        )?
    };
    let _ = api_server.gateway.set(gateway.clone());
    tokio::spawn(gateway.clone().serve(node_endpoint));
    let api_tls = std::sync::Arc::new(api_tls);
    let serving = api_server.clone();
    tasks.spawn(async move { serving.serve(api_listener, api_tls).await.context("API listener") });
    let ops = crate::health::router(started.node.clone(), started.storage.clone(), registry);
    tasks.spawn(async move { axum::serve(metrics_listener, ops).await.context("metrics listener") });
    let mut plain_url = None;
    if let Some(l) = plain_listener {
        plain_url = Some(format!("http://{}", l.local_addr()?));
        let routes = api.clone().routes(settings.max_request_bytes);
        let srv = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_routes(routes)
            .serve_with_incoming(TcpListenerStream::new(l));
        tasks.spawn(async move { srv.await.context("etcd plaintext listener") });
    }
    let endpoints = Endpoints {
        name: name.clone(),
        id: started.member.id,
        peer: started.member.peer_advertise.clone(),
        etcd_url: client_url,
        etcd_plaintext_url: plain_url,
        api_url: format!("https://{}", persisted.api_listen),
        metrics_url: format!("http://{}", persisted.metrics_listen),
        node_addr: persisted.node_listen.to_string(),
        pid: std::process::id(),
    };
    capstan_raft::bootstrap::write_durable(
        &a.data_dir.join("endpoints.json"),
        &serde_json::to_vec_pretty(&endpoints)?,
    )?;
    tracing::info!(name = %name, id = started.member.id, peer = %endpoints.peer, etcd = %endpoints.etcd_url, "master serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut removed = false;
    if a.exit_when_ready {
        // A one-member cluster is ready once it leads and has applied its first entries.
        let wait = started.node.raft.wait(Some(std::time::Duration::from_secs(30)));
        wait.state(openraft::ServerState::Leader, "restored cluster elects itself").await?;
        started.node.read_index().await?;
        tracing::info!("data dir prepared; start it with `capstan server --data-dir {}`", a.data_dir.display());
    } else {
        let mut told = started.removed.clone();
        tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = term.recv() => tracing::info!("terminated; shutting down"),
        Ok(_) = told.wait_for(|r| *r) => removed = true,
        Some(r) = tasks.join_next() => {
            let r = r.context("listener task")?;
            r?;
        }
        }
    }
    let _ = std::fs::remove_file(a.data_dir.join("endpoints.json"));
    let _ = started.node.raft.shutdown().await;
    started.endpoint.close(0u32.into(), b"shutdown");
    if removed {
        return Err(Removed.into());
    }
    Ok(())
}
