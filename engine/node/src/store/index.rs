//! The in-memory index of one shard: for every key, where its latest record is.
//!
//! Only locations live in memory; values stay on disk, so a shard can hold far
//! more data than RAM. The index is split per partition (vnode) so that a
//! partition can be streamed, repaired or dropped on its own.
//!
//! Invariant: an entry always points at the newest durable-or-pending record
//! of its key in this shard's log; replaying the log in order rebuilds it.

use ringkv_core::keyspace::key_hash;
use ringkv_core::merkle::{leaf_of, MerkleTree};
use std::collections::HashMap;
use std::hash::BuildHasher;

/// Where a record lives: segment id, byte offset, total record length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loc {
    pub segment: u32,
    pub offset: u32,
    pub len: u32,
}

/// An index entry: a location, whether the object is a tombstone (packed
/// into the top bit of the length), and the low 32 bits of the record's
/// checksum, which the Merkle trees use as the object's digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    segment: u32,
    offset: u32,
    len_and_flags: u32,
    digest: u32,
}

const DELETED: u32 = 1 << 31;
const _: () = assert!(std::mem::size_of::<Entry>() == 16);

impl Entry {
    pub fn new(loc: Loc, deleted: bool, digest: u32) -> Entry {
        assert!(loc.len < DELETED, "record length {} does not fit the index", loc.len);
        Entry {
            segment: loc.segment,
            offset: loc.offset,
            len_and_flags: loc.len | if deleted { DELETED } else { 0 },
            digest,
        }
    }

    pub fn digest(&self) -> u32 {
        self.digest
    }

    pub fn loc(&self) -> Loc {
        Loc { segment: self.segment, offset: self.offset, len: self.len_and_flags & !DELETED }
    }

    pub fn is_deleted(&self) -> bool {
        self.len_and_flags & DELETED != 0
    }
}

/// A seeded xxh3 so that keys chosen by clients cannot force collisions.
#[derive(Clone)]
pub struct KeyHasher {
    seed: u64,
}

impl KeyHasher {
    pub fn new(seed: u64) -> Self {
        KeyHasher { seed }
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = xxhash_rust::xxh3::Xxh3;

    fn build_hasher(&self) -> Self::Hasher {
        xxhash_rust::xxh3::Xxh3::with_seed(self.seed)
    }
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionCounts {
    pub live: u64,
    pub deleted: u64,
}

pub struct PartitionIndex {
    map: HashMap<Box<[u8]>, Entry, KeyHasher>,
    counts: PartitionCounts,
    /// Follows every change of `map`: the anti-entropy tree.
    tree: MerkleTree,
}

impl PartitionIndex {
    fn new(hasher: KeyHasher) -> Self {
        PartitionIndex {
            map: HashMap::with_hasher(hasher),
            counts: PartitionCounts::default(),
            tree: MerkleTree::default(),
        }
    }

    pub fn tree(&self) -> &MerkleTree {
        &self.tree
    }

    /// Keys (and their digests) that fall in the given Merkle leaves.
    pub fn keys_in_leaves(&self, leaves: &[usize]) -> Vec<(Vec<u8>, u32)> {
        let wanted: std::collections::HashSet<usize> = leaves.iter().copied().collect();
        self.map
            .iter()
            .filter(|(k, _)| wanted.contains(&leaf_of(key_hash(k))))
            .map(|(k, e)| (k.to_vec(), e.digest))
            .collect()
    }

    pub fn get(&self, key: &[u8]) -> Option<Entry> {
        self.map.get(key).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn counts(&self) -> PartitionCounts {
        self.counts
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Entry)> {
        self.map.iter().map(|(k, e)| (&**k, *e))
    }

    fn count(&mut self, e: &Entry, delta: i64) {
        let c = if e.is_deleted() { &mut self.counts.deleted } else { &mut self.counts.live };
        *c = c.checked_add_signed(delta).expect("index counts never go negative");
    }

    /// Points `key` at a new record; returns the entry it replaced.
    pub fn insert(&mut self, key: &[u8], entry: Entry) -> Option<Entry> {
        let h = key_hash(key);
        self.count(&entry, 1);
        self.tree.insert(h, entry.digest);
        let old = match self.map.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, entry)),
            None => {
                self.map.insert(key.into(), entry);
                None
            }
        };
        if let Some(o) = &old {
            self.count(o, -1);
            self.tree.remove(h, o.digest);
        }
        old
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let old = self.map.remove(key);
        if let Some(o) = &old {
            self.count(o, -1);
            self.tree.remove(key_hash(key), o.digest);
        }
        old
    }
}

