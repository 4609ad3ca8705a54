//! Recent latencies and their p99, for delays derived from what was
//! observed: the coordinator's read hedge, the cluster client's per-replica
//! deadline.
//!
//! A ring of the last `capacity` samples; the p99 (and any other quantile,
//! [`RecentLatencies::quantile_us`]) is recomputed every [`MIN_SAMPLES`]
//! samples (a sort of at most `capacity` numbers), and only once that many
//! were seen: before, there is none and callers use their configured
//! default.

/// Samples needed before there is a p99, and between two recomputations.
pub const MIN_SAMPLES: usize = 32;

#[derive(Debug, Clone)]
pub struct RecentLatencies {
    capacity: usize,
    ring: Vec<u32>,
    next: usize,
    since_update: usize,
    /// The samples as last sorted (empty before [`MIN_SAMPLES`]).
    sorted: Vec<u32>,
    p99_us: Option<u64>,
}

impl RecentLatencies {
    pub fn new(capacity: usize) -> RecentLatencies {
        let capacity = capacity.max(MIN_SAMPLES);
        RecentLatencies {
            capacity,
            ring: Vec::with_capacity(capacity),
            next: 0,
            since_update: 0,
            sorted: Vec::new(),
            p99_us: None,
        }
    }

    pub fn record(&mut self, us: u64) {
        let us = us.min(u64::from(u32::MAX)) as u32;
        if self.ring.len() < self.capacity {
            self.ring.push(us);
        } else {
            self.ring[self.next] = us;
            self.next = (self.next + 1) % self.capacity;
        }
        self.since_update += 1;
        if self.ring.len() >= MIN_SAMPLES && self.since_update >= MIN_SAMPLES {
            self.since_update = 0;
            self.sorted.clone_from(&self.ring);
            self.sorted.sort_unstable();
            self.p99_us = self.quantile_us(0.99);
        }
    }

    /// The `q` quantile (0 to 1) of the samples as last sorted, once enough
    /// were seen.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let n = self.sorted.len();
        let i = ((n as f64 * q.clamp(0.0, 1.0)) as usize).min(n.checked_sub(1)?);
        Some(u64::from(self.sorted[i]))
    }

    /// The p99 of the recent samples, once enough were seen.
    pub fn p99_us(&self) -> Option<u64> {
        self.p99_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_appears_after_enough_samples_and_follows_the_recent_ones() {
        let mut l = RecentLatencies::new(64);
        for _ in 0..MIN_SAMPLES - 1 {
            l.record(100);
        }
        assert_eq!(l.p99_us(), None);
        l.record(100);
        assert_eq!(l.p99_us(), Some(100));
        // 64 slow samples replace every fast one.
        for _ in 0..64 {
            l.record(5_000);
        }
        assert_eq!(l.p99_us(), Some(5_000));
    }

    #[test]
    fn any_quantile_comes_from_the_same_sorted_samples() {
        let mut l = RecentLatencies::new(64);
        assert_eq!(l.quantile_us(0.9), None);
        // Recomputed every MIN_SAMPLES samples: at 32 and at 64.
        for us in 1..=64 {
            l.record(us);
        }
        assert_eq!(l.quantile_us(0.5), Some(33));
        assert_eq!(l.quantile_us(0.9), Some(58));
        assert_eq!(l.quantile_us(0.99), l.p99_us());
        assert_eq!(l.quantile_us(1.0), Some(64));
    }
}
