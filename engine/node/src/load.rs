//! Load figures of a node that mean something: client operations per
//! second (an EWMA), their p99 latency over the last window, and how busy
//! the shards' threads are. Gossiped in `membership::Load`, shown by
//! `ringkv status`, read by the autoscale policy.
//!
//! Each shard counts what it coordinates ([`ShardLoad`], no locks: one per
//! shard, read through the shard mesh); the gossip agent's [`LoadMeter`]
//! turns successive snapshots into rates, so a window is whatever passed
//! between two refreshes.

use std::collections::BTreeMap;

/// A latency histogram with buckets that grow by 2^(1/4) (about 19%) from
/// 1 µs to over an hour: quantiles within one bucket, O(1) to record, and
/// cheap to add and subtract (windows are differences of snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
}

const SUB_BUCKETS: u32 = 4;
const BUCKETS: usize = 36 * SUB_BUCKETS as usize;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { counts: vec![0; BUCKETS] }
    }
}

impl LatencyHistogram {
    fn bucket(us: u64) -> usize {
        if us <= 1 {
            return 0;
        }
        let log2 = 63 - us.leading_zeros();
        // The next two bits below the top one choose the sub-bucket.
        let sub = if log2 >= 2 { ((us >> (log2 - 2)) & 3) as u32 } else { ((us << (2 - log2)) & 3) as u32 };
        ((log2 * SUB_BUCKETS + sub) as usize).min(BUCKETS - 1)
    }

    /// The upper bound of bucket `i`, in µs.
    fn upper(i: usize) -> u64 {
        let (log2, sub) = (i as u32 / SUB_BUCKETS, i as u64 % u64::from(SUB_BUCKETS));
        let base = 1u64 << log2;
        base + (base * (sub + 1)) / u64::from(SUB_BUCKETS)
    }

    pub fn record(&mut self, us: u64) {
        self.counts[Self::bucket(us)] += 1;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn add(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// What was recorded since `earlier` (a previous snapshot of the same
    /// histogram).
    pub fn since(&self, earlier: &LatencyHistogram) -> LatencyHistogram {
        LatencyHistogram {
            counts: self.counts.iter().zip(&earlier.counts).map(|(a, b)| a.saturating_sub(*b)).collect(),
        }
    }

    /// The `q` quantile (0..=1), as its bucket's upper bound; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::upper(i);
            }
        }
        Self::upper(BUCKETS - 1)
    }
}

/// What one shard measured since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardLoad {
    /// Client operations coordinated (answered, with success or not).
    pub ops: u64,
    pub latency: LatencyHistogram,
    /// CPU time of the shard's thread.
    pub cpu_ns: u64,
    /// Client operations coordinated, by partition.
    pub partitions: BTreeMap<u32, u64>,
}

/// CPU time of the calling thread (user and system), in ns.
pub fn thread_cpu_ns() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; RUSAGE_THREAD is a valid selector on Linux.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The node's load as the agent last computed it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub ops_per_sec: f64,
    pub p99_us: u64,
    /// Busy share of the shard threads, 0..=1 (their CPU time over the
    /// window's wall time, averaged over shards).
    pub cpu_busy: f64,
    /// The busiest partitions of the last window, with their operations
    /// per second, busiest first (at most [`HOT_PARTITIONS`]).
    pub hot: Vec<(u32, f64)>,
}

/// How many of the busiest partitions the figures name.
pub const HOT_PARTITIONS: usize = 5;

/// Turns successive per-shard snapshots into rates.
#[derive(Debug, Default)]
pub struct LoadMeter {
    last: Option<(u64, Vec<ShardLoad>)>,
    figures: Figures,
}

/// Weight of the newest window in the operations-per-second EWMA.
const EWMA_ALPHA: f64 = 0.3;

impl LoadMeter {
    pub fn figures(&self) -> Figures {
        self.figures.clone()
    }

