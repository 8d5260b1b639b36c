//! Sandboxes without a pause container: a sandbox is a network namespace
//! (a bind-mounted file, made and wired by the `PodNetwork`) plus the
//! /etc/hosts, /etc/resolv.conf and /etc/hostname its containers mount.
//! Each is recorded as `<data_dir>/sandboxes/<id>/sandbox.json` beside
//! those files, so a restarted agent lists them; containerd knows nothing
//! of sandboxes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::spec::SandboxSpec;
use super::{new_id, Containerd};
use crate::runtime::{PortMapping, RuntimeError, Sandbox, SandboxConfig};

/// What pod networking made for a sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetworkSetup {
    /// The network namespace file (e.g. /var/run/netns/<id>).
    pub netns: PathBuf,
    pub ip: IpAddr,
}

/// The seam to pod networking (netns.rs + cni.rs): called once per
/// non-host-network sandbox. `teardown` must be idempotent: it runs again
/// when an earlier removal failed halfway, and right after a failed
/// `setup` with an empty `netns` path (clean up by sandbox id then).
pub trait PodNetwork: Send + Sync + 'static {
    /// The node's pod CIDR, once the masters assigned it.
    fn set_pod_cidr(&self, _cidr: &str) {}
    fn setup<'a>(
        &'a self,
        sandbox_id: &'a str,
        cfg: &'a SandboxConfig,
    ) -> BoxFuture<'a, Result<PodNetworkSetup, RuntimeError>>;
    fn teardown<'a>(
        &'a self,
        sandbox_id: &'a str,
        netns: &'a Path,
        cfg: &'a SandboxConfig,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PortRecord {
    container_port: u16,
    host_port: u16,
    protocol: String,
    host_ip: Option<IpAddr>,
}

/// sandbox.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SandboxRecord {
    id: String,
    pod_uid: String,
    namespace: String,
    name: String,
    hostname: String,
    host_network: bool,
    ports: Vec<PortRecord>,
    ip: Option<IpAddr>,
    netns: Option<PathBuf>,
}

impl SandboxRecord {
    fn config(&self) -> SandboxConfig {
        SandboxConfig {
            pod_uid: self.pod_uid.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            hostname: self.hostname.clone(),
            port_mappings: self
                .ports
                .iter()
                .map(|p| PortMapping {
                    container_port: p.container_port,
                    host_port: p.host_port,
                    protocol: p.protocol.clone(),
                    host_ip: p.host_ip,
                })
                .collect(),
            host_network: self.host_network,
            resolv_conf: None,
            domain: None,
        }
    }

    fn sandbox(&self) -> Sandbox {
        Sandbox { id: self.id.clone(), pod_uid: self.pod_uid.clone(), ip: self.ip, netns: self.netns.clone() }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Containerd {
    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("sandboxes").join(id)
    }

    fn read_record(&self, id: &str) -> Result<Option<SandboxRecord>, RuntimeError> {
        if !valid_id(id) {
            return Err(RuntimeError::NotFound(format!("sandbox {id:?}")));
        }
        let path = self.sandbox_dir(id).join("sandbox.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| RuntimeError::Other(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RuntimeError::Other(format!("{}: {e}", path.display()))),
        }
    }

    fn write_record(&self, r: &SandboxRecord) -> Result<(), RuntimeError> {
        let dir = self.sandbox_dir(&r.id);
        let tmp = dir.join("sandbox.json.tmp");
        let bytes = serde_json::to_vec_pretty(r).map_err(|e| RuntimeError::Other(e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, dir.join("sandbox.json")))
            .map_err(|e| RuntimeError::Other(format!("write sandbox record in {}: {e}", dir.display())))
    }

    /// What a container of `sandbox` mounts and joins. A sandbox this agent
    /// has no record of (made elsewhere) still gives its netns.
    pub(super) fn sandbox_spec(&self, sandbox: &Sandbox) -> Result<SandboxSpec, RuntimeError> {
        match self.read_record(&sandbox.id)? {
            Some(r) => {
                let dir = self.sandbox_dir(&r.id);
                Ok(SandboxSpec {
                    netns: r.netns.clone(),
                    host_network: r.host_network,
                    hostname: r.hostname.clone(),
                    etc_hosts: Some(dir.join("hosts")),
                    resolv_conf: Some(dir.join("resolv.conf")),
                    etc_hostname: Some(dir.join("hostname")),
                })
            }
            None => Ok(SandboxSpec {
                netns: sandbox.netns.clone(),
                host_network: sandbox.netns.is_none(),
                ..Default::default()
            }),
        }
    }
}

fn hosts_file(hostname: &str, domain: Option<&str>, ip: Option<IpAddr>) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file (written by capstan-node).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    match (ip, domain) {
        (Some(ip), Some(d)) => s.push_str(&format!("{ip}\t{hostname}.{d}\t{hostname}\n")),
        (Some(ip), None) => s.push_str(&format!("{ip}\t{hostname}\n")),
        (None, _) => {}
    }
    s
}

