//! Merkle anti-entropy and tombstone purge of one shard, as a state machine.
//!
//! An *exchange* compares this shard's tree of a partition with another
//! replica's, top-down, asking both sides the same questions (this node's
//! own store is asked like any replica): roots; if they differ, the segment
//! hashes; for differing segments, their leaves; for differing leaves, the
//! (key, digest) lists. Only keys whose digests differ move: pulled from the
//! peer and merged here, read here and merged there, durably, in chunks of
//! `batch`. Afterwards both hold the causal merge and their trees agree.
//! Whatever a peer answers is checked (shape of its hashes, partition of
//! its keys): a wrong answer fails the exchange, never the machine.
//!
//! *Runs* walk the partitions this shard holds. The background run starts
//! every `interval_us` and exchanges each pair of replicas once (the member
//! whose id sorts lower asks); when it reached every other replica of a
//! partition, the partition's tombstones that every replica holds exactly,
//! past the grace period, are purged (see [`crate::version::Object::purgeable`]):
//! read from every other replica, purged there, then here, each durably. A
//! purge waits while any member gossips that it holds misplaced data of the
//! partition (a stream not yet done), which could carry an older value. A
//! replica that misses the purge keeps its tombstone and hands it back at
//! the next exchange: more work, never a resurrection. On-demand runs
//! (`ringkv repair`) exchange with every other replica and answer with a
//! report; they go before the background run, between its exchanges.
//!
//! Bounds: one exchange or purge step in flight at a time; at most
//! `max_queued` on-demand runs waiting (beyond: refused); every request has
//! a deadline.

use crate::effects::{Answer, Awaiting, Deadlines, Machine, Outbox, Outgoing, Request, Response, Tag};
use crate::keyspace::partition_of;
use crate::merkle::{LEAVES, LEAVES_PER_SEGMENT, SEGMENTS};
use crate::topology::{MemberId, Topology};
use crate::version::Object;
use std::collections::{HashMap, HashSet, VecDeque};

#[derive(Debug, Clone)]
pub struct RepairConfig {
    pub interval_us: u64,
    /// Keys per pull or push message.
    pub batch: usize,
    pub call_timeout_us: u64,
    /// Tombstones examined per partition and pass.
    pub purge_batch: usize,
    /// Tombstones younger than this are never purged.
    pub tombstone_grace_ms: u64,
    pub max_queued: usize,
}

impl Default for RepairConfig {
    fn default() -> Self {
        RepairConfig {
            interval_us: 10_000_000,
            batch: 128,
            call_timeout_us: 30_000_000,
            purge_batch: 256,
            tombstone_grace_ms: 3_600_000,
            max_queued: 16,
        }
    }
}

/// What an anti-entropy run compared and moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RepairReport {
    pub partitions: u32,
    pub exchanges: u32,
    pub in_sync: u32,
    pub leaves_differing: u32,
    pub keys_differing: u64,
    pub keys_pulled: u64,
    pub keys_pushed: u64,
    pub errors: u32,
}

