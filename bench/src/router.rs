//! Which endpoint a key's request goes to.
//!
//! A target resolves to a list of endpoints (host:port) and a [`Router`]
//! that maps each key to one of them. Workers keep a connection per endpoint
//! and ask the router for every request, so routing costs one call and no
//! allocation on the request path.

use crate::slots::{key_slot, SlotMap};
use std::net::SocketAddr;

pub trait Router: Send {
    /// The endpoint (index into the target's endpoint list) for `key`.
    fn endpoint_for(&self, key: &[u8]) -> usize;

    /// The server said a key's slot lives at `endpoint` now (Redis MOVED).
    fn moved(&mut self, _slot: u16, _endpoint: usize) {}

    /// Every endpoint that can serve `key`, in preference order (the first
    /// is [`Router::endpoint_for`]'s): where a request goes when the one
    /// before did not answer in time. One unless the target replicates.
    fn replicas_for(&self, key: &[u8], out: &mut Vec<usize>) {
        out.clear();
        out.push(self.endpoint_for(key));
    }

    /// A copy for another worker thread.
    fn boxed_clone(&self) -> Box<dyn Router>;

    /// The most replicas it knows for a key (over a sample of the
    /// workload's keys): one means no failover and no client-driven reads.
    fn most_replicas(&self) -> usize {
        let (mut key, mut r) = (Vec::new(), Vec::new());
        (0..64u64)
            .map(|i| {
                crate::keydist::write_key(&mut key, i);
                self.replicas_for(&key, &mut r);
                r.len()
            })
            .max()
            .unwrap_or(1)
    }
}

/// Everything goes to the one endpoint.
#[derive(Debug, Clone)]
pub struct SingleEndpoint;

impl Router for SingleEndpoint {
    fn endpoint_for(&self, _key: &[u8]) -> usize {
        0
    }

    fn boxed_clone(&self) -> Box<dyn Router> {
        Box::new(self.clone())
    }
}

/// The partition of a key among `partitions`, as ringkv computes it
/// (`engine/core/src/keyspace.rs`): xxh3-64 of the key scaled onto 0..q.
pub fn ringkv_partition(key: &[u8], partitions: u32) -> u32 {
    ((u128::from(xxhash_rust::xxh3::xxh3_64(key)) * u128::from(partitions)) >> 64) as u32
}

/// One ringkv node with S shards: endpoint i is shard i's port, and a key
/// goes straight to the shard its partition is pinned to, so the node never
/// forwards it between cores. A single node pins partition p to shard
/// `p % S` (`NodeContext::new` in `engine/node/src/shard.rs`).
#[derive(Debug, Clone)]
pub struct ShardAwareNode {
    pub partitions: u32,
    pub shards: u16,
}

impl Router for ShardAwareNode {
    fn endpoint_for(&self, key: &[u8]) -> usize {
        (ringkv_partition(key, self.partitions) % u32::from(self.shards.max(1))) as usize
    }

    fn boxed_clone(&self) -> Box<dyn Router> {
        Box::new(self.clone())
    }
}

impl ShardAwareNode {
    /// Endpoints of the node's shards: shard i listens on port + i.
    pub fn endpoints(base: SocketAddr, shards: u16) -> Vec<SocketAddr> {
        (0..shards).map(|i| SocketAddr::new(base.ip(), base.port() + i)).collect()
    }
}

/// A ringkv cluster: a key goes to the owning shard of its first replica,
/// as `ringkv_net::Topology::route` says, precomputed per partition so a
/// request costs a hash and a table lookup; the other replicas' shards are
/// where it fails over to.
#[derive(Debug, Clone)]
pub struct TopologyRouter {
    partitions: u32,
    /// Partition p's replicas as indexes into `endpoints`, in preference
    /// order: `table[starts[p]..starts[p + 1]]`.
    table: Vec<usize>,
    starts: Vec<usize>,
}

impl TopologyRouter {
    /// The router and the endpoint list it indexes: every (node, shard)
    /// address that replicates some partition.
    pub fn new(topology: &ringkv_net::Topology) -> (TopologyRouter, Vec<SocketAddr>) {
        let partitions = topology.cluster().partitions.max(1);
        let mut endpoints: Vec<SocketAddr> = Vec::new();
        let mut table = Vec::new();
        let mut starts = Vec::with_capacity(partitions as usize + 1);
        for p in 0..partitions {
            // Any key of partition p routes like p's own first key would; ask
            // the topology for the partition's replicas directly.
            let route = topology.route_partition(p);
            assert!(!route.is_empty(), "a ring has replicas for every partition");
            starts.push(table.len());
            for addr in route {
                let i = match endpoints.iter().position(|a| *a == addr) {
                    Some(i) => i,
                    None => {
                        endpoints.push(addr);
                        endpoints.len() - 1
                    }
                };
                table.push(i);
            }
        }
        starts.push(table.len());
        (TopologyRouter { partitions, table, starts }, endpoints)
    }

