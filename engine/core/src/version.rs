//! Versions of one key: a version vector plus dotted siblings.
//!
//! An [`Object`] is everything a replica knows about one key: the causal past it
//! has seen (`vv`) and the concurrent values that survive in it (`siblings`),
//! each tagged with the [`Dot`] of the write that created it. This is the
//! "dotted version vector set" shape Riak uses, reduced to what we need.
//!
//! Invariants (checked by `debug_assert_invariants` and the property tests):
//! - siblings are sorted by dot and no two share a dot;
//! - every sibling's dot is covered by `vv` (we know the writes we hold);
//! - no sibling is covered by another's causal past: a write made with a
//!   context drops exactly the siblings that context covers.
//!
//! Dots are minted only by coordinators, as `vv[actor] + 1` from the local
//! object. For that counter to be fresh the coordinator must hold every dot
//! it ever minted for the key under that actor; the shell guarantees it by
//! choosing a new actor (a new epoch) whenever the local object could have lost
//! such history — see [`reusable_actor`]. This is what keeps a node that lost
//! its data from minting a dot that already names another write (the
//! riak_test `kv679_dataloss` case).

use crate::codec::{err, put_varint, DecodeError, Reader};
use std::cmp::Ordering;

/// The identity that mints dots: one per (node incarnation, shard, epoch).
///
/// `incarnation` is drawn at random when a data directory is created; `lane`
/// packs the shard index (top 16 bits) and an epoch (low 48 bits) that the
/// shard advances whenever it cannot prove it holds its own history for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Actor {
    pub incarnation: u64,
    pub lane: u64,
}

pub const EPOCH_BITS: u32 = 48;
pub const MAX_EPOCH: u64 = (1 << EPOCH_BITS) - 1;

impl Actor {
    pub fn new(incarnation: u64, shard: u16, epoch: u64) -> Actor {
        assert!(epoch <= MAX_EPOCH, "epoch {epoch} over 48 bits");
        Actor { incarnation, lane: (u64::from(shard) << EPOCH_BITS) | epoch }
    }

    pub fn shard(&self) -> u16 {
        (self.lane >> EPOCH_BITS) as u16
    }

    pub fn epoch(&self) -> u64 {
        self.lane & MAX_EPOCH
    }

    const ENCODED_LEN: usize = 16;

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.incarnation.to_le_bytes());
        out.extend_from_slice(&self.lane.to_le_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<Actor, DecodeError> {
        Ok(Actor { incarnation: r.u64_le()?, lane: r.u64_le()? })
    }
}

/// One write event: the `counter`-th write to this key minted by `actor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// A causal history: for each actor, how many of its writes are known.
/// Entries are sorted by actor and counters are never zero.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct VersionVector {
    entries: Vec<(Actor, u64)>,
}

impl VersionVector {
    pub fn new() -> Self {
        VersionVector::default()
    }

    /// The empty history, usable in statics.
    pub const fn new_const() -> Self {
        VersionVector { entries: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Actor, u64)> + '_ {
        self.entries.iter().copied()
    }

    pub fn get(&self, actor: &Actor) -> u64 {
        match self.entries.binary_search_by(|(a, _)| a.cmp(actor)) {
            Ok(i) => self.entries[i].1,
            Err(_) => 0,
        }
    }

    pub fn covers(&self, dot: &Dot) -> bool {
        self.get(&dot.actor) >= dot.counter
    }

    /// Raises `actor`'s entry to at least `counter`.
    pub fn witness(&mut self, actor: Actor, counter: u64) {
        if counter == 0 {
            return;
        }
        match self.entries.binary_search_by(|(a, _)| a.cmp(&actor)) {
            Ok(i) => self.entries[i].1 = self.entries[i].1.max(counter),
            Err(i) => self.entries.insert(i, (actor, counter)),
        }
    }

