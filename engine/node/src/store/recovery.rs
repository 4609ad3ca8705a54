//! Rebuilding a shard's index from its log at start-up.
//!
//! Segments are replayed in id order, records in offset order; a later record
//! of a key replaces an earlier one. The first record that fails its checks
//! ends the valid log. That is expected exactly once, at the tail: a group
//! commit that was cut short by a crash was never acknowledged, so it is
//! dropped and the segment truncated there. Valid records *after* a bad one in
//! a later segment cannot come from a torn tail (segments are flushed in
//! order), so that is reported as corruption and the node refuses to start
//! rather than silently dropping acknowledged data.

use super::format::{
    decode_record, parse_drop_partition_key, parse_hint_key, parse_loc_body, peek_len, FormatError, RecordKind,
    RecordRef, SegmentHeader, HEADER_BYTES, MAX_RECORD_BYTES, RECORD_HEADER_BYTES,
};
use super::hintfile;
use super::index::{Entry, Index, KeyHasher, Loc};
use super::log::open_dma;
use super::segment::{self, segment_path};
use super::StoreError;
use glommio::io::DmaFile;
use ringkv_core::keyspace::partition_of;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

const READ_WINDOW: usize = 1 << 20;

/// What a start-up found and did, for the log and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    /// Segments whose index came from their hint file (no value read).
    pub segments_from_hints: usize,
    /// Segments read record by record, and the bytes that took.
    pub segments_scanned: usize,
    pub bytes_scanned: u64,
    pub records: u64,
    /// Where a torn tail was cut off: segment, offset, bytes dropped, why.
    pub truncated: Option<(u32, u64, u64, String)>,
}

pub struct Recovered {
    pub files: HashMap<u32, Rc<DmaFile>>,
    pub index: Index,
    /// Valid bytes per segment (header included).
    pub ends: HashMap<u32, u64>,
    pub next_segment: u32,
    pub report: RecoveryReport,
}

pub(super) enum ScanEnd {
    Clean { end: u64 },
    Bad { offset: u64, reason: FormatError },
}

