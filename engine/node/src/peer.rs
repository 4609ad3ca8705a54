//! Connections from one shard to other nodes: lazy, pipelined, bounded.
//!
//! One connection per remote address, opened on first use and shared by all
//! requests to it; responses are matched to requests by id, in any order.
//! Outgoing sockets are bound to this node's own listen address before they
//! connect, so traffic between 127.0.0.x nodes carries the right source and
//! network rules can match it. Connecting runs on the blocking pool with a
//! timeout, so an unreachable peer never stalls the shard. The handshake
//! (with the challenge and response when the cluster has a secret, checking
//! the other node's proof too) is done before any request is written, within
//! the connect timeout. With TLS on (`crate::tls`) the TLS handshake comes
//! first, in its own connect timeout; the connection code is generic over
//! the stream, so plain TCP pays nothing for it.
//!
//! Limits: at most [`MAX_PENDING`] requests waiting per connection; after a
//! failed connect, calls to that address fail fast for a while that starts
//! at [`RETRY_FIRST`] and doubles with each consecutive failure up to
//! [`RETRY_MAX`], so a dead peer costs one connect attempt per interval, not
//! one per request, while a peer that was merely not up yet (nodes starting
//! together) is retried almost at once.

use crate::conn::Transport;
use futures::channel::oneshot;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::net::TcpStream;
use ringkv_net::auth::Credentials;
use ringkv_net::frame::FrameDecoder;
use ringkv_net::proto::{
    decode, DecodeLimits, Encoder, Hello, Message, Request, RequestFrame, Response, Role, WireError, MAGIC,
    PROTOCOL_VERSION,
};
use ringkv_net::session::{Event, Session, SessionError, CLIENT_MAX_FRAME_BYTES};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

pub const MAX_PENDING: usize = 8192;
pub const RETRY_FIRST: Duration = Duration::from_millis(50);
pub const RETRY_MAX: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerError {
    /// Could not connect (or a recent attempt failed).
    Unreachable(String),
    /// The connection broke before the answer came.
    Lost(String),
    Timeout,
    /// The peer refused the connection (wrong cluster, protocol).
    Refused(WireError),
    /// Too many requests already waiting on this connection.
    Overloaded,
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::Unreachable(e) => write!(f, "unreachable: {e}"),
            PeerError::Lost(e) => write!(f, "connection lost: {e}"),
            PeerError::Timeout => write!(f, "no answer in time"),
            PeerError::Refused(e) => write!(f, "refused: {e}"),
            PeerError::Overloaded => write!(f, "too many requests in flight"),
        }
    }
}

/// Who gets a response: a task awaiting it, or a protocol machine's
/// callback (which keeps its own deadline, so no timer runs per request).
enum Waiter {
    Task(oneshot::Sender<Result<Response, PeerError>>),
    Callback(Box<dyn FnOnce(Result<Response, PeerError>)>),
}

impl Waiter {
    fn answer(self, r: Result<Response, PeerError>) {
        match self {
            Waiter::Task(tx) => {
                let _ = tx.send(r);
            }
            Waiter::Callback(f) => f(r),
        }
    }
}

/// How long an answer is waited for at most: a callback whose peer never
/// answers is dropped, with a timeout, after this (the longest timeout a
/// request may carry).
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How much longer than the timeout it passes on a call waits.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);

/// The last connect failures to one address.
struct Failure {
    at: Instant,
    why: String,
    streak: u32,
}

impl Failure {
    fn backoff(&self) -> Duration {
        RETRY_FIRST.saturating_mul(1 << self.streak.saturating_sub(1).min(10)).min(RETRY_MAX)
    }
}

struct Conn {
    out: RefCell<Vec<u8>>,
    encoder: RefCell<Encoder>,
    kick: RefCell<Option<oneshot::Sender<()>>>,
    pending: RefCell<HashMap<u64, (Instant, Waiter)>>,
    next_id: Cell<u64>,
    broken: Cell<bool>,
}

impl Conn {
    fn wake(&self) {
        if let Some(k) = self.kick.borrow_mut().take() {
            let _ = k.send(());
        }
    }

