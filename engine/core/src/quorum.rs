//! A coordinator's decisions as data: whom to ask, and when enough answered.
//!
//! The shell sends the messages and feeds the answers back in; these types
//! decide. The same types run in the deterministic simulator, so what the
//! simulation checks is what the node does.
//!
//! Error meaning (DESIGN section 3): `Unavailable` is decided before anything
//! is sent (too few live replicas: nothing was written); `Timeout` means the
//! needed acknowledgements did not come (in time, or at all): a write may be
//! partially applied.

use crate::topology::MemberId;
use crate::version::Object;
use std::fmt;

/// A read or write quorum as requested by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    /// The server's default (quorum).
    #[default]
    Default,
    Quorum,
    All,
    /// An explicit number of replicas, 1..=N; `Count(1)` is "one".
    Count(u8),
}

impl Level {
    const QUORUM: u8 = 254;
    const ALL: u8 = 255;

    /// The level's wire byte: 0 default, 254 quorum, 255 all, else a count.
    pub fn to_byte(self) -> u8 {
        match self {
            Level::Default => 0,
            Level::Quorum => Self::QUORUM,
            Level::All => Self::ALL,
            Level::Count(n) => {
                assert!(n > 0 && n < Self::QUORUM, "explicit quorum {n} out of range");
                n
            }
        }
    }

    pub fn from_byte(b: u8) -> Level {
        match b {
            0 => Level::Default,
            Self::QUORUM => Level::Quorum,
            Self::ALL => Level::All,
            n => Level::Count(n),
        }
    }

    /// Resolves the level against the replication factor `n`; `None` when an
    /// explicit count is not in 1..=n.
    pub fn resolve(self, n: usize) -> Option<usize> {
        match self {
            Level::Default | Level::Quorum => Some(n / 2 + 1),
            Level::All => Some(n),
            Level::Count(c) => (1..=n).contains(&(c as usize)).then_some(c as usize),
        }
    }

    /// Acknowledgements needed when only `replicas` (<= n) distinct replicas
    /// of a key exist, as in a cluster smaller than N: named levels apply to
    /// the replicas that exist, an explicit count stays as asked. `Err` when
    /// the count is not in 1..=n.
    pub fn required(self, n: usize, replicas: usize) -> Result<usize, String> {
        let replicas = replicas.min(n);
        match self {
            Level::Count(_) => self.resolve(n).ok_or_else(|| format!("{self} is not between 1 and N={n}")),
            _ => Ok(self.resolve(replicas.max(1)).expect("named levels always resolve")),
        }
    }
}

