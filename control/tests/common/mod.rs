//! Test harness: real `capstan server` processes on loopback, an admin etcd
//! client, and helpers. Every process is started here, tracked by PID and
//! killed on drop; nothing else on the machine is touched.

#![allow(dead_code)]

pub mod kubelet;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capstan_proto::etcd::etcdserverpb as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub const BIN: &str = env!("CARGO_BIN_EXE_capstan");

pub struct Master {
    pub name: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub masters: Vec<Master>,
    pub extra: Vec<String>,
}

pub use capstan_chaos::cluster::Endpoints;

pub fn endpoints(dir: &Path) -> Option<Endpoints> {
    serde_json::from_slice(&std::fs::read(dir.join("endpoints.json")).ok()?).ok()
}

fn spawn(dir: &Path, args: &[String]) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log")).unwrap();
    Command::new(BIN)
        .args([
            "--log-level",
            &std::env::var("CAPSTAN_TEST_LOG").unwrap_or_else(|_| "info".into()),
            "server",
            "--data-dir",
        ])
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start capstan server")
}

impl Cluster {
    /// Start `n` masters: the first with --init, the rest joining with tokens.
    pub fn start(n: usize, extra: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = Cluster { tmp, masters: vec![], extra: extra.iter().map(|s| s.to_string()).collect() };
        for i in 1..=n {
            c.add_master(i);
        }
        c
    }

    pub fn add_master(&mut self, i: usize) {
        let name = format!("master-{i}");
        let dir = self.tmp.path().join(&name);
        let mut args: Vec<String> = vec![
            "--name".into(),
            name.clone(),
            "--peer-listen".into(),
            "127.0.0.1:0".into(),
            "--etcd-listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--api-listen".into(),
            "127.0.0.1:0".into(),
            "--node-listen".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(self.extra.clone());
        if self.masters.is_empty() {
            args.push("--init".into());
        } else {
            let via = self.masters.iter().find(|m| m.child.is_some()).expect("a running master");
            let token = create_token(&via.dir);
            let peer = endpoints(&via.dir).expect("endpoints").peer;
            args.extend(["--join".into(), peer, "--token".into(), token]);
        }
        let child = spawn(&dir, &args);
        self.masters.push(Master { name, dir: dir.clone(), child: Some(child) });
        self.wait_ready(self.masters.len() - 1);
    }

    pub fn wait_ready(&mut self, i: usize) -> Endpoints {
        let deadline = Instant::now() + Duration::from_secs(90);
        let m = &mut self.masters[i];
        loop {
            let pid = m.child.as_ref().map(|c| c.id());
            if let Some(ep) = endpoints(&m.dir) {
                if Some(ep.pid) == pid {
                    return ep;
                }
            }
            if let Some(c) = m.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("{} exited: {st}\n{}", m.name, log_tail(&m.dir));
                }
            }
            assert!(Instant::now() < deadline, "{} not ready\n{}", m.name, log_tail(&m.dir));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.masters[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait (clean stop).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.masters[i].child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    c.kill().unwrap();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.wait();
        }
    }

    /// Restart from the data dir alone.
    pub fn restart(&mut self, i: usize) {
        assert!(self.masters[i].child.is_none());
        let _ = std::fs::remove_file(self.masters[i].dir.join("endpoints.json"));
        let child = spawn(&self.masters[i].dir, &[]);
        self.masters[i].child = Some(child);
        self.wait_ready(i);
    }

