//! One load-generator worker: a thread that drives its connections with
//! io_uring and records every operation's latency.
//!
//! A worker has `groups` connection groups; a group is one connection to
//! every endpoint of the target and stands for one client (a YCSB thread):
//! it has at most `pipeline` operations outstanding, each sent on the
//! connection of its key's endpoint.
//!
//! - Closed loop: every group keeps `pipeline` operations outstanding and
//!   starts the next one as soon as one completes; latency is from send to
//!   reply.
//! - Open loop: the worker follows its [`Schedule`]; a due operation goes to
//!   the next group with room. When every group is full the operation waits,
//!   but its latency still counts from its intended time.
//!
//! Every connection always has one receive in flight and at most one send;
//! requests queued while a send is in flight go out together when it
//! completes (natural batching). Buffers are reused, so the steady state
//! allocates only what decoding a ringkv reply allocates.
//!
//! The worker sleeps in `io_uring_enter` with a timeout set to the next
//! thing it must do (the next intended send, a phase change, a progress
//! report), unless `busy_poll` is set, in which case it spins on the
//! completion queue and never sleeps.
//!
//! Riding through failures, where the router knows a key's replicas (a
//! ringkv cluster), as the client library does
//! (`ringkv_client::core::route`): an attempt not answered within twice the
//! p99 of the attempts this worker saw answered (at least 50 ms, at most
//! [`MAX_ATTEMPT`]) goes to the key's next replica, and so does every
//! request outstanding on a connection that broke (reset, closed). The
//! endpoint is then tried last for a back-off (1 s doubling to 8 s) and
//! probed again after it. A late answer to an abandoned attempt is
//! dropped; a broken connection is not reopened during the run (its
//! endpoint is skipped in that group). An operation that ran out of
//! replicas is an error. Latency counts from the operation's intended
//! time, so failovers show in it.
//!
//! Client-driven reads (`copy_reads`, the Dynamo paper's section 6.4): a
//! read asks the first r replicas of its key that are up for their own
//! copy (`GetCopy`) and is done when all r answer the same (found, values,
//! context); a disagreement, a refusal (not a replica, partition moving,
//! an old node) or a late or broken copy makes it read again through a
//! coordinator, which merges and repairs. Each replica is woken once per
//! read instead of the coordinator twice.

use crate::codec::{Codec, Outcome, Reply, WireReq};
use crate::keydist::{write_key, KeyChooser};
use crate::rng::Rng;
use crate::router::Router;
use crate::schedule::Schedule;
use crate::slots::Redirect;
use crate::stats::{new_hist, OpStats, RunStats};
use crate::workload::{KeySpace, Mix, OpKind, ValueSize};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam::channel::Sender;
use hdrhistogram::Histogram;
use io_uring::{opcode, types, IoUring};
use ringkv_client::core::route::{attempt_deadline, down_backoff, SAMPLES};
use ringkv_core::latency::RecentLatencies;
use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the operations are.
#[derive(Clone)]
pub enum Source {
    /// The workload mix over the key space.
    Workload { mix: Mix, chooser: KeyChooser, keys: Arc<KeySpace> },
    /// Insert records `worker, worker + workers, ...` below `records`.
    Load { records: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    Closed,
    /// Total operations per second over all workers.
    Open {
        rate: f64,
    },
}

/// When things happen; shared by all workers of a run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub start: Instant,
    /// Operations intended from here on are measured (end of warm-up).
    pub measure_from: Instant,
    /// No operation intended from here on is started.
    pub end: Instant,
    /// Operations still outstanding here are given up.
    pub give_up: Instant,
}

/// Progress of one worker over the last second or so.
pub struct Interval {
    pub worker: usize,
    pub elapsed: Duration,
    pub ops: u64,
    pub hist: Histogram<u64>,
}

pub struct WorkerSpec {
    pub index: usize,
    pub workers: usize,
    pub cpu: Option<usize>,
    pub groups: usize,
    pub pipeline: usize,
    pub pace: Pace,
    pub source: Source,
    pub endpoints: Vec<SocketAddr>,
    pub router: Box<dyn Router>,
    pub make_codec: Arc<dyn Fn() -> Codec + Send + Sync>,
    pub connect: Arc<dyn Fn(SocketAddr) -> Result<TcpStream> + Send + Sync>,
    pub value_size: ValueSize,
    /// Send ringkv writes without a context (blind writes become siblings).
    pub blind_writes: bool,
    pub seed: u64,
    pub busy_poll: bool,
    /// Client-driven reads at this level (`--reads client`); None: every
    /// read goes through a coordinator.
    pub copy_reads: Option<ringkv_net::proto::Level>,
    pub progress: Option<Sender<Interval>>,
    /// The last ringkv context seen per record, carried from phase to phase
    /// (empty: keep none, e.g. for other targets or `--blind-writes`).
    pub contexts: Vec<Vec<u8>>,
}

/// What a worker hands back.
pub struct WorkerResult {
    pub stats: RunStats,
    /// The CPU it was pinned to, or where it last ran.
    pub cpu: Option<usize>,
    pub pinned: bool,
    /// The context cache, handed back for the next phase.
    pub contexts: Vec<Vec<u8>>,
    /// Which io_uring setup it got.
    pub ring_flags: &'static str,
}

