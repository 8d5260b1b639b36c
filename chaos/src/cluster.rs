//! A cluster under test, as a user would run it: `capstan up`, each master
//! and agent on a host of its own ([`crate::hosts`]; or all on loopback).
//! `up` restarts a master that dies, which is exactly "kill -9 and restart".
//! Network faults ([`Partition`]) are nftables tables: inside the hosts
//! they cut, by address; on loopback, by peer port.
//! Faults are signals to the masters' PIDs (read from each master's
//! `endpoints.json`); nothing else on the machine is touched, and dropping
//! the cluster stops `up`, which stops its masters (SIGKILL after 10 s, which
//! also ends a master left paused).
//!
//! Member replacement adds masters `up` does not know: the harness starts
//! them (`capstan server --join`), restarts them after its own kill -9, and
//! maps them onto the slot of the master they replaced, so the rest of the
//! harness (clients, faults, checkers) addresses "master i" as before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use anyhow::{bail, Context};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::hosts::{self, Host, Hosts, Role};
use crate::lazyfs::{CutStats, LazyFs};

pub struct UpCluster {
    child: Child,
    capstan: PathBuf,
    pub dir: tempfile::TempDir,
    pub masters: usize,
    env: HashMap<String, String>,
    /// Small tmpfs data dirs this cluster mounted (unmounted on drop).
    mounts: Vec<PathBuf>,
    /// Masters the harness joined itself (killed on drop).
    joined: Arc<Mutex<Vec<Joined>>>,
    /// Set on drop: no more restarts of joined masters.
    closing: Arc<AtomicBool>,
    /// A host per master and agent, or all on 127.0.0.1.
    hosts: Option<Arc<Hosts>>,
    /// Power-cut disks: a lazy filesystem on each master's data dir
    /// ([`UpCluster::start_power_cut_disks`]).
    lazy: Vec<LazyFs>,
}

/// How long a killed master stays down before it is restarted (`capstan up
/// --restart-delay-ms`, and the harness for the masters it joined): past
/// the election timeout (0.5-1 s), so the others elect a new leader.
/// Restarted at once, a killed leader resumes its own term before anyone
/// campaigns (openraft keeps a restarted leader leading if it can), and a
/// "leader kill" would test no failover at all.
pub const RESTART_DELAY: Duration = Duration::from_secs(2);

/// A master started by the harness, not by `up`.
struct Joined {
    name: String,
    dir: PathBuf,
    /// Its host's namespace (on hosts).
    netns: Option<String>,
    child: Child,
    /// The slot it took over from a removed master, once it has.
    slot: Option<usize>,
}

/// `capstan server`'s exit status once it knows it was removed.
const EXIT_REMOVED: i32 = 3;

#[derive(Clone, Debug, serde::Deserialize)]
pub struct Endpoints {
    pub name: String,
    pub id: u64,
    pub peer: String,
    pub etcd_url: String,
    /// The Kubernetes API (HTTPS).
    #[serde(default)]
    pub api_url: String,
    /// Plain HTTP: /metrics, /healthz and (failpoints builds) /debug/failpoints.
    #[serde(default)]
    pub metrics_url: String,
    pub pid: u32,
}

/// A network fault between masters: nftables rules on their peer (QUIC,
/// UDP) ports, in a table of this run's own that is deleted on drop.
/// Client traffic (TCP) is untouched, so a master cut off from its peers
/// can still be reached by clients (a deposed leader must not serve them
/// stale data).
///
/// On hosts ([`crate::hosts`]) the rules live in the namespaces of the
/// hosts they cut, matched by address.
pub struct Partition {
    /// (host namespace, or this one; table).
    tables: Vec<(Option<String>, String)>,
}

impl Partition {
    fn apply(name: &str, rules: &[String]) -> anyhow::Result<Partition> {
        let mut p = Partition { tables: vec![] };
        p.add(None, name, rules, &[])?;
        Ok(p)
    }

    /// A table in `netns` whose input chain drops by `input` rules and
    /// output chain by `output` rules.
    fn add(&mut self, netns: Option<&str>, name: &str, input: &[String], output: &[String]) -> anyhow::Result<()> {
        let table = format!("capstan_chaos_{}_{name}", std::process::id());
        let mut script = format!("add table inet {table}\n");
        for (chain, rules) in [("input", input), ("output", output)] {
            script.push_str(&format!(
                "add chain inet {table} {chain} {{ type filter hook {chain} priority -10 ; policy accept ; }}\n"
            ));
            for r in rules {
                script.push_str(&format!("add rule inet {table} {chain} {r}\n"));
            }
        }
        hosts::nft(netns, &script)?;
        self.tables.push((netns.map(str::to_string), table));
        Ok(())
    }

