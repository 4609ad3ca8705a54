//! Targets: what `--target URL` names, how it resolves to endpoints and a
//! router, and how one connection to an endpoint is opened (with the
//! protocol's handshake) before the driver takes it over.

use crate::echo_server::{self, EchoConfig};
use crate::resp::{self, Resp};
use crate::router::{Router, ShardAwareNode, SingleEndpoint, SlotRouter, TopologyRouter};
use crate::slots::{parse_cluster_nodes, parse_cluster_slots};
use anyhow::{anyhow, bail, Context, Result};
use ringkv_net::{Client, ClientConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ringkv,
    Redis,
    Echo,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ringkv => "ringkv",
            Kind::Redis => "redis",
            Kind::Echo => "echo",
        }
    }
}

/// A parsed `--target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl {
    pub kind: Kind,
    /// `None` for `echo://local`: start an echo server in this process.
    pub addr: Option<String>,
}

impl std::str::FromStr for TargetUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<TargetUrl, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| format!("'{s}' is not SCHEME://HOST:PORT"))?;
        let kind = match scheme {
            "ringkv" => Kind::Ringkv,
            "redis" => Kind::Redis,
            "echo" => Kind::Echo,
            other => return Err(format!("unknown target scheme '{other}' (ringkv, redis or echo)")),
        };
        let rest = rest.trim_end_matches('/');
        if kind == Kind::Echo && (rest == "local" || rest.is_empty()) {
            return Ok(TargetUrl { kind, addr: None });
        }
        if rest.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(format!("'{s}' lacks a :PORT"));
        }
        Ok(TargetUrl { kind, addr: Some(rest.to_string()) })
    }
}

