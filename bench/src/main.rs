//! ringkv-bench: load generator and latency yardstick.
//!
//! `quick` is a closed-loop run with the blocking client: C threads, each with
//! its own connection, each sending the next request as soon as the last one
//! returns. Latency is recorded per request in an HdrHistogram.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use ringkv_net::{Client, ClientConfig, Level, WriteOptions};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "ringkv-bench", version, about = "Latency benchmarks for ringkv")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A short closed-loop run of one operation against one endpoint.
    Quick(QuickArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Op {
    Put,
    Get,
}

#[derive(clap::Args)]
struct QuickArgs {
    #[arg(long, default_value = "127.0.0.1:7070")]
    endpoint: String,
    #[arg(long, value_enum, default_value = "put")]
    op: Op,
    /// Concurrent connections, one thread each.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Keys per client (gets read what a put run wrote).
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Acknowledge writes before fsync.
    #[arg(long)]
    no_sync: bool,
}

fn quick(a: &QuickArgs) -> Result<()> {
    if a.clients == 0 || a.keys == 0 {
        bail!("--clients and --keys must be positive");
    }
    let cfg = ClientConfig::default();
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let threads: Vec<_> = (0..a.clients)
        .map(|t| {
            let (endpoint, cfg, op, keys, size, sync) =
                (a.endpoint.clone(), cfg.clone(), a.op, a.keys, a.value_size, !a.no_sync);
            std::thread::spawn(move || -> Result<(Histogram<u64>, u64)> {
                let mut c = Client::connect(endpoint.as_str(), &cfg).context("connecting")?;
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let value = vec![b'v'; size];
                let opts = WriteOptions { durable: Some(sync), ..Default::default() };
                let mut errors = 0;
                let mut i = 0usize;
                while Instant::now() < deadline {
                    let key = format!("bench/{t}/{}", i % keys);
                    let start = Instant::now();
                    let ok = match op {
                        Op::Put => c.put(key.as_bytes(), &value, &opts).is_ok(),
                        Op::Get => c.get(key.as_bytes(), Level::Default).is_ok(),
                    };
                    h.record(start.elapsed().as_micros().max(1) as u64)?;
                    errors += u64::from(!ok);
                    i += 1;
                }
                Ok((h, errors))
            })
        })
        .collect();
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in threads {
        let (h, e) = t.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        total.add(h)?;
        errors += e;
    }
    let op = match a.op {
        Op::Put => "put",
        Op::Get => "get",
    };
    println!(
        "{op}: {} ops in {}s with {} clients = {:.0} ops/s; latency us p50 {} p99 {} p99.9 {} max {}; errors {errors}",
        total.len(),
        a.seconds,
        a.clients,
        total.len() as f64 / a.seconds as f64,
        total.value_at_quantile(0.5),
        total.value_at_quantile(0.99),
        total.value_at_quantile(0.999),
        total.max()
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Quick(a) => quick(&a),
    }
}