    /// Fails every waiting request and marks the connection unusable.
    fn break_with(&self, e: PeerError) {
        self.broken.set(true);
        let waiting: Vec<(u64, (Instant, Waiter))> = self.pending.borrow_mut().drain().collect();
        for (_, (_, w)) in waiting {
            w.answer(Err(e.clone()));
        }
        self.wake();
    }

    /// Makes room for one more request: drops the ones that waited longer
    /// than [`MAX_WAIT`] (their peer will not answer), failing them.
    fn admit(&self) -> Result<(), PeerError> {
        if self.pending.borrow().len() < MAX_PENDING {
            return Ok(());
        }
        let expired: Vec<u64> =
            self.pending.borrow().iter().filter(|(_, (at, _))| at.elapsed() > MAX_WAIT).map(|(id, _)| *id).collect();
        for id in expired {
            let w = self.pending.borrow_mut().remove(&id);
            if let Some((_, w)) = w {
                w.answer(Err(PeerError::Timeout));
            }
        }
        if self.pending.borrow().len() >= MAX_PENDING {
            return Err(PeerError::Overloaded);
        }
        Ok(())
    }

    /// Queues `body` as request `id` behind whatever is already buffered.
    fn enqueue(&self, waiter: Waiter, body: Request, hops: u8, timeout: Duration) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.pending.borrow_mut().insert(id, (Instant::now(), waiter));
        let timeout_ms = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
        let msg = Message::Request(RequestFrame { id, timeout_ms, body, hops });
        self.encoder.borrow_mut().encode(&msg, &mut self.out.borrow_mut());
        self.wake();
        id
    }
}

pub struct PeerPool {
    local_ip: IpAddr,
    hello: Hello,
    secret: Option<String>,
    tls: Option<crate::tls::NodeTls>,
    conns: RefCell<HashMap<SocketAddr, Rc<Conn>>>,
    /// Connect failures per address: when the last one was, why, and how
    /// many in a row; shared with the connecting tasks.
    failed_at: Rc<RefCell<HashMap<SocketAddr, Failure>>>,
}

