//! The gossip agent: drives `ringkv_core::membership::Gossip` on shard 0.
//!
//! Once per interval it ticks the state machine (heartbeat, maybe a new ring
//! if this node is the claimant), exchanges digests and what differs with
//! the peer the machine names (`ringkv_core::exchange`), and installs a fresh [`ClusterView`] on every shard.
//! Changes to membership, ring or pins are persisted to `cluster.state`, so
//! a restarted node knows the ring before it hears from anyone.
//!
//! A node that seeds into a cluster of another name or partition count
//! refuses to join and stops with the reason; the cluster never merges its
//! state.
//!
//! Ring changes (leave, remove, weight) are staged here, planned by
//! `ringkv_core::plan`, and committed: the agent of the node concerned makes
//! the change in its own record (a leave or a weight) or, for a dead node,
//! in the dead node's (a remove). A staged change is kept in this node's
//! `ring.staged` (written before the stage is acknowledged, removed once it
//! is committed or cancelled), so a restart of the node it was staged on
//! keeps it; a committed one is in the gossiped, persisted state. A node
//! that left stops once it holds nothing: every partition handed over, every
//! hint delivered, and its empty figures gossiped.

use crate::clock;
use crate::shard::Shard;
use crate::view::ClusterView;
use ringkv_core::exchange::Message;
use ringkv_core::membership::{ClusterState, Gossip, Load};
use ringkv_core::plan::{self, Change};
use ringkv_net::proto::{ErrorCode, Reply, Request, RingAction, WireError};
use std::cell::{Cell, RefCell};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

pub const STATE_FILE: &str = "cluster.state";
/// The change staged on this node, as JSON, while one is.
pub const STAGED_FILE: &str = "ring.staged";

/// Reads the change staged here before a restart, if any. A damaged file
/// is ignored with a warning: only a staged change is lost, which the
/// operator stages again (nothing of the cluster changed yet).
fn load_staged(dir: &Path) -> Option<Change> {
    let path = dir.join(STAGED_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(c) => {
            tracing::info!(change = %c, "a ring change staged before the restart is still staged");
            Some(c)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a damaged staged ring change");
            None
        }
    }
}

/// Reads the state a node saved before it stopped, if any.
pub fn load_state(dir: &Path) -> Option<ClusterState> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match ClusterState::decode(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a damaged cluster state; will relearn it");
            None
        }
    }
}

/// What of the state is worth persisting: everything but heartbeats and load.
fn fingerprint(s: &ClusterState) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.ring.hash(&mut h);
    for m in s.members.values() {
        (&m.id, &m.addr, m.generation, m.leaving, m.weight, m.shards, &m.pins).hash(&mut h);
    }
    h.finish()
}

pub struct ClusterAgent {
    shard: Rc<Shard>,
    gossip: RefCell<Gossip>,
    state_path: PathBuf,
    staged_path: PathBuf,
    interval: Duration,
    seeds: Vec<SocketAddr>,
    persisted: Cell<u64>,
    persisting: Cell<bool>,
    ticks: Cell<u64>,
    meter: RefCell<crate::load::LoadMeter>,
    /// The ring change staged on this node, if any.
    staged: RefCell<Option<Change>>,
    /// Consecutive load refreshes that found this leaving node empty.
    drained: Cell<u32>,
    /// What the last look saw, to log what changed since (crate::events).
    seen: RefCell<crate::events::Seen>,
}

/// Refreshes in a row a left node must find itself empty before it stops,
/// so its peers have heard that it streams nothing more.
const DRAINED_REFRESHES: u32 = 2;

impl ClusterAgent {
    pub fn new(shard: Rc<Shard>, gossip: Gossip, data_dir: &Path, interval: Duration) -> Rc<ClusterAgent> {
        let seeds = shard.node.cfg.seeds.iter().filter_map(|s| s.parse().ok()).collect();
        let persisted = fingerprint(gossip.state());
        Rc::new(ClusterAgent {
            shard,
            gossip: RefCell::new(gossip),
            state_path: data_dir.join(STATE_FILE),
            staged_path: data_dir.join(STAGED_FILE),
            interval,
            seeds,
            persisted: Cell::new(persisted ^ 1),
            persisting: Cell::new(false),
            ticks: Cell::new(0),
            meter: RefCell::new(crate::load::LoadMeter::default()),
            staged: RefCell::new(load_staged(data_dir)),
            drained: Cell::new(0),
            seen: RefCell::new(crate::events::Seen::default()),
        })
    }

