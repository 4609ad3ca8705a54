//! One connection to one node's shard, as a state machine with no I/O.
//!
//! A [`Connection`] wraps the wire session of `ringkv-net` (which owns the
//! framing, the encoding, the handshake and its authentication) and adds
//! what a multiplexing client needs on top:
//!
//! - every request carries the time it was sent and a *wire deadline*: the
//!   request timeout the node was given plus a grace period. The node
//!   promises an answer (its own `Timeout` at worst) within the timeout, so
//!   a request still unanswered at its wire deadline means the connection
//!   stopped answering, and the whole connection fails;
//! - a request the caller gave up on ([`Connection::abandon`]) stays
//!   pending until its late answer arrives (which is then dropped), so the
//!   session never sees an answer to a request it does not know, and the
//!   late answer still proves the connection alive;
//! - the handshake has a deadline of its own (the connect timeout).
//!
//! Time is an argument (`now`), never read here. Invariants: an id is in
//! `pending` from [`Connection::send`] until its response or the
//! connection's failure, and is reported exactly once (as a response or in
//! [`Event::Failed`]) unless abandoned; after a failure nothing more is
//! sent or reported.

use crate::error::Error;
use ringkv_net::auth::Credentials;
use ringkv_net::proto::{Hello, HelloAck, Reply, Request};
use ringkv_net::session::{self, Session};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long past its timeout a request may go unanswered before its
/// connection is declared dead. (The node answers at its timeout; this
/// covers the trip back and a busy machine's scheduling.)
pub const STALL_GRACE: Duration = Duration::from_millis(1000);

/// A request's id on its connection.
pub type RequestId = u64;

/// What a connection reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// The handshake is done.
    Connected(HelloAck),
    /// A request's answer (`Err` if the node answered with an error).
    Response {
        /// Which request.
        id: RequestId,
        /// The node's answer.
        result: Result<Reply, Error>,
        /// The answering node's ring version (0: unknown).
        ring_version: u64,
    },
    /// The connection is unusable; these requests (not abandoned) failed
    /// with `error`.
    Failed {
        /// The requests that were waiting.
        ids: Vec<RequestId>,
        /// Why.
        error: Error,
    },
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    wire_deadline: Instant,
    abandoned: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshaking { deadline: Instant },
    Ready,
    Failed,
}

/// The client side of one connection; see the module doc.
pub struct Connection {
    session: Session,
    state: State,
    pending: HashMap<RequestId, Pending>,
    events: VecDeque<Event>,
    server: Option<HelloAck>,
    ring_version: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("state", &self.state)
            .field("in_flight", &self.in_flight())
            .field("ring_version", &self.ring_version)
            .finish()
    }
}

impl Connection {
    /// A connection to a node of `cluster`, opened (TCP connected) at `now`;
    /// the handshake must be done by `now + connect_timeout`. The hello is
    /// queued for sending at once.
    pub fn new(cluster: &str, credentials: Option<Credentials>, now: Instant, connect_timeout: Duration) -> Connection {
        Connection {
            session: Session::with_credentials(Hello::client(cluster), credentials),
            state: State::Handshaking { deadline: now + connect_timeout },
            pending: HashMap::new(),
            events: VecDeque::new(),
            server: None,
            ring_version: 0,
        }
    }

    /// Whether the handshake is done and the connection has not failed.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// Whether the connection failed (drop it; make a new one).
    pub fn is_failed(&self) -> bool {
        self.state == State::Failed
    }

    /// What the node said about itself, once connected.
    pub fn server(&self) -> Option<&HelloAck> {
        self.server.as_ref()
    }

    /// Requests sent and not yet answered, abandoned ones included (they
    /// still occupy the node).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The newest ring version a response on this connection carried.
    pub fn ring_version(&self) -> u64 {
        self.ring_version
    }

    /// Queues `body`, telling the node it has `timeout` to answer. Requests
    /// may be queued during the handshake; they go out after it.
    ///
    /// Panics if the connection failed: a caller must check
    /// [`Connection::is_failed`] first (a failed connection reported every
    /// request on it already, so there is nothing to wait for).
    pub fn send(&mut self, body: Request, now: Instant, timeout: Duration) -> RequestId {
        assert!(!self.is_failed(), "send on a failed connection");
        let timeout_ms = timeout.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        let id = self.session.send(body, timeout_ms);
        let wire_deadline = now + timeout + STALL_GRACE;
        let previous = self.pending.insert(id, Pending { wire_deadline, abandoned: false });
        assert!(previous.is_none(), "the session reused request id {id}");
        id
    }

    /// Gives up on request `id`: its answer, if it comes, is dropped.
    pub fn abandon(&mut self, id: RequestId) {
        if let Some(p) = self.pending.get_mut(&id) {
            p.abandoned = true;
        }
    }

    /// Bytes to write to the socket.
    pub fn transmit(&self) -> &[u8] {
        if self.is_failed() {
            return &[];
        }
        self.session.output()
    }

    /// Marks `n` bytes of [`Connection::transmit`] as written.
    pub fn advance_transmit(&mut self, n: usize) {
        self.session.consumed(n);
    }

