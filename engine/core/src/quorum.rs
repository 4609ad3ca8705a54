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

use crate::version::Object;
use std::fmt;

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
pub fn live_targets<'a>(
    preference: &[&'a str],
    needed: usize,
    alive: impl Fn(&str) -> bool,
) -> Result<Vec<&'a str>, QuorumError> {
    let live: Vec<&str> = preference.iter().copied().filter(|n| alive(n)).collect();
    if live.len() < needed {
        return Err(QuorumError::Unavailable { needed, live: live.len() });
    }
    Ok(live)
}

/// Counts acknowledgements from a fixed set of replicas.
#[derive(Debug, Clone)]
pub struct Quorum {
    needed: usize,
    targets: usize,
    acked: Vec<String>,
    failed: Vec<String>,
}

impl Quorum {
    pub fn new(targets: usize, needed: usize) -> Quorum {
        assert!(needed >= 1 && needed <= targets, "quorum of {needed} out of {targets}");
        Quorum { needed, targets, acked: Vec::new(), failed: Vec::new() }
    }

    fn answered(&self, from: &str) -> bool {
        self.acked.iter().chain(&self.failed).any(|n| n == from)
    }

    pub fn ack(&mut self, from: &str) -> Progress {
        if !self.answered(from) {
            self.acked.push(from.to_string());
        }
        self.progress()
    }

    pub fn fail(&mut self, from: &str) -> Progress {
        if !self.answered(from) {
            self.failed.push(from.to_string());
        }
        self.progress()
    }

    pub fn progress(&self) -> Progress {
        if self.acked.len() >= self.needed {
            Progress::Reached
        } else if self.targets - self.failed.len() < self.needed {
            Progress::Failed
        } else {
            Progress::Pending
        }
    }

    pub fn acked(&self) -> &[String] {
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
    answers: Vec<(String, Option<Object>)>,
    merged: Option<Object>,
}

impl ReadMerge {
    pub fn add(&mut self, from: &str, obj: Option<Object>) {
        if self.answers.iter().any(|(n, _)| n == from) {
            return;
        }
        if let Some(o) = &obj {
            self.merged = Some(match &self.merged {
                None => o.clone(),
                Some(m) => m.merge(o),
            });
        }
        self.answers.push((from.to_string(), obj));
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
    pub fn stale(&self) -> Vec<String> {
        let Some(m) = &self.merged else { return Vec::new() };
        self.answers
            .iter()
            .filter(|(_, o)| match o {
                None => true,
                Some(o) => !o.descends(m),
            })
            .map(|(n, _)| n.clone())
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

    #[test]
    fn too_few_live_replicas_is_unavailable_before_anything_is_sent() {
        let pref = ["a", "b", "c"];
        assert_eq!(live_targets(&pref, 2, |n| n != "b").unwrap(), ["a", "c"]);
        assert_eq!(live_targets(&pref, 3, |n| n != "b"), Err(QuorumError::Unavailable { needed: 3, live: 2 }));
    }

    #[test]
    fn a_quorum_is_reached_by_enough_acks_and_lost_by_enough_failures() {
        let mut q = Quorum::new(3, 2);
        assert_eq!(q.ack("a"), Progress::Pending);
        assert_eq!(q.ack("a"), Progress::Pending, "duplicates do not count");
        assert_eq!(q.fail("b"), Progress::Pending);
        assert_eq!(q.ack("c"), Progress::Reached);
        let mut q = Quorum::new(3, 3);
        assert_eq!(q.fail("b"), Progress::Failed);
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
        r.add("a", Some(newer.clone()));
        r.add("b", Some(old));
        r.add("c", None);
        assert_eq!(r.merged(), Some(&newer));
        assert_eq!(r.stale(), ["b", "c"]);
    }

    #[test]
    fn concurrent_answers_become_siblings_and_everyone_is_stale() {
        let left = write(None, 1, "left");
        let right = write(None, 2, "right");
        let mut r = ReadMerge::default();
        r.add("a", Some(left));
        r.add("b", Some(right));
        let values: Vec<&[u8]> = r.merged().unwrap().values().collect();
        assert_eq!(values, [b"left".as_slice(), b"right"]);
        assert_eq!(r.stale(), ["a", "b"]);
    }
}