impl RepairReport {
    pub fn add(&mut self, o: &RepairReport) {
        self.partitions += o.partitions;
        self.exchanges += o.exchanges;
        self.in_sync += o.in_sync;
        self.leaves_differing += o.leaves_differing;
        self.keys_differing += o.keys_differing;
        self.keys_pulled += o.keys_pulled;
        self.keys_pushed += o.keys_pushed;
        self.errors += o.errors;
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairStats {
    pub background_runs: u64,
    pub exchanges: u64,
    pub exchange_errors: u64,
    pub keys_repaired: u64,
    pub tombstones_purged: u64,
    /// Purges not started because some member still holds data of the
    /// partition that belongs elsewhere.
    pub purges_deferred: u64,
}

/// Which side of an exchange a request went to.
const PEER: u32 = 0;
const MINE: u32 = 1;

#[derive(Debug)]
enum ExStep {
    Roots,
    Leaves {
        segments: Vec<u32>,
    },
    Keys,
    /// Keys to pull and push, and the chunk in flight.
    Move {
        pull: Vec<Vec<u8>>,
        push: Vec<Vec<u8>>,
        at: usize,
        pushing: bool,
        merging: bool,
    },
}

/// One exchange of partition `p` with `peer`. Answers of both sides of a
/// step are collected before the next step.
#[derive(Debug)]
struct Exchange {
    /// The run it belongs to.
    run: u64,
    p: u32,
    peer: MemberId,
    step: ExStep,
    mine: Option<Response>,
    theirs: Option<Response>,
    report: RepairReport,
}

#[derive(Debug)]
struct Purging {
    p: u32,
    others: Vec<MemberId>,
    candidates: VecDeque<(Vec<u8>, Object)>,
    /// The candidate in flight, and answers still awaited for its step.
    current: Option<(Vec<u8>, Object)>,
    waiting: Awaiting,
    /// Reading the others (false: purging them, then here).
    checking: bool,
    purging_here: bool,
    listing: bool,
}

#[derive(Debug)]
enum Active {
    Exchange(Exchange),
    Purge(Purging),
}

#[derive(Debug)]
struct Part {
    p: u32,
    peers: VecDeque<MemberId>,
    all_ok: bool,
    purge_after: bool,
}

#[derive(Debug)]
struct Run {
    id: u64,
    /// The on-demand caller's token; `None` for the background run.
    token: Option<u64>,
    partitions: VecDeque<u32>,
    part: Option<Part>,
    report: RepairReport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Round,
    Call,
}

pub struct Repairer {
    cfg: RepairConfig,
    shard: u16,
    /// On-demand runs first, in arrival order; the background run last.
    runs: VecDeque<Run>,
    next_run: u64,
    active: Option<Active>,
    /// The wall clock at the latest event (tombstones are dated by it).
    wall_ms: u64,
    gen: u64,
    deadline: Option<u64>,
    timers: Deadlines<Timer>,
    out: Outbox,
    answers: VecDeque<(u64, Result<RepairReport, String>)>,
    last_sync_ms: HashMap<u32, u64>,
    stats: RepairStats,
}

fn unexpected(r: Answer) -> String {
    match r {
        Err(f) => f.0,
        Ok(other) => format!("unexpected answer {other:?}"),
    }
}

impl Repairer {
    pub fn new(cfg: RepairConfig, shard: u16, now_us: u64) -> Repairer {
        let mut timers = Deadlines::default();
        timers.arm(now_us + cfg.interval_us, 0, Timer::Round);
        Repairer {
            cfg,
            shard,
            runs: VecDeque::new(),
            next_run: 1,
            active: None,
            wall_ms: 0,
            gen: 0,
            deadline: None,
            timers,
            out: Outbox::default(),
            answers: VecDeque::new(),
            last_sync_ms: HashMap::new(),
            stats: RepairStats::default(),
        }
    }

    pub fn stats(&self) -> RepairStats {
        self.stats
    }

    /// When partition `p` last completed an exchange with every replica it
    /// asked (wall clock, ms), if ever since start-up.
    pub fn last_sync_ms(&self, p: u32) -> Option<u64> {
        self.last_sync_ms.get(&p).copied()
    }

    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.out.pop()
    }

    /// A finished on-demand run: its token and report.
    pub fn poll_answer(&mut self) -> Option<(u64, Result<RepairReport, String>)> {
        self.answers.pop_front()
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.next()
    }

    pub fn idle(&self) -> bool {
        self.runs.is_empty() && self.active.is_none()
    }

    /// Queues an on-demand run over `only` (every partition of this shard
    /// when `None`), against every other replica.
    pub fn repair(&mut self, now_us: u64, wall_ms: u64, topo: &Topology, token: u64, only: Option<u32>) {
        self.wall_ms = wall_ms;
        let queued = self.runs.iter().filter(|r| r.token.is_some()).count();
        if queued >= self.cfg.max_queued {
            self.answers.push_back((token, Err(format!("{queued} repairs are already queued on this shard"))));
            return;
        }
        let partitions =
            topo.partitions_of_shard(self.shard).into_iter().filter(|&p| only.is_none_or(|o| o == p)).collect();
        let at = self.runs.iter().position(|r| r.token.is_none()).unwrap_or(self.runs.len());
        let id = self.run_id();
        self.runs.insert(at, Run { id, token: Some(token), partitions, part: None, report: RepairReport::default() });
        self.pump(now_us, wall_ms, topo);
    }

    pub fn handle_timeout(&mut self, now_us: u64, wall_ms: u64, topo: &Topology) {
        self.wall_ms = wall_ms;
        while let Some((_, kind)) = self.timers.pop_due(now_us) {
            match kind {
                Timer::Round => {
                    self.timers.arm(now_us + self.cfg.interval_us, 0, Timer::Round);
                    if topo.has_ring() && !self.runs.iter().any(|r| r.token.is_none()) {
                        self.stats.background_runs += 1;
                        let partitions = topo.partitions_of_shard(self.shard).into();
                        let id = self.run_id();
                        let run = Run { id, token: None, partitions, part: None, report: RepairReport::default() };
                        self.runs.push_back(run);
                    }
                }
                Timer::Call => {
                    self.deadline = None;
                    self.fail_active("no answer in time".into());
                }
            }
        }
        self.pump(now_us, wall_ms, topo);
    }

    fn run_id(&mut self) -> u64 {
        self.next_run += 1;
        self.next_run
    }

    fn run_mut(&mut self, id: u64) -> Option<&mut Run> {
        self.runs.iter_mut().find(|r| r.id == id)
    }

    fn tag(&self, idx: u32) -> Tag {
        Tag { machine: Machine::Repair, op: self.gen, idx }
    }

    fn send(&mut self, now_us: u64, idx: u32, to: MemberId, p: u32, req: Request) {
        self.out.push(self.tag(idx), to, p, req);
        if self.deadline.is_none() {
            let at = now_us + self.cfg.call_timeout_us;
            self.deadline = Some(at);
            self.timers.arm(at, 0, Timer::Call);
        }
    }

    fn next_step(&mut self) {
        self.gen += 1;
        if let Some(at) = self.deadline.take() {
            self.timers.cancel(at, 0, Timer::Call);
        }
    }

    /// Ends the active exchange or purge as failed.
    fn fail_active(&mut self, why: String) {
        let _ = why;
        match self.active.take() {
            Some(Active::Exchange(ex)) => {
                self.stats.exchange_errors += 1;
                if let Some(run) = self.run_mut(ex.run) {
                    run.report.errors += 1;
                    run.report.exchanges += 1;
                    if let Some(part) = &mut run.part {
                        part.all_ok = false;
                    }
                }
            }
            Some(Active::Purge(_)) | None => {}
        }
        self.next_step();
    }

    /// Starts the next exchange or purge if nothing is in flight.
    fn pump(&mut self, now_us: u64, wall_ms: u64, topo: &Topology) {
        while self.active.is_none() {
            let Some(run) = self.runs.front_mut() else { return };
            if run.part.is_none() {
                let Some(p) = run.partitions.pop_front() else {
                    let run = self.runs.pop_front().expect("front exists");
                    if let Some(token) = run.token {
                        self.answers.push_back((token, Ok(run.report)));
                    }
                    continue;
                };
                if !topo.is_primary(p, topo.me()) || topo.local_shard(p) != self.shard {
                    continue;
                }
                run.report.partitions += 1;
                let me = topo.me();
                let others: Vec<MemberId> = topo.primaries(p).iter().copied().filter(|&m| m != me).collect();
                let peers: VecDeque<MemberId> = match run.token {
                    // The member whose id sorts lower asks: each pair once.
                    None => others.iter().copied().filter(|&m| m > me && topo.alive(m)).collect(),
                    Some(_) => {
                        let down = others.iter().filter(|&&m| !topo.alive(m)).count();
                        run.report.errors += down as u32;
                        others.iter().copied().filter(|&m| topo.alive(m)).collect()
                    }
                };
                let purge_after = run.token.is_none() && peers.len() == others.len();
                let all_ok = run.token.is_none() || peers.len() == others.len();
                run.part = Some(Part { p, peers, all_ok, purge_after });
            }
            let part = run.part.as_mut().expect("set above");
            if let Some(peer) = part.peers.pop_front() {
                let (run, p) = (run.id, part.p);
                self.start_exchange(now_us, topo, run, p, peer);
                continue;
            }
            let part = run.part.take().expect("set above");
            if part.all_ok {
                self.last_sync_ms.insert(part.p, wall_ms);
                if part.purge_after && topo.held_misplaced(part.p) {
                    // An older value may still stream in from a holder.
                    self.stats.purges_deferred += 1;
                } else if part.purge_after {
                    self.start_purge(now_us, topo, part.p);
                }
            }
        }
    }

    fn start_exchange(&mut self, now_us: u64, topo: &Topology, run: u64, p: u32, peer: MemberId) {
        self.next_step();
        self.stats.exchanges += 1;
        let report = RepairReport { exchanges: 1, ..RepairReport::default() };
        let ex = Exchange { run, p, peer, step: ExStep::Roots, mine: None, theirs: None, report };
        self.active = Some(Active::Exchange(ex));
        self.ask_both(now_us, topo, p, peer, Request::Merkle { p, segments: vec![] });
    }

    fn ask_both(&mut self, now_us: u64, topo: &Topology, p: u32, peer: MemberId, req: Request) {
        self.send(now_us, PEER, peer, p, req.clone());
        self.send(now_us, MINE, topo.me(), p, req);
    }

    pub fn handle_response(&mut self, now_us: u64, wall_ms: u64, topo: &Topology, tag: Tag, answer: Answer) {
        debug_assert_eq!(tag.machine, Machine::Repair);
        self.wall_ms = wall_ms;
        if tag.op != self.gen {
            return;
        }
        match self.active.take() {
            Some(Active::Exchange(ex)) => self.exchange_answer(now_us, topo, tag.idx, ex, answer),
            Some(Active::Purge(pg)) => self.purge_answer(now_us, topo, tag.idx, pg, answer),
            None => {}
        }
        self.pump(now_us, wall_ms, topo);
    }

    fn exchange_answer(&mut self, now_us: u64, topo: &Topology, idx: u32, mut ex: Exchange, answer: Answer) {
        if let ExStep::Move { .. } = ex.step {
            return self.move_answer(now_us, topo, ex, answer);
        }
        let answer = match answer {
            Ok(r) => r,
            Err(e) => {
                self.active = Some(Active::Exchange(ex));
                return self.fail_active(e.0);
            }
        };
        if idx == PEER {
            ex.theirs = Some(answer);
        } else {
            ex.mine = Some(answer);
        }
        if ex.mine.is_none() || ex.theirs.is_none() {
            self.active = Some(Active::Exchange(ex));
            return;
        }
        let (Some(mine), Some(theirs)) = (ex.mine.take(), ex.theirs.take()) else { unreachable!("both checked") };
        match self.next_exchange_step(topo, &mut ex, mine, theirs) {
            Ok(Some(req)) => {
                self.next_step();
                let (p, peer) = (ex.p, ex.peer);
                self.active = Some(Active::Exchange(ex));
                self.ask_both(now_us, topo, p, peer, req);
            }
            Ok(None) => {
                if let ExStep::Move { .. } = ex.step {
                    self.next_step();
                    return self.move_next(now_us, topo, ex);
                }
                self.exchange_done(ex);
            }
            Err(why) => {
                self.active = Some(Active::Exchange(ex));
                self.fail_active(why);
            }
        }
    }

    /// Compares both sides' answers to one step; returns the next question
    /// to ask both, or `None` when the exchange is done or moves to the
    /// key transfer.
    fn next_exchange_step(
        &self,
        topo: &Topology,
        ex: &mut Exchange,
        mine: Response,
        theirs: Response,
    ) -> Result<Option<Request>, String> {
        let p = ex.p;
        match &ex.step {
            ExStep::Roots => {
                let (
                    Response::Merkle { root: my_root, segments: my_segs, .. },
                    Response::Merkle { root, segments, .. },
                ) = (mine, theirs)
                else {
                    return Err("unexpected answer to a Merkle request".into());
                };
                if root == my_root {
                    ex.report.in_sync = 1;
                    return Ok(None);
                }
                if segments.len() != SEGMENTS || my_segs.len() != SEGMENTS {
                    return Err(format!("peer sent {} segment hashes, expected {SEGMENTS}", segments.len()));
                }
                let differing: Vec<u32> =
                    (0..SEGMENTS).filter(|&i| segments[i] != my_segs[i]).map(|i| i as u32).collect();
                if differing.is_empty() {
                    return Ok(None);
                }
                ex.step = ExStep::Leaves { segments: differing.clone() };
                Ok(Some(Request::Merkle { p, segments: differing }))
            }
            ExStep::Leaves { segments } => {
                let (Response::Merkle { leaves: mine, .. }, Response::Merkle { leaves: theirs, .. }) = (mine, theirs)
                else {
                    return Err("unexpected answer to a Merkle request".into());
                };
                let want = segments.len() * LEAVES_PER_SEGMENT;
                if theirs.len() != want || mine.len() != want {
                    return Err(format!(
                        "peer sent {} leaves for {} segments, expected {want}",
                        theirs.len(),
                        segments.len()
                    ));
                }
                let leaves: Vec<u32> = (0..want)
                    .filter(|&i| mine[i] != theirs[i])
                    .map(|i| {
                        segments[i / LEAVES_PER_SEGMENT] * LEAVES_PER_SEGMENT as u32 + (i % LEAVES_PER_SEGMENT) as u32
                    })
                    .collect();
                ex.report.leaves_differing = leaves.len() as u32;
                if leaves.is_empty() {
                    // The trees moved while we looked; the next round sees it.
                    return Ok(None);
                }
                debug_assert!(leaves.iter().all(|&l| (l as usize) < LEAVES));
                ex.step = ExStep::Keys;
                Ok(Some(Request::Keys { p, leaves }))
            }
            ExStep::Keys => {
                let (Response::Keys(mine), Response::Keys(theirs)) = (mine, theirs) else {
                    return Err("unexpected answer to a Keys request".into());
                };
                let q = topo.partitions();
                if theirs.iter().any(|(k, _)| partition_of(k, q) != p) {
                    return Err(format!("peer listed keys outside partition {p}"));
                }
                let ours: HashMap<&[u8], u32> = mine.iter().map(|(k, d)| (k.as_slice(), *d)).collect();
                let their: HashMap<&[u8], u32> = theirs.iter().map(|(k, d)| (k.as_slice(), *d)).collect();
                let pull: Vec<Vec<u8>> =
                    their.iter().filter(|(k, d)| ours.get(*k) != Some(d)).map(|(k, _)| k.to_vec()).collect();
                let push: Vec<Vec<u8>> =
                    ours.iter().filter(|(k, d)| their.get(*k) != Some(d)).map(|(k, _)| k.to_vec()).collect();
                let differing: HashSet<&Vec<u8>> = pull.iter().chain(push.iter()).collect();
                ex.report.keys_differing = differing.len() as u64;
                ex.step = ExStep::Move { pull, push, at: 0, pushing: false, merging: false };
                Ok(None)
            }
            ExStep::Move { .. } => Err("a key transfer step answered twice".into()),
        }
    }

    /// Asks for the next chunk to move: read from the source side.
    fn move_next(&mut self, now_us: u64, topo: &Topology, mut ex: Exchange) {
        let batch = self.cfg.batch;
        let ExStep::Move { pull, push, at, pushing, merging } = &mut ex.step else { unreachable!("moving") };
        if !*pushing && *at >= pull.len() {
            *pushing = true;
            *at = 0;
        }
        if *pushing && *at >= push.len() {
            return self.exchange_done(ex);
        }
        let keys = if *pushing { push } else { pull };
        let end = (*at + batch).min(keys.len());
        let chunk = keys[*at..end].to_vec();
        *merging = false;
        let from = if *pushing { topo.me() } else { ex.peer };
        let idx = if *pushing { MINE } else { PEER };
        let p = ex.p;
        self.active = Some(Active::Exchange(ex));
        self.send(now_us, idx, from, p, Request::ReadBatch { keys: chunk });
    }

    fn move_answer(&mut self, now_us: u64, topo: &Topology, mut ex: Exchange, answer: Answer) {
        let batch = self.cfg.batch;
        let p = ex.p;
        let ExStep::Move { pull, push, at, pushing, merging } = &mut ex.step else { unreachable!("moving") };
        let keys = if *pushing { &*push } else { &*pull };
        if *merging {
            if !matches!(answer, Ok(Response::Done)) {
                self.active = Some(Active::Exchange(ex));
                return self.fail_active(unexpected(answer));
            }
            let n = (keys.len() - *at).min(batch) as u64;
            if *pushing {
                ex.report.keys_pushed += n;
            } else {
                ex.report.keys_pulled += n;
            }
            *at += batch;
            self.next_step();
            return self.move_next(now_us, topo, ex);
        }
        let Ok(Response::Objects(entries)) = answer else {
            self.active = Some(Active::Exchange(ex));
            return self.fail_active(unexpected(answer));
        };
        let q = topo.partitions();
        if entries.iter().any(|(k, _)| partition_of(k, q) != p) {
            self.active = Some(Active::Exchange(ex));
            return self.fail_active(format!("peer sent keys outside partition {p}"));
        }
        *merging = true;
        let to = if *pushing { ex.peer } else { topo.me() };
        let idx = if *pushing { PEER } else { MINE };
        self.next_step();
        self.active = Some(Active::Exchange(ex));
        self.send(now_us, idx, to, p, Request::MergeBatch { p, entries });
    }

    fn exchange_done(&mut self, ex: Exchange) {
        self.next_step();
        self.stats.keys_repaired += ex.report.keys_pulled + ex.report.keys_pushed;
        if let Some(run) = self.run_mut(ex.run) {
            run.report.add(&ex.report);
        }
    }

    fn start_purge(&mut self, now_us: u64, topo: &Topology, p: u32) {
        let me = topo.me();
        let others: Vec<MemberId> = topo.primaries(p).iter().copied().filter(|&m| m != me).collect();
        self.next_step();
        let pg = Purging {
            p,
            others,
            candidates: VecDeque::new(),
            current: None,
            waiting: Awaiting::default(),
            checking: false,
            purging_here: false,
            listing: true,
        };
        self.active = Some(Active::Purge(pg));
        self.send(now_us, MINE, me, p, Request::Tombstones { p, max: self.cfg.purge_batch });
    }

    fn purge_answer(&mut self, now_us: u64, topo: &Topology, idx: u32, mut pg: Purging, answer: Answer) {
        if pg.listing {
            pg.listing = false;
            let Ok(Response::Objects(list)) = answer else { return self.next_step() };
            // The wall clock is read when the pass was due; tombstones are
            // judged by their own timestamps against it.
            pg.candidates = list.into();
            self.active = Some(Active::Purge(pg));
            return self.purge_next(now_us, topo);
        }
        let Some((key, obj)) = pg.current.clone() else { return self.next_step() };
        if pg.purging_here {
            if matches!(answer, Ok(Response::Flag(true))) {
                self.stats.tombstones_purged += 1;
            }
            pg.current = None;
            self.active = Some(Active::Purge(pg));
            return self.purge_next(now_us, topo);
        }
        let agrees = match (&answer, pg.checking) {
            (Ok(Response::Object(Some(o))), true) => *o == obj,
            (Ok(Response::Flag(_)), false) => true,
            _ => false,
        };
        if !agrees {
            if answer.is_err() {
                // A replica that cannot answer ends this partition's purge.
                return self.next_step();
            }
            // A replica holds something else: keep the tombstone.
            pg.current = None;
            self.active = Some(Active::Purge(pg));
            return self.purge_next(now_us, topo);
        }
        if !pg.waiting.answer(idx) {
            // A duplicate: already counted.
            self.active = Some(Active::Purge(pg));
            return;
        }
        if !pg.waiting.done() {
            self.active = Some(Active::Purge(pg));
            return;
        }
        self.next_step();
        let p = pg.p;
        if pg.checking {
            pg.checking = false;
            pg.waiting = Awaiting::new(pg.others.len());
            let others = pg.others.clone();
            self.active = Some(Active::Purge(pg));
            for (i, to) in others.into_iter().enumerate() {
                self.send(now_us, i as u32, to, p, Request::Purge { key: key.clone(), obj: obj.clone() });
            }
        } else {
            pg.purging_here = true;
            self.active = Some(Active::Purge(pg));
            self.send(now_us, MINE, topo.me(), p, Request::Purge { key, obj });
        }
    }

    /// The next candidate old enough to purge, or the end of the purge.
    fn purge_next(&mut self, now_us: u64, topo: &Topology) {
        let _ = topo;
        let Some(Active::Purge(mut pg)) = self.active.take() else { return };
        self.next_step();
        let grace = self.cfg.tombstone_grace_ms;
        let wall_ms = self.wall_ms;
        while let Some((key, obj)) = pg.candidates.pop_front() {
            if !obj.purgeable(wall_ms, grace) {
                continue;
            }
            let p = pg.p;
            pg.current = Some((key.clone(), obj));
            pg.checking = true;
            pg.purging_here = false;
            pg.waiting = Awaiting::new(pg.others.len());
            let others = pg.others.clone();
            if others.is_empty() {
                pg.purging_here = true;
                let obj = pg.current.clone().expect("set").1;
                self.active = Some(Active::Purge(pg));
                return self.send(now_us, MINE, topo.me(), p, Request::Purge { key, obj });
            }
            self.active = Some(Active::Purge(pg));
            for (i, to) in others.into_iter().enumerate() {
                self.send(now_us, i as u32, to, p, Request::Read { key: key.clone() });
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::MerkleTree;

    fn topo() -> Topology {
        // a and b replicate both partitions; a sorts lower than b or not,
        // depending on the hashes: the tests pick the asking side.
        let walk = ["a", "b"].map(String::from).to_vec();
        Topology::from_walks("a", 2, vec![walk; 2], &[])
    }

    fn drain(r: &mut Repairer) -> Vec<Outgoing> {
        std::iter::from_fn(|| r.poll_outgoing()).collect()
    }

    fn merkle(tree: &MerkleTree) -> Response {
        Response::Merkle { root: tree.root(), segments: tree.segments(), leaves: vec![] }
    }

    #[test]
    fn equal_roots_end_the_exchange_and_a_report_comes_back() {
        let t = topo();
        let mut r = Repairer::new(RepairConfig::default(), 0, 0);
        r.repair(0, 0, &t, 5, Some(1));
        let asked = drain(&mut r);
        assert_eq!(asked.len(), 2, "both sides are asked for their root");
        let tree = MerkleTree::default();
        for o in &asked {
            r.handle_response(1, 0, &t, o.tag, Ok(merkle(&tree)));
        }
        let (token, report) = r.poll_answer().unwrap();
        assert_eq!(token, 5);
        let report = report.unwrap();
        assert_eq!((report.partitions, report.exchanges, report.in_sync, report.errors), (1, 1, 1, 0));
        assert!(r.idle());
    }

    #[test]
    fn a_peer_answering_with_the_wrong_shape_fails_the_exchange_not_the_machine() {
        let t = topo();
        let mut r = Repairer::new(RepairConfig::default(), 0, 0);
        r.repair(0, 0, &t, 1, Some(0));
        let asked = drain(&mut r);
        let mut mine = MerkleTree::default();
        mine.insert(42, 7);
        for o in &asked {
            let answer = if o.to == MemberId::of("a") {
                merkle(&mine)
            } else {
                // A different root, and 3 segment hashes instead of 32.
                Response::Merkle { root: 1, segments: vec![1, 2, 3], leaves: vec![] }
            };
            r.handle_response(1, 0, &t, o.tag, Ok(answer));
        }
        let report = r.poll_answer().unwrap().1.unwrap();
        assert_eq!((report.exchanges, report.errors), (1, 1));
        assert!(r.idle());
    }

    #[test]
    fn differing_trees_walk_down_to_the_keys_and_move_them_both_ways() {
        let t = topo();
        let mut r = Repairer::new(RepairConfig::default(), 0, 0);
        r.repair(0, 0, &t, 1, Some(0));
        // Two keys of partition 0 (of 2).
        let mut keys = (0..).map(|i| format!("key-{i}").into_bytes()).filter(|k| partition_of(k, 2) == 0);
        let (key_a, key_b) = (keys.next().unwrap(), keys.next().unwrap());
        let (ha, hb) = (crate::keyspace::key_hash(&key_a), crate::keyspace::key_hash(&key_b));
        let mut tree_a = MerkleTree::default();
        tree_a.insert(ha, 1);
        let mut tree_b = MerkleTree::default();
        tree_b.insert(hb, 2);
        let is_a = |o: &Outgoing| o.to == MemberId::of("a");
        let mut moved = Vec::new();
        for _ in 0..20 {
            let out = drain(&mut r);
            if out.is_empty() {
                break;
            }
            for o in out {
                let tree = if is_a(&o) { &tree_a } else { &tree_b };
                let answer = match &o.req {
                    Request::Merkle { segments, .. } if segments.is_empty() => merkle(tree),
                    Request::Merkle { segments, .. } => {
                        let leaves = segments
                            .iter()
                            .flat_map(|&s| {
                                let from = s as usize * LEAVES_PER_SEGMENT;
                                tree.leaves()[from..from + LEAVES_PER_SEGMENT].to_vec()
                            })
                            .collect();
                        Response::Merkle { root: tree.root(), segments: vec![], leaves }
                    }
                    Request::Keys { .. } => {
                        Response::Keys(if is_a(&o) { vec![(key_a.clone(), 1)] } else { vec![(key_b.clone(), 2)] })
                    }
                    Request::ReadBatch { keys } => {
                        Response::Objects(keys.iter().map(|k| (k.clone(), Object::default())).collect())
                    }
                    Request::MergeBatch { entries, .. } => {
                        moved.push((is_a(&o), entries.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()));
                        Response::Done
                    }
                    other => panic!("unexpected {other:?}"),
                };
                r.handle_response(1, 0, &t, o.tag, Ok(answer));
            }
        }
        let report = r.poll_answer().unwrap().1.unwrap();
        assert_eq!((report.keys_differing, report.keys_pulled, report.keys_pushed), (2, 1, 1));
        assert!(moved.contains(&(true, vec![key_b.clone()])), "b's key merged at a");
        assert!(moved.contains(&(false, vec![key_a.clone()])), "a's key merged at b");
    }

    #[test]
    fn no_purge_while_a_member_holds_misplaced_data_of_the_partition() {
        // Seen from the member that sorts lower: it asks, then purges.
        let (lo, hi) = if MemberId::of("a") < MemberId::of("b") { ("a", "b") } else { ("b", "a") };
        let walk = [lo, hi].map(String::from).to_vec();
        for held in [false, true] {
            let mut t = Topology::from_walks(lo, 2, vec![walk.clone()], &[]);
            if held {
                t = t.with_held([0]);
            }
            let cfg = RepairConfig::default();
            let mut r = Repairer::new(cfg.clone(), 0, 0);
            r.handle_timeout(cfg.interval_us, 0, &t);
            let asked = drain(&mut r);
            assert_eq!(asked.len(), 2, "both roots are asked for");
            let tree = MerkleTree::default();
            for o in &asked {
                r.handle_response(1, 0, &t, o.tag, Ok(merkle(&tree)));
            }
            let next = drain(&mut r);
            let purging = next.iter().any(|o| matches!(o.req, Request::Tombstones { p: 0, .. }));
            assert_eq!(purging, !held, "held misplaced: {held}");
            assert_eq!(r.stats().purges_deferred, u64::from(held));
        }
    }
}
