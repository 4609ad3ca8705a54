//! The shard's protocol machines and the shell that carries out their
//! requests: the only place where `ringkv-core`'s coordinator, hinted
//! handoff, ownership handoff and repair machines meet sockets, the store
//! and the clock.
//!
//! Every event (a client request, a replica's answer, a store result, a
//! deadline) is fed to its machine, then [`Driver::drain`] empties every
//! machine's outbox: a request to this node goes to the store (on the shard
//! holding its partition), one to another member goes to the peer pool with
//! a callback that feeds the answer back; client answers complete their
//! waiting requests. Answers that arrive while a drain runs wait in an inbox
//! the same drain empties, so nothing recurses. One timer per shard serves
//! every machine's deadlines; it is re-armed only when a deadline earlier
//! than the armed one appears.
//!
//! No protocol decision is taken here: which replicas, how many answers,
//! hints, what to repair, what to purge are the machines'. This module only
//! translates requests into store calls and wire messages and back.

use crate::clock;
use crate::peer::PeerError;
use crate::shard::{Op, OpOutput, Shard};
use futures::channel::oneshot;
use ringkv_core::antientropy::{RepairConfig, RepairReport, Repairer};
use ringkv_core::coordinator::{CoordError, Coordinator, CoordinatorConfig, Outcome};
use ringkv_core::effects::{Answer, Failure, Machine, Outgoing, Request, Response, Tag, WriteContext};
use ringkv_core::handoff::{Handoff, HandoffConfig};
use ringkv_core::hints::{HintConfig, HintDelivery};
use ringkv_core::quorum::Level;
use ringkv_core::topology::MemberId;
use ringkv_core::version::Object;
use ringkv_net::proto::{self as wire, ErrorCode, GetResult, Reply, WireError};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::task::Waker;
use std::time::Duration;

/// How long between ownership handoff scans.
const HANDOFF_INTERVAL_US: u64 = 3_000_000;
/// How long a background request may take before its machine gives up.
const BACKGROUND_CALL_TIMEOUT_US: u64 = 30_000_000;

/// A client operation for the coordinator (this shard holds the key's
/// partition).
pub enum ClientOp {
    Get { key: Vec<u8>, r: Level },
    Write { key: Vec<u8>, value: Option<Vec<u8>>, ctx: WriteContext, w: Level, durable: bool },
}

pub fn coord_error(e: CoordError) -> WireError {
    let code = match &e {
        CoordError::Unavailable(_) => ErrorCode::Unavailable,
        CoordError::Timeout(_) => ErrorCode::Timeout,
        CoordError::BadRequest(_) => ErrorCode::BadRequest,
        CoordError::Storage(_) => ErrorCode::Storage,
        CoordError::Overloaded(_) => ErrorCode::Overloaded,
    };
    WireError::new(code, e.to_string())
}

/// The client's reply for a coordinator outcome.
pub fn reply(outcome: Outcome, deleting: bool) -> Reply {
    match outcome {
        Outcome::Read(None) => Reply::Get(GetResult::default()),
        Outcome::Read(Some(o)) => Reply::Get(GetResult {
            found: !o.is_deleted(),
            values: o.values().map(<[u8]>::to_vec).collect(),
            context: o.context().encode_context(),
        }),
        Outcome::Written(_) if deleting => Reply::Delete,
        Outcome::Written(o) => Reply::Put { context: o.context().encode_context() },
    }
}

/// Where a client operation's reply goes (a connection's output, or a task
/// awaiting it).
pub type ClientSink = Box<dyn FnOnce(Result<Reply, WireError>)>;

struct Waiting {
    op: crate::metrics::Op,
    deleting: bool,
    started_us: u64,
    sink: ClientSink,
}

