//! `ringkv inspect DIR`: offline verification of a data directory.

use crate::cli::InspectArgs;
use crate::Failure;
use indicatif::{ProgressBar, ProgressStyle};
use ringkv_engine::store::inspect::{self, HintStatus, Report};
use serde_json::json;
use std::io::IsTerminal;
use std::os::unix::io::AsRawFd;

/// Large directories get a progress bar (on a terminal).
const BAR_FROM_BYTES: u64 = 256 << 20;

/// Whether a server holds the directory's lock right now.
fn in_use(dir: &std::path::Path) -> bool {
    let Ok(f) = std::fs::File::open(dir.join("LOCK")) else { return false };
    // SAFETY: flock on a descriptor we own; released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}

pub fn run(a: &InspectArgs) -> Result<(), Failure> {
    if in_use(&a.dir) {
        eprintln!("warning: a ringkv server is running on {}; what it writes meanwhile may look torn", a.dir.display());
    }
    let total = inspect::total_bytes(&a.dir);
    let bar = (total >= BAR_FROM_BYTES && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("valid template"),
        );
        b
    });
    let report = inspect::inspect(&a.dir, &mut |n| {
        if let Some(b) = &bar {
            b.inc(n);
        }
    })
    .map_err(Failure::Usage)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", to_json(&report));
    } else {
        print!("{}", to_text(&report, a.segments));
    }
    if report.is_healthy() {
        Ok(())
    } else {
        Err(Failure::Refused(format!("{} problem(s) found in {}", report.problems.len(), a.dir.display())))
    }
}

fn hint_text(h: &HintStatus) -> String {
    match h {
        HintStatus::Missing => "none".into(),
        HintStatus::Matches => "ok".into(),
        HintStatus::Wrong(w) => format!("WRONG: {w}"),
    }
}

fn to_json(r: &Report) -> serde_json::Value {
    json!({
        "node_id": r.node_id,
        "partitions": r.partitions,
        "healthy": r.is_healthy(),
        "problems": r.problems,
        "bytes_read": r.bytes_read,
        "shards": r.shards.iter().map(|s| json!({
            "shard": s.shard, "keys": s.keys, "tombstones": s.tombstones, "hints": s.hints,
            "segments": s.segments.iter().map(|g| json!({
                "id": g.id, "records": g.records, "bytes": g.bytes, "live_bytes": g.live_bytes,
                "garbage_bytes": g.bytes - g.live_bytes.min(g.bytes), "hint_file": hint_text(&g.hint),
                "torn_tail": g.torn_tail.as_ref().map(|(n, why)| json!({"bytes": n, "reason": why})),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn to_text(r: &Report, each_segment: bool) -> String {
    let mut s = format!("node {}  partitions {}  read {} bytes\n", r.node_id, r.partitions, r.bytes_read);
    for sh in &r.shards {
        let bytes: u64 = sh.segments.iter().map(|g| g.bytes).sum();
        let live: u64 = sh.segments.iter().map(|g| g.live_bytes).sum();
        let hinted = sh.segments.iter().filter(|g| g.hint == HintStatus::Matches).count();
        s += &format!(
            "shard {}: {} segments ({} with hint files), {} keys, {} tombstones, {} hints, {} bytes of records, {} live ({:.0}% garbage)\n",
            sh.shard,
            sh.segments.len(),
            hinted,
            sh.keys,
            sh.tombstones,
            sh.hints,
            bytes,
            live,
            if bytes == 0 { 0.0 } else { 100.0 * (1.0 - live as f64 / bytes as f64) }
        );
        for g in &sh.segments {
            if let Some((n, why)) = &g.torn_tail {
                s += &format!("  segment {}: torn tail of {n} bytes ({why}); the next start cuts it off\n", g.id);
            }
        }
        if each_segment {
            s += &format!(
                "  {:>10} {:>9} {:>12} {:>12} {:>7}  hint\n",
                "segment", "records", "bytes", "live", "garbage"
            );
            for g in &sh.segments {
                let garbage = if g.bytes == 0 { 0.0 } else { 100.0 * (1.0 - g.live_bytes as f64 / g.bytes as f64) };
                s += &format!(
                    "  {:>10} {:>9} {:>12} {:>12} {:>6.0}%  {}\n",
                    g.id,
                    g.records,
                    g.bytes,
                    g.live_bytes,
                    garbage,
                    hint_text(&g.hint)
                );
            }
        }
    }
    if r.problems.is_empty() {
        s += "no damage found\n";
    } else {
        for p in &r.problems {
            s += &format!("PROBLEM: {p}\n");
        }
    }
    s
}
