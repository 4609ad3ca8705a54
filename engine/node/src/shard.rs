//! The per-core runtime: one glommio executor that owns a store, serves its
//! port and runs the operations on the partitions pinned to it.
//!
//! Ownership is strict: only shard `s` touches the store of shard `s`. A
//! request for a partition pinned elsewhere travels to its owner as a
//! message on a bounded channel mesh and the result comes back the same way;
//! no lock is shared on the request path. At most [`MESH_IN_FLIGHT`] such
//! operations run on a shard at once. Requests and responses use two
//! separate meshes, so a shard blocked sending a response can never hold up
//! the requests that would drain it.
//!
//! Each shard keeps its own copy of the current [`ClusterView`] (installed by
//! the gossip shard) and its own connections to other nodes ([`PeerPool`]).

use crate::cluster::ClusterAgent;
use crate::config::NodeConfig;
use crate::peer::PeerPool;
use crate::store::{Store, StoreError, StoreStats};
use crate::view::ClusterView;
use futures::channel::oneshot;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use ringkv_core::keyspace::partition_of;
use ringkv_core::version::Object;
use ringkv_net::proto::{ErrorCode, PartitionRoot, RepairReport, Reply, WireError};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What every shard of a node shares, read-only (plus shutdown and failure).
pub struct NodeContext {
    pub cfg: NodeConfig,
    pub node_id: String,
    pub incarnation: u64,
    pub shards: usize,
    /// Who may connect, and as what.
    pub auth: crate::auth::Authenticator,
    /// TLS on client ports and peer connections; `None`: plain TCP.
    pub tls: Option<crate::tls::NodeTls>,
    /// Connections open over all shards (bounded by `max_connections`).
    pub connections: AtomicUsize,
    /// What the metrics endpoint serves.
    pub metrics: Arc<crate::metrics::NodeMetrics>,
    /// Streams the node's shards may still start (`stream_concurrency`).
    pub stream_slots: AtomicUsize,
    shutdown: AtomicBool,
    fatal: Mutex<Option<String>>,
}

impl NodeContext {
    pub fn new(cfg: NodeConfig, node_id: String, incarnation: u64, tls: Option<crate::tls::NodeTls>) -> NodeContext {
        let shards = cfg.shard_count();
        let slots = cfg.stream_concurrency;
        let auth = crate::auth::Authenticator::new(&cfg);
        NodeContext {
            cfg,
            node_id,
            incarnation,
            shards,
            auth,
            tls,
            connections: AtomicUsize::new(0),
            metrics: Arc::new(crate::metrics::NodeMetrics::new(shards)),
            stream_slots: AtomicUsize::new(slots),
            shutdown: AtomicBool::new(false),
            fatal: Mutex::new(None),
        }
    }

    pub fn partition(&self, key: &[u8]) -> u32 {
        partition_of(key, self.cfg.partitions)
    }

    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Release);
    }

    /// Stops the node because it cannot go on; `reason` becomes its exit message.
    pub fn fail(&self, reason: String) {
        self.fatal.lock().expect("fatal lock").get_or_insert(reason);
        self.shut_down();
    }

    pub fn failure(&self) -> Option<String> {
        self.fatal.lock().expect("fatal lock").clone()
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

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.request_timeout_ms)
    }
}

/// An operation run by the shard that owns the partition involved.
pub enum Op {
    /// This replica's object for `key`.
    Get {
        key: Vec<u8>,
    },
    /// Merge a version from another replica.
    Merge {
        key: Vec<u8>,
        object: Object,
        durable: bool,
    },
    /// Many merges of one partition (handoff), then one sync.
    MergeBatch {
        entries: Vec<(Vec<u8>, Object)>,
    },
    /// Hold `object` for `target` (sloppy quorum).
    Hint {
        target: String,
        key: Vec<u8>,
        object: Object,
        durable: bool,
    },
    /// Merkle root and segments (no segments) or leaves of `segments`.
    Merkle {
        partition: u32,
        segments: Vec<u32>,
    },
    Keys {
        partition: u32,
        leaves: Vec<u32>,
    },
    GetBatch {
        keys: Vec<Vec<u8>>,
    },
    Repair {
        partition: Option<u32>,
    },
    Roots,
    /// Drop `key` for good if this replica still is exactly `object`.
    Purge {
        key: Vec<u8>,
        object: Object,
    },
    /// Coordinate a client request (this shard holds the key's partition),
    /// answering within the timeout.
    Coordinate(crate::driver::ClientOp, Duration),
    /// Gossip received by another shard, for the gossip shard.
    Gossip(Vec<u8>),
    /// A ring-change request, for the gossip shard.
    RingChange(ringkv_net::proto::RingAction, Option<ringkv_net::proto::RingChange>),
    InstallView(Arc<ClusterView>),
    Stats,
    /// The gossip agent's load figures and staged change (gossip shard).
    AgentFigures,
}

