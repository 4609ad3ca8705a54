//! A run's results as people and programs read them: the text summary, the
//! JSON file, and the `.hgrm` files beside it.

use crate::stats::{distribution, hgrm, OpStats, Quantiles, RunStats};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One operation type's results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpReport {
    pub count: u64,
    pub ops_per_sec: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    #[serde(default)]
    pub not_found: u64,
    /// (percentile, latency us) points of the latency distribution.
    #[serde(default)]
    pub distribution: Vec<(f64, f64)>,
}

impl OpReport {
    pub fn of(s: &OpStats, seconds: f64) -> OpReport {
        let q = Quantiles::of(&s.hist);
        OpReport {
            count: q.count,
            ops_per_sec: if seconds > 0.0 { q.count as f64 / seconds } else { 0.0 },
            mean_us: q.mean_us,
            p50_us: q.p50_us,
            p90_us: q.p90_us,
            p99_us: q.p99_us,
            p999_us: q.p999_us,
            p9999_us: q.p9999_us,
            max_us: q.max_us,
            errors: s.error_count(),
            errors_by_kind: s.errors.clone(),
            not_found: s.not_found,
            distribution: distribution(&s.hist),
        }
    }
}

/// One point of a sweep: an open-loop run at one rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    pub target_ops_per_sec: f64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub errors: u64,
}

/// The JSON result file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunReport {
    /// A short name for tables and plot legends.
    pub label: String,
    pub target: String,
    pub target_kind: String,
    pub routing: String,
    pub endpoints: Vec<String>,
    pub workload: String,
    pub mode: String,
    pub rate: Option<f64>,
    pub concurrency: usize,
    pub pipeline: usize,
    pub threads: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub records: u64,
    pub value_size: String,
    pub distribution: String,
    pub zipf_theta: f64,
    /// Completed operations per second in the measured window.
    pub ops_per_sec: f64,
    pub total_ops: u64,
    /// Failed operations, with their kinds in `errors_by_kind`.
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub ops: BTreeMap<String, OpReport>,
    pub all: OpReport,
    /// Client CPU time (user + system) per operation: the whole client
    /// process over the measured window (workers, io_uring helpers, the
    /// progress display; less an in-process echo server).
    pub client_cpu_us_per_op: f64,
    /// The worker threads' own share of it (getrusage RUSAGE_THREAD).
    #[serde(default)]
    pub client_worker_cpu_us_per_op: f64,
    /// CPU time of the local server processes per operation, summed over
    /// `server_pids` from /proc over the measured window (absent for remote
    /// servers).
    #[serde(default)]
    pub server_cpu_us_per_op: Option<f64>,
    /// The local processes counted as the server: every process listening
    /// on one of the target's addresses (every node and shard of a ringkv
    /// cluster, masters and replicas of a Redis Cluster), and their
    /// descendants.
    #[serde(default)]
    pub server_pids: Vec<u32>,
    /// `--server-cpus`: the CPUs the servers were placed on.
    #[serde(default)]
    pub server_cpus: Vec<usize>,
    /// Busy share (0 to 1) of `server_cpus` over the measured window: time
    /// neither idle nor in iowait (steal included), over all their time;
    /// the window's length less the idle and iowait time in /proc/stat
    /// (precise on a tickless kernel, where the busy columns are sampled at
    /// the tick and miss short bursts). Everything that ran on those CPUs
    /// counts: the servers, the kernel's work for them (softirqs of
    /// loopback traffic included), but also anything else placed there, the
    /// client too when `client_cpus` overlap them.
    #[serde(default)]
    pub server_cores_busy_share: Option<f64>,
    /// The busy time of `server_cpus` per operation (us): the whole-core
    /// cost of an operation when only the servers run there (see
    /// `server_cores_busy_share` for what else may be counted).
    #[serde(default)]
    pub server_cores_busy_us_per_op: Option<f64>,
    /// Things a reader of the figures must know, such as the server
    /// processes accounting for much less than their cores' busy time.
    #[serde(default)]
    pub warnings: Vec<String>,
    pub wire_requests: u64,
    /// Attempts sent to another replica after one did not answer in time
    /// or its connection broke.
    #[serde(default)]
    pub failovers: u64,
    /// Client-driven reads answered by their copies, and those read again
    /// through a coordinator because the copies disagreed or refused.
    #[serde(default)]
    pub copy_reads: u64,
    #[serde(default)]
    pub copy_fallbacks: u64,
    pub client_cpus: Vec<usize>,
    pub client_placement: String,
    pub server_placement: String,
    pub io_uring: String,
    /// Open loop: how late requests went out relative to their intended
    /// time (the client's share of the latency).
    pub send_lag_us: Quantiles,
    #[serde(default)]
    pub sweep: Vec<SweepPoint>,
    #[serde(default)]
    pub hgrm_files: Vec<String>,
}

