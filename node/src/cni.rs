//! Pod networking with the standard CNI plugins (Debian's
//! containernetworking-plugins in /usr/lib/cni), CNI spec 1.0.0.
//!
//! Every pod gets `lo` (the `loopback` plugin) and `eth0`, a veth whose
//! host end sits on the node's bridge (the `bridge` plugin, addresses from
//! `host-local` out of the node's podCIDR, the bridge holding the gateway
//! `.1`, hairpin on so a pod reaches itself through a Service). Outgoing
//! traffic is masqueraded by one node-wide rule for the pod CIDR
//! ([`masquerade_rule`], installed by `podnet.rs`), not by the bridge
//! plugin's `ipMasq`, which adds a chain per pod: its iptables calls
//! serialize on the xtables lock and made a burst of 100 pods start
//! together after ~5 s. Pods with hostPorts also get the `portmap` plugin
//! chained after `bridge`.
//!
//! Layout:
//! - pure: [`PodCidr`], [`bridge_name`], [`conflist`] (the network as a
//!   CNI conflist), [`plan`] (the plugin invocations for one pod, with
//!   their runtimeConfig), [`with_prev_result`], [`parse_result`] and
//!   [`parse_plugin_error`]; unit-tested in `cni_test.rs`.
//! - IO: [`Cni::setup`] / [`Cni::teardown`] execute the plugin binaries
//!   (CNI_* env vars, config on stdin) and keep one attachment record per
//!   sandbox under `<state-dir>/attachments/`, so that DEL gets exactly
//!   the configs ADD got (portmap needs its portMappings again to find its
//!   rules) even after the agent restarts. Real-plugin tests live in
//!   `node/tests/cni.rs`.
//!
//! No mutex around ADD/DEL: what concurrent invocations share is locked by
//! the plugins themselves (host-local flocks its per-network directory
//! while allocating; bridge treats an already existing bridge as success;
//! iptables changes go through `iptables --wait`, and the portmap chains
//! tolerate being created twice). containerd's CRI runs pods' CNI calls
//! concurrently with the same plugins.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::runtime::PortMapping;

pub const CNI_VERSION: &str = "1.0.0";
/// Debian's containernetworking-plugins.
pub const DEFAULT_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Interface name of the pod's network inside its namespace.
pub const POD_IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("invalid CNI configuration: {0}")]
    Config(String),
    /// The plugin answered with a CNI error ({"code","msg","details"}).
    #[error("CNI plugin {plugin} {command} failed (code {code}: {meaning}): {msg}{}", details_suffix(.details))]
    Plugin { plugin: String, command: &'static str, code: u32, meaning: &'static str, msg: String, details: String },
    /// The plugin failed without a CNI error on stdout (crash, missing binary...).
    #[error("CNI plugin {plugin} {command}: {detail}")]
    Exec { plugin: String, command: &'static str, detail: String },
    #[error("CNI plugin {plugin} ADD returned an unusable result: {detail}")]
    Result { plugin: String, detail: String },
    #[error("CNI state {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}

/// An IPv4 pod CIDR such as 10.244.3.0/24 (IPv6 pods are not wired yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodCidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl PodCidr {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        let bad = |why: &str| CniError::Config(format!("pod CIDR {s:?}: {why}"));
        let (addr, prefix) = s.split_once('/').ok_or_else(|| bad("want a.b.c.d/len"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address (IPv6 pods are not supported yet)"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("bad prefix length"))?;
        // A /31 or /32 leaves no room for a gateway and a pod.
        if !(8..=30).contains(&prefix) {
            return Err(bad("prefix length must be between 8 and 30"));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(addr) & !mask != 0 {
            return Err(bad("host bits are set"));
        }
        Ok(PodCidr { network: addr, prefix })
    }
    /// The bridge's address: the first host address, as kubenet does.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        let IpAddr::V4(ip) = ip else { return false };
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.network)
    }
}

