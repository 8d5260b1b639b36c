//! Admin credentials and the etcd client operator commands use.
//!
//! An operator command run on a master's host reads that master's data dir:
//! the CA there signs a short-lived in-memory admin certificate, and
//! `endpoints.json` says where the master serves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use capstan_proto::etcd::etcdserverpb as pb;
use capstan_raft::bootstrap::{self, JoinToken};
use capstan_raft::pki::CertifiedKey;
use clap::Args;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::server::read_endpoints;

pub const ADMIN_USER: &str = "admin";
pub const ADMIN_GROUP: &str = "system:masters";

/// Issue an admin client certificate from the CA in a master's data dir.
pub fn issue_admin(data_dir: &Path) -> anyhow::Result<(String, CertifiedKey)> {
    let pki = bootstrap::load_pki(data_dir)?;
    let cert = pki.ca.issue_client(ADMIN_USER, &[ADMIN_GROUP.to_string()])?;
    Ok((pki.ca.cert_pem().to_string(), cert))
}

/// An etcd gRPC channel to `url` authenticated as `cert`.
pub async fn channel(url: &str, ca_pem: &str, cert: &CertifiedKey) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
    let ch = Channel::from_shared(url.to_string())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(ch)
}

/// Admin channel to the master whose data dir this is, and the cluster CA (PEM).
async fn admin_channel_and_ca(data_dir: &Path) -> anyhow::Result<(Channel, String)> {
    let ep = read_endpoints(data_dir).context("is that master running?")?;
    let (ca, cert) = issue_admin(data_dir)?;
    Ok((channel(&ep.etcd_url, &ca, &cert).await?, ca))
}

/// Admin channel to the master whose data dir this is.
pub async fn admin_channel(data_dir: &Path) -> anyhow::Result<Channel> {
    Ok(admin_channel_and_ca(data_dir).await?.0)
}

/// Store a new bootstrap token (expiring with a lease) and return it.
pub async fn create_token(data_dir: &Path, ttl: Duration, usage: &str) -> anyhow::Result<JoinToken> {
    let ttl = i64::try_from(ttl.as_secs())
        .ok()
        .filter(|t| (1..=9_000_000_000).contains(t))
        .context("token lifetime must be between 1 s and 9,000,000,000 s")?;
    let (ch, ca) = admin_channel_and_ca(data_dir).await?;
    let token = JoinToken::generate(&capstan_raft::pki::fingerprint_pem(&ca)?);
    let lease = pb::lease_client::LeaseClient::new(ch.clone())
        .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
        .await
        .context("granting the token's lease")?
        .into_inner();
    pb::kv_client::KvClient::new(ch)
        .put(pb::PutRequest {
            key: token.store_key(),
            value: token.store_value(usage),
            lease: lease.id,
            ..Default::default()
        })
        .await
        .context("storing the token")?;
    Ok(token)
}

#[derive(Args, Debug)]
pub struct TokenCreateArgs {
    /// Data dir of a running master on this host.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// What the token admits: a node agent (`capstan-node --token`) or a
    /// new master (`capstan server --join --token`).
    #[arg(long, value_enum, default_value_t = TokenUsage::Node)]
    pub usage: TokenUsage,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenUsage {
    Node,
    Master,
}

pub async fn token_create(a: TokenCreateArgs) -> anyhow::Result<()> {
    let usage = match a.usage {
        TokenUsage::Node => capstan_proto::nodewire::NODE_TOKEN_USAGE,
        TokenUsage::Master => "master",
    };
    let token = create_token(&a.data_dir, Duration::from_secs(a.ttl), usage).await?;
    println!("{token}");
    Ok(())
}

#[derive(Args, Debug)]
pub struct TokenListArgs {
    /// Data dir of a running master on this host.
    #[arg(long)]
    pub data_dir: PathBuf,
}

/// Bootstrap tokens in the store: id, usage and remaining lifetime (the
/// secrets are stored only as hashes and cannot be shown again).
pub async fn token_list(a: TokenListArgs) -> anyhow::Result<()> {
    let ch = admin_channel(&a.data_dir).await?;
    let prefix = bootstrap::TOKEN_PREFIX.as_bytes().to_vec();
    let mut end = prefix.clone();
    *end.last_mut().expect("non-empty prefix") += 1;
    let r = pb::kv_client::KvClient::new(ch.clone())
        .range(pb::RangeRequest { key: prefix.clone(), range_end: end, ..Default::default() })
        .await?
        .into_inner();
    println!("{:<10} {:<8} EXPIRES IN", "ID", "USAGE");
    for kv in r.kvs {
        let id = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
        let usage = serde_json::from_slice::<serde_json::Value>(&kv.value)
            .ok()
            .and_then(|v| v["usage"].as_str().map(String::from))
            .unwrap_or_else(|| "?".into());
        let ttl = if kv.lease == 0 {
            "never".to_string()
        } else {
            let t = pb::lease_client::LeaseClient::new(ch.clone())
                .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: kv.lease, keys: false })
                .await?
                .into_inner();
            format!("{}s", t.ttl)
        };
        println!("{id:<10} {usage:<8} {ttl}");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct TokenDeleteArgs {
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The token id (the part after `capstan1.`), or the whole token.
    pub token: String,
}

pub async fn token_delete(a: TokenDeleteArgs) -> anyhow::Result<()> {
    let id = match JoinToken::parse(&a.token) {
        Ok(t) => t.id,
        Err(_) => a.token.clone(),
    };
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        anyhow::bail!("{:?} is not a token id", a.token);
    }
    let ch = admin_channel(&a.data_dir).await?;
    let key = format!("{}{id}", bootstrap::TOKEN_PREFIX).into_bytes();
    let r = pb::kv_client::KvClient::new(ch).delete_range(pb::DeleteRangeRequest { key, ..Default::default() }).await?;
    if r.into_inner().deleted == 0 {
        anyhow::bail!("no token with id {id}");
    }
    println!("deleted token {id}");
    Ok(())
}