    /// Takes the shards' snapshots at `now_us` (a monotonic clock).
    pub fn observe(&mut self, now_us: u64, shards: Vec<ShardLoad>) -> Figures {
        if let Some((then, prev)) = &self.last {
            let dt_us = now_us.saturating_sub(*then).max(1);
            let ops: u64 = shards.iter().zip(prev).map(|(a, b)| a.ops.saturating_sub(b.ops)).sum();
            let rate = ops as f64 * 1e6 / dt_us as f64;
            let ewma = if self.figures.ops_per_sec == 0.0 {
                rate
            } else {
                EWMA_ALPHA * rate + (1.0 - EWMA_ALPHA) * self.figures.ops_per_sec
            };
            let mut window = LatencyHistogram::default();
            for (a, b) in shards.iter().zip(prev) {
                window.add(&a.latency.since(&b.latency));
            }
            let cpu: u64 = shards.iter().zip(prev).map(|(a, b)| a.cpu_ns.saturating_sub(b.cpu_ns)).sum();
            let busy = cpu as f64 / (dt_us as f64 * 1000.0 * shards.len().max(1) as f64);
            let mut by_partition: BTreeMap<u32, u64> = BTreeMap::new();
            for (a, b) in shards.iter().zip(prev) {
                for (&p, &n) in &a.partitions {
                    let delta = n.saturating_sub(b.partitions.get(&p).copied().unwrap_or(0));
                    if delta > 0 {
                        *by_partition.entry(p).or_default() += delta;
                    }
                }
            }
            let mut hot: Vec<(u32, f64)> =
                by_partition.into_iter().map(|(p, n)| (p, n as f64 * 1e6 / dt_us as f64)).collect();
            hot.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            hot.truncate(HOT_PARTITIONS);
            self.figures = Figures { ops_per_sec: ewma, p99_us: window.quantile(0.99), cpu_busy: busy.min(1.0), hot };
        }
        self.last = Some((now_us, shards));
        self.figures.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_within_a_bucket_of_the_truth() {
        let mut h = LatencyHistogram::default();
        for us in 1..=10_000u64 {
            h.record(us);
        }
        for (q, truth) in [(0.5, 5_000.0), (0.99, 9_900.0), (1.0, 10_000.0)] {
            let got = h.quantile(q) as f64;
            assert!(got >= truth && got <= truth * 1.2, "q{q}: {got} vs {truth}");
        }
        assert_eq!(LatencyHistogram::default().quantile(0.99), 0);
        let mut later = h.clone();
        later.record(1_000_000);
        let window = later.since(&h);
        assert_eq!(window.count(), 1);
        assert!(window.quantile(0.99) >= 1_000_000);
    }

    #[test]
    fn the_meter_turns_snapshots_into_rates_and_a_window_p99() {
        let mut m = LoadMeter::default();
        let shard = |ops: u64, lat_us: u64, cpu_ns: u64| {
            let mut latency = LatencyHistogram::default();
            for _ in 0..ops {
                latency.record(lat_us);
            }
            ShardLoad { ops, latency, cpu_ns, partitions: BTreeMap::from([(7, ops), (3, ops / 2)]) }
        };
        assert_eq!(m.observe(0, vec![shard(0, 0, 0)]), Figures::default(), "nothing to compare yet");
        // 1,000 ops in one second at 200 µs, half a core busy.
        let f = m.observe(1_000_000, vec![shard(1_000, 200, 500_000_000)]);
        assert!((f.ops_per_sec - 1_000.0).abs() < 1e-6);
        assert!((200..=240).contains(&f.p99_us), "{}", f.p99_us);
        assert!((f.cpu_busy - 0.5).abs() < 1e-6);
        assert_eq!(f.hot, vec![(7, 1_000.0), (3, 500.0)], "the hottest partition first");
        // Then 3,000 in the next second: the EWMA moves 30% of the way.
        let mut next = shard(1_000, 200, 500_000_000);
        next.ops = 4_000;
        let f = m.observe(2_000_000, vec![next]);
        assert!((f.ops_per_sec - 1_600.0).abs() < 1e-6, "{}", f.ops_per_sec);
    }
}