    /// Host `me` cut off from every address in `them`, both ways (or only
    /// what comes in, `deaf`), or with `loss`% of what comes in dropped.
    fn between_hosts(name: &str, me: &Host, them: &[Ipv4Addr], cut: Cut) -> anyhow::Result<Partition> {
        let mut p = Partition { tables: vec![] };
        p.add_between(name, me, them, cut)?;
        Ok(p)
    }

    fn add_between(&mut self, name: &str, me: &Host, them: &[Ipv4Addr], cut: Cut) -> anyhow::Result<()> {
        let set = them.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(", ");
        let (input, output) = match cut {
            Cut::Both => (vec![format!("ip saddr {{ {set} }} drop")], vec![format!("ip daddr {{ {set} }} drop")]),
            Cut::Deaf => (vec![format!("ip saddr {{ {set} }} drop")], vec![]),
            Cut::Loss(pct) => (vec![format!("ip saddr {{ {set} }} numgen random mod 100 < {pct} drop")], vec![]),
        };
        self.add(Some(&me.netns), name, &input, &output)
    }

    /// Master on `peer_port` cut off from the others, both ways.
    pub fn isolate(peer_port: u16) -> anyhow::Result<Partition> {
        Self::apply(
            &format!("iso{peer_port}"),
            &[format!("udp dport {peer_port} drop"), format!("udp sport {peer_port} drop")],
        )
    }

    /// Asymmetric: nothing reaches the master on `peer_port`, but what it
    /// sends still arrives.
    pub fn deafen(peer_port: u16) -> anyhow::Result<Partition> {
        Self::apply(&format!("deaf{peer_port}"), &[format!("udp dport {peer_port} drop")])
    }

    /// Bridge: the masters on `a` and `b` cannot reach each other; both
    /// still reach the third, which can lead a majority with either.
    pub fn between(a: u16, b: u16) -> anyhow::Result<Partition> {
        Self::apply(
            &format!("br{a}_{b}"),
            &[format!("udp sport {a} udp dport {b} drop"), format!("udp sport {b} udp dport {a} drop")],
        )
    }

    /// A node agent whose QUIC socket is on UDP `port` cut off from every
    /// master, both ways.
    pub fn agent(port: u16) -> anyhow::Result<Partition> {
        Self::apply(&format!("agent{port}"), &[format!("udp sport {port} drop"), format!("udp dport {port} drop")])
    }

    /// `percent`% of the packets to the masters on `ports` lost at random.
    pub fn lossy(ports: &[u16], percent: u32) -> anyhow::Result<Partition> {
        let set = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        Self::apply("loss", &[format!("udp dport {{ {set} }} numgen random mod 100 < {percent} drop")])
    }
}

#[derive(Clone, Copy)]
enum Cut {
    Both,
    Deaf,
    Loss(u32),
}

impl Drop for Partition {
    fn drop(&mut self) {
        for (netns, table) in &self.tables {
            let _ = hosts::nft(netns.as_deref(), &format!("delete table inet {table}\n"));
        }
    }
}

impl UpCluster {
    pub fn start(capstan: &Path, masters: usize) -> anyhow::Result<UpCluster> {
        Self::start_with(capstan, masters, &[])
    }

    /// Like [`UpCluster::start`], passing `server_args` to every master
    /// (`capstan up --server-arg`).
    pub fn start_with(capstan: &Path, masters: usize, server_args: &[&str]) -> anyhow::Result<UpCluster> {
        Self::start_full(capstan, None, masters, server_args, &["--nodes", "0"])
    }

    /// Like [`UpCluster::start_full`], in a directory made beforehand (a
    /// proxy in front of the masters needs to know where they will be).
    pub fn start_full_in(
        capstan: &Path,
        dir: tempfile::TempDir,
        hosts: Option<&Arc<Hosts>>,
        masters: usize,
        server_args: &[&str],
        up_args: &[&str],
    ) -> anyhow::Result<UpCluster> {
        Self::launch(capstan, dir, hosts, vec![], masters, server_args, up_args)
    }

