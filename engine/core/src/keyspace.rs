//! Keys, their hash, the partition they fall in, and the size limits of pairs.
//!
//! The 64-bit hash space (xxh3-64 of the key) is cut into `q` equal
//! partitions; partition `p` holds hashes in `[p * 2^64 / q, (p+1) * 2^64 / q)`.
//! `q` is fixed when a cluster is created, so this mapping never changes.

use std::fmt;

pub const MAX_KEY_BYTES: usize = 1024;
pub const DEFAULT_MAX_PAIR_BYTES: usize = 10 * 1024;
/// `max_pair_bytes` may be raised up to this.
pub const MAX_PAIR_BYTES_LIMIT: usize = 1024 * 1024;
pub const DEFAULT_PARTITIONS: u32 = 256;

pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// The partition of a hash among `q` partitions.
pub fn partition_of_hash(hash: u64, q: u32) -> u32 {
    debug_assert!(q > 0);
    ((u128::from(hash) * u128::from(q)) >> 64) as u32
}

pub fn partition_of(key: &[u8], q: u32) -> u32 {
    partition_of_hash(key_hash(key), q)
}

/// Checks a partition count given by an operator.
pub fn validate_partitions(q: u32) -> Result<(), String> {
    if q == 0 || !q.is_power_of_two() || q > 1 << 16 {
        return Err(format!("partitions must be a power of two between 1 and 65536, got {q}"));
    }
    Ok(())
}

/// Why a client's key or pair was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairError {
    EmptyKey,
    KeyTooLong { len: usize },
    PairTooLarge { len: usize, max: usize },
}

impl fmt::Display for PairError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PairError::EmptyKey => write!(f, "key is empty"),
            PairError::KeyTooLong { len } => {
                write!(f, "key is {len} bytes, the limit is {MAX_KEY_BYTES}")
            }
            PairError::PairTooLarge { len, max } => {
                write!(f, "key plus value is {len} bytes, the limit is {max}")
            }
        }
    }
}

impl std::error::Error for PairError {}

pub fn validate_key(key: &[u8]) -> Result<(), PairError> {
    if key.is_empty() {
        return Err(PairError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(PairError::KeyTooLong { len: key.len() });
    }
    Ok(())
}

pub fn validate_pair(key: &[u8], value: &[u8], max_pair_bytes: usize) -> Result<(), PairError> {
    validate_key(key)?;
    let len = key.len() + value.len();
    if len > max_pair_bytes {
        return Err(PairError::PairTooLarge { len, max: max_pair_bytes });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cut_the_hash_space_into_equal_ranges() {
        assert_eq!(partition_of_hash(0, 256), 0);
        assert_eq!(partition_of_hash(u64::MAX, 256), 255);
        assert_eq!(partition_of_hash(1 << 56, 256), 1);
        assert_eq!(partition_of_hash((1 << 56) - 1, 256), 0);
        assert_eq!(partition_of_hash(u64::MAX, 1), 0);
    }

    #[test]
    fn pair_limits_are_inclusive_and_keys_must_be_nonempty() {
        assert_eq!(validate_pair(b"", b"v", 100), Err(PairError::EmptyKey));
        assert!(validate_pair(&[1; 1024], b"", 2048).is_ok());
        assert_eq!(validate_pair(&[1; 1025], b"", 2048), Err(PairError::KeyTooLong { len: 1025 }));
        assert!(validate_pair(b"k", &[0; 99], 100).is_ok());
        assert_eq!(validate_pair(b"k", &[0; 100], 100), Err(PairError::PairTooLarge { len: 101, max: 100 }));
    }

    #[test]
    fn partition_counts_must_be_powers_of_two() {
        assert!(validate_partitions(256).is_ok());
        assert!(validate_partitions(0).is_err());
        assert!(validate_partitions(100).is_err());
    }
}
