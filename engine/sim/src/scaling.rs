//! Scaling studies of the pure machines, no processes: how much data a ring
//! change moves against the least it could, how even ownership stays, and
//! how gossip behaves at a thousand nodes. `ringkv-scaling` prints them
//! (docs/SCALING.md quotes its output); `tests/scaling.rs` holds the goals.

use crate::rng::Rng;
use ringkv_core::exchange::{Ack, Message};
use ringkv_core::membership::{ClusterState, Gossip, GossipConfig, Load, Member};
use ringkv_core::ring::{claim, pin_partitions, Claimant, Ring};
use std::collections::{BTreeMap, BTreeSet};

/// Weights of heterogeneous servers: 1, 2 and 3 in turn.
pub fn mixed_weights(i: usize) -> u32 {
    1 + (i % 3) as u32
}

pub fn equal_weights(_: usize) -> u32 {
    1
}

pub fn node_id(i: usize) -> String {
    format!("node{i:04}")
}

fn claimants(ids: &BTreeSet<usize>, weight: fn(usize) -> u32) -> Vec<Claimant> {
    // Sorted by id: the ids sort as their numbers do.
    ids.iter().map(|&i| Claimant { id: node_id(i), weight: weight(i) }).collect()
}

/// One ring change and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub from: usize,
    pub to: usize,
    /// Partitions whose owner changed, and the least any claim could move:
    /// the sum of every node's growth in exact weighted share.
    pub owners_moved: usize,
    pub owners_ideal: f64,
    /// Replicas that had to be copied (a node new in a partition's
    /// preference list), against N times the ideal above.
    pub replicas_moved: usize,
    pub replicas_ideal: f64,
    /// The least any ring with the same replicas held per node could copy:
    /// every node's growth in replicas held. Below N x the ownership ideal
    /// when a heavy node's share exceeds 1/N of the ring (it cannot hold a
    /// partition twice, so the lighter nodes hold more than N x theirs).
    pub replicas_floor: usize,
    /// Largest |owned - weighted share| / share over the nodes after it.
    pub worst_share_error: f64,
    /// Largest |replicas held - N x share| / (N x share) after it.
    pub worst_held_error: f64,
}

impl Step {
    pub fn owners_ratio(&self) -> f64 {
        self.owners_moved as f64 / self.owners_ideal
    }

    pub fn replicas_ratio(&self) -> f64 {
        self.replicas_moved as f64 / self.replicas_ideal
    }

    /// Data moved against the larger of the two lower bounds.
    pub fn data_ratio(&self) -> f64 {
        self.replicas_moved as f64 / self.replicas_ideal.max(self.replicas_floor as f64)
    }
}

fn shares(q: u32, members: &[Claimant]) -> BTreeMap<&str, f64> {
    let total: f64 = members.iter().map(|m| f64::from(m.weight)).sum();
    members.iter().map(|m| (m.id.as_str(), f64::from(q) * f64::from(m.weight) / total)).collect()
}

fn preference_lists(ring: &Ring, n: usize) -> Vec<Vec<String>> {
    (0..ring.partitions()).map(|p| ring.preference_list(p, n).into_iter().map(str::to_string).collect()).collect()
}

/// Measures the change from `before` to `after` (both claimed for their
/// members, `after` from `before`).
pub fn measure(before: &Ring, after: &Ring, n: usize) -> Step {
    let q = after.partitions();
    let old = shares(q, before.members());
    let new = shares(q, after.members());
    let owners_ideal: f64 = new.iter().map(|(id, s)| (s - old.get(id).copied().unwrap_or(0.0)).max(0.0)).sum();
    let (lists_before, lists_after) = (preference_lists(before, n), preference_lists(after, n));
    let replicas_moved =
        lists_after.iter().zip(&lists_before).map(|(a, b)| a.iter().filter(|id| !b.contains(id)).count()).sum();
    let counts = after.counts();
    let worst_share_error =
        new.iter().map(|(id, s)| (counts.get(id).copied().unwrap_or(0) as f64 - s).abs() / s).fold(0.0, f64::max);
    let held_by = |lists: &[Vec<String>]| {
        let mut held: BTreeMap<String, usize> = BTreeMap::new();
        for id in lists.iter().flatten() {
            *held.entry(id.clone()).or_default() += 1;
        }
        held
    };
    let (held_before, held) = (held_by(&lists_before), held_by(&lists_after));
    let replicas_floor = held.iter().map(|(id, h)| h.saturating_sub(held_before.get(id).copied().unwrap_or(0))).sum();
    let worst_held_error = new
        .iter()
        .map(|(id, s)| (held.get(*id).copied().unwrap_or(0) as f64 - n as f64 * s).abs() / (n as f64 * s))
        .fold(0.0, f64::max);
    Step {
        from: before.members().len(),
        to: after.members().len(),
        owners_moved: after.moved_from(before),
        owners_ideal,
        replicas_moved,
        replicas_ideal: n as f64 * owners_ideal,
        replicas_floor,
        worst_share_error,
        worst_held_error,
    }
}

