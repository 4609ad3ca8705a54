//! The in-memory index of one shard: for every key, where its latest record is.
//!
//! Only locations live in memory; values stay on disk, so a shard can hold far
//! more data than RAM. The index is split per partition (vnode) so that a
//! partition can be streamed, repaired or dropped on its own.
//!
//! Invariant: an entry always points at the newest durable-or-pending record
//! of its key in this shard's log; replaying the log in order rebuilds it.

use hashbrown::HashTable;
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

/// Key bytes of one partition, packed back to back in chunks of at most
/// `CHUNK` bytes.
///
/// A key is stored once, behind a one- or two-byte length, and named by its
/// offset (`u32`), so an index slot costs 20 bytes instead of a boxed key's
/// pointer, length and allocation header. Chunks never move, so growth costs
/// no copy and no transient doubling. Removed keys leave garbage that
/// [`PartitionIndex::remove`] reclaims by repacking once it outweighs the
/// live keys.
#[derive(Default)]
struct KeyArena {
    chunks: Vec<Vec<u8>>,
    garbage: usize,
}

/// Fits the longest key (`MAX_KEY_BYTES` = 1024) plus its length many times.
const CHUNK: usize = 64 * 1024;
const _: () = assert!(ringkv_core::keyspace::MAX_KEY_BYTES < 1 << 15 && ringkv_core::keyspace::MAX_KEY_BYTES < CHUNK);

impl KeyArena {
    /// Bytes a key takes in the arena: its length prefix and itself.
    fn stored_len(key: &[u8]) -> usize {
        key.len() + if key.len() < 0x80 { 1 } else { 2 }
    }

    fn push(&mut self, key: &[u8]) -> u32 {
        let need = Self::stored_len(key);
        if self.chunks.last().is_none_or(|c| c.len() + need > CHUNK) {
            self.chunks.push(Vec::new());
        }
        let index = self.chunks.len() - 1;
        let chunk = &mut self.chunks[index];
        if chunk.len() + need > chunk.capacity() {
            // Doubling, but never past CHUNK: a small partition's keys cost
            // little more than their bytes, and a full chunk has no slack.
            let cap = (chunk.capacity() * 2).max(chunk.len() + need).clamp(256, CHUNK);
            chunk.reserve_exact(cap - chunk.len());
        }
        let off = index * CHUNK + chunk.len();
        if key.len() < 0x80 {
            chunk.push(key.len() as u8);
        } else {
            chunk.extend_from_slice(&(0x8000 | key.len() as u16).to_be_bytes());
        }
        chunk.extend_from_slice(key);
        u32::try_from(off).expect("a partition's keys fit in 4 GiB")
    }

    fn get(&self, off: u32) -> &[u8] {
        let off = off as usize;
        let chunk = &self.chunks[off / CHUNK];
        let at = off % CHUNK;
        let (len, start) = if chunk[at] & 0x80 == 0 {
            (chunk[at] as usize, at + 1)
        } else {
            ((u16::from_be_bytes([chunk[at], chunk[at + 1]]) & 0x7fff) as usize, at + 2)
        };
        &chunk[start..start + len]
    }

    fn bytes(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }
}

/// One key of the table: where its bytes are, and its index entry.
#[derive(Clone, Copy)]
struct Slot {
    key: u32,
    entry: Entry,
}
const _: () = assert!(std::mem::size_of::<Slot>() == 20);

pub struct PartitionIndex {
    keys: KeyArena,
    table: HashTable<Slot>,
    hasher: KeyHasher,
    counts: PartitionCounts,
    /// Follows every change of `table`: the anti-entropy tree.
    tree: MerkleTree,
}

