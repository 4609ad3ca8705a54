//! What a request means: validation, routing to the right node and shard,
//! and the reply. Connection handling lives in `conn`, coordination across
//! replicas in `coordinator`.
//!
//! Routing: a client request for a key this node does not replicate is
//! forwarded once to a live replica (`hops` stops loops); otherwise it is
//! coordinated on the local shard that holds the key's partition. Peer
//! requests (replica reads and writes, handoff) go straight to that shard.

use crate::driver::ClientOp;
use crate::shard::{internal, storage_error, Op, OpOutput, Shard};
use crate::store::WriteContext;
use ringkv_core::keyspace::{validate_key, validate_pair, PairError};
use ringkv_core::version::{Object, VersionVector};
use ringkv_net::proto::{
    ErrorCode, MemberInfo, NodeInfo, RepairReport, Reply, Request, RequestFrame, Role, ShardStats, WireError,
};
use std::rc::Rc;
use std::time::Duration;

/// Longest timeout a client may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// The timeout a request asks for, bounded; the node's default for none.
fn requested_timeout(shard: &Shard, timeout_ms: u32) -> Duration {
    match timeout_ms {
        0 => shard.node.timeout(),
        ms => Duration::from_millis(u64::from(ms)).min(MAX_TIMEOUT),
    }
}

/// Serves one request (the general path, in a task of its own).
pub async fn handle(shard: &Rc<Shard>, role: Role, req: RequestFrame) -> Result<Reply, WireError> {
    let timeout = requested_timeout(shard, req.timeout_ms);
    let kind = req.body.kind();
    if role == Role::Client && req.body.is_peer_only() {
        return Err(WireError::new(
            ErrorCode::Unauthorized,
            format!("{kind} is a node-to-node request; this connection is a client's"),
        ));
    }
    if client_key(&req.body).is_some() {
        // The coordinator keeps the deadline itself (forwarding keeps the
        // peer call's): no timer per request here.
        return execute(shard, req.body, req.hops, timeout).await;
    }
    let work = execute(shard, req.body, req.hops, timeout);
    match glommio::timer::timeout(timeout, async { Ok(work.await) }).await {
        Ok(r) => r,
        Err(_) => Err(WireError::new(ErrorCode::Timeout, format!("{kind} did not complete within {timeout:?}"))),
    }
}

fn bad_request(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BadRequest, msg)
}

fn pair_error(e: PairError) -> WireError {
    let code = match e {
        PairError::PairTooLarge { .. } => ErrorCode::PairTooLarge,
        PairError::EmptyKey | PairError::KeyTooLong { .. } => ErrorCode::BadRequest,
    };
    WireError::new(code, e.to_string())
}

fn parse_context(bytes: &[u8]) -> Result<VersionVector, WireError> {
    VersionVector::decode_context(bytes).map_err(|e| bad_request(format!("context: {e}")))
}

fn parse_object(bytes: &[u8]) -> Result<Object, WireError> {
    Object::decode(bytes).map_err(|e| bad_request(format!("object: {e}")))
}

fn reply(out: OpOutput) -> Result<Reply, WireError> {
    match out {
        OpOutput::Reply(r) => Ok(r),
        _ => Err(internal("operation returned no reply")),
    }
}

