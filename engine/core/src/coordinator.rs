//! The read and write coordinator of one shard, as a state machine.
//!
//! A client request enters with [`Coordinator::get`] or
//! [`Coordinator::write`]; the machine decides whom to ask and queues the
//! requests ([`Coordinator::poll_outgoing`]), the shell carries them out and
//! feeds each answer back ([`Coordinator::handle_response`]), and the
//! machine queues the client's answer ([`Coordinator::poll_answer`]) once
//! it is decided. Time is an input: [`Coordinator::next_deadline`] says when
//! the machine next needs [`Coordinator::handle_timeout`]. One machine holds
//! every operation of its shard, so the shell needs one timer, not one per
//! request.
//!
//! Write: plan one slot per preference-list replica (a down one is stood in
//! for by the next live fallback, which holds a hint for it: sloppy quorum),
//! `Unavailable` before anything is written if too few slots; apply the
//! write on this replica (which mints the dot); send the new object to the
//! other slots; answer after `w` acknowledgements (the local one after its
//! fsync when durable); a replica that fails mid-write is replaced by a
//! spare fallback holding a hint. The operation stays until every slot is
//! settled or its deadline passes, so the remaining copies are still made
//! after the client has its answer.
//!
//! Read: ask `r` live replicas (this one first: no network), answer once `r`
//! answered with everything merged causally; a replica that fails, or has
//! not answered after `hedge_after_us`, is backed up by the next live one.
//! A replica a read had to hedge around is asked after the others for
//! [`SLOW_FOR_US`], or until it answers: a silent replica (paused,
//! partitioned) would otherwise cost every read the hedge delay until the
//! failure detector calls it down, seconds later.
//! When every asked replica answered (or the deadline passed), replicas
//! whose copy lacks something the merge has get the merged object (read
//! repair, best effort: anti-entropy covers what it misses).
//!
//! Reads during a ring change: the ring switches at once and data follows
//! by streams, so a read whose `r` replicas are all new owners could miss a
//! value written before the switch. A read therefore also asks every live
//! member that still holds the partition ([`Topology::holders`]: the old
//! owners until their stream ends) and merges what they have. Holders do
//! not count toward `r`; the answer waits for them at most as long as a
//! write waits for a silent replica (`stall_after_us`), then goes without.
//!
//! Bounds: at most `max_ops` client operations in flight (beyond:
//! `Overloaded`, at once) and at most `max_repairs` read repairs (beyond:
//! skipped and counted).

use crate::effects::{Answer, Deadlines, Machine, Outbox, Outgoing, Request, Response, Tag, WriteContext};
use crate::keyspace::partition_of;
use crate::quorum::{live_targets, Level, Progress, Quorum, QuorumError, ReadMerge};
use crate::topology::{MemberId, Topology};
use crate::version::Object;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// N, the replication factor.
    pub replicas: usize,
    /// A read asks one more replica when its first ones have not all
    /// answered within twice the p99 of recent replica answers, at least
    /// `min_hedge_us` and at most this long (this long until enough answers
    /// were seen).
    pub hedge_after_us: u64,
    pub min_hedge_us: u64,
    pub max_ops: usize,
    pub max_repairs: usize,
    /// How long a read repair's requests are waited for.
    pub repair_timeout_us: u64,
    /// A write's replica that has not answered within this long (or half
    /// the request's timeout, if shorter) is stood in for by a fallback
    /// holding a hint, as if it had failed: a silent replica (partitioned,
    /// paused) must not keep a write from its quorum until the deadline.
    pub stall_after_us: u64,
    #[cfg(feature = "bugs")]
    pub bugs: Bugs,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            replicas: 3,
            hedge_after_us: 20_000,
            min_hedge_us: 1_000,
            max_ops: 65_536,
            max_repairs: 4_096,
            repair_timeout_us: 2_000_000,
            stall_after_us: 1_000_000,
            #[cfg(feature = "bugs")]
            bugs: Bugs::default(),
        }
    }
}

/// Known-bad variants the simulator must catch. Compiled only with the
/// `bugs` feature, which only the simulator's tests enable.
#[cfg(feature = "bugs")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Bugs {
    /// The coordinator's own copy counts before its fsync.
    pub ack_before_sync: bool,
    /// A replica's repeated acknowledgement counts again toward `w`.
    pub count_duplicate_acks: bool,
    /// Concurrent answers to a read are not kept as siblings.
    pub drop_siblings: bool,
}

/// What a client operation produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A read: everything the replicas knew, merged (`None`: never written).
    Read(Option<Object>),
    /// A write or delete: the key's new object, whose context the client
    /// passes back to supersede it.
    Written(Object),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordError {
    /// Too few live replicas: nothing was written.
    Unavailable(String),
    /// Too few answers in time: a write may be partially applied.
    Timeout(String),
    BadRequest(String),
    /// The local store failed the write before anything was sent.
    Storage(String),
    /// Too many operations in flight on this shard.
    Overloaded(String),
}

impl std::fmt::Display for CoordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CoordError::Unavailable(m)
            | CoordError::Timeout(m)
            | CoordError::BadRequest(m)
            | CoordError::Storage(m)
            | CoordError::Overloaded(m) => f.write_str(m),
        }
    }
}

pub type ClientResult = Result<Outcome, CoordError>;

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoordinatorStats {
    pub reads: u64,
    pub writes: u64,
    pub unavailable: u64,
    pub timeouts: u64,
    pub overloaded: u64,
    pub hedges: u64,
    pub hints: u64,
    pub repairs_sent: u64,
    pub repairs_skipped: u64,
    /// Requests to members still holding a partition a ring change moved.
    pub holder_reads: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Hedge,
    Stall,
    Deadline,
}

/// Tag index of a write's local apply.
const APPLY: u32 = u32::MAX;

fn quorum_error(e: &QuorumError) -> CoordError {
    match e {
        QuorumError::Unavailable { .. } => CoordError::Unavailable(e.to_string()),
        QuorumError::Timeout { .. } => CoordError::Timeout(e.to_string()),
    }
}