const RECV: u64 = 1;
const SEND: u64 = 2;
/// The periodic tick's user data (not a connection).
const TICK: u64 = 3;
/// A standing timeout wakes the worker this often, so waits that need no
/// precise deadline arm no timer of their own (arming an hrtimer on every
/// wait costs microseconds of CPU on a VM).
const TICK_EVERY: Duration = Duration::from_millis(50);
/// Pending-table marker for an ASKING whose `+OK` is read and dropped.
const ASKING_SLOT: u32 = u32::MAX;
const MIN_RECV_SPACE: usize = 16 * 1024;
const REPORT_EVERY: Duration = Duration::from_secs(1);
const MAX_REDIRECTS: u8 = 5;
/// The longest one attempt waits before the next replica is asked.
pub const MAX_ATTEMPT: Duration = Duration::from_secs(2);

struct Conn {
    stream: TcpStream,
    endpoint: usize,
    codec: Codec,
    in_order: bool,
    /// Requests encoded since the last send was submitted.
    queued: Vec<u8>,
    /// The bytes of the send in flight; untouched until it completes.
    sending: Vec<u8>,
    sent: usize,
    send_busy: bool,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// (request id, operation slot, the slot's attempt) in send order.
    pending: VecDeque<(u64, u32, u32)>,
    dirty: bool,
    /// Broke (reset or closed): nothing is sent on it again.
    dead: bool,
}

impl Conn {
    /// Queues `req` as attempt `gen` of operation `slot`; true when the
    /// connection just became dirty (its send is still to be submitted).
    fn enqueue(&mut self, req: WireReq<'_>, slot: u32, gen: u32) -> bool {
        let id = self.codec.encode(req, &mut self.queued);
        self.pending.push_back((id, slot, gen));
        !std::mem::replace(&mut self.dirty, true)
    }
}

struct Op {
    kind: OpKind,
    record: u64,
    key: Vec<u8>,
    value_len: usize,
    intended: Instant,
    group: u32,
    /// A read-modify-write that has done its read.
    writing: bool,
    context: Vec<u8>,
    measured: bool,
    redirects: u8,
    /// Send the next attempt to this endpoint after ASKING (Redis ASK).
    ask: Option<usize>,
    /// In use (not on the free list).
    live: bool,
    /// Bumped at every attempt of every operation in this slot, so an
    /// answer to an abandoned attempt is known and dropped.
    gen: u32,
    /// Endpoints this operation tried (failover; capacity kept).
    tried: Vec<usize>,
    /// When the current attempt was sent, and where.
    sent_at: Instant,
    endpoint: usize,
    /// Copy answers the current client-driven read still waits for (0: not
    /// reading copies); the endpoints awaited are in `tried`.
    copies: u8,
    /// The first copy's answer: found, values hash, context hash.
    copy_answer: Option<(bool, u64, u64)>,
    copies_differ: bool,
    /// Read through a coordinator from now on (the copies did not do).
    coordinated: bool,
}

/// What the worker knows of each endpoint, for failover (module doc).
struct Failover {
    /// Whether the router knows more than one replica per key.
    enabled: bool,
    latencies: RecentLatencies,
    /// Per endpoint: failures in a row, and until when it is tried last.
    health: Vec<(u32, Option<Instant>)>,
    scratch: Vec<usize>,
}

impl Failover {
    fn deadline(&self) -> Duration {
        attempt_deadline(self.latencies.p99_us(), MAX_ATTEMPT)
    }

    fn failed(&mut self, endpoint: usize, now: Instant) {
        let h = &mut self.health[endpoint];
        h.0 += 1;
        h.1 = Some(now + down_backoff(h.0));
    }

    fn answered(&mut self, endpoint: usize, sent_at: Instant, now: Instant) {
        self.latencies.record(now.saturating_duration_since(sent_at).as_micros() as u64);
        self.health[endpoint] = (0, None);
    }

    fn is_down(&self, endpoint: usize, now: Instant) -> bool {
        self.health[endpoint].1.is_some_and(|until| until > now)
    }
}

struct Group {
    /// Connection index per endpoint.
    conns: Vec<u32>,
    outstanding: usize,
}

struct Worker {
    spec_index: usize,
    pace: Pace,
    pipeline: usize,
    timing: Timing,
    source: Source,
    load_next: u64,
    load_stride: u64,
    rng: Rng,
    router: Box<dyn Router>,
    endpoints: Vec<SocketAddr>,
    value_size: ValueSize,
    value: Vec<u8>,
    blind_writes: bool,
    /// The last context seen per record (ringkv), so updates replace what
    /// this client saw instead of piling up siblings.
    contexts: Vec<Vec<u8>>,
    conns: Vec<Conn>,
    groups: Vec<Group>,
    ops: Vec<Op>,
    free: Vec<u32>,
    outstanding: usize,
    dirty: Vec<u32>,
    /// Submitted io_uring requests not yet completed.
    inflight: usize,
    schedule: Option<Schedule>,
    cursor: usize,
    ended: bool,
    stats: RunStats,
    interval: OpStats,
    interval_ops: u64,
    failover: Failover,
    copy_reads: Option<usize>,
}