impl RunReport {
    /// Fills the numbers from merged stats over a window of `seconds`.
    pub fn fill(&mut self, s: &RunStats, seconds: f64) {
        let all = s.all();
        self.all = OpReport::of(&all, seconds);
        self.ops = s.present().map(|(k, o)| (k.name().to_string(), OpReport::of(o, seconds))).collect();
        self.ops_per_sec = if seconds > 0.0 { s.completed_in_window as f64 / seconds } else { 0.0 };
        self.total_ops = all.ok() + all.error_count();
        let mut errors = all.errors.clone();
        for (k, n) in &s.send_lag.errors {
            *errors.entry(k.clone()).or_default() += n;
        }
        self.errors = errors.values().sum();
        self.errors_by_kind = errors;
        self.client_cpu_us_per_op =
            if s.completed_in_window > 0 { s.cpu_ns as f64 / 1000.0 / s.completed_in_window as f64 } else { 0.0 };
        self.wire_requests = s.wire_requests;
        self.failovers = s.failovers;
        self.copy_reads = s.copy_reads;
        self.copy_fallbacks = s.copy_fallbacks;
        self.send_lag_us = Quantiles::of(&s.send_lag.hist);
    }

    /// The servers' processes should account for (nearly) all the busy
    /// time of the server CPUs; much less means a process was missed or
    /// something else ran there. Adds a warning when they disagree.
    pub fn check_server_cpu(&mut self) {
        let (Some(procs), Some(cores)) = (self.server_cpu_us_per_op, self.server_cores_busy_us_per_op) else {
            return;
        };
        if cores <= 0.0 || procs >= SERVER_CPU_AGREEMENT * cores {
            return;
        }
        let client_there = self.client_cpus.iter().any(|c| self.server_cpus.contains(c));
        self.warnings.push(format!(
            "the {} server process(es) used {procs:.2} us/op but the server CPUs {} were busy {cores:.2} us/op \
             ({:.0}%): a server process may be missing from the count, or something else ran on those CPUs{}",
            self.server_pids.len(),
            crate::cpu::format_cpu_list(&self.server_cpus),
            100.0 * procs / cores,
            if client_there { " (the client did: it shares them)" } else { "" }
        ));
    }

    pub fn load(path: &Path) -> Result<RunReport> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Below this share of their cores' busy time the server processes are
/// said to disagree with it (kernel work done on their behalf in softirq
/// context is charged to whichever task was interrupted, so the two never
/// agree exactly).
pub const SERVER_CPU_AGREEMENT: f64 = 0.8;

fn opt_us(v: Option<f64>) -> String {
    v.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into())
}

fn opt_pct(v: Option<f64>) -> String {
    v.map(|c| format!("{:.0}%", 100.0 * c)).unwrap_or_else(|| "-".into())
}

/// The text summary printed at the end of a run.
pub fn summary(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{} | workload {} | {} | {} | {} records, values {} B, {}{}",
        r.target,
        r.workload,
        match r.rate {
            Some(rate) => format!("open loop at {rate:.0} ops/s"),
            None => "closed loop".to_string(),
        },
        format_args!("{} conn x pipeline {} on {} thread(s)", r.concurrency, r.pipeline, r.threads),
        r.records,
        r.value_size,
        r.distribution,
        if r.distribution == "uniform" { String::new() } else { format!(" theta {}", r.zipf_theta) },
    );
    let _ = writeln!(s, "routing: {}", r.routing);
    let _ = writeln!(s, "client: {} | io_uring {}", r.client_placement, r.io_uring);
    let pids: Vec<String> = r.server_pids.iter().map(u32::to_string).collect();
    let _ = writeln!(s, "server: {} process(es) [{}]: {}", r.server_pids.len(), pids.join(" "), r.server_placement);
    let _ = writeln!(
        s,
        "{:<8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "op", "count", "ops/s", "p50 us", "p90 us", "p99 us", "p99.9 us", "p99.99", "max us", "errors"
    );
    let mut rows: Vec<(&str, &OpReport)> = r.ops.iter().map(|(k, v)| (k.as_str(), v)).collect();
    if r.ops.len() > 1 {
        rows.push(("all", &r.all));
    }
    for (name, o) in rows {
        let _ = writeln!(
            s,
            "{:<8} {:>10} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7}",
            name, o.count, o.ops_per_sec, o.p50_us, o.p90_us, o.p99_us, o.p999_us, o.p9999_us, o.max_us, o.errors
        );
    }
    let _ = writeln!(
        s,
        "throughput {:.0} ops/s | client CPU {:.2} us/op (workers {:.2}) | server CPU {} | {} wire requests{}{}",
        r.ops_per_sec,
        r.client_cpu_us_per_op,
        r.client_worker_cpu_us_per_op,
        r.server_cpu_us_per_op.map(|c| format!("{c:.2} us/op")).unwrap_or_else(|| "unknown".into()),
        r.wire_requests,
        if r.failovers > 0 { format!(" | {} failovers", r.failovers) } else { String::new() },
        if r.copy_reads + r.copy_fallbacks > 0 {
            format!(" | client-driven reads: {} from copies, {} through a coordinator", r.copy_reads, r.copy_fallbacks)
        } else {
            String::new()
        }
    );
    if let Some(share) = r.server_cores_busy_share {
        let _ = writeln!(
            s,
            "server CPUs {}: {:.1}% busy, {} us/op of core time (processes: {} us/op)",
            crate::cpu::format_cpu_list(&r.server_cpus),
            100.0 * share,
            opt_us(r.server_cores_busy_us_per_op),
            opt_us(r.server_cpu_us_per_op)
        );
    }
    for w in &r.warnings {
        let _ = writeln!(s, "WARNING: {w}");
    }
    if r.rate.is_some() {
        let _ = writeln!(
            s,
            "send lag behind schedule: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
            r.send_lag_us.p50_us, r.send_lag_us.p99_us, r.send_lag_us.max_us
        );
    }
    if r.errors > 0 {
        let by: Vec<String> = r.errors_by_kind.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let _ = writeln!(s, "errors: {}", by.join(", "));
    }
    if let Some(read) = r.ops.get("read") {
        if read.not_found > 0 {
            let _ = writeln!(s, "reads that found nothing: {}", read.not_found);
        }
    }
    s
}

