//! The ring: which node owns each of the Q partitions, and who replicates it.
//!
//! Ownership follows Dynamo's "strategy 3" as Riak does it: Q equal
//! partitions of the hash space, each claimed by one node; the preference
//! list of partition p is the owners of p, p+1, ... skipping nodes already
//! chosen, until N distinct nodes; the nodes after those are the fallbacks
//! a sloppy quorum may use.
//!
//! [`claim`] computes a new ring from the old one and the members with their
//! weights. Its invariants (checked by the property tests):
//! - each node's partition count is the floor or the ceiling of its
//!   weighted share `Q * w / W`, except that every node gets at least one
//!   partition while there are enough of them;
//! - few partitions move: nodes over their new target release exactly their
//!   excess, preferring partitions spread around the ring, rounding ties keep
//!   the current owner, and mending the spacing may cost at most 10% more;
//! - where it can, a node's partitions are at least N apart, so a preference
//!   list is usually just N consecutive owners and every node replicates
//!   about N times its owned share (checked by the property tests, since a
//!   badly spaced ring leaves some nodes holding far more data than others).
//!
//! Pure: no I/O, deterministic (ties broken by node id).

use crate::codec::{err, put_varint, DecodeError, Reader};
use std::collections::BTreeMap;

/// The largest weight a member may have (its share grows with it).
pub const MAX_WEIGHT: u32 = 10_000;

/// A member as the claim sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Claimant {
    pub id: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ring {
    /// Increases with every claim; gossip keeps the highest.
    pub version: u64,
    /// The members the ring was claimed for, with their weights, sorted by
    /// id. With more members than partitions some own nothing.
    members: Vec<Claimant>,
    /// Owner of each partition, as an index into `members`.
    owners: Vec<u16>,
}

impl Ring {
    /// A ring where `node` owns every partition.
    pub fn single(node: &str, weight: u32, q: u32) -> Ring {
        Ring { version: 1, members: vec![Claimant { id: node.to_string(), weight }], owners: vec![0; q as usize] }
    }

