//! Segment files on disk: naming, creation and listing.
//!
//! A segment is created whole or not at all: its header is written to a
//! temporary file, the file is preallocated to its full capacity and synced,
//! then renamed into place and the directory synced. So a segment file that
//! exists always has a valid header, and because space is reserved up front a
//! full disk surfaces when a segment is created, before any record is
//! accepted into it, never in the middle of a group commit.
//!
//! A whole segment written in the background (a compaction's output) is
//! written back to the disk a piece at a time, each piece waited for and
//! paced to the compaction rate, before the final sync: the device's queue
//! then never holds more than one piece of it, so a durable write's group
//! commit on the same disk waits behind at most [`WRITEBACK_PIECE`] bytes
//! rather than the whole segment.
//!
//! These functions block; the store runs them on glommio's blocking pool.

use super::format::{SegmentHeader, HEADER_BYTES};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const SUFFIX: &str = ".seg";

/// How much of a background segment write goes to the disk at once.
pub const WRITEBACK_PIECE: usize = 1 << 20;

pub fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}{SUFFIX}"))
}

/// Segment ids present in `dir`, sorted. Leftover temporary files from a
/// creation interrupted by a crash are removed.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".seg.tmp") || name.ends_with(".hint.tmp") {
            fs::remove_file(entry.path())?;
        } else if let Some(id) = name.strip_suffix(SUFFIX).and_then(|s| s.parse::<u32>().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates segment `header.segment` in `dir` with room for `capacity` bytes.
pub fn create_segment(dir: &Path, header: &SegmentHeader, capacity: u64) -> io::Result<PathBuf> {
    assert!(capacity > HEADER_BYTES);
    let path = segment_path(dir, header.segment);
    let tmp = path.with_extension("seg.tmp");
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
        f.write_all(&header.encode())?;
        preallocate(&f, capacity)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

/// Reserves `len` bytes for `f` so later writes cannot fail for lack of space.
fn preallocate(f: &File, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only reads the descriptor and integers.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // File systems without fallocate: fall back to a sized (sparse) file.
        Some(libc::EOPNOTSUPP) => f.set_len(len),
        _ => Err(err),
    }
}

/// Writes a complete segment (a compaction output) in one go: header and
/// records to a temporary file, synced, then renamed into place and the
/// directory synced. With `stop_before_rename` (tests) it leaves the
/// temporary file as a crash at that point would.
pub fn write_whole_segment(
    dir: &Path,
    header: &SegmentHeader,
    records: &[u8],
    stop_before_rename: bool,
    bytes_per_sec: Option<u64>,
) -> io::Result<()> {
    let path = segment_path(dir, header.segment);
    let tmp = path.with_extension("seg.tmp");
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
    f.write_all(&header.encode())?;
    write_back_in_pieces(&f, records, HEADER_BYTES, bytes_per_sec)?;
    f.sync_all()?;
    if stop_before_rename {
        return Ok(());
    }
    fs::rename(&tmp, &path)?;
    fsync_dir(dir)
}

/// Writes `bytes` at `at` and waits for each [`WRITEBACK_PIECE`] of them to
/// reach the device before writing the next (module doc), at most
/// `bytes_per_sec` (sleeping between pieces: this runs on a blocking
/// thread). Not durable by itself: metadata and the device's cache need the
/// caller's sync.
fn write_back_in_pieces(f: &File, bytes: &[u8], at: u64, bytes_per_sec: Option<u64>) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut pace = bytes_per_sec.map(Pace::new);
    let (mut off, mut previous) = (at, 0);
    for piece in bytes.chunks(WRITEBACK_PIECE) {
        // The wait for the piece before this one (none after the last).
        if let Some(wait) = pace.as_mut().and_then(|p| p.record(previous)) {
            std::thread::sleep(wait);
        }
        f.write_all_at(piece, off)?;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: sync_file_range only reads the descriptor and integers.
        if unsafe { libc::sync_file_range(f.as_raw_fd(), off as libc::off64_t, piece.len() as libc::off64_t, flags) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        off += piece.len() as u64;
        previous = piece.len();
    }
    Ok(())
}

/// Holds a background job (a compaction's scan or its output) to a byte
/// rate: [`Pace::record`] says how long to wait so that the bytes done so
/// far would have taken that long at the rate.
pub(super) struct Pace {
    bytes_per_sec: u64,
    start: std::time::Instant,
    bytes: u64,
}

impl Pace {
    pub(super) fn new(bytes_per_sec: u64) -> Pace {
        Pace { bytes_per_sec: bytes_per_sec.max(1), start: std::time::Instant::now(), bytes: 0 }
    }

    /// Counts `bytes` more done; the wait due now, if any.
    pub(super) fn record(&mut self, bytes: usize) -> Option<std::time::Duration> {
        self.bytes += bytes as u64;
        let due = self.start + std::time::Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec as f64);
        due.checked_duration_since(std::time::Instant::now())
    }
}

/// Cuts a segment to `len` bytes (dropping a torn tail or unused space) and
/// makes that durable.
pub fn truncate_segment(path: &Path, len: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_segment_has_its_header_and_full_size() {
        let dir = tempfile::tempdir().unwrap();
        let h = SegmentHeader { shard: 0, segment: 7, incarnation: 1, created_ms: 2 };
        let path = create_segment(dir.path(), &h, 1 << 20).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 20);
        let bytes = fs::read(&path).unwrap();
        assert_eq!(SegmentHeader::decode(&bytes).unwrap(), h);
        assert_eq!(list_segments(dir.path()).unwrap(), vec![7]);
        assert!(create_segment(dir.path(), &h, 1 << 20).is_err() || list_segments(dir.path()).unwrap() == vec![7]);
    }

    #[test]
    fn a_whole_segment_written_in_pieces_holds_every_byte_after_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let h = SegmentHeader { shard: 1, segment: 9, incarnation: 3, created_ms: 4 };
        // Two and a half pieces: the last one partial.
        let records: Vec<u8> = (0..WRITEBACK_PIECE * 5 / 2).map(|i| (i % 251) as u8).collect();
        write_whole_segment(dir.path(), &h, &records, false, None).unwrap();
        let bytes = fs::read(segment_path(dir.path(), 9)).unwrap();
        assert_eq!(SegmentHeader::decode(&bytes).unwrap(), h);
        assert_eq!(bytes.len() as u64, HEADER_BYTES + records.len() as u64);
        assert!(bytes[HEADER_BYTES as usize..] == records[..], "the records follow the header unchanged");
    }

    #[test]
    fn leftover_temporary_files_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("0000000003.seg.tmp"), b"partial").unwrap();
        fs::write(dir.path().join("0000000002.seg"), b"x").unwrap();
        fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), vec![2]);
        assert!(!dir.path().join("0000000003.seg.tmp").exists());
    }
}