/// Hints this shard holds for other nodes: per intended owner, per key, the
/// latest hint record.
#[derive(Default)]
pub struct Hints {
    by_target: std::collections::BTreeMap<String, HashMap<Box<[u8]>, Entry>>,
    count: u64,
}

impl Hints {
    pub fn get(&self, target: &str, key: &[u8]) -> Option<Entry> {
        self.by_target.get(target)?.get(key).copied()
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Owners with hints waiting, and how many each.
    pub fn targets(&self) -> Vec<(String, usize)> {
        self.by_target.iter().filter(|(_, m)| !m.is_empty()).map(|(t, m)| (t.clone(), m.len())).collect()
    }

    /// Up to `max` hints for `target`.
    pub fn batch(&self, target: &str, max: usize) -> Vec<(Vec<u8>, Entry)> {
        self.by_target
            .get(target)
            .map(|m| m.iter().take(max).map(|(k, e)| (k.to_vec(), *e)).collect())
            .unwrap_or_default()
    }
}

/// All partitions' indexes of one shard, the hints it holds for others, and
/// per-segment live-byte counts (what compaction needs to find garbage).
pub struct Index {
    partitions: Vec<Option<PartitionIndex>>,
    hasher: KeyHasher,
    live_bytes: HashMap<u32, u64>,
    pub hints: Hints,
}

impl Index {
    pub fn new(partitions: u32, hasher: KeyHasher) -> Index {
        Index {
            partitions: (0..partitions).map(|_| None).collect(),
            hasher,
            live_bytes: HashMap::new(),
            hints: Hints::default(),
        }
    }

    /// Records a hint for `target`; returns the hint it replaced.
    pub fn insert_hint(&mut self, target: &str, key: &[u8], entry: Entry) -> Option<Entry> {
        *self.live_bytes.entry(entry.loc().segment).or_default() += u64::from(entry.loc().len);
        let map = self.hints.by_target.entry(target.to_string()).or_default();
        let old = map.insert(key.into(), entry);
        match old {
            Some(o) => self.release(o.loc()),
            None => self.hints.count += 1,
        }
        old
    }

    /// Retires the hint for (`target`, `key`) if it is still the record at
    /// (`segment`, `offset`) (a newer hint for the key stays).
    pub fn retire_hint(&mut self, target: &str, key: &[u8], segment: u32, offset: u32) -> bool {
        let Some(map) = self.hints.by_target.get_mut(target) else { return false };
        let Some(loc) = map.get(key).map(|e| e.loc()).filter(|l| (l.segment, l.offset) == (segment, offset)) else {
            return false;
        };
        map.remove(key);
        if map.is_empty() {
            self.hints.by_target.remove(target);
        }
        self.hints.count -= 1;
        self.release(loc);
        true
    }

    pub fn partition(&self, p: u32) -> Option<&PartitionIndex> {
        self.partitions.get(p as usize).and_then(Option::as_ref)
    }

    pub fn get(&self, p: u32, key: &[u8]) -> Option<Entry> {
        self.partition(p)?.get(key)
    }

    /// Records that `key` of partition `p` now lives at `entry`.
    pub fn insert(&mut self, p: u32, key: &[u8], entry: Entry) -> Option<Entry> {
        let hasher = self.hasher.clone();
        let part = self.partitions[p as usize].get_or_insert_with(|| PartitionIndex::new(hasher));
        let old = part.insert(key, entry);
        *self.live_bytes.entry(entry.loc().segment).or_default() += u64::from(entry.loc().len);
        if let Some(o) = old {
            self.release(o.loc());
        }
        old
    }

    pub fn remove(&mut self, p: u32, key: &[u8]) -> Option<Entry> {
        let old = self.partitions.get_mut(p as usize)?.as_mut()?.remove(key);
        if let Some(o) = old {
            self.release(o.loc());
        }
        old
    }

    /// Forgets the keys of partition `p` whose records lie before
    /// (`segment`, `offset`) in log order.
    pub fn drop_partition_before(&mut self, p: u32, segment: u32, offset: u32) {
        let Some(part) = self.partitions.get_mut(p as usize).and_then(Option::as_mut) else { return };
        let doomed: Vec<Box<[u8]>> = part
            .map
            .iter()
            .filter(|(_, e)| (e.segment, e.offset) < (segment, offset))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            let old = part.remove(&k).expect("just listed");
            let loc = old.loc();
            let live = self.live_bytes.get_mut(&loc.segment).expect("accounted");
            *live -= u64::from(loc.len);
        }
    }

