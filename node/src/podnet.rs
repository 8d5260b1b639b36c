//! Pod networking for the containerd runtime: each pod's network namespace
//! is a file under `<data-dir>/netns/` (netns.rs), wired to the node's
//! bridge with the standard CNI plugins (cni.rs) from the pod CIDR the
//! masters assigned.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use futures::future::BoxFuture;

use crate::cni::{Cni, CniConfig, PodCidr};
use crate::containerd::{PodNetwork, PodNetworkSetup};
use crate::runtime::{RuntimeError, SandboxConfig};

pub struct CniNetwork {
    /// The masquerade rule installed for the pod CIDR (removed on release).
    masquerade: std::sync::Mutex<Option<Vec<String>>>,
    netns_dir: PathBuf,
    state_dir: PathBuf,
    bridge: String,
    cni: OnceLock<Cni>,
}

impl CniNetwork {
    /// `seed` names the bridge (several agents may share a host in tests).
    pub fn new(data_dir: &Path, seed: &str) -> CniNetwork {
        CniNetwork {
            masquerade: std::sync::Mutex::new(None),
            netns_dir: data_dir.join("netns"),
            state_dir: data_dir.join("cni"),
            bridge: crate::cni::bridge_name(seed),
            cni: OnceLock::new(),
        }
    }

    fn cni(&self) -> Result<&Cni, RuntimeError> {
        self.cni.get().ok_or_else(|| RuntimeError::Network("the node has no pod CIDR yet".into()))
    }
}

impl CniNetwork {
    /// The node leaves: its bridge and the netns directory's mount go too
    /// (call after every sandbox is removed).
    pub async fn release(&self) {
        let out = tokio::process::Command::new("ip").args(["link", "del", &self.bridge]).output().await;
        if let Some(o) = out.ok().filter(|o| !o.status.success()) {
            tracing::debug!(bridge = %self.bridge, err = %String::from_utf8_lossy(&o.stderr), "bridge not deleted");
        }
        let rule = self.masquerade.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(rule) = rule {
            let _ = iptables(&["-t", "nat", "-D", "POSTROUTING"], &rule);
        }
        if let Err(e) = crate::netns::release_dir(&self.netns_dir) {
            tracing::warn!(dir = %self.netns_dir.display(), error = %e, "netns dir not released");
        }
    }
}

fn iptables(head: &[&str], rule: &[String]) -> std::io::Result<bool> {
    let st = std::process::Command::new("iptables")
        .arg("-w")
        .args(head)
        .args(rule)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    Ok(st.success())
}

/// Lets the bridge carry pods' packets DNATed to 127.0.0.1 (a Service whose
/// endpoints are on loopback: the `kubernetes` Service of masters serving
/// on 127.0.0.1); the proxy's table drops any other traffic to 127/8
/// arriving from outside (proxy.rs). Failure only costs those Services.
fn route_localnet(bridge: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::warn!(bridge, error = %e, "route_localnet not set: Services on 127.0.0.1 unreachable from pods");
    }
}

/// Installs the node-wide masquerade rule unless it is there already.
fn ensure_masquerade(rule: &[String]) -> std::io::Result<()> {
    if iptables(&["-t", "nat", "-C", "POSTROUTING"], rule)? {
        return Ok(());
    }
    if iptables(&["-t", "nat", "-A", "POSTROUTING"], rule)? {
        Ok(())
    } else {
        Err(std::io::Error::other("iptables -t nat -A POSTROUTING failed"))
    }
}

impl PodNetwork for CniNetwork {
    fn set_pod_cidr(&self, cidr: &str) {
        match PodCidr::parse(cidr).map_err(|e| e.to_string()).and_then(|c| {
            Cni::new(CniConfig::new(self.state_dir.clone(), self.bridge.clone(), c)).map_err(|e| e.to_string())
        }) {
            Ok(cni) => {
                if let Ok(c) = PodCidr::parse(cidr) {
                    let rule = crate::cni::masquerade_rule(&c, &self.bridge);
                    match ensure_masquerade(&rule) {
                        Ok(()) => *self.masquerade.lock().unwrap_or_else(|e| e.into_inner()) = Some(rule),
                        Err(e) => tracing::warn!(%cidr, error = %e, "pods' outgoing traffic is not masqueraded"),
                    }
                }
                let _ = self.cni.set(cni);
            }
            Err(e) => tracing::error!(%cidr, error = %e, "pod network unusable"),
        }
    }

    fn setup<'a>(
        &'a self,
        sandbox_id: &'a str,
        cfg: &'a SandboxConfig,
    ) -> BoxFuture<'a, Result<PodNetworkSetup, RuntimeError>> {
        Box::pin(async move {
            let cni = self.cni()?;
            let netns = crate::netns::create(&self.netns_dir, sandbox_id)
                .map_err(|e| RuntimeError::Network(format!("network namespace: {e}")))?;
            match cni.setup(sandbox_id, &netns, &cfg.port_mappings).await {
                Ok(ip) => {
                    // The bridge exists now (the first ADD makes it).
                    route_localnet(&self.bridge);
                    Ok(PodNetworkSetup { netns, ip })
                }
                Err(e) => {
                    let _ = crate::netns::remove(&netns);
                    Err(RuntimeError::Network(e.to_string()))
                }
            }
        })
    }

    fn teardown<'a>(
        &'a self,
        sandbox_id: &'a str,
        netns: &'a Path,
        _cfg: &'a SandboxConfig,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let ns = (!netns.as_os_str().is_empty()).then_some(netns);
            if let Ok(cni) = self.cni() {
                cni.teardown(sandbox_id, ns).await.map_err(|e| RuntimeError::Network(e.to_string()))?;
            }
            let path = ns.map(Path::to_path_buf).unwrap_or_else(|| self.netns_dir.join(sandbox_id));
            crate::netns::remove(&path).map_err(|e| RuntimeError::Network(format!("network namespace: {e}")))
        })
    }
}