    /// The view of the current state, as shards route by it.
    pub fn view(&self) -> Arc<ClusterView> {
        let g = self.gossip.borrow();
        let now = clock::now_ms();
        let cfg = &self.shard.node.cfg;
        Arc::new(ClusterView::new(g.me(), self.shard.node.shards as u16, cfg.replicas, g.state(), |id| {
            g.is_alive(id, now)
        }))
    }

    /// Gossip from a peer: a digest to answer, the initiator's last message
    /// of an exchange (answered with nothing), or, from a node of an older
    /// build, a whole state to merge and answer with ours.
    pub fn receive(self: &Rc<Self>, bytes: &[u8]) -> Result<Vec<u8>, WireError> {
        let bad = |e: ringkv_core::codec::DecodeError| WireError::new(ErrorCode::BadRequest, e.to_string());
        let now = clock::now_ms();
        let answer = if Message::is_exchange(bytes) {
            let partitions = self.gossip.borrow().state().partitions;
            match Message::decode(bytes, partitions).map_err(bad)? {
                Message::Syn(syn) => {
                    let ack = self.gossip.borrow_mut().on_syn(now, &syn);
                    ack.map(|a| Message::Ack(a).encode())
                }
                Message::Ack2(ack2) => {
                    let ack3 = self.gossip.borrow_mut().on_ack2(now, &ack2);
                    ack3.map(|a| a.map_or_else(Vec::new, |a| Message::Ack3(a).encode()))
                }
                Message::Ack(_) | Message::Ack3(_) => {
                    return Err(WireError::new(ErrorCode::BadRequest, "a gossip answer sent as a request"));
                }
            }
        } else {
            let remote = ClusterState::decode(bytes).map_err(bad)?;
            let merged = self.gossip.borrow_mut().receive(now, &remote);
            merged.map(|_| self.gossip.borrow().state().encode())
        };
        match answer {
            Ok(bytes) => {
                self.after_change();
                Ok(bytes)
            }
            Err(m) => {
                tracing::warn!(error = %m, "refused gossip from a node of another cluster");
                // Phrased for the sender, who will print it.
                Err(WireError::new(ErrorCode::ClusterMismatch, m.reversed().to_string()))
            }
        }
    }

    /// Publishes the new view and saves the state if it changed durably.
    fn after_change(self: &Rc<Self>) {
        let view = self.view();
        {
            let g = self.gossip.borrow();
            let now = clock::now_ms();
            self.seen.borrow_mut().membership(g.state(), |id| g.is_alive(id, now), |id| g.phi(id, now));
        }
        let shard = self.shard.clone();
        glommio::spawn_local(async move { shard.broadcast_view(view).await }).detach();
        self.persist();
    }

    fn persist(self: &Rc<Self>) {
        let fp = fingerprint(self.gossip.borrow().state());
        if fp == self.persisted.get() || self.persisting.get() {
            return;
        }
        self.persisting.set(true);
        let bytes = self.gossip.borrow().state().encode();
        let path = self.state_path.clone();
        let me = self.clone();
        glommio::spawn_local(async move {
            let written = glommio::executor().spawn_blocking(move || crate::datadir::replace_file(&path, &bytes)).await;
            me.persisting.set(false);
            match written {
                Ok(()) => me.persisted.set(fp),
                Err(e) => tracing::warn!(error = %e, "could not save the cluster state"),
            }
            // Something may have changed while we wrote.
            me.persist();
        })
        .detach();
    }

    /// One gossip round; returns the peer to talk to and the digest that
    /// opens the exchange.
    fn tick(self: &Rc<Self>) -> Option<(SocketAddr, Vec<u8>)> {
        let target = self.gossip.borrow_mut().tick(clock::now_ms(), rand::random());
        self.after_change();
        let addr = target?.parse().ok()?;
        Some((addr, Message::Syn(self.gossip.borrow().syn()).encode()))
    }

    /// Sends the digest, takes the answer, and sends what the peer asked
    /// for (see `ringkv_core::exchange`).
    async fn exchange(self: Rc<Self>, addr: SocketAddr, syn: Vec<u8>) {
        let refusal = match self.gossip_call(addr, syn).await {
            Ok(answer) => match self.take_answer(&answer) {
                Ok(Some(last)) => match self.gossip_call(addr, last).await {
                    Ok(bytes) => {
                        self.take_last(&bytes);
                        None
                    }
                    Err(why) => why,
                },
                Ok(None) => None,
                Err(why) => Some(why),
            },
            Err(why) => why,
        };
        if let Some(why) = refusal {
            self.refused_by(addr, why);
        }
    }

