//! A history checker: what clients did, and whether the store kept its word.
//!
//! Clients record every operation: when it started and ended, how it ended
//! (acknowledged, refused before anything was written, or indeterminate:
//! timed out or cut off after it was sent), and for writes the values they
//! had read and passed the context of (their parents). Every written value is
//! unique. The checker trusts only this record of causality, never the
//! server's clocks, and after the cluster has healed and converged it checks
//! the values read at r=N:
//!
//! - **lost**: an acknowledged put whose value is neither there nor
//!   superseded by a write (acknowledged or indeterminate) that had it as a
//!   parent. Concurrent values nobody superseded must survive as siblings.
//! - **resurrected**: a value that an acknowledged write (put or delete)
//!   had as a parent, yet is there again.
//! - **phantom**: a value no put wrote, or only a put that was refused.
//! - **stale read** (strict mode, only meaningful when R + W > N and no
//!   sloppy quorum was involved): a read that missed a value acknowledged
//!   before it started and not superseded by any write begun before it ended.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub type Value = Vec<u8>;

#[derive(Clone, Debug)]
pub enum Op {
    Put { key: Vec<u8>, value: Value, parents: Vec<Value> },
    Delete { key: Vec<u8>, parents: Vec<Value> },
    Get { key: Vec<u8> },
}

impl Op {
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } | Op::Get { key } => key,
        }
    }

    fn parents(&self) -> &[Value] {
        match self {
            Op::Put { parents, .. } | Op::Delete { parents, .. } => parents,
            Op::Get { .. } => &[],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged; for a get, the values it returned.
    Ok(Vec<Value>),
    /// Refused before anything was written (Unavailable, bad request, or
    /// the request was never sent).
    Failed(String),
    /// May or may not have been applied (timeout, connection lost).
    Indeterminate(String),
}

#[derive(Clone, Debug)]
pub struct Event {
    pub client: usize,
    pub op: Op,
    pub invoked_us: u64,
    pub completed_us: u64,
    pub outcome: Outcome,
}

/// The shared log clients append to.
pub struct History {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl History {
    pub fn new() -> Arc<History> {
        Arc::new(History { start: Instant::now(), events: Mutex::new(Vec::new()) })
    }

    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub fn record(&self, client: usize, op: Op, invoked_us: u64, outcome: Outcome) {
        let completed_us = self.now_us();
        self.events.lock().expect("history lock").push(Event { client, op, invoked_us, completed_us, outcome });
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("history lock").clone()
    }

    /// Every key some write touched.
    pub fn written_keys(&self) -> Vec<Vec<u8>> {
        let keys: HashSet<Vec<u8>> = self
            .events()
            .into_iter()
            .filter(|e| !matches!(e.op, Op::Get { .. }))
            .map(|e| e.op.key().to_vec())
            .collect();
        let mut keys: Vec<Vec<u8>> = keys.into_iter().collect();
        keys.sort();
        keys
    }
}

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub puts_acked: usize,
    pub puts_failed: usize,
    pub puts_indeterminate: usize,
    pub deletes_acked: usize,
    pub reads_ok: usize,
    pub keys_with_siblings: usize,
    pub lost: Vec<String>,
    pub resurrected: Vec<String>,
    pub phantom: Vec<String>,
    pub stale_reads: Vec<String>,
}

impl Report {
    pub fn violations(&self) -> usize {
        self.lost.len() + self.resurrected.len() + self.phantom.len() + self.stale_reads.len()
    }

    /// Panics with every violation listed.
    pub fn assert_ok(&self) {
        assert!(self.violations() == 0, "history violations: {self:#?}");
    }
}

fn show(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// Checks `events` against `final_state` (key -> the values a read at r=N
/// returned once the cluster converged). With `strict_reads`, reads during
/// the run must also have seen every earlier acknowledged value.
pub fn check(events: &[Event], final_state: &BTreeMap<Vec<u8>, Vec<Value>>, strict_reads: bool) -> Report {
    let mut r = Report::default();
    // Values a write that may have been applied had as parents: superseded.
    let superseded: HashSet<&Value> = events
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Ok(_) | Outcome::Indeterminate(_)))
        .flat_map(|e| e.op.parents())
        .collect();
    // Values an acknowledged write had as parents: must never come back.
    let retired: HashSet<&Value> =
        events.iter().filter(|e| matches!(e.outcome, Outcome::Ok(_))).flat_map(|e| e.op.parents()).collect();
    let mut maybe_written: HashSet<&Value> = HashSet::new();
    for e in events {
        match (&e.op, &e.outcome) {
            (Op::Put { value, .. }, Outcome::Ok(_)) => {
                r.puts_acked += 1;
                maybe_written.insert(value);
            }
            (Op::Put { value, .. }, Outcome::Indeterminate(_)) => {
                r.puts_indeterminate += 1;
                maybe_written.insert(value);
            }
            (Op::Put { .. }, Outcome::Failed(_)) => r.puts_failed += 1,
            (Op::Delete { .. }, Outcome::Ok(_)) => r.deletes_acked += 1,
            (Op::Get { .. }, Outcome::Ok(_)) => r.reads_ok += 1,
            _ => {}
        }
    }
    let empty = Vec::new();
    for e in events {
        let (Op::Put { key, value, .. }, Outcome::Ok(_)) = (&e.op, &e.outcome) else { continue };
        let now = final_state.get(key).unwrap_or(&empty);
        if !now.contains(value) && !superseded.contains(value) {
            r.lost.push(format!("{}: acknowledged {} is gone and nothing superseded it", show(key), show(value)));
        }
    }
    for (key, values) in final_state {
        if values.len() > 1 {
            r.keys_with_siblings += 1;
        }
        for v in values {
            if retired.contains(v) {
                r.resurrected.push(format!(
                    "{}: {} came back after an acknowledged write replaced it",
                    show(key),
                    show(v)
                ));
            }
            if !maybe_written.contains(v) {
                r.phantom.push(format!("{}: {} was never written", show(key), show(v)));
            }
        }
    }
    if strict_reads {
        check_reads(events, &mut r);
    }
    r
}