impl std::fmt::Display for PodCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A Linux interface name (at most 15 bytes) unique to `seed` (say the node
/// name plus its data dir), so agents sharing a host in tests never share a
/// bridge. A lone production node can just use "capstan0".
pub fn bridge_name(seed: &str) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    format!("cap{}", &hex::encode(digest)[..12])
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Everything the node's pod network is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniConfig {
    pub plugin_dir: PathBuf,
    /// Ours alone: host-local's allocations (`ipam/`) and attachment records
    /// (`attachments/`) live here, not in /var/lib/cni.
    pub state_dir: PathBuf,
    /// The CNI network name: host-local's subdirectory, part of the names
    /// of the iptables chains the plugins create.
    pub network_name: String,
    pub bridge: String,
    pub pod_cidr: PodCidr,
    pub mtu: Option<u32>,
    /// Bound on one plugin execution.
    pub plugin_timeout: Duration,
}

impl CniConfig {
    pub fn new(state_dir: impl Into<PathBuf>, bridge: impl Into<String>, pod_cidr: PodCidr) -> Self {
        CniConfig {
            plugin_dir: PathBuf::from(DEFAULT_PLUGIN_DIR),
            state_dir: state_dir.into(),
            network_name: "capstan".into(),
            bridge: bridge.into(),
            pod_cidr,
            mtu: None,
            plugin_timeout: Duration::from_secs(60),
        }
    }

    pub fn validate(&self) -> Result<(), CniError> {
        if !valid_ifname(&self.bridge) {
            return Err(CniError::Config(format!("bridge name {:?}: 1-15 bytes of [A-Za-z0-9._-]", self.bridge)));
        }
        let n = &self.network_name;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
            return Err(CniError::Config(format!("network name {n:?}: want [A-Za-z0-9._-]+")));
        }
        Ok(())
    }

    fn ipam_dir(&self) -> PathBuf {
        self.state_dir.join("ipam")
    }
    fn attachments_dir(&self) -> PathBuf {
        self.state_dir.join("attachments")
    }
}

/// The iptables (nat POSTROUTING) rule masquerading the pods' traffic
/// leaving the pod CIDR, as arguments after `-A`/`-C`/`-D POSTROUTING`.
pub fn masquerade_rule(cidr: &PodCidr, bridge: &str) -> Vec<String> {
    let c = cidr.to_string();
    ["-s", &c, "!", "-d", &c, "-m", "comment", "--comment", &format!("capstan pods {bridge}"), "-j", "MASQUERADE"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The node's network as a CNI 1.0.0 network configuration list, as one
/// would drop it in /etc/cni/net.d (useful to look at; we execute it
/// ourselves through [`plan`]).
pub fn conflist(cfg: &CniConfig) -> Value {
    let mut bridge = json!({
        "type": "bridge",
        "bridge": cfg.bridge,
        "isGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": cfg.pod_cidr.to_string(), "gateway": cfg.pod_cidr.gateway().to_string() }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
            "dataDir": cfg.ipam_dir(),
        },
    });
    if let Some(mtu) = cfg.mtu {
        bridge["mtu"] = json!(mtu);
    }
    json!({
        "cniVersion": CNI_VERSION,
        "name": cfg.network_name,
        "plugins": [
            bridge,
            // snat: connections from the node itself to 127.0.0.1:hostPort
            // (and hairpin ones) come back through the pod's reply path.
            { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
        ],
    })
}

/// One plugin execution: which binary, on which interface, with which
/// stdin config (before `prevResult` is added).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    pub plugin: String,
    pub ifname: String,
    pub config: Value,
}

