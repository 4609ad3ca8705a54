//! The byte layout of segment files (see docs/STORAGE.md for the diagram).
//!
//! A segment is a 4 KiB header block followed by records packed back to back.
//! Every record carries an xxh3-64 checksum over all of its bytes after the
//! checksum field, length included, so a torn or flipped record is detected
//! before anything in it is trusted. A zero length (and zero checksum) marks
//! the end of the written log: the tail of a block is zero-filled on write.
//!
//! Everything here is pure: bytes in, bytes out.

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

/// Unit of O_DIRECT I/O: buffers, offsets and lengths are multiples of it.
pub const BLOCK: u64 = 4096;
pub const HEADER_BYTES: u64 = BLOCK;
pub const SEGMENT_MAGIC: [u8; 8] = *b"RKVSEG\0\x01";
/// Segments written by the log get ids this far apart, leaving room after
/// each for the outputs of compacting it: an output takes a free id right
/// after its input, so it replays in the input's place, before anything
/// written later.
pub const SEGMENT_ID_STEP: u32 = 1024;
/// The segment format this build writes. Version 1 held object records
/// only; version 2 added drop-partition, hint, hint-retired and purge
/// records (kinds 2 to 5) and hint files beside sealed segments. A reader
/// of version 1 alone refuses a version-2 segment with a clear error
/// instead of taking its new records for a torn tail.
pub const FORMAT_VERSION: u32 = 2;
/// Every segment format this build reads. (Builds between the first
/// version-2 record kinds and this bump wrote them under version 1; they
/// read as version 2 content, which is a superset.)
pub const READABLE_FORMATS: std::ops::RangeInclusive<u32> = 1..=FORMAT_VERSION;

pub const RECORD_HEADER_BYTES: usize = 16;
/// A record may hold an object with many siblings (repair paths carry
/// whatever replicas hold), but never more than this.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

const _: () = assert!(HEADER_BYTES.is_multiple_of(BLOCK));
const _: () = assert!(RECORD_HEADER_BYTES == 8 + 4 + 1 + 1 + 2);

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// The whole current object (all siblings and the version vector) of a key.
    Object = 1,
    /// Everything of one partition written before a boundary is gone (it
    /// was handed off to the partition's replicas). The key is the partition
    /// number, 4 bytes little-endian; the body is the boundary, [`loc_body`]:
    /// the record's own original position, so the record keeps its meaning
    /// when compaction moves it (an empty body, from before compaction
    /// existed, means the record's own position).
    DropPartition = 2,
    /// A write held for another node (sloppy quorum). Key: [`hint_key`];
    /// body: the object.
    Hint = 3,
    /// Retires one hint record once its owner has it. Key: [`hint_key`];
    /// body: the hint record's position ([`loc_body`]), so a newer hint for
    /// the same key is not retired by an older delivery.
    HintDone = 4,
    /// Forgets a key whose tombstone every replica held past the grace
    /// period. Key: the key; body: the tombstone's position ([`loc_body`]).
    /// Replay drops the key's records up to that position, so an older value
    /// still lying in an earlier segment cannot come back.
    Purge = 5,
}

impl RecordKind {
    pub fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Object),
            2 => Some(RecordKind::DropPartition),
            3 => Some(RecordKind::Hint),
            4 => Some(RecordKind::HintDone),
            5 => Some(RecordKind::Purge),
            _ => None,
        }
    }

    /// Markers change what other records mean; their body is kept in hint
    /// files, and no index entry points at them.
    pub fn is_marker(self) -> bool {
        matches!(self, RecordKind::DropPartition | RecordKind::HintDone | RecordKind::Purge)
    }
}

/// The key of a hint record: the owner's node id, length-prefixed, then the
/// key itself.
pub fn hint_key(target: &str, key: &[u8]) -> Vec<u8> {
    assert!(target.len() <= u8::MAX as usize, "node ids are at most 255 bytes");
    let mut out = Vec::with_capacity(1 + target.len() + key.len());
    out.push(target.len() as u8);
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(key);
    out
}

pub fn parse_hint_key(k: &[u8]) -> Option<(&str, &[u8])> {
    let n = usize::from(*k.first()?);
    let target = std::str::from_utf8(k.get(1..1 + n)?).ok()?;
    let key = k.get(1 + n..)?;
    (!key.is_empty()).then_some((target, key))
}

/// A (segment, offset) position, as record bodies carry it.
pub fn loc_body(segment: u32, offset: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&segment.to_le_bytes());
    b[4..].copy_from_slice(&offset.to_le_bytes());
    b
}

