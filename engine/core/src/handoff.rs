//! Ownership handoff as a state machine: data that is not where the ring
//! says moves there.
//!
//! Every `interval_us` the machine asks its store which partitions it holds
//! data for. A partition is in the right place when this node is one of its
//! replicas and this shard is the one pinned to it; otherwise (the ring
//! changed, the node is leaving, or data arrived while the ring was still
//! forming) a snapshot of its keys is streamed in chunks to every replica of
//! the partition, merged durably there, and only when every replica
//! acknowledged every chunk is the partition dropped here, durably, and only
//! if it is still exactly the snapshot (a write that landed meanwhile keeps
//! it for the next round). A partition with a replica down waits: its data
//! is kept until the replica is back.
//!
//! Streams behave: chunks are paced to `bytes_per_sec` (0: unpaced), and a
//! transfer that breaks (a target reset, timed out or restarted) resumes: the
//! records every target acknowledged are remembered, by key and record id,
//! and the next attempt at the same targets sends only the records that are
//! not among them (a record rewritten since has a new id and is sent again).
//! The memory of acknowledged records lasts while the targets stay the same;
//! it is kept for at most [`RESUME_KEPT`] partitions. It survives a restart
//! of this node too: [`Handoff::resume_state`] encodes it (the transfer in
//! flight included) whenever [`Handoff::resume_changes`] moved, the shell
//! saves it, and [`Handoff::restore_resume`] takes it back at start-up. A
//! record id names a record in this node's log, which a restart keeps, so a
//! restored entry skips exactly what the targets merged durably before.
//!
//! Bounds: one partition at a time, one chunk of at most `chunk` keys in
//! flight, every request with a deadline.

use crate::codec::{err, put_varint, DecodeError, Reader};
use crate::effects::{Answer, Awaiting, Deadlines, Machine, Outbox, Outgoing, RecordId, Request, Response, Tag};
use crate::topology::{MemberId, Topology};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

#[derive(Debug, Clone)]
pub struct HandoffConfig {
    pub interval_us: u64,
    pub chunk: usize,
    pub call_timeout_us: u64,
    /// Pace of this machine's stream, in bytes of keys and values per
    /// second; 0 streams as fast as the targets answer.
    pub bytes_per_sec: u64,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig { interval_us: 2_000_000, chunk: 256, call_timeout_us: 30_000_000, bytes_per_sec: 0 }
    }
}

/// How soon a round held back by the node's stream limit is tried again.
const ROUND_RETRY_US: u64 = 500_000;

/// Partitions whose acknowledged records are remembered for a resume.
pub const RESUME_KEPT: usize = 16;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandoffStats {
    pub partitions_handed_off: u64,
    pub keys_handed_off: u64,
    pub postponed: u64,
    /// Bytes of keys and values sent (once per chunk, whatever the number
    /// of targets).
    pub bytes_sent: u64,
    /// Records not sent again because every target already acknowledged
    /// them in an earlier, broken attempt.
    pub keys_resumed: u64,
}

/// What is still to move from this shard, as of now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Misplaced partitions not yet handed off (the current one included).
    pub partitions: u32,
    /// Keys of the current partition still to send, and how many it has.
    pub keys_left: u64,
    pub keys_total: u64,
    /// An estimate of the bytes still to send: the current partition's keys
    /// left at its bytes per key so far, plus each waiting partition at the
    /// size of the current one.
    pub bytes_left: u64,
}

#[derive(Debug)]
enum Step {
    Snapshot,
    Read,
    /// Waiting for the pace to allow the next chunk.
    Paced,
    Send {
        waiting: Awaiting,
    },
    Drop,
}

#[derive(Debug)]
struct Transfer {
    p: u32,
    targets: Vec<MemberId>,
    /// Every record of the partition: what may be dropped at the end.
    snapshot: Vec<(Vec<u8>, RecordId)>,
    /// The records to send: the snapshot less those acknowledged before.
    pending: Vec<(Vec<u8>, RecordId)>,
    /// Index in `pending` of the first key of the chunk in flight.
    at: usize,
    /// Records every target acknowledged, in earlier attempts.
    acked: HashSet<(Vec<u8>, RecordId)>,
    /// Bytes sent in this attempt, for the estimate.
    bytes: u64,
    step: Step,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Round,
    Call,
    Pace,
}

struct Resume {
    targets: Vec<MemberId>,
    acked: HashSet<(Vec<u8>, RecordId)>,
}