    /// Like [`UpCluster::start_with`], with more `capstan up` flags
    /// (`up_args`, e.g. `--nodes 1 --runtime sim`).
    /// On `hosts` if given (one per master and agent), else on 127.0.0.1.
    pub fn start_full(
        capstan: &Path,
        hosts: Option<&Arc<Hosts>>,
        masters: usize,
        server_args: &[&str],
        up_args: &[&str],
    ) -> anyhow::Result<UpCluster> {
        Self::start_full_in(capstan, cluster_dir()?, hosts, masters, server_args, up_args)
    }

    /// Like [`UpCluster::start`], with master `small`'s data dir on a tmpfs
    /// of `mib` MiB that [`UpCluster::fill_disk`] can fill (needs root).
    pub fn start_small_disk(
        capstan: &Path,
        hosts: Option<&Arc<Hosts>>,
        masters: usize,
        small: usize,
        mib: u64,
    ) -> anyhow::Result<UpCluster> {
        let dir = cluster_dir()?;
        let data = dir.path().join(format!("master-{}", small + 1));
        std::fs::create_dir_all(&data)?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "capstan-chaos"])
            .arg(&data)
            .status()?;
        anyhow::ensure!(st.success(), "mounting a {mib} MiB tmpfs on {} failed (root needed)", data.display());
        Self::launch(capstan, dir, hosts, vec![data.clone()], masters, &[], &["--nodes", "0"]).inspect_err(|_| {
            let _ = Command::new("umount").arg("--lazy").arg(&data).status();
        })
    }

    /// Like [`UpCluster::start_full`] with every master's data dir on a
    /// lazy filesystem ([`crate::lazyfs`]) that [`UpCluster::power_cut`]
    /// can cut (needs root and /dev/fuse).
    pub fn start_power_cut_disks(
        capstan: &Path,
        hosts: Option<&Arc<Hosts>>,
        masters: usize,
    ) -> anyhow::Result<UpCluster> {
        let dir = cluster_dir()?;
        let mut lazy = Vec::new();
        for i in 1..=masters {
            let (backing, data) = (dir.path().join(format!("disk-{i}")), dir.path().join(format!("master-{i}")));
            std::fs::create_dir_all(&backing)?;
            std::fs::create_dir_all(&data)?;
            lazy.push(LazyFs::mount(&backing, &data)?);
        }
        remember_mounts(lazy.iter().map(|l| l.mountpoint().to_path_buf()));
        let mut c = Self::launch(capstan, dir, hosts, vec![], masters, &[], &["--nodes", "0"])?;
        c.lazy = lazy;
        Ok(c)
    }

    /// A power cut: every master killed -9 at once, then every write they
    /// had not fsynced lost ([`LazyFs::power_cut`]) before `up` restarts
    /// them. Returns the killed PIDs (by slot) and what the cut dropped.
    pub fn power_cut(&self) -> anyhow::Result<(Vec<(usize, u32)>, CutStats)> {
        anyhow::ensure!(self.lazy.len() == self.masters, "this cluster has no power-cut disks");
        let pids = self.kill9_all();
        // Dead before the cut (a process still writing would write to the
        // "rebooted" disk), and well before `up` restarts them.
        let dead = poll_until(RESTART_DELAY / 2, || pids.iter().all(|(_, pid)| !running(*pid)));
        anyhow::ensure!(dead, "masters still running after kill -9");
        let mut total = CutStats::default();
        for l in &self.lazy {
            let s = l.power_cut();
            total.bytes += s.bytes;
            total.files += s.files;
        }
        Ok((pids, total))
    }

    fn launch(
        capstan: &Path,
        dir: tempfile::TempDir,
        hosts: Option<&Arc<Hosts>>,
        mounts: Vec<PathBuf>,
        masters: usize,
        server_args: &[&str],
        up_args: &[&str],
    ) -> anyhow::Result<UpCluster> {
        let log = std::fs::File::create(dir.path().join("up.log"))?;
        let mut extra: Vec<String> = server_args.iter().map(|a| format!("--server-arg={a}")).collect();
        if let Some(hosts) = hosts {
            let agents = up_args.iter().position(|a| *a == "--nodes").and_then(|i| up_args.get(i + 1)?.parse().ok());
            let flag = |roles: Vec<Role>| -> anyhow::Result<String> {
                Ok(roles
                    .into_iter()
                    .map(|r| hosts.host(r).map(|h| h.flag()))
                    .collect::<anyhow::Result<Vec<_>>>()?
                    .join(","))
            };
            extra.push(format!("--master-hosts={}", flag((0..masters).map(Role::Master).collect())?));
            let agents = agents.unwrap_or(1);
            if agents > 0 {
                extra.push(format!("--node-hosts={}", flag((0..agents).map(Role::Agent).collect())?));
            }
        }
        let child = Command::new(capstan)
            .args(["up", "--masters", &masters.to_string(), "--data-dir"])
            .arg(dir.path())
            .args(["--restart-delay-ms", &RESTART_DELAY.as_millis().to_string()])
            .args(&extra)
            .args(up_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", capstan.display()))?;
        remember_pid(child.id());
        remember_mounts(mounts.iter().cloned());
        let mut c = UpCluster {
            child,
            capstan: capstan.to_path_buf(),
            dir,
            masters,
            env: HashMap::new(),
            mounts,
            joined: Arc::default(),
            closing: Arc::default(),
            hosts: hosts.cloned(),
            lazy: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let log = std::fs::read_to_string(c.dir.path().join("up.log")).unwrap_or_default();
            if log.contains("cluster up") {
                break;
            }
            if let Some(st) = c.child.try_wait()? {
                bail!("capstan up exited ({st}):\n{log}");
            }
            if Instant::now() > deadline {
                bail!("capstan up not ready in 120 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let env = std::fs::read_to_string(c.dir.path().join("etcdctl.env"))?;
        c.env = env
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(c)
    }

    /// The data dir of the master now in slot `i`.
    pub fn master_dir(&self, i: usize) -> PathBuf {
        let joined = self.joined.lock().expect("not poisoned");
        match joined.iter().find(|j| j.slot == Some(i)) {
            Some(j) => j.dir.clone(),
            None => self.dir.path().join(format!("master-{}", i + 1)),
        }
    }

    /// Starts a new master that joins the cluster through master `via`
    /// with a fresh bootstrap token, as an operator would (`capstan member
    /// add`, then `capstan server --join`). It belongs to no slot until
    /// [`UpCluster::take_slot`]. Returns its name.
    pub fn join_master(&self, via: usize) -> anyhow::Result<String> {
        let ep = self.endpoints(via).with_context(|| format!("master-{} is not serving", via + 1))?;
        let out = Command::new(&self.capstan)
            .args(["token", "create", "--usage", "master", "--ttl", "600", "--data-dir"])
            .arg(self.master_dir(via))
            .output()
            .context("capstan token create")?;
        anyhow::ensure!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout)?.trim().to_string();
        let mut joined = self.joined.lock().expect("not poisoned");
        let name = format!("master-{}", self.masters + 1 + joined.len());
        let dir = self.dir.path().join(&name);
        let host = match &self.hosts {
            Some(h) => Some(h.host(Role::Master(h.masters_made()))?),
            None => None,
        };
        let any_port = format!("{}:0", host.as_ref().map_or(Ipv4Addr::LOCALHOST, |h| h.ip));
        let mut args: Vec<String> =
            ["server", "--name", &name, "--join", &ep.peer, "--token", &token].iter().map(|s| s.to_string()).collect();
        for listen in ["--peer-listen", "--etcd-listen", "--metrics-listen", "--api-listen", "--node-listen"] {
            args.extend([listen.to_string(), any_port.clone()]);
        }
        let netns = host.map(|h| h.netns);
        let child = spawn_server(&self.capstan, &dir, netns.as_deref(), &args)?;
        joined.push(Joined { name: name.clone(), dir, netns, child, slot: None });
        Ok(name)
    }

    /// Master `name` (from [`UpCluster::join_master`]) takes slot `i`,
    /// whose master was removed.
    pub fn take_slot(&self, name: &str, i: usize) {
        let mut joined = self.joined.lock().expect("not poisoned");
        for j in joined.iter_mut() {
            if j.slot == Some(i) {
                j.slot = None;
            }
        }
        if let Some(j) = joined.iter_mut().find(|j| j.name == name) {
            j.slot = Some(i);
        }
    }

    /// Whether master `name`, just removed from the cluster, stops by
    /// itself within `timeout` with the "removed" status and is not
    /// restarted (by `up`, or by this harness).
    pub fn wait_departed(&self, name: &str, timeout: Duration) -> bool {
        let said = format!("{name} was removed from the cluster; not restarting it");
        poll_until(timeout, || {
            let mut joined = self.joined.lock().expect("not poisoned");
            match joined.iter_mut().find(|j| j.name == name) {
                // Another exit (a kill -9 of this round) is not a departure:
                // the harness restarts it, and it must then stop by itself.
                Some(j) => j.child.try_wait().ok().flatten().is_some_and(|st| st.code() == Some(EXIT_REMOVED)),
                None => std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default().contains(&said),
            }
        })
    }

    pub fn endpoints(&self, i: usize) -> Option<Endpoints> {
        serde_json::from_slice(&std::fs::read(self.master_dir(i).join("endpoints.json")).ok()?).ok()
    }

    pub fn urls(&self) -> Vec<String> {
        (0..self.masters).filter_map(|i| self.endpoints(i).map(|e| e.etcd_url)).collect()
    }

    /// A file `capstan up` wrote, by its etcdctl variable (`ETCDCTL_CACERT`,
    /// `ETCDCTL_CERT`, `ETCDCTL_KEY`: the admin credentials, which the
    /// Kubernetes API accepts too).
    pub fn env_path(&self, var: &str) -> PathBuf {
        PathBuf::from(self.env.get(var).map_or("", String::as_str))
    }

    /// An admin channel to `url` (credentials written by `capstan up`).
    pub async fn channel(&self, url: &str) -> anyhow::Result<Channel> {
        let read = |k: &str| std::fs::read_to_string(&self.env[k]);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ETCDCTL_CACERT")?))
            .identity(Identity::from_pem(read("ETCDCTL_CERT")?, read("ETCDCTL_KEY")?));
        Ok(Channel::from_shared(url.to_string())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(2))
            // Like a real client's per-request deadline: a paused master must
            // not capture every client until it resumes.
            .timeout(Duration::from_secs(2))
            .connect()
            .await?)
    }

    /// Sends `sig` to a process of this cluster (a master or node agent).
    pub fn signal(&self, pid: u32, sig: i32) {
        // SAFETY: kill(2) on the PID of a master or agent this cluster started.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }

    /// PID of node agent `k` (0-based; `up` names it `node-{k+1}`), found
    /// in /proc by the data dir on its command line.
    pub fn agent_pid(&self, k: usize) -> Option<u32> {
        let dir = self.dir.path().join(format!("node-{}", k + 1));
        let needle = format!("--data-dir\0{}\0", dir.display());
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.contains("capstan-node") && cmd.contains(&needle) && running(pid)).then_some(pid)
        })
    }

    /// The local UDP port of agent `k`'s QUIC connection to the masters:
    /// its socket inodes (/proc/<pid>/fd) looked up in /proc/net/udp.
    pub fn agent_port(&self, k: usize) -> Option<u16> {
        let pid = self.agent_pid(k)?;
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
            .collect();
        ["/proc/net/udp", "/proc/net/udp6"].iter().find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (local, inode) = (cols.get(1)?, cols.get(9)?);
                inodes.iter().any(|i| i == inode).then(|| u16::from_str_radix(local.rsplit(':').next()?, 16).ok())?
            })
        })
    }

    /// Master `i`'s peer (QUIC) port.
    pub fn peer_port(&self, i: usize) -> Option<u16> {
        self.endpoints(i).and_then(|e| e.peer.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
    }

    /// The host of the master in slot `i` (on hosts), by the address it
    /// serves clients on (its advertised peer address may be a proxy's).
    fn master_host(&self, i: usize) -> Option<Host> {
        let hosts = self.hosts.as_ref()?;
        let url = self.endpoints(i)?.etcd_url;
        let addr = url.split("://").nth(1)?.trim_end_matches('/');
        hosts.master_at(addr.rsplit_once(':')?.0.parse().ok()?)
    }

    /// Every master host's address but `me`'s.
    fn other_masters(&self, me: &Host) -> Vec<Ipv4Addr> {
        let all = self.hosts.as_ref().map(|h| h.master_ips()).unwrap_or_default();
        all.into_iter().filter(|ip| *ip != me.ip).collect()
    }

    fn must_host(&self, i: usize) -> anyhow::Result<Host> {
        self.master_host(i).with_context(|| format!("master-{} is not serving", i + 1))
    }

    fn must_port(&self, i: usize) -> anyhow::Result<u16> {
        self.peer_port(i).with_context(|| format!("master-{} is not serving", i + 1))
    }

    /// Master `i` cut off from the other masters, both ways. Clients (and
    /// agents) still reach it: a deposed leader must not serve them stale
    /// data.
    pub fn isolate(&self, i: usize) -> anyhow::Result<Partition> {
        if self.hosts.is_none() {
            return Partition::isolate(self.must_port(i)?);
        }
        let me = self.must_host(i)?;
        Partition::between_hosts("iso", &me, &self.other_masters(&me), Cut::Both)
    }

    /// Asymmetric: nothing from the other masters reaches master `i`, but
    /// what it sends still arrives.
    pub fn deafen(&self, i: usize) -> anyhow::Result<Partition> {
        if self.hosts.is_none() {
            return Partition::deafen(self.must_port(i)?);
        }
        let me = self.must_host(i)?;
        Partition::between_hosts("deaf", &me, &self.other_masters(&me), Cut::Deaf)
    }

    /// Bridge: masters `a` and `b` cannot reach each other; both still
    /// reach the third, which can lead a majority with either.
    pub fn cut_between(&self, a: usize, b: usize) -> anyhow::Result<Partition> {
        if self.hosts.is_none() {
            return Partition::between(self.must_port(a)?, self.must_port(b)?);
        }
        let (ha, hb) = (self.must_host(a)?, self.must_host(b)?);
        let mut p = Partition::between_hosts("br", &ha, &[hb.ip], Cut::Both)?;
        p.add_between("br", &hb, &[ha.ip], Cut::Both)?;
        Ok(p)
    }

    /// Node agent `k` cut off from every master, both ways.
    pub fn cut_agent(&self, k: usize) -> anyhow::Result<Partition> {
        let Some(hosts) = &self.hosts else {
            return Partition::agent(self.agent_port(k).with_context(|| format!("node-{} has no socket", k + 1))?);
        };
        Partition::between_hosts("agent", &hosts.host(Role::Agent(k))?, &hosts.master_ips(), Cut::Both)
    }

    /// `percent`% of the datagrams between masters lost at random.
    pub fn lossy(&self, percent: u32) -> anyhow::Result<Partition> {
        if self.hosts.is_none() {
            let ports: Vec<u16> = (0..self.masters).filter_map(|i| self.peer_port(i)).collect();
            return Partition::lossy(&ports, percent);
        }
        let mut p = Partition { tables: vec![] };
        for i in 0..self.masters {
            let me = self.must_host(i)?;
            p.add_between("loss", &me, &self.other_masters(&me), Cut::Loss(percent))?;
        }
        Ok(p)
    }

    /// `kubectl <args>` against this cluster (admin kubeconfig `up`
    /// wrote), bounded to 20 s; stdout, or an error with stderr.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = Command::new("timeout")
            .args(["20", "kubectl", "--kubeconfig"])
            .arg(self.dir.path().join("kubeconfig"))
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// kill -9; `up` restarts it from its data dir (the harness restarts
    /// the masters it joined itself, the same way).
    pub fn kill9(&self, i: usize) -> Option<u32> {
        let pid = self.endpoints(i)?.pid;
        self.signal(pid, libc::SIGKILL);
        let mut joined = self.joined.lock().expect("not poisoned");
        if let Some(j) = joined.iter_mut().find(|j| j.slot == Some(i) && j.child.id() == pid) {
            let _ = j.child.wait();
            let (name, all, closing, capstan) =
                (j.name.clone(), self.joined.clone(), self.closing.clone(), self.capstan.clone());
            std::thread::spawn(move || {
                std::thread::sleep(RESTART_DELAY);
                let mut joined = all.lock().expect("not poisoned");
                let Some(j) = joined.iter_mut().find(|j| j.name == name) else { return };
                if closing.load(Ordering::Relaxed) {
                    return;
                }
                match spawn_server(&capstan, &j.dir, j.netns.as_deref(), &["server".to_string()]) {
                    Ok(c) => j.child = c,
                    Err(e) => eprintln!("[capstan-chaos] restarting {name}: {e:#}"),
                }
            });
        }
        Some(pid)
    }

    /// kill -9 every master at once; their (slot, PID)s. `up` (or the
    /// harness, for masters it joined) restarts them.
    pub fn kill9_all(&self) -> Vec<(usize, u32)> {
        let pids: Vec<(usize, u32)> = (0..self.masters).filter_map(|i| Some((i, self.endpoints(i)?.pid))).collect();
        for (_, pid) in &pids {
            self.signal(*pid, libc::SIGKILL);
        }
        pids
    }

    /// Fills master `i`'s small disk ([`UpCluster::start_small_disk`]) to
    /// the last byte with a ballast file; removing the file frees it.
    pub fn fill_disk(&self, i: usize) -> anyhow::Result<PathBuf> {
        let dir = self.master_dir(i);
        anyhow::ensure!(self.mounts.contains(&dir), "master-{} has no small disk", i + 1);
        let ballast = dir.join("ballast");
        // SAFETY: statvfs fills the struct it is given; the path is a valid C string.
        let free = unsafe {
            let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
            let mut st: libc::statvfs = std::mem::zeroed();
            anyhow::ensure!(libc::statvfs(path.as_ptr(), &mut st) == 0, "statvfs {}", dir.display());
            st.f_bavail as u64 * st.f_frsize as u64
        };
        let st = Command::new("fallocate").args(["-l", &free.to_string()]).arg(&ballast).status()?;
        anyhow::ensure!(st.success(), "fallocate {free} bytes in {}", dir.display());
        Ok(ballast)
    }

    /// Arms crash point `name` on master `i` with a `fail` action string
    /// (`1*return`: abort at the next hit; `off`: disarm) through the
    /// master's `PUT /debug/failpoints/<name>`. Only a `capstan` built with
    /// the `failpoints` feature has that endpoint.
    pub async fn arm_failpoint(&self, i: usize, name: &str, action: &str) -> anyhow::Result<()> {
        let ep = self.endpoints(i).with_context(|| format!("master-{} has no endpoints.json", i + 1))?;
        let host = ep.metrics_url.trim_start_matches("http://").trim_end_matches('/');
        anyhow::ensure!(!host.is_empty(), "master-{} advertises no metrics URL", i + 1);
        let (status, body) = match http(host, "PUT", &format!("/debug/failpoints/{name}"), action).await {
            Ok(answer) => answer,
            // A point on a hot path (log append) can fire, and abort the
            // master, before the answer to its arming is written.
            Err(e) => {
                for _ in 0..20 {
                    if !running(ep.pid) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                return Err(e.context(format!("arming {name}={action} on master-{}", i + 1)));
            }
        };
        match status {
            200 => Ok(()),
            404 => bail!(
                "master-{} has no /debug/failpoints: build capstan with `--features failpoints` \
                 (cargo build -p capstan-control --features failpoints)",
                i + 1
            ),
            _ => bail!("arming {name}={action} on master-{}: HTTP {status}: {}", i + 1, body.trim()),
        }
    }

    /// Master `i`'s armed crash points, `name=action` per line
    /// (`GET /debug/failpoints`): the status code and body.
    pub async fn failpoints_armed(&self, i: usize) -> anyhow::Result<(u16, String)> {
        let ep = self.endpoints(i).with_context(|| format!("master-{} has no endpoints.json", i + 1))?;
        http(ep.metrics_url.trim_start_matches("http://").trim_end_matches('/'), "GET", "/debug/failpoints", "").await
    }

    /// The value of an unlabelled metric on master `i`'s /metrics.
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let ep = self.endpoints(i)?;
        let host = ep.metrics_url.trim_start_matches("http://").trim_end_matches('/');
        let (status, body) = http(host, "GET", "/metrics", "").await.ok()?;
        if status != 200 {
            return None;
        }
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// How many times master `i`'s log says crash point `name` aborted it.
    pub fn failpoint_crashes(&self, i: usize, name: &str) -> usize {
        let log = std::fs::read(self.master_dir(i).join("server.log")).unwrap_or_default();
        let needle = format!("failpoint {name}: aborting");
        String::from_utf8_lossy(&log).matches(&needle).count()
    }

    /// Wait until master `i` runs with a process other than `old_pid`.
    pub fn wait_restarted(&self, i: usize, old_pid: u32, timeout: Duration) -> bool {
        poll_until(timeout, || self.endpoints(i).is_some_and(|e| e.pid != old_pid))
    }

    /// Wait until agent `k` runs with a process other than `old_pid`.
    pub fn wait_agent_restarted(&self, k: usize, old_pid: u32, timeout: Duration) -> bool {
        poll_until(timeout, || self.agent_pid(k).is_some_and(|p| p != old_pid))
    }
}

/// Whether `done` becomes true within `timeout` (checked every 50 ms).
fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh directory for a cluster under test.
pub fn cluster_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("capstan-chaos").tempdir()?)
}