    /// Least upper bound of the two histories.
    pub fn join(&self, other: &VersionVector) -> VersionVector {
        let mut out = Vec::with_capacity(self.entries.len().max(other.entries.len()));
        let (a, b) = (&self.entries, &other.entries);
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            match a[i].0.cmp(&b[j].0) {
                Ordering::Less => {
                    out.push(a[i]);
                    i += 1;
                }
                Ordering::Greater => {
                    out.push(b[j]);
                    j += 1;
                }
                Ordering::Equal => {
                    out.push((a[i].0, a[i].1.max(b[j].1)));
                    i += 1;
                    j += 1;
                }
            }
        }
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&b[j..]);
        VersionVector { entries: out }
    }

    /// True when every write known to `other` is known to `self`.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.entries.iter().all(|(a, c)| self.get(a) >= *c)
    }

    /// Causal order: `Less` when self happened before other, `None` when concurrent.
    pub fn causal_cmp(&self, other: &VersionVector) -> Option<Ordering> {
        match (self.descends(other), other.descends(self)) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Greater),
            (false, true) => Some(Ordering::Less),
            (false, false) => None,
        }
    }

    /// Upper bound on entries in a decoded vector; far above any real key's
    /// history, low enough that a hostile context cannot make us allocate much.
    pub const MAX_ENTRIES: usize = 4096;

    /// The opaque context format handed to clients: a format byte, then entries.
    pub fn encode_context(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.entries.len() * 20);
        out.push(CONTEXT_FORMAT);
        put_varint(&mut out, self.entries.len() as u64);
        for (actor, counter) in &self.entries {
            actor.encode(&mut out);
            put_varint(&mut out, *counter);
        }
        out
    }

    /// Parses a client-supplied context. Empty input is the empty history.
    pub fn decode_context(bytes: &[u8]) -> Result<VersionVector, DecodeError> {
        if bytes.is_empty() {
            return Ok(VersionVector::new());
        }
        let mut r = Reader::new(bytes);
        if r.u8()? != CONTEXT_FORMAT {
            return err("unknown context format");
        }
        let vv = Self::decode_entries(&mut r)?;
        if !r.is_empty() {
            return err("trailing bytes after context");
        }
        Ok(vv)
    }

    fn decode_entries(r: &mut Reader<'_>) -> Result<VersionVector, DecodeError> {
        let n = r.len(Self::MAX_ENTRIES.min(r.remaining() / Actor::ENCODED_LEN))?;
        let mut entries: Vec<(Actor, u64)> = Vec::with_capacity(n);
        for _ in 0..n {
            let actor = Actor::decode(r)?;
            let counter = r.varint()?;
            if counter == 0 {
                return err("zero counter in version vector");
            }
            if entries.last().is_some_and(|(prev, _)| *prev >= actor) {
                return err("version vector entries out of order");
            }
            entries.push((actor, counter));
        }
        Ok(VersionVector { entries })
    }
}

const CONTEXT_FORMAT: u8 = 1;
const OBJECT_FORMAT: u8 = 1;

/// One surviving write: a value, or a tombstone when `value` is `None`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sibling {
    pub dot: Dot,
    /// The coordinator's wall clock at the write, in ms since the Unix epoch.
    /// Never used for ordering; it dates tombstones and lets clients opt into
    /// last-writer-wins.
    pub ts_ms: u64,
    pub value: Option<Vec<u8>>,
}

impl Sibling {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// Everything one replica knows about one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Object {
    vv: VersionVector,
    siblings: Vec<Sibling>,
}

impl Object {
    pub fn vv(&self) -> &VersionVector {
        &self.vv
    }

    pub fn siblings(&self) -> &[Sibling] {
        &self.siblings
    }

    /// The causal context a client passes back to supersede what it read.
    pub fn context(&self) -> &VersionVector {
        &self.vv
    }

    /// Takes the sibling with `dot` out of the object, if it has one.
    pub fn into_sibling(self, dot: &Dot) -> Option<Sibling> {
        self.siblings.into_iter().find(|s| s.dot == *dot)
    }