fn check_reads(events: &[Event], r: &mut Report) {
    let mut puts: BTreeMap<&[u8], Vec<&Event>> = BTreeMap::new();
    for e in events {
        if let (Op::Put { key, .. }, Outcome::Ok(_)) = (&e.op, &e.outcome) {
            puts.entry(key).or_default().push(e);
        }
    }
    for g in events {
        let (Op::Get { key }, Outcome::Ok(seen)) = (&g.op, &g.outcome) else { continue };
        for p in puts.get(key.as_slice()).into_iter().flatten() {
            let Op::Put { value, .. } = &p.op else { continue };
            if p.completed_us >= g.invoked_us || seen.contains(value) {
                continue;
            }
            let overwritten = events.iter().any(|w| {
                w.invoked_us < g.completed_us
                    && w.op.key() == key.as_slice()
                    && w.op.parents().contains(value)
                    && !matches!(w.outcome, Outcome::Failed(_))
            });
            if !overwritten {
                r.stale_reads.push(format!(
                    "{}: a read at {} us missed {} acknowledged at {} us",
                    show(key),
                    g.invoked_us,
                    show(value),
                    p.completed_us
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: Op, at: u64, outcome: Outcome) -> Event {
        Event { client: 0, op, invoked_us: at, completed_us: at + 10, outcome }
    }

    fn put(v: &str, parents: &[&str], at: u64, o: Outcome) -> Event {
        let parents = parents.iter().map(|p| p.as_bytes().to_vec()).collect();
        ev(Op::Put { key: b"k".to_vec(), value: v.as_bytes().to_vec(), parents }, at, o)
    }

    fn ok() -> Outcome {
        Outcome::Ok(vec![])
    }

    fn state(values: &[&str]) -> BTreeMap<Vec<u8>, Vec<Value>> {
        BTreeMap::from([(b"k".to_vec(), values.iter().map(|v| v.as_bytes().to_vec()).collect())])
    }

    #[test]
    fn a_clean_history_with_siblings_and_an_overwrite_passes() {
        let h = vec![put("a", &[], 0, ok()), put("b", &[], 5, ok()), put("c", &["a"], 30, ok())];
        let r = check(&h, &state(&["b", "c"]), false);
        assert_eq!(r.violations(), 0, "{r:?}");
        assert_eq!((r.puts_acked, r.keys_with_siblings), (3, 1));
    }

    #[test]
    fn a_lost_acknowledged_write_is_reported() {
        let h = vec![put("a", &[], 0, ok()), put("b", &[], 5, ok())];
        let r = check(&h, &state(&["a"]), false);
        assert_eq!(r.lost.len(), 1, "{r:?}");
        assert!(r.lost[0].contains('b'));
    }

    #[test]
    fn a_concurrent_sibling_dropped_by_a_write_that_never_saw_it_is_lost() {
        // c superseded a only; b was concurrent and must survive beside c.
        let h = vec![put("a", &[], 0, ok()), put("b", &[], 1, ok()), put("c", &["a"], 30, ok())];
        assert_eq!(check(&h, &state(&["c"]), false).lost.len(), 1);
    }

    #[test]
    fn a_value_back_after_an_acknowledged_delete_is_a_resurrection() {
        let h =
            vec![put("a", &[], 0, ok()), ev(Op::Delete { key: b"k".to_vec(), parents: vec![b"a".to_vec()] }, 20, ok())];
        assert_eq!(check(&h, &state(&[]), false).violations(), 0);
        let r = check(&h, &state(&["a"]), false);
        assert_eq!(r.resurrected.len(), 1, "{r:?}");
    }

    #[test]
    fn values_nobody_wrote_or_only_refused_writes_wrote_are_phantoms() {
        let h = vec![put("a", &[], 0, Outcome::Failed("Unavailable".into()))];
        let r = check(&h, &state(&["a", "zzz"]), false);
        assert_eq!(r.phantom.len(), 2, "{r:?}");
    }

    #[test]
    fn an_indeterminate_write_may_or_may_not_be_there() {
        let h = vec![put("a", &[], 0, ok()), put("b", &["a"], 20, Outcome::Indeterminate("timeout".into()))];
        assert_eq!(check(&h, &state(&["a"]), false).violations(), 0);
        assert_eq!(check(&h, &state(&["b"]), false).violations(), 0, "b applied and superseded a");
    }

    #[test]
    fn strict_mode_flags_a_read_that_missed_an_earlier_acknowledged_write() {
        let h = vec![put("a", &[], 0, ok()), ev(Op::Get { key: b"k".to_vec() }, 100, Outcome::Ok(vec![]))];
        assert_eq!(check(&h, &state(&["a"]), false).violations(), 0, "not checked unless strict");
        let r = check(&h, &state(&["a"]), true);
        assert_eq!(r.stale_reads.len(), 1, "{r:?}");
        // A read that overlapped the write may miss it.
        let h = vec![put("a", &[], 0, ok()), ev(Op::Get { key: b"k".to_vec() }, 5, Outcome::Ok(vec![]))];
        assert_eq!(check(&h, &state(&["a"]), true).stale_reads.len(), 0);
    }
}