/// The invocations that attach one pod, in ADD order (DEL runs them in
/// reverse): loopback on `lo` on its own, then the conflist's chain on
/// `eth0`, each plugin config given `cniVersion` and `name` as libcni does.
/// portmap is left out when the pod has no hostPorts: it would only pass
/// the result through, and leaving it out keeps such pods independent of
/// the host's iptables.
pub fn plan(cfg: &CniConfig, ports: &[PortMapping]) -> Vec<Invocation> {
    let list = conflist(cfg);
    let mut out = vec![Invocation {
        plugin: "loopback".into(),
        ifname: "lo".into(),
        config: json!({ "cniVersion": CNI_VERSION, "name": format!("{}-loopback", cfg.network_name), "type": "loopback" }),
    }];
    for plugin in list["plugins"].as_array().into_iter().flatten() {
        let mut config = plugin.clone();
        config["cniVersion"] = json!(CNI_VERSION);
        config["name"] = json!(cfg.network_name);
        let plugin_type = config["type"].as_str().unwrap_or_default().to_string();
        if config["capabilities"]["portMappings"] == json!(true) {
            if ports.is_empty() {
                continue;
            }
            config["runtimeConfig"] = json!({ "portMappings": ports.iter().map(port_mapping).collect::<Vec<_>>() });
        }
        out.push(Invocation { plugin: plugin_type, ifname: POD_IFNAME.into(), config });
    }
    out
}

/// The portMappings capability's format (CONVENTIONS.md in the CNI spec).
fn port_mapping(p: &PortMapping) -> Value {
    let mut v = json!({
        "hostPort": p.host_port,
        "containerPort": p.container_port,
        "protocol": p.protocol.to_ascii_lowercase(),
    });
    if let Some(ip) = p.host_ip {
        v["hostIP"] = json!(ip.to_string());
    }
    v
}

/// A chained plugin's stdin: its config plus the previous plugin's result.
pub fn with_prev_result(config: &Value, prev: Option<&Value>) -> Value {
    let mut c = config.clone();
    if let Some(prev) = prev {
        c["prevResult"] = prev.clone();
    }
    c
}

#[derive(Deserialize)]
struct ResultIp {
    address: String,
    interface: Option<usize>,
}
#[derive(Deserialize)]
struct ResultInterface {
    #[serde(default)]
    sandbox: Option<String>,
}
#[derive(Deserialize)]
struct AddResult {
    #[serde(default)]
    interfaces: Vec<ResultInterface>,
    #[serde(default)]
    ips: Vec<ResultIp>,
}

/// The pod's IP from a (1.0.0) ADD result: the first address on an
/// interface inside the sandbox (the bridge's own interfaces are listed
/// too), or the first address when the plugin names no interfaces.
pub fn parse_result(stdout: &[u8]) -> Result<IpAddr, String> {
    let r: AddResult = serde_json::from_slice(stdout).map_err(|e| format!("not a CNI result: {e}"))?;
    let in_sandbox = |ip: &&ResultIp| match ip.interface {
        Some(i) => r.interfaces.get(i).is_some_and(|iface| iface.sandbox.as_deref().is_some_and(|s| !s.is_empty())),
        None => r.interfaces.is_empty(),
    };
    let ip = r.ips.iter().find(in_sandbox).or(r.ips.first()).ok_or("no IP address in the result")?;
    let addr = ip.address.split('/').next().unwrap_or_default();
    addr.parse().map_err(|_| format!("bad address {:?}", ip.address))
}

#[derive(Deserialize)]
struct PluginErrorJson {
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// The spec's well-known error codes.
fn code_meaning(code: u32) -> &'static str {
    match code {
        1 => "incompatible CNI version",
        2 => "unsupported field in network configuration",
        3 => "container unknown or does not exist",
        4 => "invalid necessary environment variables",
        5 => "I/O failure",
        6 => "failed to decode content",
        7 => "invalid network config",
        11 => "try again later",
        100.. => "plugin-specific error",
        _ => "reserved error code",
    }
}

