//! The history of a simulated run and the invariants it must keep.
//!
//! Every client write is registered when its coordinator applies it (the
//! simulator sees the dot minted) and when the client gets its answer. The
//! checks, each reported as a violation with the time and the write:
//!
//! - *durable at ack*: a write acknowledged as durable at `w` is known (its
//!   value, or a write that superseded it) to the durable state of at least
//!   `w` members when the client hears of it;
//! - *stays durable*: that count never drops below `w` afterwards (a hint
//!   retired too early, a replica forgetting what it acknowledged);
//! - *read your writes*: a quorum read (R + W > N) that starts after such a
//!   write was acknowledged by W primaries knows it;
//! - *no phantoms*: every value any read or replica returns was written by
//!   a client;
//! - at the end, after healing: replicas of each key hold the same object,
//!   which knows every acknowledged durable write and resurrects nothing a
//!   known write or a purged tombstone superseded; Merkle roots are equal;
//!   no hints are left.
//!
//! A write "known" to an object: the object's history covers its dot and
//! either its sibling survives or a write whose context covered it is
//! itself known (siblings only ever go that way). Writes superseded by a
//! tombstone that was later purged are exempt: forgetting them is the
//! point of the purge.

use ringkv_core::version::{Dot, Object, VersionVector};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct WriteRec {
    pub key: Vec<u8>,
    /// `None` for a delete.
    pub value: Option<Vec<u8>>,
    pub dot: Option<Dot>,
    /// The context the write applied on top of.
    pub ctx: VersionVector,
    pub acked_at: Option<u64>,
    pub durable: bool,
    pub w: usize,
    /// Acknowledged by at least W primaries' durable state.
    pub strict: bool,
    /// Reported already (one violation per write is enough).
    pub reported: bool,
}

#[derive(Default)]
pub struct History {
    pub writes: Vec<WriteRec>,
    by_key: BTreeMap<Vec<u8>, Vec<usize>>,
    by_value: BTreeMap<Vec<u8>, usize>,
    /// Tombstones purged somewhere, per key: their histories.
    purged: BTreeMap<Vec<u8>, Vec<VersionVector>>,
    pub violations: Vec<String>,
}

impl History {
    /// A client write about to be sent; returns its id.
    pub fn register(&mut self, key: &[u8], value: Option<Vec<u8>>, durable: bool, w: usize) -> usize {
        let id = self.writes.len();
        if let Some(v) = &value {
            assert!(self.by_value.insert(v.clone(), id).is_none(), "values are unique");
        }
        self.by_key.entry(key.to_vec()).or_default().push(id);
        self.writes.push(WriteRec {
            key: key.to_vec(),
            value,
            dot: None,
            ctx: VersionVector::new(),
            acked_at: None,
            durable,
            w,
            strict: false,
            reported: false,
        });
        id
    }

    pub fn by_value(&self, v: &[u8]) -> Option<usize> {
        self.by_value.get(v).copied()
    }

    /// The coordinator minted `dot` for write `id` on top of `ctx`.
    pub fn applied(&mut self, id: usize, dot: Dot, ctx: VersionVector) {
        let w = &mut self.writes[id];
        assert!(w.dot.is_none(), "a client write is applied once");
        w.dot = Some(dot);
        w.ctx = ctx;
    }

    pub fn purged(&mut self, key: &[u8], tombstone: &Object) {
        self.purged.entry(key.to_vec()).or_default().push(tombstone.vv().clone());
    }

    pub fn violation(&mut self, now_us: u64, what: String) {
        self.violations.push(format!("t={:.3}s: {what}", now_us as f64 / 1e6));
    }

    fn exempt(&self, w: &WriteRec) -> bool {
        let Some(dot) = w.dot else { return true };
        self.purged.get(&w.key).is_some_and(|vvs| vvs.iter().any(|vv| vv.covers(&dot)))
    }

    /// Whether `obj` knows write `w` (see the module docs).
    pub fn knows(&self, obj: Option<&Object>, w: &WriteRec) -> bool {
        let (Some(obj), Some(dot)) = (obj, w.dot) else { return false };
        if !obj.vv().covers(&dot) {
            return false;
        }
        if obj.siblings().iter().any(|s| s.dot == dot) {
            return true;
        }
        // Its sibling is gone: only a write whose context covered it, now in
        // the object's history, may have taken it.
        self.by_key[&w.key]
            .iter()
            .map(|&i| &self.writes[i])
            .any(|o| o.dot.is_some_and(|od| od != dot && o.ctx.covers(&dot) && obj.vv().covers(&od)))
    }

    /// Acked durable writes of `key` that must keep their copies.
    pub fn guarded(&self, key: &[u8]) -> Vec<usize> {
        self.by_key
            .get(key)
            .map(|ids| {
                ids.iter()
                    .copied()
                    .filter(|&i| {
                        let w = &self.writes[i];
                        w.acked_at.is_some() && w.durable && !w.reported && !self.exempt(w)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Writes of `key` a read started at `t0` must know.
    pub fn must_read(&self, key: &[u8], t0: u64) -> Vec<usize> {
        self.by_key
            .get(key)
            .map(|ids| {
                ids.iter()
                    .copied()
                    .filter(|&i| {
                        let w = &self.writes[i];
                        w.strict && w.acked_at.is_some_and(|a| a < t0) && !self.exempt(w)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks that every value of `obj` was written, and that none of its
    /// siblings was superseded by a write it knows or by a purged tombstone.
    pub fn check_values(&mut self, now_us: u64, whom: &str, key: &[u8], obj: &Object) {
        for s in obj.siblings() {
            if let Some(v) = &s.value {
                if self.by_value(v).is_none() {
                    let v = String::from_utf8_lossy(v).into_owned();
                    self.violation(now_us, format!("{whom}: value {v:?} of key {:?} was never written", show(key)));
                    continue;
                }
            }
            if s.value.is_some() && self.purged.get(key).is_some_and(|vvs| vvs.iter().any(|vv| vv.covers(&s.dot))) {
                self.violation(
                    now_us,
                    format!("{whom}: key {:?} resurrected a write after its tombstone was purged", show(key)),
                );
            }
            let superseded = self
                .by_key
                .get(key)
                .into_iter()
                .flatten()
                .map(|&i| &self.writes[i])
                .any(|o| o.dot.is_some_and(|od| od != s.dot && o.ctx.covers(&s.dot) && obj.vv().covers(&od)));
            if superseded {
                self.violation(now_us, format!("{whom}: key {:?} kept a sibling a later write superseded", show(key)));
            }
        }
    }

    /// `obj` as the final comparison sees it: a tombstone that some
    /// replica already purged reads as nothing (the purge of the others is
    /// merely still under way).
    pub fn settled(&self, key: &[u8], obj: Option<Object>) -> Option<Object> {
        let Some(purged) = self.purged.get(key) else { return obj };
        match obj {
            Some(o) if o.is_deleted() && purged.iter().any(|vv| vv.descends(o.vv())) => None,
            other => other,
        }
    }

    pub fn keys(&self) -> Vec<Vec<u8>> {
        self.by_key.keys().cloned().collect()
    }

    pub fn ids_of(&self, key: &[u8]) -> Vec<usize> {
        self.by_key.get(key).cloned().unwrap_or_default()
    }
}

pub fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

pub fn describe(w: &WriteRec) -> String {
    let what = match &w.value {
        Some(v) => format!("put {:?}", String::from_utf8_lossy(v)),
        None => "delete".to_string(),
    };
    format!("{what} of key {:?} (w={}, durable={}, dot={:?})", show(&w.key), w.w, w.durable, w.dot)
}
