//! What the protocol machines know of the cluster: integer member ids,
//! each partition's preference walk, who is alive, which shard holds what.
//!
//! A [`Topology`] is an immutable snapshot built from the gossiped
//! [`ClusterState`] and this node's failure detectors; every machine takes
//! the current one as an argument to each event, so a decision always uses
//! the latest view and nothing has to be told when it changes.
//!
//! Member ids are a 64-bit hash of the member's name. They are stable across
//! snapshots (an operation that started under one view can still name its
//! replicas under the next), cost nothing to copy or compare, and a
//! collision between two names of one cluster is refused when the snapshot
//! is built.

use crate::membership::ClusterState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// A cluster member, by the hash of its name.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId(pub u64);

impl MemberId {
    pub fn of(name: &str) -> MemberId {
        // A seed of our own so ids never equal the keys' hashes by design.
        MemberId(xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), 0x6d65_6d62_6572))
    }
}

impl fmt::Debug for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "m{:016x}", self.0)
    }
}

/// One immutable snapshot of the cluster as this node sees it.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    me: Option<MemberId>,
    replicas: usize,
    partitions: u32,
    /// Distinct members in walk order from each partition: the first
    /// `replicas` are its preference list, the rest its fallbacks. Empty
    /// before there is a ring.
    walks: Vec<Vec<MemberId>>,
    alive: HashMap<MemberId, bool>,
    names: HashMap<MemberId, String>,
    /// This node's shard for each partition it holds; partitions without a
    /// pin fall back to `p % shards`.
    pins: BTreeMap<u32, u16>,
    shards: u16,
    /// Partitions some member holds misplaced data of.
    held: BTreeSet<u32>,
    /// Per partition, the members outside its preference list that may
    /// still hold data of it: they pin it or say they hold it.
    holders: HashMap<u32, Vec<MemberId>>,
}

/// Why a snapshot could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdCollision(pub String, pub String);

impl fmt::Display for IdCollision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "member names {:?} and {:?} hash to the same id; rename one", self.0, self.1)
    }
}

impl Topology {
    /// The snapshot of `state` for node `me` with `shards` shards, liveness
    /// from `alive` (always true for `me`).
    pub fn new(
        me: &str,
        shards: u16,
        replicas: usize,
        state: &ClusterState,
        alive: impl Fn(&str) -> bool,
    ) -> Result<Topology, IdCollision> {
        let mut names: HashMap<MemberId, String> = HashMap::new();
        let mut register = |name: &str| -> Result<MemberId, IdCollision> {
            let id = MemberId::of(name);
            match names.get(&id) {
                Some(other) if other != name => Err(IdCollision(other.clone(), name.to_string())),
                Some(_) => Ok(id),
                None => {
                    names.insert(id, name.to_string());
                    Ok(id)
                }
            }
        };
        let me_id = register(me)?;
        let mut live = HashMap::new();
        for m in state.members.values() {
            let id = register(&m.id)?;
            live.insert(id, m.id == me || alive(&m.id));
        }
        let mut walks: Vec<Vec<MemberId>> = Vec::new();
        if let Some(ring) = &state.ring {
            for m in ring.members() {
                register(&m.id)?;
            }
            walks = (0..ring.partitions()).map(|p| ring.walk(p).into_iter().map(MemberId::of).collect()).collect();
        }
        live.insert(me_id, true);
        let pins = state.members.get(me).map(|m| m.pins.clone()).unwrap_or_default();
        let mut holders: HashMap<u32, Vec<MemberId>> = HashMap::new();
        for m in state.members.values() {
            let id = MemberId::of(&m.id);
            let mut held: BTreeSet<u32> = m.holding.clone();
            held.extend(m.pins.keys());
            for p in held {
                let primary = walks.get(p as usize).is_some_and(|w| w[..w.len().min(replicas)].contains(&id));
                if !primary && p < state.partitions {
                    holders.entry(p).or_default().push(id);
                }
            }
        }
        Ok(Topology {
            me: Some(me_id),
            replicas,
            partitions: state.partitions,
            walks,
            alive: live,
            names,
            pins,
            shards: shards.max(1),
            held: state.members.values().flat_map(|m| m.holding.iter().copied()).collect(),
            holders,
        })
    }

    /// Members outside `p`'s preference list that may still hold data of
    /// it: a ring change moved the partition away from them and their
    /// stream has not ended (they keep its pin until it has). A read asks
    /// them too, so a value written before the change is found even when
    /// the read's quorum is all new owners.
    pub fn holders(&self, p: u32) -> &[MemberId] {
        self.holders.get(&p).map_or(&[], Vec::as_slice)
    }

    /// The same snapshot, with `members` as holders of `p` (for tests); a
    /// member it did not know is alive.
    pub fn with_holders(mut self, p: u32, members: &[&str]) -> Topology {
        let ids = members.iter().map(|n| {
            let id = MemberId::of(n);
            self.names.insert(id, n.to_string());
            self.alive.entry(id).or_insert(true);
            id
        });
        self.holders.insert(p, ids.collect());
        self
    }

