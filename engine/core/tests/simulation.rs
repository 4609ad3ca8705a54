//! Deterministic simulation of a cluster's pure cores in one thread.
//!
//! Five nodes, N=3, Q=16; every message is delayed at random and some are
//! lost; clients write and read at quorum (W=R=2) through coordinators that
//! use the same ring, version and quorum types as the real node. A seeded
//! PRNG drives everything, so a failing seed replays exactly.
//!
//! Checks:
//! - a write acknowledged at W is returned by every quorum read that starts
//!   after the acknowledgement, unless a write issued with a context that
//!   covered it superseded it (R + W > N makes the quorums intersect);
//! - after the load stops, reads at R=N with no loss repair every replica,
//!   and all replicas of every key hold the same object.

use ringkv_core::quorum::{Progress, Quorum, ReadMerge};
use ringkv_core::ring::{claim, Claimant, Ring};
use ringkv_core::version::{reusable_actor, Actor, Object, VersionVector};
use ringkv_core::{keyspace::partition_of, VersionVector as VV};
use std::collections::{BTreeMap, BinaryHeap, HashSet};

const NODES: usize = 5;
const N: usize = 3;
const Q: u32 = 16;
const W: usize = 2;
const R: usize = 2;
const TIMEOUT_MS: u64 = 200;

/// SplitMix64: small, deterministic, good enough for scheduling.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Debug)]
enum Msg {
    WriteReq { op: usize, key: String, obj: Object },
    WriteAck { op: usize },
    ReadReq { op: usize, key: String },
    ReadResp { op: usize, obj: Option<Object> },
}

struct Envelope {
    at: u64,
    seq: u64,
    from: usize,
    to: usize,
    msg: Msg,
}

impl PartialEq for Envelope {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Envelope {}
impl PartialOrd for Envelope {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Envelope {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq)) // min-heap
    }
}

enum OpState {
    Write { quorum: Quorum, value: Vec<u8>, started: u64, done: bool, acked: bool },
    Read { quorum: Quorum, merge: ReadMerge, key: String, started: u64, done: bool, targets: Vec<usize> },
}

struct Sim {
    rng: Rng,
    now: u64,
    seq: u64,
    ring: Ring,
    names: Vec<String>,
    stores: Vec<BTreeMap<String, Object>>,
    net: BinaryHeap<Envelope>,
    ops: Vec<(usize, OpState)>,
    loss_percent: u64,
    /// The key each written value belongs to.
    value_keys: BTreeMap<Vec<u8>, String>,
    /// value -> (key, time acknowledged)
    acked: BTreeMap<Vec<u8>, (String, u64)>,
    /// Values some write's context covered (superseded, now or later).
    covered: HashSet<Vec<u8>>,
    violations: Vec<String>,
}

impl Sim {
    fn new(seed: u64, loss_percent: u64) -> Sim {
        let names: Vec<String> = (0..NODES).map(|i| format!("n{i}")).collect();
        let members: Vec<Claimant> = names.iter().map(|n| Claimant { id: n.clone(), weight: 1 }).collect();
        Sim {
            rng: Rng(seed),
            now: 0,
            seq: 0,
            ring: claim(None, &members, Q, N),
            stores: vec![BTreeMap::new(); NODES],
            names,
            net: BinaryHeap::new(),
            ops: Vec::new(),
            loss_percent,
            value_keys: BTreeMap::new(),
            acked: BTreeMap::new(),
            covered: HashSet::new(),
            violations: Vec::new(),
        }
    }

    fn replicas(&self, key: &str) -> Vec<usize> {
        let p = partition_of(key.as_bytes(), Q);
        self.ring.preference_list(p, N).iter().map(|n| self.names.iter().position(|x| x == n).unwrap()).collect()
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if from != to && self.rng.chance(self.loss_percent) {
            return;
        }
        let delay = if from == to { 0 } else { 1 + self.rng.below(20) };
        self.seq += 1;
        self.net.push(Envelope { at: self.now + delay, seq: self.seq, from, to, msg });
    }

    fn merge_into(&mut self, node: usize, key: &str, obj: &Object) {
        let store = &mut self.stores[node];
        let merged = match store.get(key) {
            Some(l) => l.merge(obj),
            None => obj.clone(),
        };
        store.insert(key.to_string(), merged);
    }

    /// A client write through one of the key's replicas (clients fail over,
    /// so any replica may coordinate).
    fn write(&mut self, key: &str, value: Vec<u8>, ctx: VersionVector) {
        let reps = self.replicas(key);
        let coord = reps[self.rng.below(reps.len() as u64) as usize];
        let local = self.stores[coord].get(key).cloned();
        let actor =
            reusable_actor(local.as_ref(), coord as u64 + 1, 0, 0).unwrap_or(Actor::new(coord as u64 + 1, 0, 1));
        let dot = Object::next_dot(local.as_ref(), &ctx, actor);
        let obj = Object::apply_write(local.as_ref(), &ctx, dot, self.now, Some(value.clone()));
        let op = self.ops.len();
        self.value_keys.insert(value.clone(), key.to_string());
        self.ops.push((
            coord,
            OpState::Write { quorum: Quorum::new(reps.len(), W), value, started: self.now, done: false, acked: false },
        ));
        for r in reps {
            self.send(coord, r, Msg::WriteReq { op, key: key.to_string(), obj: obj.clone() });
        }
    }

    fn read(&mut self, key: &str, r: usize) {
        let reps = self.replicas(key);
        let coord = reps[self.rng.below(reps.len() as u64) as usize];
        let op = self.ops.len();
        self.ops.push((
            coord,
            OpState::Read {
                quorum: Quorum::new(reps.len(), r),
                merge: ReadMerge::default(),
                key: key.to_string(),
                started: self.now,
                done: false,
                targets: reps.clone(),
            },
        ));
        for t in reps {
            self.send(coord, t, Msg::ReadReq { op, key: key.to_string() });
        }
    }

