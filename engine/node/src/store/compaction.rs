//! Compaction: rewriting a sealed segment's live records into a smaller one.
//!
//! Log order is what recovery trusts (a later record of a key replaces an
//! earlier one), so compaction must never reorder what matters. It doesn't:
//! - only records the index still points to (the latest of their key) and
//!   the markers that still mean something are copied, byte for byte;
//! - the output gets the first free segment id right after its input (the
//!   log spaces its own ids `SEGMENT_ID_STEP` apart), so it replays in the
//!   input's place, before anything written later. A record copied there and
//!   then overwritten before the index swap stays as harmless garbage;
//! - a partition drop carries its boundary, so moving it changes nothing.
//!
//! Crash safety, step by step: the output is written to a temporary file,
//! synced, renamed into place and the directory synced; only then does the
//! index move (records that changed meanwhile stay where they are), and only
//! then is the input retired. A crash before the rename leaves a temporary
//! file recovery deletes; after it, input and output both exist and replay
//! to the same index (the copies are identical), and the next compaction
//! removes the input. Retired inputs stay readable for a grace period, for
//! readers that looked their location up just before the swap.

use super::format::{self, parse_hint_key, parse_loc_body, RecordKind, SegmentHeader, HEADER_BYTES};
use super::index::Loc;
use super::recovery::{scan_paced, ScanEnd};
use super::{hintfile, log, segment, Store, StoreError};
use ringkv_core::keyspace::partition_of;
use std::time::Duration;

/// What one compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compacted {
    pub input: u32,
    pub output: Option<u32>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub records_kept: u64,
    /// Records copied but written again before the swap (garbage at once).
    pub records_raced: u64,
}

/// Where a test wants compaction to stop, as if the process died there.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The output is written but not yet renamed into place.
    BeforeRename,
    /// The output is in place; the index has not moved and the input exists.
    AfterRename,
}

/// A live record to carry over: its bytes, and where it came from.
struct Carried {
    kind: RecordKind,
    key: Vec<u8>,
    from: u32,
    bytes: Vec<u8>,
}

/// Compacts `segment` into the free id after it. `None` when there is no
/// room in the id space there (an old layout with adjacent ids).
pub async fn compact(store: &Store, segment: u32) -> Result<Option<Compacted>, StoreError> {
    compact_until(store, segment, None).await
}

/// [`compact`], reading and writing at most `bytes_per_sec` between them
/// (the background pass: see [`pass`]).
pub async fn compact_paced(
    store: &Store,
    segment: u32,
    bytes_per_sec: Option<u64>,
) -> Result<Option<Compacted>, StoreError> {
    compact_inner(store, segment, None, bytes_per_sec).await
}

#[doc(hidden)]
pub async fn compact_until(
    store: &Store,
    segment: u32,
    crash: Option<CrashPoint>,
) -> Result<Option<Compacted>, StoreError> {
    compact_inner(store, segment, crash, None).await
}