pub fn run(spec: WorkerSpec, timing_rx: impl FnOnce() -> Result<Timing>) -> Result<WorkerResult> {
    // Timed waits (the open loop's next send) may otherwise be served up to
    // the default 50 us timer slack late.
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let pinned = match spec.cpu {
        Some(c) => {
            crate::cpu::pin(c)?;
            true
        }
        None => false,
    };
    // Connect every group to every endpoint before the clock starts. The
    // run's start is awaited even when connecting failed, so that the other
    // workers are not left waiting for this one.
    let connected = connect_all(&spec);
    let timing = timing_rx();
    let (conns, groups) = connected?;
    let timing = timing?;
    let (mut ring, ring_flags) = make_ring(conns.len(), spec.busy_poll)?;
    let slots = spec.groups * spec.pipeline;
    // The most replicas the router knows for a key (one: no failover).
    let replicas = spec.router.most_replicas();
    let replicated = replicas > 1;
    let endpoints = spec.endpoints.len();
    let mut w = Worker {
        spec_index: spec.index,
        pace: spec.pace,
        pipeline: spec.pipeline,
        timing,
        load_next: spec.index as u64,
        load_stride: spec.workers as u64,
        source: spec.source,
        rng: Rng::new(spec.seed.wrapping_mul(0x9E37_79B9).wrapping_add(spec.index as u64)),
        router: spec.router,
        endpoints: spec.endpoints,
        value_size: spec.value_size,
        value: (0..spec.value_size.max).map(|i| b'a' + (i % 26) as u8).collect(),
        blind_writes: spec.blind_writes,
        contexts: spec.contexts,
        conns,
        groups,
        ops: (0..slots)
            .map(|_| Op {
                kind: OpKind::Read,
                record: 0,
                key: Vec::with_capacity(32),
                value_len: 0,
                intended: timing.start,
                group: 0,
                writing: false,
                context: Vec::with_capacity(64),
                measured: false,
                redirects: 0,
                ask: None,
                live: false,
                gen: 0,
                tried: Vec::with_capacity(4),
                sent_at: timing.start,
                endpoint: 0,
                copies: 0,
                copy_answer: None,
                copies_differ: false,
                coordinated: false,
            })
            .collect(),
        free: (0..slots as u32).rev().collect(),
        outstanding: 0,
        dirty: Vec::new(),
        inflight: 0,
        schedule: match spec.pace {
            Pace::Open { rate } => Some(Schedule::new(timing.start, rate, spec.index, spec.workers)),
            Pace::Closed => None,
        },
        cursor: 0,
        ended: false,
        stats: RunStats::default(),
        interval: OpStats::default(),
        interval_ops: 0,
        failover: Failover {
            enabled: replicated,
            latencies: RecentLatencies::new(SAMPLES),
            health: vec![(0, None); endpoints],
            scratch: Vec::new(),
        },
        // Only where the router knows every replica of a key.
        copy_reads: spec.copy_reads.filter(|_| replicated).and_then(|level| level.resolve(replicas)),
    };
    let outcome = w.event_loop(&mut ring, spec.busy_poll, spec.progress.as_ref());
    // Whatever happened, no request may still point into our buffers when
    // they are freed.
    w.quiesce(&mut ring);
    outcome?;
    let cpu = if pinned { spec.cpu } else { crate::cpu::current_cpu() };
    Ok(WorkerResult { stats: w.stats, cpu, pinned, contexts: std::mem::take(&mut w.contexts), ring_flags })
}

fn connect_all(spec: &WorkerSpec) -> Result<(Vec<Conn>, Vec<Group>)> {
    let mut conns = Vec::new();
    let mut groups = Vec::new();
    for _ in 0..spec.groups {
        let mut g = Group { conns: Vec::new(), outstanding: 0 };
        for (e, addr) in spec.endpoints.iter().enumerate() {
            let stream =
                (spec.connect)(*addr).with_context(|| format!("worker {}: connecting to {addr}", spec.index))?;
            let codec = (spec.make_codec)();
            g.conns.push(conns.len() as u32);
            conns.push(Conn {
                stream,
                endpoint: e,
                in_order: codec.in_order(),
                codec,
                queued: Vec::with_capacity(8 * 1024),
                sending: Vec::with_capacity(8 * 1024),
                sent: 0,
                send_busy: false,
                rbuf: vec![0; 64 * 1024],
                rstart: 0,
                rend: 0,
                pending: VecDeque::with_capacity(spec.pipeline + 1),
                dirty: false,
                dead: false,
            });
        }
        groups.push(g);
    }
    Ok((conns, groups))
}

