//! The simulated cluster: nodes running the real protocol machines of
//! `ringkv-core` (coordinator, hinted handoff, ownership handoff,
//! anti-entropy with purge, gossip with phi-accrual detection) over a model
//! store and a model network, driven by one seeded event queue.
//!
//! Time is global microseconds; each node sees it through its own clock,
//! which runs fast or slow by up to `drift_ppm` and starts at an offset, so
//! timers and failure detection face drift as they would between hosts.
//!
//! The network delays every message at random (with rare long spikes), so
//! messages reorder; it loses and duplicates some, and partitions cut links
//! both ways for a while (messages on a cut link vanish: the sender hears
//! nothing, as behind a firewall). A message to a crashed node is refused
//! at once, as a TCP reset would be; a crashed node's pending replies are
//! refused the same way.
//!
//! A crash loses the node's volatile state (its machines, pending replies)
//! and what its store had not synced, but for a random prefix; the node
//! restarts later with a new generation and the cluster state it had saved.
//!
//! Clients run a workload of puts (blind or with the context of their last
//! read), gets and deletes on a few keys, so writes race and siblings
//! appear; each client has one request in flight and gives up after a
//! timeout. Everything they do is recorded in the [`History`] the checker
//! judges.

use crate::check::{describe, show, History};
use crate::rng::Rng;
use crate::store::ModelStore;
use ringkv_core::antientropy::{RepairConfig, Repairer};
use ringkv_core::coordinator::{Bugs, ClientResult, CoordError, Coordinator, CoordinatorConfig, Outcome as Done};
use ringkv_core::effects::{Answer, Failure, Machine, Outgoing, Request, Response, Tag, WriteContext};
use ringkv_core::exchange::Message;
use ringkv_core::failure::PhiConfig;
use ringkv_core::handoff::{Handoff, HandoffConfig};
use ringkv_core::hints::{HintConfig, HintDelivery};
use ringkv_core::keyspace::partition_of;
use ringkv_core::membership::{ClusterState, Gossip, GossipConfig, Member};
use ringkv_core::quorum::Level;
use ringkv_core::ring::{claim, Claimant, Ring};
use ringkv_core::topology::{MemberId, Topology};
use ringkv_core::version::{Object, VersionVector};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

/// The known-bad variants a run may switch on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BadVariants {
    pub ack_before_sync: bool,
    pub count_duplicate_acks: bool,
    pub drop_siblings: bool,
    pub retire_hints_before_ack: bool,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    pub partitions: u32,
    pub replicas: usize,
    pub keys: usize,
    pub clients: usize,
    pub ops_per_client: usize,
    /// Faults happen in `[0, fault_window_us)`; then everything heals and the
    /// cluster runs `quiet_us` more without load before the final checks.
    pub fault_window_us: u64,
    pub quiet_us: u64,
    pub faults: bool,
    pub bugs: BadVariants,
    /// Keep a trace of events (for replaying a failing seed).
    pub trace: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 5,
            partitions: 16,
            replicas: 3,
            keys: 6,
            clients: 4,
            ops_per_client: 40,
            fault_window_us: 12_000_000,
            quiet_us: 40_000_000,
            faults: true,
            bugs: BadVariants::default(),
            trace: false,
        }
    }
}

/// What one run did, for the report and the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    pub events: u64,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub crashes: u64,
    pub records_lost_in_crashes: u64,
    pub partitions: u64,
    pub writes_acked: u64,
    pub reads_ok: u64,
    pub client_errors: u64,
    pub hints_written: u64,
    pub hints_delivered: u64,
    pub keys_repaired: u64,
    pub tombstones_purged: u64,
    pub partitions_handed_off: u64,
    pub siblings_seen: u64,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub violations: Vec<String>,
    pub stats: SimStats,
    pub trace: Vec<String>,
}

/// Settings of the run drawn from the seed.
#[derive(Debug, Clone)]
struct Faults {
    loss_per_mille: u64,
    dup_per_mille: u64,
    delay_us: (u64, u64),
    spike_per_mille: u64,
}

struct Clock {
    offset_us: i64,
    drift_ppm: i64,
    wall_base_ms: u64,
}

impl Clock {
    fn local(&self, g: u64) -> u64 {
        let g = i128::from(g);
        let l = g + g * i128::from(self.drift_ppm) / 1_000_000 + i128::from(self.offset_us);
        l.max(0) as u64
    }

    /// The first global time at which the local clock reads `local` or more.
    fn global(&self, local: u64) -> u64 {
        let l = i128::from(local) - i128::from(self.offset_us);
        let g = l * 1_000_000 / (1_000_000 + i128::from(self.drift_ppm));
        let mut g = g.max(0) as u64;
        while self.local(g) < local {
            g += 1;
        }
        g
    }

    fn wall_ms(&self, g: u64) -> u64 {
        self.wall_base_ms + self.local(g) / 1000
    }
}

/// Where a pending answer goes once its record is durable.
#[derive(Debug, Clone, Copy)]
enum ReplyTo {
    Local { tag: Tag },
    Remote { node: usize, life: u64, tag: Tag },
}

enum Served {
    Now(Answer),
    AfterSync(u64, Answer),
}

struct Machines {
    gossip: Gossip,
    topo: Topology,
    coord: Coordinator,
    hints: HintDelivery,
    handoff: Handoff,
    repair: Repairer,
    /// Client tokens in the coordinator: which client and op.
    clients: BTreeMap<u64, (usize, u64)>,
}

struct Node {
    name: String,
    id: MemberId,
    clock: Clock,
    store: ModelStore,
    life: u64,
    generation: u64,
    persisted: ClusterState,
    m: Option<Machines>,
    sync_pending: bool,
    wake_at: Option<u64>,
    waiters: Vec<(u64, ReplyTo, Answer)>,
}

