//! A model of one shard's store that knows what was written from what was
//! made durable.
//!
//! Every change is a record appended to a log; `sync` makes everything
//! appended so far durable. The visible state (what reads see) includes
//! unsynced records; the durable state is what a crash leaves: on
//! [`ModelStore::crash`] the visible state becomes the durable state plus a
//! random prefix of the unsynced records (the page cache may have written
//! some of them; a torn record is cut off by its checksum, so the survivors
//! always form a prefix). What survives a crash is on disk afterwards.
//!
//! Dots are minted as the real store mints them (the actor rules of
//! `ringkv_core::version`): reuse one of this shard's actors only when the
//! local object proves it holds that actor's history, else take a fresh
//! epoch; after a crash every epoch used before is retired, because writes
//! acknowledged without an fsync may be gone.

use crate::rng::Rng;
use ringkv_core::effects::{RecordId, WriteContext};
use ringkv_core::keyspace::{key_hash, partition_of};
use ringkv_core::merkle::{MerkleTree, LEAVES_PER_SEGMENT};
use ringkv_core::topology::MemberId;
use ringkv_core::version::{reusable_actor, Actor, Dot, Object, VersionVector};
use std::collections::BTreeMap;

/// One change, as the log holds it.
#[derive(Debug, Clone)]
enum Change {
    Put {
        key: Vec<u8>,
        obj: Object,
    },
    Hint {
        owner: MemberId,
        key: Vec<u8>,
        obj: Object,
    },
    /// Retires the hint written by record `hint`, if it still is current.
    HintDone {
        owner: MemberId,
        key: Vec<u8>,
        hint: RecordId,
    },
    /// Forgets `key` if it still is the record `tombstone`.
    Purge {
        key: Vec<u8>,
        tombstone: RecordId,
    },
    /// Forgets every key of `p` written before this record.
    Drop {
        p: u32,
    },
}

#[derive(Debug, Clone)]
struct Record {
    lsn: u64,
    change: Change,
}

/// The state records build up: objects and hints with the record holding
/// each.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub objects: BTreeMap<Vec<u8>, (Object, RecordId)>,
    pub hints: BTreeMap<(MemberId, Vec<u8>), (Object, RecordId)>,
}

impl State {
    fn apply(&mut self, q: u32, r: &Record) {
        let id = RecordId(r.lsn);
        match &r.change {
            Change::Put { key, obj } => {
                self.objects.insert(key.clone(), (obj.clone(), id));
            }
            Change::Hint { owner, key, obj } => {
                self.hints.insert((*owner, key.clone()), (obj.clone(), id));
            }
            Change::HintDone { owner, key, hint } => {
                let k = (*owner, key.clone());
                if self.hints.get(&k).is_some_and(|(_, h)| h == hint) {
                    self.hints.remove(&k);
                }
            }
            Change::Purge { key, tombstone } => {
                if self.objects.get(key).is_some_and(|(_, t)| t == tombstone) {
                    self.objects.remove(key);
                }
            }
            Change::Drop { p } => {
                self.objects.retain(|k, (_, rid)| partition_of(k, q) != *p || rid.0 > r.lsn);
            }
        }
    }
}

/// The digest a Merkle leaf keeps for an object: the same on every replica
/// holding the same object (the encoding is canonical).
pub fn digest(obj: &Object) -> u32 {
    xxhash_rust::xxh3::xxh3_64(&obj.to_bytes()) as u32
}

pub struct ModelStore {
    q: u32,
    incarnation: u64,
    max_hints: usize,
    visible: State,
    durable: State,
    unsynced: Vec<Record>,
    next_lsn: u64,
    durable_lsn: u64,
    /// Next epoch to hand out, and the lowest one whose history this store
    /// still holds.
    next_epoch: u64,
    epoch_floor: u64,
    trees: BTreeMap<u32, MerkleTree>,
}

impl ModelStore {
    pub fn new(q: u32, incarnation: u64, max_hints: usize) -> ModelStore {
        ModelStore {
            q,
            incarnation,
            max_hints,
            visible: State::default(),
            durable: State::default(),
            unsynced: Vec::new(),
            next_lsn: 1,
            durable_lsn: 0,
            next_epoch: 1,
            epoch_floor: 1,
            trees: BTreeMap::new(),
        }
    }

    pub fn visible(&self) -> &State {
        &self.visible
    }

    pub fn durable(&self) -> &State {
        &self.durable
    }

    pub fn appended_lsn(&self) -> u64 {
        self.next_lsn - 1
    }

    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    pub fn has_unsynced(&self) -> bool {
        !self.unsynced.is_empty()
    }

    fn append(&mut self, change: Change) -> u64 {
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        let r = Record { lsn, change };
        self.untrack_for(&r);
        self.visible.apply(self.q, &r);
        self.track_for(&r);
        self.unsynced.push(r);
        lsn
    }