pub fn parse_loc_body(b: &[u8]) -> Option<(u32, u32)> {
    let b: &[u8; 8] = b.try_into().ok()?;
    Some((u32::from_le_bytes(b[..4].try_into().ok()?), u32::from_le_bytes(b[4..].try_into().ok()?)))
}

/// The key of a [`RecordKind::DropPartition`] record.
pub fn drop_partition_key(p: u32) -> [u8; 4] {
    p.to_le_bytes()
}

pub fn parse_drop_partition_key(key: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(key.try_into().ok()?))
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a ringkv segment (bad magic)")]
    BadMagic,
    #[error(
        "segment format version {0} is not supported (this build reads versions {first} to {last}); \
         the data was written by a newer ringkv",
        first = READABLE_FORMATS.start(),
        last = READABLE_FORMATS.end()
    )]
    UnsupportedVersion(u32),
    #[error("segment header checksum mismatch")]
    HeaderChecksum,
    #[error("record length {0} is invalid here")]
    BadLength(u64),
    #[error("record checksum mismatch")]
    BadChecksum,
    #[error("unknown record kind {0}")]
    BadKind(u8),
    #[error("unknown record flags {0:#x}")]
    BadFlags(u8),
    #[error("record key is empty or longer than the record")]
    BadKey,
    #[error("segment header truncated")]
    ShortHeader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u32,
    pub segment: u32,
    pub incarnation: u64,
    pub created_ms: u64,
}

impl SegmentHeader {
    // magic 8 | version 4 | shard 4 | segment 4 | reserved 4 | incarnation 8 | created_ms 8 | xxh3 8
    const CHECKED_BYTES: usize = 40;

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES as usize];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.shard.to_le_bytes());
        b[16..20].copy_from_slice(&self.segment.to_le_bytes());
        b[24..32].copy_from_slice(&self.incarnation.to_le_bytes());
        b[32..40].copy_from_slice(&self.created_ms.to_le_bytes());
        let sum = xxh3_64(&b[..Self::CHECKED_BYTES]);
        b[40..48].copy_from_slice(&sum.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, FormatError> {
        if b.len() < 48 {
            return Err(FormatError::ShortHeader);
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if !READABLE_FORMATS.contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if u64_at(40) != xxh3_64(&b[..Self::CHECKED_BYTES]) {
            return Err(FormatError::HeaderChecksum);
        }
        Ok(SegmentHeader { shard: u32_at(12), segment: u32_at(16), incarnation: u64_at(24), created_ms: u64_at(32) })
    }
}

/// The total size of a record holding `key` and a body of `body_len` bytes.
pub fn record_len(key_len: usize, body_len: usize) -> usize {
    RECORD_HEADER_BYTES + key_len + body_len
}

/// Record flag: the object has no live value (it reads as deleted). Lets
/// recovery count tombstones without decoding objects.
pub const FLAG_DELETED: u8 = 1;
const KNOWN_FLAGS: u8 = FLAG_DELETED;

/// Appends one record to `out` and returns its length.
pub fn encode_record(kind: RecordKind, flags: u8, key: &[u8], body: &[u8], out: &mut Vec<u8>) -> usize {
    assert_eq!(flags & !KNOWN_FLAGS, 0, "unknown record flags {flags:#x}");
    assert!(!key.is_empty() && key.len() <= u16::MAX as usize, "record key of {} bytes", key.len());
    let len = record_len(key.len(), body.len());
    assert!(len <= MAX_RECORD_BYTES, "record of {len} bytes over the maximum");
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(kind as u8);
    out.push(flags);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(body);
    let sum = xxh3_64(&out[start + 8..]);
    out[start..start + 8].copy_from_slice(&sum.to_le_bytes());
    debug_assert!(matches!(decode_record(&out[start..]), Ok(Some(r)) if r.len == len));
    len
}

/// The checksum of the record that starts at `bytes[0]` (already encoded).
pub fn record_checksum(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("a record has a checksum"))
}

/// A record parsed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub kind: RecordKind,
    pub flags: u8,
    /// The verified xxh3-64 of the record (its identity for anti-entropy).
    pub checksum: u64,
    pub key: &'a [u8],
    pub body: &'a [u8],
    pub len: usize,
    /// The whole record, header included (compaction copies it verbatim).
    pub raw: &'a [u8],
}

/// The length a record at the start of `buf` claims, if its header is there.
/// Lets a reader fetch exactly one record before checking it.
pub fn peek_len(buf: &[u8]) -> Option<usize> {
    (buf.len() >= 12).then(|| u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize)
}

