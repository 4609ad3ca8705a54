//! Hinted handoff: delivering the writes this shard held for other nodes.
//!
//! Every few seconds, for each node we hold hints for that the failure
//! detector believes up and that answers a direct ping, the hints go over in
//! batches (grouped by partition) and are merged into its replicas; a batch
//! is retired here only after the owner acknowledged it durably. A short
//! pause between batches bounds the rate, so a returning node is not
//! flooded while it also serves traffic.

use crate::shard::Shard;
use crate::store::index::Entry;
use ringkv_net::proto::{Reply, Request};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

const BATCH: usize = 128;

/// One hint on its way: key, the hint record's entry, the object's bytes.
type Outgoing = (Vec<u8>, Entry, Vec<u8>);
const PAUSE: Duration = Duration::from_millis(5);

pub async fn run(shard: Rc<Shard>, interval: Duration) {
    while !shard.node.is_shutting_down() {
        glommio::timer::sleep(interval).await;
        for (target, _) in shard.store.hint_targets() {
            match deliver(&shard, &target).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(shard = shard.id, to = target, hints = n, "delivered hints"),
                Err(e) => tracing::debug!(to = target, error = e, "hints kept for later"),
            }
        }
    }
}

/// Delivers everything held for `target`; returns how many hints it retired.
pub async fn deliver(shard: &Rc<Shard>, target: &str) -> Result<usize, String> {
    let view = shard.view();
    if !view.alive(target) {
        return Err("down".into());
    }
    let route = view.members.get(target).ok_or("not a member")?;
    // The detector may lag: make sure the node answers before streaming.
    let ping = shard.peers.call(route.addr, Request::Ping { payload: vec![] }, 0, Duration::from_secs(1)).await;
    if !matches!(ping, Ok(ref r) if r.result.is_ok()) {
        return Err("does not answer a ping".into());
    }
    let mut retired = 0;
    loop {
        let batch = shard.store.hint_batch(target, BATCH).await.map_err(|e| e.to_string())?;
        if batch.is_empty() {
            return Ok(retired);
        }
        let before = retired;
        let mut by_partition: BTreeMap<u32, Vec<Outgoing>> = BTreeMap::new();
        for (key, entry, obj) in batch {
            by_partition.entry(shard.node.partition(&key)).or_default().push((key, entry, obj.to_bytes()));
        }
        for (p, items) in by_partition {
            let addr = shard.view().address(target, p).ok_or("no address")?;
            let entries = items.iter().map(|(k, _, o)| (k.clone(), o.clone())).collect();
            let resp = shard
                .peers
                .call(addr, Request::Handoff { partition: p, entries }, 0, Duration::from_secs(30))
                .await
                .map_err(|e| e.to_string())?;
            match resp.result {
                Ok(Reply::Handoff { .. }) => {
                    let done: Vec<(Vec<u8>, Entry)> = items.into_iter().map(|(k, e, _)| (k, e)).collect();
                    retired += shard.store.hints_delivered(target, &done).await.map_err(|e| e.to_string())?;
                }
                Ok(other) => return Err(format!("unexpected reply {other:?}")),
                Err(e) => return Err(e.to_string()),
            }
        }
        if retired == before {
            // Every hint of the batch was replaced by a newer one while it
            // travelled (writes still arriving): try again next round.
            return Ok(retired);
        }
        glommio::timer::sleep(PAUSE).await;
    }
}
