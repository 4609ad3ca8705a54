//! A blocking client for a whole cluster, routing by topology.
//!
//! It bootstraps from any node, learns the ring, members and shard pins, and
//! sends each request straight to the owning shard of the key's first
//! replica, so the node neither forwards it to another node nor hands it to
//! another shard. Reads that fail to get an answer are retried on the next
//! replica; writes are retried only when they could not be sent at all (a
//! write that was sent and timed out may have been applied). Every response
//! carries the node's ring version; a newer one than ours triggers a
//! topology refresh.

use crate::client::{Client, ClientConfig, ClientError, WriteOptions};
use crate::proto::{GetResult, Level, Reply, Request};
use crate::topology::Topology;
use std::collections::HashMap;
use std::net::SocketAddr;

pub struct ClusterClient {
    cfg: ClientConfig,
    seeds: Vec<String>,
    topology: Topology,
    conns: HashMap<SocketAddr, Client>,
}

impl ClusterClient {
    /// Connects through the first seed (IP:PORT) that answers.
    pub fn connect(seeds: &[&str], cfg: ClientConfig) -> Result<ClusterClient, ClientError> {
        let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
        let topology = fetch(&seeds, &cfg)?;
        Ok(ClusterClient { cfg, seeds, topology, conns: HashMap::new() })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Fetches the topology again, from any known member or seed.
    pub fn refresh(&mut self) -> Result<(), ClientError> {
        let mut sources: Vec<String> = self.topology.members().iter().map(ToString::to_string).collect();
        sources.extend(self.seeds.iter().cloned());
        self.topology = fetch(&sources, &self.cfg)?;
        Ok(())
    }

    fn conn(&mut self, addr: SocketAddr) -> Result<&mut Client, ClientError> {
        if !self.conns.contains_key(&addr) {
            let c = Client::connect(addr, &self.cfg)?;
            self.conns.insert(addr, c);
        }
        Ok(self.conns.get_mut(&addr).expect("inserted above"))
    }

    /// Sends `req` for `key` along its replicas until one answers.
    fn call(&mut self, key: &[u8], req: Request, retry_after_send: bool) -> Result<Reply, ClientError> {
        let route = self.topology.route(key);
        let mut last = None;
        for addr in route {
            let conn = match self.conn(addr) {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match conn.call(req.clone()) {
                Ok(reply) => {
                    let seen = conn.ring_version();
                    if seen > self.topology.version() {
                        // A node knows a newer ring: route by it from now on.
                        let _ = self.refresh();
                    }
                    return Ok(reply);
                }
                Err(ClientError::Server(e)) => return Err(ClientError::Server(e)),
                Err(e) => {
                    self.conns.remove(&addr);
                    if !retry_after_send {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Io(std::io::Error::other("the key has no reachable replica"))))
    }

    pub fn get(&mut self, key: &[u8], r: Level) -> Result<GetResult, ClientError> {
        match self.call(key, Request::Get { key: key.to_vec(), r }, true)? {
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
        match self.call(key, req, false)? {
            Reply::Put { context } => Ok(context),
            other => Err(ClientError::UnexpectedReply { request: "put", reply: Box::new(other) }),
        }
    }

    pub fn delete(&mut self, key: &[u8], opts: &WriteOptions) -> Result<(), ClientError> {
        let req =
            Request::Delete { key: key.to_vec(), context: opts.context.clone(), w: opts.w, durable: opts.durable };
        match self.call(key, req, false)? {
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