/// Parses the record at the start of `buf`, which must extend at least to the
/// end of the record (or to the end of the written file).
///
/// `Ok(None)` is the end-of-log marker (or no bytes at all). An error means the
/// bytes here are not a whole, intact record: on the tail of the log that is
/// a torn write, anywhere else it is corruption.
pub fn decode_record(buf: &[u8]) -> Result<Option<RecordRef<'_>>, FormatError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.len() < RECORD_HEADER_BYTES {
        return if buf.iter().all(|&b| b == 0) { Ok(None) } else { Err(FormatError::BadLength(buf.len() as u64)) };
    }
    let sum = u64::from_le_bytes(buf[0..8].try_into().expect("8 bytes"));
    let len = peek_len(buf).expect("header present") as u64;
    if len == 0 {
        return if sum == 0 { Ok(None) } else { Err(FormatError::BadLength(0)) };
    }
    if len < RECORD_HEADER_BYTES as u64 || len > MAX_RECORD_BYTES as u64 || len > buf.len() as u64 {
        return Err(FormatError::BadLength(len));
    }
    let len = len as usize;
    if xxh3_64(&buf[8..len]) != sum {
        return Err(FormatError::BadChecksum);
    }
    let kind = RecordKind::from_u8(buf[12]).ok_or(FormatError::BadKind(buf[12]))?;
    let flags = buf[13];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FormatError::BadFlags(flags));
    }
    let key_len = u16::from_le_bytes([buf[14], buf[15]]) as usize;
    if key_len == 0 || RECORD_HEADER_BYTES + key_len > len {
        return Err(FormatError::BadKey);
    }
    let key = &buf[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + key_len];
    let body = &buf[RECORD_HEADER_BYTES + key_len..len];
    Ok(Some(RecordRef { kind, flags, checksum: sum, key, body, len, raw: &buf[..len] }))
}

pub fn align_down(v: u64) -> u64 {
    v / BLOCK * BLOCK
}

pub fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK) * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &[u8], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(RecordKind::Object, 0, key, body, &mut out);
        out
    }

    #[test]
    fn headers_round_trip_and_reject_damage() {
        let h = SegmentHeader { shard: 3, segment: 17, incarnation: 0xdead_beef, created_ms: 1_700_000_000_000 };
        let mut b = h.encode();
        assert_eq!(b.len() as u64, HEADER_BYTES);
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        b[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&b), Err(FormatError::HeaderChecksum), "reserved bytes are checked too");
        b[20] ^= 1;
        b[13] ^= 1;
        assert_eq!(SegmentHeader::decode(&b), Err(FormatError::HeaderChecksum));
        b[0] = b'X';
        assert_eq!(SegmentHeader::decode(&b), Err(FormatError::BadMagic));
    }

    #[test]
    fn records_parse_back_and_zeros_mark_the_end() {
        let mut log = record(b"k1", b"body-1");
        log.extend(record(b"key-2", b""));
        log.extend([0u8; 40]);
        let a = decode_record(&log).unwrap().unwrap();
        assert_eq!((a.key, a.body), (&b"k1"[..], &b"body-1"[..]));
        let b = decode_record(&log[a.len..]).unwrap().unwrap();
        assert_eq!((b.key, b.body), (&b"key-2"[..], &b""[..]));
        assert_eq!(decode_record(&log[a.len + b.len..]), Ok(None));
        assert_eq!(decode_record(&[]), Ok(None));
    }

    #[test]
    fn every_single_bit_flip_in_a_record_is_detected() {
        let rec = record(b"key", b"some value bytes");
        for byte in 0..rec.len() {
            for bit in 0..8 {
                let mut bad = rec.clone();
                bad[byte] ^= 1 << bit;
                bad.extend([0u8; 64]);
                assert!(decode_record(&bad).is_err(), "flip of bit {bit} in byte {byte} went unnoticed");
            }
        }
    }

    #[test]
    fn every_truncation_of_a_record_is_detected() {
        let rec = record(b"key", b"0123456789");
        for cut in 1..rec.len() {
            assert!(decode_record(&rec[..cut]).is_err(), "record cut to {cut} bytes accepted");
        }
    }

    #[test]
    fn hint_keys_round_trip() {
        let k = hint_key("n3", b"user/1");
        assert_eq!(parse_hint_key(&k), Some(("n3", &b"user/1"[..])));
        assert_eq!(parse_hint_key(&[5, b'a']), None);
        assert_eq!(parse_loc_body(&loc_body(7, 4096)), Some((7, 4096)));
    }

    #[test]
    fn alignment_helpers_round_to_blocks() {
        assert_eq!(align_down(4095), 0);
        assert_eq!(align_down(4096), 4096);
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_up(4096), 4096);
        assert_eq!(align_up(0), 0);
    }
}
