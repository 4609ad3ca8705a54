//! `ringkv put|get|delete|status`: one request to the node named by
//! `--endpoint`, which coordinates it (the CLI never reroutes).

use crate::cli::{DeleteArgs, Endpoint, GetArgs, PutArgs, RepairArgs, StatusArgs};
use crate::Failure;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ringkv_net::auth::Credentials;
use ringkv_net::proto::{NodeInfo, PartitionRoot, Reply, Request};
use ringkv_net::tls::ClientTls;
use ringkv_net::{Client, ClientConfig, ClientError, ErrorCode, Level, WriteOptions};
use serde_json::json;
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

pub fn connect(e: &Endpoint) -> Result<Client, Failure> {
    let password = std::env::var(ringkv_net::auth::PASSWORD_ENV).ok();
    let credentials = Credentials::from_options(e.token.as_deref(), e.user.as_deref(), password.as_deref())
        .map_err(Failure::Usage)?;
    let cfg = ClientConfig {
        cluster: e.cluster.clone(),
        timeout: Duration::from_millis(e.timeout_ms),
        credentials,
        tls: tls(e)?,
        ..Default::default()
    };
    Client::connect(e.endpoint.as_str(), &cfg).map_err(Failure::from)
}

/// TLS when --tls-ca is given; a client certificate or a server name
/// without it is a usage error (they would silently go unused).
fn tls(e: &Endpoint) -> Result<Option<ClientTls>, Failure> {
    let Some(ca) = &e.tls_ca else {
        if e.tls_cert.is_some() || e.tls_server_name.is_some() {
            return Err(Failure::Usage("--tls-cert and --tls-server-name need --tls-ca".into()));
        }
        return Ok(None);
    };
    ClientTls::from_files(ca, e.tls_cert.as_deref(), e.tls_key.as_deref(), e.tls_server_name.as_deref())
        .map(Some)
        .map_err(Failure::Usage)
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        match e {
            ClientError::Server(w) => Failure::Refused(match w.code {
                ErrorCode::PairTooLarge | ErrorCode::BadRequest => w.to_string(),
                _ => format!("{w}"),
            }),
            ClientError::Connect { .. } => Failure::Unreachable(e.to_string()),
            // The node answered, but one side refused the other's certificate.
            ClientError::Tls(_) => Failure::Refused(e.to_string()),
            // Wrong credentials, cluster or protocol: the node answered.
            ClientError::Session(ringkv_net::session::SessionError::Refused(w)) => {
                Failure::Refused(format!("the node refused the connection: {w}"))
            }
            other => Failure::Unreachable(other.to_string()),
        }
    }
}

fn decode_context(c: &Option<String>) -> Result<Vec<u8>, Failure> {
    match c {
        None => Ok(Vec::new()),
        Some(s) => {
            URL_SAFE_NO_PAD.decode(s.trim()).map_err(|e| Failure::Usage(format!("--context is not a context: {e}")))
        }
    }
}

pub fn encode_context(c: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(c)
}

fn read_value(v: &str) -> Result<Vec<u8>, Failure> {
    if v != "-" {
        return Ok(v.as_bytes().to_vec());
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| Failure::Usage(format!("cannot read the value from stdin: {e}")))?;
    Ok(buf)
}

pub fn put(a: &PutArgs) -> Result<(), Failure> {
    let value = read_value(&a.value)?;
    let opts = WriteOptions {
        context: decode_context(&a.context)?,
        w: a.w.unwrap_or(Level::Default),
        durable: a.no_sync.then_some(false),
    };
    let mut c = connect(&a.endpoint)?;
    let ctx = c.put(a.key.as_bytes(), &value, &opts)?;
    if a.json {
        println!("{}", json!({ "key": a.key, "context": encode_context(&ctx) }));
    }
    Ok(())
}

pub fn get(a: &GetArgs) -> Result<(), Failure> {
    let mut c = connect(&a.endpoint)?;
    let g = c.get(a.key.as_bytes(), a.r.unwrap_or(Level::Default))?;
    if a.json {
        // JSON strings cannot hold arbitrary bytes: text stays text, and if
        // any value is binary every value is base64 (said by "encoding").
        let text = g.values.iter().all(|v| std::str::from_utf8(v).is_ok());
        let render = |v: &[u8]| {
            if text {
                String::from_utf8_lossy(v).into_owned()
            } else {
                base64::engine::general_purpose::STANDARD.encode(v)
            }
        };
        let out = json!({
            "key": a.key,
            "found": g.found,
            "values": g.values.iter().map(|v| render(v)).collect::<Vec<_>>(),
            "context": encode_context(&g.context),
            "encoding": if text { "utf8" } else { "base64" },
        });
        println!("{out}");
        return if g.found { Ok(()) } else { Err(Failure::NotFound) };
    }
    if !g.found {
        return Err(Failure::NotFound);
    }
    if g.values.len() > 1 {
        eprintln!("{} siblings (concurrent writes); use --json for their context", g.values.len());
    }
    let mut out = std::io::stdout().lock();
    let newline = std::io::stdout().is_terminal() || g.values.len() > 1;
    for v in &g.values {
        out.write_all(v).and_then(|()| if newline { out.write_all(b"\n") } else { Ok(()) }).map_err(write_failed)?;
    }
    out.flush().map_err(write_failed)
}