#[derive(Debug, Clone)]
enum ClientReq {
    Get { key: Vec<u8>, r: Level },
    Write { id: usize, key: Vec<u8>, value: Option<Vec<u8>>, ctx: WriteContext, w: Level, durable: bool },
}

#[derive(Debug, Clone)]
enum Payload {
    Req {
        tag: Tag,
        req: Request,
        life: u64,
    },
    Resp {
        tag: Tag,
        answer: Answer,
        life: u64,
    },
    /// A message of the digest exchange (ringkv_core::exchange).
    Gossip(Box<Message>),
}

enum Ev {
    Deliver { from: usize, to: usize, payload: Payload },
    ClientReq { client: usize, op: u64, to: usize, req: ClientReq },
    ClientAnswer { client: usize, op: u64, result: ClientResult },
    ClientTimeout { client: usize, op: u64 },
    ClientStep { client: usize },
    Local { node: usize, life: u64, tag: Tag, answer: Answer },
    Sync { node: usize, life: u64 },
    Wake { node: usize, life: u64 },
    GossipTick { node: usize, life: u64 },
    Crash { node: usize },
    Restart { node: usize },
    Split { side: Vec<bool> },
    Heal,
}

struct Item {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq)) // min-heap
    }
}

struct InFlight {
    op: u64,
    started: u64,
    req: ClientReq,
}

struct Client {
    ops_left: usize,
    in_flight: Option<InFlight>,
    contexts: BTreeMap<Vec<u8>, VersionVector>,
}

const CLIENT_TIMEOUT_US: u64 = 2_000_000;
const REQUEST_TIMEOUT_US: u64 = 1_000_000;
const GOSSIP_INTERVAL_US: u64 = 1_000_000;
const TOMBSTONE_GRACE_MS: u64 = 15_000;
const MAX_HINTS: usize = 10_000;

pub struct World {
    opts: Options,
    seed: u64,
    rng: Rng,
    net_rng: Rng,
    store_rng: Rng,
    faults: Faults,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Item>,
    nodes: Vec<Node>,
    ring: Ring,
    cut: Vec<Vec<bool>>,
    clients: Vec<Client>,
    next_op: u64,
    /// Deletes in flight per key (at most one: the history maps a delete's
    /// apply to its client by key).
    deletes: BTreeMap<Vec<u8>, usize>,
    pub history: History,
    stats: SimStats,
    trace: Vec<String>,
    healed: bool,
}

fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

