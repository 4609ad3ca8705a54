//! Starting and stopping a node: data directory, shard executors, readiness.
//!
//! Start-up either brings every shard up (store recovered, port bound) or
//! fails with one line saying why, after stopping whatever had started. A
//! running node stops cleanly on [`Running::shut_down`]: shards stop
//! accepting, flush their logs and record a clean stop.

use crate::cluster::{self, ClusterAgent};
use crate::config::NodeConfig;
use crate::datadir::{self, DataDir};
use crate::shard::{NodeContext, RequestMesh, ResponseMesh, Shard, MESH_CHANNEL_SIZE};
use crate::store::{Store, StoreConfig};
use crate::view::ClusterView;
use crate::{clock, conn};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use ringkv_core::membership::{Gossip, GossipConfig, Member};
use ringkv_net::proto::Role;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How long all shards together may take to recover and bind.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// Messages from shard threads to the thread that started them.
enum ShardEvent {
    Ready,
    Failed(usize, String),
    Exited(usize),
}

/// Tells the starter a shard's thread ended, however it ended (panics too).
struct ExitNotice {
    shard: usize,
    tx: mpsc::Sender<ShardEvent>,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let _ = self.tx.send(ShardEvent::Exited(self.shard));
    }
}

pub struct Running {
    node: Arc<NodeContext>,
    events: mpsc::Receiver<ShardEvent>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    _dir: DataDir,
}

impl Running {
    pub fn node_id(&self) -> &str {
        &self.node.node_id
    }

    pub fn shards(&self) -> usize {
        self.node.shards
    }

    pub fn listen(&self) -> SocketAddr {
        self.node.cfg.listen
    }

    /// A handle that can stop the node from another thread (signal handler).
    pub fn stopper(&self) -> Arc<NodeContext> {
        self.node.clone()
    }

    /// Blocks until every shard has stopped. A shard that stops on its own
    /// (it failed) stops the others; the error says which and why.
    pub fn wait(self) -> Result<(), String> {
        let mut failure = None;
        let mut exited = 0;
        while exited < self.threads.len() {
            match self.events.recv() {
                Ok(ShardEvent::Exited(s)) => {
                    exited += 1;
                    if !self.node.is_shutting_down() {
                        failure.get_or_insert(format!("shard {s} stopped unexpectedly"));
                        self.node.shut_down();
                    }
                }
                Ok(ShardEvent::Failed(s, e)) => {
                    failure.get_or_insert(format!("shard {s}: {e}"));
                    self.node.shut_down();
                }
                Ok(ShardEvent::Ready) => {}
                Err(_) => break,
            }
        }
        for t in self.threads {
            if t.join().is_err() {
                failure.get_or_insert("a shard thread panicked".into());
            }
        }
        if let Some(reason) = self.node.failure() {
            return Err(reason);
        }
        failure.map_or(Ok(()), Err)
    }
}

