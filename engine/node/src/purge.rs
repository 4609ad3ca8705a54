//! Tombstone purge: forgetting a deleted key for good without letting it
//! come back.
//!
//! A tombstone must stay while any replica may still hold, or later receive,
//! an older version of its key: merged into a replica that had forgotten
//! the delete, that version would be alive again. So a tombstone goes only
//! when (1) every sibling of it is older than the grace period (longer than
//! hints and partitions are expected to last), (2) every replica in the
//! preference list answers and holds exactly the same tombstone, and then
//! (3) each replica drops it with a durable Purge record, which replay
//! honours even while older records of the key still lie in earlier
//! segments (see `store::format::RecordKind::Purge`).
//!
//! Only the partition's first replica (by node id) runs it, right after an
//! anti-entropy pass that reached every other replica. A replica that misses
//! the purge keeps its tombstone and anti-entropy hands it back to the
//! others: more work for the next pass, never a resurrection.

use crate::antientropy::call;
use crate::shard::Shard;
use ringkv_net::proto::{Reply, Request};
use std::rc::Rc;
use std::time::Duration;

/// Tombstones examined per partition and pass, so one pass stays short.
const BATCH: usize = 256;

/// Purges what can be purged of partition `p` now; returns how many keys.
pub async fn purge_partition(shard: &Rc<Shard>, p: u32, grace: Duration) -> Result<u64, String> {
    let candidates = shard.store.tombstones(p, BATCH);
    if candidates.is_empty() {
        return Ok(0);
    }
    let view = shard.view();
    let mut others = Vec::new();
    for node in view.primaries(p).iter().filter(|n| *n != shard.me()) {
        if !view.alive(node) {
            return Ok(0);
        }
        others.push(view.address(node, p).ok_or_else(|| format!("no address for {node}"))?);
    }
    let now = crate::clock::now_ms();
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let mut purged = 0;
    'keys: for key in candidates {
        let Some(obj) = shard.store.get(&key).await.map_err(|e| e.to_string())? else { continue };
        if !obj.purgeable(now, grace_ms) {
            continue;
        }
        let bytes = obj.to_bytes();
        for &addr in &others {
            match call(shard, addr, Request::ReplicaRead { key: key.clone() }).await? {
                Reply::ReplicaRead { found: true, object } if object == bytes => {}
                _ => continue 'keys,
            }
        }
        for &addr in &others {
            call(shard, addr, Request::Purge { key: key.clone(), object: bytes.clone() }).await?;
        }
        if shard.store.purge(&key, &obj).await.map_err(|e| e.to_string())? {
            purged += 1;
        }
    }
    Ok(purged)
}
