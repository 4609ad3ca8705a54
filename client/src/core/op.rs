//! One request's journey across replicas, as a state machine with no I/O.
//!
//! An [`Operation`] holds a request, the endpoints to try (from the
//! [`Router`]), and the attempts in flight, and says what to do next as
//! [`Action`]s: send to an endpoint, give up on an attempt, or finish. The
//! shell carries the actions out and feeds back answers
//! ([`Operation::on_response`]) and the passing of time
//! ([`Operation::on_timeout`] at [`Operation::poll_timeout`]).
//!
//! The rules:
//!
//! 1. The first replica gets the attempt deadline (twice the observed p99,
//!    bounded); the last untried one gets all the time left.
//! 2. An attempt that misses its deadline, or whose connection fails, or
//!    that the node refuses as overloaded, moves the request to the next
//!    replica (any replica coordinates a request). That holds for writes
//!    too: a write sent again carries the same context, so a duplicate is
//!    at worst a sibling of equal value that the next read merges.
//! 3. A node's verdict on the request (`Unavailable`, `PairTooLarge`, its
//!    own `Timeout`, ...) finishes the operation: another coordinator
//!    would reach the same replicas.
//! 4. Reads only: if the first replica has not answered after the hedge
//!    delay (the observed p99), the next one is asked as well and the first
//!    answer wins. Writes are never hedged (each copy would add work and,
//!    without a context, a sibling).
//! 5. Once every replica was tried, those that failed only by being slow
//!    are tried again with the time left shared out (a fault can slow every
//!    coordinator for a moment).
//! 6. The operation finishes by its overall deadline, with `Timeout` if no
//!    answer came.
//! 7. A client-driven read ([`Operation::read_copies_first`]) first asks
//!    the first r replicas for their own copies (`GetCopy`) at once, each
//!    with the attempt deadline. All r answering the same is the answer;
//!    a disagreement, a refusal (not a replica, partition moving, an older
//!    node), a failed or late copy abandons the rest and reads through a
//!    coordinator under rules 1-6, which merges the versions and repairs.
//!
//! Invariants: exactly one [`Action::Done`]; after it, nothing. Every
//! attempt that is neither answered nor failed when the operation ends is
//! abandoned with an [`Action::Abandon`], so its connection drops the late
//! answer.

use crate::core::route::Router;
use crate::error::Error;
use ringkv_net::proto::{Reply, Request};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Whether a request may be hedged (sent to two replicas at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An idempotent read: hedged, retried elsewhere.
    Read,
    /// A write: retried elsewhere on failure, never hedged.
    Write,
}

/// One attempt's handle, unique within its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptId(pub u32);

/// What the shell is to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Send `request` to `addr` as `attempt`, telling the node `timeout`.
    Send {
        /// The attempt this send is.
        attempt: AttemptId,
        /// The endpoint (a node's shard).
        addr: SocketAddr,
        /// What to send.
        request: Request,
        /// The time the node gets.
        timeout: Duration,
    },
    /// The attempt's answer is no longer wanted.
    Abandon {
        /// Which attempt.
        attempt: AttemptId,
    },
    /// The operation's outcome.
    Done(Result<Reply, Error>),
}

/// What an operation did, for metrics and spans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sends, all endpoints together.
    pub attempts: u32,
    /// Attempts made because an earlier one failed or was too slow.
    pub failovers: u32,
    /// Speculative reads.
    pub hedges: u32,
    /// Client-driven reads whose copies did not do, read through a
    /// coordinator instead (rule 7).
    pub copy_fallbacks: u32,
}

/// A client-driven read's copies (rule 7). While they are read, the
/// attempts in flight are exactly the copies still due.
#[derive(Debug)]
struct Copies {
    /// Copies to ask (r).
    wanted: usize,
    first: Option<ringkv_net::proto::GetResult>,
    agree: bool,
}

#[derive(Debug, Clone, Copy)]
struct Attempt {
    id: AttemptId,
    addr: SocketAddr,
    sent: Instant,
    deadline: Instant,
    /// Part of the second pass (its failure is not retried again).
    retry_pass: bool,
}