impl std::str::FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Level, String> {
        match s {
            "one" => Ok(Level::Count(1)),
            "quorum" => Ok(Level::Quorum),
            "all" => Ok(Level::All),
            _ => match s.parse::<u8>() {
                Ok(n) if n > 0 && n < Level::QUORUM => Ok(Level::Count(n)),
                _ => Err(format!("'{s}' is not one, quorum, all or a replica count 1..=253")),
            },
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Default => write!(f, "default"),
            Level::Quorum => write!(f, "quorum"),
            Level::All => write!(f, "all"),
            Level::Count(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuorumError {
    Unavailable { needed: usize, live: usize },
    Timeout { needed: usize, acked: usize, failed: usize },
}

impl fmt::Display for QuorumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuorumError::Unavailable { needed, live } => {
                write!(f, "{needed} replicas needed but only {live} are reachable; nothing was written")
            }
            QuorumError::Timeout { needed, acked, failed } => write!(
                f,
                "{acked} of the {needed} replicas needed answered ({failed} failed); a write may be partially applied"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Pending,
    Reached,
    Failed,
}

/// Picks the replicas to contact: the preference list's live members.
/// `Unavailable` when fewer than `needed` are live.
pub fn live_targets(
    preference: &[MemberId],
    needed: usize,
    alive: impl Fn(MemberId) -> bool,
) -> Result<Vec<MemberId>, QuorumError> {
    let live: Vec<MemberId> = preference.iter().copied().filter(|&n| alive(n)).collect();
    if live.len() < needed {
        return Err(QuorumError::Unavailable { needed, live: live.len() });
    }
    Ok(live)
}

/// Counts acknowledgements from a fixed set of replicas. Each replica
/// counts once, however often its answer arrives (networks duplicate).
#[derive(Debug, Clone)]
pub struct Quorum {
    needed: usize,
    targets: usize,
    acked: Vec<MemberId>,
    failed: Vec<MemberId>,
    /// Test-only fault: count repeated acknowledgements again.
    count_duplicates: bool,
}

impl Quorum {
    pub fn new(targets: usize, needed: usize) -> Quorum {
        assert!(needed >= 1 && needed <= targets, "quorum of {needed} out of {targets}");
        Quorum { needed, targets, acked: Vec::new(), failed: Vec::new(), count_duplicates: false }
    }

    /// The known-bad variant the simulator must catch: a duplicated
    /// acknowledgement counts twice toward the quorum.
    #[cfg(feature = "bugs")]
    pub fn counting_duplicates(mut self, on: bool) -> Quorum {
        self.count_duplicates = on;
        self
    }

    fn answered(&self, from: MemberId) -> bool {
        self.acked.contains(&from) || self.failed.contains(&from)
    }

    pub fn ack(&mut self, from: MemberId) -> Progress {
        if !self.answered(from) || (self.count_duplicates && !self.failed.contains(&from)) {
            self.acked.push(from);
        }
        self.progress()
    }

    pub fn fail(&mut self, from: MemberId) -> Progress {
        if !self.answered(from) {
            self.failed.push(from);
        }
        self.progress()
    }

    pub fn progress(&self) -> Progress {
        if self.acked.len() >= self.needed {
            Progress::Reached
        } else if self.targets - self.failed.len().min(self.targets) < self.needed {
            Progress::Failed
        } else {
            Progress::Pending
        }
    }

    pub fn acked(&self) -> &[MemberId] {
        &self.acked
    }

    /// The error to report when the quorum was not reached.
    pub fn error(&self) -> QuorumError {
        QuorumError::Timeout { needed: self.needed, acked: self.acked.len(), failed: self.failed.len() }
    }
}

/// Merges what replicas answered to a read and finds the stale ones.
#[derive(Debug, Clone, Default)]
pub struct ReadMerge {
    answers: Vec<(MemberId, Option<Object>)>,
    merged: Option<Object>,
    /// Test-only fault: keep one sibling of concurrent answers.
    drop_siblings: bool,
}

impl ReadMerge {
    /// The known-bad variant the simulator must catch: concurrent answers
    /// are not kept as siblings, the one with the highest dot wins.
    #[cfg(feature = "bugs")]
    pub fn dropping_siblings(mut self, on: bool) -> ReadMerge {
        self.drop_siblings = on;
        self
    }

    pub fn add(&mut self, from: MemberId, obj: Option<Object>) {
        if self.answers.iter().any(|(n, _)| *n == from) {
            return;
        }
        if let Some(o) = &obj {
            self.merged = Some(match &self.merged {
                None => o.clone(),
                Some(m) if self.drop_siblings => m.merge(o).keeping_newest_sibling(),
                Some(m) => m.merge(o),
            });
        }
        self.answers.push((from, obj));
    }

    pub fn answers(&self) -> usize {
        self.answers.len()
    }

    /// Everything the answering replicas know, merged causally: dominated
    /// versions dropped, concurrent ones kept as siblings.
    pub fn merged(&self) -> Option<&Object> {
        self.merged.as_ref()
    }

    /// Replicas whose answer lacks something the merged object has: read
    /// repair sends them the merged object.
    pub fn stale(&self) -> Vec<MemberId> {
        let Some(m) = &self.merged else { return Vec::new() };
        self.answers
            .iter()
            .filter(|(_, o)| match o {
                None => true,
                Some(o) => !o.descends(m),
            })
            .map(|(n, _)| *n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Actor, VersionVector};

    fn write(local: Option<&Object>, actor: u64, v: &str) -> Object {
        let ctx = VersionVector::new();
        let a = Actor::new(actor, 0, 1);
        let dot = Object::next_dot(local, &ctx, a);
        Object::apply_write(local, &ctx, dot, 0, Some(v.as_bytes().to_vec()))
    }

    fn m(name: &str) -> MemberId {
        MemberId::of(name)
    }

    #[test]
    fn too_few_live_replicas_is_unavailable_before_anything_is_sent() {
        let pref = [m("a"), m("b"), m("c")];
        assert_eq!(live_targets(&pref, 2, |n| n != m("b")).unwrap(), [m("a"), m("c")]);
        assert_eq!(live_targets(&pref, 3, |n| n != m("b")), Err(QuorumError::Unavailable { needed: 3, live: 2 }));
    }

    #[test]
    fn a_quorum_is_reached_by_enough_acks_and_lost_by_enough_failures() {
        let mut q = Quorum::new(3, 2);
        assert_eq!(q.ack(m("a")), Progress::Pending);
        assert_eq!(q.ack(m("a")), Progress::Pending, "duplicates do not count");
        assert_eq!(q.fail(m("b")), Progress::Pending);
        assert_eq!(q.ack(m("c")), Progress::Reached);
        let mut q = Quorum::new(3, 3);
        assert_eq!(q.fail(m("b")), Progress::Failed);
        assert_eq!(q.error(), QuorumError::Timeout { needed: 3, acked: 0, failed: 1 });
    }

    #[test]
    fn a_read_merges_answers_and_names_the_stale_replicas() {
        let old = write(None, 1, "old");
        let new = write(Some(&old), 1, "new");
        let ctx = new.context().clone();
        let newer = {
            let a = Actor::new(1, 0, 1);
            let dot = Object::next_dot(Some(&new), &ctx, a);
            Object::apply_write(Some(&new), &ctx, dot, 0, Some(b"newest".to_vec()))
        };
        let mut r = ReadMerge::default();
        r.add(m("a"), Some(newer.clone()));
        r.add(m("b"), Some(old));
        r.add(m("c"), None);
        assert_eq!(r.merged(), Some(&newer));
        assert_eq!(r.stale(), [m("b"), m("c")]);
    }

    #[test]
    fn concurrent_answers_become_siblings_and_everyone_is_stale() {
        let left = write(None, 1, "left");
        let right = write(None, 2, "right");
        let mut r = ReadMerge::default();
        r.add(m("a"), Some(left));
        r.add(m("b"), Some(right));
        let values: Vec<&[u8]> = r.merged().unwrap().values().collect();
        assert_eq!(values, [b"left".as_slice(), b"right"]);
        assert_eq!(r.stale(), [m("a"), m("b")]);
    }
}
