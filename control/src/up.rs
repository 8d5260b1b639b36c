//! `capstan up`: a local cluster on this machine.
//!
//! Starts master-1 with `--init`, then joins the others with a bootstrap
//! token, all on free loopback ports; writes `<data-dir>/etcdctl.env` for an
//! admin client; then starts the node agents (`capstan-node`, joined with
//! a node token; by default one with containerd and an image directory
//! holding a busybox image) and applies a demo workload. It restarts a
//! master or agent that dies; runs until Ctrl-C (or SIGTERM), then stops
//! its children (agents first, tearing their containers down; SIGTERM,
//! then SIGKILL after a grace period). Run again on the same data dir, it
//! restarts the same cluster from disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tokio::process::{Child, Command};

use crate::admin;
use crate::server::{self, read_endpoints, Endpoints};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where the cluster lives (one sub-directory per master).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Number of masters.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=7))]
    pub masters: u32,
    /// Also serve plaintext etcd on loopback (for benchmarks).
    #[arg(long)]
    pub plaintext: bool,
    /// Extra flags passed to every `capstan server` (e.g. "--snapshot-every=1000").
    #[arg(long, allow_hyphen_values = true)]
    pub server_arg: Vec<String>,
    /// Node agents to start (`capstan-node`, next to this binary).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub nodes: u32,
    /// The agents' container runtime: `containerd` (real containers) or `sim` (hollow nodes).
    #[arg(long, default_value = "containerd", value_parser = ["containerd", "sim"])]
    pub runtime: String,
    /// Image archives the agents import [default: <data-dir>/images, with a busybox image].
    #[arg(long)]
    pub image_dir: Option<PathBuf>,
    /// Do not apply the demo workload.
    #[arg(long)]
    pub no_demo: bool,
    /// Chaos tests: run each master under libfaketime (Debian package
    /// `faketime`), its wall clock offset by what `<master-dir>/faketime`
    /// says (e.g. `+30`, `-30`, `+0`; re-read every second), so a harness
    /// can skew one master's clock while it runs. Monotonic time is left
    /// alone, as NTP leaves it.
    #[arg(long, hide = true)]
    pub faketime: bool,
    /// How long a master or node agent that died stays down before it is
    /// restarted, in milliseconds (supervision checks every 500 ms). Chaos
    /// runs keep a killed master down past the election timeout, so the
    /// others elect a new leader instead of the restarted one resuming.
    #[arg(long, default_value_t = 0)]
    pub restart_delay_ms: u64,
    /// Chaos tests: master i advertises peer address i (a fault-injecting
    /// proxy in front of its real peer port).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub peer_advertise: Vec<String>,
    /// Chaos tests: master i runs in network namespace i (`ip netns`) and
    /// listens on its address there: `<netns>=<ip>` per master.
    #[arg(long, hide = true, value_delimiter = ',', value_parser = parse_host)]
    pub master_hosts: Vec<(String, String)>,
    /// Chaos tests: node agent i runs in network namespace i, as above.
    #[arg(long, hide = true, value_delimiter = ',', value_parser = parse_host)]
    pub node_hosts: Vec<(String, String)>,
}

/// `<netns>=<ip>`.
fn parse_host(s: &str) -> Result<(String, String), String> {
    let (ns, ip) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected <netns>=<ip>"))?;
    let ip: std::net::IpAddr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if ns.is_empty() || ns.contains('/') {
        return Err(format!("{s:?}: not a network namespace name"));
    }
    Ok((ns.to_string(), ip.to_string()))
}

struct Master {
    name: String,
    dir: PathBuf,
    /// The network namespace it runs in (chaos hosts), if not this one.
    netns: Option<String>,
    child: Child,
    /// When it was seen dead, until it is restarted.
    died: Option<Instant>,
}

/// libfaketime's multi-threaded build, as Debian installs it.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

