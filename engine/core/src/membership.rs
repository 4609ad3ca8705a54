//! Cluster membership as gossiped state, and the gossip state machine.
//!
//! [`ClusterState`] is what nodes exchange: every member's self-description
//! (address, shards, weight, heartbeat, which shard holds each of its
//! partitions, load) and the ring. Each member record is written only by its
//! own node and versioned by (generation, heartbeat), so merging two states
//! is a per-member maximum and never conflicts. The ring is versioned too;
//! two rings of the same version (two claimants at once, say during a
//! partition) are ordered by a hash of their content, so every node keeps
//! the same one.
//!
//! Status is derived, not stored: a member is `Up` when the ring includes
//! it and its record shows it knows that ring (it pinned its partitions),
//! `Joining` before, `Leaving` once it asked to leave (or was removed). `Down` is each
//! node's own opinion, from its phi-accrual detectors ([`crate::failure`]).
//!
//! [`Gossip`] drives one node: every tick it bumps its heartbeat, lets the
//! claimant (the lowest-id live member of the ring) compute a new ring when
//! membership changed, and names a peer to exchange state with.

use crate::codec::{err, put_varint, DecodeError, Reader};
use crate::failure::{PhiAccrual, PhiConfig};
use crate::ring::{claim, pin_partitions, Claimant, Ring};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Load figures a member publishes about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Load {
    /// Client operations coordinated per second (an EWMA).
    pub ops_per_sec: u64,
    /// Their p99 latency over the last window.
    pub p99_us: u64,
    pub disk_bytes: u64,
    pub keys: u64,
    pub hints: u64,
    /// Busy share of the shard threads, in thousandths (format 2).
    pub cpu_permille: u32,
    /// Partitions this node still has to stream elsewhere, and an estimate
    /// of their bytes (format 2).
    pub moving_partitions: u32,
    pub moving_bytes: u64,
}

/// The longest a member goes without republishing its load when nothing
/// changed materially: the figures are that fresh at worst.
pub const LOAD_REPUBLISH_MS: u64 = 30_000;

impl Load {
    /// Whether these figures differ from the `published` ones enough to be
    /// worth gossiping: every republication is a record every member has to
    /// fetch, so noise stays local (at 1,000 members a change per member
    /// every few seconds would be most of what gossip carries).
    pub fn differs_materially(&self, published: &Load) -> bool {
        // Relative change over 10%, or from or to zero.
        let moved = |new: u64, old: u64| (new == 0) != (old == 0) || new.abs_diff(old) * 10 > old.max(1);
        moved(self.ops_per_sec, published.ops_per_sec)
            || self.p99_us.abs_diff(published.p99_us) * 5 > published.p99_us.max(1)
            || moved(self.disk_bytes, published.disk_bytes)
            || moved(self.keys, published.keys)
            || moved(self.hints, published.hints)
            || self.cpu_permille.abs_diff(published.cpu_permille) >= 20
            // Streams drive plans and the autoscaler's wait: always news.
            || self.moving_partitions != published.moving_partitions
            || moved(self.moving_bytes, published.moving_bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    pub id: String,
    /// Address of shard 0; shard i is at port + i.
    pub addr: String,
    pub shards: u16,
    pub weight: u32,
    pub leaving: bool,
    /// Increases with every start of the node.
    pub generation: u64,
    /// Liveness: advances every gossip round (to at least the node's clock
    /// in seconds, so the heartbeats of live members sit close together and
    /// a digest carries each in a byte or two). Within a generation the
    /// highest wins, whatever the record's content.
    pub heartbeat: u64,
    /// The record's content (everything but the heartbeat) increases with
    /// every change of it; `(generation, version)` orders two copies
    /// (format 3; older formats read it as the heartbeat).
    pub version: u64,
    /// The shard holding each partition this member replicates.
    pub pins: BTreeMap<u32, u16>,
    pub load: Load,
    /// Partitions it holds data of that belong elsewhere (waiting to be
    /// streamed, or streaming): no replica purges their tombstones, since
    /// an older value may still arrive from here (format 2).
    pub holding: BTreeSet<u32>,
}

impl Member {
    /// A node's record as it starts a generation: weight 1, not leaving, no
    /// pins, load or held partitions, heartbeat and version 0.
    pub fn new(id: &str, addr: &str, shards: u16, generation: u64) -> Member {
        Member {
            id: id.to_string(),
            addr: addr.to_string(),
            shards,
            weight: 1,
            leaving: false,
            generation,
            heartbeat: 0,
            version: 0,
            pins: BTreeMap::new(),
            load: Load::default(),
            holding: BTreeSet::new(),
        }
    }

    /// Takes a heartbeat of `generation` if it is ours and newer.
    pub(crate) fn beat(&mut self, generation: u64, heartbeat: u64) -> bool {
        let newer = generation == self.generation && heartbeat > self.heartbeat;
        if newer {
            self.heartbeat = heartbeat;
        }
        newer
    }

    /// A change of the record's content, to be gossiped.
    pub(crate) fn changed(&mut self) {
        self.version += 1;
    }

    pub fn shard_of(&self, p: u32) -> Option<u16> {
        self.pins.get(&p).copied()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Joining,
    Up,
    Leaving,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Joining => "joining",
            Status::Up => "up",
            Status::Leaving => "leaving",
        })
    }
}