fn write_failed(e: std::io::Error) -> Failure {
    Failure::Unreachable(format!("cannot write to stdout: {e}"))
}

pub fn delete(a: &DeleteArgs) -> Result<(), Failure> {
    let opts = WriteOptions { context: decode_context(&a.context)?, w: a.w.unwrap_or(Level::Default), durable: None };
    let mut c = connect(&a.endpoint)?;
    c.delete(a.key.as_bytes(), &opts)?;
    Ok(())
}

pub fn status(a: &StatusArgs) -> Result<(), Failure> {
    let Some(every) = a.watch else { return status_once(a).map(|s| print!("{s}")) };
    let every = Duration::from_secs(every.max(1));
    loop {
        // Home and clear, then the whole view: a refresh in place.
        let view = status_once(a).unwrap_or_else(|f| format!("ringkv: {}\n", f.message()));
        print!("\x1b[H\x1b[2J{view}");
        std::io::stdout().flush().map_err(write_failed)?;
        std::thread::sleep(every);
    }
}

fn status_once(a: &StatusArgs) -> Result<String, Failure> {
    let mut c = connect(&a.endpoint)?;
    let info = c.node_info()?;
    let roots = match c.call(Request::MerkleRoots)? {
        Reply::MerkleRoots { roots } => roots,
        other => return Err(Failure::Unreachable(format!("unexpected reply {other:?}"))),
    };
    if a.json {
        let mut v = status_json(&info);
        v["anti_entropy"] = json!(roots
            .iter()
            .map(|r| json!({"partition": r.partition, "keys": r.keys, "merkle_root": format!("{:016x}", r.root),
                            "last_round_ms": r.last_sync_ms}))
            .collect::<Vec<_>>());
        Ok(format!("{v}\n"))
    } else {
        Ok(format!("{}{}", status_text(&info), anti_entropy_text(&roots)))
    }
}

fn anti_entropy_text(roots: &[PartitionRoot]) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let synced: Vec<u64> =
        roots.iter().filter(|r| r.last_sync_ms > 0).map(|r| now.saturating_sub(r.last_sync_ms)).collect();
    let never = roots.len() - synced.len();
    let mut s = format!("\nanti-entropy over the {} partitions this node replicates: ", roots.len());
    match (synced.iter().min(), synced.iter().max()) {
        (Some(newest), Some(oldest)) => {
            s += &format!("last rounds {:.0}s to {:.0}s ago", *newest as f64 / 1000.0, *oldest as f64 / 1000.0)
        }
        _ => s += "no round completed yet",
    }
    if never > 0 && !synced.is_empty() {
        s += &format!(", {never} never");
    }
    s += " (per partition: --json)\n";
    s
}

pub fn repair(a: &RepairArgs) -> Result<(), Failure> {
    let mut c = connect(&a.endpoint)?;
    let r = match c.call(Request::Repair { partition: a.partition })? {
        Reply::Repair(r) => r,
        other => return Err(Failure::Unreachable(format!("unexpected reply {other:?}"))),
    };
    if a.json {
        println!(
            "{}",
            json!({"partitions": r.partitions, "exchanges": r.exchanges, "in_sync": r.in_sync,
                   "leaves_differing": r.leaves_differing, "keys_differing": r.keys_differing,
                   "keys_pulled": r.keys_pulled, "keys_pushed": r.keys_pushed, "errors": r.errors})
        );
    } else {
        println!(
            "compared {} partitions in {} replica exchanges ({} already in sync); {} Merkle leaves and {} keys differed; \
             moved {} keys here and {} keys to other replicas; {} exchanges failed",
            r.partitions,
            r.exchanges,
            r.in_sync,
            r.leaves_differing,
            r.keys_differing,
            r.keys_pulled,
            r.keys_pushed,
            r.errors
        );
    }
    if r.errors > 0 {
        return Err(Failure::Refused(format!(
            "{} exchanges failed (replicas down?); run repair again later",
            r.errors
        )));
    }
    Ok(())
}