async fn execute(shard: &Rc<Shard>, body: Request, hops: u8, timeout: Duration) -> Result<Reply, WireError> {
    match body {
        body @ (Request::Get { .. } | Request::Put { .. } | Request::Delete { .. }) => {
            coordinate(shard, body, hops, timeout).await
        }
        Request::Ping { payload } => Ok(Reply::Pong { payload }),
        Request::NodeInfo => node_info(shard).await.map(Reply::NodeInfo),
        Request::Topology => {
            let view = shard.view();
            Ok(Reply::Topology { state: view.state.clone(), replicas: shard.node.cfg.replicas as u8 })
        }
        Request::ReplicaRead { key } => {
            validate_key(&key).map_err(pair_error)?;
            let target = shard.local_shard_of(shard.node.partition(&key));
            match shard.on_shard(target, Op::Get { key }).await? {
                OpOutput::Object(o) => Ok(replica_read(o)),
                _ => Err(internal("replica read returned something else")),
            }
        }
        Request::GetCopy { key } => {
            validate_key(&key).map_err(pair_error)?;
            let p = shard.node.partition(&key);
            check_copy(shard, p)?;
            let started = crate::clock::now_us();
            match shard.on_shard(shard.local_shard_of(p), Op::Get { key }).await? {
                OpOutput::Object(o) => {
                    shard.driver.served_copy(p, crate::clock::now_us().saturating_sub(started));
                    Ok(copy_reply(o))
                }
                _ => Err(internal("a copy read returned something else")),
            }
        }
        Request::ReplicaWrite { key, object, durable, hint_for } => {
            // Sizes are not capped here: replicas carry whatever they hold.
            validate_key(&key).map_err(pair_error)?;
            let object = parse_object(&object)?;
            let target = shard.local_shard_of(shard.node.partition(&key));
            let op = if hint_for.is_empty() {
                Op::Merge { key, object, durable }
            } else {
                Op::Hint { target: hint_for, key, object, durable }
            };
            shard.on_shard(target, op).await?;
            Ok(Reply::ReplicaWrite)
        }
        Request::Purge { key, object } => {
            validate_key(&key).map_err(pair_error)?;
            let object = parse_object(&object)?;
            let target = shard.local_shard_of(shard.node.partition(&key));
            match shard.on_shard(target, Op::Purge { key, object }).await? {
                OpOutput::Reply(r) => Ok(r),
                _ => Err(internal("purge returned something else")),
            }
        }
        Request::Handoff { partition, entries } => {
            let n = entries.len() as u32;
            let mut parsed = Vec::with_capacity(entries.len());
            for (key, object) in entries {
                validate_key(&key).map_err(pair_error)?;
                if shard.node.partition(&key) != partition {
                    return Err(bad_request(format!("handoff entry outside partition {partition}")));
                }
                parsed.push((key, parse_object(&object)?));
            }
            let target = shard.local_shard_of(partition);
            shard.on_shard(target, Op::MergeBatch { entries: parsed }).await?;
            Ok(Reply::Handoff { applied: n })
        }
        Request::Gossip { state } => reply(shard.on_shard(0, Op::Gossip(state)).await?),
        Request::RingChange { action, change } => reply(shard.on_shard(0, Op::RingChange(action, change)).await?),
        Request::Merkle { partition, segments } => {
            let p = check_partition(shard, partition)?;
            reply(shard.on_shard(shard.local_shard_of(p), Op::Merkle { partition: p, segments }).await?)
        }
        Request::Keys { partition, leaves } => {
            let p = check_partition(shard, partition)?;
            reply(shard.on_shard(shard.local_shard_of(p), Op::Keys { partition: p, leaves }).await?)
        }
        Request::ReadBatch { keys } => {
            let Some(first) = keys.first() else { return Ok(Reply::ReadBatch { entries: vec![] }) };
            let p = shard.node.partition(first);
            if keys.iter().any(|k| validate_key(k).is_err() || shard.node.partition(k) != p) {
                return Err(bad_request("a read batch holds valid keys of one partition"));
            }
            reply(shard.on_shard(shard.local_shard_of(p), Op::GetBatch { keys }).await?)
        }
        Request::Repair { partition } => {
            if let Some(p) = partition {
                check_partition(shard, p)?;
            }
            let mut total = RepairReport::default();
            for s in 0..shard.node.shards {
                match shard.on_shard(s, Op::Repair { partition }).await? {
                    OpOutput::Repair(r) => total.add(&r),
                    _ => return Err(internal("repair returned something else")),
                }
            }
            Ok(Reply::Repair(total))
        }
        Request::MerkleRoots => {
            let mut roots = Vec::new();
            for s in 0..shard.node.shards {
                match shard.on_shard(s, Op::Roots).await? {
                    OpOutput::Roots(r) => roots.extend(r),
                    _ => return Err(internal("roots returned something else")),
                }
            }
            roots.sort_by_key(|r| r.partition);
            Ok(Reply::MerkleRoots { roots })
        }
    }
}