impl PeerPool {
    pub fn new(
        local_ip: IpAddr,
        node_id: &str,
        cluster: &str,
        secret: Option<&str>,
        tls: Option<crate::tls::NodeTls>,
    ) -> PeerPool {
        let hello = Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            role: Role::Peer,
            cluster: cluster.to_string(),
            node_id: node_id.to_string(),
            credentials: Vec::new(),
            auth_nonce: Vec::new(),
            user: String::new(),
        };
        let secret = secret.map(String::from);
        PeerPool { local_ip, hello, secret, tls, conns: RefCell::new(HashMap::new()), failed_at: Rc::default() }
    }

    /// Sends `body` to `addr` and waits for the response: the peer has
    /// `timeout` to answer.
    pub async fn call(
        &self,
        addr: SocketAddr,
        body: Request,
        hops: u8,
        timeout: Duration,
    ) -> Result<Response, PeerError> {
        let conn = self.connection(addr)?;
        conn.admit()?;
        let (tx, rx) = oneshot::channel();
        let id = conn.enqueue(Waiter::Task(tx), body, hops, timeout);
        // The peer is told `timeout` and answers by then, with its reason
        // when it gave up (a coordinator's Timeout names the replicas that
        // failed it); a little longer here, so that answer is not lost.
        let answer = glommio::timer::timeout(timeout + ANSWER_MARGIN, async {
            Ok(rx.await.unwrap_or_else(|_| Err(PeerError::Lost("connection closed".into()))))
        })
        .await;
        match answer {
            Ok(r) => r,
            Err(_) => {
                conn.pending.borrow_mut().remove(&id);
                Err(PeerError::Timeout)
            }
        }
    }

    /// Sends `body` to `addr`; `on_answer` runs with the response, or with
    /// the error that ended the wait, exactly once (at once when the
    /// request cannot be sent). The caller keeps its own deadline:
    /// `timeout` only tells the peer how long the answer is worth.
    pub fn send(
        &self,
        addr: SocketAddr,
        body: Request,
        timeout: Duration,
        on_answer: Box<dyn FnOnce(Result<Response, PeerError>)>,
    ) {
        let conn = match self.connection(addr).and_then(|c| c.admit().map(|()| c)) {
            Ok(c) => c,
            Err(e) => return on_answer(Err(e)),
        };
        conn.enqueue(Waiter::Callback(on_answer), body, 0, timeout);
    }

    /// The open connection to `addr`, or a new one being opened.
    fn connection(&self, addr: SocketAddr) -> Result<Rc<Conn>, PeerError> {
        if let Some(c) = self.conns.borrow().get(&addr) {
            if !c.broken.get() {
                return Ok(c.clone());
            }
        }
        if let Some(f) = self.failed_at.borrow().get(&addr) {
            if f.at.elapsed() < f.backoff() {
                return Err(PeerError::Unreachable(f.why.clone()));
            }
        }
        let conn = Rc::new(Conn {
            out: RefCell::new(Vec::with_capacity(4096)),
            encoder: RefCell::new(Encoder::new()),
            kick: RefCell::new(None),
            pending: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            broken: Cell::new(false),
        });
        // Requests queue in `out` while connecting and the handshake runs.
        self.conns.borrow_mut().insert(addr, conn.clone());
        let local = SocketAddr::new(self.local_ip, 0);
        let c = conn.clone();
        let failures = self.failed_at.clone();
        let session =
            Session::with_credentials(self.hello.clone(), self.secret.clone().map(Credentials::ClusterSecret));
        let tls = self.tls.clone();
        glommio::spawn_local(async move {
            let ended = match (connect(local, addr).await, tls) {
                (Err(e), _) => Err(PeerError::Unreachable(e)),
                (Ok(stream), None) => run(c.clone(), stream, session, &failures, addr).await,
                (Ok(stream), Some(tls)) => {
                    let shaken =
                        glommio::timer::timeout(CONNECT_TIMEOUT, async { Ok(tls.connect(addr, stream).await) })
                            .await
                            .unwrap_or_else(|_| Err(format!("{addr}: no TLS handshake within {CONNECT_TIMEOUT:?}")));
                    match shaken {
                        Ok(stream) => run(c.clone(), stream, session, &failures, addr).await,
                        Err(e) => Err(PeerError::Unreachable(e)),
                    }
                }
            };
            if let Err(e) = ended {
                {
                    // Kept as the reason later fast failures give,
                    // which wrap it in `Unreachable` again.
                    let why = match &e {
                        PeerError::Unreachable(why) => why.clone(),
                        other => other.to_string(),
                    };
                    let mut f = failures.borrow_mut();
                    let streak = f.get(&addr).map_or(1, |x| x.streak + 1);
                    if streak == 1 {
                        tracing::warn!(peer = %addr, error = why, "cannot connect to a peer");
                    }
                    f.insert(addr, Failure { at: Instant::now(), why, streak });
                }
                // Callbacks run from here may send again (to this very
                // address): no borrow of the pool may be held.
                c.break_with(e);
            }
        })
        .detach();
        Ok(conn)
    }
}

/// The ringkv handshake on `stream`, then the connection's loops until it
/// breaks; `Err` when the handshake failed (the connection never served).
async fn run<S: Transport>(
    c: Rc<Conn>,
    mut stream: S,
    session: Session,
    failures: &RefCell<HashMap<SocketAddr, Failure>>,
    addr: SocketAddr,
) -> Result<(), PeerError> {
    let shaken =
        glommio::timer::timeout(CONNECT_TIMEOUT, async { Ok(handshake(&mut stream, session, addr).await) }).await;
    shaken
        .unwrap_or_else(|_| Err(PeerError::Unreachable(format!("{addr}: no handshake within {CONNECT_TIMEOUT:?}"))))?;
    failures.borrow_mut().remove(&addr);
    let (rd, wr) = futures_lite::io::split(stream);
    glommio::spawn_local(write_loop(c.clone(), wr)).detach();
    read_loop(c, rd).await;
    Ok(())
}