    /// A buffer to read into directly (at least `min` bytes); keep what was
    /// read with [`Connection::commit_read`].
    pub fn read_buffer(&mut self, min: usize) -> &mut [u8] {
        self.session.read_buffer(min)
    }

    /// Takes `n` bytes read into [`Connection::read_buffer`] and turns
    /// whatever frames are complete into events. `n == 0` means the node
    /// closed the connection.
    pub fn commit_read(&mut self, n: usize) {
        if self.is_failed() {
            return;
        }
        if n == 0 {
            let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the node closed the connection");
            self.fail(Error::io(eof));
            return;
        }
        self.session.commit_read(n);
        self.process();
    }

    /// [`Connection::read_buffer`] plus [`Connection::commit_read`], for
    /// bytes already in hand.
    pub fn receive(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            self.commit_read(0);
            return;
        }
        let buf = self.read_buffer(bytes.len());
        buf[..bytes.len()].copy_from_slice(bytes);
        self.commit_read(bytes.len());
    }

    fn process(&mut self) {
        loop {
            match self.session.poll() {
                Ok(None) => return,
                Ok(Some(session::Event::Connected(ack))) => {
                    self.state = State::Ready;
                    self.server = Some(ack.clone());
                    self.events.push_back(Event::Connected(ack));
                }
                Ok(Some(session::Event::Response(r))) => {
                    self.ring_version = self.ring_version.max(r.ring_version);
                    let p = self.pending.remove(&r.id).expect("the session only yields responses to pending ids");
                    if !p.abandoned {
                        let result = r.result.map_err(Error::from_wire);
                        self.events.push_back(Event::Response { id: r.id, result, ring_version: r.ring_version });
                    }
                }
                Err(e) => {
                    self.fail(Error::from_session(e));
                    return;
                }
            }
        }
    }

    /// The connection broke (a read or write error, or the shell's own
    /// reason): every request on it fails with `error`.
    pub fn fail(&mut self, error: Error) {
        if self.is_failed() {
            return;
        }
        self.state = State::Failed;
        let mut ids: Vec<RequestId> = self.pending.drain().filter(|(_, p)| !p.abandoned).map(|(id, _)| id).collect();
        ids.sort_unstable();
        self.events.push_back(Event::Failed { ids, error });
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Connection::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Failed => None,
            State::Handshaking { deadline } => Some(deadline),
            State::Ready => self.pending.values().map(|p| p.wire_deadline).min(),
        }
    }

    /// Applies the deadlines that passed by `now`: an unfinished handshake
    /// or a request unanswered past its wire deadline fails the connection.
    /// Read what the socket holds before calling it, or a late answer
    /// still in the kernel counts as none.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired = match self.state {
            State::Failed => return,
            State::Handshaking { deadline } => (now >= deadline).then_some("the handshake"),
            State::Ready => self.pending.values().any(|p| p.wire_deadline <= now).then_some("a request"),
        };
        if let Some(what) = expired {
            let msg = format!("the node did not answer {what} in time: the connection stopped answering");
            self.fail(Error::io(std::io::Error::new(std::io::ErrorKind::TimedOut, msg)));
        }
    }
}