fn spawn_master(
    dir: &Path,
    netns: Option<&str>,
    extra: &[String],
    log_level: &str,
    faketime: bool,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut args: Vec<String> = vec!["--log-level".into(), log_level.into(), "server".into(), "--data-dir".into()];
    args.push(dir.display().to_string());
    args.extend(extra.iter().cloned());
    let mut env = vec![];
    if faketime {
        anyhow::ensure!(Path::new(LIBFAKETIME).exists(), "--faketime needs {LIBFAKETIME} (apt-get install faketime)");
        std::fs::create_dir_all(dir)?;
        let offset = dir.join("faketime");
        if !offset.exists() {
            std::fs::write(&offset, "+0\n")?;
        }
        env = vec![
            ("LD_PRELOAD", LIBFAKETIME.to_string()),
            ("FAKETIME_TIMESTAMP_FILE", offset.display().to_string()),
            ("FAKETIME_CACHE_DURATION", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ];
    }
    spawn_child(&exe, dir, netns, "server.log", &args, &env)
}

/// A child in `dir` logging to `dir/<log>`, dying with `up`; in network
/// namespace `netns` if given.
fn spawn_child(
    exe: &Path,
    dir: &Path,
    netns: Option<&str>,
    log: &str,
    args: &[String],
    env: &[(&str, String)],
) -> anyhow::Result<Child> {
    std::fs::create_dir_all(dir)?;
    // Opened here: between fork and exec only async-signal-safe calls.
    let ns = match netns {
        Some(ns) => Some(std::fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?),
        None => None,
    };
    let ns_fd = ns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(log))?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    cmd.envs(env.iter().map(|(k, v)| (*k, v)));
    cmd.stdout(log.try_clone()?).stderr(log).stdin(std::process::Stdio::null());
    cmd.kill_on_drop(true);
    // If `up` itself dies, its masters must not linger.
    // SAFETY: prctl and setns (on a descriptor opened before the fork) are
    // plain syscalls, async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {} in {}", exe.display(), dir.display()))
}

async fn wait_ready(m: &mut Master, timeout: Duration) -> anyhow::Result<Endpoints> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(ep) = read_endpoints(&m.dir) {
            if Some(ep.pid) == m.child.id() {
                return Ok(ep);
            }
        }
        if let Some(status) = m.child.try_wait()? {
            bail!("{} exited ({status}); see {}", m.name, m.dir.join("server.log").display());
        }
        if Instant::now() > deadline {
            bail!("{} not ready after {:?}; see {}", m.name, timeout, m.dir.join("server.log").display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stop_all(masters: &mut [Master]) {
    stop_within(masters, Duration::from_secs(10)).await
}

/// SIGTERM to each, SIGKILL to those still running after `grace`.
async fn stop_within(masters: &mut [Master], grace: Duration) {
    for m in masters.iter() {
        if let Some(pid) = m.child.id() {
            // SAFETY: plain kill(2) on a child we started; it has not been reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    for m in masters.iter_mut() {
        match tokio::time::timeout(grace, m.child.wait()).await {
            Ok(_) => eprintln!("  {} stopped", m.name),
            Err(_) => {
                let _ = m.child.kill().await;
                eprintln!("  {} killed after {grace:?}", m.name);
            }
        }
    }
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.data_dir)?;
    let data_dir = std::fs::canonicalize(&a.data_dir)?;
    let log_level = std::env::var("CAPSTAN_LOG").unwrap_or_else(|_| "info".into());
    let mut masters: Vec<Master> = Vec::new();
    let mut nodes: Vec<Master> = Vec::new();
    let mut node_args: Vec<Vec<String>> = Vec::new();
    let mut result = bring_up(&a, &data_dir, &log_level, &mut masters).await;
    if result.is_ok() && a.nodes > 0 {
        result = start_nodes(&a, &data_dir, &log_level, &mut nodes, &mut node_args).await;
    }
    if let Err(e) = result {
        stop_within(&mut nodes, Duration::from_secs(30)).await;
        stop_all(&mut masters).await;
        return Err(e);
    }
    eprintln!("kubectl:  export KUBECONFIG={}/kubeconfig; kubectl get namespaces", data_dir.display());
    eprintln!("etcdctl:  source {}/etcdctl.env; etcdctl member list", data_dir.display());
    eprintln!("cluster up (ready). Ctrl-C stops it.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                // Supervise: a master that died is restarted from its data
                // dir, unless it stopped because it was removed.
                let delay = Duration::from_millis(a.restart_delay_ms);
                let mut removed = None;
                for (i, m) in masters.iter_mut().enumerate() {
                    match fate(m, delay, true) {
                        Fate::Removed => removed = Some(i),
                        Fate::Restart => {
                            m.child = spawn_master(&m.dir, m.netns.as_deref(), &a.server_arg, &log_level, a.faketime)?
                        }
                        Fate::Running => {}
                    }
                }
                if let Some(i) = removed {
                    masters.remove(i);
                }
                for (n, args) in nodes.iter_mut().zip(&node_args) {
                    if fate(n, delay, false) == Fate::Restart {
                        n.child = spawn_child(&node_binary()?, &n.dir, n.netns.as_deref(), "node.log", args, &[])?;
                    }
                }
            }
        }
    }
    if !nodes.is_empty() {
        eprintln!("stopping {} node agents (their containers are torn down)", nodes.len());
        stop_within(&mut nodes, Duration::from_secs(60)).await;
    }
    eprintln!("stopping {} masters", masters.len());
    stop_all(&mut masters).await;
    Ok(())
}