/// Reads records from `HEADER_BYTES` on, calling `visit` for each valid one.
pub(super) async fn scan(
    file: &DmaFile,
    id: u32,
    size: u64,
    visit: impl FnMut(&RecordRef<'_>, Loc),
) -> Result<ScanEnd, StoreError> {
    scan_paced(file, id, size, None, visit).await
}

/// [`scan`], reading at most `bytes_per_sec` (a background scan: between
/// windows it sleeps, so the shard serves requests and the disk serves
/// flushes in the meantime instead of after the whole segment).
pub(super) async fn scan_paced(
    file: &DmaFile,
    id: u32,
    size: u64,
    bytes_per_sec: Option<u64>,
    mut visit: impl FnMut(&RecordRef<'_>, Loc),
) -> Result<ScanEnd, StoreError> {
    let mut pace = bytes_per_sec.map(segment::Pace::new);
    let mut pos = HEADER_BYTES;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_off = pos;
    loop {
        let rel = (pos - buf_off) as usize;
        let avail = buf.len() - rel;
        let want = match peek_len(&buf[rel..]) {
            Some(l) if (RECORD_HEADER_BYTES..=MAX_RECORD_BYTES).contains(&l) && pos + l as u64 <= size => l,
            _ => RECORD_HEADER_BYTES,
        };
        let loaded_to = buf_off + buf.len() as u64;
        if avail < want && loaded_to < size {
            buf.drain(..rel);
            buf_off = pos;
            let len = (READ_WINDOW.max(want - avail) as u64).min(size - loaded_to) as usize;
            let from = buf_off + buf.len() as u64;
            let chunk =
                file.read_at(from, len).await.map_err(|e| StoreError::io(format!("reading segment {id}"), e.into()))?;
            if chunk.is_empty() {
                return Err(StoreError::Io(format!("segment {id} ended at {from}, before its size {size}")));
            }
            buf.extend_from_slice(&chunk);
            if let Some(wait) = pace.as_mut().and_then(|p| p.record(chunk.len())) {
                glommio::timer::sleep(wait).await;
            }
            continue;
        }
        match decode_record(&buf[rel..]) {
            Ok(None) => return Ok(ScanEnd::Clean { end: pos }),
            Ok(Some(r)) => {
                let loc = Loc { segment: id, offset: pos as u32, len: r.len as u32 };
                visit(&r, loc);
                pos += r.len as u64;
            }
            Err(reason) => return Ok(ScanEnd::Bad { offset: pos, reason }),
        }
    }
}

async fn read_header(file: &DmaFile, id: u32) -> Result<SegmentHeader, StoreError> {
    let b = file
        .read_at(0, HEADER_BYTES as usize)
        .await
        .map_err(|e| StoreError::io(format!("reading segment {id} header"), e.into()))?;
    SegmentHeader::decode(&b).map_err(|e| StoreError::Corrupt { segment: id, offset: 0, what: e.to_string() })
}

async fn file_size(file: &DmaFile, id: u32) -> Result<u64, StoreError> {
    file.file_size().await.map_err(|e| StoreError::io(format!("sizing segment {id}"), e.into()))
}

/// One record as replay needs it, from a scan or from a hint file.
pub(super) struct Replay<'a> {
    pub kind: RecordKind,
    pub flags: u8,
    pub key: &'a [u8],
    pub body: &'a [u8],
    pub checksum: u64,
}

/// Applies one record to the index being rebuilt (recovery and inspect).
pub(super) fn apply(index: &mut Index, partitions: u32, r: &Replay<'_>, loc: Loc) {
    let deleted = r.flags & super::format::FLAG_DELETED != 0;
    match r.kind {
        RecordKind::Object => {
            index.insert(partition_of(r.key, partitions), r.key, Entry::new(loc, deleted, r.checksum as u32));
        }
        RecordKind::DropPartition => {
            if let Some(p) = parse_drop_partition_key(r.key).filter(|&p| p < partitions) {
                let (segment, offset) = parse_loc_body(r.body).unwrap_or((loc.segment, loc.offset));
                index.drop_partition_before(p, segment, offset);
            }
        }
        RecordKind::Hint => {
            if let Some((target, key)) = parse_hint_key(r.key) {
                index.insert_hint(target, key, Entry::new(loc, deleted, r.checksum as u32));
            }
        }
        RecordKind::HintDone => {
            if let (Some((target, key)), Some((segment, offset))) = (parse_hint_key(r.key), parse_loc_body(r.body)) {
                index.retire_hint(target, key, segment, offset);
            }
        }
        RecordKind::Purge => {
            if let Some((segment, offset)) = parse_loc_body(r.body) {
                index.purge_before(partition_of(r.key, partitions), r.key, segment, offset);
            }
        }
    }
}

/// Replays every segment in `dir` into a fresh index.
pub async fn recover(dir: &Path, shard: u32, partitions: u32, hasher: KeyHasher) -> Result<Recovered, StoreError> {
    let ids = segment::list_segments(dir).map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
    let mut index = Index::new(partitions, hasher);
    let mut files = HashMap::new();
    let mut ends = HashMap::new();
    let mut report = RecoveryReport { segments: ids.len(), ..Default::default() };
    let mut torn: Option<(u32, u64, u64, FormatError)> = None;

    for &id in &ids {
        let path = segment_path(dir, id);
        let file = open_dma(&path).await?;
        let header = read_header(&file, id).await?;
        if header.segment != id || header.shard != shard {
            return Err(StoreError::Corrupt {
                segment: id,
                offset: 0,
                what: format!("header names shard {} segment {}: file is misplaced", header.shard, header.segment),
            });
        }
        let size = file_size(&file, id).await?;
        if let Some((bad_seg, bad_off, _, reason)) = &torn {
            // Past a torn tail only empty segments may follow.
            let mut stray = 0u64;
            scan(&file, id, size, |_, _| stray += 1).await?;
            if stray > 0 {
                return Err(StoreError::Corrupt {
                    segment: *bad_seg,
                    offset: *bad_off,
                    what: format!(
                        "{reason}, and segment {id} after it holds {stray} valid records; \
                         this is damage, not a torn write: inspect the directory with `ringkv inspect`"
                    ),
                });
            }
            continue;
        }
        let mut records = 0u64;
        // A hint file gives the segment's index without reading values. One
        // is written only once its segment can never change again (sealed and
        // flushed, or closed by a clean stop), so a segment with one is whole.
        let d = dir.to_path_buf();
        let hints = glommio::executor().spawn_blocking(move || hintfile::read(&d, id)).await;
        let end = if let Some(entries) = hints {
            report.segments_from_hints += 1;
            let mut end = HEADER_BYTES;
            for e in &entries {
                records += 1;
                let loc = Loc { segment: id, offset: e.offset, len: e.len };
                let r = Replay { kind: e.kind, flags: e.flags, key: &e.key, body: &e.body, checksum: e.checksum };
                apply(&mut index, partitions, &r, loc);
                end = end.max(u64::from(e.offset) + u64::from(e.len));
            }
            ScanEnd::Clean { end }
        } else {
            report.segments_scanned += 1;
            let scanned = scan(&file, id, size, |r, loc| {
                records += 1;
                let r = Replay { kind: r.kind, flags: r.flags, key: r.key, body: r.body, checksum: r.checksum };
                apply(&mut index, partitions, &r, loc);
            })
            .await?;
            report.bytes_scanned += match &scanned {
                ScanEnd::Clean { end } | ScanEnd::Bad { offset: end, .. } => end - HEADER_BYTES,
            };
            scanned
        };
        report.records += records;
        match end {
            ScanEnd::Clean { end } => {
                ends.insert(id, end);
            }
            ScanEnd::Bad { offset, reason } => {
                ends.insert(id, offset);
                torn = Some((id, offset, size - offset, reason));
            }
        }
        files.insert(id, file);
    }

    if let Some((id, offset, _, reason)) = torn {
        // Only the tail is dropped; count what really held data (not the
        // preallocated zeros) for the report.
        let dropped = torn_bytes(&files[&id], id, offset).await?;
        tracing::warn!(shard, segment = id, offset, dropped, %reason, "truncating a torn tail left by a crash");
        let path = segment_path(dir, id);
        glommio::executor()
            .spawn_blocking(move || segment::truncate_segment(&path, offset))
            .await
            .map_err(|e| StoreError::io(format!("truncating segment {id}"), e))?;
        for later in ids.iter().filter(|&&s| s > id) {
            let path = segment_path(dir, *later);
            std::fs::remove_file(&path).map_err(|e| StoreError::io(format!("removing empty segment {later}"), e))?;
        }
        report.truncated = Some((id, offset, dropped, reason.to_string()));
    }
    let step = super::format::SEGMENT_ID_STEP;
    let next_segment = ids.last().map_or(step, |l| (l / step + 1) * step);
    Ok(Recovered { files, index, ends, next_segment, report })
}

/// Bytes from `offset` up to the last non-zero byte within the next few blocks.
async fn torn_bytes(file: &DmaFile, id: u32, offset: u64) -> Result<u64, StoreError> {
    let size = file_size(file, id).await?;
    let len = (size - offset).min(MAX_RECORD_BYTES as u64 + READ_WINDOW as u64) as usize;
    let tail =
        file.read_at(offset, len).await.map_err(|e| StoreError::io(format!("reading segment {id}"), e.into()))?;
    Ok(tail.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1))
}