#[cfg(test)]
// Tests take one reading of the clock as the base of fabricated times.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use ringkv_net::frame::FrameDecoder;
    use ringkv_net::proto::{decode, DecodeLimits, Encoder, ErrorCode, Message, Response, WireError, PROTOCOL_VERSION};
    use ringkv_net::Level;

    const T: Duration = Duration::from_secs(2);

    fn ack() -> Message {
        Message::HelloAck(HelloAck {
            protocol_version: PROTOCOL_VERSION,
            node_id: "n1".into(),
            shard: 0,
            shards: 1,
            cluster: "c".into(),
        })
    }

    fn says(c: &mut Connection, msg: Message) {
        c.receive(&Encoder::new().to_vec(&msg));
    }

    fn response(id: u64, result: Result<Reply, WireError>, ring_version: u64) -> Message {
        Message::Response(Response { id, result, ring_version })
    }

    fn get(key: &str) -> Request {
        Request::Get { key: key.as_bytes().to_vec(), r: Level::Default }
    }

    fn events(c: &mut Connection) -> Vec<Event> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    /// Requests from the output bytes, as a node would read them.
    fn sent_requests(c: &mut Connection) -> Vec<(u64, u32)> {
        let mut d = FrameDecoder::new(1 << 20);
        d.push(c.transmit());
        let n = c.transmit().len();
        c.advance_transmit(n);
        std::iter::from_fn(|| d.next_frame().unwrap().map(|f| decode(f, DecodeLimits::SERVER).unwrap()))
            .filter_map(|m| match m {
                Message::Request(r) => Some((r.id, r.timeout_ms)),
                _ => None,
            })
            .collect()
    }

    fn ready(now: Instant) -> Connection {
        let mut c = Connection::new("c", None, now, T);
        says(&mut c, ack());
        assert!(matches!(events(&mut c)[..], [Event::Connected(_)]));
        c
    }

    #[test]
    fn many_requests_in_flight_are_answered_in_any_order_and_each_is_matched_once() {
        let now = Instant::now();
        let mut c = ready(now);
        let ids: Vec<u64> = (0..5).map(|i| c.send(get(&format!("k{i}")), now, T)).collect();
        let sent = sent_requests(&mut c);
        assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), ids, "all five went out before any answer");
        assert!(sent.iter().all(|s| s.1 == 2000), "the node is told the timeout");
        assert_eq!(c.in_flight(), 5);
        // Answered backwards, in two reads that split a frame.
        let mut bytes = Vec::new();
        let mut enc = Encoder::new();
        for &id in ids.iter().rev() {
            let reply = Reply::Put { context: id.to_le_bytes().to_vec() };
            enc.encode(&response(id, Ok(reply), 7), &mut bytes);
        }
        let (a, b) = bytes.split_at(bytes.len() / 2 + 3);
        c.receive(a);
        c.receive(b);
        let got: Vec<(u64, Vec<u8>)> = events(&mut c)
            .into_iter()
            .map(|e| match e {
                Event::Response { id, result: Ok(Reply::Put { context }), ring_version: 7 } => (id, context),
                other => panic!("{other:?}"),
            })
            .collect();
        let expected: Vec<(u64, Vec<u8>)> = ids.iter().rev().map(|&id| (id, id.to_le_bytes().to_vec())).collect();
        assert_eq!(got, expected, "each answer reaches the request it answers");
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.ring_version(), 7);
    }

    #[test]
    fn requests_queued_during_the_handshake_go_out_after_it() {
        let now = Instant::now();
        let mut c = Connection::new("c", None, now, T);
        let id = c.send(get("early"), now, T);
        says(&mut c, ack());
        says(&mut c, response(id, Err(WireError::new(ErrorCode::Unavailable, "1 of 2")), 0));
        let ev = events(&mut c);
        assert!(matches!(ev[0], Event::Connected(_)));
        assert!(
            matches!(&ev[1], Event::Response { id: i, result: Err(Error::Unavailable { .. }), .. } if *i == id),
            "{ev:?}"
        );
    }

    #[test]
    fn an_abandoned_request_is_dropped_when_its_late_answer_comes() {
        let now = Instant::now();
        let mut c = ready(now);
        let slow = c.send(get("slow"), now, T);
        let fast = c.send(get("fast"), now, T);
        c.abandon(slow);
        assert_eq!(c.in_flight(), 2, "the node still works on it");
        says(&mut c, response(slow, Ok(Reply::Delete), 0));
        says(&mut c, response(fast, Ok(Reply::Delete), 0));
        let ev = events(&mut c);
        assert!(matches!(ev[..], [Event::Response { id, .. }] if id == fast), "{ev:?}");
        assert!(c.is_ready(), "a late answer is no protocol error");
    }

    #[test]
    fn a_connection_that_stops_answering_fails_at_the_wire_deadline_with_every_request() {
        let t0 = Instant::now();
        let mut c = ready(t0);
        let a = c.send(get("a"), t0, T);
        let b = c.send(get("b"), t0 + Duration::from_millis(500), T);
        assert_eq!(c.poll_timeout(), Some(t0 + T + STALL_GRACE), "the oldest request's deadline");
        c.handle_timeout(t0 + T);
        assert!(events(&mut c).is_empty(), "the node still has its grace period");
        c.handle_timeout(t0 + T + STALL_GRACE);
        let ev = events(&mut c);
        match &ev[..] {
            [Event::Failed { ids, error: Error::Io(e) }] => {
                assert_eq!(ids, &vec![a, b]);
                assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
            }
            other => panic!("{other:?}"),
        }
        assert!(c.is_failed() && c.transmit().is_empty() && c.poll_timeout().is_none());
    }

    #[test]
    fn a_handshake_that_never_completes_fails_at_the_connect_deadline() {
        let t0 = Instant::now();
        let mut c = Connection::new("c", None, t0, Duration::from_millis(300));
        let id = c.send(get("k"), t0, T);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_millis(300)));
        c.handle_timeout(t0 + Duration::from_millis(300));
        assert!(matches!(&events(&mut c)[..], [Event::Failed { ids, .. }] if ids == &vec![id]));
    }

    #[test]
    fn a_refused_handshake_and_a_closed_socket_fail_the_waiting_requests() {
        let t0 = Instant::now();
        let mut c = Connection::new("c", None, t0, T);
        let id = c.send(get("k"), t0, T);
        says(&mut c, Message::Error(WireError::new(ErrorCode::Unauthorized, "bad token")));
        assert!(matches!(
            &events(&mut c)[..],
            [Event::Failed { ids, error: Error::Unauthorized { .. } }] if ids == &vec![id]
        ));

        let mut c = ready(t0);
        let id = c.send(get("k"), t0, T);
        c.commit_read(0);
        assert!(matches!(&events(&mut c)[..], [Event::Failed { ids, error: Error::Io(_) }] if ids == &vec![id]));
    }
}
