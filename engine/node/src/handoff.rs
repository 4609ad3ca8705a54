//! Ownership handoff: data that is not where the ring says moves there.
//!
//! Each shard looks over the partitions it holds data for. A partition is in
//! the right place when this node is one of its replicas and this shard is
//! the one pinned to it; otherwise (the ring changed, or the data arrived
//! while the ring was still forming) its keys are streamed to every replica
//! of the partition, merged causally there, and only when all of them have
//! acknowledged durably is the partition dropped here, with a durable record
//! so that a restart does not bring it back. Writes that land during the
//! stream are caught: the drop happens only if the partition is unchanged
//! since the snapshot that was streamed, else the next round streams again.
//!
//! Runs in a low-priority task queue, one partition at a time, in batches.

use crate::shard::{Op, Shard};
use crate::store::index::Entry;
use ringkv_core::version::Object;
use ringkv_net::proto::{Reply, Request};
use std::rc::Rc;
use std::time::Duration;

/// Keys per handoff message.
const BATCH: usize = 256;

/// Streams misplaced partitions until the node shuts down.
pub async fn run(shard: Rc<Shard>, interval: Duration) {
    while !shard.node.is_shutting_down() {
        glommio::timer::sleep(interval).await;
        for p in shard.store.partitions_with_data() {
            if shard.node.is_shutting_down() {
                return;
            }
            if let Err(e) = hand_off(&shard, p).await {
                tracing::debug!(shard = shard.id, partition = p, error = e, "handoff postponed");
            }
        }
    }
}

/// Hands partition `p` to its replicas if it does not belong on this shard.
async fn hand_off(shard: &Rc<Shard>, p: u32) -> Result<(), String> {
    let view = shard.view();
    if !view.has_ring() {
        return Ok(());
    }
    let me = shard.me();
    if view.is_primary(p, me) && view.local_shard(p) == shard.id {
        return Ok(());
    }
    let targets: Vec<String> = view.primaries(p).to_vec();
    if let Some(down) = targets.iter().find(|t| !view.alive(t)) {
        return Err(format!("replica {down} is down; keeping the data until it is back"));
    }
    let snapshot = shard.store.partition_entries(p);
    for chunk in snapshot.chunks(BATCH) {
        let entries = read_chunk(shard, chunk).await?;
        for t in &targets {
            send(shard, t, p, &entries).await.map_err(|e| format!("to {t}: {e}"))?;
        }
    }
    if shard.store.drop_partition(p, &snapshot).await.map_err(|e| e.to_string())? {
        tracing::info!(shard = shard.id, partition = p, keys = snapshot.len(), to = ?targets, "handed off a partition");
    }
    Ok(())
}

async fn read_chunk(shard: &Shard, chunk: &[(Vec<u8>, Entry)]) -> Result<Vec<(Vec<u8>, Object)>, String> {
    let mut out = Vec::with_capacity(chunk.len());
    for (key, entry) in chunk {
        let obj = shard.store.read_object(entry.loc()).await.map_err(|e| e.to_string())?;
        out.push((key.clone(), obj));
    }
    Ok(out)
}

async fn send(shard: &Rc<Shard>, node: &str, p: u32, entries: &[(Vec<u8>, Object)]) -> Result<(), String> {
    if node == shard.me() {
        // This node replicates the partition, on another of its shards.
        let target = shard.local_shard_of(p);
        shard.on_shard(target, Op::MergeBatch { entries: entries.to_vec() }).await.map_err(|e| e.to_string())?;
        return Ok(());
    }
    let addr = shard.view().address(node, p).ok_or_else(|| format!("no address for {node}"))?;
    let wire = entries.iter().map(|(k, o)| (k.clone(), o.to_bytes())).collect();
    let resp = shard
        .peers
        .call(addr, Request::Handoff { partition: p, entries: wire }, 0, Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    match resp.result {
        Ok(Reply::Handoff { applied }) if applied as usize == entries.len() => Ok(()),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}