    /// Whether `key`'s index entry is the record at (`segment`, `offset`).
    pub fn points_at(&self, p: u32, key: &[u8], segment: u32, offset: u32) -> bool {
        self.get(p, key).is_some_and(|e| (e.segment, e.offset) == (segment, offset))
    }

    /// Moves `key`'s entry from (`segment`, `offset`) to `to` (compaction
    /// copied the record verbatim there). Does nothing, and says so, if the
    /// key was written again meanwhile.
    pub fn relocate(&mut self, p: u32, key: &[u8], segment: u32, offset: u32, to: Loc) -> bool {
        let Some(part) = self.partitions.get_mut(p as usize).and_then(Option::as_mut) else { return false };
        let Some(e) = part.map.get_mut(key) else { return false };
        if (e.segment, e.offset) != (segment, offset) {
            return false;
        }
        let old = e.loc();
        e.segment = to.segment;
        e.offset = to.offset;
        *self.live_bytes.get_mut(&old.segment).expect("accounted") -= u64::from(old.len);
        *self.live_bytes.entry(to.segment).or_default() += u64::from(old.len);
        true
    }

    /// [`Index::relocate`] for a hint.
    pub fn relocate_hint(&mut self, target: &str, key: &[u8], segment: u32, offset: u32, to: Loc) -> bool {
        let Some(e) = self.hints.by_target.get_mut(target).and_then(|m| m.get_mut(key)) else { return false };
        if (e.segment, e.offset) != (segment, offset) {
            return false;
        }
        let old = e.loc();
        e.segment = to.segment;
        e.offset = to.offset;
        *self.live_bytes.get_mut(&old.segment).expect("accounted") -= u64::from(old.len);
        *self.live_bytes.entry(to.segment).or_default() += u64::from(old.len);
        true
    }

    /// Forgets every key of partition `p`.
    pub fn drop_partition(&mut self, p: u32) {
        let Some(part) = self.partitions.get_mut(p as usize).and_then(Option::take) else { return };
        for (_, e) in part.map {
            self.release(e.loc());
        }
    }

    fn release(&mut self, loc: Loc) {
        let live = self.live_bytes.get_mut(&loc.segment).expect("a replaced record's segment is accounted");
        *live = live.checked_sub(u64::from(loc.len)).expect("live bytes never go negative");
    }

    /// Bytes of records the index still points to in `segment`.
    pub fn live_bytes(&self, segment: u32) -> u64 {
        self.live_bytes.get(&segment).copied().unwrap_or(0)
    }

    /// Forgets the accounting of a segment that no longer exists.
    pub fn forget_segment(&mut self, segment: u32) {
        self.live_bytes.remove(&segment);
    }

    pub fn counts(&self) -> PartitionCounts {
        self.partitions.iter().flatten().fold(PartitionCounts::default(), |acc, p| PartitionCounts {
            live: acc.live + p.counts.live,
            deleted: acc.deleted + p.counts.deleted,
        })
    }

    pub fn partitions(&self) -> impl Iterator<Item = (u32, &PartitionIndex)> {
        self.partitions.iter().enumerate().filter_map(|(p, i)| i.as_ref().map(|i| (p as u32, i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u32, offset: u32, len: u32) -> Loc {
        Loc { segment, offset, len }
    }

    #[test]
    fn replacing_a_key_moves_its_bytes_and_counts() {
        let mut ix = Index::new(4, KeyHasher::new(1));
        assert_eq!(ix.insert(2, b"k", Entry::new(loc(1, 4096, 100), false, 1)), None);
        assert_eq!(ix.live_bytes(1), 100);
        let root = ix.partition(2).unwrap().tree().root();
        let old = ix.insert(2, b"k", Entry::new(loc(2, 4096, 50), true, 2)).unwrap();
        assert_ne!(ix.partition(2).unwrap().tree().root(), root, "the tree follows the new digest");
        assert_eq!(old.loc(), loc(1, 4096, 100));
        assert_eq!((ix.live_bytes(1), ix.live_bytes(2)), (0, 50));
        assert_eq!(ix.counts(), PartitionCounts { live: 0, deleted: 1 });
        assert!(ix.get(2, b"k").unwrap().is_deleted());
        assert_eq!(ix.get(1, b"k"), None);
        ix.remove(2, b"k");
        assert_eq!(ix.live_bytes(2), 0);
        assert_eq!(ix.counts(), PartitionCounts::default());
        assert_eq!(ix.partition(2).unwrap().tree().root(), 0, "an emptied partition's tree is empty again");
    }
}