/// Starts a node and returns once every shard serves its port.
pub fn start(cfg: NodeConfig) -> Result<Running, String> {
    cfg.validate()?;
    // Before anything else is touched, so a bad file costs one line.
    let tls = crate::tls::NodeTls::load(&cfg)?;
    for warning in crate::preflight::check_host(cfg.shard_count())? {
        tracing::warn!("{warning}");
    }
    let dir = datadir::open(&cfg)?;
    let shards = cfg.shard_count();
    let node = Arc::new(NodeContext::new(cfg.clone(), dir.meta.node_id.clone(), dir.meta.incarnation(), tls));
    if let Some(addr) = cfg.metrics {
        crate::metrics::serve(addr, node.metrics.clone())?;
    }
    let (gossip, view) = initial_membership(&cfg, &dir);
    let mut gossip = Some(gossip);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let request_mesh: RequestMesh = MeshBuilder::full(shards, MESH_CHANNEL_SIZE);
    let response_mesh: ResponseMesh = MeshBuilder::full(shards, MESH_CHANNEL_SIZE);
    let (tx, events) = mpsc::channel();
    let mut threads = Vec::with_capacity(shards);
    for i in 0..shards {
        let placement = if cfg.pin_cpus { Placement::Fixed((cfg.cpu_offset + i) % cores) } else { Placement::Unbound };
        let (shard_node, req, resp, tx) = (node.clone(), request_mesh.clone(), response_mesh.clone(), tx.clone());
        let (view, gossip, root) = (view.clone(), if i == 0 { gossip.take() } else { None }, dir.root.clone());
        let store_cfg = StoreConfig {
            dir: dir.shard_dir(i),
            shard: i as u16,
            incarnation: dir.meta.incarnation(),
            partitions: cfg.partitions,
            segment_bytes: cfg.segment_mb << 20,
            cache_bytes: cfg.cache_mb << 20,
            max_unflushed_bytes: 32 << 20,
            hash_seed: rand::random(),
            max_hints: cfg.max_hints_per_shard,
        };
        let spawned =
            LocalExecutorBuilder::new(placement).name(&format!("ringkv-shard-{i}")).spawn(move || async move {
                let _notice = ExitNotice { shard: i, tx: tx.clone() };
                let boot = Boot { view, gossip, root };
                if let Err(e) = run_shard(i, shard_node, store_cfg, req, resp, boot, &tx).await {
                    let _ = tx.send(ShardEvent::Failed(i, e));
                }
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                node.shut_down();
                return Err(format!("cannot start shard {i}: {e}"));
            }
        }
    }
    drop(tx);
    let running = Running { node, events, threads, _dir: dir };
    let mut ready = 0;
    while ready < shards {
        match running.events.recv_timeout(START_TIMEOUT) {
            Ok(ShardEvent::Ready) => ready += 1,
            Ok(ShardEvent::Failed(s, e)) => {
                running.node.shut_down();
                let _ = running.wait();
                return Err(if shards == 1 { e } else { format!("shard {s}: {e}") });
            }
            Ok(ShardEvent::Exited(s)) => {
                running.node.shut_down();
                let _ = running.wait();
                return Err(format!("shard {s} stopped during start-up"));
            }
            Err(_) => {
                running.node.shut_down();
                return Err(format!("shards did not start within {START_TIMEOUT:?}"));
            }
        }
    }
    announce_security(&cfg);
    Ok(running)
}

/// Says at start-up who may connect (validation already refused a
/// non-loopback address without credentials), so an operator reading the
/// log knows whether strangers on this host are trusted.
fn announce_security(cfg: &NodeConfig) {
    let ip = cfg.listen.ip();
    let who = match (cfg.authenticates(Role::Peer), cfg.authenticates(Role::Client)) {
        (true, true) => "peers prove the cluster secret; clients authenticate",
        (true, false) => "peers prove the cluster secret; clients are not authenticated (loopback only)",
        _ => "no credentials configured: anyone who can reach this loopback address is trusted",
    };
    let transport = if cfg.tls() {
        if cfg.tls_require_client_cert {
            "TLS only; clients and peers present certificates signed by tls_ca"
        } else {
            "TLS only; peers present certificates signed by tls_ca"
        }
    } else {
        "plain TCP (no TLS)"
    };
    tracing::info!(%ip, transport, "{who}");
}

/// How long between gossip rounds.
const GOSSIP_INTERVAL: Duration = Duration::from_secs(1);

/// This node's membership at start-up: its own record (a new generation),
/// what it saved before stopping, and a first tick, so that a node without
/// seeds has its ring before it serves a single request.
fn initial_membership(cfg: &NodeConfig, dir: &DataDir) -> (Gossip, Arc<ClusterView>) {
    let id = dir.meta.node_id.clone();
    let persisted = cluster::load_state(&dir.root);
    let previous = persisted.as_ref().and_then(|s| s.members.get(&id));
    let now = clock::now_ms();
    // Ring changes made while this node ran (`ringkv weight`, `leave`) are
    // in its saved record and survive a restart; the configured weight is
    // for a node's first start.
    let weight = match previous {
        Some(m) if m.weight != cfg.weight => {
            tracing::warn!(
                configured = cfg.weight,
                kept = m.weight,
                "keeping the weight the cluster gave this node (change it with `ringkv weight`)"
            );
            m.weight
        }
        _ => cfg.weight,
    };
    let generation = previous.map_or(now, |m| now.max(m.generation + 1));
    let me = Member {
        weight,
        leaving: previous.is_some_and(|m| m.leaving),
        pins: previous.map(|m| m.pins.clone()).unwrap_or_default(),
        ..Member::new(&id, &cfg.listen.to_string(), cfg.shard_count() as u16, generation)
    };
    let gcfg = GossipConfig { replicas: cfg.replicas, ..GossipConfig::default() };
    let mut g = Gossip::new(me, &cfg.cluster, cfg.partitions, cfg.seeds.clone(), persisted, gcfg, now);
    g.tick(now, rand::random());
    let view =
        Arc::new(ClusterView::new(&id, cfg.shard_count() as u16, cfg.replicas, g.state(), |n| g.is_alive(n, now)));
    (g, view)
}