/// Whether process `pid` runs (exists and is not a zombie waiting for
/// `capstan up` to reap it).
fn running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()).is_some_and(|state| state != 'Z')
}

/// One HTTP/1.1 request over plain TCP (the metrics listener is plain HTTP
/// on loopback; a client library would be a dependency for four lines).
async fn http(host: &str, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut conn = tokio::net::TcpStream::connect(host).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        conn.read_to_end(&mut resp).await?;
        anyhow::Ok(resp)
    };
    let resp = tokio::time::timeout(Duration::from_secs(5), io).await.context("HTTP request timed out")??;
    parse_http_response(&resp)
}

/// Status code and body of a complete `Connection: close` HTTP/1.1 response.
pub fn parse_http_response(resp: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(resp);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP/1.1 response: {:?}", text.chars().take(80).collect::<String>()))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

/// `capstan server <args> --data-dir <dir>`, logging to `dir/server.log`,
/// in host `netns` if given (`ip netns exec` execs it: same PID).
fn spawn_server(capstan: &Path, dir: &Path, netns: Option<&str>, args: &[String]) -> anyhow::Result<Child> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log"))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(capstan);
            c
        }
        None => Command::new(capstan),
    };
    cmd.args(args).arg("--data-dir").arg(dir).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // Killed on drop (like `up`). Not PR_SET_PDEATHSIG: that fires when the
    // spawning *thread* ends, and restarts are spawned from short threads.
    let child = cmd.spawn().with_context(|| format!("starting a master in {}", dir.display()))?;
    remember_pid(child.id());
    Ok(child)
}

