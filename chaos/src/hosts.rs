//! Hosts: each master, each node agent and the clients on a machine of its
//! own, as network namespaces on one bridge (RELIABILITY.md's fault menu
//! cuts hosts apart, not ports).
//!
//! ```text
//!                 switch netns: bridge br0
//!        c        m0       m1      m2  ...   a0  ...     (veths)
//!        |        |        |       |         |
//!     client   master-1 master-2 master-3  node-1        (netns, eth0)
//!   10.99.0.2  10.99.0.10  .11      .12    10.99.0.100
//! ```
//!
//! The harness itself runs in the client host ([`Hosts::in_client`]): its
//! workload, watchers, kubectl and `capstan up` reach the masters only
//! through the bridge. `capstan up` starts each master and agent in its
//! host (hidden `--master-hosts`, `--node-hosts`); masters the harness joins
//! get fresh hosts ([`Hosts::master`]). Faults are nftables tables inside a
//! host's namespace, matched by the other hosts' addresses.
//!
//! Nothing touches the machine's own network: the bridge lives in a switch
//! namespace of its own, and every namespace is named
//! `capstan-chaos-<pid>-<n>-…`. Dropping [`Hosts`] deletes them (processes
//! are stopped first by the cluster's drop); a harness that was killed
//! outright leaves namespaces whose PID is gone, and the next one deletes
//! those ([`Hosts::create`]). On SIGINT/SIGTERM the binary calls
//! [`tear_down_all`].

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;

const PREFIX: &str = "capstan-chaos-";
const SUBNET: [u8; 3] = [10, 99, 0];
const CLIENT: u8 = 2;
const FIRST_MASTER: u8 = 10;
const FIRST_AGENT: u8 = 100;
/// Masters the harness may join over a run (slots 0..3 plus replacements).
const MAX_MASTERS: usize = FIRST_AGENT as usize - FIRST_MASTER as usize;

/// One host: a network namespace with one address on the bridge.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Host {
    /// `<netns>=<ip>`, as `capstan up --master-hosts` takes it.
    pub fn flag(&self) -> String {
        format!("{}={}", self.netns, self.ip)
    }
}

/// The address of a host by role: pure, so the plan is tested without
/// namespaces.
pub fn address(role: Role) -> anyhow::Result<Ipv4Addr> {
    let last = match role {
        Role::Client => CLIENT,
        Role::Master(i) if i < MAX_MASTERS => FIRST_MASTER + i as u8,
        Role::Agent(k) if k < 255 - FIRST_AGENT as usize => FIRST_AGENT + k as u8,
        _ => anyhow::bail!("no address left for {role:?}"),
    };
    Ok(Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], last))
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Role {
    Client,
    Master(usize),
    Agent(usize),
}

impl Role {
    /// The veth's name on the switch side (at most 15 bytes).
    fn port(self) -> String {
        match self {
            Role::Client => "c".into(),
            Role::Master(i) => format!("m{i}"),
            Role::Agent(k) => format!("a{k}"),
        }
    }
}

pub struct Hosts {
    prefix: String,
    switch: String,
    made: Mutex<Vec<(Role, Host)>>,
}

/// Namespaces created by this process and not yet deleted.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());
static RUNS: AtomicUsize = AtomicUsize::new(0);

