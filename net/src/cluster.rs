//! A blocking client for a whole cluster, routing by topology.
//!
//! It bootstraps from any node, learns the ring, members and shard pins, and
//! sends each request straight to the owning shard of the key's first
//! replica, so the node neither forwards it to another node nor hands it to
//! another shard. Every response carries the node's ring version; a newer
//! one than ours triggers a topology refresh.
//!
//! Riding through failures: a replica that does not answer within a
//! deadline derived from the latencies this client observed (twice their
//! p99, at least [`MIN_ATTEMPT`], at most the request timeout) is given up
//! on, and the request goes to the next replica, which coordinates it just
//! as well. That holds for writes too: a write sent again elsewhere carries
//! the same context, so a duplicate becomes at worst a sibling of equal
//! value that the next read and write resolve. A reset or refused
//! connection moves on the same way. An endpoint that failed is marked down
//! and tried last, until a probe after a back-off (1 s, doubling to 8 s)
//! finds it answering again. Errors the node itself answers (a quorum not
//! met, a pair too large) are returned as they are.

use crate::client::{Client, ClientConfig, ClientError, WriteOptions};
use crate::proto::{GetResult, Level, Reply, Request};
use crate::topology::Topology;
use ringkv_core::latency::RecentLatencies;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The shortest wait for one replica before the next is asked.
/// (High enough that a busy machine's ordinary jitter does not send
/// requests elsewhere.)
pub const MIN_ATTEMPT: Duration = Duration::from_millis(50);
/// The wait before enough latencies were seen to derive one.
const FIRST_ATTEMPT: Duration = Duration::from_millis(500);
/// Request latencies kept for the deadline.
pub const SAMPLES: usize = 512;

/// How long one replica gets before the next is asked: twice the observed
/// p99 (`None` before enough samples), at least [`MIN_ATTEMPT`], at most
/// `timeout`. Pure, so every client (this one, `ringkv-client`'s core)
/// derives its deadline the same way.
pub fn attempt_deadline(p99_us: Option<u64>, timeout: Duration) -> Duration {
    let derived = p99_us.map_or(FIRST_ATTEMPT, |p99| Duration::from_micros(2 * p99).max(MIN_ATTEMPT));
    derived.min(timeout)
}

/// How long an endpoint that failed `failures` times in a row (at least
/// once) is tried last before it is probed again: 1 s, doubling to 8 s.
pub fn down_backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.max(1).saturating_sub(1).min(3))
}

/// What this client knows of one endpoint's health.
#[derive(Clone, Copy)]
struct Health {
    failures: u32,
    down_until: Instant,
}

pub struct ClusterClient {
    cfg: ClientConfig,
    seeds: Vec<String>,
    topology: Topology,
    conns: HashMap<SocketAddr, Client>,
    latencies: RecentLatencies,
    health: HashMap<SocketAddr, Health>,
}