fn status_json(n: &NodeInfo) -> serde_json::Value {
    json!({
        "node_id": n.node_id,
        "cluster": n.cluster,
        "listen": n.listen,
        "version": n.version,
        "partitions": n.partitions,
        "keys": n.shards.iter().map(|s| s.keys).sum::<u64>(),
        "tombstones": n.shards.iter().map(|s| s.tombstones).sum::<u64>(),
        "disk_bytes": n.shards.iter().map(|s| s.disk_bytes).sum::<u64>(),
        "hints": n.shards.iter().map(|s| s.hints).sum::<u64>(),
        "shards": n.shards.iter().map(|s| json!({
            "shard": s.shard, "keys": s.keys, "tombstones": s.tombstones,
            "disk_bytes": s.disk_bytes, "segments": s.segments, "hints": s.hints,
        })).collect::<Vec<_>>(),
        "replicas": n.replicas,
        "ring_version": n.ring_version,
        "members": n.members.iter().map(|m| json!({
            "node_id": m.node_id, "addr": m.addr, "status": m.status, "alive": m.alive,
            "weight": m.weight, "shards": m.shards,
            "partitions_owned": m.partitions_owned,
            "share": f64::from(m.partitions_owned) / f64::from(n.partitions.max(1)),
            "partitions_replicated": m.partitions_replicated,
            "hints_pending": m.hints_pending, "keys": m.keys,
            "ops_per_sec": m.ops_per_sec, "p99_us": m.p99_us,
            "cpu_busy": f64::from(m.cpu_permille) / 1000.0, "disk_bytes": m.disk_bytes,
            "moving_partitions": m.moving_partitions, "moving_bytes": m.moving_bytes,
        })).collect::<Vec<_>>(),
        "hot_partitions": n.hot_partitions.iter()
            .map(|&(p, ops)| json!({ "partition": p, "ops_per_sec": ops })).collect::<Vec<_>>(),
        "stream": {
            "keys_left": n.stream_keys_left, "keys_total": n.stream_keys_total,
            "bytes_sent": n.stream_bytes_sent, "keys_resumed": n.stream_keys_resumed,
        },
        "staged": serde_json::from_str::<serde_json::Value>(&n.staged).unwrap_or(serde_json::Value::Null),
    })
}

fn status_text(n: &NodeInfo) -> String {
    let mut s = format!(
        "node {}  listen {}  cluster {}  partitions {}  replicas {}  ring v{}  version {}\n\n",
        n.node_id, n.listen, n.cluster, n.partitions, n.replicas, n.ring_version, n.version
    );
    s += &format!(
        "{:<12} {:<22} {:<8} {:>6} {:>6} {:>7} {:>7} {:>10} {:>10} {:>8} {:>9} {:>8} {:>5} {:>10} {:>7}\n",
        "member",
        "address",
        "state",
        "weight",
        "shards",
        "owned",
        "share",
        "replicas",
        "keys",
        "hints",
        "ops/s",
        "p99 µs",
        "cpu",
        "disk",
        "moving"
    );
    for m in &n.members {
        let state = if m.alive { m.status.clone() } else { format!("{} (down)", m.status) };
        s += &format!(
            "{:<12} {:<22} {:<8} {:>6} {:>6} {:>7} {:>6.1}% {:>10} {:>10} {:>8} {:>9} {:>8} {:>4.0}% {:>10} {:>7}\n",
            m.node_id,
            m.addr,
            state,
            m.weight,
            m.shards,
            m.partitions_owned,
            100.0 * f64::from(m.partitions_owned) / f64::from(n.partitions.max(1)),
            m.partitions_replicated,
            m.keys,
            m.hints_pending,
            m.ops_per_sec,
            m.p99_us,
            f64::from(m.cpu_permille) / 10.0,
            m.disk_bytes,
            m.moving_partitions
        );
    }
    if n.stream_keys_total > 0 {
        s += &format!(
            "\nstreaming: {} of {} keys of the current partition left; {} bytes sent since start, {} keys resumed\n",
            n.stream_keys_left, n.stream_keys_total, n.stream_bytes_sent, n.stream_keys_resumed
        );
    }
    if !n.hot_partitions.is_empty() {
        let hot: Vec<String> = n.hot_partitions.iter().map(|(p, ops)| format!("{p} ({ops}/s)")).collect();
        s += &format!("\nbusiest partitions coordinated here: {}\n", hot.join(", "));
    }
    if !n.staged.is_empty() {
        s += "\na ring change is staged here: see `ringkv plan`\n";
    }
    s += &format!("\nshards of {}:\n", n.node_id);
    s += &format!("{:>6} {:>12} {:>12} {:>14} {:>9}\n", "shard", "keys", "tombstones", "disk bytes", "segments");
    for sh in &n.shards {
        s += &format!(
            "{:>6} {:>12} {:>12} {:>14} {:>9}\n",
            sh.shard, sh.keys, sh.tombstones, sh.disk_bytes, sh.segments
        );
    }
    let total = |f: fn(&ringkv_net::proto::ShardStats) -> u64| n.shards.iter().map(f).sum::<u64>();
    s += &format!(
        "{:>6} {:>12} {:>12} {:>14} {:>9}\n",
        "total",
        total(|x| x.keys),
        total(|x| x.tombstones),
        total(|x| x.disk_bytes),
        total(|x| u64::from(x.segments))
    );
    s
}
