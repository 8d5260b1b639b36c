//! `capstan kubeconfig`: a kubeconfig for the admin or for a named user,
//! authenticated by a client certificate from the cluster CA or by a bearer
//! token kept (hashed) in the store. `capstan up` writes the admin one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use capstan_proto::etcd::etcdserverpb as pb;
use capstan_raft::bootstrap;
use clap::Args;

use crate::server::read_endpoints;

/// How the kubeconfig's user authenticates.
pub enum Credential<'a> {
    Cert { cert_pem: &'a str, key_pem: &'a str },
    Token(&'a str),
}

/// The kubeconfig YAML (pure).
pub fn render(server: &str, ca_pem: &str, user: &str, cred: Credential) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let credential = match cred {
        Credential::Cert { cert_pem, key_pem } => {
            serde_json::json!({"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)})
        }
        Credential::Token(t) => serde_json::json!({"token": t}),
    };
    let context = format!("{user}@capstan");
    // Serialized, not formatted: any user name stays one YAML string.
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "capstan", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": credential}],
        "contexts": [{"name": context, "context": {"cluster": "capstan", "user": user, "namespace": "default"}}],
        "current-context": context,
    });
    serde_norway::to_string(&config).unwrap_or_default()
}

#[derive(Args, Debug)]
pub struct KubeconfigArgs {
    /// A master's data dir, or the data dir given to `capstan up`.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// User name (certificate CN or token user) [default: admin, in system:masters].
    #[arg(long)]
    pub user: Option<String>,
    /// Groups of the user (repeat the flag).
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// Authenticate with a bearer token stored in the cluster instead of a certificate.
    #[arg(long)]
    pub token: bool,
    /// Write to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The master data dir holding the CA: the dir itself or `up`'s master-1.
fn master_dir(d: &Path) -> PathBuf {
    if d.join("pki").join("ca.key").exists() {
        d.to_path_buf()
    } else {
        d.join("master-1")
    }
}

pub async fn run(a: KubeconfigArgs) -> anyhow::Result<()> {
    let dir = master_dir(&a.data_dir);
    let pki = bootstrap::load_pki(&dir).with_context(|| format!("no master data dir at {}", dir.display()))?;
    let ep = read_endpoints(&dir).context("is that master running?")?;
    let (user, groups) = match &a.user {
        Some(u) => (u.clone(), a.groups.clone()),
        None => (crate::admin::ADMIN_USER.to_string(), vec![crate::admin::ADMIN_GROUP.to_string()]),
    };
    let yaml = if a.token {
        let token = issue_token(&dir, &user, &groups).await?;
        render(&ep.api_url, pki.ca.cert_pem(), &user, Credential::Token(&token))
    } else {
        let cert = pki.ca.issue_client(&user, &groups)?;
        render(
            &ep.api_url,
            pki.ca.cert_pem(),
            &user,
            Credential::Cert { cert_pem: &cert.cert_pem, key_pem: &cert.key_pem },
        )
    };
    match a.out {
        Some(p) => write_private(&p, &yaml)?,
        None => print!("{yaml}"),
    }
    Ok(())
}

/// Stores a new API token for `user` and returns it.
async fn issue_token(dir: &Path, user: &str, groups: &[String]) -> anyhow::Result<String> {
    use rand::RngCore;
    let mut raw = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut raw);
    let token = format!("capstan-{}", hex::encode(raw));
    let record = crate::api::TokenRecord { user: user.to_string(), groups: groups.to_vec() };
    let ch = crate::admin::admin_channel(dir).await?;
    pb::kv_client::KvClient::new(ch)
        .put(pb::PutRequest {
            key: crate::api::token_key(&token),
            value: serde_json::to_vec(&record)?,
            ..Default::default()
        })
        .await
        .context("storing the token")?;
    Ok(token)
}

/// Kubeconfigs hold credentials: owner-only.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_kubeconfig_kubectl_reads() {
        let y = render("https://127.0.0.1:6443", "CA", "alice", Credential::Token("t0k"));
        let v: serde_json::Value = serde_norway::from_str(&y).unwrap();
        assert_eq!(v["current-context"], "alice@capstan");
        assert_eq!(v["clusters"][0]["cluster"]["server"], "https://127.0.0.1:6443");
        assert_eq!(v["users"][0]["user"]["token"], "t0k");
        assert_eq!(v["clusters"][0]["cluster"]["certificate-authority-data"], "Q0E=");
        let odd = render("https://h:1", "CA", "eve: {x}", Credential::Token("t"));
        let v: serde_json::Value = serde_norway::from_str(&odd).unwrap();
        assert_eq!(v["users"][0]["name"], "eve: {x}", "a user name cannot inject YAML");
    }
}
