//! YCSB workloads: the operation mix, the value sizes, and the record count
//! shared by the workers of a run.
//!
//! | workload | mix | default distribution |
//! |---|---|---|
//! | a | 50% read, 50% update | zipfian |
//! | b | 95% read, 5% update | zipfian |
//! | c | 100% read | zipfian |
//! | d | 95% read, 5% insert | latest |
//! | f | 50% read, 50% read-modify-write | zipfian |
//! | write-only | 100% update | zipfian |
//!
//! An update overwrites a loaded record; an insert adds record n, n+1...; a
//! read-modify-write reads a record and writes it back (for ringkv with the
//! read's context) and counts as one operation, timed from its intended
//! start to the write's reply.

use crate::rng::Rng;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    A,
    B,
    C,
    D,
    F,
    WriteOnly,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::A => "a",
            Workload::B => "b",
            Workload::C => "c",
            Workload::D => "d",
            Workload::F => "f",
            Workload::WriteOnly => "write-only",
        }
    }

    pub fn mix(self) -> Mix {
        match self {
            Workload::A => Mix::new(0.5, 0.5, 0.0, 0.0),
            Workload::B => Mix::new(0.95, 0.05, 0.0, 0.0),
            Workload::C => Mix::new(1.0, 0.0, 0.0, 0.0),
            Workload::D => Mix::new(0.95, 0.0, 0.05, 0.0),
            Workload::F => Mix::new(0.5, 0.0, 0.0, 0.5),
            Workload::WriteOnly => Mix::new(0.0, 1.0, 0.0, 0.0),
        }
    }

    /// YCSB's request distribution for the workload: D reads the latest
    /// records, the others are zipfian.
    pub fn reads_latest(self) -> bool {
        self == Workload::D
    }
}

/// What one operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    Read,
    Update,
    Insert,
    Rmw,
}

impl OpKind {
    pub const ALL: [OpKind; 4] = [OpKind::Read, OpKind::Update, OpKind::Insert, OpKind::Rmw];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Update => "update",
            OpKind::Insert => "insert",
            OpKind::Rmw => "rmw",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Operation proportions, kept as cumulative thresholds out of 2^32 so that
/// a choice is one random draw and three compares.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    thresholds: [u64; 3],
}

impl Mix {
    pub fn new(read: f64, update: f64, insert: f64, rmw: f64) -> Mix {
        let total = read + update + insert + rmw;
        assert!(total > 0.0, "an empty operation mix");
        let scale = |x: f64| ((x / total) * (1u64 << 32) as f64).round() as u64;
        Mix { thresholds: [scale(read), scale(read + update), scale(read + update + insert)] }
    }

    pub fn choose(&self, rng: &mut Rng) -> OpKind {
        let x = rng.next_u64() >> 32;
        if x < self.thresholds[0] {
            OpKind::Read
        } else if x < self.thresholds[1] {
            OpKind::Update
        } else if x < self.thresholds[2] {
            OpKind::Insert
        } else {
            OpKind::Rmw
        }
    }
}

/// Value sizes: fixed, or uniform in an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueSize {
    pub min: usize,
    pub max: usize,
}

impl ValueSize {
    pub fn sample(&self, rng: &mut Rng) -> usize {
        if self.min == self.max {
            self.min
        } else {
            self.min + rng.below((self.max - self.min + 1) as u64) as usize
        }
    }
}

impl std::str::FromStr for ValueSize {
    type Err = String;

    /// `1024`, or `100-2000` for a uniform range.
    fn from_str(s: &str) -> Result<ValueSize, String> {
        let num = |t: &str| t.trim().parse::<usize>().map_err(|_| format!("'{t}' is not a byte count"));
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if min > max {
            return Err(format!("value size range {min}-{max} is empty"));
        }
        if max > 16 << 20 {
            return Err(format!("value size {max} is over 16 MiB"));
        }
        Ok(ValueSize { min, max })
    }
}

impl std::fmt::Display for ValueSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// The records that exist, shared by all workers of a run: inserts take the
/// next number, and reads choose among those whose insert was acknowledged
/// (so a read never asks for a record that no one has written yet).
#[derive(Debug)]
pub struct KeySpace {
    next_insert: AtomicU64,
    acked: AtomicU64,
}

impl KeySpace {
    pub fn new(records: u64) -> KeySpace {
        KeySpace { next_insert: AtomicU64::new(records), acked: AtomicU64::new(records) }
    }

    /// The number to give a new record.
    pub fn claim_insert(&self) -> u64 {
        self.next_insert.fetch_add(1, Ordering::Relaxed)
    }

    /// Records 0..n are readable. Inserts complete out of order, so this is
    /// the highest acknowledged plus one: a read may still pick a record whose
    /// insert is in flight, and then finds nothing (counted as not found).
    pub fn readable(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    pub fn insert_acked(&self, record: u64) {
        self.acked.fetch_max(record + 1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proportions(w: Workload, draws: usize) -> [f64; 4] {
        let mix = w.mix();
        let mut rng = Rng::new(3);
        let mut c = [0usize; 4];
        for _ in 0..draws {
            c[mix.choose(&mut rng).index()] += 1;
        }
        c.map(|n| n as f64 / draws as f64)
    }

    #[test]
    fn ycsb_mixes_have_their_proportions() {
        let n = 200_000;
        let close = |got: f64, want: f64| (got - want).abs() < 0.01;
        let cases = [
            (Workload::A, [0.5, 0.5, 0.0, 0.0]),
            (Workload::B, [0.95, 0.05, 0.0, 0.0]),
            (Workload::C, [1.0, 0.0, 0.0, 0.0]),
            (Workload::D, [0.95, 0.0, 0.05, 0.0]),
            (Workload::F, [0.5, 0.0, 0.0, 0.5]),
            (Workload::WriteOnly, [0.0, 1.0, 0.0, 0.0]),
        ];
        for (w, want) in cases {
            let got = proportions(w, n);
            for i in 0..4 {
                assert!(close(got[i], want[i]), "{}: {:?} want {:?}", w.name(), got, want);
                if want[i] == 0.0 {
                    assert_eq!(got[i], 0.0, "{} never does {:?}", w.name(), OpKind::ALL[i]);
                }
            }
        }
    }

    #[test]
    fn value_sizes_parse_and_sample_in_range() {
        assert_eq!("1024".parse::<ValueSize>().unwrap(), ValueSize { min: 1024, max: 1024 });
        let r: ValueSize = "100-200".parse().unwrap();
        let mut rng = Rng::new(1);
        let (mut lo, mut hi) = (usize::MAX, 0);
        for _ in 0..10_000 {
            let s = r.sample(&mut rng);
            lo = lo.min(s);
            hi = hi.max(s);
        }
        assert_eq!((lo, hi), (100, 200));
        assert!("200-100".parse::<ValueSize>().is_err());
        assert!("x".parse::<ValueSize>().is_err());
        assert_eq!(r.to_string(), "100-200");
    }

    #[test]
    fn inserts_extend_the_readable_records() {
        let ks = KeySpace::new(10);
        assert_eq!(ks.readable(), 10);
        let (a, b) = (ks.claim_insert(), ks.claim_insert());
        assert_eq!((a, b), (10, 11));
        assert_eq!(ks.readable(), 10, "nothing acknowledged yet");
        ks.insert_acked(b);
        ks.insert_acked(a);
        assert_eq!(ks.readable(), 12);
    }
}
