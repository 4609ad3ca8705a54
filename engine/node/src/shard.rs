//! The per-core runtime: one glommio executor that owns a store, serves its
//! port and runs the operations on the partitions pinned to it.
//!
//! Ownership is strict: only shard `s` touches the store of shard `s`. A
//! request for a key whose partition is pinned elsewhere travels to its owner
//! as a message on a bounded channel mesh and the result comes back the same
//! way; no lock is shared on the request path. Requests and responses use two
//! separate meshes, so a shard blocked sending a response can never hold up
//! the requests that would drain it.

use crate::clock;
use crate::config::NodeConfig;
use crate::store::{Store, StoreError, StoreStats, WriteContext};
use futures::channel::oneshot;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use ringkv_core::keyspace::partition_of;
use ringkv_core::version::Object;
use ringkv_net::proto::{ErrorCode, WireError};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What every shard of a node shares, read-only (plus the shutdown flag).
pub struct NodeContext {
    pub cfg: NodeConfig,
    pub node_id: String,
    pub incarnation: u64,
    pub shards: usize,
    /// The shard each partition is pinned to.
    pub pins: Vec<u16>,
    shutdown: AtomicBool,
}

impl NodeContext {
    pub fn new(cfg: NodeConfig, node_id: String, incarnation: u64) -> NodeContext {
        let shards = cfg.shard_count();
        // Every partition lives on this node (a single-node ring); spread
        // them round-robin so each shard owns an equal share.
        let pins = (0..cfg.partitions).map(|p| (p as usize % shards) as u16).collect();
        NodeContext { cfg, node_id, incarnation, shards, pins, shutdown: AtomicBool::new(false) }
    }

    pub fn shard_of(&self, key: &[u8]) -> usize {
        usize::from(self.pins[partition_of(key, self.cfg.partitions) as usize])
    }

    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Release);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Resolves when shutdown is requested. Polls a flag ten times a second:
    /// cheap, and the signal thread cannot wake an executor directly.
    pub async fn wait_shutdown(&self) {
        while !self.is_shutting_down() {
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An operation run by the shard that owns the key.
#[derive(Debug)]
pub enum Op {
    Get { key: Vec<u8> },
    Write { key: Vec<u8>, value: Option<Vec<u8>>, ctx: WriteContext, durable: bool },
    Stats,
}

#[derive(Debug)]
pub enum OpOutput {
    Object(Option<Object>),
    Stats(StoreStats),
}

pub type OpResult = Result<OpOutput, WireError>;

pub struct MeshRequest {
    from: usize,
    seq: u64,
    op: Op,
}

pub struct MeshResponse {
    seq: u64,
    result: OpResult,
}

pub type RequestMesh = MeshBuilder<MeshRequest, Full>;
pub type ResponseMesh = MeshBuilder<MeshResponse, Full>;

pub const MESH_CHANNEL_SIZE: usize = 1024;

pub fn storage_error(e: StoreError) -> WireError {
    WireError::new(ErrorCode::Storage, e.to_string())
}

pub struct Shard {
    pub id: usize,
    pub node: Arc<NodeContext>,
    pub store: Rc<Store>,
    requests: Senders<MeshRequest>,
    responses: Senders<MeshResponse>,
    pending: RefCell<HashMap<u64, oneshot::Sender<OpResult>>>,
    next_seq: Cell<u64>,
    pub connections: Cell<usize>,
}

/// Removes a forwarded request's pending entry if its caller gives up.
struct PendingGuard<'a> {
    shard: &'a Shard,
    seq: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shard.pending.borrow_mut().remove(&self.seq);
    }
}

/// A shard's ends of the two meshes, joined but not yet wired.
pub struct Joined {
    requests: Senders<MeshRequest>,
    responses: Senders<MeshResponse>,
    request_rx: Receivers<MeshRequest>,
    response_rx: Receivers<MeshResponse>,
}

impl Shard {
    /// Joins both meshes. Every shard of the node must call this before any
    /// of them can return from it.
    pub async fn join_meshes(request_mesh: RequestMesh, response_mesh: ResponseMesh) -> Result<Joined, String> {
        let (requests, request_rx) =
            request_mesh.join().await.map_err(|e| format!("cannot join the shard mesh: {e}"))?;
        let (responses, response_rx) =
            response_mesh.join().await.map_err(|e| format!("cannot join the shard mesh: {e}"))?;
        Ok(Joined { requests, responses, request_rx, response_rx })
    }

    /// The shard, with its receive loops running.
    pub fn new(id: usize, node: Arc<NodeContext>, store: Rc<Store>, joined: Joined) -> Rc<Shard> {
        let Joined { requests, responses, mut request_rx, mut response_rx } = joined;
        // Mesh peer ids follow executor creation order, which is shard order.
        assert_eq!(requests.peer_id(), id, "shard executors were created out of order");
        assert_eq!(responses.peer_id(), id, "shard executors were created out of order");
        let shard = Rc::new(Shard {
            id,
            node,
            store,
            requests,
            responses,
            pending: RefCell::new(HashMap::new()),
            next_seq: Cell::new(1),
            connections: Cell::new(0),
        });
        for (_, rx) in request_rx.streams() {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                while let Some(m) = rx.recv().await {
                    let shard = shard.clone();
                    glommio::spawn_local(async move {
                        let result = shard.run_local(m.op).await;
                        // The origin may be gone (shutdown); nothing to do then.
                        let _ = shard.responses.send_to(m.from, MeshResponse { seq: m.seq, result }).await;
                    })
                    .detach();
                }
            })
            .detach();
        }
        for (_, rx) in response_rx.streams() {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                while let Some(m) = rx.recv().await {
                    if let Some(tx) = shard.pending.borrow_mut().remove(&m.seq) {
                        let _ = tx.send(m.result);
                    }
                }
            })
            .detach();
        }
        shard
    }

    /// Runs `op` on the shard that owns `key`.
    pub async fn on_owner(&self, key: &[u8], op: Op) -> OpResult {
        self.on_shard(self.node.shard_of(key), op).await
    }

    pub async fn on_shard(&self, target: usize, op: Op) -> OpResult {
        if target == self.id {
            return self.run_local(op).await;
        }
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(seq, tx);
        let _guard = PendingGuard { shard: self, seq };
        if self.requests.send_to(target, MeshRequest { from: self.id, seq, op }).await.is_err() {
            return Err(WireError::new(ErrorCode::Internal, format!("shard {target} is not running")));
        }
        rx.await
            .unwrap_or_else(|_| Err(WireError::new(ErrorCode::Internal, format!("shard {target} dropped a request"))))
    }

    async fn run_local(&self, op: Op) -> OpResult {
        match op {
            Op::Get { key } => self.store.get(&key).await.map(OpOutput::Object).map_err(storage_error),
            Op::Write { key, value, ctx, durable } => self
                .store
                .write(&key, value, &ctx, durable, clock::now_ms())
                .await
                .map(|o| OpOutput::Object(Some(o)))
                .map_err(storage_error),
            Op::Stats => Ok(OpOutput::Stats(self.store.stats())),
        }
    }

    /// Every shard's store statistics, in shard order.
    pub async fn all_stats(&self) -> Result<Vec<StoreStats>, WireError> {
        let mut out = Vec::with_capacity(self.node.shards);
        for s in 0..self.node.shards {
            match self.on_shard(s, Op::Stats).await? {
                OpOutput::Stats(st) => out.push(st),
                OpOutput::Object(_) => unreachable!("stats op returns stats"),
            }
        }
        Ok(out)
    }
}
