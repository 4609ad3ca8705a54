//! The node's metrics, and the Prometheus endpoint that serves them.
//!
//! Two kinds of figures, published two ways so the request path never takes
//! a lock:
//! - per request (operations, their latency, errors by kind, connections):
//!   each shard counts into its own [`ShardMetrics`], relaxed atomics on a
//!   cache line no other shard writes, read by the scraper;
//! - everything else (keys, bytes, compaction, hints, anti-entropy, streams,
//!   members as this node sees them): the gossip agent refreshes a
//!   [`Background`] snapshot every load refresh (two seconds), behind a mutex
//!   only it and the scraper touch.
//!
//! [`serve`] runs a small HTTP/1.0 server on its own std thread, outside the
//! shards (no async stack inside glommio): `GET /metrics` answers the
//! Prometheus text format (0.0.4), encoded by the `prometheus-client` crate;
//! anything else gets 404. Names: `ringkv_*`, per shard with a `shard` label.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use ringkv_net::proto::ErrorCode;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Client operations, as the coordinator sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Delete,
}

const OPS: [(&str, Op); 3] = [("get", Op::Get), ("put", Op::Put), ("delete", Op::Delete)];

/// Upper bounds of the latency buckets, in µs (the last bucket is +Inf).
const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Error kinds counted: every wire error code.
const ERROR_KINDS: usize = ErrorCode::ALL.len();

#[derive(Debug, Default)]
struct Latency {
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

/// What one shard counts on the request path. Only that shard writes it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    requests: [AtomicU64; 3],
    latency: [Latency; 3],
    errors: [AtomicU64; ERROR_KINDS],
    connections: AtomicI64,
}

impl ShardMetrics {
    /// A client operation this shard coordinated, answered after `us`.
    pub fn request(&self, op: Op, us: u64) {
        let i = op as usize;
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        let b = BUCKETS_US.iter().position(|&ub| us <= ub).unwrap_or(BUCKETS_US.len());
        self.latency[i].buckets[b].fetch_add(1, Ordering::Relaxed);
        self.latency[i].sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// An error answered to a client or peer.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One shard's slower-moving figures.
#[derive(Debug, Default, Clone)]
pub struct ShardFigures {
    pub keys: u64,
    pub tombstones: u64,
    pub disk_bytes: u64,
    pub segments: u64,
    pub compactions: u64,
    pub hints_pending: u64,
    pub hints_delivered: u64,
    pub repair_rounds: u64,
    pub keys_repaired: u64,
    pub tombstones_purged: u64,
    pub partitions_to_stream: u64,
    pub stream_bytes_sent: u64,
    pub stream_keys_resumed: u64,
    pub partitions_handed_off: u64,
}

/// What the gossip agent publishes every refresh.
#[derive(Debug, Default, Clone)]
pub struct Background {
    pub shards: Vec<ShardFigures>,
    /// Members by state as this node sees them: (state, count).
    pub members: Vec<(&'static str, u64)>,
    pub ring_version: u64,
}

/// Every figure of one node.
#[derive(Debug)]
pub struct NodeMetrics {
    shards: Vec<Arc<ShardMetrics>>,
    background: Mutex<Background>,
}

impl NodeMetrics {
    pub fn new(shards: usize) -> NodeMetrics {
        NodeMetrics {
            shards: (0..shards).map(|_| Arc::new(ShardMetrics::default())).collect(),
            background: Mutex::new(Background::default()),
        }
    }

    pub fn shard(&self, i: usize) -> Arc<ShardMetrics> {
        self.shards[i].clone()
    }

    pub fn publish(&self, b: Background) {
        *self.background.lock().expect("metrics lock") = b;
    }

    /// The exposition text.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Exposition(self.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &registry).expect("writing to a String");
        out
    }
}

#[derive(Debug)]
struct Exposition(Arc<NodeMetrics>);

/// A value that encodes as a counter or a gauge.
#[derive(Debug)]
struct Value(MetricType, u64);

impl EncodeMetric for Value {
    fn encode(&self, mut e: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            MetricType::Counter => e.encode_counter::<NoLabelSet, _, u64>(&self.1, None),
            _ => e.encode_gauge(&(self.1 as i64)),
        }
    }

    fn metric_type(&self) -> MetricType {
        self.0
    }
}

fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: Vec<(Vec<(&'static str, String)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let row = m.encode_family(&labels)?;
        Value(kind, v).encode(row)?;
    }
    Ok(())
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let n = &self.0;
        let shard = |i: usize| ("shard", i.to_string());
        let mut requests = Vec::new();
        for (i, s) in n.shards.iter().enumerate() {
            for (name, op) in OPS {
                requests
                    .push((vec![shard(i), ("op", name.to_string())], s.requests[op as usize].load(Ordering::Relaxed)));
            }
        }
        family(&mut enc, "ringkv_requests", "Client operations coordinated", MetricType::Counter, requests)?;
        {
            let mut m = enc.encode_descriptor(
                "ringkv_request_duration_seconds",
                "Latency of coordinated client operations, from arrival to answer",
                None,
                MetricType::Histogram,
            )?;
            for (i, s) in n.shards.iter().enumerate() {
                for (name, op) in OPS {
                    let l = &s.latency[op as usize];
                    let mut cumulative = 0;
                    let mut buckets = Vec::with_capacity(BUCKETS_US.len() + 1);
                    for (b, ub) in BUCKETS_US.iter().enumerate() {
                        cumulative += l.buckets[b].load(Ordering::Relaxed);
                        buckets.push((*ub as f64 / 1e6, cumulative));
                    }
                    cumulative += l.buckets[BUCKETS_US.len()].load(Ordering::Relaxed);
                    buckets.push((f64::MAX, cumulative));
                    let sum = l.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
                    let labels = vec![shard(i), ("op", name.to_string())];
                    m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, cumulative, &buckets, None)?;
                }
            }
        }
        let mut errors = Vec::new();
        for (i, s) in n.shards.iter().enumerate() {
            for code in ErrorCode::ALL {
                let count = s.errors[code.index()].load(Ordering::Relaxed);
                errors.push((vec![shard(i), ("kind", code.name().to_string())], count));
            }
        }
        family(&mut enc, "ringkv_errors", "Error answers, by kind", MetricType::Counter, errors)?;
        let conns = n
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (vec![shard(i)], s.connections.load(Ordering::Relaxed).max(0) as u64))
            .collect();
        family(&mut enc, "ringkv_connections", "Open connections", MetricType::Gauge, conns)?;

        let b = n.background.lock().expect("metrics lock").clone();
        type Pick = fn(&ShardFigures) -> u64;
        let per_shard: [(&str, &str, MetricType, Pick); 14] = [
            ("ringkv_keys", "Live keys stored", MetricType::Gauge, |f| f.keys),
            ("ringkv_tombstones", "Tombstones stored", MetricType::Gauge, |f| f.tombstones),
            ("ringkv_disk_bytes", "Bytes of log segments", MetricType::Gauge, |f| f.disk_bytes),
            ("ringkv_segments", "Log segments", MetricType::Gauge, |f| f.segments),
            ("ringkv_compactions", "Segments compacted", MetricType::Counter, |f| f.compactions),
            ("ringkv_hints_pending", "Hints held for other members", MetricType::Gauge, |f| f.hints_pending),
            ("ringkv_hints_delivered", "Hints delivered to their owners", MetricType::Counter, |f| f.hints_delivered),
            ("ringkv_anti_entropy_rounds", "Background anti-entropy rounds", MetricType::Counter, |f| f.repair_rounds),
            ("ringkv_keys_repaired", "Keys moved by anti-entropy", MetricType::Counter, |f| f.keys_repaired),
            ("ringkv_tombstones_purged", "Tombstones purged", MetricType::Counter, |f| f.tombstones_purged),
            (
                "ringkv_stream_partitions_pending",
                "Partitions held here that still stream elsewhere",
                MetricType::Gauge,
                |f| f.partitions_to_stream,
            ),
            ("ringkv_stream_bytes_sent", "Bytes streamed to new owners", MetricType::Counter, |f| f.stream_bytes_sent),
            ("ringkv_stream_keys_resumed", "Records not sent again after a broken stream", MetricType::Counter, |f| {
                f.stream_keys_resumed
            }),
            ("ringkv_partitions_handed_off", "Partitions handed to their new owners", MetricType::Counter, |f| {
                f.partitions_handed_off
            }),
        ];
        for (name, help, kind, pick) in per_shard {
            let rows = b.shards.iter().enumerate().map(|(i, f)| (vec![shard(i)], pick(f))).collect();
            family(&mut enc, name, help, kind, rows)?;
        }
        let members = b.members.iter().map(|(state, c)| (vec![("state", state.to_string())], *c)).collect();
        family(&mut enc, "ringkv_members", "Members by state, as this node sees them", MetricType::Gauge, members)?;
        family(
            &mut enc,
            "ringkv_ring_version",
            "Version of the ring this node routes by",
            MetricType::Gauge,
            vec![(vec![], b.ring_version)],
        )
    }
}