/// Grows a ring of `start` nodes to `peak` and shrinks it back, `step`
/// nodes at a time; on the way down the nodes leave in a scrambled order
/// (not the reverse of their joins). Returns every step.
pub fn grow_and_shrink(
    q: u32,
    n: usize,
    (start, peak, step): (usize, usize, usize),
    weight: fn(usize) -> u32,
    seed: u64,
) -> Vec<Step> {
    let mut ids: BTreeSet<usize> = (0..start).collect();
    let mut ring = claim(None, &claimants(&ids, weight), q, n);
    let mut steps = Vec::new();
    let mut next = start;
    while ids.len() < peak {
        let before = ring.clone();
        for _ in 0..step.min(peak - ids.len()) {
            ids.insert(next);
            next += 1;
        }
        ring = claim(Some(&before), &claimants(&ids, weight), q, n);
        steps.push(measure(&before, &ring, n));
    }
    let mut rng = Rng::new(seed);
    while ids.len() > start {
        let before = ring.clone();
        for _ in 0..step.min(ids.len() - start) {
            let all: Vec<usize> = ids.iter().copied().collect();
            let gone = all[rng.below(all.len() as u64) as usize];
            ids.remove(&gone);
        }
        ring = claim(Some(&before), &claimants(&ids, weight), q, n);
        steps.push(measure(&before, &ring, n));
    }
    steps
}

/// What the gossip study measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GossipFigures {
    pub nodes: usize,
    pub partitions: u32,
    /// What one push of the whole state (the exchange before digests)
    /// carried: bytes of the encoded cluster state.
    pub full_state_bytes: usize,
    /// Steady state (load republished now and then, no membership change):
    /// mean and largest bytes of one exchange, all its messages together.
    pub steady_mean_bytes: f64,
    pub steady_max_bytes: usize,
    /// Rounds after a node's first exchange until every node has its
    /// record, and until every node has a ring that includes it.
    pub join_rounds: u32,
    pub join_ring_rounds: u32,
    /// Exchanges between nodes that knew different rosters while the join
    /// spread (keyed digests), and their mean bytes.
    pub join_keyed_exchanges: usize,
    pub join_keyed_mean_bytes: f64,
    /// Rounds after a node stops until every live node holds it down.
    pub failure_rounds: u32,
    /// Times a live node held another live node down, over the whole run.
    pub false_suspicions: usize,
}

/// A member record as a running node publishes it.
fn record(i: usize, held: &[u32], now_ms: u64) -> Member {
    let addr = format!("127.{}.{}.{}:7070", i / 65_536, (i / 256) % 256, i % 256);
    Member {
        heartbeat: now_ms / 1000,
        version: 1,
        pins: pin_partitions(held, 4, &BTreeMap::new()),
        load: Load { ops_per_sec: 10_000, p99_us: 900, disk_bytes: 40 << 30, keys: 30_000_000, ..Load::default() },
        ..Member::new(&node_id(i), &addr, 4, 1_700_000_000_000 + i as u64)
    }
}

/// Fresh load figures that differ materially from the last (a node whose
/// traffic moved).
fn busier(load: &Load, rng: &mut Rng) -> Load {
    Load { ops_per_sec: 5_000 + rng.below(20_000), cpu_permille: rng.below(1000) as u32, ..*load }
}