pub struct Handoff {
    cfg: HandoffConfig,
    shard: u16,
    /// Misplaced partitions still to stream this round.
    queue: VecDeque<u32>,
    listing: bool,
    current: Option<Transfer>,
    /// Bumped per request, so a late answer is not taken for the next one.
    gen: u64,
    deadline: Option<u64>,
    /// The earliest time the next chunk may be read (pacing).
    pace_at: u64,
    resume: BTreeMap<u32, Resume>,
    /// Whether a new round may start (the node's limit on concurrent
    /// streams, which the shell keeps); a round that may not waits.
    may_start: bool,
    /// Targets that failed a call this round: partitions that stream to
    /// them wait for the next round rather than hammer a dead node.
    failed: HashSet<MemberId>,
    /// Misplaced partitions found by the last listing and not handed off
    /// since (postponed ones included): what progress reports.
    left: BTreeSet<u32>,
    /// Partitions with data here that the last listing found in place: a
    /// ring change since may have made them misplaced before the next
    /// listing sees it.
    placed: BTreeSet<u32>,
    timers: Deadlines<Timer>,
    out: Outbox,
    stats: HandoffStats,
    /// Bumped whenever what a resume would skip changed.
    resume_changes: u64,
}

/// Version of [`Handoff::resume_state`]'s encoding.
const RESUME_FORMAT: u8 = 1;

impl Handoff {
    pub fn new(cfg: HandoffConfig, shard: u16, now_us: u64) -> Handoff {
        let mut timers = Deadlines::default();
        timers.arm(now_us + cfg.interval_us, 0, Timer::Round);
        Handoff {
            cfg,
            shard,
            queue: VecDeque::new(),
            listing: false,
            current: None,
            gen: 0,
            deadline: None,
            pace_at: 0,
            resume: BTreeMap::new(),
            may_start: true,
            failed: HashSet::new(),
            left: BTreeSet::new(),
            placed: BTreeSet::new(),
            timers,
            out: Outbox::default(),
            stats: HandoffStats::default(),
            resume_changes: 0,
        }
    }

    /// Increases whenever [`Handoff::resume_state`] would say something
    /// new: the shell saves it then.
    pub fn resume_changes(&self) -> u64 {
        self.resume_changes
    }

    /// What every target acknowledged, per partition: the broken transfers
    /// remembered and the one in flight, encoded for a file.
    pub fn resume_state(&self) -> Vec<u8> {
        type Entry<'a> = (u32, &'a [MemberId], Vec<&'a (Vec<u8>, RecordId)>);
        let mut entries: Vec<Entry<'_>> =
            self.resume.iter().map(|(&p, r)| (p, r.targets.as_slice(), r.acked.iter().collect())).collect();
        if let Some(t) = &self.current {
            let mut acked: Vec<&(Vec<u8>, RecordId)> = t.acked.iter().collect();
            match t.step {
                Step::Drop => acked.extend(&t.snapshot),
                _ => acked.extend(&t.pending[..t.at.min(t.pending.len())]),
            }
            entries.retain(|e| e.0 != t.p);
            entries.push((t.p, &t.targets, acked));
        }
        let mut out = vec![RESUME_FORMAT];
        put_varint(&mut out, entries.len() as u64);
        for (p, targets, acked) in entries {
            put_varint(&mut out, u64::from(p));
            put_varint(&mut out, targets.len() as u64);
            for t in targets {
                out.extend_from_slice(&t.0.to_le_bytes());
            }
            put_varint(&mut out, acked.len() as u64);
            for (key, id) in acked {
                put_varint(&mut out, key.len() as u64);
                out.extend_from_slice(key);
                put_varint(&mut out, id.0);
            }
        }
        out
    }

