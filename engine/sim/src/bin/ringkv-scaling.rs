//! `ringkv-scaling`: prints the scaling studies docs/SCALING.md quotes.
//!
//! ```text
//! cargo run --release -p ringkv-sim --bin ringkv-scaling [-- ring|gossip]
//! ```

use ringkv_sim::scaling;
use std::time::Instant;

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    if what == "ring" || what == "all" {
        println!("## Mixed weights (1, 2, 3 in turn)");
        ring(scaling::mixed_weights);
        println!("## Equal weights");
        ring(scaling::equal_weights);
    }
    if what == "gossip" || what == "all" {
        // Load republished every 30 s per node on average (what a steady
        // node does, see Load::differs_materially), or every 10 s.
        let sizes: Vec<usize> = match std::env::var("NODES") {
            Ok(v) => v.split(',').filter_map(|n| n.parse().ok()).collect(),
            Err(_) => vec![100, 300, 1000],
        };
        let per_mille: u64 = std::env::var("LOAD_PER_MILLE").ok().and_then(|v| v.parse().ok()).unwrap_or(33);
        for n in sizes {
            let t = Instant::now();
            let mut cfg = ringkv_core::membership::GossipConfig::default();
            let knob =
                |name: &str, default: f64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
            cfg.phi.acceptable_pause_ms = knob("PHI_PAUSE_MS", cfg.phi.acceptable_pause_ms);
            cfg.phi.min_std_dev_ms = knob("PHI_MIN_STD_MS", cfg.phi.min_std_dev_ms);
            cfg.phi.threshold = knob("PHI_THRESHOLD", cfg.phi.threshold);
            let f = scaling::gossip_study(n, 4096, per_mille, 11, cfg);
            println!("{f:?} 2*log2(n) = {:.1} ({:.1} s)", 2.0 * (n as f64).log2(), t.elapsed().as_secs_f64());
        }
    }
}

/// 3 -> 100 -> 3 nodes one at a time, Q=4096, N=3.
fn ring(weight: fn(usize) -> u32) {
    let t = Instant::now();
    let steps = scaling::grow_and_shrink(4096, 3, (3, 100, 1), weight, 7);
    println!("| step | owners moved / ideal | replicas moved / N x ideal | held-growth floor | data ratio | worst share error | worst held error |");
    println!("|---|---|---|---|---|---|---|");
    for s in &steps {
        println!(
            "| {} -> {} | {} / {:.1} = {:.3} | {} / {:.1} = {:.3} | {} | {:.3} | {:.3} | {:.3} |",
            s.from,
            s.to,
            s.owners_moved,
            s.owners_ideal,
            s.owners_ratio(),
            s.replicas_moved,
            s.replicas_ideal,
            s.replicas_ratio(),
            s.replicas_floor,
            s.data_ratio(),
            s.worst_share_error,
            s.worst_held_error
        );
    }
    let worst = |f: fn(&scaling::Step) -> f64| steps.iter().map(f).fold(0.0, f64::max);
    println!(
        "worst: owners {:.3}x, replicas {:.3}x N x ideal, data {:.3}x, share error {:.3}, held error {:.3} ({:.1} s)",
        worst(scaling::Step::owners_ratio),
        worst(scaling::Step::replicas_ratio),
        worst(scaling::Step::data_ratio),
        worst(|s| s.worst_share_error),
        worst(|s| s.worst_held_error),
        t.elapsed().as_secs_f64()
    );
}
