//! What the protocol machines ask of the shell, and what comes back.
//!
//! A machine never performs I/O. It queues [`Outgoing`] requests, each
//! addressed to a member (this node included: its own store is reached the
//! same way as a peer's) and tagged, and the shell later feeds the matching
//! [`Response`] back with the same [`Tag`]. A request may also never be
//! answered (a lost message, a stopped peer): every machine keeps its own
//! deadlines and never waits on the shell for ever.
//!
//! Requests marked *local* are only ever sent to this node (they reach its
//! store); the rest may go to any member. The shell routes a request to
//! this node's shard that holds partition `p`.

use crate::topology::MemberId;
use crate::version::{Object, VersionVector};
use std::rc::Rc;

/// Which machine a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Machine {
    Coordinator,
    Hints,
    Handoff,
    Repair,
}

/// Names the request a response answers: the machine, the operation in it,
/// and which of the operation's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    pub machine: Machine,
    pub op: u64,
    pub idx: u32,
}

/// A record's position in a store, unique for the store's lifetime: what a
/// machine holds to say "the version I read" (a hint to retire, a snapshot
/// to drop) without knowing the store's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(pub u64);

/// The causal context a client write applies on top of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteContext {
    /// The context a client read returned (empty: a blind write).
    Client(VersionVector),
    /// Whatever this replica holds now: "delete what is there".
    Local,
}

/// What a machine asks a replica (or this node's own store) to do.
#[derive(Debug, Clone)]
pub enum Request {
    /// The replica's object for `key`, if it has one.
    Read { key: Vec<u8> },
    /// Merge `obj` into the replica's copy (or hold it as a hint for
    /// `hint_for`); durable: answer only once it is on disk.
    Write { key: Vec<u8>, obj: Rc<Object>, durable: bool, hint_for: Option<MemberId> },
    /// *Local.* Coordinate a client write on this replica: mint the next dot
    /// on top of the local object and append it (not yet durable).
    Apply { key: Vec<u8>, value: Option<Vec<u8>>, ctx: WriteContext },
    /// *Local.* Answer once everything up to `lsn` is durable.
    WaitDurable { lsn: u64 },
    /// Is the member there at all (before streaming to it).
    Ping,
    /// Merkle root and segment hashes (`segments` empty), or the leaves of
    /// `segments`.
    Merkle { p: u32, segments: Vec<u32> },
    /// Keys of partition `p` in the given leaves, with their digests.
    Keys { p: u32, leaves: Vec<u32> },
    /// The replica's objects for `keys` (missing keys are left out).
    ReadBatch { keys: Vec<Vec<u8>> },
    /// Merge many objects of partition `p`, then make them durable.
    MergeBatch { p: u32, entries: Vec<(Vec<u8>, Object)> },
    /// Forget `key` for good if the replica holds exactly `obj`, a tombstone.
    Purge { key: Vec<u8>, obj: Object },
    /// *Local.* Up to `max` tombstoned keys of `p` with their objects.
    Tombstones { p: u32, max: usize },
    /// *Local.* Members this store holds hints for, with how many.
    HintTargets,
    /// *Local.* Up to `max` hints held for `owner`.
    HintBatch { owner: MemberId, max: usize },
    /// *Local.* Retire hints `owner` now holds durably; a hint replaced since
    /// (its record id changed) stays.
    RetireHints { owner: MemberId, delivered: Vec<(Vec<u8>, RecordId)> },
    /// *Local.* Partitions this shard holds any key of.
    PartitionsWithData,
    /// *Local.* Every key of partition `p` and the record holding it.
    Snapshot { p: u32 },
    /// *Local.* The objects of these records.
    ReadRecords { records: Vec<(Vec<u8>, RecordId)> },
    /// *Local.* Forget partition `p` durably if it still is exactly
    /// `snapshot`; answers whether it did.
    DropPartition { p: u32, snapshot: Vec<(Vec<u8>, RecordId)> },
}