    /// The same snapshot, with `held` as the partitions some member holds
    /// misplaced data of (for tests).
    pub fn with_held(mut self, held: impl IntoIterator<Item = u32>) -> Topology {
        self.held = held.into_iter().collect();
        self
    }

    /// Whether some member (this one included) holds data of partition `p`
    /// that belongs elsewhere and is not streamed yet.
    pub fn held_misplaced(&self, p: u32) -> bool {
        self.held.contains(&p)
    }

    /// A snapshot assembled directly, for tests and the simulator: `walks`
    /// per partition, every listed member alive unless named in `down`.
    pub fn from_walks(me: &str, replicas: usize, walks: Vec<Vec<String>>, down: &[&str]) -> Topology {
        let mut names = HashMap::new();
        let mut alive = HashMap::new();
        let walks: Vec<Vec<MemberId>> = walks
            .into_iter()
            .map(|w| {
                w.into_iter()
                    .map(|n| {
                        let id = MemberId::of(&n);
                        alive.insert(id, n == me || !down.contains(&n.as_str()));
                        names.insert(id, n);
                        id
                    })
                    .collect()
            })
            .collect();
        let me_id = MemberId::of(me);
        names.insert(me_id, me.to_string());
        alive.insert(me_id, true);
        Topology {
            me: Some(me_id),
            replicas,
            partitions: walks.len() as u32,
            walks,
            alive,
            names,
            pins: BTreeMap::new(),
            shards: 1,
            held: BTreeSet::new(),
            holders: HashMap::new(),
        }
    }

    pub fn me(&self) -> MemberId {
        self.me.unwrap_or(MemberId(0))
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn has_ring(&self) -> bool {
        !self.walks.is_empty()
    }

    /// The preference list of `p` (at most N distinct members).
    pub fn primaries(&self, p: u32) -> &[MemberId] {
        match self.walks.get(p as usize) {
            Some(w) => &w[..w.len().min(self.replicas)],
            None => &[],
        }
    }

    /// Members after the preference list, in walk order.
    pub fn fallbacks(&self, p: u32) -> &[MemberId] {
        match self.walks.get(p as usize) {
            Some(w) => &w[w.len().min(self.replicas)..],
            None => &[],
        }
    }

    pub fn is_primary(&self, p: u32, m: MemberId) -> bool {
        self.primaries(p).contains(&m)
    }

    pub fn alive(&self, m: MemberId) -> bool {
        Some(m) == self.me || self.alive.get(&m).copied().unwrap_or(false)
    }

    /// A member's name, for messages and logs.
    pub fn name(&self, m: MemberId) -> String {
        self.names.get(&m).cloned().unwrap_or_else(|| format!("{m:?}"))
    }

    /// Every member this snapshot knows by name.
    pub fn members(&self) -> impl Iterator<Item = (MemberId, &str)> {
        self.names.iter().map(|(id, n)| (*id, n.as_str()))
    }

    /// This node's shard that holds partition `p`.
    pub fn local_shard(&self, p: u32) -> u16 {
        self.pins.get(&p).copied().unwrap_or((p % u32::from(self.shards)) as u16).min(self.shards - 1)
    }

    /// Partitions this node replicates whose data shard `shard` holds.
    pub fn partitions_of_shard(&self, shard: u16) -> Vec<u32> {
        let me = self.me();
        (0..self.walks.len() as u32).filter(|&p| self.is_primary(p, me) && self.local_shard(p) == shard).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Member;
    use crate::ring::{claim, Claimant};

    fn state(names: &[&str]) -> ClusterState {
        let mut s = ClusterState::new("c", 8);
        for (i, n) in names.iter().enumerate() {
            s.members.insert(
                n.to_string(),
                Member { heartbeat: 1, version: 1, ..Member::new(n, &format!("127.0.0.{}:7070", i + 1), 1, 1) },
            );
        }
        let claimants: Vec<Claimant> = names.iter().map(|n| Claimant { id: n.to_string(), weight: 1 }).collect();
        s.ring = Some(claim(None, &claimants, 8, 3));
        s
    }

    #[test]
    fn walks_follow_the_ring_and_liveness_comes_from_the_detector() {
        let s = state(&["a", "b", "c", "d"]);
        let t = Topology::new("a", 1, 3, &s, |n| n != "c").unwrap();
        let ring = s.ring.as_ref().unwrap();
        for p in 0..8 {
            let want: Vec<MemberId> = ring.preference_list(p, 3).into_iter().map(MemberId::of).collect();
            assert_eq!(t.primaries(p), want.as_slice());
            assert_eq!(t.primaries(p).len() + t.fallbacks(p).len(), 4);
        }
        assert!(t.alive(MemberId::of("a")) && t.alive(MemberId::of("b")));
        assert!(!t.alive(MemberId::of("c")), "the detector's opinion");
        assert!(!t.alive(MemberId::of("zz")), "strangers are not alive");
        assert_eq!(t.name(MemberId::of("d")), "d");
    }

    #[test]
    fn before_a_ring_there_is_nothing_to_route_to() {
        let mut s = state(&["a"]);
        s.ring = None;
        let t = Topology::new("a", 2, 3, &s, |_| true).unwrap();
        assert!(!t.has_ring());
        assert!(t.primaries(0).is_empty());
    }
}
