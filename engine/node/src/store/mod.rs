//! One shard's log-structured store (Bitcask-like), on glommio DMA files.
//!
//! Writes append a record holding the key's whole new [`Object`] to the log
//! and point the in-memory [`index::Index`] at it; reads follow the index to
//! one record. A write computes its object from the current one
//! (read-modify-write); the index entry it started from is checked again,
//! with no await in between, right before the append, so concurrent writes to
//! a key on this shard serialise and a dot is never minted twice.
//!
//! Layout: `format` (bytes on disk), `segment` (files), `log` (appends and
//! group commit), `recovery` (start-up replay), `index`, `cache`, `epoch`.

pub mod cache;
pub mod compaction;
pub mod epoch;
pub mod format;
pub mod hintfile;
pub mod index;
pub mod inspect;
pub mod log;
pub mod recovery;
pub mod segment;

use self::cache::RecordCache;
use self::epoch::Epochs;
use self::format::{decode_record, RecordKind, FLAG_DELETED};
use self::index::{Entry, Index, KeyHasher, Loc};
use self::log::{Log, LogConfig};
use self::recovery::RecoveryReport;
use ringkv_core::effects::RecordId;
pub use ringkv_core::effects::WriteContext;
use ringkv_core::keyspace::partition_of;
use ringkv_core::version::{reusable_actor, Actor, Object, VersionVector};
use std::cell::{Cell, RefCell};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use thiserror::Error;

/// Errors of the storage layer; `Clone` so one failed flush can fail every
/// waiter.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    #[error("no space left on device: {0}")]
    NoSpace(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("store is read-only after a failed write ({0}); restart the node")]
    Poisoned(String),
    #[error("corrupt data in segment {segment} at offset {offset}: {what}")]
    Corrupt { segment: u32, offset: u64, what: String },
    #[error("store is shutting down")]
    Closed,
    #[error("this shard already holds {0} hints; refusing more until they are delivered")]
    HintsFull(u64),
}

impl StoreError {
    pub fn io(context: String, e: io::Error) -> StoreError {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::NoSpace(format!("{context}: {e}"))
        } else {
            StoreError::Io(format!("{context}: {e}"))
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// This shard's own directory.
    pub dir: PathBuf,
    pub shard: u16,
    pub incarnation: u64,
    pub partitions: u32,
    pub segment_bytes: u64,
    pub cache_bytes: usize,
    /// Appends wait for the flusher once this much is unflushed.
    pub max_unflushed_bytes: u64,
    /// Seed of the index's key hasher.
    pub hash_seed: u64,
    /// Hints this shard holds at most (for all other nodes together).
    pub max_hints: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub keys: u64,
    pub tombstones: u64,
    pub log_bytes: u64,
    pub segments: u32,
    pub hints: u64,
    pub compactions: u64,
    pub bytes_reclaimed: u64,
    /// Group commits (write + fdatasync) since start-up.
    pub flushes: u64,
}

pub struct Store {
    cfg: StoreConfig,
    log: Rc<RefCell<Log>>,
    index: RefCell<Index>,
    cache: RefCell<RecordCache>,
    epochs: RefCell<Epochs>,
    extending_lease: Cell<bool>,
    recovered_bytes: u64,
    recovery: RecoveryReport,
    closing: Cell<bool>,
    compactions: Cell<u64>,
    bytes_reclaimed: Cell<u64>,
}

impl Store {
    /// Recovers the shard's log and starts its flusher.
    pub async fn open(cfg: StoreConfig) -> Result<Rc<Store>, StoreError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| StoreError::io(format!("creating {}", cfg.dir.display()), e))?;
        let epochs =
            Epochs::open(&cfg.dir).map_err(|e| StoreError::io(format!("epoch state in {}", cfg.dir.display()), e))?;
        let rec =
            recovery::recover(&cfg.dir, u32::from(cfg.shard), cfg.partitions, KeyHasher::new(cfg.hash_seed)).await?;
        let log_cfg = LogConfig {
            dir: cfg.dir.clone(),
            shard: u32::from(cfg.shard),
            incarnation: cfg.incarnation,
            segment_bytes: cfg.segment_bytes,
        };
        let log = Rc::new(RefCell::new(Log::start(log_cfg, rec.files, &rec.ends, rec.next_segment).await?));
        glommio::spawn_local(log::run_flusher(log.clone())).detach();
        let spare_log = log.clone();
        glommio::spawn_local(async move { log::prepare_spare(&spare_log).await }).detach();
        Ok(Rc::new(Store {
            cache: RefCell::new(RecordCache::new(cfg.cache_bytes)),
            cfg,
            log,
            index: RefCell::new(rec.index),
            epochs: RefCell::new(epochs),
            extending_lease: Cell::new(false),
            recovered_bytes: rec.ends.values().sum(),
            recovery: rec.report,
            closing: Cell::new(false),
            compactions: Cell::new(0),
            bytes_reclaimed: Cell::new(0),
        }))
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    fn partition(&self, key: &[u8]) -> u32 {
        partition_of(key, self.cfg.partitions)
    }

