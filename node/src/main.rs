//! `capstan-node`: the node agent binary. The logic lives in the library;
//! this file only parses the command line.

use std::path::PathBuf;

use anyhow::Context;
use capstan_node::logdriver::{self, LogDriverConfig};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "capstan-node", about = "Capstan's node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::LogDriver { config, path, max_size, max_files, max_line } => {
            let cfg = match (config, path) {
                (Some(json), _) => serde_json::from_str(&json).context("log-driver: bad JSON configuration")?,
                (None, Some(path)) => LogDriverConfig { path, max_size, max_files, max_line },
                (None, None) => anyhow::bail!("log-driver: give a JSON configuration or --path"),
            };
            logdriver::run(cfg).context("log-driver")
        }
    }
}
