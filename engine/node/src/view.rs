//! An immutable snapshot of the cluster, for routing requests.
//!
//! The gossip shard builds a new [`ClusterView`] whenever membership, the
//! ring or liveness changes and sends it to every shard; a shard reads the
//! current one without locks. Everything a coordinator needs is precomputed
//! here: each partition's preference walk, where each member keeps each
//! partition, who is alive.

use ringkv_core::membership::{ClusterState, Status};
use ringkv_core::ring::Ring;
use ringkv_core::topology::{MemberId, Topology};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

/// How to reach a member.
#[derive(Debug, Clone)]
pub struct Route {
    pub addr: SocketAddr,
    pub shards: u16,
    pub pins: BTreeMap<u32, u16>,
    pub alive: bool,
    pub status: Status,
}

#[derive(Debug, Clone)]
pub struct ClusterView {
    pub me: String,
    pub replicas: usize,
    pub partitions: u32,
    pub ring: Option<Ring>,
    pub members: HashMap<String, Route>,
    /// Distinct nodes in walk order from each partition: the first
    /// `replicas` are its preference list, the rest its fallbacks.
    walks: Vec<Vec<String>>,
    /// The encoded cluster state, as handed to topology-aware clients.
    pub state: Vec<u8>,
    /// This node's shard count (pins missing from the view fall back to
    /// `partition % shards`).
    shards: u16,
    /// The same snapshot as the protocol machines see it.
    pub topo: Topology,
    /// Member names by id, to reach a member a machine names.
    names: HashMap<MemberId, String>,
}

impl ClusterView {
    pub fn new(
        me: &str,
        shards: u16,
        replicas: usize,
        state: &ClusterState,
        alive: impl Fn(&str) -> bool,
    ) -> ClusterView {
        let members = state
            .members
            .values()
            .filter_map(|m| {
                let addr = m.addr.parse().ok()?;
                let route = Route {
                    addr,
                    shards: m.shards,
                    pins: m.pins.clone(),
                    alive: alive(&m.id),
                    status: state.status(&m.id).unwrap_or(Status::Joining),
                };
                Some((m.id.clone(), route))
            })
            .collect();
        let walks = match &state.ring {
            Some(r) => (0..r.partitions()).map(|p| r.walk(p).into_iter().map(str::to_string).collect()).collect(),
            None => Vec::new(),
        };
        let topo = Topology::new(me, shards, replicas, state, &alive).unwrap_or_else(|e| {
            // Two member names with one id: refuse to route rather than
            // send a replica's data to the wrong node.
            tracing::error!(error = %e, "cannot build the routing snapshot");
            Topology::default()
        });
        let names = topo.members().map(|(id, n)| (id, n.to_string())).collect();
        ClusterView {
            me: me.to_string(),
            replicas,
            partitions: state.partitions,
            ring: state.ring.clone(),
            members,
            walks,
            state: state.encode(),
            shards,
            topo,
            names,
        }
    }

    /// Where member `m` serves partition `p` (see [`ClusterView::address`]).
    pub fn address_of(&self, m: MemberId, p: u32) -> Option<SocketAddr> {
        self.address(self.names.get(&m)?, p)
    }

    /// A member's name, if this view knows it.
    pub fn name_of(&self, m: MemberId) -> Option<&str> {
        self.names.get(&m).map(String::as_str)
    }

    pub fn ring_version(&self) -> u64 {
        self.ring.as_ref().map_or(0, |r| r.version)
    }

    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// The preference list of `p` (at most N distinct nodes).
    pub fn primaries(&self, p: u32) -> &[String] {
        match self.walks.get(p as usize) {
            Some(w) => &w[..w.len().min(self.replicas)],
            None => &[],
        }
    }

    /// Nodes after the preference list, in walk order.
    pub fn fallbacks(&self, p: u32) -> &[String] {
        match self.walks.get(p as usize) {
            Some(w) => &w[w.len().min(self.replicas)..],
            None => &[],
        }
    }

    pub fn is_primary(&self, p: u32, node: &str) -> bool {
        self.primaries(p).iter().any(|n| n == node)
    }

    pub fn alive(&self, node: &str) -> bool {
        node == self.me || self.members.get(node).is_some_and(|r| r.alive)
    }

    /// The shard of this node that holds partition `p`.
    pub fn local_shard(&self, p: u32) -> usize {
        let pinned = self.members.get(&self.me).and_then(|m| m.pins.get(&p).copied());
        usize::from(pinned.unwrap_or((p % u32::from(self.shards)) as u16))
    }

    /// Where `node` serves partition `p`: its shard for `p` if it published
    /// one, else its first port (which forwards internally).
    pub fn address(&self, node: &str, p: u32) -> Option<SocketAddr> {
        let r = self.members.get(node)?;
        let shard = r.pins.get(&p).copied().unwrap_or(0);
        Some(SocketAddr::new(r.addr.ip(), r.addr.port() + shard))
    }

    /// Partitions `node` is a primary replica of.
    pub fn replicated_by(&self, node: &str) -> usize {
        (0..self.walks.len() as u32).filter(|&p| self.is_primary(p, node)).count()
    }
}
