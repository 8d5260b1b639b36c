//! `capstan-node`: the node agent binary. The logic lives in the library;
//! this file only parses the command line.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use capstan_node::agent::{self, NodeInfo};
use capstan_node::conn::{self, Masters};
use capstan_node::containerd::{Containerd, LogDriver};
use capstan_node::localpath;
use capstan_node::logdriver::{self, LogDriverConfig};
use capstan_node::metrics::{AgentMetrics, Checks, Instrumented};
use capstan_node::podnet::CniNetwork;
use capstan_node::sim::SimRuntime;
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;

#[derive(Parser)]
#[command(name = "capstan-node", about = "Capstan's node agent", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// State directory (identity, pod logs, containerd); a restart needs only this.
    #[arg(long, required = true)]
    data_dir: Option<PathBuf>,
    /// Masters' node gateway addresses (host:port, comma-separated), first start only.
    #[arg(long, value_delimiter = ',')]
    server: Vec<String>,
    /// Bootstrap token from `capstan token create`, first start only.
    #[arg(long)]
    token: Option<String>,
    /// Node name, first start only [default: the host name].
    #[arg(long)]
    name: Option<String>,
    #[arg(long, value_enum, default_value_t = RuntimeKind::Containerd)]
    runtime: RuntimeKind,
    /// With `--runtime sim`: host this many hollow nodes (`<name>-<i>`), each with its own connection.
    #[arg(long, default_value_t = 1)]
    sim_nodes: usize,
    /// Use this containerd instead of starting one under the data dir.
    #[arg(long)]
    containerd_socket: Option<PathBuf>,
    /// OCI/docker image archives here are imported at start and when they appear (air-gapped nodes).
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// On SIGTERM, stop and remove every container, sandbox and volume
    /// before exiting (`capstan up` does; a real node keeps them running).
    #[arg(long)]
    teardown_on_exit: bool,
    /// HTTP listener for /metrics, /healthz, /livez, /readyz (port 0 = any;
    /// the address goes into <data-dir>/endpoints.json).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_listen: std::net::SocketAddr,
    /// Where the masters' local-path provisioner puts this node's
    /// PersistentVolumes (advertised on the Node as the annotation
    /// capstan.io/local-path-root; created if missing) [default:
    /// <data-dir>/local-path, per hollow node with --sim-nodes].
    #[arg(long)]
    local_path_root: Option<PathBuf>,
    /// Address reported as the node's InternalIP [default: 127.0.0.1].
    #[arg(long, default_value = "127.0.0.1")]
    node_ip: String,
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a busybox OCI image archive (from the host's static busybox),
    /// for `--image-dir` on machines without a registry (the demo workload, tests).
    BusyboxImage {
        /// Where to write the archive.
        #[arg(long)]
        out: PathBuf,
        /// The image reference it carries.
        #[arg(long, default_value = "busybox:stable")]
        reference: String,
    },
    /// containerd `binary://` log driver: writes the container's stdout and
    /// stderr (fds 3 and 4) to a CRI-format log file with rotation. Started
    /// by the shim from the URI `logdriver::log_uri` builds, whose argv is
    /// the JSON config alone; --path and friends are the same for people.
    LogDriver {
        /// The configuration as JSON (what `log_uri` passes).
        config: Option<String>,
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        path: Option<PathBuf>,
        #[arg(long, default_value_t = logdriver::DEFAULT_MAX_SIZE)]
        max_size: u64,
        #[arg(long, default_value_t = logdriver::DEFAULT_MAX_FILES)]
        max_files: usize,
        #[arg(long, default_value_t = logdriver::DEFAULT_MAX_LINE)]
        max_line: usize,
    },
}

