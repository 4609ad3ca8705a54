//! Hinted handoff as a state machine: delivering the writes a shard holds
//! for members that were down.
//!
//! Every `interval_us` the machine asks its store which members it holds
//! hints for. Each such member that the detector believes up is first
//! pinged (the detector may lag); if it answers, its hints go over in
//! batches grouped by partition, each merged durably at the owner, and a
//! batch is retired here only after every part of it was acknowledged. A
//! hint replaced by a newer one while its batch travelled stays for the
//! next round (the store checks the record id). Between batches the machine
//! pauses `pause_us`, so a returning member is not flooded while it also
//! serves traffic.
//!
//! Bounds: at most `max_deliveries` members are delivered to at once, one
//! batch each of at most `batch` hints; every request has a deadline, and a
//! delivery that fails or times out waits for the next round.

use crate::effects::{Answer, Awaiting, Deadlines, Machine, Outbox, Outgoing, RecordId, Request, Response, Tag};
use crate::keyspace::partition_of;
use crate::topology::{MemberId, Topology};
use crate::version::Object;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone)]
pub struct HintConfig {
    pub interval_us: u64,
    pub batch: usize,
    pub pause_us: u64,
    pub ping_timeout_us: u64,
    pub call_timeout_us: u64,
    pub max_deliveries: usize,
    /// Known-bad variant for the simulator: retire a batch as soon as it is
    /// sent, before the owner has it durably.
    #[cfg(feature = "bugs")]
    pub bug_retire_before_ack: bool,
}

impl Default for HintConfig {
    fn default() -> Self {
        HintConfig {
            interval_us: 2_000_000,
            batch: 128,
            pause_us: 5_000,
            ping_timeout_us: 1_000_000,
            call_timeout_us: 30_000_000,
            max_deliveries: 4,
            #[cfg(feature = "bugs")]
            bug_retire_before_ack: false,
        }
    }
}

/// What delivery has done so far (for status and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintStats {
    pub rounds: u64,
    pub delivered: u64,
    pub failed_deliveries: u64,
}

/// One member's delivery in progress.
#[derive(Debug)]
enum Step {
    Ping,
    Load,
    /// The batch is out, one message per partition; the parts not yet
    /// acknowledged.
    Send {
        batch: Vec<(Vec<u8>, RecordId)>,
        waiting: Awaiting,
    },
    Retire,
    /// Between batches.
    Pause,
}

#[derive(Debug)]
struct Delivery {
    owner: MemberId,
    step: Step,
    /// Bumped at each step, so a late answer to an old step is ignored.
    gen: u32,
    deadline: u64,
    retired: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Round,
    Step,
}

/// Op id of the round's `HintTargets` request.
const ROUND: u64 = 0;
/// Most parts (partitions) one batch may span; `batch` is capped to it.
const PARTS: usize = 1024;

pub struct HintDelivery {
    cfg: HintConfig,
    deliveries: HashMap<u64, Delivery>,
    next_op: u64,
    round_pending: bool,
    timers: Deadlines<Timer>,
    out: Outbox,
    stats: HintStats,
}

impl HintDelivery {
    pub fn new(cfg: HintConfig, now_us: u64) -> HintDelivery {
        let mut timers = Deadlines::default();
        timers.arm(now_us + cfg.interval_us, ROUND, Timer::Round);
        HintDelivery {
            cfg,
            deliveries: HashMap::new(),
            next_op: 1,
            round_pending: false,
            timers,
            out: Outbox::default(),
            stats: HintStats::default(),
        }
    }

    pub fn stats(&self) -> HintStats {
        self.stats
    }

