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
        /// The capstan binary.
        #[arg(long, default_value = "/var/tmp/capstan-target/debug/capstan")]
        capstan: PathBuf,
    },
    /// Run every scenario and write a Markdown summary (e.g. chaos/RESULTS.md).
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
    match cli.cmd {
        Cmd::Run { scenario, seed, duration, interval, clients, keys, capstan } => {
            let cfg = RunConfig {
                capstan,
                scenario,
                seed,
                duration: Duration::from_secs(duration),
                clients,
                keys,
                interval: Duration::from_secs(interval),
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            match rt.block_on(capstan_chaos::run::run(cfg)) {
                Ok(report) => {
                    println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                    if report.passed {
                        std::process::ExitCode::SUCCESS
                    } else {
                        std::process::ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Cmd::Matrix { seed, duration, capstan, out } => {
            let cfg = RunConfig {
                capstan,
                scenario: Scenario::Steady,
                seed,
                duration: Duration::from_secs(duration),
                clients: 8,
                keys: 20,
                interval: Duration::from_secs(6),
            };
            let result = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(capstan_chaos::run::matrix(cfg)));
            match result {
                Ok((md, all)) => {
                    print!("{md}");
                    if let Err(e) = std::fs::write(&out, md) {
                        eprintln!("error: writing {}: {e}", out.display());
                        return std::process::ExitCode::from(2);
                    }
                    if all {
                        std::process::ExitCode::SUCCESS
                    } else {
                        std::process::ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Cmd::CheckHistory { file } => {
            let ops: Vec<capstan_chaos::history::Op> = match std::fs::read(&file)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
            {
                Ok(ops) => ops,
                Err(e) => {
                    eprintln!("error: reading {}: {e}", file.display());
                    return std::process::ExitCode::from(2);
                }
            };
            let verdict = capstan_chaos::linearizability::check(&ops);
            let ok = verdict == capstan_chaos::linearizability::Verdict::Ok;
            println!("{}", serde_json::json!({ "operations": ops.len(), "linearizable": ok, "verdict": verdict }));
            if ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}
