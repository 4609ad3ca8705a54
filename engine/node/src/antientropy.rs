//! Merkle anti-entropy between the replicas of a partition.
//!
//! An exchange compares this shard's tree of a partition with another
//! replica's, top-down: roots; if they differ, the segment hashes; for the
//! differing segments, their leaves; for the differing leaves, the (key,
//! digest) lists. Only keys whose digests differ move: pulled and merged here,
//! pushed and merged there, so afterwards both hold the causal merge and
//! their trees agree.
//!
//! Runs continuously in the low-priority task queue (each shard walks the
//! partitions it holds, exchanging with the replicas that sort after it, so
//! every pair is covered once per pass) and on demand (`ringkv repair`),
//! against every other replica.

use crate::shard::Shard;
use ringkv_core::merkle::{differing, MerkleTree, LEAVES_PER_SEGMENT};
use ringkv_core::version::Object;
use ringkv_net::proto::{RepairReport, Reply, Request};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

/// Keys per pull or push message.
const BATCH: usize = 128;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) async fn call(shard: &Shard, addr: SocketAddr, req: Request) -> Result<Reply, String> {
    let resp = shard.peers.call(addr, req, 0, CALL_TIMEOUT).await.map_err(|e| e.to_string())?;
    resp.result.map_err(|e| e.to_string())
}

/// The leaves of `segments` in `tree`, concatenated in order.
pub fn segment_leaves(tree: &MerkleTree, segments: &[u32]) -> Vec<u64> {
    segments
        .iter()
        .flat_map(|&s| {
            let from = s as usize * LEAVES_PER_SEGMENT;
            tree.leaves()[from..from + LEAVES_PER_SEGMENT].iter().copied()
        })
        .collect()
}

/// One exchange of partition `p` with `peer`.
pub async fn sync_partition(shard: &Rc<Shard>, p: u32, peer: &str) -> Result<RepairReport, String> {
    let mut report = RepairReport { exchanges: 1, ..Default::default() };
    let addr = shard.view().address(peer, p).ok_or_else(|| format!("no address for {peer}"))?;
    let local = shard.store.merkle(p);
    let Reply::Merkle { root, segments, .. } =
        call(shard, addr, Request::Merkle { partition: p, segments: vec![] }).await?
    else {
        return Err("unexpected reply to a merkle request".into());
    };
    if root == local.root() {
        report.in_sync = 1;
        return Ok(report);
    }
    let segs: Vec<u32> = differing(&local.segments(), &segments).into_iter().map(|s| s as u32).collect();
    let Reply::Merkle { leaves, .. } =
        call(shard, addr, Request::Merkle { partition: p, segments: segs.clone() }).await?
    else {
        return Err("unexpected reply to a merkle request".into());
    };
    let mine = segment_leaves(&local, &segs);
    if leaves.len() != mine.len() {
        return Err("peer returned leaves of another shape".into());
    }
    let leaf_ids: Vec<u32> = differing(&mine, &leaves)
        .into_iter()
        .map(|i| segs[i / LEAVES_PER_SEGMENT] * LEAVES_PER_SEGMENT as u32 + (i % LEAVES_PER_SEGMENT) as u32)
        .collect();
    report.leaves_differing = leaf_ids.len() as u32;
    if leaf_ids.is_empty() {
        // The trees moved while we looked; the next round will catch it.
        return Ok(report);
    }
    let Reply::Keys { keys: theirs } =
        call(shard, addr, Request::Keys { partition: p, leaves: leaf_ids.clone() }).await?
    else {
        return Err("unexpected reply to a keys request".into());
    };
    let leaf_ids: Vec<usize> = leaf_ids.into_iter().map(|l| l as usize).collect();
    let ours: HashMap<Vec<u8>, u32> = shard.store.keys_in_leaves(p, &leaf_ids).into_iter().collect();
    let theirs: HashMap<Vec<u8>, u32> = theirs.into_iter().collect();
    let pull: Vec<Vec<u8>> = theirs.iter().filter(|(k, d)| ours.get(*k) != Some(d)).map(|(k, _)| k.clone()).collect();
    let push: Vec<Vec<u8>> = ours.iter().filter(|(k, d)| theirs.get(*k) != Some(d)).map(|(k, _)| k.clone()).collect();
    let mut differing_keys: std::collections::HashSet<&Vec<u8>> = pull.iter().collect();
    differing_keys.extend(push.iter());
    report.keys_differing = differing_keys.len() as u64;

    for chunk in pull.chunks(BATCH) {
        let Reply::ReadBatch { entries } = call(shard, addr, Request::ReadBatch { keys: chunk.to_vec() }).await? else {
            return Err("unexpected reply to a read batch".into());
        };
        for (key, bytes) in entries {
            let obj = Object::decode(&bytes).map_err(|e| format!("peer sent a bad object: {e}"))?;
            shard.store.merge(&key, &obj, false).await.map_err(|e| e.to_string())?;
            report.keys_pulled += 1;
        }
        shard.store.sync().await.map_err(|e| e.to_string())?;
    }
    for chunk in push.chunks(BATCH) {
        let mut entries = Vec::with_capacity(chunk.len());
        for key in chunk {
            if let Some(obj) = shard.store.get(key).await.map_err(|e| e.to_string())? {
                entries.push((key.clone(), obj.to_bytes()));
            }
        }
        let n = entries.len();
        match call(shard, addr, Request::Handoff { partition: p, entries }).await? {
            Reply::Handoff { .. } => report.keys_pushed += n as u64,
            _ => return Err("unexpected reply to a handoff".into()),
        }
    }
    Ok(report)
}

