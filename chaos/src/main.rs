//! `capstan-chaos`: fault-injection harness and checkers. For now: the
//! checkers over recorded histories; the harness (namespaces, faults,
//! workloads) comes next (see the chaos issue).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "capstan-chaos", version, about = "Capstan chaos harness and checkers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a KV history (JSON array of operations) for linearizability.
    CheckHistory { file: PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
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
