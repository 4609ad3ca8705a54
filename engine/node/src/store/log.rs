//! The write side of a shard's log: appends, group commit and rotation.
//!
//! Appends go to an in-memory tail buffer that starts at a block boundary of
//! the active segment. One flusher task writes the buffer with O_DIRECT into
//! a segment opened O_DSYNC, so the write completes once it is durable: one
//! I/O per group commit. Every append made while a flush was in flight rides
//! the next one, so many writers share one write (group commit). When nobody
//! waits for the disk (writes acknowledged without an fsync), appends gather
//! for up to [`LAZY_FLUSH`] first. Waiters are woken in log order once the
//! flush that covers them completes.
//!
//! The partial last block is rewritten by every flush. Its prefix is rewritten
//! with the same bytes it already held, so a write torn at any sector
//! boundary leaves acknowledged records intact.
//!
//! After a failed write or fdatasync the log is poisoned: every waiter and
//! every later append gets the error (retrying an fsync that failed can
//! silently lose data), while reads of what is on disk go on.

use super::format::{self, align_down, align_up, RecordKind, SegmentHeader, HEADER_BYTES};
use super::hintfile::HintEntry;
use super::index::Loc;
use super::segment;
use super::StoreError;
use futures::channel::oneshot;
use glommio::io::{DmaFile, OpenOptions};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

/// The unflushed end of one segment.
struct Tail {
    segment: u32,
    file: Rc<DmaFile>,
    /// File offset of `buf[0]`; always block-aligned.
    base: u64,
    buf: Vec<u8>,
    capacity: u64,
    /// Index entries of every record in the segment: its hint file, once
    /// the segment is sealed and flushed.
    entries: Vec<HintEntry>,
}

impl Tail {
    fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    fn room(&self) -> u64 {
        self.capacity - self.end()
    }

    fn slice(&self, loc: Loc) -> Option<&[u8]> {
        let off = u64::from(loc.offset);
        if off < self.base {
            return None;
        }
        let start = (off - self.base) as usize;
        self.buf.get(start..start + loc.len as usize)
    }

    /// Drops buffered bytes before the block that contains `flushed_end`.
    fn trim(&mut self, flushed_end: u64) {
        let keep_from = align_down(flushed_end).max(self.base);
        self.buf.drain(..(keep_from - self.base) as usize);
        self.base = keep_from;
    }
}

/// A segment created ahead of need, so rotation rarely waits on the disk.
struct Spare {
    segment: u32,
    file: Rc<DmaFile>,
    capacity: u64,
}

/// Where segments go and how big they are.
/// Who is told when a sequence number is durable: a task awaiting a
/// channel, or a callback (no task at all; it runs with no borrow of the
/// log held).
pub enum Waiter {
    Channel(oneshot::Sender<Result<(), StoreError>>),
    Call(Box<dyn FnOnce(Result<(), StoreError>)>),
}

