//! Coordinating a client's read or write across the key's replicas.
//!
//! Runs on the shard that holds the key's partition on this node (the
//! coordinator must be a replica: it reads its own copy to mint the write's
//! dot). The decisions (who, how many, when done, who is stale) are the pure
//! `ringkv_core::quorum` types; this module only sends and collects.
//!
//! Write: apply locally (append, no wait), send the new object to the other
//! replicas, and answer after `w` acknowledgements, the local fsync counting
//! as one. Replicas that answer later just finish. Sloppy quorum: a
//! preference-list replica that is down, or fails while we write, is stood in
//! for by the next live fallback in ring order, which holds the write as a
//! hint for it (delivered by hinted handoff); the hint counts toward `w`.
//! Read: ask `r` live replicas (this one first), answer once `r` have
//! answered, with everything merged. A replica that fails, or has not
//! answered after [`SPECULATE_AFTER`], is backed up by the next live one, so
//! one slow replica does not set the tail while the usual read costs `r`
//! replica reads rather than N. Replicas whose copy lacks something the
//! merge has then get the merged object (read repair); anti-entropy covers
//! the replicas a read did not ask.

use crate::clock;
use crate::shard::{storage_error, Shard};
use crate::store::WriteContext;
use futures::channel::mpsc;
use futures::StreamExt;
use ringkv_core::quorum::{live_targets, Progress, Quorum, QuorumError, ReadMerge};
use ringkv_core::version::Object;
use ringkv_net::proto::{ErrorCode, GetResult, Level, Reply, Request, WireError};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

pub enum ClientOp {
    Get { key: Vec<u8>, r: Level },
    Write { key: Vec<u8>, value: Option<Vec<u8>>, ctx: WriteContext, w: Level, durable: bool },
}

pub fn quorum_error(e: QuorumError) -> WireError {
    let code = match e {
        QuorumError::Unavailable { .. } => ErrorCode::Unavailable,
        QuorumError::Timeout { .. } => ErrorCode::Timeout,
    };
    WireError::new(code, e.to_string())
}

/// Names the replicas that failed, and why, after the quorum error.
fn with_failures(mut e: WireError, failures: &[String]) -> WireError {
    if !failures.is_empty() {
        e.message = format!("{} [{}]", e.message, failures.join("; "));
    }
    e
}

/// The replicas to contact for partition `p` and how many must answer.
fn plan(shard: &Shard, p: u32, name: &str, level: Level) -> Result<(Vec<String>, usize), WireError> {
    let view = shard.view();
    if !view.has_ring() {
        return Err(WireError::new(ErrorCode::Unavailable, "this node is still joining the cluster"));
    }
    let n = shard.node.cfg.replicas;
    let prefs: Vec<&str> = view.primaries(p).iter().map(String::as_str).collect();
    let needed =
        level.required(n, prefs.len()).map_err(|e| WireError::new(ErrorCode::BadRequest, format!("{name}={e}")))?;
    if needed > prefs.len() {
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!("{name}={needed} needs {needed} replicas but the cluster has only {}", prefs.len()),
        ));
    }
    let targets = live_targets(&prefs, needed, |node| view.alive(node)).map_err(quorum_error)?;
    Ok((targets.into_iter().map(str::to_string).collect(), needed))
}

pub async fn run(shard: &Rc<Shard>, op: ClientOp) -> Result<Reply, WireError> {
    match op {
        ClientOp::Get { key, r } => get(shard, key, r).await,
        ClientOp::Write { key, value, ctx, w, durable } => {
            let deleting = value.is_none();
            let obj = write(shard, key, value, ctx, w, durable).await?;
            Ok(if deleting { Reply::Delete } else { Reply::Put { context: obj.context().encode_context() } })
        }
    }
}

type Answer<T> = (String, Result<T, String>);

/// How long a read waits for its first `r` replicas before also asking the
/// next one.
pub const SPECULATE_AFTER: Duration = Duration::from_millis(20);

fn ask(shard: &Rc<Shard>, node: &str, p: u32, key: &[u8], tx: &mpsc::UnboundedSender<Answer<Option<Object>>>) {
    let (shard, key, tx, node) = (shard.clone(), key.to_vec(), tx.clone(), node.to_string());
    glommio::spawn_local(async move {
        let answer = read_replica(&shard, &node, p, key).await;
        let _ = tx.unbounded_send((node, answer));
    })
    .detach();
}