    /// The key's object, tombstones included; `None` if this shard never saw it.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Object>, StoreError> {
        let entry = self.index.borrow().get(self.partition(key), key);
        match entry {
            None => Ok(None),
            Some(e) => self.read_object(e.loc()).await.map(Some),
        }
    }

    /// [`Store::get`] when it needs no disk read (the record is in the
    /// write buffer or the record cache, or the key is unknown); `None`
    /// when it does.
    pub fn get_now(&self, key: &[u8]) -> Option<Result<Option<Object>, StoreError>> {
        let entry = self.index.borrow().get(self.partition(key), key);
        match entry {
            None => Some(Ok(None)),
            Some(e) => self.object_now(e.loc()).map(|r| r.map(Some)),
        }
    }

    /// Applies a client write (`value: None` deletes) coordinated by this
    /// shard, minting a new dot. Returns the key's new object once durable
    /// (if asked).
    pub async fn write(
        &self,
        key: &[u8],
        value: Option<Vec<u8>>,
        ctx: &WriteContext,
        durable: bool,
        now_ms: u64,
    ) -> Result<Object, StoreError> {
        let (obj, lsn) = self.write_deferred(key, value, ctx, now_ms).await?;
        if durable {
            self.wait_lsn(lsn).await?;
        }
        Ok(obj)
    }

    /// Like [`Store::write`], but returns as soon as the record is appended,
    /// with the sequence number to pass to [`Store::wait_lsn`] for
    /// durability. Lets a coordinator replicate while its own fsync runs.
    pub async fn write_deferred(
        &self,
        key: &[u8],
        mut value: Option<Vec<u8>>,
        ctx: &WriteContext,
        now_ms: u64,
    ) -> Result<(Object, u64), StoreError> {
        let mut known = None;
        loop {
            match self.try_write(key, value, ctx, now_ms, known.take()) {
                Ok(done) => return done,
                Err((why, v)) => {
                    value = v;
                    known = self.unblock(why).await?;
                }
            }
        }
    }

    /// [`Store::write_deferred`] when it can finish without waiting (no
    /// disk read, room in the segment, no backlog, an epoch at hand); gives
    /// the value back when it cannot.
    pub fn write_now(
        &self,
        key: &[u8],
        value: Option<Vec<u8>>,
        ctx: &WriteContext,
        now_ms: u64,
    ) -> Result<Written, Option<Vec<u8>>> {
        self.try_write(key, value, ctx, now_ms, None).map_err(|(_, v)| v)
    }

    /// Merges a version from another replica into this one (replication,
    /// read repair, handoff). Nothing is written when it adds nothing.
    pub async fn merge(&self, key: &[u8], remote: &Object, durable: bool) -> Result<Object, StoreError> {
        let mut known = None;
        loop {
            match self.try_merge(key, remote, known.take()) {
                Ok(done) => {
                    let (obj, lsn) = done?;
                    if durable {
                        self.wait_lsn(lsn).await?;
                    }
                    return Ok(obj);
                }
                Err(why) => known = self.unblock(why).await?,
            }
        }
    }

    /// [`Store::merge`] when it can append without waiting: the merged
    /// object and the sequence number a durable merge must wait for (the
    /// new record's; or, when nothing was new, what is appended so far: the
    /// record that already holds it may not be on disk yet). `None` when it
    /// would have to wait.
    pub fn merge_now(&self, key: &[u8], remote: &Object) -> Option<Written> {
        self.try_merge(key, remote, None).ok()
    }

    /// Calls `done` once everything up to `lsn` is on disk (at once when it
    /// is already, or with the error when the log is poisoned).
    pub fn on_durable(&self, lsn: u64, done: Box<dyn FnOnce(Result<(), StoreError>)>) {
        let back = self.log.borrow_mut().wait(lsn, log::Waiter::Call(done));
        if let Some(w) = back {
            let r = self.log.borrow().check_writable();
            w.fire(r);
        }
    }

    /// Waits out what kept a synchronous attempt from finishing; returns
    /// the object it read, for the next attempt.
    async fn unblock(&self, why: Blocked) -> Result<Option<(Entry, Object)>, StoreError> {
        match why {
            Blocked::Read(entry) => return Ok(Some((entry, self.read_object(entry.loc()).await?))),
            Blocked::Epoch => self.extend_epochs().await?,
            Blocked::Backlog(lsn) => self.wait_lsn(lsn).await?,
            Blocked::Rotate(len) => {
                log::rotate(&self.log, len).await?;
                let spare_log = self.log.clone();
                glommio::spawn_local(async move { log::prepare_spare(&spare_log).await }).detach();
            }
        }
        Ok(None)
    }

    /// The key's current entry and object, from memory: the object read by
    /// the previous attempt if the entry did not move since, the write
    /// buffer or the cache; else what must be read.
    fn local_now(&self, p: u32, key: &[u8], known: Option<(Entry, Object)>) -> Result<Local, StoreError> {
        let entry = self.index.borrow().get(p, key);
        let Some(e) = entry else { return Ok(Local::Found(None, None)) };
        if let Some((ke, obj)) = known.filter(|(ke, _)| *ke == e) {
            return Ok(Local::Found(Some(ke), Some(obj)));
        }
        match self.object_now(e.loc()) {
            Some(obj) => Ok(Local::Found(Some(e), Some(obj?))),
            None => Ok(Local::Read(e)),
        }
    }

    /// Whether the log is too far behind its flusher to take more now.
    fn backlog(&self) -> Option<u64> {
        let l = self.log.borrow();
        (l.unflushed_bytes() > self.cfg.max_unflushed_bytes).then(|| l.appended_lsn())
    }

    /// One synchronous attempt at a coordinated write.
    fn try_write(
        &self,
        key: &[u8],
        value: Option<Vec<u8>>,
        ctx: &WriteContext,
        now_ms: u64,
        known: Option<(Entry, Object)>,
    ) -> Result<Written, (Blocked, Option<Vec<u8>>)> {
        let p = self.partition(key);
        if let Err(e) = self.log.borrow().check_writable() {
            return Ok(Err(e));
        }
        if let Some(lsn) = self.backlog() {
            return Err((Blocked::Backlog(lsn), value));
        }
        let (entry, local) = match self.local_now(p, key, known) {
            Ok(Local::Found(e, o)) => (e, o),
            Ok(Local::Read(e)) => return Err((Blocked::Read(e), value)),
            Err(e) => return Ok(Err(e)),
        };
        // The actor: one of ours the object proves we hold the history of,
        // else the next fresh epoch (taken only once the record is in).
        let floor = self.epochs.borrow().floor();
        let (actor, fresh) = match reusable_actor(local.as_ref(), self.cfg.incarnation, self.cfg.shard, floor) {
            Some(a) => (a, None),
            None if self.epochs.borrow().exhausted() => return Err((Blocked::Epoch, value)),
            None => {
                let e = self.epochs.borrow().peek();
                (Actor::new(self.cfg.incarnation, self.cfg.shard, e), Some(e))
            }
        };
        let ctx = match ctx {
            WriteContext::Client(vv) => vv,
            WriteContext::Local => local.as_ref().map_or(&EMPTY_VV, Object::context),
        };
        let dot = Object::next_dot(local.as_ref(), ctx, actor);
        let obj = Object::apply_write(local.as_ref(), ctx, dot, now_ms, value);
        match self.append_object(p, key, entry, &obj) {
            Ok(Some(lsn)) => {
                if let Some(e) = fresh {
                    assert_eq!(self.epochs.borrow_mut().take(), e, "no await between peek and take");
                }
                Ok(Ok((obj, lsn)))
            }
            Ok(None) => {
                let len = format::record_len(key.len(), obj.to_bytes().len());
                Err((Blocked::Rotate(len), obj.into_sibling(&dot).and_then(|s| s.value)))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// One synchronous attempt at merging a replica's version.
    fn try_merge(&self, key: &[u8], remote: &Object, known: Option<(Entry, Object)>) -> Result<Written, Blocked> {
        let p = self.partition(key);
        if let Err(e) = self.log.borrow().check_writable() {
            return Ok(Err(e));
        }
        if let Some(lsn) = self.backlog() {
            return Err(Blocked::Backlog(lsn));
        }
        let (entry, local) = match self.local_now(p, key, known) {
            Ok(Local::Found(e, o)) => (e, o),
            Ok(Local::Read(e)) => return Err(Blocked::Read(e)),
            Err(e) => return Ok(Err(e)),
        };
        let merged = match local {
            // Nothing to add, but the record that already holds it may not
            // be on disk yet: a durable merge must not answer before it is
            // (found by the simulator: a duplicate or a read repair that got
            // here first made a replica acknowledge a durable write from its
            // page cache).
            Some(l) if l.descends(remote) => return Ok(Ok((l, self.log.borrow().appended_lsn()))),
            Some(l) => l.merge(remote),
            None => remote.clone(),
        };
        match self.append_object(p, key, entry, &merged) {
            Ok(Some(lsn)) => Ok(Ok((merged, lsn))),
            Ok(None) => Err(Blocked::Rotate(format::record_len(key.len(), merged.to_bytes().len()))),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Appends `obj` as the key's new version, `expected` being the entry it
    /// was computed from (no await since, so it still is); `Ok(None)` when
    /// the active segment has no room.
    fn append_object(
        &self,
        p: u32,
        key: &[u8],
        expected: Option<Entry>,
        obj: &Object,
    ) -> Result<Option<u64>, StoreError> {
        assert_eq!(self.index.borrow().get(p, key), expected, "the entry moved during a synchronous write");
        let body = obj.to_bytes();
        let deleted = obj.is_deleted();
        let flags = if deleted { FLAG_DELETED } else { 0 };
        let appended = self.log.borrow_mut().try_append(RecordKind::Object, flags, key, &body)?;
        let Some((loc, lsn, checksum)) = appended else { return Ok(None) };
        self.index.borrow_mut().insert(p, key, Entry::new(loc, deleted, checksum as u32));
        // The next write to this key reads it back; keep it in memory past
        // the flush instead of paying a disk read.
        if let Some(bytes) = self.log.borrow().buffered(loc) {
            self.cache.borrow_mut().insert(loc, Rc::from(bytes));
        }
        Ok(Some(lsn))
    }

    async fn extend_epochs(&self) -> Result<(), StoreError> {
        loop {
            if !self.epochs.borrow().exhausted() {
                return Ok(());
            }
            if self.extending_lease.get() {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                continue;
            }
            self.extending_lease.set(true);
            let (path, state) = self.epochs.borrow().extension();
            let written =
                glommio::executor().spawn_blocking(move || epoch::write_state(&path, &state).map(|()| state)).await;
            self.extending_lease.set(false);
            let state = written.map_err(|e| StoreError::io("extending the epoch lease".into(), e))?;
            self.epochs.borrow_mut().extended(state);
        }
    }

    /// Waits until everything up to `lsn` is on disk.
    pub async fn wait_lsn(&self, lsn: u64) -> Result<(), StoreError> {
        let rx = self.log.borrow_mut().durable_waiter(lsn);
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Whether everything appended so far is on disk.
    pub fn all_durable(&self) -> bool {
        let log = self.log.borrow();
        log.durable_lsn() >= log.appended_lsn()
    }

    /// Waits until everything appended so far is on disk.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let lsn = self.log.borrow().appended_lsn();
        self.wait_lsn(lsn).await
    }

    /// The record at `loc` if it is in memory (write buffer or cache).
    fn record_now(&self, loc: Loc) -> Option<Rc<[u8]>> {
        if let Some(b) = self.log.borrow().buffered(loc) {
            return Some(Rc::from(b));
        }
        self.cache.borrow().get(&loc)
    }

    async fn read_record(&self, loc: Loc) -> Result<Rc<[u8]>, StoreError> {
        if let Some(b) = self.record_now(loc) {
            return Ok(b);
        }
        let file = self.log.borrow().file(loc.segment).ok_or_else(|| StoreError::Corrupt {
            segment: loc.segment,
            offset: u64::from(loc.offset),
            what: "the index points into a segment that is not open".into(),
        })?;
        let r = file
            .read_at(u64::from(loc.offset), loc.len as usize)
            .await
            .map_err(|e| StoreError::io(format!("reading segment {}", loc.segment), e.into()))?;
        let data: Rc<[u8]> = Rc::from(&*r);
        self.cache.borrow_mut().insert(loc, data.clone());
        Ok(data)
    }

    /// Reads and verifies the record at `loc`: checksum, length and object
    /// invariants are checked again after every read from disk.
    pub async fn read_object(&self, loc: Loc) -> Result<Object, StoreError> {
        let data = self.read_record(loc).await?;
        decode_object(loc, &data)
    }

    /// [`Store::read_object`] when the record is in memory.
    fn object_now(&self, loc: Loc) -> Option<Result<Object, StoreError>> {
        self.record_now(loc).map(|data| decode_object(loc, &data))
    }

    /// Holds `remote` for node `target`, which should have it but cannot be
    /// reached (sloppy quorum): merged into any hint already held for the
    /// key, durable like any write, delivered later by hinted handoff.
    pub async fn put_hint(&self, target: &str, key: &[u8], remote: &Object, durable: bool) -> Result<(), StoreError> {
        let record_key = format::hint_key(target, key);
        loop {
            self.log.borrow().check_writable()?;
            let entry = self.index.borrow().hints.get(target, key);
            let held = self.index.borrow().hints.count();
            if entry.is_none() && held >= self.cfg.max_hints {
                return Err(StoreError::HintsFull(held));
            }
            let local = match entry {
                Some(e) => Some(self.read_object(e.loc()).await?),
                None => None,
            };
            let merged = match &local {
                Some(l) if l.descends(remote) => {
                    // As in `merge`: what we hold must be durable first.
                    if durable {
                        self.sync().await?;
                    }
                    return Ok(());
                }
                Some(l) => l.merge(remote),
                None => remote.clone(),
            };
            if self.index.borrow().hints.get(target, key) != entry {
                continue;
            }
            let deleted = merged.is_deleted();
            let flags = if deleted { FLAG_DELETED } else { 0 };
            let appended =
                self.log.borrow_mut().try_append(RecordKind::Hint, flags, &record_key, &merged.to_bytes())?;
            match appended {
                Some((loc, lsn, checksum)) => {
                    self.index.borrow_mut().insert_hint(target, key, Entry::new(loc, deleted, checksum as u32));
                    if durable {
                        self.wait_lsn(lsn).await?;
                    }
                    return Ok(());
                }
                None => {
                    let len = format::record_len(record_key.len(), merged.to_bytes().len());
                    log::rotate(&self.log, len).await?;
                }
            }
        }
    }

    /// Owners this shard holds hints for, with how many each.
    pub fn hint_targets(&self) -> Vec<(String, usize)> {
        self.index.borrow().hints.targets()
    }

    pub fn hints_pending(&self) -> u64 {
        self.index.borrow().hints.count()
    }

    /// Up to `max` hints for `target`: key, the record holding it, and the
    /// object.
    pub async fn hint_batch(&self, target: &str, max: usize) -> Result<Vec<(Vec<u8>, RecordId, Object)>, StoreError> {
        let batch = self.index.borrow().hints.batch(target, max);
        let mut out = Vec::with_capacity(batch.len());
        for (key, entry) in batch {
            out.push((key, record_id(entry.loc()), self.read_object(entry.loc()).await?));
        }
        Ok(out)
    }

    /// Retires hints their owner now has durably. A hint replaced by a newer
    /// one since its record was read stays, for the next delivery.
    pub async fn hints_delivered(&self, target: &str, delivered: &[(Vec<u8>, RecordId)]) -> Result<usize, StoreError> {
        let mut retired = 0;
        let mut last_lsn = None;
        for (key, id) in delivered {
            let Some(entry) = self.index.borrow().hints.get(target, key) else { continue };
            if record_id(entry.loc()) != *id {
                continue;
            }
            let record_key = format::hint_key(target, key);
            let loc = entry.loc();
            let body = format::loc_body(loc.segment, loc.offset);
            let lsn = self
                .append_marker(RecordKind::HintDone, &record_key, &body, || {
                    self.index.borrow_mut().retire_hint(target, key, loc.segment, loc.offset)
                })
                .await?;
            if let Some(lsn) = lsn {
                retired += 1;
                last_lsn = Some(lsn);
            }
        }
        if let Some(lsn) = last_lsn {
            self.wait_lsn(lsn).await?;
        }
        Ok(retired)
    }

    /// Appends a marker record, rotating the log when the active segment is
    /// full. `apply` runs right after the append with no await in between,
    /// so it sees exactly the state the record was appended against; it
    /// says whether the marker still means something (it was appended
    /// either way: a marker that matches nothing replays as nothing).
    /// Returns the record's sequence number when `apply` said yes.
    async fn append_marker(
        &self,
        kind: RecordKind,
        key: &[u8],
        body: &[u8],
        apply: impl FnOnce() -> bool,
    ) -> Result<Option<u64>, StoreError> {
        loop {
            self.log.borrow().check_writable()?;
            let appended = self.log.borrow_mut().try_append(kind, 0, key, body)?;
            match appended {
                Some((_, lsn, _)) => return Ok(apply().then_some(lsn)),
                None => log::rotate(&self.log, format::record_len(key.len(), body.len())).await?,
            }
        }
    }

    /// Forgets `key` for good if this replica still holds exactly
    /// `expected`, a tombstone. The caller has made sure every replica holds
    /// it and its grace period has passed: the delete can no longer be
    /// undone by an older version arriving. Durable when it returns true.
    pub async fn purge(&self, key: &[u8], expected: &Object) -> Result<bool, StoreError> {
        let p = self.partition(key);
        let Some(entry) = self.index.borrow().get(p, key).filter(|e| e.is_deleted() && expected.is_deleted()) else {
            return Ok(false);
        };
        if self.read_object(entry.loc()).await? != *expected {
            return Ok(false);
        }
        // Rotation can await; whatever moved the key meanwhile (a write,
        // a compaction) makes the marker void and the purge a no-op.
        let loc = entry.loc();
        let body = format::loc_body(loc.segment, loc.offset);
        let lsn = self
            .append_marker(RecordKind::Purge, key, &body, || {
                let mut ix = self.index.borrow_mut();
                ix.get(p, key) == Some(entry) && ix.purge_before(p, key, loc.segment, loc.offset).is_some()
            })
            .await?;
        match lsn {
            Some(lsn) => self.wait_lsn(lsn).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Up to `max` tombstoned keys of partition `p`.
    pub fn tombstones(&self, p: u32, max: usize) -> Vec<Vec<u8>> {
        let ix = self.index.borrow();
        // The counts are kept anyway; they spare a walk over every key of a
        // partition that has nothing to purge (most of them, most passes).
        let Some(part) = ix.partition(p).filter(|part| part.counts().deleted > 0) else { return Vec::new() };
        part.iter().filter(|(_, e)| e.is_deleted()).take(max).map(|(k, _)| k.to_vec()).collect()
    }

    /// The Merkle tree of partition `p` (empty if this shard holds none of it).
    pub fn merkle(&self, p: u32) -> ringkv_core::merkle::MerkleTree {
        self.index.borrow().partition(p).map(|ix| ix.tree().clone()).unwrap_or_default()
    }

    /// Keys of partition `p` in the given Merkle leaves, with their digests.
    pub fn keys_in_leaves(&self, p: u32, leaves: &[usize]) -> Vec<(Vec<u8>, u32)> {
        self.index.borrow().partition(p).map(|ix| ix.keys_in_leaves(leaves)).unwrap_or_default()
    }

    /// Live and tombstoned keys of partition `p` on this shard.
    pub fn partition_counts(&self, p: u32) -> index::PartitionCounts {
        self.index.borrow().partition(p).map(|ix| ix.counts()).unwrap_or_default()
    }

    /// Partitions this shard holds any key of (tombstones included).
    pub fn partitions_with_data(&self) -> Vec<u32> {
        self.index.borrow().partitions().filter(|(_, ix)| !ix.is_empty()).map(|(p, _)| p).collect()
    }

    /// A snapshot of partition `p`'s keys and the records holding them.
    pub fn partition_snapshot(&self, p: u32) -> Vec<(Vec<u8>, RecordId)> {
        self.index
            .borrow()
            .partition(p)
            .map(|ix| ix.iter().map(|(k, e)| (k.to_vec(), record_id(e.loc()))).collect())
            .unwrap_or_default()
    }

    /// Forgets partition `p` durably, but only if its keys are still exactly
    /// `snapshot` (what the caller handed off): returns false, dropping
    /// nothing, when a write arrived meanwhile.
    pub async fn drop_partition(&self, p: u32, snapshot: &[(Vec<u8>, RecordId)]) -> Result<bool, StoreError> {
        let unchanged = || {
            let ix = self.index.borrow();
            let part = ix.partition(p);
            let len = part.map_or(0, |x| x.len());
            len == snapshot.len()
                && snapshot.iter().all(|(k, id)| part.and_then(|x| x.get(k)).map(|e| record_id(e.loc())) == Some(*id))
        };
        let key = format::drop_partition_key(p);
        loop {
            self.log.borrow().check_writable()?;
            if !unchanged() {
                return Ok(false);
            }
            // The boundary is this record's own position: everything of p
            // before it goes, whatever compaction later does with it.
            let (segment, offset) = self.log.borrow().next_position();
            let body = format::loc_body(segment, offset);
            let appended = self.log.borrow_mut().try_append(RecordKind::DropPartition, 0, &key, &body)?;
            match appended {
                Some((loc, lsn, _)) => {
                    assert_eq!((loc.segment, loc.offset), (segment, offset), "appended where announced");
                    self.index.borrow_mut().drop_partition_before(p, segment, offset);
                    self.wait_lsn(lsn).await?;
                    return Ok(true);
                }
                None => log::rotate(&self.log, format::record_len(key.len(), body.len())).await?,
            }
        }
    }

    /// The segment appends go to now.
    pub fn active_segment(&self) -> u32 {
        self.log.borrow().active_segment()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    pub fn note_compaction(&self, c: &compaction::Compacted) {
        self.compactions.set(self.compactions.get() + 1);
        self.bytes_reclaimed.set(self.bytes_reclaimed.get() + c.bytes_in.saturating_sub(c.bytes_out));
    }

    /// Writes the hint files of segments sealed since the last call.
    pub async fn write_ready_hints(&self) {
        let ready = self.log.borrow_mut().take_ready_hints();
        for (segment, entries) in ready {
            let dir = self.cfg.dir.clone();
            let done = glommio::executor().spawn_blocking(move || hintfile::write(&dir, segment, &entries)).await;
            if let Err(e) = done {
                // Only a slower restart: recovery scans a segment without one.
                tracing::warn!(segment, error = %e, "could not write a hint file");
            }
        }
    }

    /// Deletes segments compaction replaced more than `grace` ago.
    pub async fn delete_retired(&self, grace: std::time::Duration) {
        let ids = self.log.borrow_mut().expired(grace);
        if ids.is_empty() {
            return;
        }
        let dir = self.cfg.dir.clone();
        let removed = glommio::executor()
            .spawn_blocking(move || -> std::io::Result<()> {
                for id in ids {
                    // The hint file first: a segment without one is only
                    // slower to recover, one without its segment is ignored.
                    let _ = std::fs::remove_file(hintfile::path(&dir, id));
                    std::fs::remove_file(segment::segment_path(&dir, id))?;
                }
                segment::fsync_dir(&dir)
            })
            .await;
        if let Err(e) = removed {
            tracing::warn!(error = %e, "could not delete compacted segments");
        }
    }

    /// Compacts everything worth it now (tests and `ringkv compact`).
    pub async fn compact_now(&self, garbage_ratio: f64) -> Result<Vec<compaction::Compacted>, StoreError> {
        let out = compaction::pass(self, garbage_ratio, None).await?;
        self.write_ready_hints().await;
        Ok(out)
    }

    pub fn stats(&self) -> StoreStats {
        let counts = self.index.borrow().counts();
        let log = self.log.borrow();
        StoreStats {
            keys: counts.live,
            tombstones: counts.deleted,
            log_bytes: self.recovered_bytes + log.appended_lsn(),
            segments: log.segments().count() as u32,
            hints: self.index.borrow().hints.count(),
            compactions: self.compactions.get(),
            bytes_reclaimed: self.bytes_reclaimed.get(),
            flushes: log.flushes(),
        }
    }

    /// Flushes everything, stops the flusher, writes the hint files (the
    /// active segment's too: nothing more goes into it) and records a clean
    /// stop, so the next start reads no values.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.closing.set(true);
        log::flush_all(&self.log).await?;
        self.log.borrow_mut().shut_down();
        self.write_ready_hints().await;
        let (segment, entries) = self.log.borrow().active_entries();
        if !entries.is_empty() {
            let dir = self.cfg.dir.clone();
            glommio::executor()
                .spawn_blocking(move || hintfile::write(&dir, segment, &entries))
                .await
                .map_err(|e| StoreError::io("writing the last hint file".into(), e))?;
        }
        self.delete_retired(std::time::Duration::ZERO).await;
        self.epochs.borrow_mut().close_clean().map_err(|e| StoreError::io("recording a clean stop".into(), e))
    }
}

static EMPTY_VV: VersionVector = VersionVector::new_const();

/// A write or merge that finished: the key's object and the sequence
/// number to wait for to have it durable.
pub type Written = Result<(Object, u64), StoreError>;

/// What kept a synchronous attempt from finishing, to wait out before the
/// next one.
enum Blocked {
    /// The key's record must be read from disk.
    Read(Entry),
    /// The epoch lease needs extending (a blocking write).
    Epoch,
    /// The flusher must catch up to this lsn first.
    Backlog(u64),
    /// The active segment has no room for a record of this length.
    Rotate(usize),
}

/// A key's current state, as far as memory knows it.
enum Local {
    Found(Option<Entry>, Option<Object>),
    Read(Entry),
}

/// Verifies and decodes the record read from `loc`.
fn decode_object(loc: Loc, data: &[u8]) -> Result<Object, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt { segment: loc.segment, offset: u64::from(loc.offset), what };
    let rec =
        decode_record(data).map_err(|e| corrupt(e.to_string()))?.ok_or_else(|| corrupt("no record here".into()))?;
    if rec.len != loc.len as usize {
        return Err(corrupt(format!("record is {} bytes, the index says {}", rec.len, loc.len)));
    }
    Object::decode(rec.body).map_err(|e| corrupt(e.to_string()))
}

/// A record's position as the protocol machines name it: unique while the
/// store runs (a record never moves; compaction writes a new one).
pub fn record_id(loc: Loc) -> RecordId {
    RecordId(u64::from(loc.segment) << 32 | u64::from(loc.offset))
}