async fn compact_inner(
    store: &Store,
    segment: u32,
    crash: Option<CrashPoint>,
    bytes_per_sec: Option<u64>,
) -> Result<Option<Compacted>, StoreError> {
    let (file, out_id, dir, shard, incarnation) = {
        let l = store.log.borrow();
        if !l.sealed().contains(&segment) {
            return Ok(None);
        }
        let Some(out_id) = l.free_id_after(segment) else { return Ok(None) };
        let Some(file) = l.file(segment) else { return Ok(None) };
        (file, out_id, l.dir().to_path_buf(), l.shard(), l.incarnation())
    };
    let size = file.file_size().await.map_err(|e| StoreError::io(format!("sizing segment {segment}"), e.into()))?;
    let q = store.cfg.partitions;

    // 1. Collect what is still needed, as of now.
    let mut carried: Vec<Carried> = Vec::new();
    let mut bytes_in = 0u64;
    let end = scan_paced(&file, segment, size, bytes_per_sec, |r, loc| {
        bytes_in += r.len as u64;
        let ix = store.index.borrow();
        let keep = match r.kind {
            RecordKind::Object => ix.points_at(partition_of(r.key, q), r.key, loc.segment, loc.offset),
            RecordKind::Hint => parse_hint_key(r.key).is_some_and(|(target, key)| {
                ix.hints
                    .get(target, key)
                    .is_some_and(|e| (e.loc().segment, e.loc().offset) == (loc.segment, loc.offset))
            }),
            // Still meaningful while the hint it retires may be replayed.
            RecordKind::HintDone => parse_loc_body(r.body).is_some_and(|(s, _)| store.log.borrow().file(s).is_some()),
            RecordKind::DropPartition => true,
            // Still needed while a segment that may hold an older record of
            // the key exists (one at or before the purged tombstone's).
            RecordKind::Purge => {
                parse_loc_body(r.body).is_none_or(|(s, _)| store.log.borrow().holds_segment_up_to(s, segment))
            }
        };
        if !keep {
            return;
        }
        let bytes = if r.kind == RecordKind::DropPartition && r.body.is_empty() {
            // A drop from before boundaries were explicit: pin its boundary
            // to where it was, or it would mean something else where it goes.
            let mut out = Vec::new();
            format::encode_record(
                RecordKind::DropPartition,
                r.flags,
                r.key,
                &format::loc_body(loc.segment, loc.offset),
                &mut out,
            );
            out
        } else {
            r.raw.to_vec()
        };
        carried.push(Carried { kind: r.kind, key: r.key.to_vec(), from: loc.offset, bytes });
    })
    .await?;
    if let ScanEnd::Bad { offset, reason } = end {
        return Err(StoreError::Corrupt { segment, offset, what: format!("found while compacting: {reason}") });
    }

    // 2. Write the output next to the input.
    let mut result = Compacted { input: segment, bytes_in, records_kept: carried.len() as u64, ..Default::default() };
    let mut new_locs = Vec::with_capacity(carried.len());
    let mut body = Vec::new();
    for c in &carried {
        new_locs.push(Loc {
            segment: out_id,
            offset: (HEADER_BYTES + body.len() as u64) as u32,
            len: c.bytes.len() as u32,
        });
        body.extend_from_slice(&c.bytes);
    }
    if !carried.is_empty() {
        result.output = Some(out_id);
        result.bytes_out = body.len() as u64;
        let header = SegmentHeader { shard, segment: out_id, incarnation, created_ms: crate::clock::now_ms() };
        let hints = hintfile::entries_of(&body, HEADER_BYTES);
        let (dir2, stop_before_rename) = (dir.clone(), crash == Some(CrashPoint::BeforeRename));
        glommio::executor()
            .spawn_blocking(move || -> std::io::Result<()> {
                segment::write_whole_segment(&dir2, &header, &body, stop_before_rename, bytes_per_sec)?;
                if !stop_before_rename {
                    hintfile::write(&dir2, out_id, &hints)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| StoreError::io(format!("writing compacted segment {out_id}"), e))?;
        if crash == Some(CrashPoint::BeforeRename) {
            return Ok(Some(result));
        }
        let out_file = log::open_dma(&segment::segment_path(&dir, out_id)).await?;
        store.log.borrow_mut().install(out_id, out_file, result.bytes_out);
    }
    if crash == Some(CrashPoint::AfterRename) {
        return Ok(Some(result));
    }

    // 3. Move the index, key by key, only where nothing newer came meanwhile
    //    (no await in this loop: it is atomic for the shard).
    {
        let mut ix = store.index.borrow_mut();
        for (c, to) in carried.iter().zip(&new_locs) {
            let moved = match c.kind {
                RecordKind::Object => ix.relocate(partition_of(&c.key, q), &c.key, segment, c.from, *to),
                RecordKind::Hint => match parse_hint_key(&c.key) {
                    Some((target, key)) => ix.relocate_hint(target, key, segment, c.from, *to),
                    None => false,
                },
                RecordKind::HintDone | RecordKind::DropPartition | RecordKind::Purge => true,
            };
            if !moved {
                result.records_raced += 1;
            }
        }
    }

    // 4. Retire the input.
    store.log.borrow_mut().retire(segment);
    store.index.borrow_mut().forget_segment(segment);
    drop(file);
    Ok(Some(result))
}

/// Segments worth compacting now, most garbage first: sealed, with at least
/// `garbage_ratio` of their bytes dead, or empty.
pub fn candidates(store: &Store, garbage_ratio: f64) -> Vec<u32> {
    let log = store.log.borrow();
    let ix = store.index.borrow();
    let mut c: Vec<(f64, u32)> = log
        .sealed()
        .into_iter()
        .filter_map(|s| {
            let size = log.segment_size(s);
            let live = ix.live_bytes(s);
            let garbage = if size == 0 { 1.0 } else { 1.0 - live as f64 / size as f64 };
            (garbage >= garbage_ratio).then_some((garbage, s))
        })
        .collect();
    c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    c.into_iter().map(|(_, s)| s).collect()
}

/// How long a retired segment stays readable after compaction replaced it.
pub const RETIRED_GRACE: Duration = Duration::from_secs(30);

/// Settings of the background compactor.
#[derive(Debug, Clone, Copy)]
pub struct CompactionConfig {
    pub interval: Duration,
    /// Share of a segment's bytes that must be garbage before it is rewritten.
    pub garbage_ratio: f64,
    /// Bytes read and written per second at most, so foreground requests
    /// keep the disk.
    pub bytes_per_sec: u64,
}

/// Compacts every segment worth it now, most garbage first, until the store
/// closes. With `bytes_per_sec`, each segment is read and its output written
/// at that rate (reads and writes follow each other, so together they stay
/// under it), a window at a time: the shard and the disk serve requests
/// between windows instead of after a whole segment (unpaced, a 64 MiB
/// segment took 250 ms of scanning and 110 ms of writing on this project's
/// VM, and the requests of every node on that core waited it out). Stops
/// at the first failure.
pub async fn pass(store: &Store, garbage_ratio: f64, bytes_per_sec: Option<u64>) -> Result<Vec<Compacted>, StoreError> {
    let mut out = Vec::new();
    for s in candidates(store, garbage_ratio) {
        if store.is_closing() {
            break;
        }
        let started = std::time::Instant::now();
        let Some(done) = compact_paced(store, s, bytes_per_sec).await? else { continue };
        // At info: compaction competes with requests for the disk and the
        // core, so when it ran and for how long is what explains a tail.
        tracing::info!(
            segment = s,
            output = ?done.output,
            mib_in = done.bytes_in >> 20,
            mib_out = done.bytes_out >> 20,
            ms = started.elapsed().as_millis() as u64,
            "compacted a segment"
        );
        store.note_compaction(&done);
        out.push(done);
    }
    Ok(out)
}

/// Compacts segments in the background until the store closes.
pub async fn run(store: std::rc::Rc<Store>, cfg: CompactionConfig) {
    loop {
        glommio::timer::sleep(cfg.interval).await;
        if store.is_closing() {
            return;
        }
        store.write_ready_hints().await;
        store.delete_retired(RETIRED_GRACE).await;
        if let Err(e) = pass(&store, cfg.garbage_ratio, Some(cfg.bytes_per_sec)).await {
            tracing::warn!(error = %e, "compaction failed; will retry");
        }
    }
}