/// A ring for `conns` connections: one receive and one send each. Prefers
/// deferred task running (completions are processed only when we ask, on
/// this thread), falling back for older kernels.
fn make_ring(conns: usize, busy_poll: bool) -> Result<(IoUring, &'static str)> {
    let entries = (2 * conns + 8).next_power_of_two() as u32;
    if !busy_poll {
        if let Ok(r) = IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(entries) {
            return Ok((r, "single-issuer,defer-taskrun"));
        }
        if let Ok(r) = IoUring::builder().setup_coop_taskrun().build(entries) {
            return Ok((r, "coop-taskrun"));
        }
    }
    // Busy polling needs completions posted without our entering the kernel.
    Ok((IoUring::new(entries).context("creating an io_uring")?, "plain"))
}

fn push(ring: &mut IoUring, inflight: &mut usize, sqe: &io_uring::squeue::Entry) -> Result<()> {
    *inflight += 1;
    loop {
        // SAFETY: every buffer a submitted entry points into belongs to a
        // connection that outlives the ring's use of it: receive buffers are
        // not touched while `recv` is in flight and send buffers not while
        // `send_busy`, and the worker waits for nothing after the loop ends
        // (the ring is dropped before the connections' buffers).
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit().context("io_uring submit")?;
    }
}

impl Worker {
    fn event_loop(&mut self, ring: &mut IoUring, busy_poll: bool, progress: Option<&Sender<Interval>>) -> Result<()> {
        for c in 0..self.conns.len() {
            self.arm_recv(ring, c)?;
        }
        let tick = types::Timespec::from(TICK_EVERY);
        let arm_tick = |ring: &mut IoUring, inflight: &mut usize| {
            let sqe = opcode::Timeout::new(&tick).build().user_data(TICK);
            push(ring, inflight, &sqe)
        };
        if !busy_poll {
            arm_tick(ring, &mut self.inflight)?;
        }
        let mut measuring = false;
        let mut cpu_at_measure = 0;
        let mut cpu_done = false;
        let mut last_report = Instant::now();
        let mut now = Instant::now();
        if self.pace == Pace::Closed {
            // Wait for the common start so workers begin together.
            if let Some(d) = self.timing.start.checked_duration_since(now) {
                std::thread::sleep(d);
            }
            now = Instant::now();
            for g in 0..self.groups.len() {
                for _ in 0..self.pipeline {
                    if !self.start_op(g, now, now) {
                        break;
                    }
                }
            }
        }
        let mut completions: Vec<(u64, i32)> = Vec::with_capacity(256);
        loop {
            if !measuring && now >= self.timing.measure_from {
                measuring = true;
                cpu_at_measure = crate::cpu::thread_cpu_ns();
            }
            if !self.ended && now >= self.timing.end {
                self.ended = true;
            }
            if self.ended && !cpu_done {
                cpu_done = true;
                self.stats.cpu_ns = crate::cpu::thread_cpu_ns().saturating_sub(cpu_at_measure);
            }
            if matches!(self.pace, Pace::Open { .. }) {
                self.dispatch_due(now);
            }
            self.fail_over_late(now);
            self.flush(ring)?;
            if self.finished(now) {
                break;
            }
            if now >= self.timing.give_up {
                self.give_up();
                break;
            }
            if now.duration_since(last_report) >= REPORT_EVERY {
                if let Some(tx) = progress {
                    let hist = std::mem::replace(&mut self.interval.hist, new_hist());
                    let _ = tx.send(Interval {
                        worker: self.spec_index,
                        elapsed: now.duration_since(last_report),
                        ops: self.interval_ops,
                        hist,
                    });
                }
                self.interval_ops = 0;
                last_report = now;
            }

            // Sleep until a completion or the next thing to do.
            if busy_poll {
                if ring.submission().is_empty() {
                    std::hint::spin_loop();
                } else {
                    ring.submit().context("io_uring submit")?;
                }
            } else {
                let deadline = self.next_deadline(last_report + REPORT_EVERY, measuring);
                let wait = deadline.saturating_duration_since(now);
                let ts = types::Timespec::from(wait);
                let args = types::SubmitArgs::new().timespec(&ts);
                let waited = if wait > TICK_EVERY {
                    ring.submitter().submit_and_wait(1)
                } else {
                    ring.submitter().submit_with_args(1, &args)
                };
                match waited {
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {
                    }
                    Err(e) => return Err(e).context("io_uring wait"),
                }
            }
            completions.clear();
            completions.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            now = Instant::now();
            self.inflight -= completions.len();
            for &(ud, res) in &completions {
                let conn = (ud >> 2) as usize;
                match ud & 3 {
                    RECV => self.on_recv(ring, conn, res, now)?,
                    SEND => self.on_send(ring, conn, res, now)?,
                    TICK => arm_tick(ring, &mut self.inflight)?,
                    _ => bail!("unknown completion {ud:#x}"),
                }
            }
        }
        if !cpu_done {
            self.stats.cpu_ns = crate::cpu::thread_cpu_ns().saturating_sub(cpu_at_measure);
        }
        Ok(())
    }