    pub fn url(&self, i: usize) -> String {
        endpoints(&self.masters[i].dir).expect("endpoints").etcd_url
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.masters.len()).filter(|i| self.masters[*i].child.is_some()).collect()
    }

    pub async fn client(&self, i: usize) -> Channel {
        connect(&self.url(i), &self.masters[0].dir).await
    }

    /// Index of the current leader, asked of any running master.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in self.running() {
                if let Ok(ch) = try_connect(&self.url(i), &self.masters[0].dir).await {
                    if let Ok(st) =
                        pb::maintenance_client::MaintenanceClient::new(ch).status(pb::StatusRequest::default()).await
                    {
                        let leader = st.into_inner().leader;
                        if let Some(j) = self
                            .running()
                            .into_iter()
                            .find(|j| endpoints(&self.masters[*j].dir).map(|e| e.id) == Some(leader))
                        {
                            return j;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.masters {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub fn log_tail(dir: &Path) -> String {
    let s = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

pub fn create_token(dir: &Path) -> String {
    let out = Command::new(BIN)
        .args(["token", "create", "--usage", "master", "--data-dir"])
        .arg(dir)
        .output()
        .expect("token create");
    assert!(out.status.success(), "token create failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Admin credentials (written by `capstan up`, or issued here from master-1's CA).
pub fn admin_files(master1: &Path) -> (String, String, String) {
    let ca = std::fs::read_to_string(master1.join("pki/ca.crt")).unwrap();
    // The test issues its own admin cert through the binary-independent PKI.
    let ca_key = std::fs::read_to_string(master1.join("pki/ca.key")).unwrap();
    let ca_obj = capstan_raft::pki::ClusterCa::from_pem(&ca, &ca_key).unwrap();
    let cert = ca_obj.issue_client("admin", &["system:masters".to_string()]).unwrap();
    (ca, cert.cert_pem, cert.key_pem)
}

pub async fn try_connect(url: &str, master1: &Path) -> Result<Channel, tonic::transport::Error> {
    let (ca, cert, key) = admin_files(master1);
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).identity(Identity::from_pem(cert, key));
    Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
}

pub async fn connect(url: &str, master1: &Path) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match try_connect(url, master1).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "connect {url}: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn kv(ch: &Channel) -> pb::kv_client::KvClient<Channel> {
    pb::kv_client::KvClient::new(ch.clone())
}

/// The store's current revision as this master reports it.
/// Every key outside what the masters keep for themselves (Kubernetes
/// objects under `/registry/`, Capstan's own under `/capstan/`), with its mod
/// revision: what clients of the etcd API wrote. (The store revision itself
/// moves on its own: the controller lease is renewed several times a second.)
pub async fn client_keys(ch: &Channel) -> Vec<(Vec<u8>, i64)> {
    let r = kv(ch)
        .range(pb::RangeRequest { key: vec![0], range_end: vec![0], keys_only: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    r.kvs
        .into_iter()
        .filter(|kv| !kv.key.starts_with(b"/registry/") && !kv.key.starts_with(b"/capstan/"))
        .map(|kv| (kv.key, kv.mod_revision))
        .collect()
}

pub async fn revision(ch: &Channel) -> i64 {
    let r = kv(ch).range(pb::RangeRequest { key: b"x".to_vec(), ..Default::default() }).await.unwrap();
    r.into_inner().header.unwrap().revision
}

/// A minimal HTTP/1.0 GET (no client library needed for loopback checks):
/// returns (status code, body).
pub fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, body.to_string()))
}

/// `capstan up` as a user runs it (the chaos harness's driver); stopped
/// with SIGINT (Ctrl-C) on drop.
pub use capstan_chaos::cluster::UpCluster as Up;

/// Runs etcdctl against the cluster with the credentials `capstan up`
/// wrote; it must succeed; its stdout.
pub fn etcdctl(up: &Up, args: &[&str]) -> String {
    etcdctl_try(up, args).unwrap_or_else(|err| panic!("etcdctl {args:?}: {err}"))
}

/// Like [`etcdctl`], its stderr as the error when it fails (e.g. while a
/// master is down and the client has not yet moved off it).
pub fn etcdctl_try(up: &Up, args: &[&str]) -> Result<String, String> {
    let env = std::fs::read_to_string(up.dir.path().join("etcdctl.env")).unwrap();
    let mut cmd = std::process::Command::new("etcdctl");
    for (k, v) in env.lines().filter_map(|l| l.strip_prefix("export ")).filter_map(|l| l.split_once('=')) {
        cmd.env(k, v);
    }
    let out = cmd.args(args).output().unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// Master `i`'s (0-based) /metrics address, from its endpoints.json.
pub fn metrics_url(up: &Up, i: usize) -> String {
    let raw = std::fs::read(up.master_dir(i).join("endpoints.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    v["metrics_url"].as_str().unwrap().to_string()
}

pub fn up(masters: usize) -> Up {
    Up::start(Path::new(BIN), masters).expect("capstan up")
}

/// kubectl with `kc` as its kubeconfig (bounded to 90 s): (success, stdout, stderr).
pub fn kubectl(kc: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new("timeout")
        .arg("90")
        .arg("kubectl")
        .args(args)
        .env("KUBECONFIG", kc)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

pub fn ok(kc: &Path, args: &[&str]) -> String {
    let (success, out, err) = kubectl(kc, args, None);
    assert!(success, "kubectl {args:?}: {err}");
    out
}

pub fn json_of(kc: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&ok(kc, &a)).unwrap()
}

/// `promtool check metrics` on an exposition: Err with its complaints.
pub fn promtool_check_metrics(body: &str) -> Result<(), String> {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool: {e}"))?;
    promtool.stdin.take().expect("piped").write_all(body.as_bytes()).map_err(|e| e.to_string())?;
    let out = promtool.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// Polls `kubectl <args> -o json` until `check` accepts the object (a
/// failing kubectl counts as not yet), or fails after `secs` showing what
/// it saw last.
pub fn wait_json(
    kc: &Path,
    args: &[&str],
    secs: u64,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    loop {
        let (good, out, err) = kubectl(kc, &a, None);
        let seen =
            if good { serde_json::from_str::<serde_json::Value>(&out).map_err(|e| e.to_string()) } else { Err(err) };
        if let Ok(v) = &seen {
            if check(v) {
                return v.clone();
            }
        }
        if Instant::now() >= deadline {
            let last = match seen {
                Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                Err(e) => e,
            };
            panic!("timed out after {secs} s waiting for {what}; last seen: {last}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Polls `f` until it returns Some, or fails naming `what` after `secs`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Master `i`'s (0-based) node gateway address, from its endpoints.json.
pub fn node_addr(up: &Up, i: usize) -> String {
    let raw = std::fs::read(up.master_dir(i).join("endpoints.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    v["node_addr"].as_str().unwrap().to_string()
}

/// A bootstrap token for node agents (`capstan token create`).
pub fn node_token(up: &Up) -> String {
    let out = Command::new(BIN).args(["token", "create", "--data-dir"]).arg(up.master_dir(0)).output().unwrap();
    assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `capstan-node`, built next to `capstan` (`cargo test --workspace` builds it).
pub fn node_binary() -> PathBuf {
    let p = Path::new(BIN).with_file_name("capstan-node");
    assert!(p.exists(), "{} is missing: cargo build -p capstan-node (the tests start the real agent)", p.display());
    p
}

/// A hollow node (`capstan-node --runtime sim`) joined to `servers`, killed on drop.
pub struct SimAgent {
    child: Child,
    pub log: PathBuf,
}

impl SimAgent {
    pub fn start(up: &Up, name: &str, servers: &[String]) -> SimAgent {
        let log = up.dir.path().join(format!("{name}.log"));
        let child = Command::new(node_binary())
            .args(["--runtime", "sim", "--name", name, "--metrics-listen", "127.0.0.1:0"])
            .args(["--server", &servers.join(","), "--token", &node_token(up), "--data-dir"])
            .arg(up.dir.path().join(name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        SimAgent { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