impl World {
    pub fn new(seed: u64, opts: Options) -> World {
        let mut rng = Rng::new(seed);
        let net_rng = rng.fork();
        let store_rng = rng.fork();
        let mut setup = rng.fork();
        let faults = if opts.faults {
            Faults {
                loss_per_mille: setup.below(40),
                dup_per_mille: setup.below(30),
                delay_us: (setup.between(20, 200), setup.between(300, 2_000)),
                spike_per_mille: setup.below(15),
            }
        } else {
            Faults { loss_per_mille: 0, dup_per_mille: 0, delay_us: (50, 300), spike_per_mille: 0 }
        };
        let names: Vec<String> = (0..opts.nodes).map(node_name).collect();
        let claimants: Vec<Claimant> = names.iter().map(|n| Claimant { id: n.clone(), weight: 1 }).collect();
        let ring = claim(None, &claimants, opts.partitions, opts.replicas);
        let mut initial = ClusterState::new("sim", opts.partitions);
        for n in &names {
            initial.members.insert(n.clone(), member(n, 0));
        }
        initial.ring = Some(ring.clone());
        let nodes = names
            .iter()
            .map(|n| {
                let drift = if opts.faults { setup.below(401) as i64 - 200 } else { 0 };
                Node {
                    name: n.clone(),
                    id: MemberId::of(n),
                    clock: Clock {
                        offset_us: setup.below(1_000_000) as i64,
                        drift_ppm: drift,
                        wall_base_ms: 1_700_000_000_000 + setup.below(500),
                    },
                    store: ModelStore::new(opts.partitions, setup.next_u64(), MAX_HINTS),
                    life: 0,
                    generation: 0,
                    persisted: initial.clone(),
                    m: None,
                    sync_pending: false,
                    wake_at: None,
                    waiters: Vec::new(),
                }
            })
            .collect();
        let clients = (0..opts.clients)
            .map(|_| Client { ops_left: opts.ops_per_client, in_flight: None, contexts: BTreeMap::new() })
            .collect();
        let n = opts.nodes;
        World {
            seed,
            rng,
            net_rng,
            store_rng,
            faults,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            ring,
            cut: vec![vec![false; n]; n],
            clients,
            next_op: 1,
            deletes: BTreeMap::new(),
            history: History::default(),
            stats: SimStats::default(),
            trace: Vec::new(),
            healed: false,
            opts,
        }
    }

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Item { at: at.max(self.now), seq: self.seq, ev });
    }

    fn note(&mut self, what: impl FnOnce() -> String) {
        if self.opts.trace {
            let line = format!("{:>10.6} {}", self.now as f64 / 1e6, what());
            self.trace.push(line);
        }
    }

    /// Runs the whole scenario and the final checks.
    pub fn run(mut self) -> Outcome {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
        for c in 0..self.clients.len() {
            let t = self.rng.between(1_000_000, 2_000_000);
            self.at(t, Ev::ClientStep { client: c });
        }
        if self.opts.faults {
            self.schedule_faults();
        }
        let end_faults = self.opts.fault_window_us;
        let end = end_faults + self.opts.quiet_us;
        self.at(end_faults, Ev::Heal);
        while let Some(item) = self.queue.pop() {
            if item.at > end {
                break;
            }
            self.now = item.at;
            self.stats.events += 1;
            self.dispatch(item.ev);
        }
        self.final_checks();
        Outcome { seed: self.seed, violations: self.history.violations, stats: self.stats, trace: self.trace }
    }

    fn schedule_faults(&mut self) {
        let mut f = self.rng.fork();
        let window = self.opts.fault_window_us;
        for _ in 0..f.below(3) {
            let start = f.between(1_000_000, window - 2_000_000);
            let len = f.between(500_000, 6_000_000).min(window - start);
            let mut side = vec![false; self.nodes.len()];
            let minority = f.between(1, (self.nodes.len() as u64 - 1) / 2);
            for _ in 0..minority {
                side[f.below(self.nodes.len() as u64) as usize] = true;
            }
            self.at(start, Ev::Split { side });
            self.at(start + len, Ev::Heal);
        }
        for _ in 0..f.below(3) {
            let node = f.below(self.nodes.len() as u64) as usize;
            let at = f.between(1_000_000, window - 1_000_000);
            let down = f.between(200_000, 5_000_000);
            self.at(at, Ev::Crash { node });
            self.at((at + down).min(window), Ev::Restart { node });
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { from, to, payload } => self.deliver(from, to, payload),
            Ev::ClientReq { client, op, to, req } => self.client_request(client, op, to, req),
            Ev::ClientAnswer { client, op, result } => self.client_answer(client, op, result),
            Ev::ClientTimeout { client, op } => {
                if self.clients[client].in_flight.as_ref().is_some_and(|f| f.op == op) {
                    self.stats.client_errors += 1;
                    self.finish_client_op(client);
                }
            }
            Ev::ClientStep { client } => self.client_step(client),
            Ev::Local { node, life, tag, answer } => {
                if self.nodes[node].life == life && self.nodes[node].m.is_some() {
                    self.answer_machine(node, tag, answer);
                    self.pump(node);
                }
            }
            Ev::Sync { node, life } => {
                if self.nodes[node].life == life && self.nodes[node].m.is_some() {
                    self.sync(node);
                }
            }
            Ev::Wake { node, life } => {
                if self.nodes[node].life == life && self.nodes[node].wake_at == Some(self.now) {
                    self.nodes[node].wake_at = None;
                    self.wake(node);
                }
            }
            Ev::GossipTick { node, life } => {
                if self.nodes[node].life == life && self.nodes[node].m.is_some() {
                    self.gossip_tick(node);
                }
            }
            Ev::Crash { node } => self.crash(node),
            Ev::Restart { node } => {
                if self.nodes[node].m.is_none() {
                    self.start(node);
                }
            }
            Ev::Split { side } => {
                self.stats.partitions += 1;
                let n = self.nodes.len();
                for a in 0..n {
                    for b in 0..n {
                        if side[a] != side[b] {
                            self.cut[a][b] = true;
                        }
                    }
                }
                self.note(|| format!("partition {side:?}"));
            }
            Ev::Heal => {
                for row in &mut self.cut {
                    row.iter_mut().for_each(|c| *c = false);
                }
                if self.now >= self.opts.fault_window_us && !self.healed {
                    self.healed = true;
                    for i in 0..self.nodes.len() {
                        if self.nodes[i].m.is_none() {
                            self.start(i);
                        }
                    }
                }
                self.note(|| "heal".into());
            }
        }
    }

    // ---- nodes ----

    fn local_now(&self, node: usize) -> u64 {
        self.nodes[node].clock.local(self.now)
    }

    fn start(&mut self, i: usize) {
        let now = self.local_now(i);
        let now_ms = now / 1000;
        let node = &mut self.nodes[i];
        node.life += 1;
        node.generation += 1;
        let me = member(&node.name, node.generation);
        let seeds = (0..self.opts.nodes).filter(|&j| j != i).map(node_name).collect();
        let cfg = GossipConfig { replicas: self.opts.replicas, phi: PhiConfig::default(), formation_wait_ms: 10_000 };
        let gossip = Gossip::new(me, "sim", self.opts.partitions, seeds, Some(node.persisted.clone()), cfg, now_ms);
        let topo = topology(&node.name, self.opts.replicas, &gossip, now_ms);
        let bugs = self.opts.bugs;
        let coord = Coordinator::new(CoordinatorConfig {
            replicas: self.opts.replicas,
            bugs: Bugs {
                ack_before_sync: bugs.ack_before_sync,
                count_duplicate_acks: bugs.count_duplicate_acks,
                drop_siblings: bugs.drop_siblings,
            },
            ..CoordinatorConfig::default()
        });
        let hints = HintDelivery::new(
            HintConfig {
                interval_us: 1_000_000,
                ping_timeout_us: 500_000,
                call_timeout_us: 2_000_000,
                bug_retire_before_ack: bugs.retire_hints_before_ack,
                ..HintConfig::default()
            },
            now,
        );
        let handoff = Handoff::new(
            // Paced, so streams overlap the faults.
            HandoffConfig { interval_us: 2_000_000, call_timeout_us: 2_000_000, chunk: 4, bytes_per_sec: 20_000 },
            0,
            now,
        );
        let repair = Repairer::new(
            RepairConfig {
                interval_us: 3_000_000,
                batch: 4,
                call_timeout_us: 2_000_000,
                tombstone_grace_ms: TOMBSTONE_GRACE_MS,
                ..RepairConfig::default()
            },
            0,
            now,
        );
        node.m = Some(Machines { gossip, topo, coord, hints, handoff, repair, clients: BTreeMap::new() });
        node.wake_at = None;
        let life = node.life;
        let first_tick = self.nodes[i].clock.global(now + 1 + self.rng.below(GOSSIP_INTERVAL_US));
        self.at(first_tick, Ev::GossipTick { node: i, life });
        self.note(|| format!("{} starts (generation {})", node_name(i), life));
        if self.nodes[i].store.has_unsynced() {
            self.schedule_sync(i);
        }
        self.pump(i);
    }

    fn crash(&mut self, i: usize) {
        if self.nodes[i].m.is_none() {
            return;
        }
        self.stats.crashes += 1;
        let lost = self.nodes[i].store.crash(&mut self.store_rng);
        self.stats.records_lost_in_crashes += lost as u64;
        let node = &mut self.nodes[i];
        let m = node.m.take().expect("running");
        node.persisted = m.gossip.state().clone();
        node.life += 1;
        node.sync_pending = false;
        node.wake_at = None;
        let waiters = std::mem::take(&mut node.waiters);
        // Connections to the crashed process reset: whoever waited hears so.
        for (_, to, _) in waiters {
            if let ReplyTo::Remote { node: to, life, tag } = to {
                let answer = Err(Failure::new("connection reset by peer"));
                self.send(i, to, Payload::Resp { tag, answer, life });
            }
        }
        for (_, (client, op)) in m.clients {
            let result = Err(CoordError::Timeout("connection lost".into()));
            self.at(self.now + 50, Ev::ClientAnswer { client, op, result });
        }
        self.note(|| format!("{} crashes, {lost} unsynced records lost", node_name(i)));
    }

    fn schedule_sync(&mut self, i: usize) {
        if self.nodes[i].sync_pending {
            return;
        }
        self.nodes[i].sync_pending = true;
        let delay = if self.store_rng.chance(20) {
            self.store_rng.between(5_000, 40_000)
        } else {
            self.store_rng.between(50, 1_500)
        };
        let life = self.nodes[i].life;
        self.at(self.now + delay, Ev::Sync { node: i, life });
    }

    fn sync(&mut self, i: usize) {
        self.nodes[i].sync_pending = false;
        let touched = self.nodes[i].store.sync();
        if self.opts.trace {
            let keys: Vec<String> = touched.iter().map(|k| show(k)).collect();
            let lsn = self.nodes[i].store.durable_lsn();
            self.note(|| format!("{} syncs to lsn {lsn}: {keys:?}", node_name(i)));
        }
        let durable = self.nodes[i].store.durable_lsn();
        let waiters = std::mem::take(&mut self.nodes[i].waiters);
        let (ready, waiting): (Vec<_>, Vec<_>) = waiters.into_iter().partition(|(lsn, _, _)| *lsn <= durable);
        self.nodes[i].waiters = waiting;
        for (_, to, answer) in ready {
            self.reply(i, to, answer);
        }
        for key in touched {
            self.check_copies(&key);
        }
        if self.nodes[i].store.has_unsynced() {
            self.schedule_sync(i);
        }
        self.pump(i);
    }

    fn reply(&mut self, i: usize, to: ReplyTo, answer: Answer) {
        match to {
            ReplyTo::Local { tag } => {
                let life = self.nodes[i].life;
                let d = self.rng.below(20);
                self.at(self.now + d, Ev::Local { node: i, life, tag, answer });
            }
            ReplyTo::Remote { node, life, tag } => self.send(i, node, Payload::Resp { tag, answer, life }),
        }
    }

    fn wake(&mut self, i: usize) {
        let now = self.local_now(i);
        let wall = self.nodes[i].clock.wall_ms(self.now);
        let m = self.nodes[i].m.as_mut().expect("running");
        let topo = &m.topo;
        m.coord.handle_timeout(now, topo);
        m.hints.handle_timeout(now, topo);
        m.handoff.handle_timeout(now, topo);
        m.repair.handle_timeout(now, wall, topo);
        self.pump(i);
    }

    fn gossip_tick(&mut self, i: usize) {
        let now = self.local_now(i);
        let random = self.rng.next_u64();
        let node = &mut self.nodes[i];
        let m = node.m.as_mut().expect("running");
        // As the node's agent does: publish what is still to stream.
        m.gossip.set_holding(m.handoff.holding(&m.topo));
        let target = m.gossip.tick(now / 1000, random);
        m.topo = topology(&node.name, self.opts.replicas, &m.gossip, now / 1000);
        let syn = Box::new(Message::Syn(m.gossip.syn()));
        if let Some(j) = target.and_then(|t| self.nodes.iter().position(|n| n.name == t)) {
            self.send(i, j, Payload::Gossip(syn));
        }
        let life = self.nodes[i].life;
        let next = self.nodes[i].clock.global(now + GOSSIP_INTERVAL_US);
        self.at(next, Ev::GossipTick { node: i, life });
        self.pump(i);
    }

    /// Carries out everything the node's machines queued, and re-arms its
    /// timer for their earliest deadline.
    fn pump(&mut self, i: usize) {
        loop {
            let Some(m) = self.nodes[i].m.as_mut() else { return };
            let next = m
                .coord
                .poll_outgoing()
                .or_else(|| m.hints.poll_outgoing())
                .or_else(|| m.handoff.poll_outgoing())
                .or_else(|| m.repair.poll_outgoing());
            if let Some(out) = next {
                self.carry_out(i, out);
                continue;
            }
            if let Some((token, result)) = m.coord.poll_answer() {
                if let Some((client, op)) = m.clients.remove(&token) {
                    let d = self.rng.between(10, 100);
                    self.at(self.now + d, Ev::ClientAnswer { client, op, result });
                }
                continue;
            }
            if m.repair.poll_answer().is_some() {
                continue;
            }
            break;
        }
        let Some(m) = self.nodes[i].m.as_ref() else { return };
        let deadline =
            [m.coord.next_deadline(), m.hints.next_deadline(), m.handoff.next_deadline(), m.repair.next_deadline()]
                .into_iter()
                .flatten()
                .min();
        if let Some(local) = deadline {
            let g = self.nodes[i].clock.global(local).max(self.now);
            if self.nodes[i].wake_at.is_none_or(|w| g < w) {
                self.nodes[i].wake_at = Some(g);
                let life = self.nodes[i].life;
                self.at(g, Ev::Wake { node: i, life });
            }
        }
    }

    fn carry_out(&mut self, i: usize, out: Outgoing) {
        let me = self.nodes[i].id;
        if out.to == me {
            let served = self.serve(i, out.req);
            self.route(i, ReplyTo::Local { tag: out.tag }, served);
            return;
        }
        if out.req.is_local_only() {
            panic!("a machine sent a local-only request to another member: {out:?}");
        }
        if let Request::Write { hint_for: Some(_), .. } = out.req {
            self.stats.hints_written += 1;
        }
        let Some(j) = self.nodes.iter().position(|n| n.id == out.to) else {
            let answer = Err(Failure::new("no such member"));
            let life = self.nodes[i].life;
            self.at(self.now, Ev::Local { node: i, life, tag: out.tag, answer });
            return;
        };
        let life = self.nodes[i].life;
        self.send(i, j, Payload::Req { tag: out.tag, req: out.req, life });
    }

    fn route(&mut self, i: usize, to: ReplyTo, served: Served) {
        match served {
            Served::Now(answer) => self.reply(i, to, answer),
            Served::AfterSync(lsn, answer) => {
                if self.nodes[i].store.durable_lsn() >= lsn {
                    self.reply(i, to, answer);
                } else {
                    self.nodes[i].waiters.push((lsn, to, answer));
                    self.schedule_sync(i);
                }
            }
        }
    }

    /// What a replica (or this node's own store) does with a request.
    fn serve(&mut self, i: usize, req: Request) -> Served {
        if self.opts.trace
            && !matches!(
                req,
                Request::Read { .. }
                    | Request::Merkle { .. }
                    | Request::Keys { .. }
                    | Request::Ping
                    | Request::HintTargets
                    | Request::PartitionsWithData
                    | Request::Tombstones { .. }
            )
        {
            let line = format!("{} serves {}", node_name(i), brief(&req));
            self.note(|| line);
        }
        let wall = self.nodes[i].clock.wall_ms(self.now);
        let store = &mut self.nodes[i].store;
        let after = |lsn: Option<u64>, store: &ModelStore, answer: Response| match lsn {
            Some(lsn) => Served::AfterSync(lsn, Ok(answer)),
            // Nothing new was written, but what the replica holds may not be
            // durable yet: answer once it is.
            None if store.has_unsynced() => Served::AfterSync(store.appended_lsn(), Ok(answer)),
            None => Served::Now(Ok(answer)),
        };
        match req {
            Request::Read { key } => Served::Now(Ok(Response::Object(store.get(&key)))),
            Request::Write { key, obj, durable, hint_for } => {
                let lsn = match hint_for {
                    Some(owner) => match store.put_hint(owner, &key, &obj) {
                        Ok(lsn) => lsn,
                        Err(e) => return Served::Now(Err(Failure::new(e))),
                    },
                    None => store.merge(&key, &obj),
                };
                if durable {
                    after(lsn, store, Response::Done)
                } else {
                    Served::Now(Ok(Response::Done))
                }
            }
            Request::Apply { key, value, ctx } => {
                let id = match &value {
                    Some(v) => self.history.by_value(v),
                    None => self.deletes.get(&key).copied(),
                };
                let (obj, lsn, dot, applied_ctx) = store.apply(&key, value, &ctx, wall);
                if let Some(id) = id {
                    self.history.applied(id, dot, applied_ctx);
                }
                Served::Now(Ok(Response::Applied { obj, lsn }))
            }
            Request::WaitDurable { lsn } => Served::AfterSync(lsn, Ok(Response::Done)),
            Request::Ping => Served::Now(Ok(Response::Done)),
            Request::Merkle { p, segments } => {
                if segments.iter().any(|&s| s as usize >= ringkv_core::merkle::SEGMENTS) {
                    return Served::Now(Err(Failure::new("no such merkle segment")));
                }
                let tree = store.merkle(p);
                let answer = if segments.is_empty() {
                    Response::Merkle { root: tree.root(), segments: tree.segments(), leaves: vec![] }
                } else {
                    Response::Merkle { root: tree.root(), segments: vec![], leaves: store.segment_leaves(p, &segments) }
                };
                Served::Now(Ok(answer))
            }
            Request::Keys { p, leaves } => Served::Now(Ok(Response::Keys(store.keys_in_leaves(p, &leaves)))),
            Request::ReadBatch { keys } => Served::Now(Ok(Response::Objects(
                keys.iter().filter_map(|k| store.get(k).map(|o| (k.clone(), o))).collect(),
            ))),
            Request::MergeBatch { entries, .. } => {
                let mut last = None;
                for (k, o) in &entries {
                    last = store.merge(k, o).or(last);
                }
                after(last, store, Response::Done)
            }
            Request::Purge { key, obj } => match store.purge(&key, &obj) {
                Some(lsn) => {
                    self.history.purged(&key, &obj);
                    Served::AfterSync(lsn, Ok(Response::Flag(true)))
                }
                None => Served::Now(Ok(Response::Flag(false))),
            },
            Request::Tombstones { p, max } => Served::Now(Ok(Response::Objects(store.tombstones(p, max)))),
            Request::HintTargets => Served::Now(Ok(Response::HintTargets(store.hint_targets()))),
            Request::HintBatch { owner, max } => Served::Now(Ok(Response::Hints(store.hint_batch(owner, max)))),
            Request::RetireHints { owner, delivered } => {
                let (n, lsn) = store.retire_hints(owner, &delivered);
                self.stats.hints_delivered += n as u64;
                match lsn {
                    Some(lsn) => Served::AfterSync(lsn, Ok(Response::Count(n))),
                    None => Served::Now(Ok(Response::Count(n))),
                }
            }
            Request::PartitionsWithData => Served::Now(Ok(Response::Partitions(store.partitions_with_data()))),
            Request::Snapshot { p } => Served::Now(Ok(Response::Snapshot(store.snapshot(p)))),
            Request::ReadRecords { records } => Served::Now(Ok(Response::Objects(store.read_records(&records)))),
            Request::DropPartition { p, snapshot } => match store.drop_partition(p, &snapshot) {
                Some(lsn) => {
                    self.stats.partitions_handed_off += 1;
                    Served::AfterSync(lsn, Ok(Response::Flag(true)))
                }
                None => Served::Now(Ok(Response::Flag(false))),
            },
        }
    }

    fn answer_machine(&mut self, i: usize, tag: Tag, answer: Answer) {
        let now = self.local_now(i);
        let wall = self.nodes[i].clock.wall_ms(self.now);
        let Some(m) = self.nodes[i].m.as_mut() else { return };
        let topo = &m.topo;
        match tag.machine {
            Machine::Coordinator => m.coord.handle_response(now, topo, tag, answer),
            Machine::Hints => m.hints.handle_response(now, topo, tag, answer),
            Machine::Handoff => m.handoff.handle_response(now, topo, tag, answer),
            Machine::Repair => m.repair.handle_response(now, wall, topo, tag, answer),
        }
    }

    // ---- network ----

    fn send(&mut self, from: usize, to: usize, payload: Payload) {
        self.stats.messages += 1;
        if self.net_rng.chance(self.faults.loss_per_mille) {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.net_rng.chance(self.faults.dup_per_mille) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let (lo, hi) = self.faults.delay_us;
            let mut delay = self.net_rng.between(lo, hi);
            if self.net_rng.chance(self.faults.spike_per_mille) {
                delay += self.net_rng.between(2_000, 60_000);
            }
            self.at(self.now + delay, Ev::Deliver { from, to, payload: payload.clone() });
        }
    }

    fn deliver(&mut self, from: usize, to: usize, payload: Payload) {
        if self.cut[from][to] {
            return;
        }
        if self.nodes[to].m.is_none() {
            // Refused, as a reset connection would be.
            if let Payload::Req { tag, life, .. } = payload {
                let answer = Err(Failure::new("connection refused"));
                self.send(to, from, Payload::Resp { tag, answer, life });
            }
            return;
        }
        match payload {
            Payload::Req { tag, req, life, .. } => {
                let served = self.serve(to, req);
                self.route(to, ReplyTo::Remote { node: from, life, tag }, served);
                self.pump(to);
            }
            Payload::Resp { tag, answer, life } => {
                if self.nodes[to].life == life {
                    self.answer_machine(to, tag, answer);
                    self.pump(to);
                }
            }
            Payload::Gossip(msg) => {
                let now_ms = self.local_now(to) / 1000;
                let node = &mut self.nodes[to];
                let m = node.m.as_mut().expect("running");
                // A refusal (another cluster) never happens here: one name.
                let next = match *msg {
                    Message::Syn(syn) => m.gossip.on_syn(now_ms, &syn).ok().map(Message::Ack),
                    Message::Ack(ack) => m.gossip.on_ack(now_ms, &ack).ok().flatten().map(Message::Ack2),
                    Message::Ack2(ack2) => m.gossip.on_ack2(now_ms, &ack2).ok().flatten().map(Message::Ack3),
                    Message::Ack3(ack3) => {
                        m.gossip.on_ack3(now_ms, &ack3);
                        None
                    }
                };
                m.topo = topology(&node.name, self.opts.replicas, &m.gossip, now_ms);
                if let Some(next) = next {
                    self.send(to, from, Payload::Gossip(Box::new(next)));
                }
                self.pump(to);
            }
        }
    }

    // ---- clients ----

    fn client_step(&mut self, c: usize) {
        if self.clients[c].ops_left == 0 || self.now >= self.opts.fault_window_us {
            return;
        }
        self.clients[c].ops_left -= 1;
        let key = format!("key{}", self.rng.below(self.opts.keys as u64)).into_bytes();
        let op = self.next_op;
        self.next_op += 1;
        let roll = self.rng.below(100);
        let level = |rng: &mut Rng| match rng.below(10) {
            0 => Level::Count(1),
            1 => Level::All,
            _ => Level::Quorum,
        };
        let req = if roll < 40 {
            ClientReq::Get { key: key.clone(), r: level(&mut self.rng) }
        } else {
            let deleting = roll >= 88 && !self.deletes.contains_key(&key);
            let last = self.clients[c].contexts.get(&key).cloned();
            let with_context = self.rng.chance(600);
            let w = level(&mut self.rng);
            let durable = !self.rng.chance(150);
            let needed = w.required(self.opts.replicas, self.opts.replicas).unwrap_or(1);
            let value = (!deleting).then(|| format!("s{}-c{c}-op{op}", self.seed).into_bytes());
            let id = self.history.register(&key, value.clone(), durable, needed);
            let ctx = match (deleting, last, with_context) {
                (_, Some(vv), true) => WriteContext::Client(vv),
                (true, _, _) => WriteContext::Local,
                _ => WriteContext::Client(VersionVector::new()),
            };
            if deleting {
                self.deletes.insert(key.clone(), id);
            }
            ClientReq::Write { id, key: key.clone(), value, ctx, w, durable }
        };
        // Mostly a replica of the key; now and then any node (which then
        // coordinates without holding the key: its copy is handed off).
        let p = partition_of(&key, self.opts.partitions);
        let prefs: Vec<usize> = self
            .ring
            .preference_list(p, self.opts.replicas)
            .iter()
            .filter_map(|n| self.nodes.iter().position(|x| x.name == *n))
            .collect();
        let to = if self.rng.chance(900) {
            prefs[self.rng.below(prefs.len() as u64) as usize]
        } else {
            self.rng.below(self.nodes.len() as u64) as usize
        };
        if self.opts.trace {
            let line = format!("client {c} op {op} to {}: {req:?}", node_name(to));
            self.note(|| line);
        }
        self.clients[c].in_flight = Some(InFlight { op, started: self.now, req: req.clone() });
        let d = self.rng.between(10, 100);
        self.at(self.now + d, Ev::ClientReq { client: c, op, to, req });
        self.at(self.now + CLIENT_TIMEOUT_US, Ev::ClientTimeout { client: c, op });
    }

    fn client_request(&mut self, client: usize, op: u64, to: usize, req: ClientReq) {
        let now = self.local_now(to);
        let Some(m) = self.nodes[to].m.as_mut() else {
            let result = Err(CoordError::Unavailable("connection refused".into()));
            self.at(self.now + 50, Ev::ClientAnswer { client, op, result });
            return;
        };
        m.clients.insert(op, (client, op));
        let topo = &m.topo;
        match req {
            ClientReq::Get { key, r } => m.coord.get(now, topo, op, key, r, REQUEST_TIMEOUT_US),
            ClientReq::Write { key, value, ctx, w, durable, .. } => {
                m.coord.write(now, topo, op, key, value, ctx, w, durable, REQUEST_TIMEOUT_US)
            }
        }
        self.pump(to);
    }

    fn client_answer(&mut self, c: usize, op: u64, result: ClientResult) {
        let Some(f) = self.clients[c].in_flight.as_ref().filter(|f| f.op == op) else { return };
        let (started, req) = (f.started, f.req.clone());
        if self.opts.trace {
            let outcome = match &result {
                Ok(_) => "ok".to_string(),
                Err(e) => e.to_string(),
            };
            let line = format!("client {c} op {op} {req:?} -> {outcome}");
            self.note(|| line);
        }
        match (req, result) {
            (ClientReq::Get { key, r }, Ok(Done::Read(obj))) => {
                self.stats.reads_ok += 1;
                if let Some(o) = &obj {
                    if o.siblings().len() > 1 {
                        self.stats.siblings_seen += 1;
                    }
                    self.clients[c].contexts.insert(key.clone(), o.vv().clone());
                    self.history.check_values(self.now, "a read", &key, o);
                }
                let needed_r = r.required(self.opts.replicas, self.opts.replicas).unwrap_or(1);
                for id in self.history.must_read(&key, started) {
                    let w = &self.history.writes[id];
                    if needed_r + w.w > self.opts.replicas && !self.history.knows(obj.as_ref(), w) {
                        let what = format!(
                            "a read at r={needed_r} started at {:.3}s missed the acknowledged {}",
                            started as f64 / 1e6,
                            describe(w)
                        );
                        self.history.writes[id].reported = true;
                        self.history.violation(self.now, what);
                    }
                }
            }
            (ClientReq::Write { id, key, .. }, Ok(Done::Written(obj))) => {
                self.stats.writes_acked += 1;
                self.clients[c].contexts.insert(key.clone(), obj.vv().clone());
                self.acknowledged(id);
            }
            (_, _) => self.stats.client_errors += 1,
        }
        self.finish_client_op(c);
    }

    fn finish_client_op(&mut self, c: usize) {
        if let Some(f) = self.clients[c].in_flight.take() {
            if let ClientReq::Write { id, key, value: None, .. } = &f.req {
                if self.deletes.get(key) == Some(id) {
                    self.deletes.remove(key);
                }
            }
        }
        let think = self.rng.between(20_000, 400_000);
        self.at(self.now + think, Ev::ClientStep { client: c });
    }

    // ---- checks ----

    /// Members whose durable state knows write `id`, and how many of them
    /// are the key's primaries.
    fn durable_copies(&self, id: usize) -> (usize, usize) {
        let w = &self.history.writes[id];
        let p = partition_of(&w.key, self.opts.partitions);
        let prefs = self.ring.preference_list(p, self.opts.replicas);
        let (mut all, mut primaries) = (0, 0);
        for n in &self.nodes {
            let d = n.store.durable();
            let as_object = self.history.knows(d.objects.get(&w.key).map(|(o, _)| o), w);
            let as_hint = d.hints.iter().any(|((_, k), (o, _))| *k == w.key && self.history.knows(Some(o), w));
            if as_object || as_hint {
                all += 1;
                if as_object && prefs.contains(&n.name.as_str()) {
                    primaries += 1;
                }
            }
        }
        (all, primaries)
    }

    fn acknowledged(&mut self, id: usize) {
        self.history.writes[id].acked_at = Some(self.now);
        let w = &self.history.writes[id];
        if !w.durable {
            return;
        }
        let (all, primaries) = self.durable_copies(id);
        let needed = w.w;
        if all < needed {
            let what = format!("acknowledged with {all} durable copies, fewer than w: {}", describe(w));
            self.history.writes[id].reported = true;
            self.history.violation(self.now, what);
        }
        self.history.writes[id].strict = primaries >= needed;
    }

    /// After a sync changed `key` somewhere: acked durable writes keep at
    /// least `w` durable copies.
    fn check_copies(&mut self, key: &[u8]) {
        for id in self.history.guarded(key) {
            let (all, _) = self.durable_copies(id);
            let w = &self.history.writes[id];
            if all < w.w {
                let what = format!("only {all} durable copies left of the acknowledged {}", describe(w));
                self.history.writes[id].reported = true;
                self.history.violation(self.now, what);
            }
        }
    }

    /// The Merkle root of partition `p` on node `n`, leaving out tombstones
    /// that are being purged (see `History::settled`).
    fn settled_root(&self, n: &Node, p: u32) -> u64 {
        let mut tree = ringkv_core::merkle::MerkleTree::default();
        for (k, (o, _)) in &n.store.visible().objects {
            if partition_of(k, self.opts.partitions) == p {
                if let Some(o) = self.history.settled(k, Some(o.clone())) {
                    tree.insert(ringkv_core::keyspace::key_hash(k), crate::store::digest(&o));
                }
            }
        }
        tree.root()
    }

    fn final_checks(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            if self.nodes[i].m.is_none() {
                self.history.violation(now, format!("{} is not running at the end", node_name(i)));
            }
            let hints = self.nodes[i].store.visible().hints.len();
            if hints > 0 {
                self.history.violation(now, format!("{} still holds {hints} hints after healing", node_name(i)));
            }
        }
        for key in self.history.keys() {
            let p = partition_of(&key, self.opts.partitions);
            let prefs: Vec<usize> = self
                .ring
                .preference_list(p, self.opts.replicas)
                .iter()
                .filter_map(|n| self.nodes.iter().position(|x| x.name == *n))
                .collect();
            let objects: Vec<Option<Object>> =
                prefs.iter().map(|&i| self.history.settled(&key, self.nodes[i].store.get(&key))).collect();
            if objects.windows(2).any(|w| w[0] != w[1]) {
                self.history.violation(now, format!("replicas of key {:?} differ after healing", show(&key)));
            }
            for (i, o) in prefs.iter().zip(&objects) {
                if let Some(o) = o {
                    let whom = format!("{} at the end", node_name(*i));
                    self.history.check_values(now, &whom, &key, o);
                }
            }
            for id in self.history.ids_of(&key) {
                let w = &self.history.writes[id];
                if w.acked_at.is_none()
                    || !w.durable
                    || w.reported
                    || self.history.guarded(&key).iter().all(|&g| g != id)
                {
                    continue;
                }
                for (i, o) in prefs.iter().zip(&objects) {
                    if !self.history.knows(o.as_ref(), w) {
                        let what = format!("{} lost the acknowledged {}", node_name(*i), describe(w));
                        self.history.violation(now, what);
                        break;
                    }
                }
            }
            for i in 0..self.nodes.len() {
                if !prefs.contains(&i) && self.history.settled(&key, self.nodes[i].store.get(&key)).is_some() {
                    let what = format!("{} still holds key {:?} it does not replicate", node_name(i), show(&key));
                    self.history.violation(now, what);
                }
            }
        }
        for p in 0..self.opts.partitions {
            let roots: Vec<u64> = self
                .ring
                .preference_list(p, self.opts.replicas)
                .iter()
                .filter_map(|n| self.nodes.iter().find(|x| x.name == *n))
                .map(|n| self.settled_root(n, p))
                .collect();
            if roots.windows(2).any(|w| w[0] != w[1]) {
                self.history.violation(now, format!("Merkle roots of partition {p} differ after healing"));
            }
        }
        for n in &self.nodes {
            if let Some(m) = &n.m {
                let (h, r, o) = (m.hints.stats(), m.repair.stats(), m.handoff.stats());
                self.stats.keys_repaired += r.keys_repaired;
                self.stats.tombstones_purged += r.tombstones_purged;
                let _ = (h, o);
            }
        }
    }
}

