//! Starting a master's store: a new cluster (`init`), joining one with a
//! bootstrap token (`join`), or restarting from the data dir alone.
//!
//! Data dir layout:
//! ```text
//! <data-dir>/member.json     id, name, addresses (written once, at init/join)
//! <data-dir>/pki/ca.crt      cluster CA (every master holds it, to sign joiners)
//! <data-dir>/pki/ca.key
//! <data-dir>/pki/master.crt  this master's certificate, CN "master:<name>"
//! <data-dir>/pki/master.key
//! <data-dir>/db/             RocksDB (see storage.rs)
//! <data-dir>/snapshot.bin    the latest Raft snapshot
//! ```
//!
//! Bootstrap tokens live in the replicated store under
//! `/capstan/bootstrap-tokens/<id>` (value: JSON with the SHA-256 of the
//! secret and the usage), attached to a lease so they expire. The token a
//! joiner is given, `capstan1.<id>.<secret>.<ca-sha256>`, also pins the CA
//! so the joiner can trust the master it first dials.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::node::{Limits, StoreNode};
use crate::pki::{self, CertifiedKey, ClusterCa};
use crate::storage::Storage;
use crate::transport::{transport_config, JoinRequest, Network, PeerClients, PeerRequest, PeerResponse};
use crate::types::*;
use crate::watch::WatchHub;

pub const MASTER_CN_PREFIX: &str = "master:";
pub const TOKEN_PREFIX: &str = "/capstan/bootstrap-tokens/";

pub struct Pki {
    pub ca: ClusterCa,
    pub identity: CertifiedKey,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberFile {
    pub id: NodeId,
    pub name: String,
    pub peer_listen: SocketAddr,
    pub peer_advertise: String,
    pub client_url: String,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub peer_listen: SocketAddr,
    /// Address other masters dial; defaults to `peer_listen`.
    pub peer_advertise: Option<String>,
    /// etcd v3 URL clients use for this master.
    pub client_url: String,
    /// More names or addresses clients reach this master by (e.g. its
    /// Kubernetes API address), added to its certificate's SANs.
    pub extra_sans: Vec<String>,
    pub limits: Limits,
    /// Take a snapshot (and purge the log behind it) every this many entries.
    pub snapshot_every: u64,
    pub timing: Timing,
    /// With `Bootstrap::Init`: start the new cluster from this backup.
    pub restore: Option<crate::mvcc::Image>,
}

pub enum Bootstrap {
    Init,
    Join { addr: String, token: String },
    Restart,
}

pub struct Started {
    pub node: Arc<StoreNode>,
    pub pki: Arc<Pki>,
    pub member: MemberFile,
    pub storage: Arc<Storage>,
    pub endpoint: quinn::Endpoint,
    /// Becomes true once this master knows it was removed from the cluster
    /// (a peer said so, or it applied its own removal); it should stop.
    pub removed: tokio::sync::watch::Receiver<bool>,
}

fn pki_dir(d: &Path) -> PathBuf {
    d.join("pki")
}

/// Writes a secret file (mode 0600) and syncs it.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Replaces `path` with `contents` so that a crash or power cut at any
/// moment leaves either the old file or the new one, complete: a temporary
/// file is written and synced, renamed over `path`, and the directory
/// synced (the rename itself is durable only then).
pub fn write_durable(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut name = path.file_name().ok_or_else(|| anyhow::anyhow!("{}: not a file path", path.display()))?.to_owned();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn save_pki(dir: &Path, ca_cert: &str, ca_key: &str, id: &CertifiedKey) -> anyhow::Result<()> {
    let p = pki_dir(dir);
    std::fs::create_dir_all(&p)?;
    write_private(&p.join("ca.crt"), ca_cert)?;
    write_private(&p.join("ca.key"), ca_key)?;
    write_private(&p.join("master.crt"), &id.cert_pem)?;
    write_private(&p.join("master.key"), &id.key_pem)?;
    Ok(())
}

/// Loads the CA and this master's identity from a data dir.
pub fn load_pki(dir: &Path) -> anyhow::Result<Pki> {
    let p = pki_dir(dir);
    let read = |n: &str| std::fs::read_to_string(p.join(n)).with_context(|| format!("reading {}", p.join(n).display()));
    let ca = ClusterCa::from_pem(&read("ca.crt")?, &read("ca.key")?)?;
    let identity = CertifiedKey { cert_pem: read("master.crt")?, key_pem: read("master.key")? };
    Ok(Pki { ca, identity })
}

pub fn load_member(dir: &Path) -> anyhow::Result<MemberFile> {
    let path = dir.join("member.json");
    let b = std::fs::read(&path).with_context(|| format!("{} is not a master data dir", dir.display()))?;
    Ok(serde_json::from_slice(&b)?)
}

/// The subject CN of the first certificate in a PEM.
pub fn common_name_of_pem(pem: &str) -> anyhow::Result<String> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| anyhow::anyhow!("bad PEM: {e}"))?;
    Ok(pki::common_name(&parsed.contents)?)
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> String {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']).to_string()
}

/// Hosts for a master's certificate SANs.
fn cert_hosts(cfg: &StoreConfig, advertise: &str) -> Vec<String> {
    let mut hosts = vec![host_of(advertise), cfg.peer_listen.ip().to_string()];
    if let Some(h) = cfg.client_url.split("://").nth(1) {
        hosts.push(host_of(h.trim_end_matches('/')));
    }
    hosts.extend(cfg.extra_sans.iter().cloned());
    hosts.sort();
    hosts.dedup();
    hosts.retain(|h| h != "0.0.0.0" && h != "::");
    hosts
}

/// A bootstrap token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    pub ca_fingerprint: String,
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    secret_sha256: String,
    usage: String,
}

