//! Offline verification of a data directory (`ringkv inspect DIR`).
//!
//! Reads, never writes: every segment's header and every record's checksum,
//! each hint file against the segment it describes, and the live and garbage
//! bytes of every segment, found by replaying the log through the same code
//! recovery uses. Plain blocking file reads: it runs on a stopped node's
//! directory without glommio.

use super::format::{decode_record, FormatError, SegmentHeader, HEADER_BYTES};
use super::hintfile::{self, HintEntry};
use super::index::{Index, KeyHasher, Loc};
use super::recovery::{apply, Replay};
use crate::datadir::Meta;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HintStatus {
    Missing,
    Matches,
    /// Present but wrong: damaged, or not describing its segment.
    Wrong(String),
}

#[derive(Debug, Clone)]
pub struct SegmentReport {
    pub id: u32,
    pub records: u64,
    /// Bytes of records (header excluded).
    pub bytes: u64,
    pub live_bytes: u64,
    pub hint: HintStatus,
    /// A torn tail: bytes after the last whole record that the next start
    /// will cut off (normal after a crash, in the newest segment only).
    pub torn_tail: Option<(u64, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct ShardReport {
    pub shard: usize,
    pub segments: Vec<SegmentReport>,
    pub keys: u64,
    pub tombstones: u64,
    pub hints: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub node_id: String,
    pub partitions: u32,
    pub shards: Vec<ShardReport>,
    /// Damage: anything that is not what ringkv wrote.
    pub problems: Vec<String>,
    pub bytes_read: u64,
}

impl Report {
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Bytes `inspect` will read, for a progress bar.
pub fn total_bytes(root: &Path) -> u64 {
    shard_dirs(root)
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn shard_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// Segment ids in a shard directory, read-only (temporary files are
/// reported, not removed).
fn segment_ids(dir: &Path, problems: &mut Vec<String>) -> Vec<u32> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_suffix(".seg").and_then(|s| s.parse().ok()) {
            ids.push(id);
        } else if name.ends_with(".tmp") {
            problems.push(format!("{}: leftover temporary file (the next start removes it)", e.path().display()));
        }
    }
    ids.sort_unstable();
    ids
}

/// Verifies the data directory at `root`; `progress` gets bytes as read.
pub fn inspect(root: &Path, progress: &mut dyn FnMut(u64)) -> Result<Report, String> {
    let meta_path = root.join("ringkv.meta");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    let meta: Meta = toml::from_str(&text).map_err(|e| format!("{}: {}", meta_path.display(), e.message()))?;
    let mut report = Report { node_id: meta.node_id.clone(), partitions: meta.partitions, ..Default::default() };
    for (shard, dir) in shard_dirs(root).into_iter().enumerate() {
        let r = inspect_shard(shard, &dir, meta.partitions, &mut report, progress)?;
        report.shards.push(r);
    }
    if report.shards.len() != meta.shards {
        report.problems.push(format!(
            "{} shard directories, but the node was created with {}",
            report.shards.len(),
            meta.shards
        ));
    }
    Ok(report)
}

fn inspect_shard(
    shard: usize,
    dir: &Path,
    partitions: u32,
    report: &mut Report,
    progress: &mut dyn FnMut(u64),
) -> Result<ShardReport, String> {
    let ids = segment_ids(dir, &mut report.problems);
    let mut index = Index::new(partitions, KeyHasher::new(0));
    let mut segments = Vec::with_capacity(ids.len());
    let mut torn_at: Option<(u32, u64)> = None;
    for &id in &ids {
        let path = super::segment::segment_path(dir, id);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        report.bytes_read += bytes.len() as u64;
        progress(bytes.len() as u64);
        let name = path.display().to_string();
        match SegmentHeader::decode(&bytes) {
            Ok(h) if h.segment == id && h.shard as usize == shard => {}
            Ok(h) => report.problems.push(format!("{name}: header names shard {} segment {}", h.shard, h.segment)),
            Err(e) => {
                report.problems.push(format!("{name}: {e}"));
                continue;
            }
        }
        let mut seg =
            SegmentReport { id, records: 0, bytes: 0, live_bytes: 0, hint: HintStatus::Missing, torn_tail: None };
        let mut entries: Vec<HintEntry> = Vec::new();
        let mut pos = HEADER_BYTES as usize;
        let end_error: Option<FormatError> = loop {
            match decode_record(&bytes[pos.min(bytes.len())..]) {
                Ok(None) => break None,
                Ok(Some(r)) => {
                    if let Some((torn_seg, off)) = torn_at {
                        report.problems.push(format!(
                            "{name}: valid records after a bad record in segment {torn_seg} at offset {off}: damage, not a torn write"
                        ));
                        torn_at = None;
                    }
                    let loc = Loc { segment: id, offset: pos as u32, len: r.len as u32 };
                    let rep = Replay { kind: r.kind, flags: r.flags, key: r.key, body: r.body, checksum: r.checksum };
                    apply(&mut index, partitions, &rep, loc);
                    entries.push(HintEntry::of(&r, pos as u32));
                    seg.records += 1;
                    seg.bytes += r.len as u64;
                    pos += r.len;
                }
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = end_error {
            let rest = &bytes[pos..];
            let dropped = rest.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1);
            seg.torn_tail = Some((dropped, format!("{e} at offset {pos}")));
            torn_at = Some((id, pos as u64));
        }
        seg.hint = match std::fs::read(hintfile::path(dir, id)) {
            Err(_) => HintStatus::Missing,
            Ok(h) => match hintfile::decode(&h, id) {
                None => HintStatus::Wrong("damaged or not this segment's".into()),
                Some(hinted) if hinted == entries => HintStatus::Matches,
                Some(hinted) => {
                    HintStatus::Wrong(format!("lists {} records, the segment holds {}", hinted.len(), entries.len()))
                }
            },
        };
        if let HintStatus::Wrong(why) = &seg.hint {
            report.problems.push(format!("{name}: hint file {why}"));
        }
        segments.push(seg);
    }
    // A bad record with nothing valid after it is a torn tail (reported in
    // its segment, not a problem); with valid records after it, the loop
    // above has already reported damage.
    for seg in &mut segments {
        seg.live_bytes = index.live_bytes(seg.id);
    }
    let counts = index.counts();
    Ok(ShardReport { shard, segments, keys: counts.live, tombstones: counts.deleted, hints: index.hints.count() })
}
