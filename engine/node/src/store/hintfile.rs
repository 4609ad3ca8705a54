//! Hint files: a sealed segment's index entries, so a restart rebuilds the
//! index without reading a single value.
//!
//! `NNNNNNNNNN.hint` sits beside `NNNNNNNNNN.seg` and lists, in log order,
//! every record of the segment with what recovery needs: kind, flags, key,
//! position, length, checksum, and the small body of marker records. The
//! file ends with an xxh3-64 of all that precedes it; recovery uses a hint
//! file only if it is whole and names its segment, and otherwise scans the
//! segment itself. Hint files are written once a segment will never change
//! again: when its last bytes are flushed, or as a compaction output.
//!
//! Layout (little-endian):
//! ```text
//! magic "RKVHINT1" 8 | segment u32 | count u32
//! count x { kind u8 | flags u8 | key_len u16 | offset u32 | len u32 | checksum u64 | body_len u16 | key | body }
//! xxh3-64 of all bytes above, 8
//! ```

use super::format::{decode_record, RecordKind, RecordRef};
use super::segment::fsync_dir;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 8] = b"RKVHINT1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintEntry {
    pub kind: RecordKind,
    pub flags: u8,
    pub key: Vec<u8>,
    pub offset: u32,
    pub len: u32,
    pub checksum: u64,
    /// Only marker records (drops, hint retirements) keep their body.
    pub body: Vec<u8>,
}

impl HintEntry {
    pub fn of(r: &RecordRef<'_>, offset: u32) -> HintEntry {
        let body = if r.kind.is_marker() { r.body.to_vec() } else { Vec::new() };
        HintEntry {
            kind: r.kind,
            flags: r.flags,
            key: r.key.to_vec(),
            offset,
            len: r.len as u32,
            checksum: r.checksum,
            body,
        }
    }
}

/// Entries of the records packed in `bytes`, which start at file offset `start`.
pub fn entries_of(bytes: &[u8], start: u64) -> Vec<HintEntry> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while let Ok(Some(r)) = decode_record(&bytes[pos..]) {
        out.push(HintEntry::of(&r, (start + pos as u64) as u32));
        pos += r.len;
    }
    out
}

pub fn path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:010}.hint"))
}

pub fn encode(segment: u32, entries: &[HintEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * 40);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&segment.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.push(e.kind as u8);
        out.push(e.flags);
        out.extend_from_slice(&(e.key.len() as u16).to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.checksum.to_le_bytes());
        out.extend_from_slice(&(e.body.len() as u16).to_le_bytes());
        out.extend_from_slice(&e.key);
        out.extend_from_slice(&e.body);
    }
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The entries of a hint file for `segment`, or `None` if it is not whole.
pub fn decode(bytes: &[u8], segment: u32) -> Option<Vec<HintEntry>> {
    let (data, sum) = bytes.split_at_checked(bytes.len().checked_sub(8)?)?;
    if u64::from_le_bytes(sum.try_into().ok()?) != xxh3_64(data) || data.get(..8)? != MAGIC {
        return None;
    }
    let mut r = ringkv_core::codec::Reader::new(&data[8..]);
    if r.u32_le().ok()? != segment {
        return None;
    }
    let count = r.u32_le().ok()? as usize;
    let mut out = Vec::with_capacity(count.min(data.len() / 24));
    for _ in 0..count {
        let kind = RecordKind::from_u8(r.u8().ok()?)?;
        let flags = r.u8().ok()?;
        let key_len = usize::from(r.u16_le().ok()?);
        let offset = r.u32_le().ok()?;
        let len = r.u32_le().ok()?;
        let checksum = r.u64_le().ok()?;
        let body_len = usize::from(r.u16_le().ok()?);
        let key = r.bytes(key_len).ok()?.to_vec();
        let body = r.bytes(body_len).ok()?.to_vec();
        out.push(HintEntry { kind, flags, key, offset, len, checksum, body });
    }
    r.is_empty().then_some(out)
}

/// Writes the hint file of `segment` atomically. Blocking.
pub fn write(dir: &Path, segment: u32, entries: &[HintEntry]) -> io::Result<()> {
    let final_path = path(dir, segment);
    let tmp = final_path.with_extension("hint.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&encode(segment, entries))?;
    f.sync_all()?;
    std::fs::rename(&tmp, &final_path)?;
    fsync_dir(dir)
}

/// The hint file of `segment`, if there is a whole one. Blocking.
pub fn read(dir: &Path, segment: u32) -> Option<Vec<HintEntry>> {
    let bytes = std::fs::read(path(dir, segment)).ok()?;
    let out = decode(&bytes, segment);
    if out.is_none() {
        tracing::warn!(segment, "ignoring a damaged hint file; scanning the segment instead");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::{encode_record, HEADER_BYTES};

    #[test]
    fn hint_files_round_trip_and_reject_damage() {
        let mut body = Vec::new();
        encode_record(RecordKind::Object, 0, b"a", b"object-1", &mut body);
        encode_record(RecordKind::DropPartition, 0, &7u32.to_le_bytes(), &[1, 2, 3, 4, 5, 6, 7, 8], &mut body);
        let entries = entries_of(&body, HEADER_BYTES);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].offset as u64, HEADER_BYTES);
        assert!(entries[0].body.is_empty(), "values are not copied into hint files");
        assert_eq!(entries[1].body.len(), 8);
        let bytes = encode(42, &entries);
        assert_eq!(decode(&bytes, 42).unwrap(), entries);
        assert_eq!(decode(&bytes, 43), None, "a hint file names its segment");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert_eq!(decode(&bad, 42), None, "flip at {i} accepted");
        }
        assert_eq!(decode(&bytes[..bytes.len() - 1], 42), None);
    }
}
