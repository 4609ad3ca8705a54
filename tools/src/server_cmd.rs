//! `ringkv server`: settings from defaults, the TOML file and flags, then run.

use crate::cli::ServerArgs;
use ringkv_engine::config::NodeConfig;
use ringkv_engine::server;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Defaults, overridden by the config file, overridden by flags.
pub fn resolve(args: &ServerArgs) -> Result<NodeConfig, String> {
    let mut c = match &args.config {
        Some(path) => NodeConfig::from_toml_file(path)?,
        None => NodeConfig::default(),
    };
    let a = args.clone();
    if a.node_id.is_some() {
        c.node_id = a.node_id;
    }
    if let Some(v) = a.listen {
        c.listen = v;
    }
    if let Some(v) = a.data_dir {
        c.data_dir = v;
    }
    if let Some(v) = a.seeds {
        c.seeds = v.into_iter().filter(|s| !s.is_empty()).collect();
    }
    if a.shards.is_some() {
        c.shards = a.shards;
    }
    if let Some(v) = a.weight {
        c.weight = v;
    }
    if let Some(v) = a.cluster {
        c.cluster = v;
    }
    if let Some(v) = a.partitions {
        c.partitions = v;
    }
    if let Some(v) = a.replicas {
        c.replicas = v;
    }
    if let Some(v) = a.max_pair_bytes {
        c.max_pair_bytes = v;
    }
    if let Some(v) = a.segment_mb {
        c.segment_mb = v;
    }
    if let Some(v) = a.cache_mb {
        c.cache_mb = v;
    }
    if let Some(v) = a.request_timeout_ms {
        c.request_timeout_ms = v;
    }
    if a.no_pin {
        c.pin_cpus = false;
    }
    if let Some(v) = a.cpu_offset {
        c.cpu_offset = v;
    }
    if let Some(v) = a.anti_entropy_interval_s {
        c.anti_entropy_interval_s = v;
    }
    if let Some(v) = a.handoff_interval_s {
        c.handoff_interval_s = v;
    }
    if let Some(v) = a.tombstone_grace_s {
        c.tombstone_grace_s = v;
    }
    if let Some(v) = a.max_hints_per_shard {
        c.max_hints_per_shard = v;
    }
    if let Some(v) = a.compaction_interval_s {
        c.compaction_interval_s = v;
    }
    if let Some(v) = a.compaction_garbage_ratio {
        c.compaction_garbage_ratio = v;
    }
    if let Some(v) = a.compaction_mb_per_s {
        c.compaction_mb_per_s = v;
    }
    if let Some(v) = a.stream_mb_per_s {
        c.stream_mb_per_s = v;
    }
    if let Some(v) = a.stream_concurrency {
        c.stream_concurrency = v;
    }
    if let Some(v) = a.metrics {
        c.metrics = Some(v);
    }
    if let Some(v) = a.slow_request_ms {
        c.slow_request_ms = v;
    }
    if let Some(path) = &a.cluster_secret_file {
        c.cluster_secret = Some(read_secret(path)?.trim().to_string());
    }
    if let Some(path) = &a.auth_tokens_file {
        c.auth_tokens = read_secret(path)?.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    }
    let limits = [
        (a.handshake_timeout_ms, &mut c.handshake_timeout_ms),
        (a.idle_timeout_ms, &mut c.idle_timeout_ms),
        (a.write_stall_timeout_ms, &mut c.write_stall_timeout_ms),
    ];
    for (flag, setting) in limits {
        if let Some(v) = flag {
            *setting = v;
        }
    }
    let counts = [
        (a.max_connections, &mut c.max_connections),
        (a.max_in_flight_per_connection, &mut c.max_in_flight_per_connection),
        (a.max_output_buffer_bytes, &mut c.max_output_buffer_bytes),
    ];
    for (flag, setting) in counts {
        if let Some(v) = flag {
            *setting = v;
        }
    }
    c.validate()?;
    Ok(c)
}

fn read_secret(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub fn run(args: &ServerArgs) -> Result<(), String> {
    let cfg = resolve(args)?;
    let data_dir = cfg.data_dir.display().to_string();
    let running = server::start(cfg)?;
    let last_port = running.listen().port() as usize + running.shards() - 1;
    tracing::info!(
        node = running.node_id(),
        listen = %running.listen(),
        "serving {} shard(s) on ports {}..={last_port}, data in {data_dir}",
        running.shards(),
        running.listen().port()
    );
    let stopper = running.stopper();
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("ringkv-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal = sig, "stopping: flushing and closing shards");
                    stopper.shut_down();
                } else {
                    // A second signal means the operator does not want to wait.
                    std::process::exit(130);
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    running.wait()?;
    tracing::info!("stopped cleanly");
    Ok(())
}
