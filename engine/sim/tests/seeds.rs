//! The simulator over many seeds, in the README's test command: every seed
//! runs the real protocol machines of five nodes with message loss,
//! duplication, reordering and delay, partitions that come and go, crashes
//! that lose unsynced records and restarts, and clock drift; the checker
//! must find nothing.
//!
//! 5,000 seeds by default, split in shards so the test harness runs them in
//! parallel; `RINGKV_SIM_SEEDS=N` runs N instead (and `RINGKV_SIM_FROM=S`
//! starts at seed S). A failing seed is printed with the command that
//! replays it exactly.

use ringkv_sim::{run_many, Options};

const SHARDS: u64 = 10;

fn seeds() -> (u64, u64) {
    let n = std::env::var("RINGKV_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let from = std::env::var("RINGKV_SIM_FROM").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    (from, n)
}

fn shard(i: u64) {
    let (from, n) = seeds();
    let per = n.div_ceil(SHARDS);
    let start = from + i * per;
    let count = per.min((from + n).saturating_sub(start));
    let (failed, total) = run_many(start, count, &Options::default());
    eprintln!("seeds {start}..{}: {total:?}", start + count);
    if !failed.is_empty() {
        let mut msg = String::new();
        for o in failed.iter().take(5) {
            msg += &format!("\nseed {} (replay: cargo run -p ringkv-sim -- --seed {} --trace):", o.seed, o.seed);
            for v in o.violations.iter().take(5) {
                msg += &format!("\n  {v}");
            }
        }
        panic!("{} of {count} seeds found violations:{msg}", failed.len());
    }
    // The faults happened: a run that injected nothing would prove nothing.
    if count >= 100 {
        assert!(total.crashes > 0 && total.partitions > 0 && total.lost > 0 && total.duplicated > 0, "{total:?}");
        assert!(total.hints_written > 0 && total.hints_delivered > 0 && total.keys_repaired > 0, "{total:?}");
        assert!(total.siblings_seen > 0 && total.tombstones_purged > 0 && total.partitions_handed_off > 0, "{total:?}");
    }
}

#[test]
fn seeds_0() {
    shard(0)
}
#[test]
fn seeds_1() {
    shard(1)
}
#[test]
fn seeds_2() {
    shard(2)
}
#[test]
fn seeds_3() {
    shard(3)
}
#[test]
fn seeds_4() {
    shard(4)
}
#[test]
fn seeds_5() {
    shard(5)
}
#[test]
fn seeds_6() {
    shard(6)
}
#[test]
fn seeds_7() {
    shard(7)
}
#[test]
fn seeds_8() {
    shard(8)
}
#[test]
fn seeds_9() {
    shard(9)
}

#[test]
fn a_seed_replays_exactly() {
    let opts = Options { trace: true, ..Options::default() };
    let a = ringkv_sim::run(42, &opts);
    let b = ringkv_sim::run(42, &opts);
    assert_eq!(a.stats, b.stats);
    assert_eq!(a.trace, b.trace, "the same seed plays the same events");
    assert_ne!(a.stats, ringkv_sim::run(43, &opts).stats, "another seed plays another scenario");
}