    /// Live values, in dot order. Tombstones are hidden.
    pub fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.siblings.iter().filter_map(|s| s.value.as_deref())
    }

    /// True when no live value survives (the key reads as not found).
    pub fn is_deleted(&self) -> bool {
        self.siblings.iter().all(Sibling::is_tombstone)
    }

    /// Whether this is a tombstone every sibling of which is at least
    /// `grace_ms` old at `now_ms`: old enough to purge once every replica
    /// holds it. (Only the age is judged here; who holds it is not.)
    pub fn purgeable(&self, now_ms: u64, grace_ms: u64) -> bool {
        !self.siblings.is_empty()
            && self.siblings.iter().all(|s| s.is_tombstone() && s.ts_ms.saturating_add(grace_ms) <= now_ms)
    }

    /// Bytes of value payload across siblings (used for accounting).
    pub fn value_bytes(&self) -> usize {
        self.siblings.iter().map(|s| s.value.as_ref().map_or(0, Vec::len)).sum()
    }

    /// The dot a coordinator acting as `actor` mints for a write on top of
    /// `local` with client context `ctx`.
    pub fn next_dot(local: Option<&Object>, ctx: &VersionVector, actor: Actor) -> Dot {
        let seen = local.map_or(0, |o| o.vv.get(&actor)).max(ctx.get(&actor));
        Dot { actor, counter: seen + 1 }
    }

    /// The object after a client write (a value or, with `None`, a delete)
    /// coordinated locally: siblings the client's context covers are replaced,
    /// the others stay as concurrent siblings.
    pub fn apply_write(
        local: Option<&Object>,
        ctx: &VersionVector,
        dot: Dot,
        ts_ms: u64,
        value: Option<Vec<u8>>,
    ) -> Object {
        let empty = Object::default();
        let local = local.unwrap_or(&empty);
        assert!(!local.vv.covers(&dot), "dot {dot:?} reused: the coordinator minted it before");
        let mut siblings: Vec<Sibling> = local.siblings.iter().filter(|s| !ctx.covers(&s.dot)).cloned().collect();
        let at = siblings.partition_point(|s| s.dot < dot);
        siblings.insert(at, Sibling { dot, ts_ms, value });
        let mut vv = local.vv.join(ctx);
        vv.witness(dot.actor, dot.counter);
        let out = Object { vv, siblings };
        out.debug_assert_invariants();
        out
    }

    /// Combines two replicas' knowledge of the same key. Commutative,
    /// associative and idempotent, so replicas converge whatever the order.
    pub fn merge(&self, other: &Object) -> Object {
        let (a, b) = (&self.siblings, &other.siblings);
        let mut siblings = Vec::with_capacity(a.len().max(b.len()));
        let (mut i, mut j) = (0, 0);
        loop {
            let ord = match (a.get(i), b.get(j)) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(x), Some(y)) => x.dot.cmp(&y.dot),
            };
            match ord {
                Ordering::Equal => {
                    // One dot names one write, so both sides hold the same
                    // sibling. Should a bug ever make them differ, pick one
                    // deterministically so that replicas still converge.
                    let (x, y) = (&a[i], &b[j]);
                    let keep = if (x.ts_ms, &x.value) >= (y.ts_ms, &y.value) { x } else { y };
                    siblings.push(keep.clone());
                    i += 1;
                    j += 1;
                }
                Ordering::Less => {
                    if !other.vv.covers(&a[i].dot) {
                        siblings.push(a[i].clone());
                    }
                    i += 1;
                }
                Ordering::Greater => {
                    if !self.vv.covers(&b[j].dot) {
                        siblings.push(b[j].clone());
                    }
                    j += 1;
                }
            }
        }
        let out = Object { vv: self.vv.join(&other.vv), siblings };
        out.debug_assert_invariants();
        out
    }

    /// The object with only its newest sibling (highest dot): the data loss
    /// a broken merge would cause. Only the simulator's known-bad variants
    /// use it, to show that the checker notices.
    pub(crate) fn keeping_newest_sibling(&self) -> Object {
        let siblings = self.siblings.iter().max_by_key(|s| s.dot).cloned().into_iter().collect();
        Object { vv: self.vv.clone(), siblings }
    }

    /// True when `other` holds nothing that `self` lacks: merging it in would
    /// change nothing. Used to decide whether a replica needs repair.
    pub fn descends(&self, other: &Object) -> bool {
        self.vv.descends(&other.vv) && self.merge(other) == *self
    }

    fn debug_assert_invariants(&self) {
        if cfg!(debug_assertions) {
            assert!(self.check_invariants().is_ok(), "object invariant broken: {self:?}");
        }
    }

    /// The structural invariants listed in the module docs.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        if self.siblings.windows(2).any(|w| w[0].dot >= w[1].dot) {
            return Err("siblings not sorted by unique dot");
        }
        if !self.siblings.iter().all(|s| self.vv.covers(&s.dot)) {
            return Err("a sibling's dot is not covered by the object's history");
        }
        Ok(())
    }

    /// Serialises the object; the output is canonical (equal objects give
    /// equal bytes), so its hash can feed the Merkle trees.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(OBJECT_FORMAT);
        put_varint(out, self.vv.entries.len() as u64);
        for (actor, counter) in &self.vv.entries {
            actor.encode(out);
            put_varint(out, *counter);
        }
        put_varint(out, self.siblings.len() as u64);
        for s in &self.siblings {
            let idx = self
                .vv
                .entries
                .binary_search_by(|(a, _)| a.cmp(&s.dot.actor))
                .expect("invariant: every sibling's actor is in the version vector");
            put_varint(out, idx as u64);
            put_varint(out, s.dot.counter);
            put_varint(out, s.ts_ms);
            match &s.value {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    put_varint(out, v.len() as u64);
                    out.extend_from_slice(v);
                }
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        self.encode(&mut out);
        out
    }

    /// About the bytes the object takes encoded (never less): what
    /// streams count against their pace.
    pub fn encoded_len_hint(&self) -> usize {
        8 + self.vv.entries.len() * 20
            + self.siblings.iter().map(|s| 16 + s.value.as_ref().map_or(0, Vec::len)).sum::<usize>()
    }

    /// Parses an object written by [`Object::encode`], checking every
    /// invariant: the bytes may come from disk or from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Object, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.u8()? != OBJECT_FORMAT {
            return err("unknown object format");
        }
        let vv = VersionVector::decode_entries(&mut r)?;
        let n = r.len(r.remaining() / 4)?;
        let mut siblings = Vec::with_capacity(n);
        for _ in 0..n {
            let idx = r.len(vv.entries.len().saturating_sub(1))?;
            if vv.entries.is_empty() {
                return err("sibling without history");
            }
            let actor = vv.entries[idx].0;
            let counter = r.varint()?;
            let ts_ms = r.varint()?;
            let value = match r.u8()? {
                0 => None,
                1 => {
                    let len = r.len(r.remaining())?;
                    Some(r.bytes(len)?.to_vec())
                }
                _ => return err("unknown sibling kind"),
            };
            siblings.push(Sibling { dot: Dot { actor, counter }, ts_ms, value });
        }
        if !r.is_empty() {
            return err("trailing bytes after object");
        }
        let obj = Object { vv, siblings };
        if let Err(what) = obj.check_invariants() {
            return err(what);
        }
        Ok(obj)
    }
}

