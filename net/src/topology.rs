//! The cluster's layout as a client needs it: which node, and which of its
//! shard ports, serves each key. Built from a node's `Topology` reply (the
//! gossiped cluster state); pure, so any client (blocking, async, the
//! benchmark's io_uring loop) can route with it.

use ringkv_core::keyspace::partition_of;
use ringkv_core::membership::ClusterState;
use std::net::SocketAddr;

#[derive(Debug, Clone)]
pub struct Topology {
    state: ClusterState,
    replicas: usize,
}

impl Topology {
    /// Decodes a `Topology` reply's state.
    pub fn decode(state: &[u8], replicas: u8) -> Result<Topology, String> {
        let state = ClusterState::decode(state).map_err(|e| format!("topology: {e}"))?;
        if state.ring.is_none() {
            return Err("the node has no ring yet (still joining)".into());
        }
        Ok(Topology { state, replicas: usize::from(replicas.max(1)) })
    }

    /// The ring version this layout comes from.
    pub fn version(&self) -> u64 {
        self.state.ring.as_ref().map_or(0, |r| r.version)
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn cluster(&self) -> &ClusterState {
        &self.state
    }

    /// Where to send a request for `key`: the shard address of each replica,
    /// in preference order (the first is the natural coordinator).
    pub fn route(&self, key: &[u8]) -> Vec<SocketAddr> {
        self.route_partition(partition_of(key, self.state.partitions))
    }

    /// [`Topology::route`] for every key of partition `p`.
    pub fn route_partition(&self, p: u32) -> Vec<SocketAddr> {
        let Some(ring) = &self.state.ring else { return Vec::new() };
        ring.preference_list(p, self.replicas)
            .into_iter()
            .filter_map(|node| {
                let m = self.state.members.get(node)?;
                let base: SocketAddr = m.addr.parse().ok()?;
                let shard = m.shard_of(p).unwrap_or(0);
                Some(SocketAddr::new(base.ip(), base.port() + shard))
            })
            .collect()
    }

    /// Every member's first (shard 0) address: where to refresh from.
    pub fn members(&self) -> Vec<SocketAddr> {
        self.state.members.values().filter_map(|m| m.addr.parse().ok()).collect()
    }
}
