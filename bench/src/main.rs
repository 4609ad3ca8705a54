//! ringkv-bench: ringkv's latency benchmark harness.
//!
//! - `run`: a YCSB workload against ringkv, Redis (single or cluster) or the
//!   echo server, closed or open loop, or a sweep of open-loop rates;
//! - `echo-server`: the loopback round-trip floor;
//! - `relay-server`: one hop's floor, a byte-copying relay in front of a
//!   server;
//! - `plot`: the latency distributions (or sweeps) of result files, a panel
//!   per workload and load;
//! - `compare`: a table of result files;
//! - `flamegraph`: a flame graph and a top-functions table from
//!   `perf script` output (bench/profile.sh).
//!
//! Module map: `driver` (io_uring workers), `codec` (wire protocols),
//! `target` + `router` + `slots` (where requests go), `workload` +
//! `keydist` + `schedule` (what is sent and when), `stats` + `report` +
//! `plot` (what comes out), `cpu` + `placement` (where it all ran and what
//! it cost), `echo_server` + `relay` (the floors), `flame` (profiles).

mod codec;
mod cpu;
mod driver;
mod echo_server;
mod flame;
mod keydist;
mod placement;
mod plot;
mod relay;
mod report;
mod resp;
mod rng;
mod router;
mod run;
mod schedule;
mod slots;
mod stats;
mod target;
mod workload;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "ringkv-bench", version, about = "Latency benchmarks for ringkv, Redis and the loopback floor")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a workload against a target and report its latency.
    Run(Box<run::RunArgs>),
    /// Serve the echo protocol: the machine's loopback round-trip floor.
    EchoServer(EchoArgs),
    /// Relay connections to an upstream server, copying bytes both ways:
    /// the cost of one hop.
    RelayServer(RelayArgs),
    /// Plot result files: latency by percentile (or sweeps), a panel per
    /// workload and load level.
    Plot(PlotArgs),
    /// Print a comparison table of result files.
    Compare(CompareArgs),
    /// A flame graph SVG and a top-functions table from `perf script`
    /// output.
    Flamegraph(FlameArgs),
}

#[derive(clap::Args)]
struct RelayArgs {
    #[arg(long, default_value = "127.0.0.1:7998")]
    listen: SocketAddr,
    /// The server each accepted connection is relayed to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Pin the relay's thread to these CPUs (the first one is used).
    #[arg(long)]
    cpus: Option<cpu::CpuList>,
}

#[derive(clap::Args)]
struct FlameArgs {
    /// Output of `perf script` (from `perf record -g`).
    #[arg(long)]
    perf_script: PathBuf,
    #[arg(long, default_value = "flame.svg")]
    svg: PathBuf,
    /// Also write the markdown table of processes and top functions here.
    #[arg(long)]
    top: Option<PathBuf>,
    /// How many functions the table lists.
    #[arg(long, default_value_t = 30)]
    top_n: usize,
    #[arg(long, default_value = "ringkv server CPUs")]
    title: String,
}

#[derive(clap::Args)]
struct EchoArgs {
    #[arg(long, default_value = "127.0.0.1:7999")]
    listen: SocketAddr,
    /// Pin the server's threads to these CPUs (the first one is used).
    #[arg(long)]
    cpus: Option<cpu::CpuList>,
    /// One thread spinning on non-blocking sockets: no wake-ups, one whole core.
    #[arg(long)]
    busy_poll: bool,
}

#[derive(clap::Args)]
struct PlotArgs {
    /// Result files written by `run --json`.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[arg(long, short, default_value = "latency.svg")]
    out: PathBuf,
    /// Operation to plot: read, update, insert, rmw or all.
    #[arg(long, default_value = "all")]
    op: String,
    /// Plot the sweeps (latency against throughput) instead.
    #[arg(long)]
    sweep: bool,
}

#[derive(clap::Args)]
struct CompareArgs {
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

fn load_reports(files: &[PathBuf]) -> Result<Vec<report::RunReport>> {
    files.iter().map(|f| report::RunReport::load(f)).collect()
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Run(a) => {
            let r = run::run(&a)?;
            print!("{}", report::summary(&r));
            Ok(())
        }
        Cmd::EchoServer(a) => {
            let cpus = a.cpus.map(|c| c.0);
            let cfg = echo_server::EchoConfig { listen: a.listen, cpus: cpus.clone(), busy_poll: a.busy_poll };
            echo_server::serve(&cfg, |addr| {
                println!(
                    "echo-server listening on {addr} ({}, CPUs {})",
                    if a.busy_poll { "busy-poll" } else { "blocking thread per connection" },
                    cpus.as_deref().map(cpu::format_cpu_list).unwrap_or_else(|| "unpinned".into())
                );
            })
        }
        Cmd::RelayServer(a) => {
            let cpus = a.cpus.map(|c| c.0);
            let cfg = relay::RelayConfig { listen: a.listen, upstream: a.upstream, cpus: cpus.clone() };
            relay::serve(&cfg, |addr| {
                println!(
                    "relay-server listening on {addr}, relaying to {} (one epoll thread, CPUs {})",
                    a.upstream,
                    cpus.as_deref().map(cpu::format_cpu_list).unwrap_or_else(|| "unpinned".into())
                );
            })
        }
        Cmd::Flamegraph(a) => {
            let p = flame::run(&a.perf_script, &a.svg, a.top.as_deref(), &a.title, a.top_n)?;
            println!(
                "{} samples (weighted by period, {} thread names) -> {}{}",
                p.samples,
                p.per_comm.len(),
                a.svg.display(),
                a.top.as_ref().map(|t| format!(", {}", t.display())).unwrap_or_default()
            );
            Ok(())
        }
        Cmd::Plot(a) => {
            let reports = load_reports(&a.files)?;
            if a.sweep || reports.iter().all(|r| !r.sweep.is_empty()) {
                plot::sweep_plot(&reports, &a.out)?;
            } else {
                plot::distribution_plot(&reports, &a.op, &a.out)?;
            }
            println!("wrote {}", a.out.display());
            Ok(())
        }
        Cmd::Compare(a) => {
            let reports = load_reports(&a.files)?;
            if reports.is_empty() {
                bail!("no result files");
            }
            print!("{}", report::comparison(&reports));
            Ok(())
        }
    }
}