impl ClusterClient {
    /// Connects through the first seed (IP:PORT) that answers.
    pub fn connect(seeds: &[&str], cfg: ClientConfig) -> Result<ClusterClient, ClientError> {
        let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
        let topology = fetch(&seeds, &cfg)?;
        Ok(ClusterClient {
            cfg,
            seeds,
            topology,
            conns: HashMap::new(),
            latencies: RecentLatencies::new(SAMPLES),
            health: HashMap::new(),
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// How long one replica gets before the next is asked, as now derived.
    pub fn attempt_deadline(&self) -> Duration {
        attempt_deadline(self.latencies.p99_us(), self.cfg.timeout)
    }

    /// Fetches the topology again, from any known member or seed.
    pub fn refresh(&mut self) -> Result<(), ClientError> {
        let mut sources: Vec<String> = self.topology.members().iter().map(ToString::to_string).collect();
        sources.extend(self.seeds.iter().cloned());
        self.topology = fetch(&sources, &self.cfg)?;
        Ok(())
    }

    fn is_down(&self, addr: &SocketAddr, now: Instant) -> bool {
        self.health.get(addr).is_some_and(|h| h.down_until > now)
    }

    fn failed(&mut self, addr: SocketAddr) {
        self.conns.remove(&addr);
        let h = self.health.entry(addr).or_insert(Health { failures: 0, down_until: Instant::now() });
        h.failures += 1;
        h.down_until = Instant::now() + down_backoff(h.failures);
    }

    /// One attempt at `addr`, waiting at most `wait` (connecting included).
    fn attempt(&mut self, addr: SocketAddr, req: &Request, wait: Duration) -> Result<Reply, ClientError> {
        if !self.conns.contains_key(&addr) {
            let quick = ClientConfig { timeout: wait.min(self.cfg.timeout), ..self.cfg.clone() };
            let mut c = Client::connect(addr, &quick)?;
            c.set_timeout(self.cfg.timeout)?;
            self.conns.insert(addr, c);
        }
        let conn = self.conns.get_mut(&addr).expect("inserted above");
        conn.call_within(req.clone(), wait)
    }

    /// Sends `req` for `key` along its replicas until one answers: first
    /// each with the derived deadline (the last with whatever time is left),
    /// then, if every one failed and some only by being slow (a fault can
    /// slow every coordinator for a moment: a replica that just died is
    /// still being given up on), those again with the time left shared out.
    fn call(&mut self, key: &[u8], req: Request) -> Result<Reply, ClientError> {
        let now = Instant::now();
        let mut route = self.topology.route(key);
        // Endpoints marked down go last: still tried, they may be all there is.
        route.sort_by_key(|a| self.is_down(a, now));
        let started = Instant::now();
        let mut last = None;
        let mut slow = Vec::new();
        let n = route.len();
        let mut passes: Vec<(SocketAddr, Option<usize>)> = route.into_iter().map(|a| (a, None)).collect();
        let mut i = 0;
        while i < passes.len() {
            let (addr, share) = passes[i];
            i += 1;
            let left = self.cfg.timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let wait = match share {
                Some(k) => left / k as u32,
                None if i == n => left,
                None => self.attempt_deadline().min(left),
            };
            let t = Instant::now();
            match self.attempt(addr, &req, wait) {
                Ok(reply) => {
                    self.latencies.record(t.elapsed().as_micros().min(u128::from(u64::MAX)) as u64);
                    self.health.remove(&addr);
                    let seen = self.conns.get(&addr).map_or(0, Client::ring_version);
                    if seen > self.topology.version() {
                        // A node knows a newer ring: route by it from now on.
                        let _ = self.refresh();
                    }
                    return Ok(reply);
                }
                // The node answered: its verdict stands.
                Err(ClientError::Server(e)) => {
                    self.health.remove(&addr);
                    return Err(ClientError::Server(e));
                }
                Err(e) => {
                    if matches!(e, ClientError::Timeout(_)) && share.is_none() {
                        slow.push(addr);
                    }
                    self.failed(addr);
                    last = Some(e);
                }
            }
            if i == n && !slow.is_empty() {
                let k = slow.len();
                passes.extend(slow.drain(..).enumerate().map(|(j, a)| (a, Some(k - j))));
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Io(std::io::Error::other("the key has no reachable replica"))))
    }

    pub fn get(&mut self, key: &[u8], r: Level) -> Result<GetResult, ClientError> {
        match self.call(key, Request::Get { key: key.to_vec(), r })? {
            Reply::Get(g) => Ok(g),
            other => Err(ClientError::UnexpectedReply { request: "get", reply: Box::new(other) }),
        }
    }

    pub fn put(&mut self, key: &[u8], value: &[u8], opts: &WriteOptions) -> Result<Vec<u8>, ClientError> {
        let req = Request::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            context: opts.context.clone(),
            w: opts.w,
            durable: opts.durable,
        };
        match self.call(key, req)? {
            Reply::Put { context } => Ok(context),
            other => Err(ClientError::UnexpectedReply { request: "put", reply: Box::new(other) }),
        }
    }

    pub fn delete(&mut self, key: &[u8], opts: &WriteOptions) -> Result<(), ClientError> {
        let req =
            Request::Delete { key: key.to_vec(), context: opts.context.clone(), w: opts.w, durable: opts.durable };
        match self.call(key, req)? {
            Reply::Delete => Ok(()),
            other => Err(ClientError::UnexpectedReply { request: "delete", reply: Box::new(other) }),
        }
    }
}

/// The topology from the first of `sources` that gives one.
fn fetch(sources: &[String], cfg: &ClientConfig) -> Result<Topology, ClientError> {
    let mut last = None;
    for s in sources {
        let attempt = Client::connect(s.as_str(), cfg).and_then(|mut c| match c.call(Request::Topology)? {
            Reply::Topology { state, replicas } => {
                Topology::decode(&state, replicas).map_err(|e| ClientError::Io(std::io::Error::other(e)))
            }
            other => Err(ClientError::UnexpectedReply { request: "topology", reply: Box::new(other) }),
        });
        match attempt {
            Ok(t) => return Ok(t),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Io(std::io::Error::other("no seed given"))))
}