    /// Members being delivered to now.
    pub fn delivering(&self) -> usize {
        self.deliveries.len()
    }

    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.out.pop()
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next()
    }

    /// A step's requests carry its generation and their index in it.
    fn tag(op: u64, gen: u32) -> Tag {
        Self::part_tag(op, gen, 0)
    }

    fn part_tag(op: u64, gen: u32, part: usize) -> Tag {
        debug_assert!(part < PARTS);
        Tag { machine: Machine::Hints, op, idx: gen * PARTS as u32 + part as u32 }
    }

    /// Starts a round now (`ringkv` tests and a member coming back).
    pub fn round_now(&mut self, now_us: u64, topo: &Topology) {
        if !self.round_pending {
            self.round_pending = true;
            self.out.push(Self::tag(ROUND, 0), topo.me(), 0, Request::HintTargets);
        }
        let _ = now_us;
    }

    pub fn handle_timeout(&mut self, now_us: u64, topo: &Topology) {
        while let Some((op, kind)) = self.timers.pop_due(now_us) {
            match kind {
                Timer::Round => {
                    self.timers.arm(now_us + self.cfg.interval_us, ROUND, Timer::Round);
                    self.round_now(now_us, topo);
                }
                Timer::Step => self.step_timeout(now_us, topo, op),
            }
        }
    }

    fn step_timeout(&mut self, now_us: u64, topo: &Topology, op: u64) {
        let Some(d) = self.deliveries.get_mut(&op) else { return };
        if matches!(d.step, Step::Pause) {
            // The pause is over: the next batch.
            d.step = Step::Load;
            d.gen += 1;
            let (owner, gen) = (d.owner, d.gen);
            d.deadline = now_us + self.cfg.call_timeout_us;
            self.timers.arm(d.deadline, op, Timer::Step);
            let req = Request::HintBatch { owner, max: self.cfg.batch.min(PARTS) };
            self.out.push(Self::tag(op, gen), topo.me(), 0, req);
        } else {
            self.end(op, false);
        }
    }

    fn end(&mut self, op: u64, ok: bool) {
        if let Some(d) = self.deliveries.remove(&op) {
            self.timers.cancel(d.deadline, op, Timer::Step);
            if !ok {
                self.stats.failed_deliveries += 1;
            }
        }
    }

    /// Moves delivery `op` to `step`, with a deadline `timeout_us` from now.
    fn advance(&mut self, now_us: u64, op: u64, step: Step, timeout_us: u64) -> Option<(MemberId, u32)> {
        let d = self.deliveries.get_mut(&op)?;
        self.timers.cancel(d.deadline, op, Timer::Step);
        d.step = step;
        d.gen += 1;
        d.deadline = now_us + timeout_us;
        self.timers.arm(d.deadline, op, Timer::Step);
        Some((d.owner, d.gen))
    }

    pub fn handle_response(&mut self, now_us: u64, topo: &Topology, tag: Tag, answer: Answer) {
        debug_assert_eq!(tag.machine, Machine::Hints);
        if tag.op == ROUND {
            self.round_pending = false;
            if let Ok(Response::HintTargets(targets)) = answer {
                self.stats.rounds += 1;
                self.start_deliveries(now_us, topo, targets);
            }
            return;
        }
        let Some(d) = self.deliveries.get_mut(&tag.op) else { return };
        let (gen, part) = (tag.idx / PARTS as u32, tag.idx % PARTS as u32);
        if d.gen != gen {
            return;
        }
        let op = tag.op;
        match (&mut d.step, answer) {
            (Step::Ping, Ok(Response::Done)) => {
                if let Some((owner, gen)) = self.advance(now_us, op, Step::Load, self.cfg.call_timeout_us) {
                    let req = Request::HintBatch { owner, max: self.cfg.batch.min(PARTS) };
                    self.out.push(Self::tag(op, gen), topo.me(), 0, req);
                }
            }
            (Step::Load, Ok(Response::Hints(hints))) => self.send_batch(now_us, topo, op, hints),
            (Step::Send { waiting, .. }, Ok(Response::Done)) => {
                if waiting.answer(part) && waiting.done() {
                    self.retire(now_us, topo, op);
                }
            }
            (Step::Retire, Ok(Response::Count(n))) => {
                self.stats.delivered += n as u64;
                if n == 0 {
                    // Every hint of the batch was replaced while it
                    // travelled (writes still arriving): next round.
                    self.end(op, true);
                } else {
                    if let Some(d) = self.deliveries.get_mut(&op) {
                        d.retired += n;
                    }
                    self.advance(now_us, op, Step::Pause, self.cfg.pause_us);
                }
            }
            _ => self.end(op, false),
        }
    }

    fn start_deliveries(&mut self, now_us: u64, topo: &Topology, targets: Vec<(MemberId, usize)>) {
        for (owner, count) in targets {
            if self.deliveries.len() >= self.cfg.max_deliveries {
                break;
            }
            if count == 0 || !topo.alive(owner) || owner == topo.me() {
                continue;
            }
            if self.deliveries.values().any(|d| d.owner == owner) {
                continue;
            }
            let op = self.next_op;
            self.next_op += 1;
            let deadline = now_us + self.cfg.ping_timeout_us;
            self.deliveries.insert(op, Delivery { owner, step: Step::Ping, gen: 0, deadline, retired: 0 });
            self.timers.arm(deadline, op, Timer::Step);
            self.out.push(Self::tag(op, 0), owner, 0, Request::Ping);
        }
    }

    fn send_batch(&mut self, now_us: u64, topo: &Topology, op: u64, hints: Vec<(Vec<u8>, RecordId, Object)>) {
        if hints.is_empty() {
            return self.end(op, true);
        }
        let mut by_partition: BTreeMap<u32, Vec<(Vec<u8>, Object)>> = BTreeMap::new();
        let mut batch = Vec::with_capacity(hints.len());
        for (key, id, obj) in hints {
            by_partition.entry(partition_of(&key, topo.partitions())).or_default().push((key.clone(), obj));
            batch.push((key, id));
        }
        let waiting = Awaiting::new(by_partition.len());
        let Some((owner, gen)) = self.advance(now_us, op, Step::Send { batch, waiting }, self.cfg.call_timeout_us)
        else {
            return;
        };
        for (part, (p, entries)) in by_partition.into_iter().enumerate() {
            self.out.push(Self::part_tag(op, gen, part), owner, p, Request::MergeBatch { p, entries });
        }
        #[cfg(feature = "bugs")]
        if self.cfg.bug_retire_before_ack {
            self.retire(now_us, topo, op);
        }
    }

    fn retire(&mut self, now_us: u64, topo: &Topology, op: u64) {
        let Some(d) = self.deliveries.get_mut(&op) else { return };
        let Step::Send { batch, .. } = std::mem::replace(&mut d.step, Step::Retire) else { return };
        let Some((owner, gen)) = self.advance(now_us, op, Step::Retire, self.cfg.call_timeout_us) else { return };
        self.out.push(Self::tag(op, gen), topo.me(), 0, Request::RetireHints { owner, delivered: batch });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::Failure;
    use crate::version::{Actor, VersionVector};

    fn topo(down: &[&str]) -> Topology {
        let walk = ["a", "b", "c"].map(String::from).to_vec();
        Topology::from_walks("a", 3, vec![walk; 4], down)
    }

    fn obj(v: &str) -> Object {
        let ctx = VersionVector::new();
        let dot = Object::next_dot(None, &ctx, Actor::new(1, 0, 1));
        Object::apply_write(None, &ctx, dot, 0, Some(v.as_bytes().to_vec()))
    }

    fn drain(h: &mut HintDelivery) -> Vec<Outgoing> {
        std::iter::from_fn(|| h.poll_outgoing()).collect()
    }

    fn one(h: &mut HintDelivery) -> Outgoing {
        let mut v = drain(h);
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    #[test]
    fn hints_go_to_a_live_owner_and_are_retired_only_after_its_ack() {
        let t = topo(&[]);
        let b = MemberId::of("b");
        let mut h = HintDelivery::new(HintConfig::default(), 0);
        h.handle_timeout(2_000_000, &t);
        let round = one(&mut h);
        assert!(matches!(round.req, Request::HintTargets));
        h.handle_response(1, &t, round.tag, Ok(Response::HintTargets(vec![(b, 2), (MemberId::of("c"), 0)])));
        let ping = one(&mut h);
        assert_eq!(ping.to, b);
        h.handle_response(2, &t, ping.tag, Ok(Response::Done));
        let load = one(&mut h);
        assert!(matches!(load.req, Request::HintBatch { owner, .. } if owner == b));
        // Two keys of different partitions: two parts.
        let mut keys = (0..).map(|i| format!("k{i}").into_bytes());
        let k1 = keys.next().unwrap();
        let k2 = keys.find(|k| partition_of(k, 4) != partition_of(&k1, 4)).unwrap();
        let hints = vec![(k1, RecordId(1), obj("x")), (k2, RecordId(2), obj("y"))];
        h.handle_response(3, &t, load.tag, Ok(Response::Hints(hints)));
        let sends = drain(&mut h);
        assert_eq!(sends.len(), 2);
        assert!(sends.iter().all(|o| o.to == b && matches!(o.req, Request::MergeBatch { .. })));
        for (i, s) in sends.iter().enumerate() {
            assert!(drain(&mut h).is_empty(), "nothing retired before every part is acknowledged");
            h.handle_response(4 + i as u64, &t, s.tag, Ok(Response::Done));
            if i + 1 < sends.len() {
                // A duplicated acknowledgement of the same part counts once.
                h.handle_response(4 + i as u64, &t, s.tag, Ok(Response::Done));
            }
        }
        let retire = one(&mut h);
        match &retire.req {
            Request::RetireHints { owner, delivered } => {
                assert_eq!(*owner, b);
                assert_eq!(delivered.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        h.handle_response(10, &t, retire.tag, Ok(Response::Count(2)));
        assert_eq!(h.stats().delivered, 2);
        // After the pause, the next batch; an empty one ends the delivery.
        h.handle_timeout(10 + 5_000, &t);
        let next = one(&mut h);
        h.handle_response(6_000, &t, next.tag, Ok(Response::Hints(vec![])));
        assert_eq!(h.delivering(), 0);
    }

    #[test]
    fn a_down_or_silent_owner_keeps_its_hints() {
        let t = topo(&["b"]);
        let mut h = HintDelivery::new(HintConfig::default(), 0);
        h.round_now(0, &t);
        let round = one(&mut h);
        h.handle_response(1, &t, round.tag, Ok(Response::HintTargets(vec![(MemberId::of("b"), 5)])));
        assert!(drain(&mut h).is_empty(), "the detector says b is down");
        let t = topo(&[]);
        h.round_now(2, &t);
        let round = one(&mut h);
        h.handle_response(3, &t, round.tag, Ok(Response::HintTargets(vec![(MemberId::of("b"), 5)])));
        let ping = one(&mut h);
        assert!(matches!(ping.req, Request::Ping));
        h.handle_timeout(3 + 1_000_000, &t);
        assert_eq!(h.delivering(), 0, "no answer to the ping: nothing is sent");
        assert_eq!(h.stats().failed_deliveries, 1);
        // A failed send keeps the batch too.
        h.round_now(2_000_000, &t);
        let round = one(&mut h);
        h.handle_response(2_000_001, &t, round.tag, Ok(Response::HintTargets(vec![(MemberId::of("b"), 5)])));
        let ping = one(&mut h);
        h.handle_response(2_000_002, &t, ping.tag, Ok(Response::Done));
        let load = one(&mut h);
        h.handle_response(2_000_003, &t, load.tag, Ok(Response::Hints(vec![(b"k".to_vec(), RecordId(1), obj("x"))])));
        let send = one(&mut h);
        h.handle_response(2_000_004, &t, send.tag, Err(Failure::new("reset")));
        assert!(drain(&mut h).is_empty(), "nothing retired");
        assert_eq!(h.delivering(), 0);
    }
}