#[derive(PartialEq)]
enum Fate {
    /// Running, or dead for less than the restart delay.
    Running,
    /// A master that stopped because it was removed: not restarted.
    Removed,
    Restart,
}

/// What to do about child `m` now; only a master (`removable`) can have
/// been removed.
fn fate(m: &mut Master, delay: Duration, removable: bool) -> Fate {
    if m.died.is_none() {
        match m.child.try_wait() {
            Ok(Some(st)) if removable && st.code() == Some(i32::from(server::EXIT_REMOVED)) => {
                eprintln!("{} was removed from the cluster; not restarting it", m.name);
                return Fate::Removed;
            }
            Ok(Some(st)) => {
                eprintln!("{} exited ({st}); restarting it", m.name);
                m.died = Some(Instant::now());
            }
            _ => {}
        }
    }
    if m.died.is_some_and(|t| t.elapsed() >= delay) {
        m.died = None;
        return Fate::Restart;
    }
    Fate::Running
}

async fn bring_up(a: &UpArgs, data_dir: &Path, log_level: &str, masters: &mut Vec<Master>) -> anyhow::Result<()> {
    let n = a.masters as usize;
    let mut endpoints = Vec::new();
    for i in 1..=n {
        let name = format!("master-{i}");
        let dir = data_dir.join(&name);
        let mut extra = a.server_arg.clone();
        let (netns, ip) = match a.master_hosts.get(i - 1) {
            Some((ns, ip)) => (Some(ns.clone()), ip.as_str()),
            None => (None, "127.0.0.1"),
        };
        if !dir.join("member.json").exists() {
            let any_port = format!("{ip}:0");
            extra.extend(["--name".into(), name.clone()]);
            for listen in ["--peer-listen", "--etcd-listen", "--metrics-listen", "--api-listen", "--node-listen"] {
                extra.extend([listen.to_string(), any_port.clone()]);
            }
            if a.plaintext {
                extra.extend(["--etcd-plaintext-listen".into(), "127.0.0.1:0".into()]);
            }
            if let Some(addr) = a.peer_advertise.get(i - 1) {
                extra.extend(["--peer-advertise".into(), addr.clone()]);
            }
            if i == 1 {
                extra.push("--init".into());
            } else {
                let token = admin::create_token(&data_dir.join("master-1"), Duration::from_secs(600), "master").await?;
                let first: &Endpoints = &endpoints[0];
                extra.extend(["--join".into(), first.peer.clone(), "--token".into(), token.to_string()]);
            }
        }
        eprintln!("[{i}/{n}] starting {name}");
        let child = spawn_master(&dir, netns.as_deref(), &extra, log_level, a.faketime)?;
        masters.push(Master { name: name.clone(), dir, netns, child, died: None });
        let ep = wait_ready(masters.last_mut().expect("just pushed"), Duration::from_secs(120)).await?;
        eprintln!("[{i}/{n}] {name} ready: api {} etcd {} peer {}", ep.api_url, ep.etcd_url, ep.peer);
        endpoints.push(ep);
        if i == 1 {
            // Usable at once, even if a later master fails to start.
            write_admin_env(data_dir, &endpoints)?;
        }
    }
    write_admin_env(data_dir, &endpoints)?;
    Ok(())
}

/// `capstan-node`, installed next to `capstan`.
fn node_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let node = exe.with_file_name("capstan-node");
    if !node.exists() {
        bail!("{} not found (build it: cargo build --workspace), or run with --nodes 0", node.display());
    }
    Ok(node)
}

