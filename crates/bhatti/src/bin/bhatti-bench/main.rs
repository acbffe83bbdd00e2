//! `bhatti-bench`: latency and throughput of each layer, printed as
//! p50/p95/p99 and throughput. Run with `--release`:
//!
//! ```text
//! cargo build --release -p lohar -p bhatti
//! cargo run --release -p bhatti --bin bhatti-bench -- agent
//! ```

// Tests may unwrap; shipped code handles every error (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod agent;
mod api;
mod daemon;
mod proxy;
mod snapshot;
mod stats;
mod thermal;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bhatti-bench", about = "Benchmarks of bhatti's layers")]
struct Args {
    #[command(subcommand)]
    target: Target,
}

#[derive(Debug, Subcommand)]
enum Target {
    /// The lohar agent in test mode over Unix sockets (no VM).
    Agent(agent::AgentArgs),
    /// The HTTP API of a daemon of its own (needs root and the guest images).
    Api(api::ApiArgs),
    /// Real VMs through the QEMU engine (needs root and the guest images).
    Vm(vm::VmArgs),
    /// The public proxy against the same request made inside the guest.
    Proxy(proxy::ProxyArgs),
    /// Waking warm and cold sandboxes against hot ones; host RSS per state.
    Thermal(thermal::ThermalArgs),
    /// Forks and snapshots: snapshot pause, fork and resume to first exec, vs a cold boot.
    Snapshot(snapshot::SnapshotArgs),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // `RUST_LOG=info` shows the engine's own timings (e.g. restore phases) on stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match args.target {
            Target::Agent(a) => agent::run(a).await,
            Target::Api(a) => api::run(a).await,
            Target::Vm(a) => vm::run(a).await,
            Target::Proxy(a) => proxy::run(a).await,
            Target::Thermal(a) => thermal::run(a).await,
            Target::Snapshot(a) => snapshot::run(a).await,
        }
    })
}