    fn replicas(&self, key: &[u8]) -> &[usize] {
        let p = ringkv_partition(key, self.partitions) as usize;
        &self.table[self.starts[p]..self.starts[p + 1]]
    }
}

impl Router for TopologyRouter {
    fn endpoint_for(&self, key: &[u8]) -> usize {
        self.replicas(key)[0]
    }

    fn replicas_for(&self, key: &[u8], out: &mut Vec<usize>) {
        out.clear();
        out.extend_from_slice(self.replicas(key));
    }

    fn boxed_clone(&self) -> Box<dyn Router> {
        Box::new(self.clone())
    }
}

/// Redis Cluster: a key goes to the master that serves its slot.
#[derive(Debug, Clone)]
pub struct SlotRouter {
    owner: Vec<u16>,
}

impl SlotRouter {
    pub fn new(map: &SlotMap) -> SlotRouter {
        SlotRouter { owner: map.owner.clone() }
    }
}

impl Router for SlotRouter {
    fn endpoint_for(&self, key: &[u8]) -> usize {
        usize::from(self.owner[usize::from(key_slot(key))])
    }

    fn moved(&mut self, slot: u16, endpoint: usize) {
        if let (Some(o), Ok(e)) = (self.owner.get_mut(usize::from(slot)), u16::try_from(endpoint)) {
            *o = e;
        }
    }

    fn boxed_clone(&self) -> Box<dyn Router> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keydist::write_key;
    use crate::slots::SLOTS;

    #[test]
    fn partitions_match_ringkv_core() {
        // The same cut points as ringkv-core's partition_of_hash tests.
        let part = |h: u64, q: u32| ((u128::from(h) * u128::from(q)) >> 64) as u32;
        assert_eq!(part(u64::MAX, 256), 255);
        assert_eq!(part(1 << 56, 256), 1);
        let key = b"user42";
        assert_eq!(ringkv_partition(key, 256), part(xxhash_rust::xxh3::xxh3_64(key), 256));
    }

    #[test]
    fn shard_aware_routing_spreads_keys_over_all_shards() {
        let r = ShardAwareNode { partitions: 256, shards: 3 };
        let mut per_shard = [0usize; 3];
        let mut key = Vec::new();
        for i in 0..3000 {
            write_key(&mut key, i);
            let e = r.endpoint_for(&key);
            assert_eq!(e as u32, ringkv_partition(&key, 256) % 3);
            per_shard[e] += 1;
        }
        assert!(per_shard.iter().all(|&n| n > 800), "{per_shard:?}");
        let eps = ShardAwareNode::endpoints("127.0.0.1:7070".parse().unwrap(), 3);
        assert_eq!(eps[2], "127.0.0.1:7072".parse().unwrap());
    }

    #[test]
    fn topology_routing_sends_a_key_to_its_replicas_in_preference_order() {
        use ringkv_core::membership::{ClusterState, Member};
        use ringkv_core::ring::{claim, Claimant};
        let mut state = ClusterState::new("ringkv", 64);
        let names = ["n1", "n2", "n3", "n4"];
        for (i, n) in names.iter().enumerate() {
            state.members.insert(n.to_string(), Member::new(n, &format!("127.0.0.{}:7070", i + 1), 1, 1));
        }
        let claimants: Vec<Claimant> = names.iter().map(|n| Claimant { id: n.to_string(), weight: 1 }).collect();
        state.ring = Some(claim(None, &claimants, 64, 3));
        let topology = ringkv_net::Topology::decode(&state.encode(), 3).unwrap();
        let (router, endpoints) = TopologyRouter::new(&topology);
        assert_eq!(endpoints.len(), 4, "every replica's shard is an endpoint");
        let (mut key, mut replicas) = (Vec::new(), Vec::new());
        for i in 0..500 {
            write_key(&mut key, i);
            router.replicas_for(&key, &mut replicas);
            let addrs: Vec<SocketAddr> = replicas.iter().map(|&e| endpoints[e]).collect();
            assert_eq!(addrs, topology.route(&key), "the topology's order");
            assert_eq!(replicas[0], router.endpoint_for(&key));
        }
        let mut one = Vec::new();
        SingleEndpoint.replicas_for(b"k", &mut one);
        assert_eq!(one, [0], "a target that does not replicate has nowhere to fail over to");
    }

    #[test]
    fn slot_router_follows_moved() {
        let map = SlotMap { masters: vec![], owner: vec![0; SLOTS] };
        let mut r = SlotRouter::new(&map);
        let slot = key_slot(b"foo");
        assert_eq!(r.endpoint_for(b"foo"), 0);
        r.moved(slot, 2);
        assert_eq!(r.endpoint_for(b"foo"), 2);
        assert_eq!(r.endpoint_for(b"bar"), 0);
        let c = r.boxed_clone();
        assert_eq!(c.endpoint_for(b"foo"), 2);
    }
}