    /// Shuts the sockets down so every receive and send in flight completes,
    /// and waits (a bounded time) for their completions.
    fn quiesce(&mut self, ring: &mut IoUring) {
        for c in &self.conns {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.inflight > 0 && Instant::now() < deadline {
            let ts = types::Timespec::from(Duration::from_millis(100));
            let _ = ring.submitter().submit_with_args(1, &types::SubmitArgs::new().timespec(&ts));
            let n = ring.completion().count();
            self.inflight = self.inflight.saturating_sub(n);
        }
        if self.inflight > 0 {
            // Never free memory the kernel may still write to.
            std::mem::forget(std::mem::take(&mut self.conns));
        }
    }

    fn next_deadline(&self, report: Instant, measuring: bool) -> Instant {
        let mut d = report.min(self.timing.give_up);
        if !measuring {
            d = d.min(self.timing.measure_from);
        }
        if !self.ended {
            d = d.min(self.timing.end);
        }
        if let Some(s) = &self.schedule {
            let next = s.next_due();
            if next < self.timing.end && self.outstanding < self.groups.len() * self.pipeline {
                d = d.min(next);
            }
        }
        d
    }

    /// Done: nothing outstanding and nothing more to start.
    fn finished(&self, now: Instant) -> bool {
        if self.outstanding > 0 {
            return false;
        }
        match (&self.source, &self.schedule) {
            (Source::Load { records }, _) => self.load_next >= *records,
            (_, Some(s)) => now >= self.timing.end && s.next_due() >= self.timing.end,
            (_, None) => self.ended,
        }
    }

    /// Counts what is left at the give-up time as errors.
    fn give_up(&mut self) {
        let live: Vec<u32> = (0..self.ops.len() as u32).filter(|&s| self.ops[s as usize].live).collect();
        for s in live {
            let op = &self.ops[s as usize];
            if op.measured {
                let kind = op.kind;
                self.stats.op(kind).record_error("unfinished-at-end");
            }
        }
        if let Some(s) = &self.schedule {
            let due = s.due_before(self.timing.end);
            let skipped = due.saturating_sub(s.taken());
            // Split the unsent evenly is impossible (their kinds were never
            // drawn); they are reported as their own error kind.
            self.stats.send_lag.add_errors("not-sent-at-end", skipped);
        }
    }

    fn dispatch_due(&mut self, now: Instant) {
        let groups = self.groups.len();
        loop {
            let Some(s) = &self.schedule else { return };
            let next = s.next_due();
            if next > now || next >= self.timing.end {
                return;
            }
            // The next group with room, round robin.
            let Some(g) =
                (0..groups).map(|i| (self.cursor + i) % groups).find(|&g| self.groups[g].outstanding < self.pipeline)
            else {
                return;
            };
            self.cursor = (g + 1) % groups;
            let intended = self.schedule.as_mut().map(Schedule::take).unwrap_or(now);
            if !self.start_op(g, intended, now) {
                return;
            }
        }
    }

    /// Starts the next operation in group `g`; false when there is none.
    fn start_op(&mut self, g: usize, intended: Instant, now: Instant) -> bool {
        let (kind, record) = match &mut self.source {
            Source::Load { records } => {
                if self.load_next >= *records {
                    return false;
                }
                let r = self.load_next;
                self.load_next += self.load_stride;
                (OpKind::Insert, r)
            }
            Source::Workload { mix, chooser, keys } => {
                let kind = mix.choose(&mut self.rng);
                let record = match kind {
                    OpKind::Insert => keys.claim_insert(),
                    _ => chooser.next(&mut self.rng, keys.readable().max(1)),
                };
                (kind, record)
            }
        };
        let Some(slot) = self.free.pop() else { return false };
        let measured = matches!(self.source, Source::Load { .. })
            || (intended >= self.timing.measure_from && intended < self.timing.end);
        let value_len = self.value_size.sample(&mut self.rng);
        let op = &mut self.ops[slot as usize];
        op.kind = kind;
        op.record = record;
        write_key(&mut op.key, record);
        op.value_len = value_len;
        op.intended = intended;
        op.group = g as u32;
        op.writing = matches!(kind, OpKind::Update | OpKind::Insert);
        op.context.clear();
        if op.writing {
            if let Some(c) = self.contexts.get(record as usize) {
                op.context.extend_from_slice(c);
            }
        }
        op.measured = measured;
        op.redirects = 0;
        op.ask = None;
        op.live = true;
        op.tried.clear();
        op.copies = 0;
        op.coordinated = false;
        self.groups[g].outstanding += 1;
        self.outstanding += 1;
        if measured && self.schedule.is_some() {
            self.stats.send_lag.record(now.saturating_duration_since(intended).as_nanos() as u64);
        }
        self.issue(slot, now);
        true
    }

    /// The endpoint for the operation's next attempt: its key's first
    /// replica, or with failover the first it has not tried, endpoints in
    /// their back-off last and broken connections never (module doc).
    fn choose(&mut self, slot: u32, now: Instant) -> Option<usize> {
        let op = &self.ops[slot as usize];
        if !self.failover.enabled {
            return Some(self.router.endpoint_for(&op.key));
        }
        let mut order = std::mem::take(&mut self.failover.scratch);
        self.router.replicas_for(&op.key, &mut order);
        let conns = &self.groups[op.group as usize].conns;
        order.retain(|e| !op.tried.contains(e) && !self.conns[conns[*e] as usize].dead);
        let chosen = order.iter().copied().find(|&e| !self.failover.is_down(e, now)).or(order.first().copied());
        self.failover.scratch = order;
        chosen
    }

    /// Puts the operation's current request on its connection's queue (or
    /// ends it when no replica is left to try).
    fn issue(&mut self, slot: u32, now: Instant) {
        let op = &self.ops[slot as usize];
        if let Some(r) = self.copy_reads {
            if !op.writing && !op.coordinated && op.ask.is_none() {
                if self.issue_copies(slot, r, now) {
                    return;
                }
                self.ops[slot as usize].coordinated = true;
            }
        }
        let endpoint = match self.ops[slot as usize].ask {
            Some(e) => e,
            None => match self.choose(slot, now) {
                Some(e) => e,
                None => return self.complete(slot, now, Some("no-replica-answered")),
            },
        };
        let op = &mut self.ops[slot as usize];
        op.gen = op.gen.wrapping_add(1);
        op.sent_at = now;
        op.endpoint = endpoint;
        if self.failover.enabled {
            op.tried.push(endpoint);
        }
        let ci = self.groups[op.group as usize].conns[endpoint];
        let conn = &mut self.conns[ci as usize];
        if op.ask.take().is_some() {
            conn.codec.encode(WireReq::Asking, &mut conn.queued);
            conn.pending.push_back((0, ASKING_SLOT, 0));
        }
        let req = if op.writing {
            WireReq::Put {
                key: &op.key,
                value: &self.value[..op.value_len],
                context: if self.blind_writes { &[] } else { &op.context },
            }
        } else {
            WireReq::Get { key: &op.key, value_len: op.value_len }
        };
        if conn.enqueue(req, slot, op.gen) {
            self.dirty.push(ci);
        }
        if op.measured {
            self.stats.wire_requests += 1;
        }
    }

    /// Asks the first `r` replicas of the operation's key that are up for
    /// their copies; false (nothing sent) when fewer than `r` are.
    fn issue_copies(&mut self, slot: u32, r: usize, now: Instant) -> bool {
        let mut order = std::mem::take(&mut self.failover.scratch);
        let op = &mut self.ops[slot as usize];
        self.router.replicas_for(&op.key, &mut order);
        let conns = &self.groups[op.group as usize].conns;
        order.retain(|&e| !self.conns[conns[e] as usize].dead && !self.failover.is_down(e, now));
        if order.len() < r {
            self.failover.scratch = order;
            return false;
        }
        op.gen = op.gen.wrapping_add(1);
        op.sent_at = now;
        op.endpoint = order[0];
        op.copies = r as u8;
        op.copy_answer = None;
        op.copies_differ = false;
        op.tried.clear();
        for &e in &order[..r] {
            op.tried.push(e);
            let ci = conns[e];
            if self.conns[ci as usize].enqueue(WireReq::GetCopy { key: &op.key }, slot, op.gen) {
                self.dirty.push(ci);
            }
            if op.measured {
                self.stats.wire_requests += 1;
            }
        }
        self.failover.scratch = order;
        true
    }

    /// A client-driven read that its copies could not answer: read again
    /// through a coordinator (answers still due to this attempt are
    /// dropped, as `issue` starts a new one).
    fn read_coordinated(&mut self, slot: u32, now: Instant) {
        let op = &mut self.ops[slot as usize];
        op.copies = 0;
        op.coordinated = true;
        op.tried.clear();
        self.issue(slot, now);
    }

    fn flush(&mut self, ring: &mut IoUring) -> Result<()> {
        while let Some(ci) = self.dirty.pop() {
            let c = &mut self.conns[ci as usize];
            c.dirty = false;
            if c.dead || c.send_busy || c.queued.is_empty() {
                continue;
            }
            std::mem::swap(&mut c.queued, &mut c.sending);
            c.sent = 0;
            c.send_busy = true;
            self.submit_send(ring, ci as usize)?;
        }
        Ok(())
    }

    fn submit_send(&mut self, ring: &mut IoUring, ci: usize) -> Result<()> {
        let c = &self.conns[ci];
        let rest = &c.sending[c.sent..];
        let sqe = opcode::Send::new(types::Fd(c.stream.as_raw_fd()), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(((ci as u64) << 2) | SEND);
        push(ring, &mut self.inflight, &sqe)
    }

    fn arm_recv(&mut self, ring: &mut IoUring, ci: usize) -> Result<()> {
        let c = &mut self.conns[ci];
        if c.rstart == c.rend {
            c.rstart = 0;
            c.rend = 0;
        } else if c.rbuf.len() - c.rend < MIN_RECV_SPACE {
            c.rbuf.copy_within(c.rstart..c.rend, 0);
            c.rend -= c.rstart;
            c.rstart = 0;
            if c.rbuf.len() - c.rend < MIN_RECV_SPACE {
                let grown = c.rbuf.len() * 2;
                if grown > 2 * ringkv_net::session::CLIENT_MAX_FRAME_BYTES {
                    bail!("a reply from {} does not fit in the receive buffer", self.endpoints[c.endpoint]);
                }
                c.rbuf.resize(grown, 0);
            }
        }
        let space = &mut c.rbuf[c.rend..];
        let sqe = opcode::Recv::new(types::Fd(c.stream.as_raw_fd()), space.as_mut_ptr(), space.len() as u32)
            .build()
            .user_data(((ci as u64) << 2) | RECV);
        push(ring, &mut self.inflight, &sqe)
    }

    fn on_send(&mut self, ring: &mut IoUring, ci: usize, res: i32, now: Instant) -> Result<()> {
        if self.conns[ci].dead {
            self.conns[ci].send_busy = false;
            return Ok(());
        }
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res);
            if self.failover.enabled {
                self.break_conn(ci, now);
                self.conns[ci].send_busy = false;
                return Ok(());
            }
            bail!("sending to {}: {e}", self.endpoints[self.conns[ci].endpoint]);
        }
        let c = &mut self.conns[ci];
        c.sent += res as usize;
        if c.sent < c.sending.len() {
            return self.submit_send(ring, ci);
        }
        c.sending.clear();
        c.send_busy = false;
        if !c.queued.is_empty() && !c.dirty {
            c.dirty = true;
            self.dirty.push(ci as u32);
        }
        Ok(())
    }

