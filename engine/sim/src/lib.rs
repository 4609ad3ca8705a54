//! A deterministic simulator for ringkv: several nodes' real protocol
//! machines (from `ringkv-core`) in one thread, over a model network and a
//! model store, with faults, driven by one seed, judged by a checker.
//!
//! `run(seed, options)` plays one scenario and returns what the checker
//! found; the same seed always plays the same scenario, event for event, so
//! a failing seed replays exactly (`cargo run -p ringkv-sim -- --seed S
//! --trace`). See `world` for the model and `check` for the invariants.

pub mod check;
pub mod rng;
pub mod scaling;
pub mod store;
pub mod world;

pub use world::{BadVariants, Options, Outcome, SimStats};

/// Plays one seed.
pub fn run(seed: u64, opts: &Options) -> Outcome {
    world::World::new(seed, opts.clone()).run()
}

/// Plays seeds `from..from + count`; returns the outcomes that found
/// violations, and totals over all of them.
pub fn run_many(from: u64, count: u64, opts: &Options) -> (Vec<Outcome>, SimStats) {
    let mut failed = Vec::new();
    let mut total = SimStats::default();
    for seed in from..from + count {
        let o = run(seed, opts);
        add(&mut total, &o.stats);
        if !o.violations.is_empty() {
            failed.push(o);
        }
    }
    (failed, total)
}

fn add(t: &mut SimStats, s: &SimStats) {
    t.events += s.events;
    t.messages += s.messages;
    t.lost += s.lost;
    t.duplicated += s.duplicated;
    t.crashes += s.crashes;
    t.records_lost_in_crashes += s.records_lost_in_crashes;
    t.partitions += s.partitions;
    t.writes_acked += s.writes_acked;
    t.reads_ok += s.reads_ok;
    t.client_errors += s.client_errors;
    t.hints_written += s.hints_written;
    t.hints_delivered += s.hints_delivered;
    t.keys_repaired += s.keys_repaired;
    t.tombstones_purged += s.tombstones_purged;
    t.partitions_handed_off += s.partitions_handed_off;
    t.siblings_seen += s.siblings_seen;
}