    /// Takes the Merkle contributions of the keys `r` touches out ...
    fn untrack_for(&mut self, r: &Record) {
        for key in self.keys_touched(r) {
            if let Some((obj, _)) = self.visible.objects.get(&key) {
                let d = digest(obj);
                self.tree(&key).remove(key_hash(&key), d);
            }
        }
    }

    /// ... and puts them back after it applied.
    fn track_for(&mut self, r: &Record) {
        for key in self.keys_touched(r) {
            if let Some((obj, _)) = self.visible.objects.get(&key) {
                let d = digest(obj);
                self.tree(&key).insert(key_hash(&key), d);
            }
        }
    }

    fn keys_touched(&self, r: &Record) -> Vec<Vec<u8>> {
        match &r.change {
            Change::Put { key, .. } | Change::Purge { key, .. } => vec![key.clone()],
            Change::Drop { p } => {
                self.visible.objects.keys().filter(|k| partition_of(k, self.q) == *p).cloned().collect()
            }
            Change::Hint { .. } | Change::HintDone { .. } => Vec::new(),
        }
    }

    fn tree(&mut self, key: &[u8]) -> &mut MerkleTree {
        self.trees.entry(partition_of(key, self.q)).or_default()
    }

    /// Makes everything appended so far durable; returns the keys whose
    /// durable state changed.
    pub fn sync(&mut self) -> Vec<Vec<u8>> {
        let mut touched = Vec::new();
        for r in std::mem::take(&mut self.unsynced) {
            match &r.change {
                Change::Put { key, .. }
                | Change::Hint { key, .. }
                | Change::HintDone { key, .. }
                | Change::Purge { key, .. } => touched.push(key.clone()),
                Change::Drop { p } => {
                    touched.extend(self.durable.objects.keys().filter(|k| partition_of(k, self.q) == *p).cloned())
                }
            }
            self.durable.apply(self.q, &r);
            self.durable_lsn = r.lsn;
        }
        touched.sort();
        touched.dedup();
        touched
    }

    /// A crash: unsynced records are lost, but for a random prefix that the
    /// kernel happened to write. Returns how many records were lost.
    pub fn crash(&mut self, rng: &mut Rng) -> usize {
        let kept = rng.below(self.unsynced.len() as u64 + 1) as usize;
        let lost = self.unsynced.len() - kept;
        for r in std::mem::take(&mut self.unsynced).into_iter().take(kept) {
            self.durable.apply(self.q, &r);
            self.durable_lsn = r.lsn;
        }
        self.visible = self.durable.clone();
        self.next_lsn = self.durable_lsn + 1;
        self.rebuild_trees();
        // Acknowledged-but-unsynced writes may be gone: no epoch used so
        // far may mint again.
        self.epoch_floor = self.next_epoch;
        lost
    }