    fn on_recv(&mut self, ring: &mut IoUring, ci: usize, res: i32, now: Instant) -> Result<()> {
        let endpoint = self.endpoints[self.conns[ci].endpoint];
        if res < 0 && (-res == libc::EINTR || -res == libc::EAGAIN) {
            return self.arm_recv(ring, ci);
        }
        if res <= 0 && self.failover.enabled {
            // Its requests go to other replicas; the receive is not armed again.
            self.break_conn(ci, now);
            return Ok(());
        }
        if res == 0 {
            bail!("{endpoint} closed the connection");
        }
        if res < 0 {
            bail!("receiving from {endpoint}: {}", std::io::Error::from_raw_os_error(-res));
        }
        self.conns[ci].rend += res as usize;
        loop {
            let c = &mut self.conns[ci];
            let Some((reply, used)) =
                c.codec.parse(&c.rbuf[c.rstart..c.rend]).with_context(|| format!("reply from {endpoint}"))?
            else {
                break;
            };
            c.rstart += used;
            self.on_reply(ci, reply, now)?;
        }
        self.arm_recv(ring, ci)
    }

    fn on_reply(&mut self, ci: usize, reply: Reply, now: Instant) -> Result<()> {
        let c = &mut self.conns[ci];
        let entry = if c.in_order {
            c.pending.pop_front()
        } else {
            c.pending.iter().position(|&(id, _, _)| id == reply.id).and_then(|i| c.pending.remove(i))
        };
        let Some((_, slot, gen)) = entry else {
            bail!("{} answered a request we did not send (id {})", self.endpoints[c.endpoint], reply.id);
        };
        if slot == ASKING_SLOT {
            return Ok(());
        }
        let op = &self.ops[slot as usize];
        if !op.live || op.gen != gen {
            // The late answer to an attempt that was given up on.
            return Ok(());
        }
        let endpoint = self.conns[ci].endpoint;
        if self.failover.enabled {
            self.failover.answered(endpoint, op.sent_at, now);
        }
        if op.copies > 0 {
            return self.on_copy(slot, endpoint, reply, now);
        }
        match reply.outcome {
            Outcome::Redirect(r) => self.redirect(slot, r, now),
            Outcome::Error(kind) => {
                self.complete(slot, now, Some(&kind));
                Ok(())
            }
            Outcome::Ok { found } => {
                self.answered(slot, found, &reply.context, now);
                Ok(())
            }
        }
    }