struct Swarm {
    nodes: Vec<Gossip>,
    by_addr: BTreeMap<String, usize>,
    stopped: BTreeSet<usize>,
    /// Each node's offset within a round, in ms: they do not tick together.
    offset: Vec<u64>,
    rng: Rng,
    round: u64,
    /// Chance per node and round of publishing new load, in thousandths.
    load_per_mille: u64,
}

/// What one round's exchanges cost.
#[derive(Default)]
struct RoundCost {
    exchanges: Vec<usize>,
    /// Bytes of each keyed exchange.
    keyed: Vec<usize>,
}

impl Swarm {
    fn now(&self, i: usize) -> u64 {
        self.round * 1000 + self.offset[i]
    }

    fn run_round(&mut self) -> RoundCost {
        self.round += 1;
        let mut cost = RoundCost::default();
        let mut order: Vec<usize> = (0..self.nodes.len()).filter(|i| !self.stopped.contains(i)).collect();
        order.sort_by_key(|&i| self.offset[i]);
        for i in order {
            let now = self.now(i);
            if self.rng.chance(self.load_per_mille) {
                let load = busier(&self.nodes[i].member().load, &mut self.rng);
                self.nodes[i].set_load(load, now);
            }
            let random = self.rng.next_u64();
            let Some(target) = self.nodes[i].tick(now, random) else { continue };
            let Some(&j) = self.by_addr.get(&target) else { continue };
            if self.stopped.contains(&j) || j == i {
                continue;
            }
            let (bytes, keyed) = exchange(&mut self.nodes, i, j, now);
            cost.exchanges.push(bytes);
            if keyed {
                cost.keyed.push(bytes);
            }
        }
        cost
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| !self.stopped.contains(i))
    }

    fn false_suspicions(&self) -> usize {
        let live: Vec<usize> = self.live().collect();
        live.iter()
            .map(|&i| {
                let now = self.now(i);
                live.iter().filter(|&&j| j != i && !self.nodes[i].is_alive(&node_id(j), now)).count()
            })
            .sum()
    }
}

/// One exchange from `i` to `j` through encoded bytes: total bytes, and
/// whether the rosters differed (a keyed exchange).
fn exchange(nodes: &mut [Gossip], i: usize, j: usize, now: u64) -> (usize, bool) {
    let (a, b) = if i < j {
        let (l, r) = nodes.split_at_mut(j);
        (&mut l[i], &mut r[0])
    } else {
        let (l, r) = nodes.split_at_mut(i);
        (&mut r[0], &mut l[j])
    };
    let q = a.state().partitions;
    let mut bytes = 0;
    let syn = Message::Syn(a.syn()).encode();
    bytes += syn.len();
    let Ok(Message::Syn(syn)) = Message::decode(&syn, q) else { unreachable!("a syn decodes") };
    let Ok(ack) = b.on_syn(now, &syn) else { return (bytes, false) };
    let keyed = matches!(ack, Ack::Roster(_));
    let ack = Message::Ack(ack).encode();
    bytes += ack.len();
    let Ok(Message::Ack(ack)) = Message::decode(&ack, q) else { unreachable!("an ack decodes") };
    if let Ok(Some(ack2)) = a.on_ack(now, &ack) {
        let ack2 = Message::Ack2(ack2).encode();
        bytes += ack2.len();
        let Ok(Message::Ack2(ack2)) = Message::decode(&ack2, q) else { unreachable!("an ack2 decodes") };
        if let Ok(Some(ack3)) = b.on_ack2(now, &ack2) {
            let ack3 = Message::Ack3(ack3).encode();
            bytes += ack3.len();
            let Ok(Message::Ack3(ack3)) = Message::decode(&ack3, q) else { unreachable!("an ack3 decodes") };
            a.on_ack3(now, &ack3);
        }
    }
    (bytes, keyed)
}

