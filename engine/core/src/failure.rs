//! Phi-accrual failure detection (Hayashibara et al.), one detector per peer.
//!
//! Instead of a yes/no timeout, a detector turns the time since a peer's last
//! heartbeat into a suspicion level phi: -log10 of the probability that a
//! heartbeat this late would still come, given the intervals seen so far
//! (modelled as a normal distribution). phi = 8 means a one in 10^8 chance
//! the peer is merely slow. Times are inputs in milliseconds.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhiConfig {
    pub threshold: f64,
    /// Intervals remembered.
    pub max_samples: usize,
    /// Floor on the standard deviation: gossip intervals are jittery, and a
    /// too-confident model would suspect peers on the first late heartbeat.
    pub min_std_dev_ms: f64,
    /// Added to the mean: pauses this long never raise suspicion much.
    pub acceptable_pause_ms: f64,
    /// Assumed interval before any has been observed.
    pub first_interval_ms: f64,
}

impl Default for PhiConfig {
    fn default() -> Self {
        PhiConfig {
            threshold: 8.0,
            max_samples: 200,
            min_std_dev_ms: 200.0,
            acceptable_pause_ms: 1000.0,
            first_interval_ms: 1000.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PhiAccrual {
    cfg: PhiConfig,
    intervals: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last_ms: Option<u64>,
}

impl PhiAccrual {
    pub fn new(cfg: PhiConfig) -> PhiAccrual {
        let mut d = PhiAccrual { cfg, intervals: VecDeque::new(), sum: 0.0, sum_sq: 0.0, last_ms: None };
        // Seed with a guess so a peer heard from once is judged sensibly.
        let guess = cfg.first_interval_ms;
        d.push(guess - guess / 4.0);
        d.push(guess + guess / 4.0);
        d
    }

    fn push(&mut self, interval: f64) {
        if self.intervals.len() == self.cfg.max_samples {
            let old = self.intervals.pop_front().expect("non-empty at capacity");
            self.sum -= old;
            self.sum_sq -= old * old;
        }
        self.intervals.push_back(interval);
        self.sum += interval;
        self.sum_sq += interval * interval;
    }

    /// Records a heartbeat arriving at `now_ms`.
    pub fn heartbeat(&mut self, now_ms: u64) {
        if let Some(last) = self.last_ms {
            if now_ms > last {
                self.push((now_ms - last) as f64);
            }
        }
        self.last_ms = Some(now_ms.max(self.last_ms.unwrap_or(0)));
    }

    pub fn last_heartbeat(&self) -> Option<u64> {
        self.last_ms
    }

    /// Suspicion at `now_ms`; 0 before the first heartbeat (a peer never
    /// heard from is not judged at all).
    pub fn phi(&self, now_ms: u64) -> f64 {
        self.phi_with_pause(now_ms, 0.0)
    }

    /// Suspicion with `extra_pause_ms` added to the acceptable pause (news
    /// that travels further arrives less regularly).
    pub fn phi_with_pause(&self, now_ms: u64, extra_pause_ms: f64) -> f64 {
        let Some(last) = self.last_ms else { return 0.0 };
        let elapsed = now_ms.saturating_sub(last) as f64;
        let n = self.intervals.len() as f64;
        let mean = self.sum / n + self.cfg.acceptable_pause_ms + extra_pause_ms;
        let var = (self.sum_sq / n - (self.sum / n).powi(2)).max(0.0);
        let std = var.sqrt().max(self.cfg.min_std_dev_ms);
        // Logistic approximation of the normal tail (error under 1e-4).
        let y = (elapsed - mean) / std;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let p_later = if elapsed > mean { e / (1.0 + e) } else { 1.0 - 1.0 / (1.0 + e) };
        -p_later.max(f64::MIN_POSITIVE).log10()
    }

    pub fn is_available(&self, now_ms: u64) -> bool {
        self.is_available_with_pause(now_ms, 0.0)
    }

    pub fn is_available_with_pause(&self, now_ms: u64, extra_pause_ms: f64) -> bool {
        self.phi_with_pause(now_ms, extra_pause_ms) < self.cfg.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_heartbeats_keep_phi_low_and_silence_raises_it() {
        let mut d = PhiAccrual::new(PhiConfig::default());
        for t in (0..20_000).step_by(1000) {
            d.heartbeat(t);
        }
        let last = 19_000;
        assert!(d.phi(last + 500) < 1.0);
        assert!(d.is_available(last + 2000));
        // Silence: phi grows monotonically and crosses the threshold.
        let mut prev = 0.0;
        let mut crossed = None;
        for wait in (0..20_000).step_by(250) {
            let phi = d.phi(last + wait);
            assert!(phi >= prev - 1e-9, "phi never falls while waiting");
            prev = phi;
            if crossed.is_none() && phi >= 8.0 {
                crossed = Some(wait);
            }
        }
        let crossed = crossed.expect("a silent peer is eventually suspected");
        assert!((2000..6000).contains(&crossed), "suspected after {crossed} ms");
    }

    #[test]
    fn irregular_heartbeats_widen_the_tolerance() {
        let mut steady = PhiAccrual::new(PhiConfig::default());
        let mut jittery = PhiAccrual::new(PhiConfig::default());
        let mut t = 0;
        for i in 0..50 {
            steady.heartbeat(i * 1000);
            t += if i % 2 == 0 { 200 } else { 1800 };
            jittery.heartbeat(t);
        }
        assert!(jittery.phi(t + 3000) < steady.phi(49_000 + 3000));
    }

    #[test]
    fn a_peer_never_heard_from_is_not_suspected() {
        let d = PhiAccrual::new(PhiConfig::default());
        assert_eq!(d.phi(1_000_000), 0.0);
    }
}
