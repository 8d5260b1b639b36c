//! `capstan up`: a local cluster on this machine.
//!
//! Starts master-1 with `--init`, then joins the others with a bootstrap
//! token, all on free loopback ports; writes `<data-dir>/etcdctl.env` for an
//! admin client; restarts a master that dies; runs until Ctrl-C (or
//! SIGTERM), then stops its children (SIGTERM, then SIGKILL after a grace
//! period). Run again on the same data
//! dir, it restarts the same cluster from disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tokio::process::{Child, Command};

use crate::admin;
use crate::server::{read_endpoints, Endpoints};

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
}

struct Master {
    name: String,
    dir: PathBuf,
    child: Child,
}

fn spawn_master(dir: &Path, extra: &[String], log_level: &str) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(dir)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--log-level").arg(log_level).arg("server").arg("--data-dir").arg(dir);
    cmd.args(extra);
    cmd.stdout(log.try_clone()?).stderr(log).stdin(std::process::Stdio::null());
    cmd.kill_on_drop(true);
    // If `up` itself dies, its masters must not linger.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting a master in {}", dir.display()))
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
    for m in masters.iter() {
        if let Some(pid) = m.child.id() {
            // SAFETY: plain kill(2) on a child we started; it has not been reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    for m in masters.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), m.child.wait()).await {
            Ok(_) => eprintln!("  {} stopped", m.name),
            Err(_) => {
                let _ = m.child.kill().await;
                eprintln!("  {} killed after 10 s", m.name);
            }
        }
    }
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.data_dir)?;
    let data_dir = std::fs::canonicalize(&a.data_dir)?;
    let log_level = std::env::var("CAPSTAN_LOG").unwrap_or_else(|_| "info".into());
    let mut masters: Vec<Master> = Vec::new();
    let result = bring_up(&a, &data_dir, &log_level, &mut masters).await;
    if let Err(e) = result {
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
                // Supervise: a master that died is restarted from its data dir.
                for m in masters.iter_mut() {
                    if let Ok(Some(status)) = m.child.try_wait() {
                        eprintln!("{} exited ({status}); restarting it", m.name);
                        m.child = spawn_master(&m.dir, &a.server_arg, &log_level)?;
                    }
                }
            }
        }
    }
    eprintln!("stopping {} masters", masters.len());
    stop_all(&mut masters).await;
    Ok(())
}

async fn bring_up(a: &UpArgs, data_dir: &Path, log_level: &str, masters: &mut Vec<Master>) -> anyhow::Result<()> {
    let n = a.masters as usize;
    let mut endpoints = Vec::new();
    for i in 1..=n {
        let name = format!("master-{i}");
        let dir = data_dir.join(&name);
        let mut extra = a.server_arg.clone();
        if !dir.join("member.json").exists() {
            extra.extend(["--name".into(), name.clone(), "--peer-listen".into(), "127.0.0.1:0".into()]);
            extra.extend([
                "--etcd-listen".into(),
                "127.0.0.1:0".into(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
                "--api-listen".into(),
                "127.0.0.1:0".into(),
                "--node-listen".into(),
                "127.0.0.1:0".into(),
            ]);
            if a.plaintext {
                extra.extend(["--etcd-plaintext-listen".into(), "127.0.0.1:0".into()]);
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
        let child = spawn_master(&dir, &extra, log_level)?;
        masters.push(Master { name: name.clone(), dir, child });
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
    let yml = format!(
        "# Written by `capstan up`: prometheus --config.file={}\nglobal:\n  scrape_interval: 5s\nscrape_configs:\n  - job_name: capstan-master\n    static_configs:\n{targets}",
        data_dir.join("prometheus.yml").display()
    );
    std::fs::write(data_dir.join("prometheus.yml"), yml)?;
    Ok(())
}