fn check_partition(shard: &Shard, p: u32) -> Result<u32, WireError> {
    if p >= shard.node.cfg.partitions {
        return Err(bad_request(format!("partition {p} does not exist (the ring has {})", shard.node.cfg.partitions)));
    }
    Ok(p)
}

/// The key of a client read or write.
fn client_key(body: &Request) -> Option<&[u8]> {
    match body {
        Request::Get { key, .. } | Request::Put { key, .. } | Request::Delete { key, .. } => Some(key),
        _ => None,
    }
}

/// Checks a client read or write (key, pair size, context) and turns it
/// into the coordinator's operation.
fn client_op(shard: &Shard, body: Request) -> Result<ClientOp, WireError> {
    match body {
        Request::Get { key, r } => {
            validate_key(&key).map_err(pair_error)?;
            Ok(ClientOp::Get { key, r })
        }
        Request::Put { key, value, context, w, durable } => {
            validate_pair(&key, &value, shard.node.cfg.max_pair_bytes).map_err(pair_error)?;
            let ctx = WriteContext::Client(parse_context(&context)?);
            Ok(ClientOp::Write { key, value: Some(value), ctx, w, durable: durable.unwrap_or(true) })
        }
        Request::Delete { key, context, w, durable } => {
            validate_key(&key).map_err(pair_error)?;
            // Without a context a delete removes what the coordinator holds.
            let ctx =
                if context.is_empty() { WriteContext::Local } else { WriteContext::Client(parse_context(&context)?) };
            Ok(ClientOp::Write { key, value: None, ctx, w, durable: durable.unwrap_or(true) })
        }
        other => Err(internal(format!("{} is not a client read or write", other.kind()))),
    }
}

/// Where a client request runs: forwarded to a replica if this node is
/// not one (and nobody forwarded it yet), else coordinated on the local
/// shard that holds the key.
enum Placement {
    Forward(u32),
    Shard(usize),
}

fn placement(shard: &Shard, key: &[u8], hops: u8) -> Result<Placement, WireError> {
    let p = shard.node.partition(key);
    let view = shard.view();
    if !view.has_ring() {
        return Err(WireError::new(ErrorCode::Unavailable, "this node is still joining the cluster"));
    }
    if hops == 0 && !view.is_primary(p, shard.me()) {
        return Ok(Placement::Forward(p));
    }
    Ok(Placement::Shard(shard.local_shard_of(p)))
}

/// A replica that has not answered within the node's request timeout has
/// failed, whatever longer wait the client allows.
fn coordination_timeout(shard: &Shard, asked: Duration) -> Duration {
    asked.min(shard.node.timeout())
}

async fn coordinate(shard: &Rc<Shard>, body: Request, hops: u8, timeout: Duration) -> Result<Reply, WireError> {
    let key = client_key(&body).ok_or_else(|| internal("not a client request"))?;
    validate_key(key).map_err(pair_error)?;
    match placement(shard, key, hops)? {
        Placement::Forward(p) => {
            // Checked here too: a request that cannot succeed is refused
            // without a hop.
            client_op(shard, body.clone())?;
            forward(shard, p, body, timeout).await
        }
        Placement::Shard(s) => {
            let op = client_op(shard, body)?;
            reply(shard.on_shard(s, Op::Coordinate(op, coordination_timeout(shard, timeout))).await?)
        }
    }
}

/// Where a response goes.
pub type Respond = Box<dyn FnOnce(Result<Reply, WireError>)>;