impl Request {
    /// Requests that may only go to this node's own store.
    pub fn is_local_only(&self) -> bool {
        matches!(
            self,
            Request::Apply { .. }
                | Request::WaitDurable { .. }
                | Request::Tombstones { .. }
                | Request::HintTargets
                | Request::HintBatch { .. }
                | Request::RetireHints { .. }
                | Request::PartitionsWithData
                | Request::Snapshot { .. }
                | Request::ReadRecords { .. }
                | Request::DropPartition { .. }
        )
    }
}

/// What came back.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `Read`: the replica's object.
    Object(Option<Object>),
    /// `Apply`: the new object and its log position.
    Applied {
        obj: Object,
        lsn: u64,
    },
    /// `Write`, `WaitDurable`, `Ping`, `MergeBatch`.
    Done,
    Merkle {
        root: u64,
        segments: Vec<u64>,
        leaves: Vec<u64>,
    },
    Keys(Vec<(Vec<u8>, u32)>),
    /// `ReadBatch`, `Tombstones`, `ReadRecords`.
    Objects(Vec<(Vec<u8>, Object)>),
    HintTargets(Vec<(MemberId, usize)>),
    Hints(Vec<(Vec<u8>, RecordId, Object)>),
    /// `RetireHints`: how many were retired.
    Count(usize),
    Partitions(Vec<u32>),
    Snapshot(Vec<(Vec<u8>, RecordId)>),
    /// `Purge`, `DropPartition`: whether it happened.
    Flag(bool),
}

/// A request that failed: unreachable, refused, timed out, a storage error.
/// The text is for people; machines only need to know it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl Failure {
    pub fn new(msg: impl Into<String>) -> Failure {
        Failure(msg.into())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Answer = Result<Response, Failure>;

/// One request for the shell to carry out.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub tag: Tag,
    pub to: MemberId,
    /// The partition involved: the shell reaches `to`'s shard for it.
    pub p: u32,
    pub req: Request,
}

/// A small FIFO of requests each machine keeps for the shell to drain.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: std::collections::VecDeque<Outgoing>,
}

impl Outbox {
    pub fn push(&mut self, tag: Tag, to: MemberId, p: u32, req: Request) {
        self.queue.push_back(Outgoing { tag, to, p, req });
    }

    pub fn pop(&mut self) -> Option<Outgoing> {
        self.queue.pop_front()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Deadlines of a machine's operations, earliest first. Each operation has
/// at most one entry per timer kind; cancelling is cheap.
#[derive(Debug)]
pub struct Deadlines<K: Ord + Copy> {
    set: std::collections::BTreeSet<(u64, u64, K)>,
}

impl<K: Ord + Copy> Default for Deadlines<K> {
    fn default() -> Self {
        Deadlines { set: std::collections::BTreeSet::new() }
    }
}

impl<K: Ord + Copy> Deadlines<K> {
    pub fn arm(&mut self, at_us: u64, op: u64, kind: K) {
        self.set.insert((at_us, op, kind));
    }

    pub fn cancel(&mut self, at_us: u64, op: u64, kind: K) {
        self.set.remove(&(at_us, op, kind));
    }

    pub fn next(&self) -> Option<u64> {
        self.set.first().map(|&(at, _, _)| at)
    }

    /// Removes and returns the first entry due at `now_us`.
    pub fn pop_due(&mut self, now_us: u64) -> Option<(u64, K)> {
        match self.set.first() {
            Some(&(at, _, _)) if at <= now_us => self.set.pop_first().map(|(_, op, k)| (op, k)),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// The requests of one step still unanswered, by index. Networks duplicate
/// and machines must not count an answer twice: each index answers once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Awaiting {
    left: std::collections::BTreeSet<u32>,
}

impl Awaiting {
    /// Awaits indexes `0..n`.
    pub fn new(n: usize) -> Awaiting {
        Awaiting { left: (0..n as u32).collect() }
    }

    /// Records the answer of `idx`; false when it was not awaited (a
    /// duplicate, or a stranger).
    pub fn answer(&mut self, idx: u32) -> bool {
        self.left.remove(&idx)
    }

    pub fn done(&self) -> bool {
        self.left.is_empty()
    }
}