async fn get(shard: &Rc<Shard>, key: Vec<u8>, r: Level) -> Result<Reply, WireError> {
    let p = shard.node.partition(&key);
    let (mut targets, needed) = plan(shard, p, "r", r)?;
    // This replica first: its read needs no network.
    if let Some(i) = targets.iter().position(|t| t == shard.me()) {
        targets[..=i].rotate_right(1);
    }
    let (tx, mut rx) = mpsc::unbounded::<Answer<Option<Object>>>();
    let mut spare = targets.split_off(needed).into_iter();
    for t in &targets {
        ask(shard, t, p, &key, &tx);
    }
    let mut merge = ReadMerge::default();
    let mut quorum = Quorum::new(targets.len() + spare.len(), needed);
    let mut failures = Vec::new();
    let mut speculated = false;
    while quorum.progress() == Progress::Pending {
        let next = if speculated || spare.len() == 0 {
            rx.next().await
        } else {
            match glommio::timer::timeout(SPECULATE_AFTER, async { Ok(rx.next().await) }).await {
                Ok(n) => n,
                Err(_) => {
                    // Slow answers: hedge with the next replica.
                    speculated = true;
                    if let Some(t) = spare.next() {
                        ask(shard, &t, p, &key, &tx);
                    }
                    continue;
                }
            }
        };
        match next {
            Some((from, Ok(obj))) => {
                merge.add(&from, obj);
                quorum.ack(&from);
            }
            Some((from, Err(e))) => {
                failures.push(format!("{from}: {e}"));
                quorum.fail(&from);
                if let Some(t) = spare.next() {
                    ask(shard, &t, p, &key, &tx);
                }
            }
            None => break,
        }
    }
    drop(tx);
    if quorum.progress() != Progress::Reached {
        return Err(with_failures(quorum_error(quorum.error()), &failures));
    }
    let result = match merge.merged() {
        None => GetResult::default(),
        Some(o) => GetResult {
            found: !o.is_deleted(),
            values: o.values().map(<[u8]>::to_vec).collect(),
            context: o.context().encode_context(),
        },
    };
    glommio::spawn_local(read_repair(shard.clone(), key, p, rx, merge)).detach();
    Ok(Reply::Get(result))
}

/// Waits for the remaining answers (each bounded by its own timeout), then
/// sends the merged object to every replica whose copy lacked something.
async fn read_repair(
    shard: Rc<Shard>,
    key: Vec<u8>,
    p: u32,
    mut rx: mpsc::UnboundedReceiver<Answer<Option<Object>>>,
    mut merge: ReadMerge,
) {
    while let Some((from, answer)) = rx.next().await {
        if let Ok(obj) = answer {
            merge.add(&from, obj);
        }
    }
    let Some(merged) = merge.merged().cloned() else { return };
    for stale in merge.stale() {
        let result = write_replica(&shard, &stale, p, key.clone(), &merged, true).await;
        match result {
            Ok(()) => tracing::debug!(replica = stale, "read repair"),
            Err(e) => tracing::debug!(replica = stale, error = e, "read repair failed"),
        }
    }
}

/// Where one replica's copy of a write goes: the replica itself, or a
/// fallback holding a hint for it.
#[derive(Debug, Clone)]
struct Slot {
    node: String,
    hint_for: Option<String>,
}

/// One slot per preference-list replica; down ones get a live fallback.
/// Returns the slots, the unused live fallbacks (for replicas that fail
/// mid-write) and how many acknowledgements are needed.
fn plan_write(shard: &Shard, p: u32, w: Level) -> Result<(Vec<Slot>, VecDeque<String>, usize), WireError> {
    let view = shard.view();
    if !view.has_ring() {
        return Err(WireError::new(ErrorCode::Unavailable, "this node is still joining the cluster"));
    }
    let n = shard.node.cfg.replicas;
    let prefs = view.primaries(p);
    let needed = w.required(n, prefs.len()).map_err(|e| WireError::new(ErrorCode::BadRequest, format!("w={e}")))?;
    if needed > prefs.len() {
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!("w={needed} needs {needed} replicas but the cluster has only {}", prefs.len()),
        ));
    }
    let mut spare: VecDeque<String> = view.fallbacks(p).iter().filter(|f| view.alive(f)).cloned().collect();
    let mut slots = Vec::with_capacity(prefs.len());
    for primary in prefs {
        if view.alive(primary) {
            slots.push(Slot { node: primary.clone(), hint_for: None });
        } else if let Some(f) = spare.pop_front() {
            slots.push(Slot { node: f, hint_for: Some(primary.clone()) });
        }
    }
    if slots.len() < needed {
        return Err(quorum_error(QuorumError::Unavailable { needed, live: slots.len() }));
    }
    Ok((slots, spare, needed))
}

/// The write being replicated: its key, partition, new object, and where
/// the local copy is in the log.
struct WriteJob {
    p: u32,
    key: Vec<u8>,
    obj: Object,
    lsn: u64,
    durable: bool,
}

/// Delivers one slot's copy; if a replica fails, a spare fallback holds a
/// hint for it instead.
async fn write_slot(
    shard: &Rc<Shard>,
    slot: Slot,
    spare: &RefCell<VecDeque<String>>,
    job: &WriteJob,
) -> Result<(), String> {
    let WriteJob { p, ref key, ref obj, lsn, durable } = *job;
    let first = if slot.node == shard.me() && slot.hint_for.is_none() {
        if durable {
            shard.store.wait_lsn(lsn).await.map_err(|e| e.to_string())
        } else {
            Ok(())
        }
    } else {
        send_write(shard, &slot, p, key.to_vec(), obj, durable).await
    };
    let Err(e) = first else { return Ok(()) };
    if slot.hint_for.is_some() || slot.node == shard.me() {
        return Err(e);
    }
    let Some(fallback) = spare.borrow_mut().pop_front() else { return Err(e) };
    tracing::debug!(replica = slot.node, fallback, error = e, "replica failed; holding a hint on a fallback");
    let hint = Slot { node: fallback, hint_for: Some(slot.node.clone()) };
    send_write(shard, &hint, p, key.to_vec(), obj, durable).await.map_err(|h| format!("{e}; hint: {h}"))
}