/// Serves `req` without a task when it can: a client read or write this
/// shard coordinates itself, or a replica read or write its store answers
/// from memory. `respond` runs exactly once, now or when the answer is
/// known. Otherwise the request comes back, for [`handle`] in a task.
#[allow(clippy::result_large_err)]
pub fn try_fast(
    shard: &Rc<Shard>,
    role: Role,
    req: RequestFrame,
    respond: Respond,
) -> Result<(), (RequestFrame, Respond)> {
    match (&req.body, role) {
        (Request::Get { .. } | Request::Put { .. } | Request::Delete { .. }, Role::Client) => {
            let key = client_key(&req.body).expect("a client request");
            if validate_key(key).is_err() {
                return Err((req, respond));
            }
            match placement(shard, key, req.hops) {
                Ok(Placement::Shard(s)) if s == shard.id => {}
                Ok(_) => return Err((req, respond)),
                Err(e) => {
                    respond(Err(e));
                    return Ok(());
                }
            }
            let timeout = coordination_timeout(shard, requested_timeout(shard, req.timeout_ms));
            match client_op(shard, req.body) {
                Ok(op) => shard.driver.start(shard, op, timeout, respond),
                Err(e) => respond(Err(e)),
            }
            Ok(())
        }
        (Request::ReplicaRead { key }, Role::Peer) => {
            if validate_key(key).is_err() || shard.local_shard_of(shard.node.partition(key)) != shard.id {
                return Err((req, respond));
            }
            match shard.store.get_now(key) {
                None => Err((req, respond)),
                Some(r) => {
                    respond(r.map(replica_read).map_err(storage_error));
                    Ok(())
                }
            }
        }
        (Request::GetCopy { key }, _) => {
            if validate_key(key).is_err() {
                return Err((req, respond));
            }
            let p = shard.node.partition(key);
            if let Err(e) = check_copy(shard, p) {
                respond(Err(e));
                return Ok(());
            }
            if shard.local_shard_of(p) != shard.id {
                return Err((req, respond));
            }
            match shard.store.get_now(key) {
                None => Err((req, respond)),
                Some(r) => {
                    shard.driver.served_copy(p, 0);
                    respond(r.map(copy_reply).map_err(storage_error));
                    Ok(())
                }
            }
        }
        (Request::ReplicaWrite { key, object, durable, hint_for }, Role::Peer) if hint_for.is_empty() => {
            if validate_key(key).is_err() || shard.local_shard_of(shard.node.partition(key)) != shard.id {
                return Err((req, respond));
            }
            let obj = match parse_object(object) {
                Ok(o) => o,
                Err(e) => {
                    respond(Err(e));
                    return Ok(());
                }
            };
            match shard.store.merge_now(key, &obj) {
                None => Err((req, respond)),
                Some(Err(e)) => {
                    respond(Err(storage_error(e)));
                    Ok(())
                }
                Some(Ok((_, lsn))) if *durable => {
                    let done = Box::new(move |r: Result<(), crate::store::StoreError>| {
                        respond(r.map(|()| Reply::ReplicaWrite).map_err(storage_error))
                    });
                    shard.store.on_durable(lsn, done);
                    Ok(())
                }
                Some(Ok(_)) => {
                    respond(Ok(Reply::ReplicaWrite));
                    Ok(())
                }
            }
        }
        _ => Err((req, respond)),
    }
}

/// Whether this node's copy of partition `p` is one a client-driven read
/// may count toward its r: the node is one of `p`'s replicas and no ring
/// change is moving `p` (while one is, the new replicas may not have the
/// data yet, and only a coordinated read, which also asks the nodes still
/// holding it, is sure to see it).
fn check_copy(shard: &Shard, p: u32) -> Result<(), WireError> {
    let view = shard.view();
    if !view.has_ring() {
        return Err(WireError::new(ErrorCode::Unavailable, "this node is still joining the cluster"));
    }
    if !view.is_primary(p, shard.me()) {
        return Err(WireError::new(
            ErrorCode::StaleTopology,
            "this node is not a replica of the key: refresh the topology or read through a coordinator",
        ));
    }
    if !view.topo.holders(p).is_empty() {
        return Err(WireError::new(
            ErrorCode::StaleTopology,
            "the key's partition is moving between nodes: read through a coordinator",
        ));
    }
    Ok(())
}