fn log_driver(
    config: Option<String>,
    path: Option<PathBuf>,
    max_size: u64,
    max_files: usize,
    max_line: usize,
) -> anyhow::Result<()> {
    let cfg = match (config, path) {
        (Some(json), _) => serde_json::from_str(&json).context("log-driver: bad JSON configuration")?,
        (None, Some(path)) => LogDriverConfig { path, max_size, max_files, max_line, fifos: None },
        (None, None) => anyhow::bail!("log-driver: give a JSON configuration or --path"),
    };
    logdriver::run(cfg).context("log-driver")
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum RuntimeKind {
    Containerd,
    Sim,
}

async fn identity(dir: &std::path::Path, cli: &Cli, name: &str) -> anyhow::Result<conn::Identity> {
    if let Some(id) = conn::load(dir)? {
        return Ok(id);
    }
    let token = cli.token.as_deref().context("first start: --token is required (capstan token create)")?;
    if cli.server.is_empty() {
        anyhow::bail!("first start: --server is required (a master's node gateway address)");
    }
    std::fs::create_dir_all(dir)?;
    conn::join(dir, &cli.server, token, name).await
}

/// The local-path root of the node whose data dir is `dir`, created.
fn local_path_root(cli: &Cli, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let root = cli.local_path_root.clone().unwrap_or_else(|| dir.join(localpath::DEFAULT_DIR));
    localpath::prepare_root(&root).with_context(|| format!("--local-path-root {}", root.display()))
}

/// Starts the ops HTTP listener and records its address in `<data-dir>/endpoints.json`.
async fn serve_ops(cli: &Cli, data_dir: &std::path::Path, metrics: AgentMetrics, checks: Checks) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cli.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", cli.metrics_listen))?;
    let url = format!("http://{}", listener.local_addr()?);
    std::fs::create_dir_all(data_dir)?;
    capstan_raft::bootstrap::write_durable(
        &data_dir.join("endpoints.json"),
        &serde_json::to_vec_pretty(&serde_json::json!({"metrics_url": url, "pid": std::process::id()}))?,
    )?;
    tokio::spawn(async move {
        if let Err(e) = capstan_node::metrics::serve(listener, metrics, checks).await {
            tracing::error!(error = %e, "metrics listener failed");
        }
    });
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::LogDriver { config, path, max_size, max_files, max_line }) => {
            return log_driver(config, path, max_size, max_files, max_line)
        }
        Some(Command::BusyboxImage { out, reference }) => {
            let built = capstan_node::testimage::busybox_oci_archive(&out, &reference)?;
            println!("{} {}", built.reference, built.config_digest);
            return Ok(());
        }
        None => {}
    }
    let data_dir = cli.data_dir.clone().context("--data-dir is required")?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let base = match &cli.name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string(),
        };
        match cli.runtime {
            RuntimeKind::Sim => {
                let metrics = AgentMetrics::new()?;
                let ping: Checks = Arc::new(|| Box::pin(async { vec![("ping", None)] }));
                serve_ops(&cli, &data_dir, metrics.clone(), ping).await?;
                let mut agents = tokio::task::JoinSet::new();
                // Hollow nodes share one UDP socket; they join 32 at a time.
                let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
                let nodes: Vec<(String, PathBuf)> = (0..cli.sim_nodes.max(1))
                    .map(|i| {
                        if cli.sim_nodes > 1 {
                            let n = format!("{base}-{i}");
                            (n.clone(), data_dir.join(&n))
                        } else {
                            (base.clone(), data_dir.clone())
                        }
                    })
                    .collect();
                let joined: Vec<anyhow::Result<(conn::Identity, PathBuf)>> =
                    futures::stream::iter(nodes.into_iter().map(|(name, dir)| {
                        let cli = &cli;
                        async move { identity(&dir, cli, &name).await.map(|id| (id, dir)) }
                    }))
                    .buffer_unordered(32)
                    .collect()
                    .await;
                for j in joined {
                    let (id, dir) = j?;
                    let masters = Masters::with_endpoint(&id, endpoint.clone())?;
                    let mut info = NodeInfo::from_host(&id.file.name, &cli.node_ip, "sim://0.1");
                    info.labels.push(("capstan.io/runtime".into(), "sim".into()));
                    // Hollow nodes mount nothing, but advertise a root so claims bind for them too.
                    info.local_path_root = Some(local_path_root(&cli, &dir)?);
                    let rt = Arc::new(Instrumented::new(Arc::new(SimRuntime::new()), metrics.clone()));
                    agents.spawn(agent::serve(info, masters, rt, dir, metrics.clone()));
                }
                while let Some(r) = agents.join_next().await {
                    r??;
                }
                Ok(())
            }
            RuntimeKind::Containerd => {
                let id = identity(&data_dir, &cli, &base).await?;
                let masters = Masters::new(&id)?;
                let seed = format!("{}:{}", id.file.name, data_dir.display());
                let network = Arc::new(CniNetwork::new(&data_dir, &seed));
                let rt = match &cli.containerd_socket {
                    Some(socket) => Containerd::connect(socket, &data_dir).await?,
                    None => Containerd::start_own(&data_dir).await?,
                };
                let me = std::env::current_exe().context("locating capstan-node (the log driver)")?;
                let rt = Arc::new(rt.with_network(network.clone()).with_log_driver(LogDriver::Binary(me)));
                let metrics = AgentMetrics::new()?;
                let instrumented = Arc::new(Instrumented::new(rt.clone(), metrics.clone()));
                if let Some(dir) = &cli.image_dir {
                    rt.watch_image_dir(dir.clone());
                }
                let mut info = NodeInfo::from_host(&id.file.name, &cli.node_ip, "containerd://1.6");
                info.local_path_root = Some(local_path_root(&cli, &data_dir)?);
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let agent = agent::Agent::new(info, masters, instrumented, data_dir.clone(), metrics.clone());
                let ready = agent.clone();
                let checks: Checks = Arc::new(move || {
                    let a = ready.clone();
                    Box::pin(async move { a.readiness().await })
                });
                serve_ops(&cli, &data_dir, metrics, checks).await?;
                let result = tokio::select! {
                    r = agent.clone().run() => r,
                    _ = tokio::signal::ctrl_c() => Ok(()),
                    _ = term.recv() => Ok(()),
                };
                agent.stop();
                // Let a worker's action in flight finish before tearing down.
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                // Containers keep running under their shims; containerd is
                // ours and stops with us (the next start adopts them).
                if cli.teardown_on_exit {
                    agent::teardown_all(rt.as_ref(), &data_dir).await;
                    network.release().await;
                    // Its Services' rules go with the node (a real node keeps
                    // them: fail-static, like its containers).
                    let table = capstan_node::proxy::table_name(&agent.info.name);
                    if let Err(e) = capstan_node::proxy::remove(&table).await {
                        tracing::warn!(table, error = %format!("{e:#}"), "removing the service rules");
                    }
                }
                rt.shutdown().await;
                result
            }
        }
    })
}