impl Waiter {
    pub fn fire(self, r: Result<(), StoreError>) {
        match self {
            Waiter::Channel(tx) => {
                let _ = tx.send(r);
            }
            Waiter::Call(f) => f(r),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    pub shard: u32,
    pub incarnation: u64,
    pub segment_bytes: u64,
}

pub struct Log {
    cfg: LogConfig,
    files: HashMap<u32, Rc<DmaFile>>,
    /// Bytes of records in each segment (header excluded): what compaction
    /// weighs garbage against.
    sizes: HashMap<u32, u64>,
    active: Tail,
    /// Rotated segments whose last bytes are not yet flushed, oldest first.
    sealing: VecDeque<Tail>,
    spare: Option<Spare>,
    next_segment: u32,
    /// Log sequence numbers count appended bytes since start-up.
    appended: u64,
    durable: u64,
    waiters: VecDeque<(u64, Waiter)>,
    poisoned: Option<StoreError>,
    wake: Option<oneshot::Sender<()>>,
    /// Wakes a flusher that lets appends gather because nobody waits for
    /// the disk: a durability waiter arrived, the tail grew past
    /// [`LAZY_FLUSH_BYTES`], or the log is closing.
    urgent: Option<oneshot::Sender<()>>,
    /// True while a task is creating a segment (spare or for rotation).
    creating: bool,
    /// Set by [`Log::shut_down`]: the flusher drains and exits.
    closing: bool,
    /// Sealed, fully flushed segments whose hint files are still to write.
    ready_hints: Vec<(u32, Vec<HintEntry>)>,
    /// Segments compaction replaced, still readable until they expire.
    retired: HashMap<u32, (Rc<DmaFile>, Instant)>,
    /// Group commits completed: with `appended`, the batch size a
    /// benchmark compares against a raw disk.
    flushes: u64,
}

/// How long appends nobody waits on may gather before the flusher writes
/// them, and how much of them at most: the window in which a write
/// acknowledged without an fsync is still only in memory.
pub const LAZY_FLUSH: std::time::Duration = std::time::Duration::from_millis(2);
pub const LAZY_FLUSH_BYTES: u64 = 256 << 10;

/// Opens a segment file created by [`segment::create_segment`] for DMA.
pub async fn open_dma(path: &Path) -> Result<Rc<DmaFile>, StoreError> {
    open_with(path, 0).await
}

/// Opens a segment the log appends to: O_DSYNC, so a write that completes
/// is on disk, data and the metadata to find it, and a group commit is one
/// I/O rather than a write followed by an fdatasync.
async fn open_for_appends(path: &Path) -> Result<Rc<DmaFile>, StoreError> {
    open_with(path, libc::O_DSYNC).await
}

async fn open_with(path: &Path, flags: i32) -> Result<Rc<DmaFile>, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .dma_open(path)
        .await
        .map(Rc::new)
        .map_err(|e| StoreError::io(format!("opening {}", path.display()), e.into()))
}

/// Creates segment `id` on the blocking pool and opens it.
async fn create(cfg: &LogConfig, id: u32, capacity: u64) -> Result<Rc<DmaFile>, StoreError> {
    let header = SegmentHeader {
        shard: cfg.shard,
        segment: id,
        incarnation: cfg.incarnation,
        created_ms: crate::clock::now_ms(),
    };
    let dir = cfg.dir.clone();
    let path = glommio::executor()
        .spawn_blocking(move || segment::create_segment(&dir, &header, capacity))
        .await
        .map_err(|e| StoreError::io(format!("creating segment {id} in {}", cfg.dir.display()), e))?;
    open_for_appends(&path).await
}

impl Log {
    /// A log that continues after the recovered segments `files`, writing
    /// into a new segment `next_segment`.
    pub async fn start(
        cfg: LogConfig,
        files: HashMap<u32, Rc<DmaFile>>,
        ends: &HashMap<u32, u64>,
        next_segment: u32,
    ) -> Result<Log, StoreError> {
        let capacity = cfg.segment_bytes;
        let file = create(&cfg, next_segment, capacity).await?;
        let mut files = files;
        files.insert(next_segment, file.clone());
        let sizes = ends.iter().map(|(&id, &end)| (id, end.saturating_sub(HEADER_BYTES))).collect();
        Ok(Log {
            cfg,
            files,
            sizes,
            active: Tail {
                segment: next_segment,
                file,
                base: HEADER_BYTES,
                buf: Vec::new(),
                capacity,
                entries: Vec::new(),
            },
            sealing: VecDeque::new(),
            spare: None,
            next_segment: next_segment + format::SEGMENT_ID_STEP,
            appended: 0,
            durable: 0,
            waiters: VecDeque::new(),
            poisoned: None,
            wake: None,
            urgent: None,
            creating: false,
            closing: false,
            ready_hints: Vec::new(),
            retired: HashMap::new(),
            flushes: 0,
        })
    }

    pub fn file(&self, segment: u32) -> Option<Rc<DmaFile>> {
        self.files.get(&segment).or_else(|| self.retired.get(&segment).map(|(f, _)| f)).cloned()
    }

    pub fn segments(&self) -> impl Iterator<Item = u32> + '_ {
        self.files.keys().copied()
    }