/// `n` nodes in one cluster at `q` partitions (N=3, 4 shards each) gossip
/// once a second: steady state, then a join, then a node that stops.
/// `load_per_mille`: chance per node and round of republishing its load.
pub fn gossip_study(n: usize, q: u32, load_per_mille: u64, seed: u64, cfg: GossipConfig) -> GossipFigures {
    let mut rng = Rng::new(seed);
    let ids: BTreeSet<usize> = (0..n).collect();
    let ring = claim(None, &claimants(&ids, equal_weights), q, 3);
    let mut held: Vec<Vec<u32>> = vec![Vec::new(); n];
    for p in 0..q {
        for id in ring.preference_list(p, 3) {
            held[id[4..].parse::<usize>().expect("node ids end in their number")].push(p);
        }
    }
    let start_ms = 1_000;
    let mut state = ClusterState::new("study", q);
    for (i, h) in held.iter().enumerate() {
        let m = record(i, h, start_ms);
        state.members.insert(m.id.clone(), m);
    }
    state.ring = Some(ring);
    let full_state_bytes = state.encode().len();
    let nodes: Vec<Gossip> = (0..n)
        .map(|i| {
            let me = state.members[&node_id(i)].clone();
            Gossip::new(me, "study", q, vec![], Some(state.clone()), cfg.clone(), start_ms)
        })
        .collect();
    let by_addr = nodes.iter().enumerate().map(|(i, g)| (g.member().addr.clone(), i)).collect();
    let offset = (0..=n).map(|_| rng.below(1000)).collect();
    let mut swarm = Swarm { nodes, by_addr, stopped: BTreeSet::new(), offset, rng, round: 1, load_per_mille };
    let mut figures = GossipFigures { nodes: n, partitions: q, full_state_bytes, ..GossipFigures::default() };

    // Warm up: the detectors learn the heartbeat intervals.
    for _ in 0..20 {
        swarm.run_round();
    }
    let mut steady = Vec::new();
    for _ in 0..10 {
        steady.extend(swarm.run_round().exchanges);
        figures.false_suspicions += swarm.false_suspicions();
    }
    figures.steady_mean_bytes = steady.iter().sum::<usize>() as f64 / steady.len().max(1) as f64;
    figures.steady_max_bytes = steady.iter().copied().max().unwrap_or(0);

    // A join through one seed.
    let joiner = n;
    let now = swarm.round * 1000;
    let mut me = record(joiner, &[], now);
    me.pins.clear();
    let seed_addr = swarm.nodes[0].member().addr.clone();
    let g = Gossip::new(me, "study", q, vec![seed_addr], None, cfg.clone(), now);
    swarm.by_addr.insert(g.member().addr.clone(), joiner);
    swarm.nodes.push(g);
    let id = node_id(joiner);
    let (mut known, mut in_ring) = (None, None);
    let mut keyed = Vec::new();
    for r in 1..=100 {
        keyed.extend(swarm.run_round().keyed);
        let all = |f: &dyn Fn(&Gossip) -> bool| swarm.nodes.iter().all(f);
        if known.is_none() && all(&|g| g.state().members.contains_key(&id)) {
            known = Some(r);
        }
        if in_ring.is_none() && all(&|g| g.state().ring.as_ref().is_some_and(|ring| ring.contains(&id))) {
            in_ring = Some(r);
        }
        if known.is_some() && in_ring.is_some() {
            break;
        }
    }
    figures.join_keyed_exchanges = keyed.len();
    figures.join_keyed_mean_bytes = keyed.iter().sum::<usize>() as f64 / keyed.len().max(1) as f64;
    figures.join_rounds = known.unwrap_or(u32::MAX);
    figures.join_ring_rounds = in_ring.unwrap_or(u32::MAX);
    figures.false_suspicions += swarm.false_suspicions();

    // A node stops (not the claimant).
    let gone = 1 + swarm.rng.below(n as u64 - 1) as usize;
    swarm.stopped.insert(gone);
    let gone_id = node_id(gone);
    for r in 1..=100 {
        swarm.run_round();
        let live: Vec<usize> = swarm.live().collect();
        if live.iter().all(|&i| !swarm.nodes[i].is_alive(&gone_id, swarm.now(i))) {
            figures.failure_rounds = r;
            break;
        }
        figures.failure_rounds = u32::MAX;
    }
    figures.false_suspicions += swarm.false_suspicions();
    figures
}
