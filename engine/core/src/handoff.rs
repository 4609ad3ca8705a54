//! Ownership handoff as a state machine: data that is not where the ring
//! says moves there.
//!
//! Every `interval_us` the machine asks its store which partitions it holds
//! data for. A partition is in the right place when this node is one of its
//! replicas and this shard is the one pinned to it; otherwise (the ring
//! changed, or data arrived while the ring was still forming) a snapshot of
//! its keys is streamed in chunks to every replica of the partition, merged
//! durably there, and only when every replica acknowledged every chunk is
//! the partition dropped here, durably, and only if it is still exactly the
//! snapshot (a write that landed meanwhile keeps it for the next round).
//! A partition with a replica down waits: its data is kept until the
//! replica is back.
//!
//! Bounds: one partition at a time, one chunk of at most `chunk` keys in
//! flight, every request with a deadline.

use crate::effects::{Answer, Awaiting, Deadlines, Machine, Outbox, Outgoing, RecordId, Request, Response, Tag};
use crate::topology::{MemberId, Topology};
use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct HandoffConfig {
    pub interval_us: u64,
    pub chunk: usize,
    pub call_timeout_us: u64,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig { interval_us: 2_000_000, chunk: 256, call_timeout_us: 30_000_000 }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandoffStats {
    pub partitions_handed_off: u64,
    pub keys_handed_off: u64,
    pub postponed: u64,
}

#[derive(Debug)]
enum Step {
    Snapshot,
    Read,
    Send { waiting: Awaiting },
    Drop,
}

#[derive(Debug)]
struct Transfer {
    p: u32,
    targets: Vec<MemberId>,
    snapshot: Vec<(Vec<u8>, RecordId)>,
    /// Index of the first key of the chunk in flight.
    at: usize,
    step: Step,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Round,
    Call,
}

pub struct Handoff {
    cfg: HandoffConfig,
    shard: u16,
    /// Partitions still to look at this round.
    queue: VecDeque<u32>,
    listing: bool,
    current: Option<Transfer>,
    /// Bumped per request, so a late answer is not taken for the next one.
    gen: u64,
    deadline: Option<u64>,
    timers: Deadlines<Timer>,
    out: Outbox,
    stats: HandoffStats,
}

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
            timers,
            out: Outbox::default(),
            stats: HandoffStats::default(),
        }
    }

    pub fn stats(&self) -> HandoffStats {
        self.stats
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
                Timer::Round => {
                    self.timers.arm(now_us + self.cfg.interval_us, 0, Timer::Round);
                    if !self.busy() && topo.has_ring() {
                        self.listing = true;
                        self.next_step();
                        self.send(now_us, topo.me(), 0, Request::PartitionsWithData);
                    }
                }
                Timer::Call => {
                    self.deadline = None;
                    self.postpone(now_us, topo);
                }
            }
        }
    }

    /// Gives up on the current partition (or listing) until the next round.
    fn postpone(&mut self, now_us: u64, topo: &Topology) {
        self.listing = false;
        if self.current.take().is_some() {
            self.stats.postponed += 1;
        }
        self.next_step();
        self.start_next(now_us, topo);
    }

    fn misplaced(&self, topo: &Topology, p: u32) -> bool {
        !(topo.is_primary(p, topo.me()) && topo.local_shard(p) == self.shard)
    }

    /// Starts the next misplaced partition whose replicas are all up.
    fn start_next(&mut self, now_us: u64, topo: &Topology) {
        while let Some(p) = self.queue.pop_front() {
            if !topo.has_ring() || !self.misplaced(topo, p) {
                continue;
            }
            let targets = topo.primaries(p).to_vec();
            if targets.iter().any(|&t| !topo.alive(t)) {
                // Keep the data until every replica is back.
                self.stats.postponed += 1;
                continue;
            }
            self.current = Some(Transfer { p, targets, snapshot: Vec::new(), at: 0, step: Step::Snapshot });
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
                self.queue = ps.into_iter().collect();
            }
            return self.start_next(now_us, topo);
        }
        let Some(mut t) = self.current.take() else { return };
        let ok = match (&mut t.step, answer) {
            (Step::Snapshot, Ok(Response::Snapshot(snapshot))) => {
                t.snapshot = snapshot;
                self.read_chunk(now_us, topo, t);
                return;
            }
            (Step::Read, Ok(Response::Objects(entries))) => {
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
                t.at = (t.at + self.cfg.chunk).min(t.snapshot.len());
                self.read_chunk(now_us, topo, t);
                return;
            }
            (Step::Drop, Ok(Response::Flag(dropped))) => {
                if dropped {
                    self.stats.partitions_handed_off += 1;
                    self.stats.keys_handed_off += t.snapshot.len() as u64;
                }
                true
            }
            _ => false,
        };
        if !ok {
            self.stats.postponed += 1;
        }
        self.next_step();
        self.start_next(now_us, topo);
    }

    /// Reads the next chunk of the snapshot, or drops the partition when
    /// every chunk is delivered.
    fn read_chunk(&mut self, now_us: u64, topo: &Topology, mut t: Transfer) {
        self.next_step();
        let me = topo.me();
        if t.at >= t.snapshot.len() {
            if t.snapshot.is_empty() {
                return self.start_next(now_us, topo);
            }
            t.step = Step::Drop;
            let (p, snapshot) = (t.p, t.snapshot.clone());
            self.current = Some(t);
            return self.send(now_us, me, p, Request::DropPartition { p, snapshot });
        }
        let end = (t.at + self.cfg.chunk).min(t.snapshot.len());
        let records = t.snapshot[t.at..end].to_vec();
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
}