/// Wakes the timer task early.
#[derive(Default)]
struct Notify {
    woken: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.woken.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    async fn notified(&self) {
        futures::future::poll_fn(|cx| {
            if self.woken.replace(false) {
                return std::task::Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }
}

pub struct Driver {
    coord: RefCell<Coordinator>,
    hints: RefCell<HintDelivery>,
    handoff: RefCell<Handoff>,
    repair: RefCell<Repairer>,
    /// Client operations in the coordinator, by token: whether each is a
    /// delete (its reply says so), when it started, and where the reply goes.
    waiting: RefCell<HashMap<u64, Waiting>>,
    /// What this shard coordinated: operations and their latency.
    load: RefCell<crate::load::ShardLoad>,
    metrics: std::sync::Arc<crate::metrics::ShardMetrics>,
    /// Answers slower than this are logged (0: never).
    slow_us: u64,
    /// Whether this shard holds one of the node's stream slots.
    slot: Cell<bool>,
    repairs: RefCell<HashMap<u64, oneshot::Sender<Result<RepairReport, String>>>>,
    next_token: Cell<u64>,
    inbox: RefCell<VecDeque<(Tag, Answer)>>,
    draining: Cell<bool>,
    /// When the timer task will wake, while it sleeps; `None` while awake.
    armed: Cell<Option<u64>>,
    notify: Notify,
    /// Hint owners by id: the store keeps hints by member name, the
    /// machines by id; every name either side mentions is kept here.
    names: RefCell<HashMap<MemberId, String>>,
    /// Where the background machines' store work runs.
    background: Cell<Option<glommio::TaskQueueHandle>>,
    /// The handoff's resume state, saved so a restart resumes its streams.
    resume: ResumeFile,
}

/// The file a shard saves its handoff's resume state in, and what of it is
/// on disk.
struct ResumeFile {
    path: std::path::PathBuf,
    saved: Cell<u64>,
    saving: Cell<bool>,
    saved_at_us: Cell<u64>,
}

/// The most often a shard saves its resume state: a crash sends again at
/// most what was acknowledged in the last second.
const RESUME_SAVE_EVERY_US: u64 = 1_000_000;

/// A resume state older than this is not trusted: the targets' data may
/// have changed since (a replaced disk), and sending again is only slower.
const RESUME_MAX_AGE: Duration = Duration::from_secs(600);

/// Takes back the resume state a previous run of this shard saved.
fn restore_resume(handoff: &mut Handoff, path: &std::path::Path) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    let age = meta.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or(Duration::MAX);
    if age > RESUME_MAX_AGE {
        tracing::info!(path = %path.display(), "not resuming streams from a state saved too long ago");
        return;
    }
    match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| handoff.restore_resume(&b).map_err(|e| e.to_string()))
    {
        Ok(0) => {}
        Ok(records) => tracing::info!(records, "streams resume where they were before the restart"),
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring a damaged stream resume state"),
    }
}

impl Driver {
    pub fn new(
        cfg: &crate::config::NodeConfig,
        shard: u16,
        metrics: std::sync::Arc<crate::metrics::ShardMetrics>,
    ) -> Driver {
        let now = clock::now_us();
        let coord = Coordinator::new(CoordinatorConfig { replicas: cfg.replicas, ..CoordinatorConfig::default() });
        let hints = HintDelivery::new(
            HintConfig { interval_us: cfg.handoff_interval_s * 1_000_000, ..HintConfig::default() },
            now,
        );
        let mut handoff = Handoff::new(
            HandoffConfig {
                interval_us: HANDOFF_INTERVAL_US,
                call_timeout_us: BACKGROUND_CALL_TIMEOUT_US,
                bytes_per_sec: (cfg.stream_mb_per_s << 20) / cfg.shard_count().max(1) as u64,
                // Small chunks: a broken stream resends at most one.
                chunk: 64,
            },
            shard,
            now,
        );
        let resume_path = cfg.data_dir.join(format!("handoff-{shard:03}.resume"));
        restore_resume(&mut handoff, &resume_path);
        let resume = ResumeFile {
            saved: Cell::new(handoff.resume_changes()),
            path: resume_path,
            saving: Cell::new(false),
            saved_at_us: Cell::new(0),
        };
        let repair = Repairer::new(
            RepairConfig {
                interval_us: cfg.anti_entropy_interval_s * 1_000_000,
                call_timeout_us: BACKGROUND_CALL_TIMEOUT_US,
                tombstone_grace_ms: cfg.tombstone_grace_s * 1000,
                ..RepairConfig::default()
            },
            shard,
            now,
        );
        Driver {
            coord: RefCell::new(coord),
            hints: RefCell::new(hints),
            handoff: RefCell::new(handoff),
            repair: RefCell::new(repair),
            waiting: RefCell::new(HashMap::new()),
            load: RefCell::new(crate::load::ShardLoad::default()),
            metrics,
            slow_us: cfg.slow_request_ms * 1000,
            slot: Cell::new(false),
            repairs: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            inbox: RefCell::new(VecDeque::new()),
            draining: Cell::new(false),
            armed: Cell::new(None),
            notify: Notify::default(),
            names: RefCell::new(HashMap::new()),
            background: Cell::new(None),
            resume,
        }
    }