/// One request across replicas; see the module doc.
#[derive(Debug)]
pub struct Operation {
    kind: Kind,
    request: Request,
    route: Vec<SocketAddr>,
    next: usize,
    in_flight: Vec<Attempt>,
    slow: Vec<SocketAddr>,
    retry_pass: Option<VecDeque<SocketAddr>>,
    started: Instant,
    deadline: Instant,
    hedge_at: Option<Instant>,
    hedged: bool,
    next_attempt: u32,
    last_error: Option<Error>,
    done: bool,
    stats: Stats,
    copies: Option<Copies>,
}

impl Operation {
    /// An operation that sends `request` along `route` (in order) and must
    /// finish within `timeout` of `now`.
    pub fn new(kind: Kind, request: Request, route: Vec<SocketAddr>, now: Instant, timeout: Duration) -> Operation {
        Operation {
            kind,
            request,
            route,
            next: 0,
            in_flight: Vec::new(),
            slow: Vec::new(),
            retry_pass: None,
            started: now,
            deadline: now + timeout,
            hedge_at: None,
            hedged: false,
            next_attempt: 0,
            last_error: None,
            done: false,
            stats: Stats::default(),
            copies: None,
        }
    }

    /// Makes a get client-driven (rule 7): its r replicas are asked for
    /// their copies first. Left as it is when the request is not a get, or
    /// r is one or cannot be met by the route (a coordinator then says why).
    pub fn read_copies_first(mut self) -> Operation {
        if let Request::Get { r, .. } = &self.request {
            if let Some(n) = r.resolve(self.route.len()).filter(|&n| n > 1 && n <= self.route.len()) {
                self.copies = Some(Copies { wanted: n, first: None, agree: true });
            }
        }
        self
    }

    /// The request it carries.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Whether it finished.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// What it did so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// When it started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The first actions: the first send (or the end, if there is nowhere
    /// to send).
    pub fn start(&mut self, router: &mut Router, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if let (Some(c), Request::Get { key, .. }) = (self.copies.as_ref(), &self.request) {
            let (copy, wanted) = (Request::GetCopy { key: key.clone() }, c.wanted);
            let wait = router.attempt_deadline().min(self.deadline.saturating_duration_since(now));
            for i in 0..wanted {
                out.push(self.send(self.route[i], copy.clone(), now, wait, false));
            }
            return out;
        }
        self.start_coordinated(router, now, &mut out);
        out
    }

    fn start_coordinated(&mut self, router: &mut Router, now: Instant, out: &mut Vec<Action>) {
        if self.kind == Kind::Read && self.route.len() > 1 {
            self.hedge_at = router.hedge_delay().map(|d| now + d);
        }
        self.fill(router, now, out);
    }

    /// The copies did not do (rule 7): the rest are abandoned and the read
    /// goes through a coordinator.
    fn coordinate(&mut self, router: &mut Router, now: Instant, out: &mut Vec<Action>) {
        self.copies = None;
        self.stats.copy_fallbacks += 1;
        out.extend(self.in_flight.drain(..).map(|a| Action::Abandon { attempt: a.id }));
        self.start_coordinated(router, now, out);
    }

    /// One copy's answer (rule 7).
    fn on_copy(&mut self, a: Attempt, result: Result<Reply, Error>, router: &mut Router, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let g = match result {
            Ok(Reply::Get(g)) => {
                router.succeeded(a.addr, a.sent, now);
                g
            }
            Ok(_) => {
                router.answered(a.addr);
                self.coordinate(router, now, &mut out);
                return out;
            }
            Err(e) => {
                if e.is_endpoint_failure() {
                    router.failed(a.addr, now);
                } else {
                    router.answered(a.addr);
                }
                self.coordinate(router, now, &mut out);
                return out;
            }
        };
        let c = self.copies.as_mut().expect("a copy answer while reading copies");
        match &c.first {
            None => c.first = Some(g),
            Some(first) => c.agree &= *first == g,
        }
        if !self.in_flight.is_empty() {
            return out;
        }
        if c.agree {
            let answer = c.first.take().expect("r > 1 copies answered");
            self.copies = None;
            self.finish(Ok(Reply::Get(answer)), &mut out);
        } else {
            self.coordinate(router, now, &mut out);
        }
        out
    }