/// Names the replicas that failed, and why, after the error.
fn with_failures(e: CoordError, failures: &[String]) -> CoordError {
    if failures.is_empty() {
        return e;
    }
    let more = format!(" [{}]", failures.join("; "));
    match e {
        CoordError::Timeout(m) => CoordError::Timeout(m + &more),
        CoordError::Unavailable(m) => CoordError::Unavailable(m + &more),
        other => other,
    }
}

struct ReadOp {
    token: u64,
    key: Vec<u8>,
    p: u32,
    /// Replicas asked so far, and whether each answered; a tag's index
    /// points in here.
    asked: Vec<(MemberId, bool)>,
    spare: VecDeque<MemberId>,
    quorum: Quorum,
    merge: ReadMerge,
    outstanding: usize,
    answered: bool,
    failures: Vec<String>,
    hedge_at: Option<u64>,
    deadline: u64,
    started_us: u64,
    /// Members outside the preference list still holding the partition
    /// (a ring change moved it and their stream has not ended): asked too,
    /// merged, never counted toward `r`, never repaired.
    holders: Vec<MemberId>,
    /// Holders whose answer the client's answer still waits for.
    holders_pending: usize,
    /// When the holders stop being waited for.
    stall_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Waiting,
    Acked,
    Failed,
}

/// Where one replica's copy of a write goes: the replica itself, or a
/// fallback holding a hint for it.
#[derive(Debug, Clone)]
struct Slot {
    node: MemberId,
    hint_for: Option<MemberId>,
    /// Bumped when the slot is moved to a fallback, so a late answer from
    /// the first target is not taken for the fallback's.
    attempt: u8,
    state: SlotState,
}

impl Slot {
    /// The replica this slot stands for (it counts once toward `w`).
    fn owner(&self) -> MemberId {
        self.hint_for.unwrap_or(self.node)
    }

    fn idx(i: usize, attempt: u8) -> u32 {
        ((i as u32) << 8) | u32::from(attempt)
    }
}

struct WriteOp {
    token: u64,
    key: Vec<u8>,
    p: u32,
    durable: bool,
    slots: Vec<Slot>,
    spare: VecDeque<MemberId>,
    quorum: Quorum,
    obj: Option<Rc<Object>>,
    answered: bool,
    failures: Vec<String>,
    stall_at: Option<u64>,
    deadline: u64,
}

struct RepairOp {
    outstanding: usize,
    deadline: u64,
}

enum Op {
    Read(ReadOp),
    Write(WriteOp),
    Repair(RepairOp),
}

pub struct Coordinator {
    cfg: CoordinatorConfig,
    ops: HashMap<u64, Op>,
    next_op: u64,
    /// Client operations in `ops` (repairs are counted apart).
    client_ops: usize,
    repairs: usize,
    timers: Deadlines<Timer>,
    out: Outbox,
    answers: VecDeque<(u64, ClientResult)>,
    stats: CoordinatorStats,
    /// Recent replica answer times of reads: the hedge delay follows them.
    hedge: crate::latency::RecentLatencies,
    /// Replicas reads hedged around, and until when they are asked last.
    slow: HashMap<MemberId, u64>,
}

/// Replica answers of reads kept for the hedge delay.
const HEDGE_SAMPLES: usize = 256;
/// How long a replica a read hedged around is asked after the others
/// (unless it answers first).
pub const SLOW_FOR_US: u64 = 1_000_000;

impl Coordinator {
    pub fn new(cfg: CoordinatorConfig) -> Coordinator {
        Coordinator {
            ops: HashMap::new(),
            next_op: 1,
            client_ops: 0,
            repairs: 0,
            timers: Deadlines::default(),
            out: Outbox::default(),
            answers: VecDeque::new(),
            hedge: crate::latency::RecentLatencies::new(HEDGE_SAMPLES),
            slow: HashMap::new(),
            stats: CoordinatorStats::default(),
            cfg,
        }
    }

    /// How long a read waits before it asks one more replica, as now derived.
    pub fn hedge_delay_us(&self) -> u64 {
        match self.hedge.p99_us() {
            Some(p99) => (2 * p99).clamp(self.cfg.min_hedge_us, self.cfg.hedge_after_us),
            None => self.cfg.hedge_after_us,
        }
    }

    pub fn stats(&self) -> CoordinatorStats {
        self.stats
    }