/// Serves `GET /metrics` on `addr` from a std thread until the process ends.
/// Binding happens here, so a taken address is a start-up error.
pub fn serve(addr: SocketAddr, metrics: Arc<NodeMetrics>) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("ringkv-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // One scrape at a time; a slow scraper cannot hold it long.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                let _ = answer(stream, &metrics);
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

fn answer(stream: std::net::TcpStream, metrics: &Arc<NodeMetrics>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Skip the headers; nothing in them matters here.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render())
    } else {
        ("404 Not Found", "text/plain", "only GET /metrics is served here\n".to_string())
    };
    let mut w = stream;
    write!(
        w,
        "HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    w.write_all(body.as_bytes())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_errors_and_histograms_show_in_the_exposition() {
        let m = Arc::new(NodeMetrics::new(2));
        m.shard(1).request(Op::Get, 300);
        m.shard(1).request(Op::Get, 20_000_000);
        m.shard(0).error(ErrorCode::BadRequest);
        m.publish(Background {
            shards: vec![ShardFigures { keys: 7, ..Default::default() }, ShardFigures::default()],
            members: vec![("up", 3)],
            ring_version: 4,
        });
        let text = m.render();
        for want in [
            "ringkv_requests_total{shard=\"1\",op=\"get\"} 2",
            "ringkv_request_duration_seconds_bucket{le=\"0.0005\",shard=\"1\",op=\"get\"} 1",
            "ringkv_request_duration_seconds_count{shard=\"1\",op=\"get\"} 2",
            "ringkv_errors_total{shard=\"0\",kind=\"BadRequest\"} 1",
            "ringkv_keys{shard=\"0\"} 7",
            "ringkv_members{state=\"up\"} 3",
            "ringkv_ring_version 4",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
