//! What a run records: a latency histogram and error counts per operation
//! type, merged across workers, and the percentile views of them (summary
//! numbers, `.hgrm` files, plot points).
//!
//! Latencies are recorded in nanoseconds (3 significant digits, up to two
//! minutes) and shown in microseconds. Failed operations are counted by kind
//! and kept out of the latency histograms, so an error that returns fast
//! cannot make latency look better; they are reported next to them.

use crate::workload::OpKind;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The largest latency kept exactly; longer ones are recorded as this.
pub const HIST_MAX_NS: u64 = 120_000_000_000;

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds")
}

/// One operation type's outcomes.
#[derive(Debug, Clone)]
pub struct OpStats {
    pub hist: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    /// Successful reads that found no value (counted in `hist` too).
    pub not_found: u64,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats { hist: new_hist(), errors: BTreeMap::new(), not_found: 0 }
    }
}

impl OpStats {
    pub fn record(&mut self, ns: u64) {
        self.hist.saturating_record(ns.max(1));
    }

    pub fn record_error(&mut self, kind: &str) {
        match self.errors.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                self.errors.insert(kind.to_string(), 1);
            }
        }
    }

    pub fn add_errors(&mut self, kind: &str, n: u64) {
        if n > 0 {
            *self.errors.entry(kind.to_string()).or_default() += n;
        }
    }

    pub fn ok(&self) -> u64 {
        self.hist.len()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn merge(&mut self, other: &OpStats) {
        self.hist.add(&other.hist).expect("histograms share bounds");
        for (k, n) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += n;
        }
        self.not_found += other.not_found;
    }
}

/// Everything one worker (or, merged, the whole run) recorded in the
/// measured window.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub ops: [OpStats; 4],
    /// How late requests were sent relative to their intended time (open
    /// loop): the client's own contribution to the latencies.
    pub send_lag: OpStats,
    /// Operations that completed inside the measured window (throughput).
    pub completed_in_window: u64,
    /// Requests put on the wire (a read-modify-write is two).
    pub wire_requests: u64,
    /// Client CPU time (user + system) of the workers in the window.
    pub cpu_ns: u64,
    /// Attempts given up on (late or on a broken connection) and sent to
    /// another replica.
    pub failovers: u64,
    /// Client-driven reads (`--reads client`) answered by their copies, and
    /// those whose copies disagreed or refused, read again through a
    /// coordinator.
    pub copy_reads: u64,
    pub copy_fallbacks: u64,
}

impl RunStats {
    pub fn op(&mut self, kind: OpKind) -> &mut OpStats {
        &mut self.ops[kind.index()]
    }

    pub fn merge(&mut self, other: &RunStats) {
        for (a, b) in self.ops.iter_mut().zip(&other.ops) {
            a.merge(b);
        }
        self.send_lag.merge(&other.send_lag);
        self.completed_in_window += other.completed_in_window;
        self.wire_requests += other.wire_requests;
        self.cpu_ns += other.cpu_ns;
        self.failovers += other.failovers;
        self.copy_reads += other.copy_reads;
        self.copy_fallbacks += other.copy_fallbacks;
    }

    /// All operation types together.
    pub fn all(&self) -> OpStats {
        let mut all = OpStats::default();
        for o in &self.ops {
            all.merge(o);
        }
        all
    }

    /// The operation types that happened, with their stats.
    pub fn present(&self) -> impl Iterator<Item = (OpKind, &OpStats)> {
        OpKind::ALL.into_iter().map(|k| (k, &self.ops[k.index()])).filter(|(_, s)| s.ok() + s.error_count() > 0)
    }
}

/// Summary percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quantiles {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

impl Quantiles {
    pub fn of(h: &Histogram<u64>) -> Quantiles {
        if h.is_empty() {
            return Quantiles::default();
        }
        Quantiles {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            p9999_us: us(h.value_at_quantile(0.9999)),
            max_us: us(h.max()),
        }
    }
}