    /// When [`Operation::on_timeout`] must next be called (`None` once done).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        let hedge = self.hedge_at.filter(|_| self.may_hedge());
        self.in_flight.iter().map(|a| a.deadline).chain(hedge).chain([self.deadline]).min()
    }

    fn may_hedge(&self) -> bool {
        !self.hedged && self.kind == Kind::Read && !self.in_flight.is_empty() && self.next < self.route.len()
    }

    /// The answer to `attempt`: the node's reply or error, or the failure
    /// of its connection. Answers to attempts no longer in flight are
    /// ignored.
    pub fn on_response(
        &mut self,
        attempt: AttemptId,
        result: Result<Reply, Error>,
        ring_version: u64,
        router: &mut Router,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(i) = self.in_flight.iter().position(|a| a.id == attempt) else { return out };
        let a = self.in_flight.swap_remove(i);
        if ring_version > 0 {
            router.observe_ring_version(ring_version);
        }
        if self.copies.is_some() {
            return self.on_copy(a, result, router, now);
        }
        match result {
            Ok(reply) => {
                router.succeeded(a.addr, a.sent, now);
                self.finish(Ok(reply), &mut out);
            }
            Err(e) => {
                if e.is_endpoint_failure() {
                    router.failed(a.addr, now);
                } else {
                    router.answered(a.addr);
                }
                if e.is_retryable_elsewhere() {
                    self.last_error = Some(e);
                    self.fill(router, now, &mut out);
                } else {
                    // The node's own timeout says nothing of how long the
                    // caller waited; say it.
                    let e = match e {
                        Error::Timeout { by_node: true, .. } => {
                            Error::Timeout { after: now.saturating_duration_since(self.started), by_node: true }
                        }
                        other => other,
                    };
                    self.finish(Err(e), &mut out);
                }
            }
        }
        out
    }

    /// Applies the deadlines that passed by `now`.
    pub fn on_timeout(&mut self, router: &mut Router, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        if now >= self.deadline {
            let e = self.timeout_error(now);
            self.finish(Err(e), &mut out);
            return out;
        }
        if self.copies.is_some() {
            let late: Vec<SocketAddr> = self.in_flight.iter().filter(|a| a.deadline <= now).map(|a| a.addr).collect();
            if !late.is_empty() {
                for addr in late {
                    router.failed(addr, now);
                }
                self.coordinate(router, now, &mut out);
            }
            return out;
        }
        let (expired, kept): (Vec<Attempt>, Vec<Attempt>) =
            std::mem::take(&mut self.in_flight).into_iter().partition(|a| a.deadline <= now);
        self.in_flight = kept;
        for a in expired {
            out.push(Action::Abandon { attempt: a.id });
            router.failed(a.addr, now);
            if !a.retry_pass {
                self.slow.push(a.addr);
            }
            self.last_error = Some(self.timeout_error(now));
        }
        if self.may_hedge() && self.hedge_at.is_some_and(|t| t <= now) {
            self.hedged = true;
            self.stats.hedges += 1;
            let addr = self.route[self.next];
            self.next += 1;
            out.push(self.launch(addr, router, now, None));
        }
        self.fill(router, now, &mut out);
        out
    }

    fn timeout_error(&self, now: Instant) -> Error {
        Error::Timeout { after: now.saturating_duration_since(self.started), by_node: false }
    }

    /// Keeps as many attempts in flight as the operation may have (one;
    /// two once a read was hedged), or finishes when none is left to make.
    fn fill(&mut self, router: &mut Router, now: Instant, out: &mut Vec<Action>) {
        if self.done {
            return;
        }
        let parallel = if self.hedged { 2 } else { 1 };
        while self.in_flight.len() < parallel {
            let (addr, share) = if self.next < self.route.len() {
                self.next += 1;
                (self.route[self.next - 1], None)
            } else {
                if self.retry_pass.is_none() && !self.slow.is_empty() {
                    self.retry_pass = Some(std::mem::take(&mut self.slow).into());
                }
                let Some(pass) = self.retry_pass.as_mut() else { break };
                let left = pass.len() as u32;
                let Some(addr) = pass.pop_front() else { break };
                (addr, Some(left))
            };
            if self.stats.attempts > 0 {
                self.stats.failovers += 1;
                router.failed_over();
            }
            out.push(self.launch(addr, router, now, share));
        }
        if self.in_flight.is_empty() {
            let e = self.last_error.take().unwrap_or(Error::NoReplicas);
            self.finish(Err(e), out);
        }
    }

    /// An attempt at `addr`; `share`: of the second pass, with this many
    /// endpoints (this one included) left to share the time.
    fn launch(&mut self, addr: SocketAddr, router: &Router, now: Instant, share: Option<u32>) -> Action {
        let left = self.deadline.saturating_duration_since(now);
        let untried_after = self.next < self.route.len();
        let wait = match share {
            Some(k) => left / k.max(1),
            None if !untried_after => left,
            None => router.attempt_deadline().min(left),
        };
        self.send(addr, self.request.clone(), now, wait, share.is_some())
    }

    /// Sends `request` to `addr` as a new attempt with `wait` to answer
    /// (the node is told all the time left).
    fn send(&mut self, addr: SocketAddr, request: Request, now: Instant, wait: Duration, retry_pass: bool) -> Action {
        let id = AttemptId(self.next_attempt);
        self.next_attempt += 1;
        self.stats.attempts += 1;
        self.in_flight.push(Attempt { id, addr, sent: now, deadline: now + wait, retry_pass });
        let timeout = self.deadline.saturating_duration_since(now);
        Action::Send { attempt: id, addr, request, timeout }
    }

    fn finish(&mut self, result: Result<Reply, Error>, out: &mut Vec<Action>) {
        assert!(!self.done, "an operation finishes once");
        self.done = true;
        out.extend(self.in_flight.drain(..).map(|a| Action::Abandon { attempt: a.id }));
        out.push(Action::Done(result));
    }
}