    /// Client operations in flight (answered writes still finishing
    /// included).
    pub fn in_flight(&self) -> usize {
        self.client_ops
    }

    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.out.pop()
    }

    /// The next client answer: the token given with the request, and its
    /// result.
    pub fn poll_answer(&mut self) -> Option<(u64, ClientResult)> {
        self.answers.pop_front()
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next()
    }

    fn tag(op: u64, idx: u32) -> Tag {
        Tag { machine: Machine::Coordinator, op, idx }
    }

    fn admit(&mut self, token: u64, topo: &Topology) -> Result<u64, ()> {
        if self.client_ops >= self.cfg.max_ops {
            self.stats.overloaded += 1;
            let msg = format!("this shard already coordinates {} requests", self.client_ops);
            self.answers.push_back((token, Err(CoordError::Overloaded(msg))));
            return Err(());
        }
        if !topo.has_ring() {
            self.stats.unavailable += 1;
            let msg = "this node is still joining the cluster".to_string();
            self.answers.push_back((token, Err(CoordError::Unavailable(msg))));
            return Err(());
        }
        let id = self.next_op;
        self.next_op += 1;
        Ok(id)
    }

    fn refuse(&mut self, token: u64, e: CoordError) {
        if matches!(e, CoordError::Unavailable(_)) {
            self.stats.unavailable += 1;
        }
        self.answers.push_back((token, Err(e)));
    }

    /// How many answers `level` needs for partition `p`, or the error.
    fn needed(&self, topo: &Topology, p: u32, name: &str, level: Level) -> Result<usize, CoordError> {
        let prefs = topo.primaries(p).len();
        let needed =
            level.required(self.cfg.replicas, prefs).map_err(|e| CoordError::BadRequest(format!("{name}={e}")))?;
        if needed > prefs {
            return Err(CoordError::Unavailable(format!(
                "{name}={needed} needs {needed} replicas but the cluster has only {prefs}"
            )));
        }
        Ok(needed)
    }

    /// Starts a client read of `key` at level `r`.
    pub fn get(&mut self, now_us: u64, topo: &Topology, token: u64, key: Vec<u8>, r: Level, timeout_us: u64) {
        let Ok(id) = self.admit(token, topo) else { return };
        let p = partition_of(&key, topo.partitions());
        let needed = match self.needed(topo, p, "r", r) {
            Ok(n) => n,
            Err(e) => return self.refuse(token, e),
        };
        let mut targets = match live_targets(topo.primaries(p), needed, |m| topo.alive(m)) {
            Ok(t) => t,
            Err(e) => return self.refuse(token, quorum_error(&e)),
        };
        // This replica first: its read needs no network.
        if let Some(i) = targets.iter().position(|&t| t == topo.me()) {
            targets[..=i].rotate_right(1);
        }
        if !self.slow.is_empty() {
            self.slow.retain(|_, until| *until > now_us);
            // Stable: the others keep their preference order.
            targets.sort_by_key(|t| self.slow.contains_key(t));
        }
        self.stats.reads += 1;
        let spare: VecDeque<MemberId> = targets.split_off(needed).into();
        let total = targets.len() + spare.len();
        #[allow(unused_mut)]
        let mut merge = ReadMerge::default();
        #[allow(unused_mut)]
        let mut quorum = Quorum::new(total, needed);
        #[cfg(feature = "bugs")]
        {
            merge = merge.dropping_siblings(self.cfg.bugs.drop_siblings);
            quorum = quorum.counting_duplicates(self.cfg.bugs.count_duplicate_acks);
        }
        let deadline = now_us + timeout_us;
        let hedge_at = (!spare.is_empty()).then_some(now_us + self.hedge_delay_us());
        let holders: Vec<MemberId> = topo.holders(p).iter().copied().filter(|&h| topo.alive(h)).collect();
        // A silent holder delays the answer no longer than a silent
        // replica delays a write.
        let stall_at = (!holders.is_empty()).then_some(now_us + self.cfg.stall_after_us.min(timeout_us / 2));
        let mut op = ReadOp {
            token,
            key,
            p,
            asked: Vec::with_capacity(total),
            spare,
            quorum,
            merge,
            outstanding: 0,
            answered: false,
            failures: Vec::new(),
            hedge_at,
            deadline,
            started_us: now_us,
            holders_pending: holders.len(),
            holders,
            stall_at,
        };
        for t in targets.into_iter().chain(op.holders.clone()) {
            Self::ask(&mut self.out, id, &mut op, t);
        }
        self.stats.holder_reads += op.holders.len() as u64;
        self.timers.arm(deadline, id, Timer::Deadline);
        if let Some(at) = hedge_at {
            self.timers.arm(at, id, Timer::Hedge);
        }
        if let Some(at) = stall_at {
            self.timers.arm(at, id, Timer::Stall);
        }
        self.client_ops += 1;
        self.ops.insert(id, Op::Read(op));
    }

    fn ask(out: &mut Outbox, id: u64, op: &mut ReadOp, to: MemberId) {
        let idx = op.asked.len() as u32;
        op.asked.push((to, false));
        op.outstanding += 1;
        out.push(Self::tag(id, idx), to, op.p, Request::Read { key: op.key.clone() });
    }

    /// Starts a client write (`value: None` deletes) at level `w`.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        now_us: u64,
        topo: &Topology,
        token: u64,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        ctx: WriteContext,
        w: Level,
        durable: bool,
        timeout_us: u64,
    ) {
        let Ok(id) = self.admit(token, topo) else { return };
        let p = partition_of(&key, topo.partitions());
        let needed = match self.needed(topo, p, "w", w) {
            Ok(n) => n,
            Err(e) => return self.refuse(token, e),
        };
        let mut spare: VecDeque<MemberId> = topo.fallbacks(p).iter().copied().filter(|&f| topo.alive(f)).collect();
        let mut slots = Vec::with_capacity(topo.primaries(p).len());
        for &primary in topo.primaries(p) {
            let slot = if topo.alive(primary) {
                Some(Slot { node: primary, hint_for: None, attempt: 0, state: SlotState::Waiting })
            } else {
                spare.pop_front().map(|f| Slot {
                    node: f,
                    hint_for: Some(primary),
                    attempt: 0,
                    state: SlotState::Waiting,
                })
            };
            slots.extend(slot);
        }
        if slots.len() < needed {
            let e = QuorumError::Unavailable { needed, live: slots.len() };
            return self.refuse(token, quorum_error(&e));
        }
        self.stats.writes += 1;
        #[allow(unused_mut)]
        let mut quorum = Quorum::new(slots.len(), needed);
        #[cfg(feature = "bugs")]
        {
            quorum = quorum.counting_duplicates(self.cfg.bugs.count_duplicate_acks);
        }
        let deadline = now_us + timeout_us;
        let stall_at = now_us + self.cfg.stall_after_us.min(timeout_us / 2);
        self.out.push(Self::tag(id, APPLY), topo.me(), p, Request::Apply { key: key.clone(), value, ctx });
        self.timers.arm(deadline, id, Timer::Deadline);
        self.timers.arm(stall_at, id, Timer::Stall);
        self.client_ops += 1;
        let op = WriteOp {
            token,
            key,
            p,
            durable,
            slots,
            spare,
            quorum,
            obj: None,
            answered: false,
            failures: Vec::new(),
            stall_at: Some(stall_at),
            deadline,
        };
        self.ops.insert(id, Op::Write(op));
    }

    /// An answer to one of this machine's requests.
    pub fn handle_response(&mut self, now_us: u64, topo: &Topology, tag: Tag, answer: Answer) {
        debug_assert_eq!(tag.machine, Machine::Coordinator);
        let bugs = (self.bug_ack_before_sync(), self.bug_count_duplicates());
        let Some(op) = self.ops.get_mut(&tag.op) else { return };
        let done = match op {
            Op::Read(r) => {
                if matches!(answer, Ok(Response::Object(_))) {
                    self.hedge.record(now_us.saturating_sub(r.started_us));
                    if let Some((from, _)) = r.asked.get(tag.idx as usize) {
                        self.slow.remove(from);
                    }
                }
                Self::read_answer(&mut self.out, &mut self.answers, tag, r, answer)
            }
            Op::Write(w) => {
                Self::write_answer(&mut self.out, &mut self.answers, &mut self.stats, topo, tag, w, answer, bugs)
            }
            Op::Repair(r) => {
                r.outstanding = r.outstanding.saturating_sub(1);
                r.outstanding == 0
            }
        };
        if done {
            self.finish(now_us, tag.op);
        }
    }

    #[cfg(feature = "bugs")]
    fn bug_ack_before_sync(&self) -> bool {
        self.cfg.bugs.ack_before_sync
    }

    #[cfg(not(feature = "bugs"))]
    fn bug_ack_before_sync(&self) -> bool {
        false
    }

    #[cfg(feature = "bugs")]
    fn bug_count_duplicates(&self) -> bool {
        self.cfg.bugs.count_duplicate_acks
    }

    #[cfg(not(feature = "bugs"))]
    fn bug_count_duplicates(&self) -> bool {
        false
    }

    /// Feeds one replica's answer to a read; returns whether the operation
    /// has nothing left to wait for.
    fn read_answer(
        out: &mut Outbox,
        answers: &mut VecDeque<(u64, ClientResult)>,
        tag: Tag,
        op: &mut ReadOp,
        answer: Answer,
    ) -> bool {
        let Some((from, replied)) = op.asked.get_mut(tag.idx as usize) else { return false };
        if std::mem::replace(replied, true) {
            return false; // a duplicate
        }
        let from = *from;
        op.outstanding -= 1;
        if op.holders.contains(&from) {
            // A holder's copy is merged if it comes; its failure is no
            // replica's failure.
            if let Ok(Response::Object(obj)) = answer {
                op.merge.add(from, obj);
            }
            op.holders_pending = op.holders_pending.saturating_sub(1);
            Self::try_answer(answers, op);
            return op.answered && op.outstanding == 0;
        }
        match answer {
            Ok(Response::Object(obj)) => {
                op.merge.add(from, obj);
                op.quorum.ack(from);
            }
            other => {
                let why = match other {
                    Err(f) => f.0,
                    Ok(r) => format!("unexpected answer {r:?}"),
                };
                op.failures.push(format!("{from:?}: {why}"));
                op.quorum.fail(from);
                if let Some(next) = op.spare.pop_front() {
                    Self::ask(out, tag.op, op, next);
                }
            }
        }
        Self::try_answer(answers, op);
        op.answered && op.outstanding == 0
    }

    /// Answers the client once `r` replicas answered and no holder is still
    /// waited for, or once the quorum cannot be reached.
    fn try_answer(answers: &mut VecDeque<(u64, ClientResult)>, op: &mut ReadOp) {
        if op.answered {
            return;
        }
        match op.quorum.progress() {
            Progress::Reached if op.holders_pending == 0 => {
                op.answered = true;
                answers.push_back((op.token, Ok(Outcome::Read(op.merge.merged().cloned()))));
            }
            Progress::Failed => {
                op.answered = true;
                let e = with_failures(quorum_error(&op.quorum.error()), &op.failures);
                answers.push_back((op.token, Err(e)));
            }
            Progress::Reached | Progress::Pending => {}
        }
    }

    /// Feeds one slot's answer (or the local apply's) to a write; returns
    /// whether every slot is settled.
    #[allow(clippy::too_many_arguments)]
    fn write_answer(
        out: &mut Outbox,
        answers: &mut VecDeque<(u64, ClientResult)>,
        stats: &mut CoordinatorStats,
        topo: &Topology,
        tag: Tag,
        op: &mut WriteOp,
        answer: Answer,
        (ack_before_sync, count_duplicates): (bool, bool),
    ) -> bool {
        if tag.idx == APPLY {
            if op.obj.is_some() {
                return false; // a duplicate
            }
            match answer {
                Ok(Response::Applied { obj, lsn }) => {
                    Self::replicate(out, stats, topo, tag.op, op, obj, lsn, ack_before_sync)
                }
                other => {
                    let why = match other {
                        Err(f) => f.0,
                        Ok(r) => format!("unexpected answer {r:?}"),
                    };
                    op.answered = true;
                    answers.push_back((op.token, Err(CoordError::Storage(why))));
                    return true;
                }
            }
        } else {
            let (i, attempt) = ((tag.idx >> 8) as usize, (tag.idx & 0xff) as u8);
            let Some(slot) = op.slots.get(i) else { return false };
            let recount = count_duplicates && slot.state == SlotState::Acked && matches!(answer, Ok(Response::Done));
            if slot.attempt != attempt || (slot.state != SlotState::Waiting && !recount) {
                return false;
            }
            match answer {
                Ok(Response::Done) => {
                    op.slots[i].state = SlotState::Acked;
                    op.quorum.ack(op.slots[i].owner());
                }
                other => {
                    let why = match other {
                        Err(f) => f.0,
                        Ok(r) => format!("unexpected answer {r:?}"),
                    };
                    Self::slot_failed(out, stats, topo, tag.op, op, i, why);
                }
            }
        }
        if !op.answered {
            match op.quorum.progress() {
                Progress::Reached => {
                    op.answered = true;
                    let obj = op.obj.as_deref().cloned().unwrap_or_default();
                    answers.push_back((op.token, Ok(Outcome::Written(obj))));
                }
                Progress::Failed => {
                    op.answered = true;
                    let e = with_failures(quorum_error(&op.quorum.error()), &op.failures);
                    answers.push_back((op.token, Err(e)));
                }
                Progress::Pending => {}
            }
        }
        op.slots.iter().all(|s| s.state != SlotState::Waiting)
    }

    /// The local apply succeeded: send the object to every slot.
    #[allow(clippy::too_many_arguments)]
    fn replicate(
        out: &mut Outbox,
        stats: &mut CoordinatorStats,
        topo: &Topology,
        id: u64,
        op: &mut WriteOp,
        obj: Object,
        lsn: u64,
        ack_before_sync: bool,
    ) {
        let obj = Rc::new(obj);
        op.obj = Some(obj.clone());
        let me = topo.me();
        for i in 0..op.slots.len() {
            let slot = &op.slots[i];
            let tag = Self::tag(id, Slot::idx(i, slot.attempt));
            if slot.node == me && slot.hint_for.is_none() {
                if op.durable && !ack_before_sync {
                    out.push(tag, me, op.p, Request::WaitDurable { lsn });
                } else {
                    op.slots[i].state = SlotState::Acked;
                    op.quorum.ack(me);
                }
                continue;
            }
            if slot.hint_for.is_some() {
                stats.hints += 1;
            }
            let req =
                Request::Write { key: op.key.clone(), obj: obj.clone(), durable: op.durable, hint_for: slot.hint_for };
            out.push(tag, slot.node, op.p, req);
        }
    }

    /// Slot `i` failed: a replica is stood in for by a spare fallback
    /// holding a hint; a failed hint or local copy just fails.
    fn slot_failed(
        out: &mut Outbox,
        stats: &mut CoordinatorStats,
        topo: &Topology,
        id: u64,
        op: &mut WriteOp,
        i: usize,
        why: String,
    ) {
        if Self::retarget(out, stats, topo, id, op, i) {
            return;
        }
        let owner = op.slots[i].owner();
        op.failures.push(format!("{}: {why}", topo.name(owner)));
        op.slots[i].state = SlotState::Failed;
        op.quorum.fail(owner);
    }

    /// Moves slot `i`, a remote replica's, to the next spare fallback as a
    /// hint for it; false when it is not such a slot or no spare is left.
    fn retarget(
        out: &mut Outbox,
        stats: &mut CoordinatorStats,
        topo: &Topology,
        id: u64,
        op: &mut WriteOp,
        i: usize,
    ) -> bool {
        let slot = &op.slots[i];
        if slot.hint_for.is_some() || slot.node == topo.me() || slot.attempt == u8::MAX {
            return false;
        }
        let Some(obj) = op.obj.clone() else { return false };
        let Some(fallback) = op.spare.pop_front() else { return false };
        let owner = slot.node;
        let slot = &mut op.slots[i];
        slot.node = fallback;
        slot.hint_for = Some(owner);
        slot.attempt += 1;
        stats.hints += 1;
        let tag = Self::tag(id, Slot::idx(i, slot.attempt));
        let req = Request::Write { key: op.key.clone(), obj, durable: op.durable, hint_for: Some(owner) };
        out.push(tag, fallback, op.p, req);
        true
    }

    /// Deadlines that passed: hedges and timeouts.
    pub fn handle_timeout(&mut self, now_us: u64, topo: &Topology) {
        while let Some((id, kind)) = self.timers.pop_due(now_us) {
            let Some(op) = self.ops.get_mut(&id) else { continue };
            match (kind, op) {
                (Timer::Hedge, Op::Read(r)) => {
                    r.hedge_at = None;
                    // Waiting only for holders is no reason to hedge.
                    if !r.answered && !matches!(r.quorum.progress(), Progress::Reached) {
                        for &(m, answered) in &r.asked {
                            if !answered && m != topo.me() && !r.holders.contains(&m) {
                                self.slow.insert(m, now_us + SLOW_FOR_US);
                            }
                        }
                        if let Some(next) = r.spare.pop_front() {
                            self.stats.hedges += 1;
                            Self::ask(&mut self.out, id, r, next);
                        }
                    }
                }
                (Timer::Deadline, op) => {
                    let unanswered = match op {
                        Op::Read(r) if !r.answered => {
                            r.answered = true;
                            Some((r.token, with_failures(quorum_error(&r.quorum.error()), &r.failures)))
                        }
                        Op::Write(w) if !w.answered => {
                            w.answered = true;
                            Some((w.token, with_failures(quorum_error(&w.quorum.error()), &w.failures)))
                        }
                        _ => None,
                    };
                    if let Some((token, e)) = unanswered {
                        self.stats.timeouts += 1;
                        self.answers.push_back((token, Err(e)));
                    }
                    self.finish(now_us, id);
                }
                (Timer::Stall, Op::Write(w)) => {
                    // Replicas silent this long are stood in for by hints;
                    // a late answer of theirs is ignored (the hint carries it).
                    w.stall_at = None;
                    for i in 0..w.slots.len() {
                        if w.slots[i].state == SlotState::Waiting {
                            Self::retarget(&mut self.out, &mut self.stats, topo, id, w, i);
                        }
                    }
                }
                (Timer::Stall, Op::Read(r)) => {
                    // Holders silent this long are not waited for any more.
                    r.stall_at = None;
                    r.holders_pending = 0;
                    Self::try_answer(&mut self.answers, r);
                    if r.answered && r.outstanding == 0 {
                        self.finish(now_us, id);
                    }
                }
                (Timer::Hedge | Timer::Stall, _) => {}
            }
        }
    }

    /// Removes a finished operation; a read hands its stale replicas the
    /// merged object.
    fn finish(&mut self, now_us: u64, id: u64) {
        let Some(op) = self.ops.remove(&id) else { return };
        match op {
            Op::Read(r) => {
                self.client_ops -= 1;
                self.timers.cancel(r.deadline, id, Timer::Deadline);
                if let Some(at) = r.hedge_at {
                    self.timers.cancel(at, id, Timer::Hedge);
                }
                if let Some(at) = r.stall_at {
                    self.timers.cancel(at, id, Timer::Stall);
                }
                self.read_repair(now_us, r);
            }
            Op::Write(w) => {
                self.client_ops -= 1;
                self.timers.cancel(w.deadline, id, Timer::Deadline);
                if let Some(at) = w.stall_at {
                    self.timers.cancel(at, id, Timer::Stall);
                }
            }
            Op::Repair(r) => {
                self.repairs -= 1;
                self.timers.cancel(r.deadline, id, Timer::Deadline);
            }
        }
    }

    fn read_repair(&mut self, now_us: u64, r: ReadOp) {
        let Some(merged) = r.merge.merged() else { return };
        // Holders give their data up once streamed: repairing them is waste.
        let mut stale = r.merge.stale();
        stale.retain(|m| !r.holders.contains(m));
        if stale.is_empty() {
            return;
        }
        if self.repairs >= self.cfg.max_repairs {
            self.stats.repairs_skipped += stale.len() as u64;
            return;
        }
        let id = self.next_op;
        self.next_op += 1;
        let obj = Rc::new(merged.clone());
        for (i, &to) in stale.iter().enumerate() {
            self.stats.repairs_sent += 1;
            // Not durable: the read already answered, and anti-entropy
            // covers a repair lost in a crash.
            let req = Request::Write { key: r.key.clone(), obj: obj.clone(), durable: false, hint_for: None };
            self.out.push(Self::tag(id, i as u32), to, r.p, req);
        }
        // Repairs are bounded in time like any request.
        let deadline = now_us + self.cfg.repair_timeout_us;
        self.timers.arm(deadline, id, Timer::Deadline);
        self.repairs += 1;
        self.ops.insert(id, Op::Repair(RepairOp { outstanding: stale.len(), deadline }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::Failure;
    use crate::version::{Actor, VersionVector};

    const T: u64 = 1_000_000;

    fn topo(me: &str, down: &[&str]) -> Topology {
        // Every partition walks a, b, c, d: primaries a, b, c; fallback d.
        let walk = ["a", "b", "c", "d"].map(String::from).to_vec();
        Topology::from_walks(me, 3, vec![walk; 4], down)
    }

    fn m(n: &str) -> MemberId {
        MemberId::of(n)
    }

    fn obj(v: &str, actor: u64) -> Object {
        let a = Actor::new(actor, 0, 1);
        let ctx = VersionVector::new();
        let dot = Object::next_dot(None, &ctx, a);
        Object::apply_write(None, &ctx, dot, 0, Some(v.as_bytes().to_vec()))
    }

    fn drain(c: &mut Coordinator) -> Vec<Outgoing> {
        std::iter::from_fn(|| c.poll_outgoing()).collect()
    }

    #[test]
    fn a_read_asks_r_replicas_itself_first_and_answers_after_r() {
        let t = topo("b", &[]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        c.get(0, &t, 7, b"k".to_vec(), Level::Quorum, T);
        let sent = drain(&mut c);
        assert_eq!(sent.iter().map(|o| o.to).collect::<Vec<_>>(), [m("b"), m("a")], "me first, then the next");
        c.handle_response(1, &t, sent[0].tag, Ok(Response::Object(Some(obj("x", 1)))));
        assert!(c.poll_answer().is_none(), "one answer of two");
        c.handle_response(2, &t, sent[1].tag, Ok(Response::Object(None)));
        let (token, res) = c.poll_answer().unwrap();
        assert_eq!(token, 7);
        assert_eq!(res, Ok(Outcome::Read(Some(obj("x", 1)))));
        // The replica that had nothing gets the merged object.
        let repair = drain(&mut c);
        assert_eq!(repair.len(), 1);
        assert_eq!(repair[0].to, m("a"));
        assert!(matches!(repair[0].req, Request::Write { durable: false, hint_for: None, .. }));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn a_slow_replica_is_hedged_and_a_failed_one_replaced() {
        let t = topo("a", &[]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        c.get(0, &t, 1, b"k".to_vec(), Level::Quorum, T);
        let first = drain(&mut c);
        assert_eq!(first.len(), 2);
        assert_eq!(c.next_deadline(), Some(20_000));
        c.handle_timeout(20_000, &t);
        let hedge = drain(&mut c);
        assert_eq!(hedge.len(), 1, "the third replica is asked");
        assert_eq!(hedge[0].to, m("c"));
        c.handle_response(20_001, &t, first[1].tag, Err(Failure::new("reset")));
        assert!(drain(&mut c).is_empty(), "no replica left to ask");
        c.handle_response(20_002, &t, first[0].tag, Ok(Response::Object(None)));
        c.handle_response(20_003, &t, hedge[0].tag, Ok(Response::Object(None)));
        assert_eq!(c.poll_answer().unwrap().1, Ok(Outcome::Read(None)));
        assert_eq!(c.stats().hedges, 1);
    }

    /// Partition of `b"k"` in the 4-partition test topology.
    fn pk() -> u32 {
        partition_of(b"k", 4)
    }

    #[test]
    fn a_read_during_a_ring_change_finds_a_value_only_the_old_owner_has() {
        // The ring moved k's partition from e to c; e streams it still.
        let t = topo("b", &[]).with_holders(pk(), &["e"]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        c.get(0, &t, 1, b"k".to_vec(), Level::Quorum, T);
        let sent = drain(&mut c);
        assert_eq!(sent.iter().map(|o| o.to).collect::<Vec<_>>(), [m("b"), m("a"), m("e")]);
        c.handle_response(1, &t, sent[0].tag, Ok(Response::Object(None)));
        c.handle_response(2, &t, sent[1].tag, Ok(Response::Object(None)));
        assert!(c.poll_answer().is_none(), "r answered, but the holder is still waited for");
        c.handle_response(3, &t, sent[2].tag, Ok(Response::Object(Some(obj("x", 1)))));
        assert_eq!(c.poll_answer().unwrap().1, Ok(Outcome::Read(Some(obj("x", 1)))));
        let repairs: Vec<MemberId> = drain(&mut c).iter().map(|o| o.to).collect();
        assert_eq!(repairs, [m("b"), m("a")], "the new owners are repaired, the holder is not");
        assert_eq!(c.stats().holder_reads, 1);
    }

    #[test]
    fn a_holder_never_counts_toward_r() {
        let t = topo("b", &[]).with_holders(pk(), &["e"]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        c.get(0, &t, 1, b"k".to_vec(), Level::Quorum, T);
        let sent = drain(&mut c);
        c.handle_response(1, &t, sent[2].tag, Ok(Response::Object(Some(obj("x", 1)))));
        c.handle_response(2, &t, sent[0].tag, Ok(Response::Object(None)));
        assert!(c.poll_answer().is_none(), "one replica and a holder are not a quorum of two");
        c.handle_response(3, &t, sent[1].tag, Err(Failure::new("reset")));
        assert_eq!(drain(&mut c).iter().map(|o| o.to).collect::<Vec<_>>(), [m("c")], "the spare replica");
    }

    #[test]
    fn a_failed_or_silent_holder_delays_a_read_no_longer_than_the_stall() {
        let cfg = CoordinatorConfig { stall_after_us: 50_000, ..CoordinatorConfig::default() };
        for fails in [true, false] {
            let t = topo("b", &[]).with_holders(pk(), &["e"]);
            let mut c = Coordinator::new(cfg.clone());
            c.get(0, &t, 1, b"k".to_vec(), Level::Quorum, T);
            let sent = drain(&mut c);
            c.handle_response(1, &t, sent[0].tag, Ok(Response::Object(Some(obj("x", 1)))));
            c.handle_response(2, &t, sent[1].tag, Ok(Response::Object(Some(obj("x", 1)))));
            if fails {
                c.handle_response(3, &t, sent[2].tag, Err(Failure::new("refused")));
            } else {
                c.handle_timeout(20_000, &t);
                assert!(drain(&mut c).is_empty(), "r answered: no hedge");
                assert!(c.poll_answer().is_none());
                assert_eq!(c.next_deadline(), Some(50_000));
                c.handle_timeout(50_000, &t);
            }
            assert_eq!(c.poll_answer().unwrap().1, Ok(Outcome::Read(Some(obj("x", 1)))), "holder fails: {fails}");
        }
    }

    #[test]
    fn a_dead_holder_is_not_asked() {
        let t = topo("b", &["d"]).with_holders(pk(), &["d"]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        c.get(0, &t, 1, b"k".to_vec(), Level::Quorum, T);
        assert_eq!(drain(&mut c).len(), 2, "only the replicas");
    }

    #[test]
    fn a_replica_hedged_around_is_asked_last_until_it_answers_or_a_second_passes() {
        let t = topo("a", &[]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        let to = |sent: &[Outgoing]| sent.iter().map(|o| o.to).collect::<Vec<_>>();
        let answer_all = |c: &mut Coordinator, at: u64, sent: &[Outgoing]| {
            for o in sent {
                c.handle_response(at, &t, o.tag, Ok(Response::Object(None)));
            }
        };
        c.get(0, &t, 1, b"k".to_vec(), Level::Quorum, 10 * T);
        let first = drain(&mut c);
        assert_eq!(to(&first), [m("a"), m("b")]);
        c.handle_response(1, &t, first[0].tag, Ok(Response::Object(None)));
        c.handle_timeout(20_000, &t);
        let hedge = drain(&mut c);
        answer_all(&mut c, 20_001, &hedge);
        assert!(c.poll_answer().is_some());
        // b stays silent: the next read asks c, and needs no hedge.
        c.get(30_000, &t, 2, b"k".to_vec(), Level::Quorum, T);
        let second = drain(&mut c);
        assert_eq!(to(&second), [m("a"), m("c")]);
        answer_all(&mut c, 30_001, &second);
        // b's late answer to the first read puts it back at once.
        c.handle_response(40_000, &t, first[1].tag, Ok(Response::Object(None)));
        c.get(50_000, &t, 3, b"k".to_vec(), Level::Quorum, T);
        let third = drain(&mut c);
        assert_eq!(to(&third), [m("a"), m("b")], "b answered");
        // Silent again: asked last, until a second has passed.
        c.handle_response(50_001, &t, third[0].tag, Ok(Response::Object(None)));
        c.handle_timeout(70_000, &t);
        let hedged = drain(&mut c);
        answer_all(&mut c, 70_001, &hedged);
        c.get(80_000, &t, 4, b"k".to_vec(), Level::Quorum, T);
        let fourth = drain(&mut c);
        assert_eq!(to(&fourth), [m("a"), m("c")]);
        answer_all(&mut c, 80_001, &fourth);
        c.get(70_000 + SLOW_FOR_US, &t, 5, b"k".to_vec(), Level::Quorum, T);
        assert_eq!(to(&drain(&mut c)), [m("a"), m("b")], "a second later");
    }

    #[test]
    fn the_hedge_delay_follows_the_replicas_observed_answer_times() {
        let t = topo("a", &[]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        assert_eq!(c.hedge_delay_us(), 20_000, "the configured delay until answers were seen");
        // 40 reads whose replicas answer in 300 µs.
        let mut now = 0;
        for token in 0..40 {
            c.get(now, &t, token, b"k".to_vec(), Level::Quorum, T);
            for o in drain(&mut c) {
                c.handle_response(now + 300, &t, o.tag, Ok(Response::Object(None)));
            }
            while c.poll_answer().is_some() {}
            now += 1_000;
        }
        assert_eq!(c.hedge_delay_us(), 1_000, "2 x 300 µs, raised to the 1 ms floor");
        c.get(now, &t, 99, b"k".to_vec(), Level::Quorum, T);
        drain(&mut c);
        c.handle_timeout(now + 1_000, &t);
        assert_eq!(drain(&mut c).len(), 1, "hedged after 1 ms, not 20");
    }

    #[test]
    fn too_few_live_replicas_is_unavailable_and_sends_nothing() {
        let t = topo("a", &["b", "c"]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        c.get(0, &t, 1, b"k".to_vec(), Level::Quorum, T);
        assert!(matches!(c.poll_answer(), Some((1, Err(CoordError::Unavailable(_))))));
        assert!(drain(&mut c).is_empty());
        // Writes stand in for down replicas with the fallback: a at itself,
        // d holding a hint for b; c has nobody left.
        c.write(
            0,
            &t,
            2,
            b"k".to_vec(),
            Some(b"v".to_vec()),
            WriteContext::Client(VersionVector::new()),
            Level::All,
            true,
            T,
        );
        assert!(matches!(c.poll_answer(), Some((2, Err(CoordError::Unavailable(_))))));
        assert!(drain(&mut c).is_empty(), "nothing is applied when the write cannot succeed");
    }

    #[test]
    fn a_durable_write_waits_for_the_local_sync_and_w_acks() {
        let t = topo("a", &["c"]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        c.write(
            0,
            &t,
            9,
            b"k".to_vec(),
            Some(b"v".to_vec()),
            WriteContext::Client(VersionVector::new()),
            Level::All,
            true,
            T,
        );
        let apply = drain(&mut c);
        assert!(matches!(apply[..], [Outgoing { req: Request::Apply { .. }, .. }]));
        c.handle_response(1, &t, apply[0].tag, Ok(Response::Applied { obj: obj("v", 1), lsn: 42 }));
        let sent = drain(&mut c);
        let kinds: Vec<(MemberId, bool, Option<MemberId>)> = sent
            .iter()
            .map(|o| match &o.req {
                Request::WaitDurable { lsn } => (o.to, *lsn == 42, None),
                Request::Write { hint_for, durable, .. } => (o.to, *durable, *hint_for),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(kinds, [(m("a"), true, None), (m("b"), true, None), (m("d"), true, Some(m("c")))]);
        for o in &sent[1..] {
            c.handle_response(2, &t, o.tag, Ok(Response::Done));
            // Duplicates of an acknowledgement do not count twice.
            c.handle_response(2, &t, o.tag, Ok(Response::Done));
        }
        assert!(c.poll_answer().is_none(), "the local copy is not durable yet");
        c.handle_response(3, &t, sent[0].tag, Ok(Response::Done));
        assert!(matches!(c.poll_answer(), Some((9, Ok(Outcome::Written(_))))));
        assert_eq!(c.stats().hints, 1);
    }

    #[test]
    fn a_replica_failing_mid_write_is_replaced_by_a_hint_on_a_fallback() {
        let t = topo("a", &[]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        c.write(
            0,
            &t,
            1,
            b"k".to_vec(),
            Some(b"v".to_vec()),
            WriteContext::Client(VersionVector::new()),
            Level::All,
            false,
            T,
        );
        let apply = drain(&mut c);
        c.handle_response(1, &t, apply[0].tag, Ok(Response::Applied { obj: obj("v", 1), lsn: 1 }));
        let sent = drain(&mut c);
        assert_eq!(sent.len(), 2, "non-durable: the local copy counts at once");
        c.handle_response(2, &t, sent[1].tag, Err(Failure::new("connection reset")));
        let hint = drain(&mut c);
        assert_eq!(hint.len(), 1);
        assert_eq!(hint[0].to, m("d"));
        assert!(matches!(hint[0].req, Request::Write { hint_for: Some(h), .. } if h == m("c")));
        // A late success from c for the old attempt is ignored.
        c.handle_response(3, &t, sent[1].tag, Ok(Response::Done));
        c.handle_response(3, &t, sent[0].tag, Ok(Response::Done));
        assert!(c.poll_answer().is_none());
        c.handle_response(4, &t, hint[0].tag, Ok(Response::Done));
        assert!(matches!(c.poll_answer(), Some((1, Ok(_)))));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn a_silent_replica_is_stood_in_for_by_a_hint_after_the_stall_time() {
        let t = topo("a", &[]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        let ctx = WriteContext::Client(VersionVector::new());
        c.write(0, &t, 1, b"k".to_vec(), Some(b"v".to_vec()), ctx, Level::All, false, 10 * T);
        let apply = drain(&mut c);
        c.handle_response(1, &t, apply[0].tag, Ok(Response::Applied { obj: obj("v", 1), lsn: 1 }));
        let sent = drain(&mut c);
        c.handle_response(2, &t, sent[0].tag, Ok(Response::Done));
        // c never answers: after the stall time its copy goes to d as a hint.
        assert_eq!(c.next_deadline(), Some(T));
        c.handle_timeout(T, &t);
        let hint = drain(&mut c);
        assert_eq!(hint.len(), 1);
        assert!(matches!(hint[0].req, Request::Write { hint_for: Some(h), .. } if h == m("c")));
        assert_eq!(hint[0].to, m("d"));
        c.handle_response(T + 1, &t, hint[0].tag, Ok(Response::Done));
        assert!(matches!(c.poll_answer(), Some((1, Ok(_)))), "w=all reached with the hint");
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn a_write_without_answers_times_out_and_leaves_nothing_behind() {
        let t = topo("a", &[]);
        let mut c = Coordinator::new(CoordinatorConfig::default());
        c.write(0, &t, 1, b"k".to_vec(), None, WriteContext::Local, Level::Quorum, true, T);
        let apply = drain(&mut c);
        c.handle_response(1, &t, apply[0].tag, Ok(Response::Applied { obj: obj("v", 1), lsn: 1 }));
        drain(&mut c);
        c.handle_timeout(T, &t);
        assert!(matches!(c.poll_answer(), Some((1, Err(CoordError::Timeout(_))))));
        assert_eq!(c.in_flight(), 0);
        assert!(c.next_deadline().is_none());
    }

    #[test]
    fn over_the_bound_requests_are_refused_as_overloaded() {
        let t = topo("a", &[]);
        let mut c = Coordinator::new(CoordinatorConfig { max_ops: 1, ..CoordinatorConfig::default() });
        c.get(0, &t, 1, b"k".to_vec(), Level::Quorum, T);
        c.get(0, &t, 2, b"k".to_vec(), Level::Quorum, T);
        assert!(matches!(c.poll_answer(), Some((2, Err(CoordError::Overloaded(_))))));
    }
}
