//! Incremental Merkle trees over one partition's keys.
//!
//! A key lands in one of [`LEAVES`] leaf buckets by its hash; a leaf's value
//! is the wrapping sum of a 64-bit mix of (key hash, object digest) over the
//! keys in it. A sum can take a key out as cheaply as it put it in, so the
//! tree follows every write in O(1): subtract the old contribution, add the
//! new one. Inner levels ([`SEGMENTS`] segment hashes, then the root) are
//! computed on demand.
//!
//! Two replicas compare top-down: roots, then segments, then the leaves of
//! differing segments, then the (key, digest) lists of differing leaves, and
//! stream only the keys whose digests differ. The digest is the checksum of
//! the key's record, which is the same on every replica holding the same
//! object because the object encoding is canonical.

/// Leaves per partition tree.
pub const LEAVES: usize = 1024;
/// Middle level: each segment covers `LEAVES / SEGMENTS` leaves.
pub const SEGMENTS: usize = 32;
pub const LEAVES_PER_SEGMENT: usize = LEAVES / SEGMENTS;

const _: () = assert!(LEAVES.is_power_of_two() && LEAVES.is_multiple_of(SEGMENTS));

/// The leaf a key belongs to (from the low bits of its hash: the high bits
/// already chose its partition).
pub fn leaf_of(key_hash: u64) -> usize {
    (key_hash as usize) & (LEAVES - 1)
}

/// One key's contribution to its leaf.
pub fn contribution(key_hash: u64, digest: u32) -> u64 {
    // SplitMix64 finaliser over both inputs: every bit of either changes
    // about half the output bits.
    let mut z = key_hash ^ (u64::from(digest) << 32 | u64::from(digest)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn combine(hashes: &[u64]) -> u64 {
    let mut bytes = Vec::with_capacity(hashes.len() * 8);
    for h in hashes {
        bytes.extend_from_slice(&h.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    leaves: Vec<u64>,
}

impl Default for MerkleTree {
    fn default() -> Self {
        MerkleTree { leaves: vec![0; LEAVES] }
    }
}

impl MerkleTree {
    pub fn insert(&mut self, key_hash: u64, digest: u32) {
        let l = &mut self.leaves[leaf_of(key_hash)];
        *l = l.wrapping_add(contribution(key_hash, digest));
    }

    pub fn remove(&mut self, key_hash: u64, digest: u32) {
        let l = &mut self.leaves[leaf_of(key_hash)];
        *l = l.wrapping_sub(contribution(key_hash, digest));
    }

    pub fn leaves(&self) -> &[u64] {
        &self.leaves
    }

    pub fn leaf(&self, i: usize) -> u64 {
        self.leaves[i]
    }

    pub fn segments(&self) -> Vec<u64> {
        self.leaves.chunks(LEAVES_PER_SEGMENT).map(combine).collect()
    }

    /// Zero for an empty partition, so "no keys" matches on every replica.
    pub fn root(&self) -> u64 {
        if self.leaves.iter().all(|&l| l == 0) {
            return 0;
        }
        combine(&self.segments())
    }
}

/// Indexes where two equally long hash lists differ.
pub fn differing(a: &[u64], b: &[u64]) -> Vec<usize> {
    assert_eq!(a.len(), b.len(), "trees of different shape");
    (0..a.len()).filter(|&i| a[i] != b[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_key_sets_give_equal_roots_in_any_order() {
        let keys: Vec<(u64, u32)> = (0..500u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15), i as u32)).collect();
        let mut a = MerkleTree::default();
        let mut b = MerkleTree::default();
        for &(k, d) in &keys {
            a.insert(k, d);
        }
        for &(k, d) in keys.iter().rev() {
            b.insert(k, d);
        }
        assert_eq!(a.root(), b.root());
        assert_ne!(a.root(), 0);
        assert_eq!(MerkleTree::default().root(), 0);
    }

    #[test]
    fn one_changed_digest_shows_up_in_one_segment_and_one_leaf() {
        let mut a = MerkleTree::default();
        let mut b = MerkleTree::default();
        for i in 0..300u64 {
            let h = i.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            a.insert(h, 7);
            b.insert(h, 7);
        }
        let changed = 42u64.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        b.remove(changed, 7);
        b.insert(changed, 8);
        assert_ne!(a.root(), b.root());
        assert_eq!(differing(&a.segments(), &b.segments()), [leaf_of(changed) / LEAVES_PER_SEGMENT]);
        assert_eq!(differing(a.leaves(), b.leaves()), [leaf_of(changed)]);
        // Undoing the change restores equality exactly.
        b.remove(changed, 8);
        b.insert(changed, 7);
        assert_eq!(a, b);
    }
}