/// One shard's figures: its store's and what it coordinated.
#[derive(Debug, Clone)]
pub struct ShardSnapshot {
    pub store: StoreStats,
    pub load: crate::load::ShardLoad,
    pub stream: ringkv_core::handoff::Progress,
    pub hinted: ringkv_core::hints::HintStats,
    /// Members this shard is delivering hints to now.
    pub delivering: usize,
    pub repaired: ringkv_core::antientropy::RepairStats,
    /// Partitions whose data here belongs elsewhere.
    pub holding: std::collections::BTreeSet<u32>,
    pub streamed: ringkv_core::handoff::HandoffStats,
}

pub enum OpOutput {
    Object(Option<Object>),
    Stats(Box<ShardSnapshot>),
    /// The load figures, and the staged ring change as JSON ("" if none).
    Figures(Box<(crate::load::Figures, String)>),
    Reply(Reply),
    Repair(RepairReport),
    Roots(Vec<PartitionRoot>),
    Done,
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
/// Operations from other shards one shard runs at once.
pub const MESH_IN_FLIGHT: usize = 4096;

pub fn storage_error(e: StoreError) -> WireError {
    WireError::new(ErrorCode::Storage, e.to_string())
}

pub fn internal(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::Internal, msg)
}

pub struct Shard {
    pub id: usize,
    pub node: Arc<NodeContext>,
    pub store: Rc<Store>,
    pub peers: PeerPool,
    requests: Senders<MeshRequest>,
    responses: Senders<MeshResponse>,
    pending: RefCell<HashMap<u64, oneshot::Sender<OpResult>>>,
    next_seq: Cell<u64>,
    pub connections: Cell<usize>,
    view: RefCell<Arc<ClusterView>>,
    /// The gossip agent; set on the gossip shard (shard 0) only.
    pub agent: RefCell<Option<Rc<ClusterAgent>>>,
    /// The shard's protocol machines and the shell that runs them.
    pub driver: Rc<crate::driver::Driver>,
    /// This shard's request-path counters (written here only).
    pub metrics: Arc<crate::metrics::ShardMetrics>,
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
    pub fn new(
        id: usize,
        node: Arc<NodeContext>,
        store: Rc<Store>,
        joined: Joined,
        view: Arc<ClusterView>,
    ) -> Rc<Shard> {
        let Joined { requests, responses, mut request_rx, mut response_rx } = joined;
        // Mesh peer ids follow executor creation order, which is shard order.
        assert_eq!(requests.peer_id(), id, "shard executors were created out of order");
        assert_eq!(responses.peer_id(), id, "shard executors were created out of order");
        let peers = PeerPool::new(
            node.cfg.listen.ip(),
            &node.node_id,
            &node.cfg.cluster,
            node.auth.cluster_secret(),
            node.tls.clone(),
        );
        let shard = Rc::new(Shard {
            id,
            store,
            peers,
            requests,
            responses,
            pending: RefCell::new(HashMap::new()),
            next_seq: Cell::new(1),
            connections: Cell::new(0),
            view: RefCell::new(view),
            agent: RefCell::new(None),
            driver: Rc::new(crate::driver::Driver::new(&node.cfg, id as u16, node.metrics.shard(id))),
            metrics: node.metrics.shard(id),
            node,
        });
        // At most MESH_IN_FLIGHT operations from other shards run at once;
        // beyond, this shard stops taking them off the (bounded) meshes and
        // their senders wait.
        let permits = Rc::new(glommio::sync::Semaphore::new(MESH_IN_FLIGHT as u64));
        for (_, rx) in request_rx.streams() {
            let (shard, permits) = (shard.clone(), permits.clone());
            glommio::spawn_local(async move {
                while let Some(m) = rx.recv().await {
                    let Ok(permit) = permits.acquire_static_permit(1).await else { return };
                    let shard = shard.clone();
                    glommio::spawn_local(async move {
                        let result = shard.run_local(m.op).await;
                        // The origin may be gone (shutdown); nothing to do then.
                        let _ = shard.responses.send_to(m.from, MeshResponse { seq: m.seq, result }).await;
                        drop(permit);
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

    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    pub fn me(&self) -> &str {
        &self.node.node_id
    }

    /// The shard of this node that holds `key`'s partition.
    pub fn local_shard_of(&self, p: u32) -> usize {
        self.view().local_shard(p).min(self.node.shards - 1)
    }

    /// Roots of the partitions this node replicates that live on this shard.
    fn roots(&self) -> Vec<PartitionRoot> {
        let view = self.view();
        (0..self.node.cfg.partitions)
            .filter(|&p| view.is_primary(p, self.me()) && view.local_shard(p) == self.id)
            .map(|p| {
                let counts = self.store.partition_counts(p);
                PartitionRoot {
                    partition: p,
                    root: self.store.merkle(p).root(),
                    keys: counts.live + counts.deleted,
                    last_sync_ms: self.driver.last_sync_ms(p),
                }
            })
            .collect()
    }

    /// Runs `op` on shard `target` of this node.
    pub async fn on_shard(self: &Rc<Self>, target: usize, op: Op) -> OpResult {
        if target == self.id {
            return self.run_local(op).await;
        }
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(seq, tx);
        let _guard = PendingGuard { shard: self, seq };
        if self.requests.send_to(target, MeshRequest { from: self.id, seq, op }).await.is_err() {
            return Err(internal(format!("shard {target} is not running")));
        }
        rx.await.unwrap_or_else(|_| Err(internal(format!("shard {target} dropped a request"))))
    }

    /// Installs `view` on every shard of the node.
    pub async fn broadcast_view(self: &Rc<Self>, view: Arc<ClusterView>) {
        for s in 0..self.node.shards {
            let _ = self.on_shard(s, Op::InstallView(view.clone())).await;
        }
    }

    async fn run_local(self: &Rc<Self>, op: Op) -> OpResult {
        match op {
            Op::Get { key } => self.store.get(&key).await.map(OpOutput::Object).map_err(storage_error),
            Op::Purge { key, object } => self
                .store
                .purge(&key, &object)
                .await
                .map(|purged| OpOutput::Reply(Reply::Purge { purged }))
                .map_err(storage_error),
            Op::Merge { key, object, durable } => {
                self.store.merge(&key, &object, durable).await.map(|_| OpOutput::Done).map_err(storage_error)
            }
            Op::MergeBatch { entries } => {
                for (key, object) in &entries {
                    self.store.merge(key, object, false).await.map_err(storage_error)?;
                }
                self.store.sync().await.map_err(storage_error)?;
                Ok(OpOutput::Done)
            }
            Op::Hint { target, key, object, durable } => self
                .store
                .put_hint(&target, &key, &object, durable)
                .await
                .map(|()| OpOutput::Done)
                .map_err(storage_error),
            Op::Merkle { partition, segments } => {
                let tree = self.store.merkle(partition);
                let reply = if segments.is_empty() {
                    Reply::Merkle { root: tree.root(), segments: tree.segments(), leaves: vec![] }
                } else {
                    if segments.iter().any(|&s| s as usize >= ringkv_core::merkle::SEGMENTS) {
                        return Err(WireError::new(ErrorCode::BadRequest, "no such merkle segment"));
                    }
                    let leaves = crate::driver::segment_leaves(&tree, &segments);
                    Reply::Merkle { root: tree.root(), segments: vec![], leaves }
                };
                Ok(OpOutput::Reply(reply))
            }
            Op::Keys { partition, leaves } => {
                let leaves: Vec<usize> =
                    leaves.into_iter().map(|l| l as usize).filter(|&l| l < ringkv_core::merkle::LEAVES).collect();
                Ok(OpOutput::Reply(Reply::Keys { keys: self.store.keys_in_leaves(partition, &leaves) }))
            }
            Op::GetBatch { keys } => {
                let mut entries = Vec::with_capacity(keys.len());
                for key in keys {
                    if let Some(o) = self.store.get(&key).await.map_err(storage_error)? {
                        entries.push((key, o.to_bytes()));
                    }
                }
                Ok(OpOutput::Reply(Reply::ReadBatch { entries }))
            }
            Op::Repair { partition } => self.driver.clone().repair(self, partition).await.map(OpOutput::Repair),
            Op::Roots => Ok(OpOutput::Roots(self.roots())),
            Op::Coordinate(op, timeout) => crate::driver::coordinate_local(self, op, timeout).await,
            Op::Gossip(state) => {
                let agent = self.agent.borrow().clone();
                match agent {
                    Some(a) => a.receive(&state).map(|s| OpOutput::Reply(Reply::Gossip { state: s })),
                    None => Err(internal("gossip reached a shard without the gossip agent")),
                }
            }
            Op::RingChange(action, change) => {
                let agent = self.agent.borrow().clone();
                match agent {
                    Some(a) => {
                        a.ring_change(action, change).await.map(|plan| OpOutput::Reply(Reply::RingChange { plan }))
                    }
                    None => Err(internal("a ring change reached a shard without the gossip agent")),
                }
            }
            Op::AgentFigures => {
                let agent = self.agent.borrow().clone();
                let agent = agent.ok_or_else(|| internal("figures asked of a shard without the gossip agent"))?;
                let staged = agent.ring_change(ringkv_net::proto::RingAction::Show, None).await?;
                Ok(OpOutput::Figures(Box::new((agent.figures(), staged))))
            }
            Op::InstallView(v) => {
                *self.view.borrow_mut() = v;
                Ok(OpOutput::Done)
            }
            Op::Stats => Ok(OpOutput::Stats(Box::new(ShardSnapshot {
                store: self.store.stats(),
                load: self.driver.load(),
                stream: self.driver.stream_progress(),
                holding: self.driver.holding(&self.view().topo),
                streamed: self.driver.stream_stats(),
                hinted: self.driver.hint_stats(),
                delivering: self.driver.hints_delivering(),
                repaired: self.driver.repair_stats(),
            }))),
        }
    }

    /// Every shard's store statistics, in shard order.
    pub async fn all_stats(self: &Rc<Self>) -> Result<Vec<ShardSnapshot>, WireError> {
        let mut out = Vec::with_capacity(self.node.shards);
        for s in 0..self.node.shards {
            match self.on_shard(s, Op::Stats).await? {
                OpOutput::Stats(st) => out.push(*st),
                _ => return Err(internal("stats op returned something else")),
            }
        }
        Ok(out)
    }
}
