//! `ringkv-sim`: runs many seeds of the simulator, or replays one.
//!
//! ```text
//! ringkv-sim [--seeds N] [--from S]      # seeds S..S+N (default 0..1000)
//! ringkv-sim --seed S [--trace]          # one seed, with its event trace
//! ringkv-sim ... [--bug ack-before-sync|count-duplicate-acks|drop-siblings|retire-hints-early] [--no-faults]
//! ```
//! Exits 1 when any seed finds a violation, printing the seed and what broke.

use ringkv_sim::{run, run_many, BadVariants, Options};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = Options::default();
    let (mut from, mut count, mut one) = (0u64, 1000u64, None);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> u64 {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{name} needs a number");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--seeds" => count = value("--seeds"),
            "--from" => from = value("--from"),
            "--seed" => one = Some(value("--seed")),
            "--trace" => opts.trace = true,
            "--no-faults" => opts.faults = false,
            "--bug" => {
                let name = args.next().unwrap_or_default();
                opts.bugs = match bug(&name) {
                    Some(b) => b,
                    None => {
                        eprintln!("unknown --bug {name:?}");
                        std::process::exit(2)
                    }
                }
            }
            "-h" | "--help" => {
                println!("ringkv-sim [--seeds N] [--from S] | --seed S [--trace]  [--bug NAME] [--no-faults]");
                return;
            }
            other => {
                eprintln!("unknown argument {other:?} (try --help)");
                std::process::exit(2)
            }
        }
    }
    if let Some(seed) = one {
        let o = run(seed, &opts);
        for line in &o.trace {
            println!("{line}");
        }
        println!("seed {seed}: {:?}", o.stats);
        for v in &o.violations {
            println!("VIOLATION {v}");
        }
        std::process::exit(i32::from(!o.violations.is_empty()));
    }
    let t0 = Instant::now();
    let (failed, total) = run_many(from, count, &opts);
    println!("{count} seeds from {from} in {:.1}s: {total:?}", t0.elapsed().as_secs_f64());
    for o in &failed {
        println!("seed {} FAILED (replay: cargo run -p ringkv-sim -- --seed {} --trace):", o.seed, o.seed);
        for v in o.violations.iter().take(5) {
            println!("  {v}");
        }
    }
    std::process::exit(i32::from(!failed.is_empty()));
}

fn bug(name: &str) -> Option<BadVariants> {
    let mut b = BadVariants::default();
    match name {
        "ack-before-sync" => b.ack_before_sync = true,
        "count-duplicate-acks" => b.count_duplicate_acks = true,
        "drop-siblings" => b.drop_siblings = true,
        "retire-hints-early" => b.retire_hints_before_ack = true,
        _ => return None,
    }
    Some(b)
}