/// A target resolved to the endpoints the workers connect to.
pub struct Resolved {
    pub kind: Kind,
    pub endpoints: Vec<SocketAddr>,
    pub router: Box<dyn Router>,
    /// How requests are routed, for the report.
    pub routing: String,
    /// Every address the target's servers listen on, asked or not (all
    /// nodes and shard ports of a ringkv cluster, the replicas of a Redis
    /// Cluster): the harness counts the CPU time of every local process
    /// behind them.
    pub server_endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct ResolveOptions {
    pub redis_cluster: bool,
    pub shard_aware: bool,
    /// How to connect to ringkv: the cluster name and credentials.
    pub ringkv: ClientConfig,
    /// For `echo://local`.
    pub echo: EchoConfig,
}

pub fn resolve_addr(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

pub fn resolve(url: &TargetUrl, opts: &ResolveOptions) -> Result<Resolved> {
    let addr = match &url.addr {
        Some(a) => resolve_addr(a)?,
        None => {
            let a = echo_server::spawn_local(opts.echo.clone())?;
            eprintln!(
                "started an echo server in this process on {a} ({}, CPUs {})",
                if opts.echo.busy_poll { "busy-poll" } else { "blocking" },
                opts.echo.cpus.as_deref().map(crate::cpu::format_cpu_list).unwrap_or_else(|| "unpinned".into())
            );
            a
        }
    };
    match url.kind {
        Kind::Echo => Ok(Resolved {
            kind: Kind::Echo,
            endpoints: vec![addr],
            router: Box::new(SingleEndpoint),
            routing: "single endpoint".into(),
            server_endpoints: vec![addr],
        }),
        Kind::Redis if opts.redis_cluster => {
            let map = cluster_slots(addr)?;
            let routing = format!("redis cluster: {} masters by key slot, following MOVED/ASK", map.masters.len());
            let mut server_endpoints = map.masters.clone();
            // Best effort: without the node list only the masters count.
            for n in cluster_nodes(addr).unwrap_or_default() {
                if !server_endpoints.contains(&n) {
                    server_endpoints.push(n);
                }
            }
            Ok(Resolved {
                kind: Kind::Redis,
                endpoints: map.masters.clone(),
                router: Box::new(SlotRouter::new(&map)),
                routing,
                server_endpoints,
            })
        }
        Kind::Redis => Ok(Resolved {
            kind: Kind::Redis,
            endpoints: vec![addr],
            router: Box::new(SingleEndpoint),
            routing: "single endpoint".into(),
            server_endpoints: vec![addr],
        }),
        Kind::Ringkv => resolve_ringkv(addr, opts),
    }
}

/// ringkv: ask the node its shard count and partition count, then route each
/// key to the shard that owns it.
fn resolve_ringkv(addr: SocketAddr, opts: &ResolveOptions) -> Result<Resolved> {
    let mut c = Client::connect(addr, &opts.ringkv).with_context(|| format!("connecting to ringkv at {addr}"))?;
    let shards = c.server().shards.max(1);
    let node = c.server().node_id.clone();
    let base = SocketAddr::new(addr.ip(), addr.port() - c.server().shard);
    // The cluster's layout (absent on an older node, or one still joining).
    let topology = match c.call(ringkv_net::Request::Topology) {
        Ok(ringkv_net::Reply::Topology { state, replicas }) => ringkv_net::Topology::decode(&state, replicas).ok(),
        _ => None,
    };
    let server_endpoints = match &topology {
        Some(t) => every_shard(t),
        None => ShardAwareNode::endpoints(base, shards),
    };
    if !opts.shard_aware {
        return Ok(Resolved {
            kind: Kind::Ringkv,
            endpoints: vec![addr],
            router: Box::new(SingleEndpoint),
            routing: format!("single endpoint (node {node}, {shards} shards; the node forwards between shards)"),
            server_endpoints,
        });
    }
    // Every request goes straight to the owning shard of its key's first
    // replica, on whichever node that is.
    if let Some(topology) = topology {
        let (router, endpoints) = TopologyRouter::new(&topology);
        let routing = format!(
            "topology-aware: {} members, ring v{}, {} (node, shard) endpoints; each key to its first replica's shard",
            topology.cluster().members.len(),
            topology.version(),
            endpoints.len()
        );
        return Ok(Resolved { kind: Kind::Ringkv, endpoints, router: Box::new(router), routing, server_endpoints });
    }
    // An older node without topology: route by its shard count.
    let partitions = c.node_info().context("asking the node for its partition count")?.partitions.max(1);
    Ok(Resolved {
        kind: Kind::Ringkv,
        endpoints: ShardAwareNode::endpoints(base, shards),
        router: Box::new(ShardAwareNode { partitions, shards }),
        routing: format!("shard-aware: node {node}, {shards} shard port(s) from {base}, {partitions} partitions"),
        server_endpoints,
    })
}

/// Every shard address of every member: shard i of a node listens on its
/// address's port + i.
fn every_shard(t: &ringkv_net::Topology) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for m in t.cluster().members.values() {
        let Ok(base) = m.addr.parse::<SocketAddr>() else { continue };
        out.extend(ShardAwareNode::endpoints(base, m.shards.max(1)));
    }
    out
}

fn read_resp(s: &mut TcpStream, mut keep: impl FnMut(&Resp<'_>) -> Result<()>) -> Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some((r, _)) = resp::parse(&buf)? {
            return keep(&r);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before a complete reply");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn cluster_slots(addr: SocketAddr) -> Result<crate::slots::SlotMap> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = Vec::new();
    resp::encode_command(&mut out, &[b"CLUSTER", b"SLOTS"]);
    s.write_all(&out)?;
    let mut map = None;
    read_resp(&mut s, |r| {
        if let Resp::Error(e) = r {
            bail!("CLUSTER SLOTS failed: {} (is it a cluster? drop --cluster)", String::from_utf8_lossy(e));
        }
        map = Some(parse_cluster_slots(r, addr).map_err(|e| anyhow!("CLUSTER SLOTS: {e}"))?);
        Ok(())
    })?;
    map.ok_or_else(|| anyhow!("no CLUSTER SLOTS reply"))
}

/// Every node of the Redis Cluster `addr` belongs to (CLUSTER NODES).
fn cluster_nodes(addr: SocketAddr) -> Result<Vec<SocketAddr>> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = Vec::new();
    resp::encode_command(&mut out, &[b"CLUSTER", b"NODES"]);
    s.write_all(&out)?;
    let mut nodes = Vec::new();
    read_resp(&mut s, |r| {
        match r {
            Resp::Bulk(Some(text)) => nodes = parse_cluster_nodes(&String::from_utf8_lossy(text), addr),
            other => bail!("CLUSTER NODES answered {other:?}"),
        }
        Ok(())
    })?;
    Ok(nodes)
}

/// Opens one connection to `addr` and completes the protocol's handshake
/// (ringkv's, with the credentials in `ringkv`, by the client library).
pub fn connect(kind: Kind, addr: SocketAddr, ringkv: &ClientConfig) -> Result<TcpStream> {
    if kind != Kind::Ringkv {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        return Ok(s);
    }
    let c = Client::connect(addr, ringkv).with_context(|| format!("connecting to ringkv at {addr}"))?;
    let s = c.into_stream().with_context(|| format!("{addr} sent data after its handshake"))?;
    // The driver's io_uring reads and writes must not time out on their own.
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_urls_parse() {
        let t: TargetUrl = "ringkv://127.0.0.1:7070".parse().unwrap();
        assert_eq!((t.kind, t.addr.as_deref()), (Kind::Ringkv, Some("127.0.0.1:7070")));
        let t: TargetUrl = "redis://localhost:6379/".parse().unwrap();
        assert_eq!((t.kind, t.addr.as_deref()), (Kind::Redis, Some("localhost:6379")));
        let t: TargetUrl = "echo://local".parse().unwrap();
        assert_eq!((t.kind, t.addr), (Kind::Echo, None));
        assert!("http://x:1".parse::<TargetUrl>().is_err());
        assert!("ringkv://host".parse::<TargetUrl>().is_err());
        assert!("127.0.0.1:7070".parse::<TargetUrl>().is_err());
    }
}