pub async fn run_sandbox(c: &Containerd, cfg: &SandboxConfig) -> Result<Sandbox, RuntimeError> {
    let id = new_id();
    let dir = c.sandbox_dir(&id);
    std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::Other(format!("create {}: {e}", dir.display())))?;
    let mut rec = SandboxRecord {
        id: id.clone(),
        pod_uid: cfg.pod_uid.clone(),
        namespace: cfg.namespace.clone(),
        name: cfg.name.clone(),
        hostname: cfg.hostname.clone(),
        host_network: cfg.host_network,
        ports: cfg
            .port_mappings
            .iter()
            .map(|p| PortRecord {
                container_port: p.container_port,
                host_port: p.host_port,
                protocol: p.protocol.clone(),
                host_ip: p.host_ip,
            })
            .collect(),
        ip: None,
        netns: None,
    };
    // Recorded before networking, so a crash in between leaves a record
    // whose removal tears the half-made network down.
    c.write_record(&rec)?;
    if !cfg.host_network {
        let Some(net) = &c.network else {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(RuntimeError::Network("no pod network is configured; only hostNetwork pods can run".into()));
        };
        match net.setup(&id, cfg).await {
            Ok(s) => {
                rec.ip = Some(s.ip);
                rec.netns = Some(s.netns);
            }
            Err(e) => {
                // Best effort: the plugins may have done half their work.
                let netns = PathBuf::new();
                if let Err(t) = net.teardown(&id, &netns, cfg).await {
                    tracing::warn!(sandbox = %id, error = %t, "teardown after failed setup");
                }
                let _ = std::fs::remove_dir_all(&dir);
                return Err(match e {
                    RuntimeError::Network(m) => RuntimeError::Network(m),
                    other => RuntimeError::Network(other.to_string()),
                });
            }
        }
    }
    let hostname = if cfg.host_network {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
    } else {
        cfg.hostname.clone()
    };
    let resolv = match &cfg.resolv_conf {
        Some(r) => r.clone().into_bytes(),
        None => std::fs::read("/etc/resolv.conf").unwrap_or_default(),
    };
    let files = [
        ("hostname", format!("{hostname}\n").into_bytes()),
        ("hosts", hosts_file(&hostname, cfg.domain.as_deref(), rec.ip).into_bytes()),
        ("resolv.conf", resolv),
    ];
    for (name, content) in files {
        std::fs::write(dir.join(name), content)
            .map_err(|e| RuntimeError::Other(format!("write {}: {e}", dir.join(name).display())))?;
    }
    c.write_record(&rec)?;
    Ok(rec.sandbox())
}

pub async fn remove_sandbox(c: &Containerd, id: &str) -> Result<(), RuntimeError> {
    let Some(rec) = c.read_record(id)? else { return Ok(()) };
    if !rec.host_network {
        if let Some(net) = &c.network {
            let netns = rec.netns.clone().unwrap_or_default();
            net.teardown(id, &netns, &rec.config()).await.map_err(|e| match e {
                RuntimeError::Network(m) => RuntimeError::Network(m),
                other => RuntimeError::Network(other.to_string()),
            })?;
        }
    }
    super::container::remove_pod_cgroups(&rec.pod_uid);
    let dir = c.sandbox_dir(id);
    std::fs::remove_dir_all(&dir)
        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        .map_err(|e| RuntimeError::Other(format!("remove {}: {e}", dir.display())))
}

pub fn list_sandboxes(c: &Containerd) -> Result<Vec<Sandbox>, RuntimeError> {
    let dir = c.data_dir.join("sandboxes");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RuntimeError::Other(format!("{}: {e}", dir.display()))),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().to_string();
        match c.read_record(&id) {
            Ok(Some(r)) => out.push(r.sandbox()),
            Ok(None) => {}
            Err(e) => tracing::warn!(sandbox = %id, error = %e, "unreadable sandbox record"),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lists_the_pod() {
        let h = hosts_file("web-0", None, Some("10.1.0.5".parse().unwrap()));
        assert!(h.contains("127.0.0.1\tlocalhost"));
        assert!(h.ends_with("10.1.0.5\tweb-0\n"));
        let h = hosts_file("web-0", Some("web.d.svc.cluster.local"), Some("10.1.0.5".parse().unwrap()));
        assert!(h.ends_with("10.1.0.5\tweb-0.web.d.svc.cluster.local\tweb-0\n"), "{h}");
        assert!(!hosts_file("x", None, None).contains("\tx\n"));
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("abc-123_x"));
        assert!(!valid_id("../etc"));
        assert!(!valid_id(""));
    }
}