/// Partitions this shard is responsible for: replicated by this node and
/// pinned to this shard.
fn my_partitions(shard: &Shard, only: Option<u32>) -> Vec<u32> {
    let view = shard.view();
    (0..shard.node.cfg.partitions)
        .filter(|&p| only.is_none_or(|o| o == p))
        .filter(|&p| view.is_primary(p, shard.me()) && view.local_shard(p) == shard.id)
        .collect()
}

/// Exchanges the given partitions (all of this shard's when `None`) with
/// every other live replica. `ringkv repair` runs this on every shard.
pub async fn repair(shard: &Rc<Shard>, only: Option<u32>) -> RepairReport {
    let mut total = RepairReport::default();
    for p in my_partitions(shard, only) {
        total.partitions += 1;
        let view = shard.view();
        for peer in view.primaries(p).iter().filter(|n| *n != shard.me()) {
            if !view.alive(peer) {
                total.errors += 1;
                continue;
            }
            match sync_partition(shard, p, peer).await {
                Ok(r) => total.add(&r),
                Err(e) => {
                    tracing::warn!(partition = p, peer, error = e, "repair exchange failed");
                    total.errors += 1;
                    total.exchanges += 1;
                }
            }
        }
        shard.synced(p);
    }
    total
}

/// The continuous pass: each pair of replicas is exchanged once, by the
/// replica whose id sorts first.
pub async fn run(shard: Rc<Shard>, interval: Duration) {
    while !shard.node.is_shutting_down() {
        glommio::timer::sleep(interval).await;
        for p in my_partitions(&shard, None) {
            if shard.node.is_shutting_down() {
                return;
            }
            let view = shard.view();
            let peers: Vec<String> =
                view.primaries(p).iter().filter(|n| n.as_str() > shard.me() && view.alive(n)).cloned().collect();
            let mut ok = true;
            for peer in &peers {
                match sync_partition(&shard, p, peer).await {
                    Ok(r) if r.keys_differing > 0 => {
                        tracing::info!(
                            partition = p,
                            peer,
                            moved = r.keys_pulled + r.keys_pushed,
                            "anti-entropy repaired"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => {
                        ok = false;
                        tracing::debug!(partition = p, peer, error = e, "anti-entropy exchange failed");
                    }
                }
            }
            if ok {
                shard.synced(p);
            }
            // Every other replica sorts after this one and just answered:
            // this is the replica that decides on purging tombstones.
            if ok && peers.len() + 1 == view.primaries(p).len() {
                let grace = Duration::from_secs(shard.node.cfg.tombstone_grace_s);
                match crate::purge::purge_partition(&shard, p, grace).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(partition = p, purged = n, "purged tombstones"),
                    Err(e) => tracing::debug!(partition = p, error = e, "tombstone purge failed"),
                }
            }
        }
    }
}