/// What an interrupted harness must stop and unmount: `capstan up` and
/// joined masters (PIDs), small disks and power-cut disks (a lazy
/// filesystem served by this process would outlive it as a dead mount).
static LEFT: Mutex<(Vec<u32>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

fn remember_pid(pid: u32) {
    LEFT.lock().expect("not poisoned").0.push(pid);
}

fn remember_mounts(mounts: impl Iterator<Item = PathBuf>) {
    LEFT.lock().expect("not poisoned").1.extend(mounts);
}

/// The binary's SIGINT/SIGTERM path: stops every `capstan up` (which stops
/// its masters and agents) and joined master still running, unmounts the
/// small disks and deletes the hosts. A PID is signalled only while it is
/// still this process's unreaped child (`waitpid` says so), never a
/// stranger that reused it.
pub fn tear_down_after_interrupt() {
    let (pids, mounts) = std::mem::take(&mut *LEFT.lock().expect("not poisoned"));
    let ours = |pid: u32| {
        let mut st = 0;
        // SAFETY: waitpid with WNOHANG on a PID we spawned; it reaps only our child.
        unsafe { libc::waitpid(pid as i32, &mut st, libc::WNOHANG) == 0 }
    };
    let mut running: Vec<u32> = pids.into_iter().filter(|p| ours(*p)).collect();
    for pid in &running {
        // SAFETY: kill(2) on our own running child.
        unsafe { libc::kill(*pid as i32, libc::SIGINT) };
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !running.is_empty() && Instant::now() < deadline {
        running.retain(|p| ours(*p));
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in running {
        // SAFETY: as above; it outlived the grace.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    for m in mounts {
        let _ = Command::new("umount").arg("--lazy").arg(m).status();
    }
    hosts::tear_down_all();
}

impl Drop for UpCluster {
    fn drop(&mut self) {
        if std::env::var_os("CAPSTAN_CHAOS_KEEP").is_some() {
            // For a post-mortem: every master's server.log and data dir.
            self.dir.disable_cleanup(true);
            eprintln!("[capstan-chaos] kept {}", self.dir.path().display());
        }
        self.closing.store(true, Ordering::Relaxed);
        for j in self.joined.lock().expect("not poisoned").iter_mut() {
            let _ = j.child.kill();
            let _ = j.child.wait();
        }
        self.signal(self.child.id(), libc::SIGINT);
        // Node agents tear their pods down first (up to a minute).
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Nothing runs on them now.
        self.lazy.clear();
        for m in &self.mounts {
            let _ = Command::new("umount").arg("--lazy").arg(m).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_responses_parse() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 21\r\n\r\nraft::compaction=off\n";
        assert_eq!(parse_http_response(ok).unwrap(), (200, "raft::compaction=off\n".to_string()));
        let bad = b"HTTP/1.1 400 Bad Request\r\n\r\nunknown failpoint";
        assert_eq!(parse_http_response(bad).unwrap(), (400, "unknown failpoint".to_string()));
        assert!(parse_http_response(b"").is_err());
        assert!(parse_http_response(b"HTTP/1.1 2").is_err());
        assert!(parse_http_response(b"SSH-2.0-OpenSSH").is_err());
    }
}