/// What a shard starts from besides its store: the first view, and on the
/// gossip shard the membership state machine.
struct Boot {
    view: Arc<ClusterView>,
    gossip: Option<Gossip>,
    root: std::path::PathBuf,
}

async fn run_shard(
    id: usize,
    node: Arc<NodeContext>,
    store_cfg: StoreConfig,
    request_mesh: RequestMesh,
    response_mesh: ResponseMesh,
    boot: Boot,
    events: &mpsc::Sender<ShardEvent>,
) -> Result<(), String> {
    // Join the meshes first: every shard must join before any can proceed,
    // so a shard that fails later must not leave the others waiting here.
    let (req_tx, resp_tx) = (request_mesh, response_mesh);
    let store_dir = store_cfg.dir.display().to_string();
    let store_fut = Store::open(store_cfg);
    let joined = Shard::join_meshes(req_tx, resp_tx).await?;
    let store = store_fut.await.map_err(|e| format!("store {store_dir}: {e}"))?;
    let shard = Shard::new(id, node.clone(), store, joined, boot.view);
    if let Some(gossip) = boot.gossip {
        let agent = ClusterAgent::new(shard.clone(), gossip, &boot.root, GOSSIP_INTERVAL);
        *shard.agent.borrow_mut() = Some(agent.clone());
        glommio::spawn_local(agent.run()).detach();
    }
    let background = glommio::executor().create_task_queue(
        glommio::Shares::Static(20),
        glommio::Latency::NotImportant,
        "background",
    );
    let cfg = &node.cfg;
    let compaction = crate::store::compaction::CompactionConfig {
        interval: Duration::from_secs(cfg.compaction_interval_s),
        garbage_ratio: cfg.compaction_garbage_ratio,
        bytes_per_sec: cfg.compaction_mb_per_s << 20,
    };
    // Hinted handoff, ownership handoff and anti-entropy are machines of
    // the driver; their store work runs in the background queue.
    shard.driver.set_background_queue(background);
    glommio::spawn_local(shard.driver.clone().run_timers(shard.clone())).detach();
    glommio::spawn_local_into(crate::store::compaction::run(shard.store.clone(), compaction), background)
        .map_err(|e| format!("cannot start the compaction task: {e}"))?
        .detach();
    let addr = node.cfg.shard_addr(id);
    let listener = listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let _ = events.send(ShardEvent::Ready);
    let acceptor = shard.clone();
    glommio::spawn_local(async move {
        let limit = acceptor.node.cfg.max_connections_per_shard;
        let node_limit = acceptor.node.cfg.max_connections;
        loop {
            let stream = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(shard = acceptor.id, error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if acceptor.connections.get() >= limit {
                glommio::spawn_local(conn::refuse(stream, format!("shard has {limit} connections already"))).detach();
                continue;
            }
            let node_conns = &acceptor.node.connections;
            if node_conns.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= node_limit {
                node_conns.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                glommio::spawn_local(conn::refuse(stream, format!("node has {node_limit} connections already")))
                    .detach();
                continue;
            }
            acceptor.connections.set(acceptor.connections.get() + 1);
            acceptor.metrics.connection_opened();
            let s = acceptor.clone();
            let _ = stream.set_nodelay(true);
            glommio::spawn_local(async move {
                match &s.node.tls {
                    None => conn::serve(s.clone(), stream, true).await,
                    Some(tls) => {
                        let timeout = Duration::from_millis(s.node.cfg.handshake_timeout_ms);
                        if let Some(accepted) = tls.accept(stream, timeout).await {
                            conn::serve(s.clone(), accepted.stream, accepted.certified).await;
                        }
                    }
                }
                s.connections.set(s.connections.get() - 1);
                s.metrics.connection_closed();
                s.node.connections.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            })
            .detach();
        }
    })
    .detach();
    node.wait_shutdown().await;
    shard.store.close().await.map_err(|e| format!("flushing on shutdown: {e}"))
}

/// Binds a listening socket without SO_REUSEPORT (which glommio's own bind
/// sets): a second node on the same address must fail, not share the port.
fn listen(addr: SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    // SAFETY: the descriptor comes straight from a socket we own and give up.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(socket.into_raw_fd()) })
}