/// A copy read's answer: what a coordinated read of this one copy returns.
fn copy_reply(o: Option<Object>) -> Reply {
    crate::driver::reply(ringkv_core::coordinator::Outcome::Read(o), false)
}

fn replica_read(o: Option<Object>) -> Reply {
    Reply::ReplicaRead { found: o.is_some(), object: o.map(|o| o.to_bytes()).unwrap_or_default() }
}

/// Sends a client request to the first reachable live replica of `p`.
async fn forward(shard: &Rc<Shard>, p: u32, req: Request, timeout: Duration) -> Result<Reply, WireError> {
    let view = shard.view();
    let mut last = String::from("no live replica");
    for node in view.primaries(p).iter().filter(|n| view.alive(n)) {
        let Some(addr) = view.address(node, p) else { continue };
        match shard.peers.call(addr, req.clone(), 1, timeout).await {
            Ok(resp) => return resp.result,
            Err(crate::peer::PeerError::Timeout) => {
                return Err(WireError::new(ErrorCode::Timeout, format!("replica {node} did not answer in time")))
            }
            Err(e) => last = format!("{node}: {e}"),
        }
    }
    Err(WireError::new(ErrorCode::Unavailable, format!("cannot reach a replica of partition {p}: {last}")))
}

async fn node_info(shard: &Rc<Shard>) -> Result<NodeInfo, WireError> {
    let stats = shard.all_stats().await?;
    let cfg = &shard.node.cfg;
    let view = shard.view();
    let counts = view.ring.as_ref().map(|r| r.counts()).unwrap_or_default();
    let state = ringkv_core::membership::ClusterState::decode(&view.state).ok();
    let mut members: Vec<MemberInfo> = view
        .members
        .iter()
        .map(|(id, r)| {
            let load = state.as_ref().and_then(|s| s.members.get(id)).map(|m| (m.weight, m.load)).unwrap_or_default();
            let status = crate::events::member_state(&view, id, r).to_string();
            MemberInfo {
                node_id: id.clone(),
                addr: r.addr.to_string(),
                status,
                alive: view.alive(id),
                weight: load.0,
                shards: r.shards,
                partitions_owned: counts.get(id.as_str()).copied().unwrap_or(0) as u32,
                partitions_replicated: view.replicated_by(id) as u32,
                hints_pending: load.1.hints,
                keys: load.1.keys,
                ops_per_sec: load.1.ops_per_sec,
                p99_us: load.1.p99_us,
                cpu_permille: load.1.cpu_permille,
                disk_bytes: load.1.disk_bytes,
                moving_partitions: load.1.moving_partitions,
                moving_bytes: load.1.moving_bytes,
            }
        })
        .collect();
    members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let (figures, staged) = match shard.on_shard(0, Op::AgentFigures).await? {
        OpOutput::Figures(f) => *f,
        _ => return Err(internal("figures op returned something else")),
    };
    Ok(NodeInfo {
        node_id: shard.node.node_id.clone(),
        cluster: cfg.cluster.clone(),
        listen: cfg.listen.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        partitions: cfg.partitions,
        shards: stats
            .iter()
            .enumerate()
            .map(|(i, s)| ShardStats {
                shard: i as u16,
                keys: s.store.keys,
                tombstones: s.store.tombstones,
                disk_bytes: s.store.log_bytes,
                segments: s.store.segments,
                hints: s.store.hints,
                compactions: s.store.compactions,
            })
            .collect(),
        replicas: cfg.replicas as u8,
        ring_version: view.ring_version(),
        members,
        hot_partitions: figures.hot.iter().map(|&(p, rate)| (p, rate.round() as u64)).collect(),
        stream_keys_left: stats.iter().map(|s| s.stream.keys_left).sum(),
        stream_keys_total: stats.iter().map(|s| s.stream.keys_total).sum(),
        stream_bytes_sent: stats.iter().map(|s| s.streamed.bytes_sent).sum(),
        stream_keys_resumed: stats.iter().map(|s| s.streamed.keys_resumed).sum(),
        staged,
    })
}
