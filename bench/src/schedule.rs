//! The open-loop schedule: when each request is meant to be sent.
//!
//! At a total rate R split over W workers, the run's requests are the
//! instants `start + n / R` for n = 0, 1, 2...; worker w owns every n with
//! `n % W == w`. Each instant is computed from its index in integer
//! nanoseconds, never by adding periods, so the schedule cannot drift however
//! long the run. A request's latency is measured from its instant, not from
//! when the worker got round to sending it: if the server (or the client)
//! stalls, the requests that should have gone out meanwhile are still due,
//! and their wait counts (no coordinated omission).

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Schedule {
    start: Instant,
    /// The rate in thousandths of an operation per second, so fractional
    /// rates stay exact in integer arithmetic.
    rate_milli: u128,
    stride: u64,
    offset: u64,
    /// This worker's next request is the run's request `next * stride + offset`.
    next: u64,
}

impl Schedule {
    /// The schedule of `worker` of `workers` for a total of `rate` ops/s.
    pub fn new(start: Instant, rate: f64, worker: usize, workers: usize) -> Schedule {
        assert!(rate > 0.0 && rate.is_finite(), "rate must be positive");
        assert!(worker < workers);
        let rate_milli = ((rate * 1000.0).round() as u128).max(1);
        Schedule { start, rate_milli, stride: workers as u64, offset: worker as u64, next: 0 }
    }

    /// The intended send time of this worker's `k`-th request.
    pub fn intended(&self, k: u64) -> Instant {
        let n = u128::from(k) * u128::from(self.stride) + u128::from(self.offset);
        let ns = n * 1_000_000_000_000 / self.rate_milli;
        self.start + Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64)
    }

    /// When the next request is due.
    pub fn next_due(&self) -> Instant {
        self.intended(self.next)
    }

    /// Takes the next request's intended time and moves on.
    pub fn take(&mut self) -> Instant {
        let t = self.next_due();
        self.next += 1;
        t
    }

    /// Requests taken so far.
    pub fn taken(&self) -> u64 {
        self.next
    }

    /// How many of this worker's requests are due strictly before `t`.
    pub fn due_before(&self, t: Instant) -> u64 {
        let Some(since) = t.checked_duration_since(self.start) else { return 0 };
        // Run request n is before t when n * 1e12 / rate_milli < since_ns,
        // i.e. n < ceil(since_ns * rate_milli / 1e12).
        let total = (since.as_nanos() * self.rate_milli).div_ceil(1_000_000_000_000);
        let total = u64::try_from(total).unwrap_or(u64::MAX);
        // This worker's: n = k * stride + offset < total.
        if total <= self.offset {
            0
        } else {
            (total - self.offset).div_ceil(self.stride)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_are_evenly_spaced_and_do_not_drift() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, 3000.0, 0, 1);
        let mut prev = s.take();
        assert_eq!(prev, t0);
        for _ in 0..10_000 {
            let t = s.take();
            let gap = (t - prev).as_nanos();
            // 1/3000 s = 333333.33 ns: integer gaps of 333333 or 333334.
            assert!((333_333..=333_334).contains(&gap), "gap {gap}");
            prev = t;
        }
        // After three million requests we are at exactly 1000 s, not off by
        // the accumulated rounding of three million periods.
        assert_eq!(s.intended(3_000_000), t0 + Duration::from_secs(1000));
    }

    #[test]
    fn workers_interleave_into_the_total_rate() {
        let t0 = Instant::now();
        let workers = 3;
        let mut all: Vec<Instant> = Vec::new();
        for w in 0..workers {
            let mut s = Schedule::new(t0, 1000.0, w, workers);
            all.extend((0..100).map(|_| s.take()));
        }
        all.sort();
        for (n, t) in all.iter().enumerate() {
            assert_eq!(*t, t0 + Duration::from_millis(n as u64), "request {n}");
        }
    }

    #[test]
    fn due_before_counts_requests_whose_time_has_come() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 1000.0, 1, 2);
        // Worker 1 of 2 at 1000/s owns the run's requests 1, 3, 5... (1 ms apart).
        assert_eq!(s.due_before(t0), 0);
        assert_eq!(s.due_before(t0 + Duration::from_micros(1001)), 1);
        assert_eq!(s.due_before(t0 + Duration::from_millis(10)), 5);
        let mut k = 0;
        while s.intended(k) < t0 + Duration::from_millis(10) {
            k += 1;
        }
        assert_eq!(k, 5);
    }

    #[test]
    fn fractional_rates_are_exact() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 0.5, 0, 1);
        assert_eq!(s.intended(3), t0 + Duration::from_secs(6));
    }
}