/// Two nodes that can never be one cluster: what this node has, and what
/// the other one has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Cluster { ours: String, theirs: String },
    Partitions { ours: u32, theirs: u32 },
}

impl Mismatch {
    /// The same mismatch seen from the other node.
    pub fn reversed(&self) -> Mismatch {
        match self.clone() {
            Mismatch::Cluster { ours, theirs } => Mismatch::Cluster { ours: theirs, theirs: ours },
            Mismatch::Partitions { ours, theirs } => Mismatch::Partitions { ours: theirs, theirs: ours },
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Cluster { ours, theirs } => {
                write!(f, "this node's cluster is {ours:?} but the other node's is {theirs:?}")
            }
            Mismatch::Partitions { ours, theirs } => write!(
                f,
                "this node has {ours} partitions but the other node has {theirs} (Q is fixed when a cluster is created)"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterState {
    pub cluster: String,
    pub partitions: u32,
    pub members: BTreeMap<String, Member>,
    pub ring: Option<Ring>,
}

/// What a merge changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Merged {
    /// Members whose record got newer (their heartbeat advanced).
    pub newer: Vec<String>,
    pub ring_changed: bool,
}

/// Orders rings: version, then a hash of the content (see the module doc).
pub(crate) fn ring_key(r: &Ring) -> (u64, u64) {
    let mut b = Vec::new();
    r.encode(&mut b);
    (r.version, xxhash_rust::xxh3::xxh3_64(&b))
}

impl ClusterState {
    pub fn new(cluster: &str, partitions: u32) -> ClusterState {
        ClusterState { cluster: cluster.to_string(), partitions, members: BTreeMap::new(), ring: None }
    }

    pub fn status(&self, id: &str) -> Option<Status> {
        let m = self.members.get(id)?;
        let ring = self.ring.as_ref();
        // In the ring, and it has the ring itself: it pins the partitions it
        // holds once it knows them, and serves only then.
        let serving = ring.is_some_and(|r| r.contains(id) && (!m.pins.is_empty() || !r.counts().contains_key(id)));
        Some(if m.leaving {
            Status::Leaving
        } else if serving {
            Status::Up
        } else {
            Status::Joining
        })
    }

    /// Checks that `other` belongs to the same cluster.
    pub fn compatible(&self, other: &ClusterState) -> Result<(), Mismatch> {
        if other.cluster != self.cluster {
            return Err(Mismatch::Cluster { ours: self.cluster.clone(), theirs: other.cluster.clone() });
        }
        if other.partitions != self.partitions {
            return Err(Mismatch::Partitions { ours: self.partitions, theirs: other.partitions });
        }
        Ok(())
    }

    /// Takes whatever is newer in `other`. Commutative and idempotent.
    pub fn merge(&mut self, other: &ClusterState) -> Result<Merged, Mismatch> {
        self.compatible(other)?;
        let mut out = Merged::default();
        for theirs in other.members.values() {
            if self.merge_member(theirs) {
                out.newer.push(theirs.id.clone());
            }
        }
        if let Some(theirs) = other.ring.as_ref().filter(|r| self.takes_ring(r)) {
            self.ring = Some(theirs.clone());
            out.ring_changed = true;
        }
        Ok(out)
    }

    /// Takes `theirs` where it is newer: its content if its record version
    /// is higher, its heartbeat if that is higher within the generation.
    /// Returns whether anything advanced.
    pub(crate) fn merge_member(&mut self, theirs: &Member) -> bool {
        match self.members.get_mut(&theirs.id) {
            None => {
                self.members.insert(theirs.id.clone(), theirs.clone());
                true
            }
            Some(ours) if theirs.generation > ours.generation => {
                *ours = theirs.clone();
                true
            }
            Some(ours) if theirs.generation == ours.generation => {
                let mut advanced = false;
                if theirs.version > ours.version {
                    let beat = ours.heartbeat.max(theirs.heartbeat);
                    *ours = theirs.clone();
                    ours.heartbeat = beat;
                    advanced = true;
                }
                advanced | ours.beat(theirs.generation, theirs.heartbeat)
            }
            Some(_) => false,
        }
    }

    /// Whether the ring `theirs` should replace ours.
    pub(crate) fn takes_ring(&self, theirs: &Ring) -> bool {
        self.ring.as_ref().is_none_or(|ours| ring_key(theirs) > ring_key(ours))
    }

    /// The members that should own partitions now: every member not leaving.
    pub fn desired_claimants(&self) -> Vec<Claimant> {
        self.members.values().filter(|m| !m.leaving).map(|m| Claimant { id: m.id.clone(), weight: m.weight }).collect()
    }

    pub fn needs_claim(&self) -> bool {
        // Compared in place: this runs on every gossip message, and at a
        // thousand members a list of claimants per message adds up.
        let mut desired = self.members.values().filter(|m| !m.leaving).peekable();
        if desired.peek().is_none() {
            return false;
        }
        let Some(ring) = &self.ring else { return true };
        let mut claimed = ring.members().iter();
        loop {
            match (desired.next(), claimed.next()) {
                (None, None) => return false,
                (Some(d), Some(c)) if d.id == c.id && d.weight == c.weight => {}
                (None, Some(_)) => return true,
                (Some(_), _) => return true,
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(STATE_FORMAT);
        put_str(&mut out, &self.cluster);
        put_varint(&mut out, u64::from(self.partitions));
        put_varint(&mut out, self.members.len() as u64);
        for m in self.members.values() {
            encode_member(m, &mut out);
        }
        match &self.ring {
            None => out.push(0),
            Some(r) => {
                out.push(1);
                r.encode(&mut out);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ClusterState, DecodeError> {
        let mut r = Reader::new(bytes);
        let format = r.u8()?;
        if !(1..=STATE_FORMAT).contains(&format) {
            return err("cluster state format is not supported (this build reads formats 1 to 3)");
        }
        let cluster = get_str(&mut r)?;
        let partitions = u32::try_from(r.varint()?).map_err(|_| DecodeError { what: "partitions over u32" })?;
        let count = r.len(r.remaining())?;
        let mut members = BTreeMap::new();
        for _ in 0..count {
            let m = decode_member(&mut r, format, partitions)?;
            members.insert(m.id.clone(), m);
        }
        let ring = match r.u8()? {
            0 => None,
            1 => Some(Ring::decode(&mut r)?),
            _ => return err("bad ring flag"),
        };
        if ring.as_ref().is_some_and(|ring| ring.partitions() != partitions) {
            return err("ring partition count differs from the state's");
        }
        if !r.is_empty() {
            return err("trailing bytes after cluster state");
        }
        Ok(ClusterState { cluster, partitions, members, ring })
    }
}

/// Format 2 added cpu_permille, moving_partitions and moving_bytes to each
/// member's load, format 3 the record version apart from the heartbeat;
/// formats 1 and 2 are still read.
pub(crate) const STATE_FORMAT: u8 = 3;

/// One member's record, as the state and gossip deltas carry it.
pub(crate) fn encode_member(m: &Member, out: &mut Vec<u8>) {
    put_str(out, &m.id);
    put_str(out, &m.addr);
    put_varint(out, u64::from(m.shards));
    put_varint(out, u64::from(m.weight));
    out.push(u8::from(m.leaving));
    put_varint(out, m.generation);
    put_varint(out, m.heartbeat);
    put_varint(out, m.version);
    put_varint(out, m.pins.len() as u64);
    let mut prev = 0u32;
    for (&p, &s) in &m.pins {
        put_varint(out, u64::from(p - prev));
        put_varint(out, u64::from(s));
        prev = p;
    }
    let l = &m.load;
    for v in [
        l.ops_per_sec,
        l.p99_us,
        l.disk_bytes,
        l.keys,
        l.hints,
        u64::from(l.cpu_permille),
        u64::from(l.moving_partitions),
        l.moving_bytes,
    ] {
        put_varint(out, v);
    }
    put_varint(out, m.holding.len() as u64);
    let mut prev = 0u32;
    for &p in &m.holding {
        put_varint(out, u64::from(p - prev));
        prev = p;
    }
}

/// Reads a record written in state format `format` (see [`STATE_FORMAT`]).
pub(crate) fn decode_member(r: &mut Reader<'_>, format: u8, partitions: u32) -> Result<Member, DecodeError> {
    let id = get_str(r)?;
    let addr = get_str(r)?;
    let shards = u16::try_from(r.varint()?).map_err(|_| DecodeError { what: "shards over u16" })?;
    let weight = u32::try_from(r.varint()?).map_err(|_| DecodeError { what: "weight over u32" })?;
    let leaving = r.u8()? != 0;
    let generation = r.varint()?;
    let heartbeat = r.varint()?;
    // Before format 3 the heartbeat versioned the content too.
    let version = if format >= 3 { r.varint()? } else { heartbeat };
    let npins = r.len(partitions as usize)?;
    let mut pins = BTreeMap::new();
    let mut p = 0u64;
    for _ in 0..npins {
        p += r.varint()?;
        let s = r.varint()?;
        if p >= u64::from(partitions) || s >= u64::from(shards) {
            return err("pin out of range");
        }
        pins.insert(p as u32, s as u16);
    }
    // Format 1 had the first five figures only.
    let mut load = [0u64; 8];
    for v in load.iter_mut().take(if format == 1 { 5 } else { 8 }) {
        *v = r.varint()?;
    }
    let [ops_per_sec, p99_us, disk_bytes, keys, hints, cpu, moving_partitions, moving_bytes] = load;
    let small = |v: u64| u32::try_from(v).map_err(|_| DecodeError { what: "load figure over u32" });
    let mut holding = BTreeSet::new();
    if format >= 2 {
        let n = r.len(partitions as usize)?;
        let mut p = 0u64;
        for _ in 0..n {
            p += r.varint()?;
            if p >= u64::from(partitions) {
                return err("held partition out of range");
            }
            holding.insert(p as u32);
        }
    }
    Ok(Member {
        id,
        addr,
        shards,
        weight,
        leaving,
        generation,
        heartbeat,
        version,
        pins,
        load: Load {
            ops_per_sec,
            p99_us,
            disk_bytes,
            keys,
            hints,
            cpu_permille: small(cpu)?,
            moving_partitions: small(moving_partitions)?,
            moving_bytes,
        },
        holding,
    })
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn get_str(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let len = r.len(1024)?;
    std::str::from_utf8(r.bytes(len)?).map(str::to_string).map_err(|_| DecodeError { what: "string is not UTF-8" })
}

#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub replicas: usize,
    pub phi: PhiConfig,
    /// With seeds configured, how long a node that has heard from nobody
    /// waits before forming a cluster on its own.
    pub formation_wait_ms: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig { replicas: 3, phi: PhiConfig::default(), formation_wait_ms: 10_000 }
    }
}

/// Extra acceptable pause of the failure detectors per doubling of the
/// cluster (see [`Gossip::spread_pause_ms`]).
pub const SPREAD_PAUSE_MS_PER_DOUBLING: f64 = 100.0;

/// One node's view of the cluster and its gossip duties.
pub struct Gossip {
    pub(crate) me: String,
    pub(crate) state: ClusterState,
    cfg: GossipConfig,
    seeds: Vec<String>,
    detectors: BTreeMap<String, PhiAccrual>,
    started_ms: u64,
    heard_from_peer: bool,
    load_published_ms: u64,
    /// Pinned partitions neither replicated nor held at the last holding
    /// report: their pins go if the next report agrees.
    unheld: BTreeSet<u32>,
}

impl Gossip {
    /// `me` is this node's record (its generation already advanced past the
    /// one in `persisted`, if any); `persisted` is the state saved before a
    /// restart.
    pub fn new(
        me: Member,
        cluster: &str,
        partitions: u32,
        seeds: Vec<String>,
        persisted: Option<ClusterState>,
        cfg: GossipConfig,
        now_ms: u64,
    ) -> Gossip {
        let mut state = persisted
            .filter(|s| s.compatible(&ClusterState::new(cluster, partitions)).is_ok())
            .unwrap_or_else(|| ClusterState::new(cluster, partitions));
        let id = me.id.clone();
        let seeds = seeds.into_iter().filter(|s| *s != me.addr).collect();
        state.members.insert(id.clone(), me);
        let mut g = Gossip {
            me: id,
            state,
            cfg,
            seeds,
            detectors: BTreeMap::new(),
            started_ms: now_ms,
            heard_from_peer: false,
            load_published_ms: now_ms,
            unheld: BTreeSet::new(),
        };
        g.refresh_pins();
        g
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    pub fn member(&self) -> &Member {
        &self.state.members[&self.me]
    }

    /// Whether `id` is believed reachable (always true for ourselves).
    pub fn is_alive(&self, id: &str, now_ms: u64) -> bool {
        id == self.me
            || self.detectors.get(id).is_some_and(|d| d.is_available_with_pause(now_ms, self.spread_pause_ms()))
    }

    pub fn phi(&self, id: &str, now_ms: u64) -> f64 {
        self.detectors.get(id).map_or(0.0, |d| d.phi_with_pause(now_ms, self.spread_pause_ms()))
    }

    /// What the detectors allow beyond their acceptable pause for the way
    /// heartbeats travel: through about log2(n) exchanges, so the news of
    /// a member arrives less regularly the larger the cluster. Measured at
    /// 1,000 members (docs/SCALING.md), this took false suspicions from 530
    /// to a few, and a failure is still known everywhere within 2 log2(n)
    /// rounds.
    fn spread_pause_ms(&self) -> f64 {
        SPREAD_PAUSE_MS_PER_DOUBLING * (self.state.members.len().max(2) as f64).log2()
    }

    /// Publishes new load figures if they changed materially (see
    /// [`Load::differs_materially`]) or the published ones are
    /// [`LOAD_REPUBLISH_MS`] old. Returns whether it published.
    pub fn set_load(&mut self, load: Load, now_ms: u64) -> bool {
        let m = self.state.members.get_mut(&self.me).expect("own record");
        let stale = now_ms.saturating_sub(self.load_published_ms) >= LOAD_REPUBLISH_MS;
        if load == m.load || !(stale || load.differs_materially(&m.load)) {
            return false;
        }
        m.load = load;
        m.changed();
        self.load_published_ms = now_ms;
        true
    }

    /// The partitions this node holds misplaced data of (see
    /// [`Member::holding`]), as its shards last reported them.
    ///
    /// The pin of a partition this node no longer replicates is kept while
    /// the partition is held: coordinators read from such holders until the
    /// stream ends (`Topology::holders`), and the pin says which shard has
    /// the data. It goes once two reports in a row find the partition
    /// neither replicated nor held, since one report may have been taken by
    /// a shard that had not seen the new ring yet.
    pub fn set_holding(&mut self, holding: BTreeSet<u32>) {
        let replicated: Option<BTreeSet<u32>> =
            self.state.ring.as_ref().map(|r| r.replicated_by(&self.me, self.cfg.replicas).into_iter().collect());
        let m = self.state.members.get_mut(&self.me).expect("own record");
        let mut changed = m.holding != holding;
        let unheld: BTreeSet<u32> = match &replicated {
            Some(r) => m.pins.keys().filter(|p| !r.contains(p) && !holding.contains(p)).copied().collect(),
            None => BTreeSet::new(),
        };
        for p in unheld.intersection(&self.unheld) {
            m.pins.remove(p);
            changed = true;
        }
        self.unheld = unheld.into_iter().filter(|p| m.pins.contains_key(p)).collect();
        if changed {
            m.holding = holding;
            m.changed();
        }
    }

    /// Marks this node as leaving: the claimant will move its partitions away.
    pub fn leave(&mut self) {
        let m = self.state.members.get_mut(&self.me).expect("own record");
        m.leaving = true;
        m.changed();
    }

    /// A new share of the partitions for this node; the claimant re-claims.
    pub fn set_weight(&mut self, weight: u32) {
        let m = self.state.members.get_mut(&self.me).expect("own record");
        if m.weight != weight {
            m.weight = weight;
            m.changed();
        }
    }

    /// Takes a dead member out of the ring: its record, written here for
    /// once, says it is leaving. Should it come back, it learns it was
    /// removed (see [`Gossip::receive`]) and leaves rather than rejoin.
    pub fn remove(&mut self, id: &str) -> bool {
        if id == self.me {
            self.leave();
            return true;
        }
        let Some(m) = self.state.members.get_mut(id) else { return false };
        if !m.leaving {
            m.leaving = true;
            m.changed();
        }
        true
    }

    /// One gossip round: heartbeat, maybe a new ring, and the address to
    /// exchange state with (`random` picks the peer).
    pub fn tick(&mut self, now_ms: u64, random: u64) -> Option<String> {
        let m = self.state.members.get_mut(&self.me).expect("own record");
        m.heartbeat = (m.heartbeat + 1).max(now_ms / 1000);
        self.maybe_claim(now_ms);
        self.pick_peer(now_ms, random)
    }

    fn pick_peer(&self, now_ms: u64, random: u64) -> Option<String> {
        let others: Vec<&Member> = self.state.members.values().filter(|m| m.id != self.me).collect();
        let alive: Vec<&&Member> = others.iter().filter(|m| self.is_alive(&m.id, now_ms)).collect();
        // Now and then (or when we know nobody alive) go to a seed or a
        // suspected member instead, so partitions heal and joins happen.
        let explore = alive.is_empty() || random.is_multiple_of(5);
        if explore {
            let mut pool: Vec<&str> = self.seeds.iter().map(String::as_str).collect();
            pool.extend(others.iter().filter(|m| !self.is_alive(&m.id, now_ms)).map(|m| m.addr.as_str()));
            if !pool.is_empty() {
                return Some(pool[(random / 5) as usize % pool.len()].to_string());
            }
        }
        if alive.is_empty() {
            return None;
        }
        Some(alive[(random / 7) as usize % alive.len()].addr.clone())
    }

    /// Merges state received from a peer. (What is worth saving, the shell
    /// tells by its own fingerprint of the state.)
    pub fn receive(&mut self, now_ms: u64, remote: &ClusterState) -> Result<(), Mismatch> {
        self.state.compatible(remote)?;
        self.absorb(now_ms, remote.members.values(), remote.ring.as_ref());
        Ok(())
    }

    /// Takes what is newer among `members` and `ring` (from a compatible
    /// peer), then acts on it.
    pub(crate) fn absorb<'a>(
        &mut self,
        now_ms: u64,
        members: impl IntoIterator<Item = &'a Member>,
        ring: Option<&Ring>,
    ) {
        for m in members {
            // Our own record is ours alone: never take a stale copy of it.
            // One that says we are leaving means we were removed while away
            // (or left before a restart that lost the record): we leave,
            // handing over what we hold, rather than rejoin.
            if m.id == self.me {
                if m.leaving && !self.member().leaving {
                    self.leave();
                }
                continue;
            }
            if self.state.merge_member(m) {
                self.heard(&m.id, now_ms);
            }
        }
        let ring_changed = match ring.filter(|r| r.partitions() == self.state.partitions && self.state.takes_ring(r)) {
            Some(r) => {
                self.state.ring = Some(r.clone());
                true
            }
            None => false,
        };
        self.settle(now_ms, ring_changed);
    }

    /// After news from a peer: our pins follow a new ring, and the claimant
    /// re-claims if the members changed.
    pub(crate) fn settle(&mut self, now_ms: u64, ring_changed: bool) {
        self.heard_from_peer = true;
        if ring_changed {
            self.refresh_pins();
        }
        self.maybe_claim(now_ms);
    }

    /// Something newer of `id` arrived: evidence that it is alive.
    pub(crate) fn heard(&mut self, id: &str, now_ms: u64) {
        match self.detectors.get_mut(id) {
            Some(d) => d.heartbeat(now_ms),
            None => {
                let mut d = PhiAccrual::new(self.cfg.phi);
                d.heartbeat(now_ms);
                self.detectors.insert(id.to_string(), d);
            }
        }
    }

    /// The lowest-id live member of the ring (or of all members before
    /// there is a ring) decides ring changes.
    pub fn claimant(&self, now_ms: u64) -> Option<&str> {
        let in_ring = |id: &str| self.state.ring.as_ref().is_none_or(|r| r.contains(id));
        self.state.members.keys().map(String::as_str).find(|id| in_ring(id) && self.is_alive(id, now_ms))
    }

    /// A first ring is formed once every seed is known (so nodes started
    /// together get one well-spread claim rather than a chain of small
    /// ones), or when the formation wait is over.
    fn may_form(&self, now_ms: u64) -> bool {
        let seeds_known =
            self.seeds.iter().all(|s| self.state.members.values().any(|m| m.addr == *s && m.id != self.me));
        self.state.ring.is_some() || seeds_known || now_ms.saturating_sub(self.started_ms) >= self.cfg.formation_wait_ms
    }

    /// Computes and publishes a new ring if we are the claimant and the
    /// members changed. Returns whether it did.
    pub fn maybe_claim(&mut self, now_ms: u64) -> bool {
        if self.claimant(now_ms) != Some(self.me.as_str()) || !self.state.needs_claim() || !self.may_form(now_ms) {
            return false;
        }
        let desired = self.state.desired_claimants();
        let ring = claim(self.state.ring.as_ref(), &desired, self.state.partitions, self.cfg.replicas);
        self.state.ring = Some(ring);
        self.refresh_pins();
        true
    }

    /// Recomputes which of our shards holds each partition we replicate.
    fn refresh_pins(&mut self) {
        let Some(ring) = &self.state.ring else { return };
        let held = ring.replicated_by(&self.me, self.cfg.replicas);
        let m = self.state.members.get_mut(&self.me).expect("own record");
        let pins = pin_partitions(&held, m.shards, &m.pins);
        // Keep pins of partitions we no longer replicate: their data is
        // still there until handed off, and `set_holding` drops them then.
        let mut all = m.pins.clone();
        all.extend(pins);
        if all != m.pins {
            m.pins = all;
            m.changed();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn member(id: &str, port: u16) -> Member {
        Member::new(id, &format!("127.0.0.1:{port}"), 2, 1)
    }

    /// A node of cluster "c" (Q=64) at 127.0.0.1:`port`, seeded to `seeds`.
    pub(crate) fn node(id: &str, port: u16, seeds: &[u16]) -> Gossip {
        let seeds = seeds.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Gossip::new(member(id, port), "c", 64, seeds, None, GossipConfig::default(), 0)
    }

    /// Exchanges state between every pair, in both directions.
    fn exchange_all(nodes: &mut [Gossip], now: u64) {
        for i in 0..nodes.len() {
            for j in 0..nodes.len() {
                if i != j {
                    let s = nodes[i].state().clone();
                    nodes[j].receive(now, &s).unwrap();
                }
            }
        }
    }

    #[test]
    fn nodes_that_seed_each_other_form_one_ring() {
        let mut nodes = vec![node("a", 1, &[2, 3]), node("b", 2, &[1, 3]), node("c", 3, &[1, 2])];
        for round in 1..=4 {
            let now = round * 1000;
            for n in nodes.iter_mut() {
                n.tick(now, round);
            }
            exchange_all(&mut nodes, now);
        }
        let ring = nodes[0].state().ring.clone().expect("a ring formed");
        assert_eq!(ring.members().len(), 3);
        for n in &nodes {
            assert_eq!(n.state().ring.as_ref(), Some(&ring), "every node holds the same ring");
            assert_eq!(n.state().status(n.me()), Some(Status::Up));
            // With N=3 and 3 nodes, everyone replicates everything.
            assert_eq!(n.member().pins.len(), 64);
        }
    }

    #[test]
    fn a_node_with_unreachable_seeds_waits_before_forming_alone() {
        let mut n = node("a", 1, &[2]);
        n.tick(1000, 0);
        assert!(n.state().ring.is_none(), "no ring while seeds may still answer");
        n.tick(10_000, 0);
        assert!(n.state().ring.is_some(), "forms its own cluster after the wait");
        let mut alone = node("z", 9, &[]);
        alone.tick(1, 0);
        assert!(alone.state().ring.is_some(), "without seeds a node forms at once");
    }

    #[test]
    fn a_joiner_is_added_by_the_claimant() {
        let mut nodes = vec![node("a", 1, &[]), node("b", 2, &[1])];
        nodes[0].tick(0, 0);
        exchange_all(&mut nodes, 100);
        nodes[0].tick(1000, 1);
        exchange_all(&mut nodes, 1000);
        let ring = nodes[1].state().ring.as_ref().unwrap();
        assert!(ring.contains("b"), "the claimant a added b");
        assert_eq!(ring.version, 2);
        assert_eq!(nodes[1].state().status("b"), Some(Status::Up));
    }

    #[test]
    fn mismatched_clusters_and_partition_counts_are_refused() {
        let mut a = node("a", 1, &[]);
        let other = Gossip::new(member("x", 5), "other", 64, vec![], None, GossipConfig::default(), 0);
        assert!(matches!(a.receive(0, other.state()), Err(Mismatch::Cluster { .. })));
        let other = Gossip::new(member("x", 5), "c", 128, vec![], None, GossipConfig::default(), 0);
        let e = a.receive(0, other.state()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this node has 64 partitions but the other node has 128 (Q is fixed when a cluster is created)"
        );
        assert!(e.reversed().to_string().starts_with("this node has 128 partitions"));
        assert_eq!(a.state().members.len(), 1, "nothing from the stranger was taken");
    }

    #[test]
    fn concurrent_rings_of_the_same_version_converge() {
        let mut a = node("a", 1, &[]);
        let mut b = node("b", 2, &[]);
        a.tick(0, 0);
        b.tick(0, 0);
        // Both formed a ring of version 1 alone. One exchange picks the same
        // winner everywhere; its claimant then adds the other node.
        for now in [10, 20] {
            let (sa, sb) = (a.state().clone(), b.state().clone());
            a.receive(now, &sb).unwrap();
            b.receive(now, &sa).unwrap();
        }
        assert_eq!(a.state().ring, b.state().ring);
        assert_eq!(a.state().ring.as_ref().unwrap().members().len(), 2);
    }

    #[test]
    fn silence_makes_a_member_down_in_our_view() {
        let mut nodes = vec![node("a", 1, &[]), node("b", 2, &[1])];
        for round in 0..10u64 {
            for n in nodes.iter_mut() {
                n.tick(round * 1000, round);
            }
            exchange_all(&mut nodes, round * 1000);
        }
        assert!(nodes[0].is_alive("b", 9_500));
        assert!(!nodes[0].is_alive("b", 30_000), "b is suspected after 20 s of silence");
    }

    #[test]
    fn states_round_trip_through_bytes() {
        let mut nodes = vec![node("a", 1, &[2]), node("b", 2, &[1])];
        nodes[0].tick(20_000, 0);
        exchange_all(&mut nodes, 20_000);
        nodes[0].set_load(
            Load {
                ops_per_sec: 5,
                p99_us: 900,
                disk_bytes: 1 << 30,
                keys: 7,
                hints: 1,
                cpu_permille: 420,
                ..Load::default()
            },
            20_000,
        );
        let s = nodes[0].state().clone();
        assert_eq!(ClusterState::decode(&s.encode()).unwrap(), s);
        let bytes = s.encode();
        for cut in 0..bytes.len() {
            assert!(ClusterState::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn load_is_republished_only_when_it_moved_or_has_aged() {
        let mut n = node("a", 1, &[]);
        let busy = Load { ops_per_sec: 1000, p99_us: 900, cpu_permille: 400, keys: 10_000, ..Load::default() };
        assert!(n.set_load(busy, 1000), "the first figures are news");
        let v = n.member().version;
        // Noise: 5% more requests, 10% more p99, 1.5 points of CPU.
        let noise = Load { ops_per_sec: 1050, p99_us: 990, cpu_permille: 415, keys: 10_050, ..busy };
        assert!(!n.set_load(noise, 3000));
        assert_eq!((n.member().version, n.member().load), (v, busy), "nothing gossiped for noise");
        for moved in [
            Load { ops_per_sec: 1200, ..busy },
            Load { p99_us: 2000, ..busy },
            Load { cpu_permille: 430, ..busy },
            Load { moving_partitions: 1, ..busy },
            Load { hints: 1, ..busy },
        ] {
            let mut n = node("a", 1, &[]);
            n.set_load(busy, 1000);
            assert!(n.set_load(moved, 3000), "{moved:?} is news");
            assert_eq!(n.member().load, moved);
        }
        assert!(n.set_load(noise, 1000 + LOAD_REPUBLISH_MS), "aged figures are republished");
        assert_eq!(n.member().load, noise);
    }

    #[test]
    fn a_heartbeat_never_replaces_content_and_content_keeps_the_newest_heartbeat() {
        let mut s = ClusterState::new("c", 64);
        let mut m = member("a", 1);
        m.version = 5;
        m.heartbeat = 100;
        s.merge_member(&m);
        // A copy with a newer heartbeat but older content: only the beat.
        let beat = Member { version: 4, heartbeat: 120, weight: 9, ..m.clone() };
        assert!(s.merge_member(&beat));
        assert_eq!((s.members["a"].weight, s.members["a"].heartbeat), (1, 120));
        // Newer content with an older heartbeat: the content, and the beat stays.
        let content = Member { version: 6, heartbeat: 101, weight: 3, ..m.clone() };
        assert!(s.merge_member(&content));
        assert_eq!((s.members["a"].weight, s.members["a"].heartbeat), (3, 120));
        assert!(!s.merge_member(&content), "idempotent");
        // A new generation replaces everything.
        let restarted = Member { generation: 2, version: 0, heartbeat: 7, ..m };
        assert!(s.merge_member(&restarted));
        assert_eq!(s.members["a"], restarted);
    }

    fn settle(nodes: &mut [Gossip], rounds: std::ops::RangeInclusive<u64>) {
        for round in rounds {
            for n in nodes.iter_mut() {
                n.tick(round * 1000, round);
            }
            exchange_all(nodes, round * 1000);
        }
    }

    #[test]
    fn a_removed_member_leaves_the_ring_and_leaves_when_it_comes_back() {
        let mut nodes = vec![node("a", 1, &[2, 3]), node("b", 2, &[1, 3]), node("c", 3, &[1, 2]), node("d", 4, &[1])];
        settle(&mut nodes, 1..=4);
        assert!(nodes[0].state().ring.as_ref().unwrap().contains("d"));
        // d dies; a removes it.
        let mut d = nodes.pop().unwrap();
        assert!(nodes[0].remove("d"));
        assert!(!nodes[0].remove("nobody"));
        settle(&mut nodes, 5..=8);
        for n in &nodes {
            assert!(!n.state().ring.as_ref().unwrap().contains("d"), "{} still has d in its ring", n.me());
            assert_eq!(n.state().status("d"), Some(Status::Leaving));
        }
        // d comes back: it learns it was removed.
        let s = nodes[1].state().clone();
        d.receive(9000, &s).unwrap();
        assert!(d.member().leaving, "a removed node does not rejoin");
    }

    #[test]
    fn a_new_weight_is_published_and_reclaimed() {
        let mut nodes = vec![node("a", 1, &[2, 3]), node("b", 2, &[1, 3]), node("c", 3, &[1, 2])];
        settle(&mut nodes, 1..=4);
        let before = nodes[0].state().ring.as_ref().unwrap().counts()["c"];
        nodes[2].set_weight(4);
        settle(&mut nodes, 5..=8);
        let after = nodes[0].state().ring.as_ref().unwrap().counts()["c"];
        // 4 of 6 weight units: about two thirds of the 64 partitions.
        assert!(after > before && (41..=43).contains(&after), "c owned {before}, now {after}");
    }

    #[test]
    fn a_moved_partition_keeps_its_pin_and_its_holder_until_two_reports_say_it_is_gone() {
        let mut nodes = vec![node("a", 1, &[2]), node("b", 2, &[1]), node("c", 3, &[1]), node("d", 4, &[1])];
        settle(&mut nodes, 1..=4);
        let before = nodes[0].member().pins.clone();
        nodes[2].set_weight(4);
        settle(&mut nodes, 5..=8);
        let ring = nodes[0].state().ring.clone().unwrap();
        let now_owned: BTreeSet<u32> = ring.replicated_by("a", 3).into_iter().collect();
        let moved: Vec<u32> = before.keys().copied().filter(|p| !now_owned.contains(p)).collect();
        assert!(!moved.is_empty(), "c's new weight takes partitions from a");
        let pins = &nodes[0].member().pins;
        assert!(moved.iter().all(|p| pins.get(p) == before.get(p)), "a keeps the pins of what it still has");
        let topo = |g: &Gossip| crate::topology::Topology::new("b", 1, 3, g.state(), |_| true).unwrap();
        let a = crate::topology::MemberId::of("a");
        assert!(moved.iter().all(|&p| topo(&nodes[0]).holders(p) == [a]), "a is read from until it streamed");
        let (first, rest) = (moved[0], &moved[1..]);
        for _ in 0..2 {
            nodes[0].set_holding([first].into());
            assert!(nodes[0].member().pins.contains_key(&first), "held partitions keep their pin");
        }
        assert!(rest.iter().all(|p| !nodes[0].member().pins.contains_key(p)), "two reports without them: gone");
        nodes[0].set_holding(BTreeSet::new());
        assert!(nodes[0].member().pins.contains_key(&first), "one report is not enough");
        nodes[0].set_holding(BTreeSet::new());
        assert_eq!(nodes[0].member().pins.keys().copied().collect::<BTreeSet<u32>>(), now_owned);
        assert!(topo(&nodes[0]).holders(first).is_empty());
    }
}