    /// Saves the handoff's resume state if it changed (at most once a
    /// second, one write at a time).
    fn save_resume(self: &Rc<Self>) {
        let changes = self.handoff.borrow().resume_changes();
        let r = &self.resume;
        let now = clock::now_us();
        if changes == r.saved.get() || r.saving.get() || now < r.saved_at_us.get() + RESUME_SAVE_EVERY_US {
            return;
        }
        r.saving.set(true);
        let bytes = self.handoff.borrow().resume_state();
        let path = r.path.clone();
        let me = self.clone();
        glommio::spawn_local(async move {
            let written = glommio::executor().spawn_blocking(move || crate::datadir::replace_file(&path, &bytes)).await;
            let r = &me.resume;
            r.saving.set(false);
            r.saved_at_us.set(clock::now_us());
            match written {
                Ok(()) => r.saved.set(changes),
                Err(e) => tracing::warn!(error = %e, "could not save the stream resume state"),
            }
        })
        .detach();
    }

    /// Runs the background machines' store work in `tq` from now on.
    pub fn set_background_queue(&self, tq: glommio::TaskQueueHandle) {
        self.background.set(Some(tq));
    }

    fn token(&self) -> u64 {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    /// Coordinates a client operation; resolves with the client's answer.
    pub async fn coordinate(&self, shard: &Rc<Shard>, op: ClientOp, timeout: Duration) -> Result<Reply, WireError> {
        let (tx, rx) = oneshot::channel();
        self.start(shard, op, timeout, Box::new(move |r| drop(tx.send(r))));
        rx.await.unwrap_or_else(|_| Err(WireError::new(ErrorCode::Internal, "the coordinator dropped a request")))
    }

    /// Starts a client operation; `sink` gets the reply exactly once.
    pub fn start(&self, shard: &Rc<Shard>, op: ClientOp, timeout: Duration, sink: ClientSink) {
        let token = self.token();
        let deleting = matches!(op, ClientOp::Write { value: None, .. });
        let kind = match &op {
            ClientOp::Get { .. } => crate::metrics::Op::Get,
            ClientOp::Write { value: Some(_), .. } => crate::metrics::Op::Put,
            ClientOp::Write { value: None, .. } => crate::metrics::Op::Delete,
        };
        let now = clock::now_us();
        self.waiting.borrow_mut().insert(token, Waiting { op: kind, deleting, started_us: now, sink });
        let view = shard.view();
        let timeout_us = timeout.as_micros() as u64;
        let key = match &op {
            ClientOp::Get { key, .. } | ClientOp::Write { key, .. } => key,
        };
        *self.load.borrow_mut().partitions.entry(shard.node.partition(key)).or_default() += 1;
        match op {
            ClientOp::Get { key, r } => self.coord.borrow_mut().get(now, &view.topo, token, key, r, timeout_us),
            ClientOp::Write { key, value, ctx, w, durable } => {
                self.coord.borrow_mut().write(now, &view.topo, token, key, value, ctx, w, durable, timeout_us)
            }
        }
        self.drain(shard);
    }

    /// Counts a copy read this shard answered (service, `GetCopy`) in its
    /// load, as a get it coordinated would be.
    pub fn served_copy(&self, partition: u32, took_us: u64) {
        *self.load.borrow_mut().partitions.entry(partition).or_default() += 1;
        self.answered(crate::metrics::Op::Get, took_us);
    }

    /// Counts a client request answered after `took_us`, in the shard's
    /// load and its metrics.
    fn answered(&self, op: crate::metrics::Op, took_us: u64) {
        {
            let mut load = self.load.borrow_mut();
            load.ops += 1;
            load.latency.record(took_us);
        }
        self.metrics.request(op, took_us);
    }

    /// Anti-entropy of this shard's partitions (`only` one) with every
    /// other replica, now.
    pub async fn repair(&self, shard: &Rc<Shard>, only: Option<u32>) -> Result<RepairReport, WireError> {
        let token = self.token();
        let (tx, rx) = oneshot::channel();
        self.repairs.borrow_mut().insert(token, tx);
        let view = shard.view();
        self.repair.borrow_mut().repair(clock::now_us(), clock::now_ms(), &view.topo, token, only);
        self.drain(shard);
        match rx.await {
            Ok(r) => r.map_err(|e| WireError::new(ErrorCode::Overloaded, e)),
            Err(_) => Err(WireError::new(ErrorCode::Internal, "the repair machine dropped a request")),
        }
    }

    /// What this shard coordinated so far, with its thread's CPU time (call
    /// it on the shard's own thread).
    pub fn load(&self) -> crate::load::ShardLoad {
        let mut l = self.load.borrow().clone();
        l.cpu_ns = crate::load::thread_cpu_ns();
        l
    }

    pub fn hint_stats(&self) -> ringkv_core::hints::HintStats {
        self.hints.borrow().stats()
    }

    pub fn hints_delivering(&self) -> usize {
        self.hints.borrow().delivering()
    }

    pub fn repair_stats(&self) -> ringkv_core::antientropy::RepairStats {
        self.repair.borrow().stats()
    }

    pub fn stream_stats(&self) -> ringkv_core::handoff::HandoffStats {
        self.handoff.borrow().stats()
    }

    pub fn holding(&self, topo: &ringkv_core::topology::Topology) -> std::collections::BTreeSet<u32> {
        self.handoff.borrow().holding(topo)
    }

    /// What this shard's handoff still has to stream.
    pub fn stream_progress(&self) -> ringkv_core::handoff::Progress {
        self.handoff.borrow().progress()
    }

    /// When partition `p` last completed anti-entropy with every replica
    /// asked (0: not since start-up).
    pub fn last_sync_ms(&self, p: u32) -> u64 {
        self.repair.borrow().last_sync_ms(p).unwrap_or(0)
    }

    /// Feeds an answer to its machine, then carries out what follows.
    fn answer(&self, shard: &Rc<Shard>, tag: Tag, answer: Answer) {
        self.inbox.borrow_mut().push_back((tag, answer));
        self.drain(shard);
    }

    /// Carries out every queued request and answer until all machines are
    /// quiet, then re-arms the timer if a deadline moved earlier.
    pub fn drain(&self, shard: &Rc<Shard>) {
        if self.draining.replace(true) {
            return; // the running drain will see what was queued
        }
        loop {
            let next = self.inbox.borrow_mut().pop_front();
            if let Some((tag, answer)) = next {
                self.feed(shard, tag, answer);
                continue;
            }
            let out = self.poll_outgoing();
            if let Some(out) = out {
                self.carry_out(shard, out);
                continue;
            }
            if !self.deliver_answers() {
                break;
            }
        }
        self.draining.set(false);
        // `armed` is `None` while the timer task is awake: it looks at the
        // deadlines itself before it sleeps again.
        if let (Some(next), Some(armed)) = (self.next_deadline(), self.armed.get()) {
            if next < armed {
                self.notify.notify();
            }
        }
    }

    fn poll_outgoing(&self) -> Option<Outgoing> {
        if let Some(o) = self.coord.borrow_mut().poll_outgoing() {
            return Some(o);
        }
        if let Some(o) = self.hints.borrow_mut().poll_outgoing() {
            return Some(o);
        }
        if let Some(o) = self.handoff.borrow_mut().poll_outgoing() {
            return Some(o);
        }
        self.repair.borrow_mut().poll_outgoing()
    }

    /// Completes waiting client and repair requests; false when none was
    /// ready.
    fn deliver_answers(&self) -> bool {
        let mut any = false;
        loop {
            let next = self.coord.borrow_mut().poll_answer();
            let Some((token, result)) = next else { break };
            any = true;
            let waiting = self.waiting.borrow_mut().remove(&token);
            if let Some(w) = waiting {
                let took = clock::now_us().saturating_sub(w.started_us);
                self.answered(w.op, took);
                if took >= self.slow_us && self.slow_us > 0 {
                    tracing::warn!(
                        op = ?w.op,
                        took_us = took,
                        ok = result.is_ok(),
                        "slow request: answered after more than the slow-request threshold"
                    );
                }
                (w.sink)(result.map(|o| reply(o, w.deleting)).map_err(coord_error));
            }
        }
        loop {
            let next = self.repair.borrow_mut().poll_answer();
            let Some((token, result)) = next else { break };
            any = true;
            if let Some(tx) = self.repairs.borrow_mut().remove(&token) {
                let _ = tx.send(result);
            }
        }
        any
    }

    fn feed(&self, shard: &Rc<Shard>, tag: Tag, answer: Answer) {
        let view = shard.view();
        let (now, topo) = (clock::now_us(), &view.topo);
        match tag.machine {
            Machine::Coordinator => self.coord.borrow_mut().handle_response(now, topo, tag, answer),
            Machine::Hints => self.hints.borrow_mut().handle_response(now, topo, tag, answer),
            Machine::Handoff => self.handoff.borrow_mut().handle_response(now, topo, tag, answer),
            Machine::Repair => self.repair.borrow_mut().handle_response(now, clock::now_ms(), topo, tag, answer),
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        [
            self.coord.borrow().next_deadline(),
            self.hints.borrow().next_deadline(),
            self.handoff.borrow().next_deadline(),
            self.repair.borrow().next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Serves every machine's deadlines until the node shuts down.
    pub async fn run_timers(self: Rc<Self>, shard: Rc<Shard>) {
        while !shard.node.is_shutting_down() {
            // Wake at least once a second, to notice a shutdown.
            let now = clock::now_us();
            let wake = self.next_deadline().unwrap_or(u64::MAX).min(now + 1_000_000);
            if wake > now {
                self.armed.set(Some(wake));
                let timer = glommio::timer::Timer::new(Duration::from_micros(wake - now));
                futures::future::select(Box::pin(timer), Box::pin(self.notify.notified())).await;
                self.armed.set(None);
            }
            let view = shard.view();
            let (now, topo) = (clock::now_us(), &view.topo);
            self.coord.borrow_mut().handle_timeout(now, topo);
            self.hints.borrow_mut().handle_timeout(now, topo);
            let may = self.stream_slot(&shard, true);
            self.handoff.borrow_mut().set_may_start(may);
            self.handoff.borrow_mut().handle_timeout(now, topo);
            self.repair.borrow_mut().handle_timeout(now, clock::now_ms(), topo);
            self.drain(&shard);
            self.stream_slot(&shard, false);
            self.save_resume();
        }
    }

    /// Holds one of the node's stream slots while this shard's handoff is
    /// busy: takes one when `want` and it has none, gives it back once the
    /// handoff is idle. Returns whether it holds one.
    fn stream_slot(&self, shard: &Shard, want: bool) -> bool {
        use std::sync::atomic::Ordering;
        let slots = &shard.node.stream_slots;
        if self.slot.get() && !self.handoff.borrow().busy() {
            slots.fetch_add(1, Ordering::AcqRel);
            self.slot.set(false);
        }
        if want && !self.slot.get() {
            let took = slots.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok();
            self.slot.set(took);
        }
        self.slot.get()
    }

    fn name(&self, shard: &Shard, m: MemberId) -> Option<String> {
        if let Some(n) = shard.view().name_of(m) {
            return Some(n.to_string());
        }
        self.names.borrow().get(&m).cloned()
    }

    /// Sends `out` where it goes: this node's store, or a peer.
    fn carry_out(&self, shard: &Rc<Shard>, out: Outgoing) {
        let Outgoing { tag, to, p, req } = out;
        if to == shard.view().topo.me() {
            return self.local(shard, tag, p, req);
        }
        if req.is_local_only() {
            let e = Failure::new(format!("{req:?} may only go to this node"));
            return self.inbox.borrow_mut().push_back((tag, Err(e)));
        }
        let Some(addr) = shard.view().address_of(to, p) else {
            return self.inbox.borrow_mut().push_back((tag, Err(Failure::new(format!("no address for {to:?}")))));
        };
        let hint_for = match &req {
            Request::Write { hint_for: Some(owner), .. } => match self.name(shard, *owner) {
                Some(n) => Some(n),
                None => return self.inbox.borrow_mut().push_back((tag, Err(Failure::new("hint owner unknown")))),
            },
            _ => None,
        };
        let (body, expect) = to_wire(req, hint_for);
        let timeout = match tag.machine {
            Machine::Coordinator => shard.node.timeout(),
            _ => Duration::from_micros(BACKGROUND_CALL_TIMEOUT_US),
        };
        let (s, me) = (shard.clone(), shard.driver.clone());
        shard.peers.send(
            addr,
            body,
            timeout,
            Box::new(move |r: Result<wire::Response, PeerError>| {
                let answer = match r {
                    Ok(resp) => from_wire(resp.result, expect),
                    Err(e) => Err(Failure::new(e.to_string())),
                };
                me.answer(&s, tag, answer);
            }),
        );
    }

    /// A request to this node: answered at once when the store can, else
    /// by a task (the coordinator's in the shard's default queue, the
    /// background machines' in the background queue).
    fn local(&self, shard: &Rc<Shard>, tag: Tag, p: u32, req: Request) {
        let store = &shard.store;
        let now = match req {
            Request::Ping => Some(Ok(Response::Done)),
            Request::Merkle { p, ref segments } => Some(merkle(shard, p, segments)),
            Request::Keys { p, ref leaves } => {
                let leaves: Vec<usize> =
                    leaves.iter().map(|&l| l as usize).filter(|&l| l < ringkv_core::merkle::LEAVES).collect();
                Some(Ok(Response::Keys(store.keys_in_leaves(p, &leaves))))
            }
            Request::HintTargets => {
                let mut names = self.names.borrow_mut();
                let targets = store
                    .hint_targets()
                    .into_iter()
                    .map(|(n, c)| {
                        let id = MemberId::of(&n);
                        names.insert(id, n);
                        (id, c)
                    })
                    .collect();
                Some(Ok(Response::HintTargets(targets)))
            }
            Request::PartitionsWithData => Some(Ok(Response::Partitions(store.partitions_with_data()))),
            Request::Snapshot { p } => Some(Ok(Response::Snapshot(store.partition_snapshot(p)))),
            _ => None,
        };
        if let Some(answer) = now {
            return self.inbox.borrow_mut().push_back((tag, answer));
        }
        let target = shard.local_shard_of(p);
        // The store answers most of the coordinator's requests from memory:
        // no task then, and durability waits are callbacks.
        let req = if target == shard.id { self.local_now(shard, tag, req) } else { Some(req) };
        let Some(req) = req else { return };
        let owner = match &req {
            Request::HintBatch { owner, .. } | Request::RetireHints { owner, .. } => self.name(shard, *owner),
            _ => None,
        };
        let (s, me) = (shard.clone(), shard.driver.clone());
        let work = async move {
            let answer = local_store_op(&s, target, req, owner).await;
            me.answer(&s, tag, answer);
        };
        let queue = match tag.machine {
            Machine::Coordinator => None,
            _ => self.background.get(),
        };
        match queue {
            Some(tq) => match glommio::spawn_local_into(work, tq) {
                Ok(t) => {
                    t.detach();
                }
                Err(e) => self.inbox.borrow_mut().push_back((tag, Err(Failure::new(e.to_string())))),
            },
            None => {
                glommio::spawn_local(work).detach();
            }
        }
    }
}

impl Driver {
    /// Answers `req` from the store's synchronous paths if it can; gives
    /// it back when it needs a task (a disk read, a rotation, a backlog).
    fn local_now(&self, shard: &Rc<Shard>, tag: Tag, req: Request) -> Option<Request> {
        let store = &shard.store;
        let answer = match req {
            Request::Read { key } => match store.get_now(&key) {
                Some(r) => r.map(Response::Object).map_err(failed),
                None => return Some(Request::Read { key }),
            },
            Request::Apply { key, value, ctx } => match store.write_now(&key, value, &ctx, clock::now_ms()) {
                Ok(r) => r.map(|(obj, lsn)| Response::Applied { obj, lsn }).map_err(failed),
                Err(value) => return Some(Request::Apply { key, value, ctx }),
            },
            Request::WaitDurable { lsn } => {
                self.answer_when_durable(shard, tag, lsn);
                return None;
            }
            Request::Write { key, obj, durable, hint_for: None } => match store.merge_now(&key, &obj) {
                Some(Ok((_, lsn))) if durable => {
                    self.answer_when_durable(shard, tag, lsn);
                    return None;
                }
                Some(r) => r.map(|_| Response::Done).map_err(failed),
                None => return Some(Request::Write { key, obj, durable, hint_for: None }),
            },
            other => return Some(other),
        };
        self.inbox.borrow_mut().push_back((tag, answer));
        None
    }

    fn answer_when_durable(&self, shard: &Rc<Shard>, tag: Tag, lsn: u64) {
        let (s, me) = (shard.clone(), shard.driver.clone());
        let done = Box::new(move |r: Result<(), crate::store::StoreError>| {
            me.answer(&s, tag, r.map(|()| Response::Done).map_err(failed));
        });
        shard.store.on_durable(lsn, done);
    }
}

fn merkle(shard: &Shard, p: u32, segments: &[u32]) -> Answer {
    let tree = shard.store.merkle(p);
    if segments.is_empty() {
        return Ok(Response::Merkle { root: tree.root(), segments: tree.segments(), leaves: vec![] });
    }
    if segments.iter().any(|&s| s as usize >= ringkv_core::merkle::SEGMENTS) {
        return Err(Failure::new("no such merkle segment"));
    }
    Ok(Response::Merkle { root: tree.root(), segments: vec![], leaves: segment_leaves(&tree, segments) })
}

/// The leaves of `segments` in `tree`, concatenated in order.
pub fn segment_leaves(tree: &ringkv_core::merkle::MerkleTree, segments: &[u32]) -> Vec<u64> {
    use ringkv_core::merkle::LEAVES_PER_SEGMENT;
    segments
        .iter()
        .flat_map(|&s| {
            let from = s as usize * LEAVES_PER_SEGMENT;
            tree.leaves()[from..from + LEAVES_PER_SEGMENT].iter().copied()
        })
        .collect()
}

fn failed(e: impl std::fmt::Display) -> Failure {
    Failure::new(e.to_string())
}

/// Runs a request to this node's store (on shard `target`, which holds
/// partition `p`, for the requests that name one).
async fn local_store_op(shard: &Rc<Shard>, target: usize, req: Request, owner: Option<String>) -> Answer {
    let store = &shard.store;
    match req {
        Request::Read { key } => store.get(&key).await.map(Response::Object).map_err(failed),
        Request::Write { key, obj, durable, hint_for: None } => {
            store.merge(&key, &obj, durable).await.map(|_| Response::Done).map_err(failed)
        }
        Request::Write { key, obj, durable, hint_for: Some(owner) } => {
            let name = shard.driver.name(shard, owner).ok_or_else(|| failed("hint owner unknown"))?;
            store.put_hint(&name, &key, &obj, durable).await.map(|()| Response::Done).map_err(failed)
        }
        Request::Apply { key, value, ctx } => store
            .write_deferred(&key, value, &ctx, clock::now_ms())
            .await
            .map(|(obj, lsn)| Response::Applied { obj, lsn })
            .map_err(failed),
        Request::WaitDurable { lsn } => store.wait_lsn(lsn).await.map(|()| Response::Done).map_err(failed),
        Request::ReadBatch { keys } => {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                if let Some(o) = store.get(&key).await.map_err(failed)? {
                    out.push((key, o));
                }
            }
            Ok(Response::Objects(out))
        }
        Request::ReadRecords { records } => {
            // The current version of each key: newer than the snapshot's if
            // a write came since, which the drop that follows notices.
            let mut out = Vec::with_capacity(records.len());
            for (key, _) in records {
                if let Some(o) = store.get(&key).await.map_err(failed)? {
                    out.push((key, o));
                }
            }
            Ok(Response::Objects(out))
        }
        Request::MergeBatch { entries, .. } => {
            if target != shard.id {
                // This node replicates the partition on another of its shards.
                return shard
                    .on_shard(target, Op::MergeBatch { entries })
                    .await
                    .map(|_| Response::Done)
                    .map_err(|e| failed(e.message));
            }
            for (key, obj) in &entries {
                store.merge(key, obj, false).await.map_err(failed)?;
            }
            store.sync().await.map(|()| Response::Done).map_err(failed)
        }
        Request::Purge { key, obj } => store.purge(&key, &obj).await.map(Response::Flag).map_err(failed),
        Request::Tombstones { p, max } => {
            let mut out = Vec::new();
            for key in store.tombstones(p, max) {
                if let Some(o) = store.get(&key).await.map_err(failed)? {
                    out.push((key, o));
                }
            }
            Ok(Response::Objects(out))
        }
        Request::HintBatch { max, .. } => {
            let name = owner.ok_or_else(|| failed("hint owner unknown"))?;
            store.hint_batch(&name, max).await.map(Response::Hints).map_err(failed)
        }
        Request::RetireHints { delivered, .. } => {
            let name = owner.ok_or_else(|| failed("hint owner unknown"))?;
            store.hints_delivered(&name, &delivered).await.map(Response::Count).map_err(failed)
        }
        Request::DropPartition { p, snapshot } => {
            store.drop_partition(p, &snapshot).await.map(Response::Flag).map_err(failed)
        }
        other => Err(failed(format!("{other:?} is answered without the store"))),
    }
}

/// What the answer to a wire request must be.
#[derive(Clone, Copy)]
enum Expect {
    Object,
    Done,
    Merged(usize),
    Merkle,
    Keys,
    Objects,
    Flag,
}

/// The wire request for a machine's request to a peer.
fn to_wire(req: Request, hint_for: Option<String>) -> (wire::Request, Expect) {
    match req {
        Request::Read { key } => (wire::Request::ReplicaRead { key }, Expect::Object),
        Request::Write { key, obj, durable, .. } => {
            let object = obj.to_bytes();
            (wire::Request::ReplicaWrite { key, object, durable, hint_for: hint_for.unwrap_or_default() }, Expect::Done)
        }
        Request::Ping => (wire::Request::Ping { payload: vec![] }, Expect::Done),
        Request::Merkle { p, segments } => (wire::Request::Merkle { partition: p, segments }, Expect::Merkle),
        Request::Keys { p, leaves } => (wire::Request::Keys { partition: p, leaves }, Expect::Keys),
        Request::ReadBatch { keys } => (wire::Request::ReadBatch { keys }, Expect::Objects),
        Request::MergeBatch { p, entries } => {
            let n = entries.len();
            let entries = entries.into_iter().map(|(k, o)| (k, o.to_bytes())).collect();
            (wire::Request::Handoff { partition: p, entries }, Expect::Merged(n))
        }
        Request::Purge { key, obj } => (wire::Request::Purge { key, object: obj.to_bytes() }, Expect::Flag),
        local => unreachable!("{local:?} is local only; checked before"),
    }
}

/// The machine's answer for a peer's wire reply; a reply of the wrong kind
/// or with an undecodable object is a failure.
fn from_wire(result: Result<Reply, WireError>, expect: Expect) -> Answer {
    let reply = result.map_err(|e| failed(e.to_string()))?;
    let decode = |b: &[u8]| Object::decode(b).map_err(|e| failed(format!("peer sent a bad object: {e}")));
    match (expect, reply) {
        (Expect::Object, Reply::ReplicaRead { found: false, .. }) => Ok(Response::Object(None)),
        (Expect::Object, Reply::ReplicaRead { found: true, object }) => Ok(Response::Object(Some(decode(&object)?))),
        (Expect::Done, Reply::ReplicaWrite | Reply::Pong { .. }) => Ok(Response::Done),
        (Expect::Merged(n), Reply::Handoff { applied }) if applied as usize == n => Ok(Response::Done),
        (Expect::Merkle, Reply::Merkle { root, segments, leaves }) => Ok(Response::Merkle { root, segments, leaves }),
        (Expect::Keys, Reply::Keys { keys }) => Ok(Response::Keys(keys)),
        (Expect::Objects, Reply::ReadBatch { entries }) => {
            let mut out = Vec::with_capacity(entries.len());
            for (k, b) in entries {
                out.push((k, decode(&b)?));
            }
            Ok(Response::Objects(out))
        }
        (Expect::Flag, Reply::Purge { purged }) => Ok(Response::Flag(purged)),
        (_, other) => Err(failed(format!("unexpected reply {other:?}"))),
    }
}

/// The outcome of `op` on the shard: used by `Shard::run_local`.
pub async fn coordinate_local(shard: &Rc<Shard>, op: ClientOp, timeout: Duration) -> Result<OpOutput, WireError> {
    shard.driver.clone().coordinate(shard, op, timeout).await.map(OpOutput::Reply)
}
