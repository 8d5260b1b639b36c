//! gRPC channels to the store's endpoints, plain or TLS.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// TLS material, as etcdctl's `--cacert`, `--cert` and `--key`.
#[derive(Clone, Debug, Default)]
pub struct Tls {
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Tls {
    fn enabled(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some()
    }

    fn client_config(&self, host: &str) -> Result<ClientTlsConfig> {
        let mut cfg = ClientTlsConfig::new().domain_name(host.trim_start_matches('[').trim_end_matches(']'));
        if let Some(ca) = &self.cacert {
            let pem = std::fs::read(ca).with_context(|| format!("reading --cacert {}", ca.display()))?;
            cfg = cfg.ca_certificate(Certificate::from_pem(pem));
        }
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                let cert = std::fs::read(c).with_context(|| format!("reading --cert {}", c.display()))?;
                let key = std::fs::read(k).with_context(|| format!("reading --key {}", k.display()))?;
                cfg = cfg.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => bail!("--cert and --key go together"),
        }
        Ok(cfg)
    }
}

/// Adds a scheme to a bare `host:port`: https when TLS material was given.
fn url(endpoint: &str, tls: &Tls) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else if tls.enabled() {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// Opens `conns` channels (each its own HTTP/2 connection), spread
/// round-robin over `endpoints`.
pub async fn open(endpoints: &[String], conns: usize, tls: &Tls) -> Result<Vec<Channel>> {
    if endpoints.is_empty() {
        bail!("no endpoints given");
    }
    let mut out = Vec::with_capacity(conns);
    for i in 0..conns {
        let url = url(&endpoints[i % endpoints.len()], tls);
        let mut ep = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad endpoint {url}"))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_adaptive_window(true);
        if url.starts_with("https://") {
            let host = ep.uri().host().unwrap_or_default().to_string();
            ep = ep.tls_config(tls.client_config(&host)?)?;
        }
        let ch = ep.connect().await.with_context(|| format!("connecting to {url}"))?;
        out.push(ch);
    }
    Ok(out)
}
