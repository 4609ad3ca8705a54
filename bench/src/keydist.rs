//! Which record an operation touches: key naming and the YCSB request
//! distributions (uniform, scrambled zipfian, latest).
//!
//! Records are numbered 0..n. A record's key is `user` followed by the
//! decimal FNV-1a hash of its number, as YCSB names keys when inserts are not
//! ordered: neighbouring records then land on unrelated partitions and
//! shards, so no distribution accidentally favours one shard.
//!
//! The zipfian generator is YCSB's (Gray et al., "Quickly generating
//! billion-record synthetic databases", SIGMOD 1994) over exactly n items,
//! then scrambled: the item of rank r is record `fnv(r) % n`, so the hottest
//! records are spread over the key space instead of being records 0, 1, 2...
//! (YCSB's scrambled zipfian draws from 10^10 items before the modulo; we use
//! n items, which keeps the skew exactly the asked theta.) Because the modulo
//! is not a permutation a few ranks share a record; at n >= 1000 this changes
//! the hottest records' share by well under one percent.

use crate::rng::Rng;

/// The request distribution, as chosen on the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distribution {
    Uniform,
    /// Scrambled zipfian with this theta (0 < theta < 1).
    Zipfian(f64),
    /// Recent records are hot: record `newest - zipfian(theta)`.
    Latest(f64),
}

impl Distribution {
    pub fn name(&self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Zipfian(_) => "zipfian",
            Distribution::Latest(_) => "latest",
        }
    }
}

/// FNV-1a over the eight little-endian bytes of `x` (YCSB's `fnvhash64`).
pub fn fnv64(x: u64) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in x.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// Replaces `out` with the key of record `index`; reuses `out`'s capacity so
/// the request path does not allocate.
pub fn write_key(out: &mut Vec<u8>, index: u64) {
    out.clear();
    out.extend_from_slice(b"user");
    let mut digits = [0u8; 20];
    let mut n = fnv64(index);
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// YCSB's zipfian generator over ranks 0..n, rank 0 the most popular. The
/// item count can grow (for "latest"): zeta is then extended incrementally.
#[derive(Debug, Clone)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    zeta2: f64,
    eta: f64,
    half_pow_theta: f64,
}

impl Zipfian {
    pub fn new(items: u64, theta: f64) -> Zipfian {
        assert!(theta > 0.0 && theta < 1.0, "zipfian theta must be in (0, 1), got {theta}");
        let zeta2 = 1.0 + 0.5f64.powf(theta);
        let mut z = Zipfian {
            items: 0,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan: 0.0,
            zeta2,
            eta: 0.0,
            half_pow_theta: 0.5f64.powf(theta),
        };
        z.grow_to(items.max(1));
        z
    }

    pub fn items(&self) -> u64 {
        self.items
    }

    /// Extends the item count to `items` (never shrinks).
    pub fn grow_to(&mut self, items: u64) {
        if items <= self.items {
            return;
        }
        for i in self.items + 1..=items {
            self.zetan += 1.0 / (i as f64).powf(self.theta);
        }
        self.items = items;
        self.eta = (1.0 - (2.0 / items as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2 / self.zetan);
    }

    /// A rank in [0, items).
    pub fn next(&self, rng: &mut Rng) -> u64 {
        if self.items <= 1 {
            return 0;
        }
        let u = rng.next_f64();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + self.half_pow_theta {
            return 1;
        }
        let r = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.items - 1)
    }
}

/// Draws record numbers for one worker.
#[derive(Debug, Clone)]
pub struct KeyChooser {
    dist: Distribution,
    zipf: Option<Zipfian>,
}

impl KeyChooser {
    /// `records`: the records loaded before the run (zipfian ranks over them).
    pub fn new(dist: Distribution, records: u64) -> KeyChooser {
        let zipf = match dist {
            Distribution::Uniform => None,
            Distribution::Zipfian(theta) | Distribution::Latest(theta) => Some(Zipfian::new(records.max(1), theta)),
        };
        KeyChooser { dist, zipf }
    }

