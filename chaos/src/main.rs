//! `capstan-chaos`: run fault scenarios against real masters and check that
//! nothing was lost; or check a recorded history.

use std::path::PathBuf;
use std::time::Duration;

use capstan_chaos::run::{RunConfig, Scenario};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "capstan-chaos", version, about = "Capstan chaos harness and checkers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Run every master, agent and client on 127.0.0.1 (faults by port)
    /// instead of on hosts of their own (network namespaces on a bridge,
    /// faults by address).
    #[arg(long, global = true)]
    loopback: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario against a fresh local cluster; prints a JSON report.
    Run {
        #[arg(long, value_enum)]
        scenario: Scenario,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seconds of workload.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Seconds between faults.
        #[arg(long, default_value_t = 6)]
        interval: u64,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 20)]
        keys: usize,
        /// failpoint-crash only: arm just this crash point (repeatable;
        /// default: every one).
        #[arg(long = "failpoint")]
        failpoints: Vec<String>,
        /// The capstan binary (failpoint-crash: built with `--features failpoints`).
        #[arg(long, default_value = "/var/tmp/capstan-target/debug/capstan")]
        capstan: PathBuf,
    },
    /// Run every scenario and write a Markdown summary (e.g. chaos/RESULTS.md).
    /// FailpointCrash runs only if `--capstan` was built with `--features
    /// failpoints` (otherwise its row says skipped).
    Matrix {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 30)]
        duration: u64,
        #[arg(long, default_value = "/var/tmp/capstan-target/debug/capstan")]
        capstan: PathBuf,
        #[arg(long, default_value = "chaos/RESULTS.md")]
        out: PathBuf,
    },
    /// Check a KV history (JSON array of operations) for linearizability.
    CheckHistory { file: PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match execute(cli.cmd, cli.loopback) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        // Ran, and a figure missed its goal (or the history is not linearizable).
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// `fut` on a runtime of its own, unless SIGINT or SIGTERM comes first:
/// then everything the run started is stopped and deleted before exiting.
fn until_interrupted<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let why = tokio::select! {
            r = fut => return r,
            _ = tokio::signal::ctrl_c() => "interrupted",
            _ = term.recv() => "terminated",
        };
        eprintln!("[capstan-chaos] {why}: stopping the cluster, deleting its hosts");
        capstan_chaos::cluster::tear_down_after_interrupt();
        anyhow::bail!("{why}")
    })
}

/// Runs the command; `Ok(passed)`.
fn execute(cmd: Cmd, loopback: bool) -> anyhow::Result<bool> {
    match cmd {
        Cmd::Run { scenario, seed, duration, interval, clients, keys, failpoints, capstan } => {
            let cfg = RunConfig {
                clients,
                keys,
                interval: Duration::from_secs(interval),
                failpoints,
                loopback,
                ..RunConfig::new(capstan, scenario, seed, Duration::from_secs(duration))
            };
            let report = until_interrupted(capstan_chaos::run::run(cfg))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(report.passed)
        }
        Cmd::Matrix { seed, duration, capstan, out } => {
            let cfg = RunConfig {
                interval: Duration::from_secs(6),
                loopback,
                ..RunConfig::new(capstan, Scenario::Steady, seed, Duration::from_secs(duration))
            };
            let (md, all) = until_interrupted(capstan_chaos::run::matrix(cfg))?;
            print!("{md}");
            std::fs::write(&out, md).map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
            Ok(all)
        }
        Cmd::CheckHistory { file } => {
            let bytes = std::fs::read(&file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            let ops: Vec<capstan_chaos::history::Op> = serde_json::from_slice(&bytes)?;
            let verdict = capstan_chaos::linearizability::check(&ops);
            let ok = verdict == capstan_chaos::linearizability::Verdict::Ok;
            println!("{}", serde_json::json!({ "operations": ops.len(), "linearizable": ok, "verdict": verdict }));
            Ok(ok)
        }
    }
}