async fn connect(local: SocketAddr, remote: SocketAddr) -> Result<TcpStream, String> {
    let socket = glommio::executor()
        .spawn_blocking(move || -> std::io::Result<socket2::Socket> {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::for_address(remote), Type::STREAM, None)?;
            s.bind(&local.into())?;
            s.connect_timeout(&remote.into(), CONNECT_TIMEOUT)?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .await
        .map_err(|e| format!("{remote}: {e}"))?;
    Ok(TcpStream::from(socket))
}

/// Runs the connecting side of the handshake on `stream`. A refusal keeps
/// the node's error (another cluster's name, a wrong secret), which the
/// caller may act on.
async fn handshake<S: Transport>(stream: &mut S, mut session: Session, remote: SocketAddr) -> Result<(), PeerError> {
    let lost = |e: String| PeerError::Unreachable(format!("{remote}: {e}"));
    loop {
        let out = session.take_output();
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| lost(io_reason(&e)))?;
            stream.flush().await.map_err(|e| lost(io_reason(&e)))?;
        }
        match session.poll() {
            Ok(Some(Event::Connected(_))) => return Ok(()),
            Ok(Some(Event::Response(_))) => return Err(lost("a response before the handshake ended".into())),
            Ok(None) => {}
            Err(SessionError::Refused(w)) => return Err(PeerError::Refused(w)),
            Err(e) => return Err(lost(e.to_string())),
        }
        if !session.output().is_empty() {
            continue;
        }
        let buf = session.read_buffer(4096);
        match stream.read(buf).await {
            Ok(0) => return Err(lost("closed the connection during the handshake".into())),
            Ok(n) => session.commit_read(n),
            Err(e) => return Err(lost(io_reason(&e))),
        }
    }
}

/// An I/O error in words, with the TLS reason where TLS failed (a peer
/// refusing this node's certificate shows only after the TLS handshake).
fn io_reason(e: &std::io::Error) -> String {
    ringkv_net::tls::from_io(e).map_or_else(|| e.to_string(), ringkv_net::tls::describe)
}

async fn write_loop<S: Transport>(conn: Rc<Conn>, mut wr: WriteHalf<S>) {
    let mut spare = Vec::with_capacity(4096);
    loop {
        std::mem::swap(&mut spare, &mut *conn.out.borrow_mut());
        if spare.is_empty() {
            if conn.broken.get() {
                break;
            }
            let (tx, rx) = oneshot::channel();
            *conn.kick.borrow_mut() = Some(tx);
            let _ = rx.await;
            continue;
        }
        // The flush sends what TLS holds back (a no-op on plain TCP).
        let sent = match wr.write_all(&spare).await {
            Ok(()) => wr.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            conn.break_with(PeerError::Lost(e.to_string()));
            break;
        }
        spare.clear();
    }
    let _ = wr.close().await;
}

async fn read_loop<S: Transport>(conn: Rc<Conn>, mut rd: ReadHalf<S>) {
    let mut dec = FrameDecoder::new(CLIENT_MAX_FRAME_BYTES);
    loop {
        loop {
            let msg = match dec.next_frame() {
                Ok(Some(f)) => decode(f, DecodeLimits::CLIENT),
                Ok(None) => break,
                Err(e) => return conn.break_with(PeerError::Lost(e.to_string())),
            };
            match msg {
                Ok(Message::Response(r)) => {
                    let waiter = conn.pending.borrow_mut().remove(&r.id);
                    if let Some((_, w)) = waiter {
                        w.answer(Ok(r));
                    }
                }
                Ok(Message::Error(e)) => return conn.break_with(PeerError::Refused(e)),
                Ok(other) => return conn.break_with(PeerError::Lost(format!("unexpected {other:?}"))),
                Err(e) => return conn.break_with(PeerError::Lost(e.to_string())),
            }
        }
        let buf = dec.spare(64 * 1024);
        match rd.read(buf).await {
            Ok(0) => return conn.break_with(PeerError::Lost("closed by peer".into())),
            Ok(n) => dec.commit(n),
            Err(e) => return conn.break_with(PeerError::Lost(e.to_string())),
        }
    }
}