    /// Takes back what [`Handoff::resume_state`] saved before a restart;
    /// returns the number of records it will not send again. Bytes that do
    /// not decode are an error and change nothing.
    pub fn restore_resume(&mut self, bytes: &[u8]) -> Result<usize, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.u8()? != RESUME_FORMAT {
            return err("handoff resume format is not supported");
        }
        let n = r.len(RESUME_KEPT + 1)?;
        let mut restored = BTreeMap::new();
        for _ in 0..n {
            let p = u32::try_from(r.varint()?).map_err(|_| DecodeError { what: "partition over u32" })?;
            let k = r.len(r.remaining() / 8)?;
            let targets = (0..k).map(|_| r.u64_le().map(MemberId)).collect::<Result<Vec<_>, _>>()?;
            let count = r.len(r.remaining())?;
            let mut acked = HashSet::with_capacity(count);
            for _ in 0..count {
                let len = r.len(r.remaining())?;
                let key = r.bytes(len)?.to_vec();
                acked.insert((key, RecordId(r.varint()?)));
            }
            restored.insert(p, Resume { targets, acked });
        }
        if !r.is_empty() {
            return err("trailing bytes after the handoff resume state");
        }
        let records = restored.values().map(|r| r.acked.len()).sum();
        self.resume = restored;
        Ok(records)
    }

    pub fn stats(&self) -> HandoffStats {
        self.stats
    }

    pub fn progress(&self) -> Progress {
        let partitions = self.left.len() as u32;
        let Some(t) = &self.current else {
            return Progress { partitions, ..Progress::default() };
        };
        let sent = t.at as u64;
        let total = t.snapshot.len() as u64;
        let left = (t.pending.len() as u64).saturating_sub(sent);
        let per_key = t.bytes.checked_div(sent).unwrap_or(0);
        let waiting = u64::from(partitions.saturating_sub(1));
        Progress { partitions, keys_left: left, keys_total: total, bytes_left: per_key * (left + waiting * total) }
    }

    /// Partitions this shard holds data of that belong elsewhere under
    /// `topo`: those the last listing found misplaced, less those handed off
    /// since, and those it found in place that `topo` no longer places here
    /// (a ring change since; the next round streams them).
    pub fn holding(&self, topo: &Topology) -> BTreeSet<u32> {
        let moved = self.placed.iter().copied().filter(|&p| topo.has_ring() && self.misplaced(topo, p));
        self.left.iter().copied().chain(moved).collect()
    }

    /// Whether the next round may start: false while the node streams as
    /// many partitions as it may at once. A round that may not start is
    /// tried again within half a second.
    pub fn set_may_start(&mut self, may: bool) {
        self.may_start = may;
    }

    /// Whether a partition is being streamed or waits in this round.
    pub fn busy(&self) -> bool {
        self.current.is_some() || !self.queue.is_empty() || self.listing
    }

    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.out.pop()
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next()
    }

    fn send(&mut self, now_us: u64, to: MemberId, p: u32, req: Request) {
        self.send_idx(now_us, 0, to, p, req);
    }

    fn send_idx(&mut self, now_us: u64, idx: u32, to: MemberId, p: u32, req: Request) {
        self.out.push(Tag { machine: Machine::Handoff, op: self.gen, idx }, to, p, req);
        if self.deadline.is_none() {
            let at = now_us + self.cfg.call_timeout_us;
            self.deadline = Some(at);
            self.timers.arm(at, 0, Timer::Call);
        }
    }

    /// A new step: answers to the previous one are stale from now on.
    fn next_step(&mut self) {
        self.gen += 1;
        if let Some(at) = self.deadline.take() {
            self.timers.cancel(at, 0, Timer::Call);
        }
    }

    pub fn handle_timeout(&mut self, now_us: u64, topo: &Topology) {
        while let Some((_, kind)) = self.timers.pop_due(now_us) {
            match kind {
                Timer::Round if !self.may_start && !self.busy() => {
                    self.timers.arm(now_us + self.cfg.interval_us.min(ROUND_RETRY_US), 0, Timer::Round);
                }
                Timer::Round => {
                    self.timers.arm(now_us + self.cfg.interval_us, 0, Timer::Round);
                    if !self.busy() && topo.has_ring() {
                        self.failed.clear();
                        self.listing = true;
                        self.next_step();
                        self.send(now_us, topo.me(), 0, Request::PartitionsWithData);
                    }
                }
                Timer::Call => {
                    self.deadline = None;
                    self.postpone(now_us, topo);
                }
                Timer::Pace => {
                    if let Some(t) = self.current.take() {
                        if matches!(t.step, Step::Paced) {
                            self.read_chunk(now_us, topo, t);
                        } else {
                            self.current = Some(t);
                        }
                    }
                }
            }
        }
    }

    /// Gives up on the current partition (or listing) until the next round,
    /// remembering what its targets acknowledged.
    fn postpone(&mut self, now_us: u64, topo: &Topology) {
        self.listing = false;
        if let Some(t) = self.current.take() {
            self.stats.postponed += 1;
            // Timed out: any of its targets may be the one that is gone.
            self.failed.extend(t.targets.iter().copied());
            self.remember(t);
        }
        self.next_step();
        self.start_next(now_us, topo);
    }

    /// Keeps the acknowledged records of a broken transfer for a resume.
    fn remember(&mut self, t: Transfer) {
        let Transfer { p, targets, snapshot, mut pending, at, mut acked, step, .. } = t;
        if matches!(step, Step::Drop) {
            // The drop is asked only once every record of the snapshot is at
            // every target: the sent ones just now, the others earlier.
            acked.extend(snapshot);
        } else {
            pending.truncate(at);
            acked.extend(pending);
        }
        self.resume_changes += 1;
        if acked.is_empty() {
            return;
        }
        if self.resume.len() >= RESUME_KEPT && !self.resume.contains_key(&p) {
            let oldest = *self.resume.keys().next().expect("not empty");
            self.resume.remove(&oldest);
        }
        self.resume.insert(p, Resume { targets, acked });
    }

    fn misplaced(&self, topo: &Topology, p: u32) -> bool {
        !(topo.is_primary(p, topo.me()) && topo.local_shard(p) == self.shard)
    }

    /// Starts the next misplaced partition whose replicas are all up.
    fn start_next(&mut self, now_us: u64, topo: &Topology) {
        while let Some(p) = self.queue.pop_front() {
            if !topo.has_ring() || !self.misplaced(topo, p) {
                self.resume_changes += u64::from(self.resume.remove(&p).is_some());
                self.left.remove(&p);
                continue;
            }
            let targets = topo.primaries(p).to_vec();
            if targets.iter().any(|&t| !topo.alive(t) || self.failed.contains(&t)) {
                // Keep the data until every replica is back.
                self.stats.postponed += 1;
                continue;
            }
            let acked = match self.resume.remove(&p) {
                Some(r) if r.targets == targets => r.acked,
                _ => HashSet::new(),
            };
            self.current = Some(Transfer {
                p,
                targets,
                snapshot: Vec::new(),
                pending: Vec::new(),
                at: 0,
                acked,
                bytes: 0,
                step: Step::Snapshot,
            });
            self.next_step();
            self.send(now_us, topo.me(), p, Request::Snapshot { p });
            return;
        }
    }

    pub fn handle_response(&mut self, now_us: u64, topo: &Topology, tag: Tag, answer: Answer) {
        debug_assert_eq!(tag.machine, Machine::Handoff);
        if tag.op != self.gen {
            return;
        }
        if self.listing {
            self.listing = false;
            self.next_step();
            if let Ok(Response::Partitions(ps)) = answer {
                let (misplaced, placed): (Vec<u32>, Vec<u32>) =
                    ps.into_iter().partition(|&p| topo.has_ring() && self.misplaced(topo, p));
                self.queue = misplaced.into();
                self.placed = placed.into_iter().collect();
                self.left = self.queue.iter().copied().collect();
            }
            return self.start_next(now_us, topo);
        }
        let Some(mut t) = self.current.take() else { return };
        let ok = match (&mut t.step, answer) {
            (Step::Snapshot, Ok(Response::Snapshot(snapshot))) => {
                t.pending = snapshot.iter().filter(|r| !t.acked.contains(*r)).cloned().collect();
                self.stats.keys_resumed += (snapshot.len() - t.pending.len()) as u64;
                t.snapshot = snapshot;
                self.read_chunk(now_us, topo, t);
                return;
            }
            (Step::Read, Ok(Response::Objects(entries))) => {
                let bytes: u64 = entries.iter().map(|(k, o)| (k.len() + o.encoded_len_hint()) as u64).sum();
                t.bytes += bytes;
                self.stats.bytes_sent += bytes;
                if let Some(wait) = (bytes * 1_000_000).checked_div(self.cfg.bytes_per_sec) {
                    self.pace_at = self.pace_at.max(now_us) + wait;
                }
                t.step = Step::Send { waiting: Awaiting::new(t.targets.len()) };
                self.next_step();
                for (i, &to) in t.targets.clone().iter().enumerate() {
                    self.send_idx(now_us, i as u32, to, t.p, Request::MergeBatch { p: t.p, entries: entries.clone() });
                }
                self.current = Some(t);
                return;
            }
            (Step::Send { waiting }, Ok(Response::Done)) => {
                if !waiting.answer(tag.idx) || !waiting.done() {
                    self.current = Some(t);
                    return;
                }
                t.at = (t.at + self.cfg.chunk).min(t.pending.len());
                self.resume_changes += 1;
                self.read_chunk(now_us, topo, t);
                return;
            }
            (Step::Drop, Ok(Response::Flag(dropped))) => {
                if dropped {
                    self.resume_changes += 1;
                    self.left.remove(&t.p);
                    self.stats.partitions_handed_off += 1;
                    self.stats.keys_handed_off += t.snapshot.len() as u64;
                } else {
                    // Written meanwhile: the next round sends what changed.
                    self.remember(t);
                }
                true
            }
            (Step::Send { .. }, Err(_)) => {
                if let Some(&to) = t.targets.get(tag.idx as usize) {
                    self.failed.insert(to);
                }
                self.remember(t);
                false
            }
            _ => {
                self.remember(t);
                false
            }
        };
        if !ok {
            self.stats.postponed += 1;
        }
        self.next_step();
        self.start_next(now_us, topo);
    }

    /// Reads the next chunk of what is pending (once the pace allows), or
    /// drops the partition when every chunk is delivered.
    fn read_chunk(&mut self, now_us: u64, topo: &Topology, mut t: Transfer) {
        self.next_step();
        let me = topo.me();
        if t.at >= t.pending.len() {
            if t.snapshot.is_empty() {
                return self.start_next(now_us, topo);
            }
            t.step = Step::Drop;
            let (p, snapshot) = (t.p, t.snapshot.clone());
            self.current = Some(t);
            return self.send(now_us, me, p, Request::DropPartition { p, snapshot });
        }
        if self.pace_at > now_us {
            t.step = Step::Paced;
            self.current = Some(t);
            self.timers.arm(self.pace_at, 0, Timer::Pace);
            return;
        }
        let end = (t.at + self.cfg.chunk).min(t.pending.len());
        let records = t.pending[t.at..end].to_vec();
        t.step = Step::Read;
        let p = t.p;
        self.current = Some(t);
        self.send(now_us, me, p, Request::ReadRecords { records });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::Failure;
    use crate::version::Object;

    fn drain(h: &mut Handoff) -> Vec<Outgoing> {
        std::iter::from_fn(|| h.poll_outgoing()).collect()
    }

    #[test]
    fn a_misplaced_partition_is_streamed_to_every_replica_then_dropped() {
        // x holds data of partition 0, whose replicas are a, b, c.
        let walk = ["a", "b", "c", "x"].map(String::from).to_vec();
        let t = Topology::from_walks("x", 3, vec![walk; 2], &[]);
        let mut h = Handoff::new(HandoffConfig { chunk: 1, ..HandoffConfig::default() }, 0, 0);
        h.handle_timeout(2_000_000, &t);
        let list = drain(&mut h);
        h.handle_response(1, &t, list[0].tag, Ok(Response::Partitions(vec![0])));
        let snap = drain(&mut h);
        assert!(matches!(snap[0].req, Request::Snapshot { p: 0 }));
        let keys = vec![(b"k1".to_vec(), RecordId(1)), (b"k2".to_vec(), RecordId(2))];
        h.handle_response(2, &t, snap[0].tag, Ok(Response::Snapshot(keys.clone())));
        for _ in 0..2 {
            let read = drain(&mut h);
            assert!(matches!(&read[0].req, Request::ReadRecords { records } if records.len() == 1));
            h.handle_response(3, &t, read[0].tag, Ok(Response::Objects(vec![(b"k".to_vec(), Object::default())])));
            let sends = drain(&mut h);
            assert_eq!(sends.len(), 3, "one copy per replica");
            // The first replica's acknowledgement, duplicated, is not the
            // others'.
            h.handle_response(4, &t, sends[0].tag, Ok(Response::Done));
            h.handle_response(4, &t, sends[0].tag, Ok(Response::Done));
            h.handle_response(4, &t, sends[0].tag, Ok(Response::Done));
            assert!(drain(&mut h).is_empty());
            for s in &sends[1..] {
                h.handle_response(4, &t, s.tag, Ok(Response::Done));
            }
        }
        let drop = drain(&mut h);
        assert!(matches!(&drop[0].req, Request::DropPartition { p: 0, snapshot } if *snapshot == keys));
        h.handle_response(5, &t, drop[0].tag, Ok(Response::Flag(true)));
        assert_eq!(h.stats().partitions_handed_off, 1);
        assert!(!h.busy());
    }

    #[test]
    fn a_partition_listed_in_place_is_held_as_soon_as_the_ring_moves_it() {
        // x replicates partition 0 (x, a, b) until the ring gives it to c.
        let before = Topology::from_walks("x", 3, vec![["x", "a", "b", "c"].map(String::from).to_vec()], &[]);
        let after = Topology::from_walks("x", 3, vec![["a", "b", "c", "x"].map(String::from).to_vec()], &[]);
        let mut h = Handoff::new(HandoffConfig::default(), 0, 0);
        h.handle_timeout(2_000_000, &before);
        let list = drain(&mut h);
        h.handle_response(1, &before, list[0].tag, Ok(Response::Partitions(vec![0])));
        assert!(h.holding(&before).is_empty(), "in place");
        assert_eq!(h.holding(&after), [0].into(), "held before the next listing sees it misplaced");
    }

    #[test]
    fn nothing_is_dropped_while_a_replica_is_down_or_fails() {
        let walk = ["a", "b", "c", "x"].map(String::from).to_vec();
        let down = Topology::from_walks("x", 3, vec![walk.clone(); 2], &["b"]);
        let mut h = Handoff::new(HandoffConfig::default(), 0, 0);
        h.handle_timeout(2_000_000, &down);
        let list = drain(&mut h);
        h.handle_response(1, &down, list[0].tag, Ok(Response::Partitions(vec![0, 1])));
        assert!(drain(&mut h).is_empty());
        assert_eq!(h.stats().postponed, 2);
        let up = Topology::from_walks("x", 3, vec![walk; 2], &[]);
        h.handle_timeout(4_000_000, &up);
        let list = drain(&mut h);
        h.handle_response(1, &up, list[0].tag, Ok(Response::Partitions(vec![0])));
        let snap = drain(&mut h);
        h.handle_response(2, &up, snap[0].tag, Ok(Response::Snapshot(vec![(b"k".to_vec(), RecordId(1))])));
        let read = drain(&mut h);
        h.handle_response(3, &up, read[0].tag, Ok(Response::Objects(vec![])));
        let sends = drain(&mut h);
        h.handle_response(4, &up, sends[0].tag, Err(Failure::new("reset")));
        assert!(drain(&mut h).is_empty(), "no drop after a failed copy");
        assert!(!h.busy());
    }

    /// Runs one round up to the snapshot of partition 0 and answers it.
    fn start_round(h: &mut Handoff, t: &Topology, now: u64, snapshot: Vec<(Vec<u8>, RecordId)>) {
        h.handle_timeout(now, t);
        let list = drain(h);
        h.handle_response(now, t, list[0].tag, Ok(Response::Partitions(vec![0])));
        let snap = drain(h);
        assert!(matches!(snap[0].req, Request::Snapshot { p: 0 }));
        h.handle_response(now, t, snap[0].tag, Ok(Response::Snapshot(snapshot)));
    }

    fn records(ids: &[(&str, u64)]) -> Vec<(Vec<u8>, RecordId)> {
        ids.iter().map(|(k, id)| (k.as_bytes().to_vec(), RecordId(*id))).collect()
    }

    #[test]
    fn a_broken_stream_resumes_without_resending_what_every_target_has() {
        let walk = ["a", "b", "c", "x"].map(String::from).to_vec();
        let t = Topology::from_walks("x", 3, vec![walk; 2], &[]);
        let mut h = Handoff::new(HandoffConfig { chunk: 2, ..HandoffConfig::default() }, 0, 0);
        let first = records(&[("k1", 1), ("k2", 2), ("k3", 3), ("k4", 4)]);
        start_round(&mut h, &t, 2_000_000, first);
        // Chunk one (k1, k2) reaches every target.
        let read = drain(&mut h);
        h.handle_response(1, &t, read[0].tag, Ok(Response::Objects(vec![(b"k1".to_vec(), Object::default())])));
        for s in drain(&mut h) {
            h.handle_response(2, &t, s.tag, Ok(Response::Done));
        }
        // Chunk two breaks at one target (it restarted).
        let read = drain(&mut h);
        assert!(matches!(&read[0].req, Request::ReadRecords { records } if records[0].0 == b"k3"));
        h.handle_response(3, &t, read[0].tag, Ok(Response::Objects(vec![])));
        let sends = drain(&mut h);
        h.handle_response(4, &t, sends[0].tag, Ok(Response::Done));
        h.handle_response(4, &t, sends[1].tag, Err(Failure::new("connection reset")));
        assert!(!h.busy());
        assert_eq!(h.progress(), Progress { partitions: 1, ..Progress::default() }, "still to move");
        // Next round: k1 was rewritten meanwhile (a new record id).
        let second = records(&[("k1", 9), ("k2", 2), ("k3", 3), ("k4", 4)]);
        start_round(&mut h, &t, 4_000_000, second.clone());
        let read = drain(&mut h);
        let Request::ReadRecords { records: sent } = &read[0].req else { panic!("{:?}", read[0].req) };
        assert_eq!(sent, &records(&[("k1", 9), ("k3", 3)]), "k2 is not sent again; k1 changed, k3 never arrived");
        assert_eq!(h.stats().keys_resumed, 1);
        let p = h.progress();
        assert_eq!((p.partitions, p.keys_left, p.keys_total), (1, 3, 4));
        h.handle_response(5, &t, read[0].tag, Ok(Response::Objects(vec![])));
        for s in drain(&mut h) {
            h.handle_response(6, &t, s.tag, Ok(Response::Done));
        }
        let read = drain(&mut h);
        assert!(matches!(&read[0].req, Request::ReadRecords { records } if *records == records_of(&[("k4", 4)])));
        h.handle_response(7, &t, read[0].tag, Ok(Response::Objects(vec![])));
        for s in drain(&mut h) {
            h.handle_response(8, &t, s.tag, Ok(Response::Done));
        }
        let drop = drain(&mut h);
        assert!(
            matches!(&drop[0].req, Request::DropPartition { snapshot, .. } if *snapshot == second),
            "the whole partition is dropped, resumed records included"
        );
    }

    #[test]
    fn a_restarted_sender_resumes_from_what_it_saved() {
        let walk = ["a", "b", "c", "x"].map(String::from).to_vec();
        let t = Topology::from_walks("x", 3, vec![walk; 2], &[]);
        let cfg = HandoffConfig { chunk: 2, ..HandoffConfig::default() };
        let mut h = Handoff::new(cfg.clone(), 0, 0);
        let all = records(&[("k1", 1), ("k2", 2), ("k3", 3), ("k4", 4)]);
        let before = h.resume_changes();
        start_round(&mut h, &t, 2_000_000, all.clone());
        let read = drain(&mut h);
        h.handle_response(1, &t, read[0].tag, Ok(Response::Objects(vec![])));
        for s in drain(&mut h) {
            h.handle_response(2, &t, s.tag, Ok(Response::Done));
        }
        assert!(h.resume_changes() > before, "an acknowledged chunk is worth saving");
        // Killed mid-transfer: the second chunk is in flight. What was saved
        // is what every target acknowledged.
        let saved = h.resume_state();
        let mut fresh = Handoff::new(cfg, 0, 3_000_000);
        assert_eq!(fresh.restore_resume(&saved), Ok(2));
        start_round(&mut fresh, &t, 5_000_000, all);
        let read = drain(&mut fresh);
        let Request::ReadRecords { records: sent } = &read[0].req else { panic!("{:?}", read[0].req) };
        assert_eq!(sent, &records(&[("k3", 3), ("k4", 4)]), "k1 and k2 are not sent again");
        assert_eq!(fresh.stats().keys_resumed, 2);
        // A damaged file is refused whole.
        for cut in 0..saved.len() {
            let mut other = Handoff::new(HandoffConfig::default(), 0, 0);
            assert!(other.restore_resume(&saved[..cut]).is_err(), "cut at {cut}");
            assert_eq!(other.resume_state(), Handoff::new(HandoffConfig::default(), 0, 0).resume_state());
        }
    }

    fn records_of(ids: &[(&str, u64)]) -> Vec<(Vec<u8>, RecordId)> {
        records(ids)
    }

    #[test]
    fn a_resume_is_forgotten_when_the_targets_change() {
        let walk = ["a", "b", "c", "x"].map(String::from).to_vec();
        let t = Topology::from_walks("x", 3, vec![walk; 2], &[]);
        let mut h = Handoff::new(HandoffConfig { chunk: 1, ..HandoffConfig::default() }, 0, 0);
        start_round(&mut h, &t, 2_000_000, records(&[("k1", 1), ("k2", 2)]));
        let read = drain(&mut h);
        h.handle_response(1, &t, read[0].tag, Ok(Response::Objects(vec![])));
        for s in drain(&mut h) {
            h.handle_response(2, &t, s.tag, Ok(Response::Done));
        }
        let read = drain(&mut h);
        h.handle_response(3, &t, read[0].tag, Err(Failure::new("timeout")));
        // The ring moved: partition 0 now goes to a, b, d.
        let moved = ["a", "b", "d", "x"].map(String::from).to_vec();
        let t2 = Topology::from_walks("x", 3, vec![moved; 2], &[]);
        start_round(&mut h, &t2, 4_000_000, records(&[("k1", 1), ("k2", 2)]));
        let read = drain(&mut h);
        assert!(matches!(&read[0].req, Request::ReadRecords { records } if records[0].0 == b"k1"), "d has nothing");
        assert_eq!(h.stats().keys_resumed, 0);
    }

    #[test]
    fn chunks_are_paced_to_the_configured_rate() {
        let walk = ["a", "b", "c", "x"].map(String::from).to_vec();
        let t = Topology::from_walks("x", 3, vec![walk; 2], &[]);
        let cfg = HandoffConfig { chunk: 1, bytes_per_sec: 10_000, ..HandoffConfig::default() };
        let mut h = Handoff::new(cfg, 0, 0);
        let now = 2_000_000;
        start_round(&mut h, &t, now, records(&[("k1", 1), ("k2", 2)]));
        let read = drain(&mut h);
        let dot = crate::version::Dot { actor: crate::version::Actor::new(1, 0, 1), counter: 1 };
        let value = Object::apply_write(None, &crate::version::VersionVector::new(), dot, 1, Some(vec![7; 990]));
        let bytes = (2 + value.encoded_len_hint()) as u64;
        h.handle_response(now, &t, read[0].tag, Ok(Response::Objects(vec![(b"k1".to_vec(), value)])));
        for s in drain(&mut h) {
            h.handle_response(now + 10, &t, s.tag, Ok(Response::Done));
        }
        assert!(drain(&mut h).is_empty(), "the next chunk waits for the pace");
        let due = now + bytes * 1_000_000 / 10_000;
        assert_eq!(h.next_deadline(), Some(due));
        h.handle_timeout(due - 1, &t);
        assert!(drain(&mut h).is_empty());
        h.handle_timeout(due, &t);
        let read = drain(&mut h);
        assert!(matches!(&read[0].req, Request::ReadRecords { records } if records[0].0 == b"k2"));
        assert_eq!(h.stats().bytes_sent, bytes);
    }

    #[test]
    fn a_target_that_fails_is_not_sent_to_again_this_round() {
        let walk = ["a", "b", "c", "x"].map(String::from).to_vec();
        let t = Topology::from_walks("x", 3, vec![walk; 3], &[]);
        let mut h = Handoff::new(HandoffConfig::default(), 0, 0);
        h.handle_timeout(2_000_000, &t);
        let list = drain(&mut h);
        h.handle_response(1, &t, list[0].tag, Ok(Response::Partitions(vec![0, 1, 2])));
        let snap = drain(&mut h);
        h.handle_response(2, &t, snap[0].tag, Ok(Response::Snapshot(records(&[("k", 1)]))));
        let read = drain(&mut h);
        h.handle_response(3, &t, read[0].tag, Ok(Response::Objects(vec![])));
        let sends = drain(&mut h);
        // b (the second target) refuses: it was killed. The detector does not
        // know yet, so b still looks alive.
        h.handle_response(4, &t, sends[1].tag, Err(Failure::new("connection refused")));
        assert!(drain(&mut h).is_empty(), "partitions 1 and 2 also go to b: they wait for the next round");
        assert!(!h.busy());
        h.handle_timeout(5_000_000, &t);
        assert!(matches!(drain(&mut h)[0].req, Request::PartitionsWithData), "the next round tries again");
    }

    #[test]
    fn a_round_waits_while_the_node_streams_as_much_as_it_may() {
        let walk = ["a", "b", "c", "x"].map(String::from).to_vec();
        let t = Topology::from_walks("x", 3, vec![walk; 1], &[]);
        let mut h = Handoff::new(HandoffConfig::default(), 0, 0);
        h.set_may_start(false);
        h.handle_timeout(2_000_000, &t);
        assert!(drain(&mut h).is_empty(), "no listing while other shards use the node's streams");
        assert_eq!(h.next_deadline(), Some(2_500_000), "tried again soon");
        h.set_may_start(true);
        h.handle_timeout(2_500_000, &t);
        assert!(matches!(drain(&mut h)[0].req, Request::PartitionsWithData));
    }
}
