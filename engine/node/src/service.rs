//! What a client request means: validation, consistency levels, and the
//! reply. Connection handling lives in `conn`; the storage work runs on the
//! shard that owns the key (`shard`).

use crate::shard::{Op, OpOutput, Shard};
use crate::store::WriteContext;
use ringkv_core::keyspace::{validate_key, validate_pair, PairError};
use ringkv_core::version::{Object, VersionVector};
use ringkv_net::proto::{
    ErrorCode, GetResult, Level, NodeInfo, Reply, Request, RequestFrame, Response, ShardStats, WireError,
};
use std::time::Duration;

/// Longest timeout a client may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn handle(shard: &Shard, req: RequestFrame) -> Response {
    let timeout = match req.timeout_ms {
        0 => Duration::from_millis(shard.node.cfg.request_timeout_ms),
        ms => Duration::from_millis(u64::from(ms)).min(MAX_TIMEOUT),
    };
    let kind = req.body.kind();
    let result = match glommio::timer::timeout(timeout, async { Ok(execute(shard, req.body).await) }).await {
        Ok(r) => r,
        Err(_) => Err(WireError::new(ErrorCode::Timeout, format!("{kind} did not complete within {timeout:?}"))),
    };
    Response::new(req.id, result)
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

/// Checks a requested r or w against the replication factor and the replicas
/// that exist, returning how many acknowledgements it needs.
fn quorum(shard: &Shard, name: &str, level: Level) -> Result<usize, WireError> {
    let n = shard.node.cfg.replicas;
    // A single node holds one replica of each key, whatever N says.
    let replicas = 1;
    let needed = level.required(n, replicas).map_err(|e| bad_request(format!("{name}={e}")))?;
    if needed > replicas {
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!("{name}={needed} needs {needed} replicas but only {replicas} exists"),
        ));
    }
    Ok(needed)
}

fn parse_context(bytes: &[u8]) -> Result<VersionVector, WireError> {
    VersionVector::decode_context(bytes).map_err(|e| bad_request(format!("context: {e}")))
}

fn get_result(obj: Option<Object>) -> GetResult {
    match obj {
        None => GetResult::default(),
        Some(o) => GetResult {
            found: !o.is_deleted(),
            values: o.values().map(<[u8]>::to_vec).collect(),
            context: o.context().encode_context(),
        },
    }
}

fn object(out: OpOutput) -> Option<Object> {
    match out {
        OpOutput::Object(o) => o,
        OpOutput::Stats(_) => unreachable!("key operations return objects"),
    }
}

async fn execute(shard: &Shard, body: Request) -> Result<Reply, WireError> {
    match body {
        Request::Get { key, r } => {
            validate_key(&key).map_err(pair_error)?;
            quorum(shard, "r", r)?;
            let out = shard.on_owner(&key.clone(), Op::Get { key }).await?;
            Ok(Reply::Get(get_result(object(out))))
        }
        Request::Put { key, value, context, w, durable } => {
            validate_pair(&key, &value, shard.node.cfg.max_pair_bytes).map_err(pair_error)?;
            quorum(shard, "w", w)?;
            let ctx = WriteContext::Client(parse_context(&context)?);
            let op = Op::Write { key: key.clone(), value: Some(value), ctx, durable: durable.unwrap_or(true) };
            let obj = object(shard.on_owner(&key, op).await?).expect("a write returns the new object");
            Ok(Reply::Put { context: obj.context().encode_context() })
        }
        Request::Delete { key, context, w, durable } => {
            validate_key(&key).map_err(pair_error)?;
            quorum(shard, "w", w)?;
            // Without a context a delete removes what this replica holds.
            let ctx =
                if context.is_empty() { WriteContext::Local } else { WriteContext::Client(parse_context(&context)?) };
            let op = Op::Write { key: key.clone(), value: None, ctx, durable: durable.unwrap_or(true) };
            shard.on_owner(&key, op).await?;
            Ok(Reply::Delete)
        }
        Request::Ping { payload } => Ok(Reply::Pong { payload }),
        Request::NodeInfo => node_info(shard).await.map(Reply::NodeInfo),
    }
}

async fn node_info(shard: &Shard) -> Result<NodeInfo, WireError> {
    let stats = shard.all_stats().await?;
    let cfg = &shard.node.cfg;
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
                keys: s.keys,
                tombstones: s.tombstones,
                disk_bytes: s.log_bytes,
                segments: s.segments,
            })
            .collect(),
    })
}