/// The demo workload: a web server per node that says where it runs.
const DEMO: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: hello, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      containers:
      - name: web
        image: busybox:stable
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c", "mkdir -p /www && echo \"hello from $HOSTNAME on $NODE\" > /www/index.html && echo serving on port 8080 && exec httpd -f -v -p 8080 -h /www"]
        env:
        - name: NODE
          valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
        ports: [{containerPort: 8080}]
"#;

async fn start_nodes(
    a: &UpArgs,
    data_dir: &Path,
    log_level: &str,
    nodes: &mut Vec<Master>,
    node_args: &mut Vec<Vec<String>>,
) -> anyhow::Result<()> {
    let bin = node_binary()?;
    let containerd = a.runtime == "containerd";
    let image_dir = match &a.image_dir {
        Some(d) => d.clone(),
        None => data_dir.join("images"),
    };
    if containerd {
        std::fs::create_dir_all(&image_dir)?;
        let seeded = std::fs::read_dir(&image_dir)?.flatten().any(|e| e.path().extension().is_some_and(|x| x == "tar"));
        if !seeded {
            let out = std::process::Command::new(&bin)
                .args(["busybox-image", "--out"])
                .arg(image_dir.join("busybox.tar"))
                .output()
                .context("building the busybox image")?;
            if !out.status.success() {
                bail!("building the busybox image: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
    let master1 = data_dir.join("master-1");
    let servers: Vec<String> = (1..=a.masters)
        .filter_map(|i| read_endpoints(&data_dir.join(format!("master-{i}"))).ok())
        .map(|e| e.node_addr)
        .collect();
    let token =
        admin::create_token(&master1, Duration::from_secs(3600), capstan_proto::nodewire::NODE_TOKEN_USAGE).await?;
    let n = a.nodes as usize;
    for i in 1..=n {
        let name = format!("node-{i}");
        let dir = data_dir.join(&name);
        let mut args: Vec<String> = vec!["--log-level".into(), log_level.into(), "--data-dir".into()];
        args.push(dir.display().to_string());
        args.extend(["--runtime".into(), a.runtime.clone(), "--teardown-on-exit".into()]);
        // On its own host (chaos), 127.0.0.1 is that host's loopback.
        args.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
        let netns = a.node_hosts.get(i - 1).map(|(ns, _)| ns.clone());
        if !dir.join("node.json").exists() {
            args.extend(["--name".into(), name.clone(), "--server".into(), servers.join(",")]);
            args.extend(["--token".into(), token.to_string()]);
        }
        if containerd {
            args.extend(["--image-dir".into(), image_dir.display().to_string()]);
        }
        eprintln!("[{i}/{n}] starting {name} ({})", a.runtime);
        let child = spawn_child(&bin, &dir, netns.as_deref(), "node.log", &args, &[])?;
        nodes.push(Master { name, dir, netns, child, died: None });
        node_args.push(args);
    }
    wait_nodes_ready(data_dir, nodes, Duration::from_secs(120)).await?;
    let endpoints: Vec<Endpoints> =
        (1..=a.masters).filter_map(|i| read_endpoints(&data_dir.join(format!("master-{i}"))).ok()).collect();
    write_prometheus_config(data_dir, &endpoints)?;
    if containerd && !a.no_demo {
        apply_demo(data_dir);
    }
    Ok(())
}

/// Waits until every agent's Node reports Ready.
async fn wait_nodes_ready(data_dir: &Path, nodes: &mut [Master], timeout: Duration) -> anyhow::Result<()> {
    use capstan_proto::etcd::etcdserverpb as pb;
    let ch = admin::admin_channel(&data_dir.join("master-1")).await?;
    let mut kv = pb::kv_client::KvClient::new(ch);
    let deadline = Instant::now() + timeout;
    for node in nodes.iter_mut() {
        let key = format!("/registry/core/nodes/{}", node.name).into_bytes();
        loop {
            let resp = kv.range(pb::RangeRequest { key: key.clone(), ..Default::default() }).await;
            let ready = resp.ok().and_then(|r| r.into_inner().kvs.into_iter().next()).is_some_and(|kv| {
                capstan_proto::k8s::stored::StoredObject::decode(&kv.value, kv.mod_revision).is_ok_and(|o| {
                    o["status"]["conditions"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
                })
            });
            if ready {
                eprintln!("  {} ready", node.name);
                break;
            }
            if let Some(status) = node.child.try_wait()? {
                bail!("{} exited ({status}); see {}", node.name, node.dir.join("node.log").display());
            }
            if Instant::now() > deadline {
                bail!("{} not ready after {timeout:?}; see {}", node.name, node.dir.join("node.log").display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Applies the demo workload with kubectl, if there is one.
fn apply_demo(data_dir: &Path) {
    use std::io::Write;
    let child = std::process::Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .env("KUBECONFIG", data_dir.join("kubeconfig"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("kubectl not found: the demo workload was not applied");
        return;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(DEMO.as_bytes());
    }
    match child.wait_with_output() {
        Ok(o) if o.status.success() => {
            eprintln!("demo:     kubectl get pods -o wide; kubectl logs deploy/hello; kubectl exec deploy/hello -- cat /www/index.html")
        }
        Ok(o) => eprintln!("demo workload not applied: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => eprintln!("demo workload not applied: {e}"),
    }
}

/// Admin credentials and `etcdctl.env` for every master.
fn write_admin_env(data_dir: &Path, endpoints: &[Endpoints]) -> anyhow::Result<()> {
    let (ca, cert) = admin::issue_admin(&data_dir.join("master-1"))?;
    let (ca_p, cert_p, key_p) = (data_dir.join("ca.crt"), data_dir.join("admin.crt"), data_dir.join("admin.key"));
    std::fs::write(&ca_p, &ca)?;
    std::fs::write(&cert_p, &cert.cert_pem)?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&key_p)?;
        f.write_all(cert.key_pem.as_bytes())?;
    }
    let urls: Vec<&str> = endpoints.iter().map(|e| e.etcd_url.as_str()).collect();
    let mut env = format!(
        "export ETCDCTL_API=3\nexport ETCDCTL_ENDPOINTS={}\nexport ETCDCTL_CACERT={}\nexport ETCDCTL_CERT={}\nexport ETCDCTL_KEY={}\n",
        urls.join(","),
        ca_p.display(),
        cert_p.display(),
        key_p.display()
    );
    let plain: Vec<&str> = endpoints.iter().filter_map(|e| e.etcd_plaintext_url.as_deref()).collect();
    if !plain.is_empty() {
        env.push_str(&format!("# plaintext loopback endpoints (benchmarks): {}\n", plain.join(",")));
        env.push_str(&format!("export CAPSTAN_PLAINTEXT_ENDPOINTS={}\n", plain.join(",")));
    }
    std::fs::write(data_dir.join("etcdctl.env"), env)?;
    if let Some(first) = endpoints.first() {
        let kc = crate::kubeconfig::render(
            &first.api_url,
            &ca,
            admin::ADMIN_USER,
            crate::kubeconfig::Credential::Cert { cert_pem: &cert.cert_pem, key_pem: &cert.key_pem },
        );
        crate::kubeconfig::write_private(&data_dir.join("kubeconfig"), &kc)?;
    }
    write_prometheus_config(data_dir, endpoints)?;
    Ok(())
}

/// `<data-dir>/prometheus.yml`: a scrape config for every process `up` started.
fn write_prometheus_config(data_dir: &Path, endpoints: &[Endpoints]) -> anyhow::Result<()> {
    let mut targets = String::new();
    for e in endpoints {
        let host = e.metrics_url.trim_start_matches("http://");
        targets.push_str(&format!("      - targets: ['{host}']\n        labels: {{ master: '{}' }}\n", e.name));
    }
    let mut yml = format!(
        "# Written by `capstan up`: prometheus --config.file={}\nglobal:\n  scrape_interval: 5s\nscrape_configs:\n  - job_name: capstan-master\n    static_configs:\n{targets}",
        data_dir.join("prometheus.yml").display()
    );
    // Node agents record their metrics address in their data dir.
    let mut agents = String::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(data_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("node-")))
        .collect();
    dirs.sort();
    for dir in dirs {
        let Ok(raw) = std::fs::read(dir.join("endpoints.json")) else { continue };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else { continue };
        let (Some(url), Some(name)) = (v["metrics_url"].as_str(), dir.file_name()) else { continue };
        let host = url.trim_start_matches("http://");
        agents.push_str(&format!(
            "      - targets: ['{host}']\n        labels: {{ node: '{}' }}\n",
            name.to_string_lossy()
        ));
    }
    if !agents.is_empty() {
        yml.push_str(&format!("  - job_name: capstan-node\n    static_configs:\n{agents}"));
    }
    std::fs::write(data_dir.join("prometheus.yml"), yml)?;
    Ok(())
}