    pub fn partitions(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The members the ring was claimed for.
    pub fn members(&self) -> &[Claimant] {
        &self.members
    }

    pub fn contains(&self, node: &str) -> bool {
        self.members.binary_search_by(|m| m.id.as_str().cmp(node)).is_ok()
    }

    pub fn owner(&self, p: u32) -> &str {
        &self.members[usize::from(self.owners[p as usize])].id
    }

    /// Partitions owned per member (zero for members that own none).
    pub fn counts(&self) -> BTreeMap<&str, usize> {
        let mut c: BTreeMap<&str, usize> = self.members.iter().map(|m| (m.id.as_str(), 0)).collect();
        for &o in &self.owners {
            *c.get_mut(self.members[usize::from(o)].id.as_str()).expect("owner is a member") += 1;
        }
        c
    }

    /// Distinct nodes in walk order from partition `p`: the first N are the
    /// preference list, the rest are fallbacks.
    pub fn walk(&self, p: u32) -> Vec<&str> {
        self.walk_until(p, self.members.len())
    }

    /// The first `n` distinct nodes from `p` (fewer if the ring has fewer).
    pub fn preference_list(&self, p: u32, n: usize) -> Vec<&str> {
        self.walk_until(p, n)
    }

    /// The first `n` distinct owners from `p`; stops as soon as it has them
    /// (a well-spaced ring has them in the next `n` partitions).
    fn walk_until(&self, p: u32, n: usize) -> Vec<&str> {
        let q = self.owners.len();
        let want = n.min(self.members.len());
        let mut out: Vec<&str> = Vec::with_capacity(want);
        // Few wanted (a preference list): a short list to search; many (a
        // whole walk): a flag per member.
        let mut few: Vec<u16> = Vec::with_capacity(want.min(16));
        let mut many = vec![false; if want > 16 { self.members.len() } else { 0 }];
        for i in 0..q {
            if out.len() == want {
                break;
            }
            let o = self.owners[(p as usize + i) % q];
            let new = if many.is_empty() {
                !few.contains(&o) && {
                    few.push(o);
                    true
                }
            } else {
                !std::mem::replace(&mut many[usize::from(o)], true)
            };
            if new {
                out.push(self.members[usize::from(o)].id.as_str());
            }
        }
        out
    }

    /// Partitions whose preference list (of `n`) includes `node`.
    pub fn replicated_by(&self, node: &str, n: usize) -> Vec<u32> {
        (0..self.partitions()).filter(|&p| self.preference_list(p, n).contains(&node)).collect()
    }

    /// How many partitions share an owner with one of the `n - 1` before them:
    /// zero is perfect spacing.
    pub fn spacing_violations(&self, n: usize) -> usize {
        let q = self.owners.len();
        (0..q).filter(|&p| (1..n.min(q)).any(|d| self.owners[p] == self.owners[(p + q - d) % q])).count()
    }

    /// Number of partitions whose owner differs between the two rings.
    pub fn moved_from(&self, old: &Ring) -> usize {
        assert_eq!(self.partitions(), old.partitions());
        (0..self.partitions()).filter(|&p| self.owner(p) != old.owner(p)).count()
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.version);
        put_varint(out, u64::from(self.partitions()));
        put_varint(out, self.members.len() as u64);
        for m in &self.members {
            put_varint(out, m.id.len() as u64);
            out.extend_from_slice(m.id.as_bytes());
            put_varint(out, u64::from(m.weight));
        }
        for &o in &self.owners {
            put_varint(out, u64::from(o));
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Ring, DecodeError> {
        let version = r.varint()?;
        let q = r.len(1 << 16)?;
        let k = r.len(u16::MAX as usize)?;
        let mut members: Vec<Claimant> = Vec::with_capacity(k.min(r.remaining()));
        for _ in 0..k {
            let len = r.len(256)?;
            let s = std::str::from_utf8(r.bytes(len)?).map_err(|_| DecodeError { what: "node id is not UTF-8" })?;
            if members.last().is_some_and(|prev| prev.id.as_str() >= s) {
                return err("ring members out of order");
            }
            let weight = u32::try_from(r.varint()?).map_err(|_| DecodeError { what: "weight over u32" })?;
            members.push(Claimant { id: s.to_string(), weight });
        }
        let mut owners = Vec::with_capacity(q);
        for _ in 0..q {
            let o = r.len(k.saturating_sub(1))?;
            owners.push(o as u16);
        }
        if k == 0 || q == 0 {
            return err("empty ring");
        }
        Ok(Ring { version, members, owners })
    }
}

/// Partitions each member should own: floor or ceiling of its weighted
/// share, at least one each while partitions last. Rounding ties go to
/// nodes that already own more, so a recomputation moves nothing needlessly.
pub fn targets(q: usize, members: &[Claimant], current: &[usize]) -> Vec<usize> {
    let k = members.len();
    assert!(k > 0 && current.len() == k);
    let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
    assert!(total > 0, "members need positive weights");
    // Exact shares as fractions share_num / total.
    let share_num: Vec<u64> = members.iter().map(|m| q as u64 * u64::from(m.weight)).collect();
    let floor = share_num.iter().map(|s| (s / total) as usize);
    let mut t: Vec<usize> = floor.map(|f| if q >= k { f.max(1) } else { f }).collect();
    let mut sum: usize = t.iter().sum();
    // Minimum-one bumps may hand out too many: take back from the node the
    // furthest above its exact share, preferring one that does not own that
    // many yet (nothing has to move then).
    while sum > q {
        let i = (0..k)
            .filter(|&i| t[i] > 1)
            .max_by_key(|&i| (t[i] as u64 * total).saturating_sub(share_num[i]) * 2 + u64::from(current[i] < t[i]))
            .expect("more handed out than exists, so someone has more than one");
        t[i] -= 1;
        sum -= 1;
    }
    // Round up the nodes still below their exact share: first those that
    // already own more than their floor (so nothing moves), then the largest
    // remainder, then the lowest id.
    let below = |t: &[usize], i: usize| (t[i] as u64) * total < share_num[i];
    while sum < q {
        let i = (0..k)
            .filter(|&i| below(&t, i))
            .max_by_key(|&i| (current[i] > t[i], share_num[i] - t[i] as u64 * total, std::cmp::Reverse(i)))
            .expect("the remainders add up to what is left");
        t[i] += 1;
        sum += 1;
    }
    t
}

/// Bit-reversal order of 0..q: a sequence that visits the ring evenly
/// (0, q/2, q/4, 3q/4, ...), so work taken "in order" is spread out.
fn spread_order(q: usize) -> Vec<usize> {
    let bits = usize::BITS - (q.max(2) - 1).leading_zeros();
    let mut v: Vec<usize> =
        (0..1usize << bits).map(|i| i.reverse_bits() >> (usize::BITS - bits)).filter(|&i| i < q).collect();
    v.dedup();
    v
}

/// Distance on the ring from `p` to the nearest other partition owned by
/// `node`, looking at most `limit` steps each way (`limit + 1` if none).
fn nearest_same(owner: &[Option<usize>], p: usize, node: usize, limit: usize) -> usize {
    let q = owner.len();
    for d in 1..=limit.min(q / 2) {
        if owner[(p + d) % q] == Some(node) || owner[(p + q - d) % q] == Some(node) {
            return d;
        }
    }
    limit + 1
}

/// A new ring for `members` (sorted by id, unique, positive weights), as
/// close to `prev` as the targets allow. `n` is the replication factor that
/// spacing aims for.
pub fn claim(prev: Option<&Ring>, members: &[Claimant], q: u32, n: usize) -> Ring {
    assert!(!members.is_empty(), "a ring needs at least one member");
    assert!(members.windows(2).all(|w| w[0].id < w[1].id), "members sorted by id and unique");
    assert!(members.len() <= usize::from(u16::MAX), "at most 65535 members");
    let q = q as usize;
    let k = members.len();
    let index: BTreeMap<&str, usize> = members.iter().enumerate().map(|(i, m)| (m.id.as_str(), i)).collect();
    let mut owner: Vec<Option<usize>> = match prev {
        Some(r) if r.owners.len() == q => (0..q as u32).map(|p| index.get(r.owner(p)).copied()).collect(),
        _ => vec![None; q],
    };
    let mut count = vec![0usize; k];
    for o in owner.iter().flatten() {
        count[*o] += 1;
    }
    let target = targets(q, members, &count);
    let window = n.saturating_sub(1).max(1);

    // Release excess: badly spaced partitions first, then spread evenly.
    // The first two passes keep the freed partitions more than `window`
    // apart, so whoever takes them (a joiner takes them all) is well spaced
    // without the swaps below, each of which moves data twice.
    let order = spread_order(q);
    let free_near = |owner: &[Option<usize>], p: usize| {
        (1..=window.min(q / 2)).any(|d| owner[(p + d) % q].is_none() || owner[(p + q - d) % q].is_none())
    };
    for pass in 0..3 {
        for &p in &order {
            let Some(o) = owner[p] else { continue };
            if count[o] <= target[o] {
                continue;
            }
            if pass == 0 && nearest_same(&owner, p, o, window) > window {
                continue;
            }
            if pass < 2 && free_near(&owner, p) {
                continue;
            }
            owner[p] = None;
            count[o] -= 1;
        }
    }

    // Fill the free partitions, in ring order so equal weights come out
    // round-robin. Prefer a node with no partition within `window`, then the
    // one furthest behind its target (as a fraction), then the lowest id.
    for p in 0..q {
        if owner[p].is_some() {
            continue;
        }
        let best = (0..k)
            .filter(|&i| count[i] < target[i])
            .max_by(|&a, &b| {
                let da = nearest_same(&owner, p, a, window);
                let db = nearest_same(&owner, p, b, window);
                // deficit fraction compared exactly: (t-c)/t
                let fa = (target[a] - count[a]) * target[b];
                let fb = (target[b] - count[b]) * target[a];
                (da.min(window + 1), fa).cmp(&(db.min(window + 1), fb)).then(b.cmp(&a))
            })
            .expect("targets sum to q, so some node is below target");
        owner[p] = Some(best);
        count[best] += 1;
    }
    debug_assert_eq!(count, target);

    // Mend spacing by swapping owners. A fresh ring may move anything; a new
    // claim may spend 10% more moves than the minimum it just made, so a
    // cluster that grows one node at a time keeps its replica balance.
    let prev_owner: Option<Vec<Option<usize>>> =
        prev.filter(|r| r.owners.len() == q).map(|r| (0..q as u32).map(|p| index.get(r.owner(p)).copied()).collect());
    let moved = |owner: &[Option<usize>]| match &prev_owner {
        Some(po) => (0..q).filter(|&p| owner[p] != po[p]).count(),
        None => 0,
    };
    let budget = match &prev_owner {
        Some(_) => moved(&owner) + moved(&owner) / 10,
        None => usize::MAX,
    };
    repair_spacing(&mut owner, window, |o| moved(o) <= budget);

    Ring {
        version: prev.map_or(1, |r| r.version + 1),
        members: members.to_vec(),
        owners: owner.iter().map(|o| o.expect("every partition filled") as u16).collect(),
    }
}

/// Whether partition `p` shares its owner with one of the `window` before it.
fn violates(owner: &[Option<usize>], p: usize, window: usize) -> bool {
    let q = owner.len();
    (1..=window.min(q - 1)).any(|d| owner[p] == owner[(p + q - d) % q])
}

/// Violations among the partitions a swap at `i` and `j` can affect.
fn local_violations(owner: &[Option<usize>], i: usize, j: usize, window: usize) -> usize {
    let q = owner.len();
    let mut ps: Vec<usize> = (0..=window).flat_map(|d| [(i + d) % q, (j + d) % q]).collect();
    ps.sort_unstable();
    ps.dedup();
    ps.into_iter().filter(|&p| violates(owner, p, window)).count()
}

/// Greedy swaps of two partitions' owners that lower the number of spacing
/// violations, while `allowed` accepts the result (a movement budget).
/// Counts per node never change, so the targets still hold.
fn repair_spacing(owner: &mut [Option<usize>], window: usize, allowed: impl Fn(&[Option<usize>]) -> bool) {
    let q = owner.len();
    if q < 4 {
        return;
    }
    // Bounded: each accepted swap removes at least one violation.
    for _ in 0..q {
        let mut improved = false;
        for j in 0..q {
            if !violates(owner, j, window) {
                continue;
            }
            for i in 0..q {
                if owner[i] == owner[j] {
                    continue;
                }
                let before = local_violations(owner, i, j, window);
                owner.swap(i, j);
                if local_violations(owner, i, j, window) < before && allowed(owner) {
                    improved = true;
                    break;
                }
                owner.swap(i, j);
            }
        }
        if !improved {
            return;
        }
    }
}

/// Assigns the partitions a node holds to its shards: partitions keep the
/// shard they had (their data is there), new ones go to the least-loaded
/// shard. Returns partition -> shard for every held partition.
pub fn pin_partitions(held: &[u32], shards: u16, previous: &BTreeMap<u32, u16>) -> BTreeMap<u32, u16> {
    assert!(shards > 0);
    let mut load = vec![0usize; usize::from(shards)];
    let mut pins = BTreeMap::new();
    for &p in held {
        if let Some(&s) = previous.get(&p).filter(|&&s| s < shards) {
            pins.insert(p, s);
            load[usize::from(s)] += 1;
        }
    }
    for &p in held {
        if pins.contains_key(&p) {
            continue;
        }
        let s = (0..shards).min_by_key(|&s| (load[usize::from(s)], s)).expect("shards > 0");
        pins.insert(p, s);
        load[usize::from(s)] += 1;
    }
    pins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ws: &[u32]) -> Vec<Claimant> {
        ws.iter().enumerate().map(|(i, &w)| Claimant { id: format!("n{i:02}"), weight: w }).collect()
    }

    #[test]
    fn equal_nodes_claim_round_robin_and_lists_are_consecutive() {
        let r = claim(None, &members(&[1, 1, 1]), 12, 3);
        let owners: Vec<&str> = (0..12).map(|p| r.owner(p)).collect();
        assert_eq!(&owners[..6], ["n00", "n01", "n02", "n00", "n01", "n02"]);
        assert_eq!(r.spacing_violations(3), 0);
        assert_eq!(r.preference_list(1, 3), ["n01", "n02", "n00"]);
        assert_eq!(r.walk(1).len(), 3);
    }

    #[test]
    fn weights_set_the_share() {
        let r = claim(None, &members(&[2, 1, 1]), 256, 3);
        assert_eq!(r.counts().values().copied().collect::<Vec<_>>(), [128, 64, 64]);
    }

    #[test]
    fn a_join_moves_about_the_new_nodes_share() {
        let before = claim(None, &members(&[1, 1, 1]), 256, 3);
        let after = claim(Some(&before), &members(&[1, 1, 1, 1]), 256, 3);
        assert_eq!(after.version, 2);
        assert_eq!(after.counts()["n03"], 64);
        let moved = after.moved_from(&before);
        assert!((64..=76).contains(&moved), "moved {moved}");
    }

    #[test]
    fn growing_one_node_at_a_time_keeps_replicas_balanced() {
        let mut ring = claim(None, &members(&[1]), 256, 3);
        for n in 2..=6 {
            ring = claim(Some(&ring), &members(&vec![1; n]), 256, 3);
        }
        for m in ring.members() {
            let held = ring.replicated_by(&m.id, 3).len() as f64;
            let ideal = 256.0 * 3.0 / 6.0;
            assert!((held - ideal).abs() <= ideal * 0.1, "{} replicates {held}, ideal {ideal}", m.id);
        }
    }

    #[test]
    fn a_removal_moves_only_the_leavers_partitions() {
        let before = claim(None, &members(&[1, 1, 1, 1]), 256, 3);
        let remaining: Vec<Claimant> = members(&[1, 1, 1, 1]).into_iter().filter(|m| m.id != "n02").collect();
        let after = claim(Some(&before), &remaining, 256, 3);
        let owned = before.counts()["n02"];
        let moved = after.moved_from(&before);
        // The leaver's partitions, plus at most 10% for mending the spacing.
        assert!(moved >= owned && moved <= owned + owned / 10, "moved {moved} for {owned}");
        assert!(!after.contains("n02"));
    }

    #[test]
    fn every_member_gets_a_partition_when_there_are_enough() {
        let r = claim(None, &members(&[1000, 1, 1]), 16, 3);
        assert!(r.counts().values().all(|&c| c >= 1));
        assert_eq!(r.preference_list(0, 3).len(), 3);
    }

    #[test]
    fn rings_round_trip_through_bytes() {
        let r = claim(None, &members(&[3, 1, 2, 5]), 64, 3);
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(Ring::decode(&mut Reader::new(&out)).unwrap(), r);
        assert!(Ring::decode(&mut Reader::new(&out[..out.len() - 1])).is_err());
    }

    #[test]
    fn pins_are_sticky_and_balanced() {
        let first = pin_partitions(&[0, 1, 2, 3], 2, &BTreeMap::new());
        assert_eq!(first.values().filter(|&&s| s == 0).count(), 2);
        let next = pin_partitions(&[1, 2, 3, 4, 5], 2, &first);
        for p in [1, 2, 3] {
            assert_eq!(next[&p], first[&p], "partition {p} stays where its data is");
        }
        let per_shard = |s| next.values().filter(|&&x| x == s).count();
        assert!(per_shard(0).abs_diff(per_shard(1)) <= 1);
    }

    #[test]
    fn spread_order_visits_every_partition_once() {
        let o = spread_order(256);
        assert_eq!(o.len(), 256);
        assert_eq!(&o[..4], [0, 128, 64, 192]);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, (0..256).collect::<Vec<_>>());
        assert_eq!(spread_order(1), [0]);
    }
}