    /// A record among the `available` ones (those loaded or inserted and
    /// acknowledged so far); `available` must be positive.
    pub fn next(&mut self, rng: &mut Rng, available: u64) -> u64 {
        debug_assert!(available > 0);
        match (&mut self.zipf, self.dist) {
            (Some(z), Distribution::Zipfian(_)) => {
                // Ranks cover the loaded records; inserted ones beyond them
                // are never chosen, as in YCSB's zipfian over recordcount.
                let n = z.items().min(available);
                fnv64(z.next(rng)) % n
            }
            (Some(z), Distribution::Latest(_)) => {
                z.grow_to(available);
                available - 1 - z.next(rng).min(available - 1)
            }
            _ => rng.below(available),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(chooser: &mut KeyChooser, available: u64, draws: usize) -> Vec<u64> {
        let mut rng = Rng::new(42);
        let mut c = vec![0u64; available as usize];
        for _ in 0..draws {
            let k = chooser.next(&mut rng, available);
            assert!(k < available, "{k} out of range");
            c[k as usize] += 1;
        }
        c
    }

    #[test]
    fn keys_are_user_and_a_hash_and_writing_reuses_the_buffer() {
        let mut k = Vec::with_capacity(32);
        write_key(&mut k, 0);
        assert_eq!(k, format!("user{}", fnv64(0)).into_bytes());
        let cap = k.capacity();
        write_key(&mut k, 123_456);
        assert_eq!(k, format!("user{}", fnv64(123_456)).into_bytes());
        assert_eq!(k.capacity(), cap);
        assert_ne!(fnv64(1), fnv64(2));
    }

    #[test]
    fn uniform_covers_the_range_evenly() {
        let mut u = KeyChooser::new(Distribution::Uniform, 100);
        let c = counts(&mut u, 100, 200_000);
        let (min, max) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
        // Expected 2000 each; 5 sigma is about 220.
        assert!(min > 1700 && max < 2300, "min {min} max {max}");
    }

    #[test]
    fn zipfian_ranks_follow_the_power_law() {
        let n = 1000u64;
        let theta = 0.99;
        let z = Zipfian::new(n, theta);
        let zetan: f64 = (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum();
        let mut rng = Rng::new(1);
        let draws = 400_000;
        let mut c = vec![0u64; n as usize];
        for _ in 0..draws {
            c[z.next(&mut rng) as usize] += 1;
        }
        // P(rank 0) = 1/zeta(n) and P(rank 1) = 2^-theta/zeta(n) exactly.
        let p0 = c[0] as f64 / draws as f64;
        let p1 = c[1] as f64 / draws as f64;
        assert!((p0 - 1.0 / zetan).abs() < 0.005, "p0 {p0} want {}", 1.0 / zetan);
        assert!((p1 - 0.5f64.powf(theta) / zetan).abs() < 0.005, "p1 {p1}");
        // Heavily skewed: the top 10% of ranks get well over half the draws.
        let top: u64 = c[..100].iter().sum();
        assert!(top as f64 / draws as f64 > 0.6, "top decile {top}");
        // And the tail still gets some.
        assert!(c[500..].iter().sum::<u64>() > 0);
    }

    #[test]
    fn scrambled_zipfian_spreads_the_hot_records() {
        let mut z = KeyChooser::new(Distribution::Zipfian(0.99), 1000);
        let c = counts(&mut z, 1000, 200_000);
        let hottest = c.iter().enumerate().max_by_key(|(_, n)| **n).map(|(i, _)| i as u64).unwrap();
        assert_eq!(hottest, fnv64(0) % 1000, "rank 0 is the hottest record");
        let mut sorted = c.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        assert!(sorted[0] > 10 * sorted[500].max(1), "skewed: {} vs {}", sorted[0], sorted[500]);
    }

    #[test]
    fn latest_prefers_the_newest_and_follows_inserts() {
        let mut l = KeyChooser::new(Distribution::Latest(0.99), 1000);
        let c = counts(&mut l, 1000, 100_000);
        assert!(c[999] > c[900] && c[999] > 10_000, "newest {} vs {}", c[999], c[900]);
        let recent: u64 = c[900..].iter().sum();
        assert!(recent > 60_000, "the newest 10% got {recent}");
        // After inserts the newest record is the new one.
        let c = counts(&mut l, 1500, 50_000);
        assert!(c[1499] > c[999] * 2, "{} vs {}", c[1499], c[999]);
    }

    #[test]
    fn zipfian_grows_like_a_fresh_one() {
        let mut grown = Zipfian::new(10, 0.9);
        grown.grow_to(5000);
        let fresh = Zipfian::new(5000, 0.9);
        assert!((grown.zetan - fresh.zetan).abs() < 1e-9);
        assert!((grown.eta - fresh.eta).abs() < 1e-9);
    }
}