#[cfg(test)]
// Tests take one reading of the clock as the base of fabricated times.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::core::route::tests::{config, topology};
    use ringkv_net::proto::{ErrorCode, GetResult, WireError};
    use ringkv_net::Level;

    const TIMEOUT: Duration = Duration::from_secs(2);

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7070))
    }

    fn router() -> Router {
        Router::new(config())
    }

    /// A router that saw 64 answers of 10 ms: hedge at 10 ms, deadline 50 ms.
    fn warm_router() -> Router {
        let mut r = router();
        let t = Instant::now();
        for _ in 0..64 {
            r.succeeded(addr(9), t, t + Duration::from_millis(10));
        }
        r
    }

    fn read(route: &[u8], now: Instant) -> Operation {
        let req = Request::Get { key: b"k".to_vec(), r: Level::Default };
        Operation::new(Kind::Read, req, route.iter().map(|&i| addr(i)).collect(), now, TIMEOUT)
    }

    fn write(route: &[u8], now: Instant) -> Operation {
        let req = Request::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            context: vec![],
            w: Level::Default,
            durable: None,
        };
        Operation::new(Kind::Write, req, route.iter().map(|&i| addr(i)).collect(), now, TIMEOUT)
    }

    /// The sends among `actions`, as (attempt, endpoint's last octet).
    fn sends(actions: &[Action]) -> Vec<(AttemptId, u8)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { attempt, addr: SocketAddr::V4(v4), .. } => Some((*attempt, v4.ip().octets()[3])),
                _ => None,
            })
            .collect()
    }

    fn done(actions: &[Action]) -> Option<&Result<Reply, Error>> {
        actions.iter().find_map(|a| match a {
            Action::Done(r) => Some(r),
            _ => None,
        })
    }

    fn abandoned(actions: &[Action]) -> Vec<AttemptId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Abandon { attempt } => Some(*attempt),
                _ => None,
            })
            .collect()
    }

    fn found() -> Reply {
        Reply::Get(GetResult { found: true, values: vec![b"v".to_vec()], context: vec![1] })
    }

    fn copy_read(route: &[u8], now: Instant) -> Operation {
        read(route, now).read_copies_first()
    }

    /// The requests among `actions`' sends, by kind.
    fn kinds(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { request, .. } => Some(request.kind()),
                _ => None,
            })
            .collect()
    }

    fn reply_with(values: &[&[u8]], context: &[u8]) -> Reply {
        Reply::Get(GetResult {
            found: true,
            values: values.iter().map(|v| v.to_vec()).collect(),
            context: context.to_vec(),
        })
    }

    #[test]
    fn a_client_driven_read_that_its_copies_agree_on_is_their_answer() {
        let t0 = Instant::now();
        let mut r = warm_router();
        let mut op = copy_read(&[1, 2, 3], t0);
        let a = op.start(&mut r, t0);
        assert_eq!(sends(&a), vec![(AttemptId(0), 1), (AttemptId(1), 2)], "r=2: the first two replicas at once");
        assert_eq!(kinds(&a), ["get-copy", "get-copy"]);
        let t1 = t0 + Duration::from_millis(1);
        assert!(op.on_response(AttemptId(1), Ok(found()), 0, &mut r, t1).is_empty(), "one copy is not r");
        let b = op.on_response(AttemptId(0), Ok(found()), 0, &mut r, t1);
        assert_eq!(done(&b).unwrap().as_ref().unwrap(), &found());
        assert!(sends(&b).is_empty(), "no coordinator was asked");
        assert_eq!(op.stats().copy_fallbacks, 0);
    }

    #[test]
    fn copies_that_differ_make_the_read_go_through_a_coordinator() {
        let t0 = Instant::now();
        let mut r = warm_router();
        let mut op = copy_read(&[1, 2, 3], t0);
        op.start(&mut r, t0);
        let t1 = t0 + Duration::from_millis(1);
        op.on_response(AttemptId(0), Ok(reply_with(&[b"new"], &[2])), 0, &mut r, t1);
        // Same context, other values: not the same answer either.
        let b = op.on_response(AttemptId(1), Ok(reply_with(&[b"old"], &[2])), 0, &mut r, t1);
        assert!(done(&b).is_none());
        assert_eq!(sends(&b), vec![(AttemptId(2), 1)], "the first replica coordinates");
        assert_eq!(kinds(&b), ["get"]);
        let merged = reply_with(&[b"new"], &[3]);
        let c = op.on_response(AttemptId(2), Ok(merged.clone()), 0, &mut r, t1);
        assert_eq!(done(&c).unwrap().as_ref().unwrap(), &merged, "the coordinator's merge is the answer");
        assert_eq!(op.stats().copy_fallbacks, 1);
    }

    #[test]
    fn a_refused_or_late_copy_makes_the_read_go_through_a_coordinator() {
        let t0 = Instant::now();
        // Refused: not a replica (the client's topology is stale).
        let mut r = warm_router();
        let mut op = copy_read(&[1, 2, 3], t0);
        op.start(&mut r, t0);
        let stale = Err(Error::from_wire(WireError::new(ErrorCode::StaleTopology, "not a replica")));
        let b = op.on_response(AttemptId(0), stale, 0, &mut r, t0);
        assert_eq!(abandoned(&b), vec![AttemptId(1)], "the other copy is no longer wanted");
        assert_eq!(kinds(&b), ["get"]);
        assert!(!r.is_down(&addr(1), t0), "a refusal is an answer: the node is up");
        // Late: the copy that missed its deadline marks its node down.
        let mut r = warm_router();
        let mut op = copy_read(&[1, 2, 3], t0);
        op.start(&mut r, t0);
        op.on_response(AttemptId(0), Ok(found()), 0, &mut r, t0 + Duration::from_millis(1));
        assert_eq!(op.poll_timeout(), Some(t0 + Duration::from_millis(50)));
        let c = op.on_timeout(&mut r, t0 + Duration::from_millis(50));
        assert_eq!(abandoned(&c), vec![AttemptId(1)]);
        assert_eq!(kinds(&c), ["get"]);
        assert!(r.is_down(&addr(2), t0 + Duration::from_millis(50)));
    }

    #[test]
    fn only_gets_at_r_above_one_read_copies() {
        let t0 = Instant::now();
        let mut r = warm_router();
        let one = Request::Get { key: b"k".to_vec(), r: Level::Count(1) };
        let mut op = Operation::new(Kind::Read, one, vec![addr(1), addr(2)], t0, TIMEOUT).read_copies_first();
        assert_eq!(kinds(&op.start(&mut r, t0)), ["get"]);
        let mut op = write(&[1, 2, 3], t0).read_copies_first();
        assert_eq!(kinds(&op.start(&mut r, t0)), ["put"]);
        // r=all on a route of one: a coordinator says why it cannot be met.
        let mut op = read(&[1], t0).read_copies_first();
        assert_eq!(kinds(&op.start(&mut r, t0)), ["get"]);
    }

    #[test]
    fn a_replica_that_misses_its_deadline_is_abandoned_and_the_next_is_asked() {
        let t0 = Instant::now();
        let mut r = warm_router();
        let mut op = write(&[1, 2, 3], t0);
        let a = op.start(&mut r, t0);
        assert_eq!(sends(&a), vec![(AttemptId(0), 1)]);
        assert_eq!(op.poll_timeout(), Some(t0 + Duration::from_millis(50)), "2 x p99 for the first replica");
        assert!(op.on_timeout(&mut r, t0 + Duration::from_millis(49)).is_empty());
        let b = op.on_timeout(&mut r, t0 + Duration::from_millis(50));
        assert_eq!(abandoned(&b), vec![AttemptId(0)]);
        assert_eq!(sends(&b), vec![(AttemptId(1), 2)], "a write fails over too");
        assert!(r.is_down(&addr(1), t0 + Duration::from_millis(50)), "the slow replica goes last for a while");
        let c =
            op.on_response(AttemptId(1), Ok(Reply::Put { context: vec![] }), 0, &mut r, t0 + Duration::from_millis(60));
        assert!(matches!(done(&c), Some(Ok(Reply::Put { .. }))));
        assert_eq!(op.stats(), Stats { attempts: 2, failovers: 1, hedges: 0, copy_fallbacks: 0 });
        assert!(op.poll_timeout().is_none());
        // The late answer of the abandoned attempt changes nothing.
        assert!(op.on_response(AttemptId(0), Ok(found()), 0, &mut r, t0 + Duration::from_millis(70)).is_empty());
    }

    #[test]
    fn a_broken_connection_or_an_overloaded_node_moves_on_but_a_verdict_stands() {
        let t0 = Instant::now();
        let mut r = router();
        let mut op = read(&[1, 2, 3], t0);
        op.start(&mut r, t0);
        let reset = Error::io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let a = op.on_response(AttemptId(0), Err(reset), 0, &mut r, t0);
        assert_eq!(sends(&a), vec![(AttemptId(1), 2)]);
        let busy = Err(Error::from_wire(WireError::new(ErrorCode::Overloaded, "full")));
        let b = op.on_response(AttemptId(1), busy, 0, &mut r, t0);
        assert_eq!(sends(&b), vec![(AttemptId(2), 3)]);
        assert!(!r.is_down(&addr(2), t0), "an overloaded node answered: it is up");
        let verdict = Err(Error::from_wire(WireError::new(ErrorCode::Unavailable, "1 of 2 replicas")));
        let c = op.on_response(AttemptId(2), verdict, 0, &mut r, t0);
        assert!(matches!(done(&c), Some(Err(Error::Unavailable { .. }))), "{c:?}");
    }

    #[test]
    fn a_slow_read_is_hedged_after_the_p99_and_the_first_answer_wins() {
        let t0 = Instant::now();
        let mut r = warm_router();
        let mut op = read(&[1, 2, 3], t0);
        op.start(&mut r, t0);
        assert_eq!(op.poll_timeout(), Some(t0 + Duration::from_millis(10)), "the hedge comes before the deadline");
        let h = op.on_timeout(&mut r, t0 + Duration::from_millis(10));
        assert_eq!(sends(&h), vec![(AttemptId(1), 2)], "the next replica is asked as well");
        assert!(abandoned(&h).is_empty(), "the first keeps going");
        assert!(!r.is_down(&addr(1), t0 + Duration::from_millis(10)), "being slower than p99 is no failure");
        // The first replica answers first after all: the hedge is abandoned.
        let w = op.on_response(AttemptId(0), Ok(found()), 3, &mut r, t0 + Duration::from_millis(12));
        assert_eq!(abandoned(&w), vec![AttemptId(1)]);
        assert!(matches!(done(&w), Some(Ok(Reply::Get(_)))));
        assert_eq!(op.stats().hedges, 1);
        assert_eq!(r.newest_ring_version(), 3, "the answer's ring version reaches the router");
    }

    #[test]
    fn writes_are_never_hedged() {
        let t0 = Instant::now();
        let mut r = warm_router();
        let mut op = write(&[1, 2, 3], t0);
        op.start(&mut r, t0);
        let a = op.on_timeout(&mut r, t0 + Duration::from_millis(10));
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(op.poll_timeout(), Some(t0 + Duration::from_millis(50)));
    }

    #[test]
    fn when_every_replica_was_slow_they_share_the_time_left_then_the_request_times_out() {
        let t0 = Instant::now();
        let mut r = warm_router();
        let req = Request::Get { key: b"k".to_vec(), r: Level::Default };
        let mut op = Operation::new(Kind::Write, req, vec![addr(1), addr(2)], t0, Duration::from_millis(300));
        op.start(&mut r, t0);
        let a = op.on_timeout(&mut r, t0 + Duration::from_millis(50));
        assert_eq!(sends(&a), vec![(AttemptId(1), 2)]);
        let Action::Send { timeout, .. } = &a[1] else { panic!("{a:?}") };
        assert_eq!(*timeout, Duration::from_millis(250), "the node is told the time left");
        assert_eq!(op.poll_timeout(), Some(t0 + Duration::from_millis(300)), "the last untried gets all the time");
        // It fails fast; the slow first replica is tried again.
        let reset = Error::io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let b = op.on_response(AttemptId(1), Err(reset), 0, &mut r, t0 + Duration::from_millis(100));
        assert_eq!(sends(&b), vec![(AttemptId(2), 1)]);
        let c = op.on_timeout(&mut r, t0 + Duration::from_millis(300));
        match done(&c) {
            Some(Err(Error::Timeout { after, by_node: false })) => assert_eq!(*after, Duration::from_millis(300)),
            other => panic!("{other:?}"),
        }
        assert_eq!(abandoned(&c), vec![AttemptId(2)]);
    }

    #[test]
    fn no_route_or_every_replica_failing_ends_with_the_last_error() {
        let t0 = Instant::now();
        let mut r = router();
        let mut op = read(&[], t0);
        assert!(matches!(done(&op.start(&mut r, t0)), Some(Err(Error::NoReplicas))));
        let mut op = read(&[1], t0);
        op.start(&mut r, t0);
        let refused = Error::io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let a = op.on_response(AttemptId(0), Err(refused), 0, &mut r, t0);
        assert!(matches!(done(&a), Some(Err(Error::Io(_)))), "{a:?}");
    }

    #[test]
    fn a_failover_asks_the_router_for_a_topology_refresh() {
        let t0 = Instant::now();
        let mut r = router();
        r.set_topology(topology(3, 1), t0);
        let later = t0 + crate::core::route::REFRESH_MIN_INTERVAL;
        assert!(!r.start_refresh(later));
        let mut op = read(&[1, 2], later);
        op.start(&mut r, later);
        let reset = Error::io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        op.on_response(AttemptId(0), Err(reset), 0, &mut r, later);
        assert!(r.start_refresh(later));
    }
}