    /// Whether a segment other than `except` at or before `segment` may
    /// still be on disk (retired ones count: recovery would replay them).
    pub fn holds_segment_up_to(&self, segment: u32, except: u32) -> bool {
        self.files.keys().chain(self.retired.keys()).any(|&s| s <= segment && s != except)
    }

    pub fn active_segment(&self) -> u32 {
        self.active.segment
    }

    /// Bytes of records in `segment`.
    pub fn segment_size(&self, segment: u32) -> u64 {
        self.sizes.get(&segment).copied().unwrap_or(0)
    }

    /// Segments no longer written to: neither active, nor still flushing,
    /// nor the spare.
    pub fn sealed(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .files
            .keys()
            .copied()
            .filter(|&s| s != self.active.segment)
            .filter(|&s| !self.sealing.iter().any(|t| t.segment == s))
            .filter(|&s| self.spare.as_ref().is_none_or(|sp| sp.segment != s))
            .collect();
        out.sort_unstable();
        out
    }

    /// The lowest unused segment id after `segment` and before the next
    /// segment in log order: where a compaction of `segment` can go.
    pub fn free_id_after(&self, segment: u32) -> Option<u32> {
        let next = self.files.keys().copied().filter(|&s| s > segment).min().unwrap_or(self.next_segment);
        let candidate = segment.checked_add(1)?;
        (candidate < next).then_some(candidate)
    }

    /// Adds a segment written by compaction.
    pub fn install(&mut self, segment: u32, file: Rc<DmaFile>, size: u64) {
        assert!(!self.files.contains_key(&segment), "segment {segment} installed twice");
        self.files.insert(segment, file);
        self.sizes.insert(segment, size);
    }

    /// Drops a segment compaction replaced. It stays readable for readers
    /// that looked it up just before; [`Log::expired`] hands it over for
    /// deletion later.
    pub fn retire(&mut self, segment: u32) {
        assert!(self.sealed().contains(&segment), "only sealed segments are retired");
        let file = self.files.remove(&segment).expect("sealed segments are open");
        self.sizes.remove(&segment);
        self.retired.insert(segment, (file, Instant::now()));
    }

    /// Retired segments older than `grace` (all with `grace` zero), forgotten.
    pub fn expired(&mut self, grace: std::time::Duration) -> Vec<u32> {
        let ids: Vec<u32> = self.retired.iter().filter(|(_, (_, at))| at.elapsed() >= grace).map(|(&s, _)| s).collect();
        for s in &ids {
            self.retired.remove(s);
        }
        ids
    }

    /// Hint files ready to be written: (segment, entries).
    pub fn take_ready_hints(&mut self) -> Vec<(u32, Vec<HintEntry>)> {
        std::mem::take(&mut self.ready_hints)
    }