    /// One gossip request: the answer's bytes, or why not (`Some` when the
    /// peer refused us as a stranger).
    async fn gossip_call(&self, addr: SocketAddr, state: Vec<u8>) -> Result<Vec<u8>, Option<String>> {
        let resp = self.shard.peers.call(addr, Request::Gossip { state }, 0, Duration::from_secs(2)).await;
        match resp {
            Ok(r) => match r.result {
                Ok(Reply::Gossip { state }) => Ok(state),
                Err(e) if e.code == ErrorCode::ClusterMismatch => Err(Some(e.message)),
                _ => Err(None),
            },
            Err(crate::peer::PeerError::Refused(e)) if e.code == ErrorCode::ClusterMismatch => Err(Some(e.message)),
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "gossip exchange failed");
                Err(None)
            }
        }
    }

    /// Takes what the peer sent back for our last message: nothing, or,
    /// after a keyed digest, the records we asked for.
    fn take_last(self: &Rc<Self>, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let partitions = self.gossip.borrow().state().partitions;
        match Message::decode(bytes, partitions) {
            Ok(Message::Ack3(ack3)) => {
                self.gossip.borrow_mut().on_ack3(clock::now_ms(), &ack3);
                self.after_change();
            }
            Ok(_) | Err(_) => tracing::debug!("undecodable gossip answer"),
        }
    }

    /// Takes a peer's answer to our digest (or, from an older build, its
    /// whole state); returns our last message if one is due.
    fn take_answer(self: &Rc<Self>, answer: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let now = clock::now_ms();
        let partitions = self.gossip.borrow().state().partitions;
        let last = if Message::is_exchange(answer) {
            match Message::decode(answer, partitions) {
                Ok(Message::Ack(ack)) => self.gossip.borrow_mut().on_ack(now, &ack).map_err(|m| m.to_string())?,
                Ok(_) | Err(_) => {
                    tracing::debug!("undecodable gossip answer");
                    return Ok(None);
                }
            }
        } else {
            match ClusterState::decode(answer) {
                Ok(remote) => {
                    self.gossip.borrow_mut().receive(now, &remote).map_err(|m| m.to_string())?;
                    None
                }
                Err(e) => {
                    tracing::debug!(error = %e, "undecodable gossip");
                    return Ok(None);
                }
            }
        };
        self.after_change();
        Ok(last.map(|m| Message::Ack2(m).encode()))
    }

    /// A peer says we cannot be one cluster. A node still joining through a
    /// seed gives up: it must not form a cluster of its own beside it.
    fn refused_by(&self, addr: SocketAddr, why: String) {
        let joined = self.gossip.borrow().state().ring.as_ref().is_some_and(|r| r.members().len() > 1);
        if !joined && self.seeds.contains(&addr) {
            let reason = format!("refusing to join the cluster through seed {addr}: {why}");
            tracing::error!("{reason}");
            self.shard.node.fail(reason);
        } else {
            tracing::warn!(peer = %addr, reason = why, "a peer belongs to another cluster");
        }
    }

    /// Refreshes the load figures we publish (every few rounds).
    async fn refresh_load(&self) {
        let Ok(stats) = self.shard.all_stats().await else { return };
        let figures = self.meter.borrow_mut().observe(clock::now_us(), stats.iter().map(|s| s.load.clone()).collect());
        let load = Load {
            ops_per_sec: figures.ops_per_sec.round() as u64,
            p99_us: figures.p99_us,
            keys: stats.iter().map(|s| s.store.keys).sum(),
            disk_bytes: stats.iter().map(|s| s.store.log_bytes).sum(),
            hints: stats.iter().map(|s| s.store.hints).sum(),
            cpu_permille: (figures.cpu_busy * 1000.0).round() as u32,
            moving_partitions: stats.iter().map(|s| s.stream.partitions).sum(),
            moving_bytes: stats.iter().map(|s| s.stream.bytes_left).sum(),
        };
        {
            let mut g = self.gossip.borrow_mut();
            g.set_load(load, clock::now_ms());
            g.set_holding(stats.iter().flat_map(|s| s.holding.iter().copied()).collect());
        }
        self.publish_metrics(&stats);
        let dir = self.state_path.parent().unwrap_or(Path::new("."));
        self.seen.borrow_mut().background(&stats, dir);
        self.check_drained(&stats);
    }

    /// The plan of `change` against the current state, as JSON.
    fn plan_json(&self, change: &Change) -> Result<String, WireError> {
        let g = self.gossip.borrow();
        let now = clock::now_ms();
        let cfg = &self.shard.node.cfg;
        let alive = |id: &str| g.is_alive(id, now);
        let p = plan::plan(g.state(), &alive, change, cfg.replicas, cfg.stream_mb_per_s << 20)
            .map_err(|r| WireError::new(ErrorCode::BadRequest, r.0))?;
        Ok(serde_json::json!({ "staged_on": g.me(), "plan": p }).to_string())
    }

    /// Serves a ring-change request (see the module doc).
    pub async fn ring_change(self: &Rc<Self>, action: RingAction, change: Option<Change>) -> Result<String, WireError> {
        let staged = || self.staged.borrow().clone();
        match (action, change) {
            (RingAction::Show, _) => match staged() {
                None => Ok(String::new()),
                Some(c) => self.plan_json(&c),
            },
            (RingAction::Stage, Some(c)) => {
                if let Some(old) = staged() {
                    return Err(WireError::new(
                        ErrorCode::BadRequest,
                        format!("{old} is already staged here: commit or cancel it first"),
                    ));
                }
                let json = self.plan_json(&c)?;
                self.keep_staged(Some(&c)).await?;
                tracing::info!(change = %c, "ring change staged");
                *self.staged.borrow_mut() = Some(c);
                Ok(json)
            }
            (RingAction::Cancel, _) => {
                let old = self.staged.borrow_mut().take();
                match old {
                    None => Err(WireError::new(ErrorCode::BadRequest, "no ring change is staged here")),
                    Some(c) => {
                        if let Err(e) = self.keep_staged(None).await {
                            *self.staged.borrow_mut() = Some(c);
                            return Err(e);
                        }
                        tracing::info!(change = %c, "staged ring change cancelled");
                        Ok(String::new())
                    }
                }
            }
            (RingAction::Commit, _) => {
                let Some(c) = staged() else {
                    return Err(WireError::new(
                        ErrorCode::BadRequest,
                        "no ring change is staged here: stage one first",
                    ));
                };
                // Checked again: the cluster may have changed since.
                let json = self.plan_json(&c)?;
                self.commit(&c).await?;
                *self.staged.borrow_mut() = None;
                tracing::info!(change = %c, "ring change committed");
                // The change is in the gossiped state now; a file left
                // behind would only stage it again after a restart, where
                // committing it is refused or changes nothing.
                if let Err(e) = self.keep_staged(None).await {
                    tracing::warn!(error = %e.message, "the committed change is still in {STAGED_FILE}");
                }
                Ok(json)
            }
            (RingAction::Apply, Some(c)) => {
                self.apply(&c)?;
                Ok(String::new())
            }
            (RingAction::Stage | RingAction::Apply, None) => {
                Err(WireError::new(ErrorCode::BadRequest, "a ring change to stage or apply is missing"))
            }
        }
    }

    /// Keeps the staged change on disk (`None`: removes it), so a restart
    /// does not forget it. The stage is refused if it cannot be kept.
    async fn keep_staged(&self, change: Option<&Change>) -> Result<(), WireError> {
        let path = self.staged_path.clone();
        let bytes = change.map(|c| serde_json::to_vec(c).expect("a change encodes"));
        glommio::executor()
            .spawn_blocking(move || match bytes {
                Some(b) => crate::datadir::replace_file(&path, &b),
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            })
            .await
            .map_err(|e| {
                WireError::new(ErrorCode::Internal, format!("keeping the staged change in {STAGED_FILE}: {e}"))
            })
    }

    /// Has the change made where it must be: here, or on the node concerned.
    async fn commit(self: &Rc<Self>, c: &Change) -> Result<(), WireError> {
        let (me, addr) = {
            let g = self.gossip.borrow();
            let addr = g.state().members.get(c.member()).map(|m| m.addr.clone());
            (g.me().to_string(), addr)
        };
        if matches!(c, Change::Remove { .. }) || c.member() == me {
            return self.apply(c);
        }
        let addr: SocketAddr = addr
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| WireError::new(ErrorCode::BadRequest, format!("no address for {}", c.member())))?;
        let req = Request::RingChange { action: RingAction::Apply, change: Some(c.clone()) };
        match self.shard.peers.call(addr, req, 0, Duration::from_secs(5)).await {
            Ok(r) => r.result.map(|_| ()),
            Err(e) => {
                Err(WireError::new(ErrorCode::Unavailable, format!("{} did not take the change: {e}", c.member())))
            }
        }
    }

    /// Makes the change in the gossiped state.
    fn apply(self: &Rc<Self>, c: &Change) -> Result<(), WireError> {
        {
            let mut g = self.gossip.borrow_mut();
            let mine = c.member() == g.me();
            match c {
                Change::Leave { .. } if mine => g.leave(),
                Change::Weight { weight, .. } if mine => g.set_weight(*weight),
                Change::Remove { member } => {
                    if !g.remove(member) {
                        return Err(WireError::new(ErrorCode::BadRequest, format!("no member {member:?}")));
                    }
                }
                _ => {
                    return Err(WireError::new(
                        ErrorCode::BadRequest,
                        format!("{c} must be applied on {} itself, not on {}", c.member(), g.me()),
                    ))
                }
            }
            let now = clock::now_ms();
            g.maybe_claim(now);
        }
        tracing::info!(change = %c, "ring change applied");
        self.after_change();
        Ok(())
    }

    /// Hands the slower-moving figures to the metrics endpoint.
    fn publish_metrics(&self, stats: &[crate::shard::ShardSnapshot]) {
        use crate::metrics::{Background, ShardFigures};
        let shards = stats
            .iter()
            .map(|s| ShardFigures {
                keys: s.store.keys,
                tombstones: s.store.tombstones,
                disk_bytes: s.store.log_bytes,
                segments: s.store.segments as u64,
                compactions: s.store.compactions,
                hints_pending: s.store.hints,
                hints_delivered: s.hinted.delivered,
                repair_rounds: s.repaired.background_runs,
                keys_repaired: s.repaired.keys_repaired,
                tombstones_purged: s.repaired.tombstones_purged,
                partitions_to_stream: u64::from(s.stream.partitions),
                stream_bytes_sent: s.streamed.bytes_sent,
                stream_keys_resumed: s.streamed.keys_resumed,
                partitions_handed_off: s.streamed.partitions_handed_off,
            })
            .collect();
        let view = self.view();
        let mut members: Vec<(&'static str, u64)> =
            ["up", "down", "joining", "leaving", "left"].iter().map(|s| (*s, 0)).collect();
        for (id, r) in &view.members {
            let state = crate::events::member_state(&view, id, r);
            if let Some(slot) = members.iter_mut().find(|(s, _)| *s == state) {
                slot.1 += 1;
            }
        }
        self.shard.node.metrics.publish(Background { shards, members, ring_version: view.ring_version() });
    }

    /// A node that left stops once it holds nothing and said so.
    fn check_drained(&self, stats: &[crate::shard::ShardSnapshot]) {
        let g = self.gossip.borrow();
        let me = g.member();
        let out_of_ring = g.state().ring.as_ref().is_some_and(|r| !r.contains(g.me()));
        let empty = stats
            .iter()
            .all(|s| s.store.keys == 0 && s.store.tombstones == 0 && s.store.hints == 0 && s.stream.partitions == 0);
        if !(me.leaving && out_of_ring && empty) {
            self.drained.set(0);
            return;
        }
        let n = self.drained.get() + 1;
        self.drained.set(n);
        if n > DRAINED_REFRESHES {
            tracing::info!("left the cluster: every partition handed over and every hint delivered; stopping");
            self.shard.node.shut_down();
        }
    }

    /// The load figures as last measured.
    pub fn figures(&self) -> crate::load::Figures {
        self.meter.borrow().figures()
    }

    /// Gossips until the node shuts down.
    pub async fn run(self: Rc<Self>) {
        while !self.shard.node.is_shutting_down() {
            let n = self.ticks.get();
            self.ticks.set(n + 1);
            if n.is_multiple_of(2) {
                self.refresh_load().await;
            }
            if let Some((addr, state)) = self.tick() {
                glommio::spawn_local(self.clone().exchange(addr, state)).detach();
            }
            glommio::timer::sleep(self.interval).await;
        }
    }
}