/// Points of the latency-by-percentile curve for plots: (percentile in %,
/// latency in us), at 20 points per decade of "nines", up to the percentile
/// the sample count supports, then the maximum.
pub fn distribution(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    if h.is_empty() {
        return out;
    }
    let max_nines = (h.len() as f64).log10();
    let mut i = 0;
    loop {
        let nines = i as f64 / 20.0;
        if nines > max_nines || nines > 7.0 {
            break;
        }
        let q = 1.0 - 10f64.powf(-nines);
        out.push((q * 100.0, us(h.value_at_quantile(q))));
        i += 1;
    }
    out.push((100.0 * (1.0 - 1.0 / h.len() as f64).max(0.0), us(h.max())));
    out
}

/// The HdrHistogram percentile-distribution text format (as produced by
/// `outputPercentileDistribution`, values in microseconds), readable by the
/// usual HdrHistogram plotters.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { format!("{:14.2}", 1.0 / (1.0 - q)) } else { String::new() };
        let _ = writeln!(s, "{:12.3} {:2.12} {:10} {inv}", us(v.value_iterated_to()), q, total);
    }
    let _ = writeln!(s, "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]", h.mean() / 1000.0, h.stdev() / 1000.0);
    let _ = writeln!(s, "#[Max     = {:12.3}, Total count    = {:12}]", us(h.max()), h.len());
    let _ = writeln!(s, "#[Buckets = {:12}, SubBuckets     = {:12}]", h.buckets(), h.distinct_values());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_worker_stats_equals_recording_in_one() {
        let mut one = RunStats::default();
        let mut parts = vec![RunStats::default(), RunStats::default(), RunStats::default()];
        for i in 0..30_000u64 {
            let ns = 1000 + (i * 7919) % 5_000_000;
            let kind = OpKind::ALL[(i % 3) as usize];
            one.op(kind).record(ns);
            parts[(i % 3) as usize].op(kind).record(ns);
            if i % 1000 == 0 {
                one.op(kind).record_error("Timeout");
                parts[((i / 1000) % 3) as usize].op(kind).record_error("Timeout");
            }
        }
        parts[1].completed_in_window = 5;
        parts[2].completed_in_window = 7;
        let mut merged = RunStats::default();
        for p in &parts {
            merged.merge(p);
        }
        for k in OpKind::ALL {
            assert_eq!(merged.ops[k.index()].hist, one.ops[k.index()].hist, "{k:?}");
            assert_eq!(merged.ops[k.index()].errors, one.ops[k.index()].errors, "{k:?}");
        }
        assert_eq!(merged.completed_in_window, 12);
        let all = merged.all();
        assert_eq!(all.ok(), 30_000);
        assert_eq!(all.error_count(), 30);
        assert_eq!(Quantiles::of(&all.hist), Quantiles::of(&one.all().hist));
        assert_eq!(merged.present().count(), 3);
    }

    #[test]
    fn quantiles_are_in_microseconds_and_ordered() {
        let mut s = OpStats::default();
        for v in 1..=10_000u64 {
            s.record(v * 1000);
        }
        let q = Quantiles::of(&s.hist);
        assert_eq!(q.count, 10_000);
        assert!((q.p50_us - 5000.0).abs() < 5.0, "{q:?}");
        assert!((q.p99_us - 9900.0).abs() < 10.0, "{q:?}");
        assert!(q.p50_us <= q.p90_us && q.p90_us <= q.p99_us && q.p99_us <= q.p999_us && q.p999_us <= q.max_us);
        assert_eq!(Quantiles::of(&new_hist()), Quantiles::default());
    }

    #[test]
    fn hgrm_and_distribution_cover_the_range() {
        let mut s = OpStats::default();
        for v in 1..=1000u64 {
            s.record(v * 1000);
        }
        let text = hgrm(&s.hist);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("#[Max     =     1000.447, Total count    =         1000]"), "{text}");
        let last_row = text.lines().rfind(|l| !l.starts_with('#') && !l.is_empty()).unwrap();
        assert!(last_row.contains(" 1000"), "{last_row}");
        let d = distribution(&s.hist);
        assert_eq!(d[0].0, 0.0);
        assert!(d.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "{d:?}");
        // 1000 samples support three nines.
        assert!(d.iter().any(|(p, _)| (*p - 99.9).abs() < 1e-6));
        assert!((d.last().unwrap().1 - 1000.447).abs() < 1.0);
    }
}