fn member(name: &str, generation: u64) -> Member {
    Member::new(name, name, 1, generation)
}

fn topology(me: &str, replicas: usize, gossip: &Gossip, now_ms: u64) -> Topology {
    Topology::new(me, 1, replicas, gossip.state(), |id| gossip.is_alive(id, now_ms))
        .expect("sim member ids are distinct")
}

/// A request in a trace line: its kind and key, not the whole object.
fn brief(req: &Request) -> String {
    match req {
        Request::Write { key, durable, hint_for, obj } => {
            format!("write {} durable={durable} hint_for={hint_for:?} vv={:?}", show(key), obj.vv())
        }
        Request::Apply { key, value, .. } => format!("apply {} {:?}", show(key), value.as_ref().map(|v| show(v))),
        Request::WaitDurable { lsn } => format!("wait-durable {lsn}"),
        Request::MergeBatch { p, entries } => {
            format!("merge-batch p{p} {:?}", entries.iter().map(|(k, _)| show(k)).collect::<Vec<_>>())
        }
        Request::Purge { key, .. } => format!("purge {}", show(key)),
        Request::RetireHints { owner, delivered } => {
            format!("retire-hints for {owner:?} {:?}", delivered.iter().map(|(k, _)| show(k)).collect::<Vec<_>>())
        }
        Request::DropPartition { p, snapshot } => format!("drop p{p} ({} keys)", snapshot.len()),
        other => format!("{other:?}").chars().take(80).collect(),
    }
}