    /// One copy's answer to a client-driven read (module doc).
    fn on_copy(&mut self, slot: u32, endpoint: usize, reply: Reply, now: Instant) -> Result<()> {
        let measured = self.ops[slot as usize].measured;
        let Outcome::Ok { found } = reply.outcome else {
            self.stats.copy_fallbacks += u64::from(measured);
            self.read_coordinated(slot, now);
            return Ok(());
        };
        let answer = (found, reply.values, xxhash_rust::xxh3::xxh3_64(&reply.context));
        let op = &mut self.ops[slot as usize];
        match op.copy_answer {
            None => op.copy_answer = Some(answer),
            Some(first) => op.copies_differ |= first != answer,
        }
        op.tried.retain(|&e| e != endpoint);
        op.copies -= 1;
        if op.copies > 0 {
            return Ok(());
        }
        if op.copies_differ {
            self.stats.copy_fallbacks += u64::from(measured);
            self.read_coordinated(slot, now);
        } else {
            self.stats.copy_reads += u64::from(measured);
            op.tried.clear();
            self.answered(slot, found, &reply.context, now);
        }
        Ok(())
    }

    /// A successful answer: a read-modify-write goes on to its write, any
    /// other operation is done.
    fn answered(&mut self, slot: u32, found: bool, context: &[u8], now: Instant) {
        let op = &mut self.ops[slot as usize];
        if let Some(c) = self.contexts.get_mut(op.record as usize) {
            c.clear();
            c.extend_from_slice(context);
        }
        if op.kind == OpKind::Rmw && !op.writing {
            op.writing = true;
            op.context.clear();
            op.context.extend_from_slice(context);
            op.tried.clear();
            self.issue(slot, now);
            return;
        }
        if op.kind == OpKind::Read && !found && op.measured {
            self.stats.op(OpKind::Read).not_found += 1;
        }
        if op.kind == OpKind::Insert {
            if let Source::Workload { keys, .. } = &self.source {
                keys.insert_acked(op.record);
            }
        }
        self.complete(slot, now, None);
    }