impl JoinToken {
    pub fn generate(ca_fingerprint: &str) -> JoinToken {
        let mut rng = rand::thread_rng();
        let hexn = |n: usize, rng: &mut rand::rngs::ThreadRng| -> String {
            (0..n).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
        };
        JoinToken { id: hexn(4, &mut rng), secret: hexn(16, &mut rng), ca_fingerprint: ca_fingerprint.to_string() }
    }

    pub fn parse(s: &str) -> anyhow::Result<JoinToken> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        match parts.as_slice() {
            ["capstan1", id, secret, fp]
                if !id.is_empty()
                    && !secret.is_empty()
                    && fp.len() == 64
                    && fp.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                Ok(JoinToken { id: id.to_string(), secret: secret.to_string(), ca_fingerprint: fp.to_lowercase() })
            }
            _ => bail!("malformed bootstrap token (expected capstan1.<id>.<secret>.<ca-sha256>)"),
        }
    }

    pub fn store_key(&self) -> Vec<u8> {
        format!("{TOKEN_PREFIX}{}", self.id).into_bytes()
    }

    pub fn store_value(&self, usage: &str) -> Vec<u8> {
        let st =
            StoredToken { secret_sha256: hex::encode(Sha256::digest(self.secret.as_bytes())), usage: usage.into() };
        serde_json::to_vec(&st).unwrap_or_default()
    }

    /// Does the stored value match this token's secret, for this usage?
    pub fn verify(&self, stored: &[u8], usage: &str) -> bool {
        let Ok(st) = serde_json::from_slice::<StoredToken>(stored) else {
            return false;
        };
        let want = hex::encode(Sha256::digest(self.secret.as_bytes()));
        // Constant-time enough for hex digests of equal length.
        st.usage == usage
            && st.secret_sha256.len() == want.len()
            && st.secret_sha256.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "capstan1.{}.{}.{}", self.id, self.secret, self.ca_fingerprint)
    }
}

/// Raft timing, as etcd's `--heartbeat-interval` and `--election-timeout`
/// (milliseconds). The heartbeat interval is also openraft's deadline for
/// one AppendEntries round trip (and a ReadIndex round), so it must exceed
/// the round-trip time between masters, or nothing commits; elections
/// start after a random time in [election/2, election] without a leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub election_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { heartbeat_ms: 100, election_ms: 1000 }
    }
}