/// Writes `<stem>.<op>.hgrm` for every operation type and `<stem>.all.hgrm`;
/// returns the paths.
pub fn write_hgrms(stats: &RunStats, stem: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut write = |name: &str, s: &OpStats| -> Result<()> {
        let p = PathBuf::from(format!("{}.{name}.hgrm", stem.display()));
        std::fs::write(&p, hgrm(&s.hist)).with_context(|| format!("writing {}", p.display()))?;
        out.push(p);
        Ok(())
    };
    for (k, s) in stats.present() {
        write(k.name(), s)?;
    }
    write("all", &stats.all())?;
    Ok(out)
}

/// A comparison table of several runs (for peers.sh and `compare`).
pub fn comparison(reports: &[RunReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| run | workload | ops/s | p50 us | p90 us | p99 us | p99.9 us | max us | errors | client CPU us/op | \
         server CPU us/op | server pids | server cores busy | cores busy us/op |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in reports {
        let a = &r.all;
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {} | {} | {} | {} |",
            r.label,
            r.workload,
            r.ops_per_sec,
            a.p50_us,
            a.p90_us,
            a.p99_us,
            a.p999_us,
            a.max_us,
            r.errors,
            r.client_cpu_us_per_op,
            opt_us(r.server_cpu_us_per_op),
            r.server_pids.len(),
            opt_pct(r.server_cores_busy_share),
            opt_us(r.server_cores_busy_us_per_op)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::OpKind;

    #[test]
    fn report_has_the_required_json_keys_and_round_trips() {
        let mut stats = RunStats::default();
        for i in 1..=1000u64 {
            stats.op(OpKind::Read).record(i * 1000);
            stats.op(OpKind::Update).record(i * 2000);
        }
        stats.op(OpKind::Update).record_error("Timeout");
        stats.completed_in_window = 2001;
        stats.cpu_ns = 2_001_000;
        let mut r = RunReport { target: "echo://x:1".into(), workload: "a".into(), ..Default::default() };
        r.fill(&stats, 2.0);
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for k in ["target", "workload", "ops_per_sec", "errors", "ops", "client_cpu_us_per_op"] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in ["count", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            assert!(v["ops"]["read"].get(k).is_some(), "missing ops.read.{k}");
        }
        assert_eq!(v["ops"]["update"]["errors"], 1);
        assert_eq!(v["errors"], 1);
        assert!((r.ops_per_sec - 1000.5).abs() < 1e-9);
        assert!((r.client_cpu_us_per_op - 1.0).abs() < 1e-9);
        let back: RunReport = serde_json::from_value(v).unwrap();
        assert_eq!(back.ops["read"].count, 1000);
        assert!(summary(&back).contains("update"));
        assert!(comparison(&[back]).contains("| a |"));
    }

    #[test]
    fn a_missed_server_process_shows_as_a_warning() {
        let mut r = RunReport {
            server_pids: vec![11],
            server_cpus: vec![1],
            client_cpus: vec![0],
            server_cpu_us_per_op: Some(20.0),
            server_cores_busy_share: Some(1.0),
            server_cores_busy_us_per_op: Some(60.0),
            ..Default::default()
        };
        r.check_server_cpu();
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("33%") && !r.warnings[0].contains("client"), "{}", r.warnings[0]);
        let text = summary(&r);
        assert!(text.contains("1 process(es) [11]") && text.contains("100.0% busy"), "{text}");
        assert!(text.contains("WARNING"), "{text}");

        // Agreeing within the margin: no warning. The client on the same
        // CPUs is named when they disagree.
        r.warnings.clear();
        r.server_cpu_us_per_op = Some(55.0);
        r.check_server_cpu();
        assert!(r.warnings.is_empty());
        r.server_cpu_us_per_op = Some(10.0);
        r.client_cpus = vec![1];
        r.check_server_cpu();
        assert!(r.warnings[0].contains("the client did"), "{}", r.warnings[0]);
        // Unknown cores: nothing to compare.
        let mut r = RunReport { server_cpu_us_per_op: Some(1.0), ..Default::default() };
        r.check_server_cpu();
        assert!(r.warnings.is_empty());
    }
}