    fn redirect(&mut self, slot: u32, r: Redirect, now: Instant) -> Result<()> {
        let (slot_no, addr, ask) = match r {
            Redirect::Moved { slot, addr } => (slot, addr, false),
            Redirect::Ask { slot, addr } => (slot, addr, true),
        };
        let Some(endpoint) = self.endpoints.iter().position(|e| *e == addr) else {
            self.complete(slot, now, Some("redirect-to-unknown-node"));
            return Ok(());
        };
        let op = &mut self.ops[slot as usize];
        op.redirects += 1;
        if op.redirects > MAX_REDIRECTS {
            self.complete(slot, now, Some("too-many-redirects"));
            return Ok(());
        }
        if ask {
            op.ask = Some(endpoint);
        } else {
            self.router.moved(slot_no, endpoint);
        }
        self.issue(slot, now);
        Ok(())
    }

    /// Sends every operation whose attempt has waited past the deadline to
    /// its next replica (failover).
    fn fail_over_late(&mut self, now: Instant) {
        if !self.failover.enabled || self.outstanding == 0 {
            return;
        }
        let deadline = self.failover.deadline();
        for slot in 0..self.ops.len() as u32 {
            let op = &self.ops[slot as usize];
            if op.live && now.saturating_duration_since(op.sent_at) >= deadline {
                self.stats.failovers += 1;
                if op.copies > 0 {
                    // The copies not yet answered are the late ones.
                    let late = std::mem::take(&mut self.ops[slot as usize].tried);
                    for &e in &late {
                        self.failover.failed(e, now);
                    }
                    self.ops[slot as usize].tried = late;
                    self.read_coordinated(slot, now);
                    continue;
                }
                self.failover.failed(op.endpoint, now);
                self.issue(slot, now);
            }
        }
    }

    /// A connection broke: nothing is sent on it again, and what was
    /// outstanding on it goes to the next replica (failover).
    fn break_conn(&mut self, ci: usize, now: Instant) {
        let c = &mut self.conns[ci];
        if c.dead {
            return;
        }
        c.dead = true;
        c.queued.clear();
        let endpoint = c.endpoint;
        let pending: Vec<(u64, u32, u32)> = c.pending.drain(..).collect();
        self.failover.failed(endpoint, now);
        for (_, slot, gen) in pending {
            let live = self.ops.get(slot as usize).is_some_and(|op| op.live && op.gen == gen);
            if live {
                self.stats.failovers += 1;
                if self.ops[slot as usize].copies > 0 {
                    self.read_coordinated(slot, now);
                } else {
                    self.issue(slot, now);
                }
            }
        }
    }

    /// Ends an operation: records it, frees its slot and, in a closed loop,
    /// starts the group's next one.
    fn complete(&mut self, slot: u32, now: Instant, error: Option<&str>) {
        let op = &self.ops[slot as usize];
        let (kind, group, intended, measured) = (op.kind, op.group as usize, op.intended, op.measured);
        let latency = now.saturating_duration_since(intended).as_nanos() as u64;
        if measured {
            match error {
                None => self.stats.op(kind).record(latency),
                Some(e) => self.stats.op(kind).record_error(e),
            }
        }
        if now >= self.timing.measure_from && now <= self.timing.end {
            self.stats.completed_in_window += 1;
        }
        if error.is_none() {
            self.interval.record(latency);
        }
        self.interval_ops += 1;
        self.groups[group].outstanding -= 1;
        self.outstanding -= 1;
        self.ops[slot as usize].live = false;
        self.free.push(slot);
        if self.pace == Pace::Closed && !self.ended && now < self.timing.end {
            self.start_op(group, now, now);
        }
    }
}

/// Splits `total` as evenly as possible into `parts`.
pub fn split(total: usize, parts: usize) -> Vec<usize> {
    (0..parts).map(|i| total / parts + usize::from(i < total % parts)).collect()
}

/// Checks a worker layout before connecting anything.
pub fn check_layout(concurrency: usize, threads: usize, pipeline: usize) -> Result<()> {
    if threads == 0 || concurrency == 0 || pipeline == 0 {
        return Err(anyhow!("--threads, --concurrency and --pipeline must be positive"));
    }
    if concurrency < threads {
        return Err(anyhow!("--concurrency {concurrency} is less than --threads {threads}"));
    }
    if pipeline > 1024 {
        return Err(anyhow!("--pipeline is at most 1024 (ringkv's in-flight limit per connection)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_split_evenly() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(2, 2), vec![1, 1]);
        assert!(check_layout(1, 2, 1).is_err());
        assert!(check_layout(4, 2, 2000).is_err());
        assert!(check_layout(4, 2, 1).is_ok());
    }
}