impl Timing {
    /// Whether openraft can run with these; if not, why.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.heartbeat_ms > 0, "the heartbeat interval must be positive");
        anyhow::ensure!(
            self.election_ms / 2 > self.heartbeat_ms,
            "the election timeout ({} ms) must be more than twice the heartbeat interval ({} ms)",
            self.election_ms,
            self.heartbeat_ms
        );
        Ok(())
    }
}

fn raft_config(snapshot_every: u64, timing: Timing) -> anyhow::Result<Arc<openraft::Config>> {
    timing.check()?;
    let cfg = openraft::Config {
        cluster_name: "capstan".into(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_ms / 2,
        election_timeout_max: timing.election_ms,
        // Entries can be batches of up to 4 MiB (batch.rs); keep a message bounded.
        max_payload_entries: 32,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: 256,
        snapshot_max_chunk_size: 1 << 20,
        ..Default::default()
    };
    Ok(Arc::new(cfg.validate()?))
}

/// QUIC endpoint settings for this master's listeners: the stateless-reset
/// key (and the key its connection ids are hashed with) is kept in the
/// data dir (`quic-reset.key`, 0600), so a master that restarts (after a
/// crash: no CONNECTION_CLOSE was sent) recognises the ids of connections
/// it no longer has and answers them with a valid stateless reset. Their
/// other ends (node agents, peers) learn at once that the connection is
/// gone and reconnect, instead of waiting out the idle timeout.
pub fn quic_endpoint_config(data_dir: &Path) -> anyhow::Result<quinn::EndpointConfig> {
    let path = data_dir.join("quic-reset.key");
    let key = match std::fs::read_to_string(&path) {
        Ok(text) => hex::decode(text.trim())
            .ok()
            .filter(|k| k.len() == 64)
            .with_context(|| format!("{} is not 64 hex-encoded bytes", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = vec![0u8; 64];
            rand::thread_rng().fill(&mut key[..]);
            write_private(&path, &hex::encode(&key))?;
            key
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let cid_key = u64::from_le_bytes(ring::hmac::sign(&hmac, b"connection ids").as_ref()[..8].try_into()?);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(hmac));
    cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    Ok(cfg)
}

fn endpoint(listen: SocketAddr, pki: &Pki, data_dir: &Path) -> anyhow::Result<quinn::Endpoint> {
    let mut server = pki::quic_server_config(pki.ca.cert_pem(), &pki.identity, true)?;
    server.transport_config(transport_config());
    let socket = std::net::UdpSocket::bind(listen).with_context(|| format!("binding peer address {listen}"))?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let mut ep = quinn::Endpoint::new(quic_endpoint_config(data_dir)?, Some(server), socket, runtime)?;
    let mut client = pki::quic_client_config(pki.ca.cert_pem(), &pki.identity)?;
    client.transport_config(transport_config());
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Dial `addr` anonymously (pinning the CA from the token) and join.
async fn request_join(cfg: &StoreConfig, addr: &str, token: &str, advertise: &str) -> anyhow::Result<(Pki, NodeId)> {
    let parsed = JoinToken::parse(token)?;
    let hosts = cert_hosts(cfg, advertise);
    let (key_pem, csr_pem) = pki::make_csr(&format!("{MASTER_CN_PREFIX}{}", cfg.name), &hosts)?;
    let bind: SocketAddr = if cfg.peer_listen.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse()?;
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(pki::quic_anonymous_client_config(&parsed.ca_fingerprint)?);
    let clients = PeerClients::new(ep.clone());
    let req = PeerRequest::Join(JoinRequest {
        token: token.to_string(),
        name: cfg.name.clone(),
        csr_pem,
        peer_addr: advertise.to_string(),
        client_url: cfg.client_url.clone(),
    });
    let mut last_err = String::new();
    for _ in 0..50 {
        match clients.call(addr, &req, Duration::from_secs(15)).await {
            Ok(PeerResponse::Join(r)) => {
                ep.close(0u32.into(), b"joined");
                let ca = ClusterCa::from_pem(&r.ca_cert_pem, &r.ca_key_pem)?;
                return Ok((Pki { ca, identity: CertifiedKey { cert_pem: r.cert_pem, key_pem } }, r.id));
            }
            Ok(PeerResponse::Error(e)) if e.starts_with("join refused") || e.starts_with("malformed") => {
                bail!("{e}")
            }
            Ok(PeerResponse::Error(e)) => last_err = e,
            Ok(other) => last_err = format!("unexpected answer {other:?}"),
            Err(e) => last_err = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("could not join through {addr}: {last_err}")
}

/// Start this master's store.
pub async fn start(cfg: StoreConfig, how: Bootstrap) -> anyhow::Result<Started> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let already = cfg.data_dir.join("member.json").exists();
    let advertise = cfg.peer_advertise.clone().unwrap_or_else(|| cfg.peer_listen.to_string());
    let (member, pki, init) = match how {
        Bootstrap::Restart => (load_member(&cfg.data_dir)?, load_pki(&cfg.data_dir)?, false),
        _ if already => bail!("{} already holds a master; restart with --data-dir only", cfg.data_dir.display()),
        Bootstrap::Init => {
            let ca = ClusterCa::generate("capstan")?;
            let name = format!("{MASTER_CN_PREFIX}{}", cfg.name);
            let identity = ca.issue_member(&name, &cert_hosts(&cfg, &advertise), Some(1))?;
            save_pki(&cfg.data_dir, ca.cert_pem(), ca.key_pem(), &identity)?;
            let m = MemberFile {
                id: 1,
                name: cfg.name.clone(),
                peer_listen: cfg.peer_listen,
                peer_advertise: advertise.clone(),
                client_url: cfg.client_url.clone(),
            };
            (m, Pki { ca, identity }, true)
        }
        Bootstrap::Join { ref addr, ref token } => {
            let (pki, id) = request_join(&cfg, addr, token, &advertise).await?;
            save_pki(&cfg.data_dir, pki.ca.cert_pem(), pki.ca.key_pem(), &pki.identity)?;
            let m = MemberFile {
                id,
                name: cfg.name.clone(),
                peer_listen: cfg.peer_listen,
                peer_advertise: advertise.clone(),
                client_url: cfg.client_url.clone(),
            };
            (m, pki, false)
        }
    };
    let pki = Arc::new(pki);
    let storage = Arc::new(Storage::open(&cfg.data_dir)?);
    if let (true, Some(image)) = (init, cfg.restore.clone()) {
        storage.load_image(image)?;
    }
    let hub = Arc::new(WatchHub::new(4096));
    let sm = storage.state_machine(hub.clone())?;
    let state = sm.shared();
    hub.attach(state.clone());
    let ep = endpoint(member.peer_listen, &pki, &cfg.data_dir)?;
    let clients = Arc::new(PeerClients::new(ep.clone()));
    let removed = clients.removed();
    let network = Network { clients: clients.clone() };
    let mut log_store = storage.log_store()?;
    let started_at = {
        use openraft::storage::RaftLogStorage;
        let last = log_store.get_log_state().await?.last_log_id.map_or(0, |l| l.index);
        (log_store.read_vote().await?.map_or(0, |v| v.leader_id().get_term()), last)
    };
    let raft = Raft::new(member.id, raft_config(cfg.snapshot_every, cfg.timing)?, network, log_store, sm).await?;
    let node = StoreNode::new(member.id, raft, hub, state, clients, cfg.limits.clone(), started_at);
    tokio::spawn(crate::peer::serve_peers(ep.clone(), node.clone(), pki.clone()));
    tokio::spawn(node.clone().run_leader_duties());
    tokio::spawn(node.clone().track_leader_changes());
    tokio::spawn(node.clone().watch_disk(cfg.data_dir.clone()));
    tokio::spawn(node.clone().watch_own_removal());
    let self_member = Member {
        name: member.name.clone(),
        peer_addr: member.peer_advertise.clone(),
        client_url: member.client_url.clone(),
    };
    if init && !node.raft.is_initialized().await? {
        node.raft.initialize(BTreeMap::from([(member.id, self_member.clone())])).await?;
    }
    // member.json is written last: its presence means "bootstrapped".
    write_durable(&cfg.data_dir.join("member.json"), &serde_json::to_vec_pretty(&member)?)?;
    if let Bootstrap::Join { addr, .. } = how {
        // Now that our Raft runs, ask the leader (through the master we
        // joined) to replicate to us and make us a voter.
        let promote = PeerRequest::Promote { id: member.id, member: self_member };
        let mut last = String::new();
        let mut done = false;
        // Catching up a large store can take a while, but not forever.
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while !done && std::time::Instant::now() < deadline {
            match node.clients().call(&addr, &promote, Duration::from_secs(60)).await {
                Ok(PeerResponse::Done) => done = true,
                Ok(PeerResponse::Error(e)) => last = e,
                Ok(other) => last = format!("{other:?}"),
                Err(e) => last = e.to_string(),
            }
            if !done {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if !done {
            bail!("joined, but could not become a voter: {last}");
        }
    }
    Ok(Started { node, pki, member, storage, endpoint: ep, removed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_writes_replace_whole_files_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("member.json");
        write_durable(&p, b"{\"a\":1}").unwrap();
        write_durable(&p, b"{}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("member.json")]);
        assert!(write_durable(&dir.path().join("missing/x.json"), b"x").is_err());
    }

    /// A client connected to an endpoint that dies without a word (its
    /// runtime dropped: no CONNECTION_CLOSE) and comes back on the same
    /// port. With the key from the same data dir the client is reset at
    /// once; with another key it hears nothing (it would wait out its idle
    /// timeout).
    #[test]
    fn a_restarted_endpoint_resets_connections_it_forgot() {
        let ca = ClusterCa::generate("t").unwrap();
        let id = ca.issue_master("master:m", &["127.0.0.1".to_string()]).unwrap();
        let server_cfg = || pki::quic_server_config(ca.cert_pem(), &id, true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let serve = |dir: &Path, socket: std::net::UdpSocket| {
            quinn::Endpoint::new(
                quic_endpoint_config(dir).unwrap(),
                Some(server_cfg()),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .unwrap()
        };
        let client_rt = tokio::runtime::Runtime::new().unwrap();
        for (restart_dir, reset_expected) in [(dir.path(), true), (other.path(), false)] {
            let server_rt = tokio::runtime::Runtime::new().unwrap();
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = socket.local_addr().unwrap();
            let first = server_rt.block_on(async { serve(dir.path(), socket) });
            let accepted = server_rt.spawn(async move {
                let conn = first.accept().await.unwrap().await.unwrap();
                (first, conn)
            });
            let client = client_rt.block_on(async {
                let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                ep.set_default_client_config(pki::quic_client_config(ca.cert_pem(), &id).unwrap());
                let conn = ep.connect(addr, "127.0.0.1").unwrap().await.unwrap();
                (ep, conn)
            });
            let kept = server_rt.block_on(accepted).unwrap();
            // The crash: the driver tasks stop first, so dropping the
            // endpoint and connection afterwards sends nothing. Wait for the
            // workers to drop them: `shutdown_background` returns while a
            // worker may still poll the driver, and the implicit close on
            // drop below would then go out as a CONNECTION_CLOSE.
            server_rt.shutdown_timeout(Duration::from_secs(5));
            drop(kept);
            // The old socket closes as the runtime's threads wind down.
            let socket = (0..100)
                .find_map(|_| {
                    std::net::UdpSocket::bind(addr).ok().or_else(|| {
                        std::thread::sleep(Duration::from_millis(20));
                        None
                    })
                })
                .expect("the port is free again");
            let again = client_rt.block_on(async { serve(restart_dir, socket) });
            let reset = client_rt.block_on(async {
                if let Ok(mut s) = client.1.open_uni().await {
                    let _ = s.write_all(b"hello").await;
                }
                tokio::time::timeout(Duration::from_secs(3), client.1.closed()).await
            });
            match reset {
                Ok(e) => assert!(reset_expected && e == quinn::ConnectionError::Reset, "closed with {e:?}"),
                Err(_) => assert!(!reset_expected, "no reset within 3 s from the restarted endpoint"),
            }
            drop(again);
        }
    }
}