impl Hosts {
    /// The switch, the client host, and a host per master and agent.
    pub fn create(masters: usize, agents: usize) -> anyhow::Result<Arc<Hosts>> {
        delete_orphans();
        let prefix = format!("{PREFIX}{}-{}-", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed));
        let switch = format!("{prefix}sw");
        add_netns(&switch)?;
        let hosts = Arc::new(Hosts { prefix, switch, made: Mutex::new(Vec::new()) });
        ip(&["-n", &hosts.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hosts.switch, "link", "set", "br0", "up"])?;
        hosts.host(Role::Client)?;
        for i in 0..masters {
            hosts.host(Role::Master(i))?;
        }
        for k in 0..agents {
            hosts.host(Role::Agent(k))?;
        }
        Ok(hosts)
    }

    /// The host for `role`, made on first use.
    pub fn host(&self, role: Role) -> anyhow::Result<Host> {
        let mut made = self.made.lock().expect("not poisoned");
        if let Some((_, h)) = made.iter().find(|(r, _)| *r == role) {
            return Ok(h.clone());
        }
        let ip_addr = address(role)?;
        let netns = format!("{}{}", self.prefix, role.port());
        add_netns(&netns)?;
        let port = role.port();
        ip(&["-n", &self.switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip(&["-n", &self.switch, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{ip_addr}/24"), "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let host = Host { netns, ip: ip_addr };
        made.push((role, host.clone()));
        Ok(host)
    }

    pub fn client(&self) -> Host {
        self.host(Role::Client).expect("made by create")
    }

    /// The master host that has address `ip`, if any.
    pub fn master_at(&self, ip: Ipv4Addr) -> Option<Host> {
        let made = self.made.lock().expect("not poisoned");
        made.iter().find(|(r, h)| matches!(r, Role::Master(_)) && h.ip == ip).map(|(_, h)| h.clone())
    }

    /// Every master host's address so far (replaced masters included:
    /// a fault that cuts "the other masters" cuts them all).
    pub fn master_ips(&self) -> Vec<Ipv4Addr> {
        let made = self.made.lock().expect("not poisoned");
        made.iter().filter(|(r, _)| matches!(r, Role::Master(_))).map(|(_, h)| h.ip).collect()
    }

    pub fn masters_made(&self) -> usize {
        self.made.lock().expect("not poisoned").iter().filter(|(r, _)| matches!(r, Role::Master(_))).count()
    }

    /// Runs `f` on a thread of its own inside the client host, with a
    /// runtime of its own: every socket it opens, and every process it
    /// starts, is on the client host. Threads inherit their creator's
    /// namespace, so the runtime's workers are there too.
    pub async fn in_client<T, F>(self: &Arc<Self>, f: impl FnOnce() -> F + Send + 'static) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = anyhow::Result<T>>,
    {
        let netns = self.client().netns;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("chaos-client".into()).spawn(move || {
            let result = enter(&netns).and_then(|()| {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
                let out = rt.block_on(f());
                // Background tasks (watchers, the proxy) end with the run.
                rt.shutdown_timeout(std::time::Duration::from_secs(5));
                out
            });
            let _ = tx.send(result);
        })?;
        rx.await.context("the client host's thread died")?
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let made = std::mem::take(&mut *self.made.lock().expect("not poisoned"));
        for (_, h) in made {
            delete_netns(&h.netns);
        }
        delete_netns(&self.switch);
    }
}

/// Moves the calling thread into network namespace `netns`.
pub fn enter(netns: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{netns}")).with_context(|| format!("netns {netns}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a namespace fd we hold open; it changes only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    anyhow::ensure!(rc == 0, "entering netns {netns}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// `nft -f -` inside host `netns` (the harness's own namespace if `None`).
pub fn nft(netns: Option<&str>, script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let mut child = cmd.args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().context("running nft")?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
    let st = child.wait()?;
    anyhow::ensure!(st.success(), "nft refused ({st}):\n{script}");
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    anyhow::ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

fn add_netns(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", name]).context("creating a network namespace (root needed)")?;
    LIVE.lock().expect("not poisoned").push(name.to_string());
    Ok(())
}

fn delete_netns(name: &str) {
    let _ = Command::new("ip").args(["netns", "delete", name]).output();
    LIVE.lock().expect("not poisoned").retain(|n| n != name);
}

/// Deletes every namespace this process made (the binary's interrupt
/// path; processes inside them must be stopped first).
pub fn tear_down_all() {
    let live = std::mem::take(&mut *LIVE.lock().expect("not poisoned"));
    for name in live {
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
    }
}

/// Namespaces left by a harness that no longer runs (killed outright).
fn delete_orphans() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = orphan_pid(&name) {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "delete", &name]).output();
            }
        }
    }
}

/// The harness PID in one of our namespace names.
fn orphan_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_by_role_are_distinct_and_bounded() {
        assert_eq!(address(Role::Client).unwrap(), Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(address(Role::Master(0)).unwrap(), Ipv4Addr::new(10, 99, 0, 10));
        assert_eq!(address(Role::Agent(1)).unwrap(), Ipv4Addr::new(10, 99, 0, 101));
        assert!(address(Role::Master(MAX_MASTERS - 1)).unwrap() < address(Role::Agent(0)).unwrap());
        assert!(address(Role::Master(MAX_MASTERS)).is_err());
        assert!(address(Role::Agent(155)).is_err());
        assert!(Role::Master(89).port().len() <= 15);
    }

    #[test]
    fn orphans_are_recognised_by_prefix_and_pid() {
        assert_eq!(orphan_pid("capstan-chaos-4242-0-m1"), Some(4242));
        assert_eq!(orphan_pid("capstan-chaos-x-0-m1"), None);
        assert_eq!(orphan_pid("cni-1234"), None);
    }
}