/// The actor a coordinator may keep using for a key, if any.
///
/// A shard reuses one of its own actors only when that actor's epoch is at or
/// above `min_epoch`: the first epoch the shard can vouch for, that is one whose
/// minted dots are all still in the local object. Otherwise it must mint under a
/// fresh epoch (the caller allocates one), so a dot can never be minted twice.
pub fn reusable_actor(local: Option<&Object>, incarnation: u64, shard: u16, min_epoch: u64) -> Option<Actor> {
    local?
        .vv
        .iter()
        .map(|(a, _)| a)
        .filter(|a| a.incarnation == incarnation && a.shard() == shard && a.epoch() >= min_epoch)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(n: u64) -> Actor {
        Actor::new(n, 0, 1)
    }

    fn put(local: Option<&Object>, ctx: &VersionVector, who: Actor, v: &str) -> Object {
        let dot = Object::next_dot(local, ctx, who);
        Object::apply_write(local, ctx, dot, 0, Some(v.as_bytes().to_vec()))
    }

    fn values(o: &Object) -> Vec<String> {
        o.values().map(|v| String::from_utf8(v.to_vec()).unwrap()).collect()
    }

    #[test]
    fn only_an_old_enough_pure_tombstone_is_purgeable() {
        let none = VersionVector::new();
        let v = put(None, &none, actor(1), "v");
        assert!(!v.purgeable(u64::MAX, 0), "a live value never is");
        let del = |local: &Object, who, ts| {
            let dot = Object::next_dot(Some(local), local.context(), who);
            Object::apply_write(Some(local), local.context(), dot, ts, None)
        };
        let gone = del(&v, actor(1), 1_000);
        assert!(!gone.purgeable(1_999, 1_000), "inside the grace period");
        assert!(gone.purgeable(2_000, 1_000));
        // A concurrent write beside the tombstone keeps the key alive.
        let beside = gone.merge(&put(Some(&v), v.context(), actor(2), "w"));
        assert!(!beside.purgeable(u64::MAX, 0));
        // Two concurrent deletes: the younger one decides.
        let two = gone.merge(&del(&v, actor(2), 5_000));
        assert!(!two.purgeable(5_999, 1_000) && two.purgeable(6_000, 1_000));
        assert!(!Object::default().purgeable(u64::MAX, 0), "nothing to purge in an empty object");
    }

    #[test]
    fn two_blind_writes_leave_two_siblings_and_a_contextual_write_replaces_both() {
        let none = VersionVector::new();
        let o = put(None, &none, actor(1), "a");
        let o = put(Some(&o), &none, actor(1), "b");
        assert_eq!(values(&o), ["a", "b"]);
        let ctx = o.context().clone();
        let o = put(Some(&o), &ctx, actor(1), "c");
        assert_eq!(values(&o), ["c"]);
    }

    #[test]
    fn concurrent_writes_at_two_replicas_merge_into_siblings() {
        let none = VersionVector::new();
        let base = put(None, &none, actor(1), "base");
        let ctx = base.context().clone();
        let left = put(Some(&base), &ctx, actor(1), "left");
        let right = put(Some(&base), &ctx, actor(2), "right");
        let merged = left.merge(&right);
        assert_eq!(values(&merged), ["left", "right"]);
        let resolved = put(Some(&merged), &merged.context().clone(), actor(2), "both");
        assert_eq!(values(&resolved.merge(&left)), ["both"]);
    }

    #[test]
    fn a_stale_context_only_supersedes_what_it_saw() {
        let none = VersionVector::new();
        let a = put(None, &none, actor(1), "a");
        let stale = a.context().clone();
        let b = put(Some(&a), &stale, actor(1), "b");
        let c = put(Some(&b), &stale, actor(1), "c");
        assert_eq!(values(&c), ["b", "c"]);
    }

    #[test]
    fn delete_with_context_hides_the_value_and_keeps_history() {
        let none = VersionVector::new();
        let a = put(None, &none, actor(1), "a");
        let dot = Object::next_dot(Some(&a), a.context(), actor(1));
        let gone = Object::apply_write(Some(&a), &a.context().clone(), dot, 5, None);
        assert!(gone.is_deleted());
        assert_eq!(gone.values().count(), 0);
        // An old replica that still has "a" does not bring it back.
        assert!(a.merge(&gone).is_deleted());
    }

    #[test]
    fn a_wiped_coordinator_on_a_new_epoch_does_not_shadow_old_writes() {
        // kv679: the node lost its data, then takes a blind write. With a
        // fresh actor its dot is new, so the old value survives as a sibling.
        let none = VersionVector::new();
        let old = put(None, &none, Actor::new(7, 0, 1), "old");
        let reborn = put(None, &none, Actor::new(7, 0, 2), "new");
        assert_eq!(values(&old.merge(&reborn)), ["old", "new"]);
        // Reusing the old actor is exactly the bug the epochs prevent.
        assert_eq!(reusable_actor(Some(&old), 7, 0, 2), None);
        assert_eq!(reusable_actor(Some(&old), 7, 0, 1), Some(Actor::new(7, 0, 1)));
    }

    #[test]
    fn objects_and_contexts_round_trip_through_bytes() {
        let none = VersionVector::new();
        let a = put(None, &none, actor(1), "x");
        let b = put(Some(&a), &none, actor(2), "y");
        let dot = Object::next_dot(Some(&b), &none, actor(3));
        let c = Object::apply_write(Some(&b), &none, dot, 99, None);
        let bytes = c.to_bytes();
        assert_eq!(Object::decode(&bytes).unwrap(), c);
        let ctx = c.context().encode_context();
        assert_eq!(&VersionVector::decode_context(&ctx).unwrap(), c.context());
    }

    #[test]
    fn garbage_contexts_and_objects_are_rejected_without_panicking() {
        assert!(VersionVector::decode_context(&[9]).is_err());
        assert!(VersionVector::decode_context(&[1, 5]).is_err());
        assert!(Object::decode(&[]).is_err());
        assert!(Object::decode(&[1, 0, 1, 0]).is_err());
        let good = put(None, &VersionVector::new(), actor(1), "v").to_bytes();
        for cut in 0..good.len() {
            assert!(Object::decode(&good[..cut]).is_err(), "prefix of {cut} bytes accepted");
        }
    }
}