    fn rebuild_trees(&mut self) {
        self.trees.clear();
        let entries: Vec<(Vec<u8>, u32)> =
            self.visible.objects.iter().map(|(k, (o, _))| (k.clone(), digest(o))).collect();
        for (k, d) in entries {
            self.tree(&k).insert(key_hash(&k), d);
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<Object> {
        self.visible.objects.get(key).map(|(o, _)| o.clone())
    }

    /// A client write coordinated here: the next dot on top of the local
    /// object. Returns the new object, its lsn, the dot minted and the
    /// context the write applied on top of.
    pub fn apply(
        &mut self,
        key: &[u8],
        value: Option<Vec<u8>>,
        ctx: &WriteContext,
        ts_ms: u64,
    ) -> (Object, u64, Dot, VersionVector) {
        let local = self.get(key);
        let actor = match reusable_actor(local.as_ref(), self.incarnation, 0, self.epoch_floor) {
            Some(a) => a,
            None => {
                let e = self.next_epoch;
                self.next_epoch += 1;
                Actor::new(self.incarnation, 0, e)
            }
        };
        let empty = VersionVector::new();
        let ctx = match ctx {
            WriteContext::Client(vv) => vv,
            WriteContext::Local => local.as_ref().map_or(&empty, Object::context),
        };
        let dot = Object::next_dot(local.as_ref(), ctx, actor);
        let obj = Object::apply_write(local.as_ref(), ctx, dot, ts_ms, value);
        let ctx = ctx.clone();
        let lsn = self.append(Change::Put { key: key.to_vec(), obj: obj.clone() });
        (obj, lsn, dot, ctx)
    }

    /// Merges a replica's version; returns the lsn to wait for (none when
    /// nothing changed).
    pub fn merge(&mut self, key: &[u8], remote: &Object) -> Option<u64> {
        let merged = match self.get(key) {
            Some(l) if l.descends(remote) => return None,
            Some(l) => l.merge(remote),
            None => remote.clone(),
        };
        Some(self.append(Change::Put { key: key.to_vec(), obj: merged }))
    }

    pub fn put_hint(&mut self, owner: MemberId, key: &[u8], remote: &Object) -> Result<Option<u64>, String> {
        let k = (owner, key.to_vec());
        let merged = match self.visible.hints.get(&k) {
            Some((l, _)) if l.descends(remote) => return Ok(None),
            Some((l, _)) => l.merge(remote),
            None if self.visible.hints.len() >= self.max_hints => {
                return Err(format!("this shard already holds {} hints", self.visible.hints.len()))
            }
            None => remote.clone(),
        };
        Ok(Some(self.append(Change::Hint { owner, key: key.to_vec(), obj: merged })))
    }

    pub fn hint_targets(&self) -> Vec<(MemberId, usize)> {
        let mut counts: BTreeMap<MemberId, usize> = BTreeMap::new();
        for (owner, _) in self.visible.hints.keys() {
            *counts.entry(*owner).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    pub fn hint_batch(&self, owner: MemberId, max: usize) -> Vec<(Vec<u8>, RecordId, Object)> {
        self.visible
            .hints
            .range((owner, Vec::new())..)
            .take_while(|((o, _), _)| *o == owner)
            .take(max)
            .map(|((_, k), (obj, id))| (k.clone(), *id, obj.clone()))
            .collect()
    }

    /// Retires delivered hints still current; returns how many and the lsn
    /// to wait for.
    pub fn retire_hints(&mut self, owner: MemberId, delivered: &[(Vec<u8>, RecordId)]) -> (usize, Option<u64>) {
        let mut n = 0;
        let mut lsn = None;
        for (key, id) in delivered {
            if self.visible.hints.get(&(owner, key.clone())).is_some_and(|(_, h)| h == id) {
                lsn = Some(self.append(Change::HintDone { owner, key: key.clone(), hint: *id }));
                n += 1;
            }
        }
        (n, lsn)
    }

    /// Forgets `key` if it is exactly the tombstone `expected`.
    pub fn purge(&mut self, key: &[u8], expected: &Object) -> Option<u64> {
        let (obj, id) = self.visible.objects.get(key)?;
        if !obj.is_deleted() || obj != expected {
            return None;
        }
        let tombstone = *id;
        Some(self.append(Change::Purge { key: key.to_vec(), tombstone }))
    }

    pub fn tombstones(&self, p: u32, max: usize) -> Vec<(Vec<u8>, Object)> {
        self.visible
            .objects
            .iter()
            .filter(|(k, (o, _))| partition_of(k, self.q) == p && o.is_deleted())
            .take(max)
            .map(|(k, (o, _))| (k.clone(), o.clone()))
            .collect()
    }

    pub fn partitions_with_data(&self) -> Vec<u32> {
        let mut ps: Vec<u32> = self.visible.objects.keys().map(|k| partition_of(k, self.q)).collect();
        ps.dedup();
        ps.sort_unstable();
        ps.dedup();
        ps
    }

    pub fn snapshot(&self, p: u32) -> Vec<(Vec<u8>, RecordId)> {
        self.visible
            .objects
            .iter()
            .filter(|(k, _)| partition_of(k, self.q) == p)
            .map(|(k, (_, id))| (k.clone(), *id))
            .collect()
    }

    pub fn read_records(&self, records: &[(Vec<u8>, RecordId)]) -> Vec<(Vec<u8>, Object)> {
        // The model keeps only current versions; a record replaced since the
        // snapshot reads as the current one (the drop that follows checks).
        records.iter().filter_map(|(k, _)| self.get(k).map(|o| (k.clone(), o))).collect()
    }

    /// Drops partition `p` if it still is exactly `snapshot`.
    pub fn drop_partition(&mut self, p: u32, snapshot: &[(Vec<u8>, RecordId)]) -> Option<u64> {
        if self.snapshot(p) != snapshot {
            return None;
        }
        Some(self.append(Change::Drop { p }))
    }

    pub fn merkle(&self, p: u32) -> MerkleTree {
        self.trees.get(&p).cloned().unwrap_or_default()
    }

    pub fn segment_leaves(&self, p: u32, segments: &[u32]) -> Vec<u64> {
        let tree = self.merkle(p);
        segments
            .iter()
            .flat_map(|&s| {
                let from = s as usize * LEAVES_PER_SEGMENT;
                tree.leaves()[from..from + LEAVES_PER_SEGMENT].to_vec()
            })
            .collect()
    }

    pub fn keys_in_leaves(&self, p: u32, leaves: &[u32]) -> Vec<(Vec<u8>, u32)> {
        self.visible
            .objects
            .iter()
            .filter(|(k, _)| partition_of(k, self.q) == p)
            .filter(|(k, _)| leaves.contains(&(ringkv_core::merkle::leaf_of(key_hash(k)) as u32)))
            .map(|(k, (o, _))| (k.clone(), digest(o)))
            .collect()
    }
}