impl PartitionIndex {
    fn new(hasher: KeyHasher) -> Self {
        PartitionIndex {
            keys: KeyArena::default(),
            table: HashTable::new(),
            hasher,
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
        self.iter()
            .filter(|(k, _)| wanted.contains(&leaf_of(key_hash(k))))
            .map(|(k, e)| (k.to_vec(), e.digest))
            .collect()
    }

    fn find(&self, key: &[u8]) -> Option<&Slot> {
        self.table.find(self.hasher.hash_one(key), |s| self.keys.get(s.key) == key)
    }

    fn find_mut(&mut self, key: &[u8]) -> Option<&mut Slot> {
        let keys = &self.keys;
        self.table.find_mut(self.hasher.hash_one(key), |s| keys.get(s.key) == key)
    }

    pub fn get(&self, key: &[u8]) -> Option<Entry> {
        self.find(key).map(|s| s.entry)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn counts(&self) -> PartitionCounts {
        self.counts
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Entry)> {
        self.table.iter().map(|s| (self.keys.get(s.key), s.entry))
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
        let old = match self.find_mut(key) {
            Some(slot) => Some(std::mem::replace(&mut slot.entry, entry)),
            None => {
                let off = self.keys.push(key);
                let (keys, hasher) = (&self.keys, &self.hasher);
                self.table.insert_unique(hasher.hash_one(key), Slot { key: off, entry }, |s| {
                    hasher.hash_one(keys.get(s.key))
                });
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
        let keys = &self.keys;
        let found = self.table.find_entry(self.hasher.hash_one(key), |s| keys.get(s.key) == key).ok()?;
        let (slot, _) = found.remove();
        self.keys.garbage += KeyArena::stored_len(key);
        self.count(&slot.entry, -1);
        self.tree.remove(key_hash(key), slot.entry.digest);
        if self.keys.garbage > CHUNK && self.keys.garbage * 2 > self.keys.bytes() {
            self.repack();
        }
        Some(slot.entry)
    }

    /// Copies the live keys into a fresh arena, dropping removed keys' bytes.
    fn repack(&mut self) {
        let mut fresh = KeyArena::default();
        for slot in self.table.iter_mut() {
            slot.key = fresh.push(self.keys.get(slot.key));
        }
        self.keys = fresh;
    }

    /// Removes every key whose entry matches `doomed`; returns their entries.
    fn remove_where(&mut self, mut doomed: impl FnMut(&Entry) -> bool) -> Vec<Entry> {
        let keys: Vec<Vec<u8>> = self.iter().filter(|(_, e)| doomed(e)).map(|(k, _)| k.to_vec()).collect();
        keys.iter().map(|k| self.remove(k).expect("just listed")).collect()
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

/// Bytes of records the index points to, per segment: what compaction
/// weighs garbage by. Every record the index starts pointing to is added,
/// every one it stops pointing to is released.
#[derive(Default)]
struct LiveBytes(HashMap<u32, u64>);

impl LiveBytes {
    fn add(&mut self, loc: Loc) {
        *self.0.entry(loc.segment).or_default() += u64::from(loc.len);
    }

    fn release(&mut self, loc: Loc) {
        let live = self.0.get_mut(&loc.segment).expect("a replaced record's segment is accounted");
        *live = live.checked_sub(u64::from(loc.len)).expect("live bytes never go negative");
    }

    /// Points `entry` at `to` if it still is the record at (`segment`,
    /// `offset`), moving its bytes along; says whether it did.
    fn relocate(&mut self, entry: &mut Entry, segment: u32, offset: u32, to: Loc) -> bool {
        if (entry.segment, entry.offset) != (segment, offset) {
            return false;
        }
        let old = entry.loc();
        entry.segment = to.segment;
        entry.offset = to.offset;
        self.release(old);
        self.add(Loc { len: old.len, ..to });
        true
    }
}

/// All partitions' indexes of one shard, the hints it holds for others, and
/// per-segment live-byte counts (what compaction needs to find garbage).
pub struct Index {
    partitions: Vec<Option<PartitionIndex>>,
    hasher: KeyHasher,
    live_bytes: LiveBytes,
    pub hints: Hints,
}

impl Index {
    pub fn new(partitions: u32, hasher: KeyHasher) -> Index {
        Index {
            partitions: (0..partitions).map(|_| None).collect(),
            hasher,
            live_bytes: LiveBytes::default(),
            hints: Hints::default(),
        }
    }

    /// Records a hint for `target`; returns the hint it replaced.
    pub fn insert_hint(&mut self, target: &str, key: &[u8], entry: Entry) -> Option<Entry> {
        self.live_bytes.add(entry.loc());
        let map = self.hints.by_target.entry(target.to_string()).or_default();
        let old = map.insert(key.into(), entry);
        match old {
            Some(o) => self.live_bytes.release(o.loc()),
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
        self.live_bytes.release(loc);
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
        self.live_bytes.add(entry.loc());
        if let Some(o) = old {
            self.live_bytes.release(o.loc());
        }
        old
    }

    pub fn remove(&mut self, p: u32, key: &[u8]) -> Option<Entry> {
        let old = self.partitions.get_mut(p as usize)?.as_mut()?.remove(key);
        if let Some(o) = old {
            self.live_bytes.release(o.loc());
        }
        old
    }

    /// Forgets the keys of partition `p` whose records lie before
    /// (`segment`, `offset`) in log order.
    pub fn drop_partition_before(&mut self, p: u32, segment: u32, offset: u32) {
        let Some(part) = self.partitions.get_mut(p as usize).and_then(Option::as_mut) else { return };
        for old in part.remove_where(|e| (e.segment, e.offset) < (segment, offset)) {
            self.live_bytes.release(old.loc());
        }
    }

    /// Forgets `key` of partition `p` if its record lies at or before
    /// (`segment`, `offset`) in log order (a purge marker's replay: a newer
    /// write of the key stays).
    pub fn purge_before(&mut self, p: u32, key: &[u8], segment: u32, offset: u32) -> Option<Entry> {
        let e = self.get(p, key)?;
        if (e.segment, e.offset) > (segment, offset) {
            return None;
        }
        self.remove(p, key)
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
        let Some(slot) = part.find_mut(key) else { return false };
        self.live_bytes.relocate(&mut slot.entry, segment, offset, to)
    }

    /// [`Index::relocate`] for a hint.
    pub fn relocate_hint(&mut self, target: &str, key: &[u8], segment: u32, offset: u32, to: Loc) -> bool {
        let Some(e) = self.hints.by_target.get_mut(target).and_then(|m| m.get_mut(key)) else { return false };
        self.live_bytes.relocate(e, segment, offset, to)
    }

    /// Forgets every key of partition `p`.
    pub fn drop_partition(&mut self, p: u32) {
        let Some(part) = self.partitions.get_mut(p as usize).and_then(Option::take) else { return };
        for s in part.table {
            self.live_bytes.release(s.entry.loc());
        }
    }

    /// Bytes of records the index still points to in `segment`.
    pub fn live_bytes(&self, segment: u32) -> u64 {
        self.live_bytes.0.get(&segment).copied().unwrap_or(0)
    }

    /// Forgets the accounting of a segment that no longer exists.
    pub fn forget_segment(&mut self, segment: u32) {
        self.live_bytes.0.remove(&segment);
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

    #[test]
    fn keys_of_every_length_survive_growth_removal_and_repacking() {
        let mut ix = Index::new(1, KeyHasher::new(7));
        let key = |i: usize| -> Vec<u8> {
            let len = 1 + (i * 37) % ringkv_core::keyspace::MAX_KEY_BYTES;
            (0..len).map(|j| (i + j) as u8).chain((i as u32).to_le_bytes()).collect()
        };
        let n = 2_000;
        for i in 0..n {
            ix.insert(0, &key(i), Entry::new(loc(1, i as u32 * 8, 8), false, i as u32));
        }
        // Removing most keys forces the arena to repack under the survivors.
        for i in (0..n).filter(|i| i % 5 != 0) {
            assert_eq!(ix.remove(0, &key(i)).map(|e| e.digest()), Some(i as u32));
        }
        let part = ix.partition(0).unwrap();
        assert!(part.keys.garbage * 2 <= part.keys.bytes().max(CHUNK * 2), "garbage was reclaimed");
        assert_eq!(part.len(), n / 5);
        for i in 0..n {
            let got = ix.get(0, &key(i));
            assert_eq!(got.map(|e| e.digest()), (i % 5 == 0).then_some(i as u32), "key {i}");
        }
        let mut listed: Vec<u32> = ix.partition(0).unwrap().iter().map(|(_, e)| e.digest()).collect();
        listed.sort();
        assert_eq!(listed, (0..n as u32).filter(|i| i % 5 == 0).collect::<Vec<_>>());
        assert_eq!(ix.live_bytes(1), (n / 5) as u64 * 8);
    }

    #[test]
    fn dropping_a_partition_prefix_keeps_newer_records() {
        let mut ix = Index::new(2, KeyHasher::new(3));
        ix.insert(1, b"old", Entry::new(loc(1, 0, 10), false, 1));
        ix.insert(1, b"new", Entry::new(loc(2, 0, 10), false, 2));
        ix.drop_partition_before(1, 2, 0);
        assert_eq!(ix.get(1, b"old"), None);
        assert!(ix.get(1, b"new").is_some());
        assert_eq!((ix.live_bytes(1), ix.live_bytes(2)), (0, 10));
        assert!(ix.relocate(1, b"new", 2, 0, loc(3, 4096, 10)));
        assert_eq!(ix.get(1, b"new").unwrap().loc(), loc(3, 4096, 10));
        assert!(!ix.relocate(1, b"new", 2, 0, loc(4, 0, 10)), "a stale relocation is refused");
    }
}
