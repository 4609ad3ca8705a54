//! A bounded client load that records a history for the checker.
//!
//! Each client thread owns a connection to one endpoint of its list and moves
//! to the next one when the connection fails, as a real client would. It
//! mixes blind puts (which become siblings), read-modify-writes (a get, then
//! a put carrying the read's context, with the read values as parents),
//! deletes with context and plain reads, on a small shared key space so that
//! clients collide. Every run stops at `max_ops` per client or `duration`,
//! whichever comes first, or when `stop` is raised.

use crate::history::{History, Op, Outcome, Value};
use ringkv_net::{Client, ClientConfig, ClientError, ErrorCode, GetResult, Level, WriteOptions};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub clients: usize,
    /// Where each client may connect, tried in order (client i starts at
    /// endpoint i % len).
    pub endpoints: Vec<SocketAddr>,
    /// Source address for the clients (to stand on one side of a partition).
    pub bind: Option<IpAddr>,
    pub key_prefix: String,
    pub keys: usize,
    pub max_ops: usize,
    pub duration: Duration,
    pub r: Level,
    pub w: Level,
    /// Percent of operations: blind puts, read-modify-writes, deletes; the
    /// rest are reads.
    pub blind: u32,
    pub rmw: u32,
    pub delete: u32,
    pub timeout: Duration,
    /// Pause between a client's operations.
    pub pause: Duration,
}

impl LoadSpec {
    pub fn new(endpoints: Vec<SocketAddr>, key_prefix: &str) -> LoadSpec {
        LoadSpec {
            clients: 4,
            endpoints,
            bind: None,
            key_prefix: key_prefix.to_string(),
            keys: 50,
            max_ops: 5000,
            duration: Duration::from_secs(10),
            r: Level::Quorum,
            w: Level::Quorum,
            blind: 20,
            rmw: 50,
            delete: 5,
            timeout: Duration::from_secs(3),
            pause: Duration::from_millis(2),
        }
    }
}

/// How a request ended, as the checker sees it.
pub fn classify(e: &ClientError) -> Outcome {
    match e {
        ClientError::Server(w) => match w.code {
            // Refused before anything was written.
            ErrorCode::Unavailable | ErrorCode::BadRequest | ErrorCode::PairTooLarge | ErrorCode::Storage => {
                Outcome::Failed(w.to_string())
            }
            _ => Outcome::Indeterminate(w.to_string()),
        },
        ClientError::Connect { .. } => Outcome::Failed(e.to_string()),
        other => Outcome::Indeterminate(other.to_string()),
    }
}

struct Worker {
    id: usize,
    spec: LoadSpec,
    history: Arc<History>,
    conn: Option<Client>,
    at: usize,
    seq: u64,
    rng: u64,
}

impl Worker {
    fn rand(&mut self, n: u64) -> u64 {
        // xorshift64*: deterministic per client, no shared state.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }

    fn client(&mut self) -> Result<&mut Client, ClientError> {
        if self.conn.is_none() {
            let cfg = ClientConfig { timeout: self.spec.timeout, bind: self.spec.bind, ..Default::default() };
            let addr = self.spec.endpoints[self.at % self.spec.endpoints.len()];
            match Client::connect(addr, &cfg) {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    self.at += 1;
                    return Err(e);
                }
            }
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Drops a connection that failed, so the next call moves on.
    fn failed(&mut self, e: &ClientError) {
        if !matches!(e, ClientError::Server(_)) {
            self.conn = None;
            self.at += 1;
        }
    }

    fn get(&mut self, key: &[u8]) -> Option<GetResult> {
        let t = self.history.now_us();
        let r = self.spec.r;
        let res = self.client().and_then(|c| c.get(key, r));
        match res {
            Ok(g) => {
                self.history.record(self.id, Op::Get { key: key.to_vec() }, t, Outcome::Ok(g.values.clone()));
                Some(g)
            }
            Err(e) => {
                self.failed(&e);
                self.history.record(self.id, Op::Get { key: key.to_vec() }, t, classify(&e));
                None
            }
        }
    }

    fn put(&mut self, key: &[u8], context: Vec<u8>, parents: Vec<Value>) {
        self.seq += 1;
        let value = format!("c{}-{}", self.id, self.seq).into_bytes();
        let opts = WriteOptions { context, w: self.spec.w, durable: None };
        let t = self.history.now_us();
        let res = self.client().and_then(|c| c.put(key, &value, &opts));
        let outcome = match res {
            Ok(_) => Outcome::Ok(vec![]),
            Err(e) => {
                self.failed(&e);
                classify(&e)
            }
        };
        self.history.record(self.id, Op::Put { key: key.to_vec(), value, parents }, t, outcome);
    }

    fn delete(&mut self, key: &[u8], context: Vec<u8>, parents: Vec<Value>) {
        let opts = WriteOptions { context, w: self.spec.w, durable: None };
        let t = self.history.now_us();
        let res = self.client().and_then(|c| c.delete(key, &opts));
        let outcome = match res {
            Ok(()) => Outcome::Ok(vec![]),
            Err(e) => {
                self.failed(&e);
                classify(&e)
            }
        };
        self.history.record(self.id, Op::Delete { key: key.to_vec(), parents }, t, outcome);
    }

    fn run(mut self, stop: &AtomicBool) {
        let deadline = Instant::now() + self.spec.duration;
        for _ in 0..self.spec.max_ops {
            if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break;
            }
            let n = self.rand(self.spec.keys as u64);
            let key = format!("{}{n}", self.spec.key_prefix).into_bytes();
            let dice = self.rand(100) as u32;
            let (blind, rmw, delete) = (self.spec.blind, self.spec.rmw, self.spec.delete);
            if dice < blind {
                self.put(&key, Vec::new(), Vec::new());
            } else if dice < blind + rmw {
                if let Some(g) = self.get(&key) {
                    self.put(&key, g.context, g.values);
                }
            } else if dice < blind + rmw + delete {
                if let Some(g) = self.get(&key) {
                    if g.found {
                        self.delete(&key, g.context, g.values);
                    }
                }
            } else {
                self.get(&key);
            }
            std::thread::sleep(self.spec.pause);
        }
    }
}

/// Starts the load; join the handles (or raise `stop`) to end it.
pub fn start(spec: &LoadSpec, history: &Arc<History>, stop: &Arc<AtomicBool>, first_id: usize) -> Vec<JoinHandle<()>> {
    (0..spec.clients)
        .map(|i| {
            let id = first_id + i;
            let w = Worker {
                id,
                spec: spec.clone(),
                history: history.clone(),
                conn: None,
                at: i,
                seq: 0,
                rng: 0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93),
            };
            let stop = stop.clone();
            std::thread::spawn(move || w.run(&stop))
        })
        .collect()
}