    /// The active segment's entries, for a hint file at a clean stop (when
    /// everything is flushed and nothing more will be appended).
    pub fn active_entries(&self) -> (u32, Vec<HintEntry>) {
        (self.active.segment, self.active.entries.clone())
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    pub fn shard(&self) -> u32 {
        self.cfg.shard
    }

    pub fn incarnation(&self) -> u64 {
        self.cfg.incarnation
    }

    /// Where the next record will go if it fits in the active segment.
    pub fn next_position(&self) -> (u32, u32) {
        (self.active.segment, u32::try_from(self.active.end()).expect("segments stay under 4 GiB"))
    }

    /// The bytes of a record that is still in a write buffer.
    pub fn buffered(&self, loc: Loc) -> Option<&[u8]> {
        if loc.segment == self.active.segment {
            return self.active.slice(loc);
        }
        self.sealing.iter().find(|t| t.segment == loc.segment).and_then(|t| t.slice(loc))
    }

    pub fn unflushed_bytes(&self) -> u64 {
        self.appended - self.durable
    }

    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// Everything up to here is on disk.
    pub fn durable_lsn(&self) -> u64 {
        self.durable
    }

    pub fn appended_lsn(&self) -> u64 {
        self.appended
    }

    pub fn check_writable(&self) -> Result<(), StoreError> {
        match &self.poisoned {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Appends a record if the active segment has room; `Ok(None)` means the
    /// caller must [`rotate`] first. Returns the record's location, the
    /// sequence number to wait on for durability, and the record's checksum.
    pub fn try_append(
        &mut self,
        kind: RecordKind,
        flags: u8,
        key: &[u8],
        body: &[u8],
    ) -> Result<Option<(Loc, u64, u64)>, StoreError> {
        self.check_writable()?;
        let len = format::record_len(key.len(), body.len());
        if (len as u64) > self.active.room() {
            return Ok(None);
        }
        let offset = self.active.end();
        let start = self.active.buf.len();
        let written = format::encode_record(kind, flags, key, body, &mut self.active.buf);
        debug_assert_eq!(written, len);
        let checksum = format::record_checksum(&self.active.buf[start..]);
        let marker = kind.is_marker();
        self.active.entries.push(HintEntry {
            kind,
            flags,
            key: key.to_vec(),
            offset: offset as u32,
            len: len as u32,
            checksum,
            body: if marker { body.to_vec() } else { Vec::new() },
        });
        self.appended += len as u64;
        *self.sizes.entry(self.active.segment).or_default() += len as u64;
        let loc = Loc {
            segment: self.active.segment,
            offset: u32::try_from(offset).expect("segments stay under 4 GiB"),
            len: len as u32,
        };
        self.kick();
        if self.unflushed_bytes() > LAZY_FLUSH_BYTES {
            self.kick_urgent();
        }
        Ok(Some((loc, self.appended, checksum)))
    }

    /// A future that resolves once everything up to `lsn` is on disk.
    pub fn durable_waiter(&mut self, lsn: u64) -> oneshot::Receiver<Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        if let Some(w) = self.wait(lsn, Waiter::Channel(tx)) {
            w.fire(self.poisoned.clone().map_or(Ok(()), Err));
        }
        rx
    }

    /// Queues `w` until `lsn` is on disk; gives it back when it need not
    /// wait (already durable, or the log is poisoned: the caller fires it,
    /// with no borrow of the log held).
    pub fn wait(&mut self, lsn: u64, w: Waiter) -> Option<Waiter> {
        if self.poisoned.is_some() || lsn <= self.durable {
            return Some(w);
        }
        // Waiters may register out of lsn order (a task can wait later
        // than one that appended after it); keep the queue sorted.
        let at = self.waiters.partition_point(|(l, _)| *l <= lsn);
        self.waiters.insert(at, (lsn, w));
        self.kick_urgent();
        None
    }

    /// Asks the flusher to finish what is appended and exit.
    pub fn shut_down(&mut self) {
        self.closing = true;
        self.kick();
        self.kick_urgent();
    }

    fn kick(&mut self) {
        if let Some(w) = self.wake.take() {
            let _ = w.send(());
        }
    }

    fn kick_urgent(&mut self) {
        if let Some(w) = self.urgent.take() {
            let _ = w.send(());
        }
    }

    /// Whether the flusher may let appends gather: nobody waits for the
    /// disk and the tail is small.
    fn may_gather(&self) -> bool {
        self.waiters.is_empty() && !self.closing && self.unflushed_bytes() <= LAZY_FLUSH_BYTES
    }

    /// Everything up to `lsn` is durable: returns the waiters to fire (by
    /// the caller, once it let go of the log: a callback may append).
    fn complete(&mut self, lsn: u64) -> Vec<Waiter> {
        assert!(lsn >= self.durable, "durability never moves backwards");
        self.durable = lsn;
        self.flushes += 1;
        let ready = self.waiters.partition_point(|(l, _)| *l <= lsn);
        self.waiters.drain(..ready).map(|(_, w)| w).collect()
    }

    /// A write failed: no more writes; returns the waiters to fail.
    fn poison(&mut self, e: StoreError) -> (StoreError, Vec<Waiter>) {
        tracing::error!(shard = self.cfg.shard, error = %e, "log write failed; shard is read-only until restart");
        let e = StoreError::Poisoned(e.to_string());
        self.poisoned = Some(e.clone());
        (e, self.waiters.drain(..).map(|(_, w)| w).collect())
    }
}

/// What [`rotate`] must do next.
enum Rotation {
    Done,
    /// Another task is creating a segment.
    Wait,
    Create {
        cfg: LogConfig,
        id: u32,
        capacity: u64,
    },
}

impl Log {
    /// The synchronous part of rotation: switch to a spare big enough for
    /// `len` bytes if there is one, or claim the right to create a segment.
    fn try_rotate(&mut self, len: usize) -> Result<Rotation, StoreError> {
        self.check_writable()?;
        if (len as u64) <= self.active.room() {
            return Ok(Rotation::Done);
        }
        let need = HEADER_BYTES + len as u64;
        if let Some(spare) = self.spare.take_if(|s| s.capacity >= need) {
            let fresh = Tail {
                segment: spare.segment,
                file: spare.file,
                base: HEADER_BYTES,
                buf: Vec::new(),
                capacity: spare.capacity,
                entries: Vec::new(),
            };
            let mut old = std::mem::replace(&mut self.active, fresh);
            // An empty buffer means everything in the old segment is already
            // durable (its hint file can be written now); otherwise its last
            // bytes still need a flush.
            if old.buf.is_empty() {
                self.ready_hints.push((old.segment, std::mem::take(&mut old.entries)));
            } else {
                self.sealing.push_back(old);
            }
            self.kick();
            return Ok(Rotation::Done);
        }
        if self.creating {
            return Ok(Rotation::Wait);
        }
        self.creating = true;
        let id = self.next_segment;
        self.next_segment += format::SEGMENT_ID_STEP;
        Ok(Rotation::Create { cfg: self.cfg.clone(), id, capacity: self.cfg.segment_bytes.max(align_up(need)) })
    }

    /// Installs a segment created for rotation as the spare, replacing (and
    /// deleting) a spare that was too small.
    fn install_spare(&mut self, spare: Spare) {
        self.files.insert(spare.segment, spare.file.clone());
        if let Some(small) = self.spare.replace(spare) {
            self.files.remove(&small.segment);
            let _ = std::fs::remove_file(segment::segment_path(&self.cfg.dir, small.segment));
        }
    }
}

/// Makes room for a record of `len` bytes by starting a new segment.
pub async fn rotate(log: &std::cell::RefCell<Log>, len: usize) -> Result<(), StoreError> {
    loop {
        let step = log.borrow_mut().try_rotate(len)?;
        match step {
            Rotation::Done => return Ok(()),
            Rotation::Wait => glommio::timer::sleep(std::time::Duration::from_millis(1)).await,
            Rotation::Create { cfg, id, capacity } => {
                let made = create(&cfg, id, capacity).await;
                let mut l = log.borrow_mut();
                l.creating = false;
                l.install_spare(Spare { segment: id, file: made?, capacity });
            }
        }
    }
}

/// Creates the next spare segment if there is none.
pub async fn prepare_spare(log: &std::cell::RefCell<Log>) {
    let (cfg, id) = {
        let mut l = log.borrow_mut();
        if l.spare.is_some() || l.creating || l.poisoned.is_some() {
            return;
        }
        l.creating = true;
        let id = l.next_segment;
        l.next_segment += format::SEGMENT_ID_STEP;
        (l.cfg.clone(), id)
    };
    let made = create(&cfg, id, cfg.segment_bytes).await;
    let mut l = log.borrow_mut();
    l.creating = false;
    match made {
        Ok(file) => l.install_spare(Spare { segment: id, file, capacity: cfg.segment_bytes }),
        Err(e) => {
            tracing::warn!(shard = cfg.shard, error = %e, "could not create a spare segment; will retry on rotation")
        }
    }
}

/// One write of a tail: the file, where, and its bytes already copied into a
/// block-padded DMA buffer (one copy, made while the tail is borrowed).
struct Job {
    segment: u32,
    file: Rc<DmaFile>,
    base: u64,
    len: usize,
    buf: Option<glommio::io::DmaBuffer>,
}

impl Job {
    fn of(t: &Tail) -> Job {
        let buf = (!t.buf.is_empty()).then(|| {
            let mut buf = t.file.alloc_dma_buffer(align_up(t.buf.len() as u64) as usize);
            let dst = buf.as_bytes_mut();
            dst[..t.buf.len()].copy_from_slice(&t.buf);
            dst[t.buf.len()..].fill(0);
            buf
        });
        Job { segment: t.segment, file: t.file.clone(), base: t.base, len: t.buf.len(), buf }
    }

    fn end(&self) -> u64 {
        self.base + self.len as u64
    }

    async fn write(&mut self) -> Result<(), StoreError> {
        if let Some(buf) = self.buf.take() {
            let size = buf.len();
            let n = self
                .file
                .write_at(buf, self.base)
                .await
                .map_err(|e| StoreError::io(format!("writing segment {}", self.segment), e.into()))?;
            if n != size {
                return Err(StoreError::Io(format!("short write to segment {}: {n} of {size} bytes", self.segment)));
            }
            // Segments the log appends to are O_DSYNC: the write is durable.
            return Ok(());
        }
        self.file.fdatasync().await.map_err(|e| StoreError::io(format!("syncing segment {}", self.segment), e.into()))
    }
}

/// The group-commit loop; runs until the log is dropped by the store.
pub async fn run_flusher(log: Rc<std::cell::RefCell<Log>>) {
    loop {
        let idle = {
            let mut l = log.borrow_mut();
            if l.poisoned.is_some() {
                return;
            }
            if l.appended > l.durable {
                None
            } else if l.closing {
                return;
            } else {
                let (tx, rx) = oneshot::channel();
                l.wake = Some(tx);
                Some(rx)
            }
        };
        if let Some(rx) = idle {
            if rx.await.is_err() {
                return;
            }
            continue;
        }
        // Appends nobody waits on (acknowledged without an fsync) gather
        // for a moment and share one I/O; a durability waiter, a big tail
        // or shutdown ends the wait at once.
        let gather = {
            let mut l = log.borrow_mut();
            l.may_gather().then(|| {
                let (tx, rx) = oneshot::channel();
                l.urgent = Some(tx);
                rx
            })
        };
        if let Some(rx) = gather {
            let timer = glommio::timer::Timer::new(LAZY_FLUSH);
            futures::future::select(Box::pin(timer), rx).await;
            log.borrow_mut().urgent = None;
        }
        if let Err(e) = flush_once(&log).await {
            let (e, waiters) = log.borrow_mut().poison(e);
            for w in waiters {
                w.fire(Err(e.clone()));
            }
            return;
        }
    }
}

async fn flush_once(log: &std::cell::RefCell<Log>) -> Result<(), StoreError> {
    let target = log.borrow().appended;
    // Sealed segments first, so the log on disk never has a hole before data
    // that is already durable.
    loop {
        let job = log.borrow().sealing.front().map(Job::of);
        let Some(mut job) = job else { break };
        job.write().await?;
        let mut l = log.borrow_mut();
        let mut done = l.sealing.pop_front().expect("sealing tail still queued");
        assert_eq!(done.segment, job.segment);
        assert_eq!(done.end(), job.end(), "no appends go to a sealed segment");
        l.ready_hints.push((done.segment, std::mem::take(&mut done.entries)));
    }
    let mut job = Job::of(&log.borrow().active);
    job.write().await?;
    let ready = {
        let mut l = log.borrow_mut();
        if l.active.segment == job.segment {
            l.active.trim(job.end());
        } else if let Some(t) = l.sealing.iter_mut().find(|t| t.segment == job.segment) {
            t.trim(job.end());
        }
        l.complete(target)
    };
    for w in ready {
        w.fire(Ok(()));
    }
    Ok(())
}

/// Flushes everything appended so far.
pub async fn flush_all(log: &std::cell::RefCell<Log>) -> Result<(), StoreError> {
    let rx = {
        let mut l = log.borrow_mut();
        let lsn = l.appended;
        l.kick();
        l.durable_waiter(lsn)
    };
    rx.await.unwrap_or(Err(StoreError::Closed))
}
