//! `ringkv server`: resolve the settings, run the node until a signal, and
//! tell systemd when it serves.

use ringkv_engine::config::NodeConfig;
use ringkv_engine::server;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Runs the node of the resolved settings (`ServerArgs::resolve`).
pub fn run(cfg: NodeConfig) -> Result<(), String> {
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
    // Only now does the node serve every shard port: a `Type=notify` unit
    // (deploy/ringkv.service) counts it as started from here.
    crate::sd_notify::notify(&format!("READY=1\nSTATUS=serving {} shard(s) on {}", running.shards(), running.listen()));
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
                    crate::sd_notify::notify("STOPPING=1");
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
