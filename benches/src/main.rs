//! `capstan-bench`: load generators for Capstan.
//!
//! `capstan-bench api` drives the Kubernetes API (see `api.rs`);
//! `capstan-bench scheduler` measures scheduling (see `scheduler.rs`);
//! `capstan-bench pod-startup` times pods to Running on real nodes
//! (`pod_startup.rs`); `capstan-bench sim-nodes` brings up many hollow
//! nodes and measures what they cost (`sim_nodes.rs`).
//! `capstan-bench store` drives the etcd v3 gRPC API (Capstan's store, or a
//! real etcd as the baseline) with a fixed workload from many concurrent
//! clients over a few shared HTTP/2 connections, and prints one JSON object
//! with throughput and latency percentiles on stdout. Progress goes to
//! stderr. See `benches/compare-etcd.sh` for a side-by-side run and
//! `benches/RESULTS.md` for recorded numbers.

mod api;
mod conn;
mod metrics;
mod pod_startup;
mod procs;
mod scheduler;
mod sim_nodes;
mod stats;
mod store;
mod watch;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "capstan-bench", about = "Load generators for Capstan")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load an etcd v3 API endpoint (Capstan masters or etcd) and report
    /// throughput and latency as JSON.
    Store(store::Args),
    /// Load the Kubernetes API (ConfigMap creates; pod lists as Tables)
    /// and report throughput and latency as JSON.
    Api(api::Args),
    /// Create Nodes and pods and measure how fast the scheduler binds them.
    Scheduler(scheduler::Args),
    /// Create pods on real nodes and measure create -> Running (watched),
    /// with the agents' and masters' RSS.
    PodStartup(pod_startup::Args),
    /// Host many hollow nodes in one `capstan-node --runtime sim` and
    /// measure time to all Ready, the masters' RSS and connections.
    SimNodes(sim_nodes::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Store(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(store::run(args))?;
            println!("{}", report.json);
            if report.requests == 0 {
                anyhow::bail!("no request succeeded ({} errors)", report.errors);
            }
            Ok(())
        }
        Cmd::Api(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(api::run(args))?;
            println!("{report}");
            Ok(())
        }
        Cmd::Scheduler(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(scheduler::run(args))?;
            println!("{report}");
            Ok(())
        }
        Cmd::PodStartup(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(pod_startup::run(args))?;
            println!("{report}");
            Ok(())
        }
        Cmd::SimNodes(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = rt.block_on(sim_nodes::run(args))?;
            println!("{report}");
            Ok(())
        }
    }
}