/// The error of a failed execution: the CNI error JSON on stdout when the
/// plugin wrote one, else whatever it said on stderr and how it exited.
pub fn parse_plugin_error(plugin: &str, command: &'static str, exit: &str, stdout: &[u8], stderr: &[u8]) -> CniError {
    if let Ok(e) = serde_json::from_slice::<PluginErrorJson>(stdout) {
        return CniError::Plugin {
            plugin: plugin.to_string(),
            command,
            code: e.code,
            meaning: code_meaning(e.code),
            msg: e.msg,
            details: e.details,
        };
    }
    let said = String::from_utf8_lossy(if stderr.is_empty() { stdout } else { stderr });
    let said = said.trim();
    CniError::Exec {
        plugin: plugin.to_string(),
        command,
        detail: if said.is_empty() { exit.to_string() } else { format!("{exit}: {said}") },
    }
}

/// What [`Cni::setup`] recorded about one sandbox, read back by teardown.
#[derive(Debug, Serialize, Deserialize)]
struct Attachment {
    invocations: Vec<Invocation>,
    /// Result of the last ADD that succeeded, given to DEL as prevResult.
    result: Option<Value>,
}

/// Pod networking for one node: cheap to clone-share behind an `Arc`.
#[derive(Debug)]
pub struct Cni {
    cfg: CniConfig,
}

impl Cni {
    pub fn new(cfg: CniConfig) -> Result<Self, CniError> {
        cfg.validate()?;
        Ok(Cni { cfg })
    }

    pub fn config(&self) -> &CniConfig {
        &self.cfg
    }

    /// Attaches the sandbox's network namespace; returns the pod IP. On
    /// failure, everything that was attached is detached again.
    pub async fn setup(&self, sandbox_id: &str, netns: &Path, ports: &[PortMapping]) -> Result<IpAddr, CniError> {
        let record = self.record_path(sandbox_id)?;
        let invocations = plan(&self.cfg, ports);
        // Recorded before the first ADD, so a crash half-way still leaves
        // teardown the configs it needs.
        let mut attachment = Attachment { invocations: invocations.clone(), result: None };
        write_record(&record, &attachment)?;
        let mut prev: Option<Value> = None;
        for (done, inv) in invocations.iter().enumerate() {
            let chained = inv.ifname == POD_IFNAME;
            let stdin = with_prev_result(&inv.config, if chained { prev.as_ref() } else { None });
            match self.exec(inv, "ADD", sandbox_id, Some(netns), &stdin).await {
                Ok(out) => {
                    if chained {
                        let v: Value = serde_json::from_slice(&out).map_err(|e| CniError::Result {
                            plugin: inv.plugin.clone(),
                            detail: format!("not JSON: {e}"),
                        })?;
                        prev = Some(v);
                    }
                }
                Err(e) => {
                    // DEL the failing plugin too: a plugin may fail after
                    // creating something (a veth, an allocation), and DEL
                    // tolerates what is not there.
                    let undo = &invocations[..=done];
                    if let Err(undo_err) = self.run_del(sandbox_id, Some(netns), undo, prev.as_ref()).await {
                        tracing::warn!(sandbox_id, error = %undo_err, "CNI: undoing a failed ADD failed");
                    } else {
                        let _ = std::fs::remove_file(&record);
                    }
                    return Err(e);
                }
            }
        }
        let result = prev.ok_or_else(|| CniError::Config("the network has no plugin on eth0".into()))?;
        let ip = parse_result(result.to_string().as_bytes()).map_err(|detail| CniError::Result {
            plugin: invocations.last().map(|i| i.plugin.clone()).unwrap_or_default(),
            detail,
        })?;
        attachment.result = Some(result);
        write_record(&record, &attachment)?;
        Ok(ip)
    }