async fn send_write(
    shard: &Rc<Shard>,
    slot: &Slot,
    p: u32,
    key: Vec<u8>,
    obj: &Object,
    durable: bool,
) -> Result<(), String> {
    match &slot.hint_for {
        None => write_replica(shard, &slot.node, p, key, obj, durable).await,
        Some(owner) if slot.node == shard.me() => {
            shard.store.put_hint(owner, &key, obj, durable).await.map_err(|e| e.to_string())
        }
        Some(owner) => {
            let addr = shard.view().address(&slot.node, p).ok_or_else(|| format!("no address for {}", slot.node))?;
            let req = Request::ReplicaWrite { key, object: obj.to_bytes(), durable, hint_for: owner.clone() };
            let resp = shard.peers.call(addr, req, 0, shard.node.timeout()).await.map_err(|e| e.to_string())?;
            match resp.result {
                Ok(Reply::ReplicaWrite) => Ok(()),
                Ok(other) => Err(format!("unexpected reply {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

async fn write(
    shard: &Rc<Shard>,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    ctx: WriteContext,
    w: Level,
    durable: bool,
) -> Result<Object, WireError> {
    let p = shard.node.partition(&key);
    let (slots, spare, needed) = plan_write(shard, p, w)?;
    let me = shard.me().to_string();
    let (obj, lsn) = shard.store.write_deferred(&key, value, &ctx, clock::now_ms()).await.map_err(storage_error)?;
    let spare = Rc::new(RefCell::new(spare));
    let (tx, mut rx) = mpsc::unbounded::<Answer<()>>();
    let coordinated_as_replica = slots.iter().any(|s| s.node == me && s.hint_for.is_none());
    let job = Rc::new(WriteJob { p, key, obj: obj.clone(), lsn, durable });
    for slot in slots.iter().cloned() {
        let (shard, tx, spare, job) = (shard.clone(), tx.clone(), spare.clone(), job.clone());
        glommio::spawn_local(async move {
            let name = slot.hint_for.clone().unwrap_or_else(|| slot.node.clone());
            let answer = write_slot(&shard, slot, &spare, &job).await;
            let _ = tx.unbounded_send((name, answer));
        })
        .detach();
    }
    drop(tx);
    let targets = slots;
    if !coordinated_as_replica {
        // A coordinator outside the preference list (rings disagreed while a
        // forwarded request travelled): its copy does not count; handoff
        // moves it to the replicas later.
        tracing::debug!(partition = p, "coordinated a write as a non-replica");
    }
    let mut quorum = Quorum::new(targets.len(), needed);
    let mut failures = Vec::new();
    while quorum.progress() == Progress::Pending {
        match rx.next().await {
            Some((from, Ok(()))) => {
                quorum.ack(&from);
            }
            Some((from, Err(e))) => {
                failures.push(format!("{from}: {e}"));
                quorum.fail(&from);
            }
            None => break,
        }
    }
    match quorum.progress() {
        Progress::Reached => Ok(obj),
        _ => Err(with_failures(quorum_error(quorum.error()), &failures)),
    }
}

/// One replica's copy of `key`: ours from the store, others' over the wire.
pub async fn read_replica(shard: &Rc<Shard>, node: &str, p: u32, key: Vec<u8>) -> Result<Option<Object>, String> {
    if node == shard.me() {
        return shard.store.get(&key).await.map_err(|e| e.to_string());
    }
    let addr = shard.view().address(node, p).ok_or_else(|| format!("no address for {node}"))?;
    let resp = shard
        .peers
        .call(addr, Request::ReplicaRead { key }, 0, shard.node.timeout())
        .await
        .map_err(|e| e.to_string())?;
    match resp.result {
        Ok(Reply::ReplicaRead { found: false, .. }) => Ok(None),
        Ok(Reply::ReplicaRead { found: true, object }) => Object::decode(&object).map(Some).map_err(|e| e.to_string()),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Merges `obj` into `node`'s copy of `key`.
pub async fn write_replica(
    shard: &Rc<Shard>,
    node: &str,
    p: u32,
    key: Vec<u8>,
    obj: &Object,
    durable: bool,
) -> Result<(), String> {
    if node == shard.me() {
        return shard.store.merge(&key, obj, durable).await.map(|_| ()).map_err(|e| e.to_string());
    }
    let addr = shard.view().address(node, p).ok_or_else(|| format!("no address for {node}"))?;
    let req = Request::ReplicaWrite { key, object: obj.to_bytes(), durable, hint_for: String::new() };
    let resp = shard.peers.call(addr, req, 0, shard.node.timeout()).await.map_err(|e| e.to_string())?;
    match resp.result {
        Ok(Reply::ReplicaWrite) => Ok(()),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}
