//! `capstan`: the Capstan master and its operator commands.
//!
//! Tour:
//! - `server.rs`: `capstan server`, one master: the replicated store
//!   (crate `capstan-raft`) plus the APIs served over it.
//! - `api/`: the Kubernetes API server (HTTPS; what kubectl talks to).
//! - `controllers/`: informers, controller actors (ReplicaSet, Deployment,
//!   garbage collector), the scheduler and the lease electing their master.
//! - `etcd/`: the etcd v3 gRPC API (KV, Watch, Lease, Cluster, Maintenance).
//! - `health.rs`: `/metrics`, `/livez`, `/readyz`, `/healthz` for Prometheus and probes.
//! - `up.rs`: `capstan up`, a local cluster of N masters on loopback.
//! - `admin.rs`: admin credentials and the etcd client used by operator
//!   commands (`capstan token create`, `up`).
//! - `kubeconfig.rs`: `capstan kubeconfig`, credentials for kubectl.
//! - `operator.rs`: `capstan status`, `member`, `snapshot save|restore`.
//! - `logging.rs`: tracing setup (JSON when stderr is not a terminal).

mod admin;
mod api;
mod controllers;
mod etcd;
mod gateway;
mod health;
mod kubeconfig;
mod logging;
mod operator;
mod server;
mod up;

use clap::{Parser, Subcommand};

// Measured: glibc malloc was ~15% of a master's CPU under write load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "capstan",
    version,
    about = "Capstan: a Kubernetes-compatible orchestrator with an embedded Raft store"
)]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, default_value = "info", env = "CAPSTAN_LOG")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one master.
    Server(Box<server::ServerArgs>),
    /// The optional features this binary was built with, as JSON (the
    /// chaos harness asks before arming crash points).
    #[command(hide = true)]
    BuildInfo,
    /// Bring up a local cluster of masters on loopback and run until Ctrl-C.
    Up(up::UpArgs),
    /// Bootstrap tokens for joining masters.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// A table of the masters: role, term, applied index, lag, size, alarms.
    Status(operator::StatusArgs),
    /// Cluster membership, online.
    Member {
        #[command(subcommand)]
        cmd: operator::MemberCmd,
    },
    /// Print (or write) a kubeconfig for the admin or a named user.
    Kubeconfig(kubeconfig::KubeconfigArgs),
    /// Backups: save from a running cluster, restore into a new one.
    Snapshot {
        #[command(subcommand)]
        cmd: operator::SnapshotCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a bootstrap token and print it.
    Create(admin::TokenCreateArgs),
    /// List bootstrap tokens (ids, usage, lifetime left).
    List(admin::TokenListArgs),
    /// Delete a bootstrap token before it expires.
    Delete(admin::TokenDeleteArgs),
}

/// Transparent huge pages off for this process. mimalloc asks for them on
/// its arenas, and a master's memory grows with every object: each first
/// touch of a 2 MiB page zeroed (and, with the kernel's `defrag=madvise`,
/// compacted for) the whole page. Measured on a 10,000-pod scheduler
/// burst (benches/RESULTS.md, session 12): with them a follower spent a
/// fifth of its CPU in that page-fault path, and the three masters used
/// 15–25% more CPU in all. Only the master's own process: `capstan up`
/// starts node agents and containerd, which keep the host's setting.
fn disable_transparent_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and only
    // sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!("transparent huge pages stay as the host has them: {}", std::io::Error::last_os_error());
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log_level);
    if matches!(cli.cmd, Cmd::Server(_)) {
        disable_transparent_huge_pages();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Server(a) => server::run(*a).await,
            Cmd::BuildInfo => {
                println!("{}", serde_json::json!({ "failpoints": cfg!(feature = "failpoints") }));
                Ok(())
            }
            Cmd::Up(a) => up::run(a).await,
            Cmd::Token { cmd: TokenCmd::Create(a) } => admin::token_create(a).await,
            Cmd::Token { cmd: TokenCmd::List(a) } => admin::token_list(a).await,
            Cmd::Token { cmd: TokenCmd::Delete(a) } => admin::token_delete(a).await,
            Cmd::Status(a) => operator::status(a).await,
            Cmd::Member { cmd } => operator::member(cmd).await,
            Cmd::Snapshot { cmd } => operator::snapshot(cmd).await,
            Cmd::Kubeconfig(a) => kubeconfig::run(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<server::Removed>() => {
            eprintln!("error: {e}");
            // Straight out: returning would run C++ static destructors while
            // RocksDB's background threads still run, which can abort the
            // process ("terminate called without an active exception") and
            // hide the status `capstan up` reads. Nothing is left to flush:
            // a removed master's store is not used again.
            // SAFETY: _exit(2) ends the process; no Rust state is touched after it.
            unsafe { libc::_exit(server::EXIT_REMOVED.into()) }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