    /// Detaches the sandbox (DEL in reverse ADD order) and forgets it.
    /// Idempotent: a sandbox never set up, or already torn down, succeeds.
    /// Call it before removing the network namespace; with the namespace
    /// gone (`None` or a missing path) the plugins still release the IP and
    /// the host-side rules.
    pub async fn teardown(&self, sandbox_id: &str, netns: Option<&Path>) -> Result<(), CniError> {
        let record = self.record_path(sandbox_id)?;
        let attachment = match std::fs::read(&record) {
            Ok(bytes) => serde_json::from_slice::<Attachment>(&bytes).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(CniError::State { path: record, source }),
        };
        // Without a (readable) record, DEL with today's config and no
        // hostPorts: it still frees the IP and the masquerade rule.
        let (invocations, result) = match attachment {
            Some(a) => (a.invocations, a.result),
            None => (plan(&self.cfg, &[]), None),
        };
        let netns = netns.filter(|p| p.exists());
        self.run_del(sandbox_id, netns, &invocations, result.as_ref()).await?;
        match std::fs::remove_file(&record) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CniError::State { path: record, source }),
        }
    }

    /// DELs `invocations` in reverse order; runs every one even if some
    /// fail, and returns the first error.
    async fn run_del(
        &self,
        sandbox_id: &str,
        netns: Option<&Path>,
        invocations: &[Invocation],
        prev: Option<&Value>,
    ) -> Result<(), CniError> {
        let mut first_err = None;
        for inv in invocations.iter().rev() {
            let chained = inv.ifname == POD_IFNAME;
            let stdin = with_prev_result(&inv.config, if chained { prev } else { None });
            if let Err(e) = self.exec(inv, "DEL", sandbox_id, netns, &stdin).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn record_path(&self, sandbox_id: &str) -> Result<PathBuf, CniError> {
        // The id becomes a file name and CNI_CONTAINERID.
        let ok = !sandbox_id.is_empty()
            && sandbox_id.len() <= 128
            && sandbox_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !sandbox_id.starts_with('.');
        if !ok {
            return Err(CniError::Config(format!(
                "sandbox id {sandbox_id:?}: want [A-Za-z0-9._-], not starting with ."
            )));
        }
        Ok(self.cfg.attachments_dir().join(format!("{sandbox_id}.json")))
    }

    async fn exec(
        &self,
        inv: &Invocation,
        command: &'static str,
        sandbox_id: &str,
        netns: Option<&Path>,
        stdin: &Value,
    ) -> Result<Vec<u8>, CniError> {
        let exec_err = |detail: String| CniError::Exec { plugin: inv.plugin.clone(), command, detail };
        if inv.plugin.is_empty() || inv.plugin.contains('/') {
            return Err(exec_err(format!("bad plugin type {:?}", inv.plugin)));
        }
        let binary = self.cfg.plugin_dir.join(&inv.plugin);
        // The plugins run iptables and friends by name: keep a PATH that
        // has the sbin directories even when the agent's does not.
        let path =
            format!("{}:/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin", std::env::var("PATH").unwrap_or_default());
        let mut child = tokio::process::Command::new(&binary)
            .env_clear()
            .env("PATH", path)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", sandbox_id)
            .env("CNI_NETNS", netns.map(|p| p.as_os_str()).unwrap_or_default())
            .env("CNI_IFNAME", &inv.ifname)
            .env("CNI_PATH", &self.cfg.plugin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| exec_err(format!("cannot run {}: {e}", binary.display())))?;
        let input = stdin.to_string();
        let run = async {
            if let Some(mut w) = child.stdin.take() {
                w.write_all(input.as_bytes()).await?;
            }
            child.wait_with_output().await
        };
        let out = tokio::time::timeout(self.cfg.plugin_timeout, run)
            .await
            .map_err(|_| exec_err(format!("timed out after {:?}", self.cfg.plugin_timeout)))?
            .map_err(|e| exec_err(e.to_string()))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(parse_plugin_error(&inv.plugin, command, &out.status.to_string(), &out.stdout, &out.stderr))
        }
    }
}

fn write_record(path: &Path, a: &Attachment) -> Result<(), CniError> {
    let state = |source| CniError::State { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(state)?;
    }
    let bytes = serde_json::to_vec_pretty(a).map_err(|e| state(std::io::Error::other(e)))?;
    // Write-then-rename: a crash never leaves a half record for teardown.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).map_err(state)?;
    std::fs::rename(&tmp, path).map_err(state)
}

#[cfg(test)]
#[path = "cni_test.rs"]
mod tests;