    fn deliver(&mut self, e: Envelope) {
        match e.msg {
            Msg::WriteReq { op, key, obj } => {
                self.merge_into(e.to, &key, &obj);
                self.send(e.to, e.from, Msg::WriteAck { op });
            }
            Msg::ReadReq { op, key } => {
                let obj = self.stores[e.to].get(&key).cloned();
                self.send(e.to, e.from, Msg::ReadResp { op, obj });
            }
            Msg::WriteAck { op } => {
                let from = self.names[e.from].clone();
                let now = self.now;
                if let OpState::Write { quorum, value, done, acked, .. } = &mut self.ops[op].1 {
                    if quorum.ack(&from) == Progress::Reached && !*done {
                        *done = true;
                        *acked = true;
                        let key = self.value_keys[value].clone();
                        self.acked.insert(value.clone(), (key, now));
                    }
                }
            }
            Msg::ReadResp { op, obj } => {
                let from = self.names[e.from].clone();
                let coord = self.ops[op].0;
                let mut finished = None;
                if let OpState::Read { quorum, merge, done, key, started, targets } = &mut self.ops[op].1 {
                    merge.add(&from, obj);
                    if quorum.ack(&from) == Progress::Reached && !*done {
                        *done = true;
                        finished = Some((key.clone(), *started, merge.merged().cloned()));
                    }
                    // Read repair once every replica answered.
                    if merge.answers() == targets.len() {
                        if let Some(m) = merge.merged().cloned() {
                            let stale: Vec<usize> =
                                merge.stale().iter().map(|n| self.names.iter().position(|x| x == n).unwrap()).collect();
                            let key = key.clone();
                            for s in stale {
                                self.send(coord, s, Msg::WriteReq { op: usize::MAX, key: key.clone(), obj: m.clone() });
                            }
                        }
                    }
                }
                if let Some((key, started, merged)) = finished {
                    self.check_read(&key, started, merged);
                }
            }
        }
    }

    /// Every value acknowledged before the read started, for this key, and
    /// never covered by a context, must be in the read's result.
    fn check_read(&mut self, key: &str, started: u64, merged: Option<Object>) {
        let got: HashSet<Vec<u8>> = merged.iter().flat_map(|o| o.values().map(<[u8]>::to_vec)).collect();
        for (value, (vkey, at)) in &self.acked {
            if vkey == key && *at < started && !self.covered.contains(value) && !got.contains(value) {
                self.violations.push(format!(
                    "t={} read of {key} missed {:?} acknowledged at t={at}",
                    self.now,
                    String::from_utf8_lossy(value)
                ));
            }
        }
    }

    fn timeouts(&mut self) {
        for (_, op) in &mut self.ops {
            match op {
                OpState::Write { started, done, .. } | OpState::Read { started, done, .. } => {
                    if !*done && self.now > *started + TIMEOUT_MS {
                        *done = true;
                    }
                }
            }
        }
    }

    fn run_until(&mut self, t: u64) {
        while let Some(e) = self.net.peek() {
            if e.at > t {
                break;
            }
            let e = self.net.pop().unwrap();
            self.now = self.now.max(e.at);
            if let Msg::WriteAck { op: usize::MAX } = e.msg {
                continue;
            }
            self.deliver(e);
            self.timeouts();
        }
        self.now = t;
    }
}

fn run(seed: u64) -> Sim {
    let mut sim = Sim::new(seed, 10);
    let keys: Vec<String> = (0..8).map(|i| format!("key{i}")).collect();
    let mut counter = 0u64;
    // Load: 400 client operations over 4 simulated seconds.
    for step in 0..400u64 {
        let t = step * 10;
        sim.run_until(t);
        let key = keys[sim.rng.below(keys.len() as u64) as usize].clone();
        match sim.rng.below(10) {
            0..=4 => {
                counter += 1;
                let value = format!("{key}=v{counter}").into_bytes();
                sim.write(&key, value, VV::new());
            }
            5 => {
                // Read-modify-write with the context some replica holds.
                let reps = sim.replicas(&key);
                let at = reps[sim.rng.below(reps.len() as u64) as usize];
                let local = sim.stores[at].get(&key).cloned();
                if let Some(l) = local {
                    for v in l.values() {
                        sim.covered.insert(v.to_vec());
                    }
                    counter += 1;
                    let value = format!("{key}=v{counter}").into_bytes();
                    sim.write(&key, value, l.context().clone());
                }
            }
            _ => sim.read(&key, R),
        }
    }
    // Quiesce, then heal with lossless reads at R=N (read repair).
    sim.run_until(10_000);
    sim.loss_percent = 0;
    for round in 0..2 {
        for key in &keys {
            sim.read(key, N);
        }
        sim.run_until(20_000 + round * 1000);
    }
    sim
}

#[test]
fn quorum_writes_stay_readable_at_quorum_and_replicas_converge() {
    let mut total_acked = 0;
    for seed in 1..=40u64 {
        let sim = run(seed);
        assert!(sim.violations.is_empty(), "seed {seed}: {:#?}", sim.violations);
        // Convergence: every replica of every key holds the same object.
        for key in (0..8).map(|i| format!("key{i}")) {
            let reps = sim.replicas(&key);
            let objs: Vec<Option<&Object>> = reps.iter().map(|&r| sim.stores[r].get(&key)).collect();
            assert!(objs.windows(2).all(|w| w[0] == w[1]), "seed {seed}: replicas of {key} differ: {objs:#?}");
        }
        total_acked += sim.acked.len();
    }
    assert!(total_acked > 1000, "the simulation acknowledged {total_acked} writes");
}
