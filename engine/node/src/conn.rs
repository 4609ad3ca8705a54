//! One client connection on one shard: handshake, framing, pipelining.
//!
//! The reader decodes frames and starts each request at once: most are
//! answered without a task of their own (see `service::try_fast`), the rest
//! run as their own task, so a slow request never holds up the ones behind
//! it. Responses are encoded into a shared buffer that one writer task
//! drains, batching whatever completed while the previous write was in
//! flight.
//!
//! Limits, each with its answer (docs/PROTOCOL.md, "What bad input gets"):
//! a frame over `max_frame_bytes` (over [`HANDSHAKE_MAX_FRAME_BYTES`] until
//! the handshake is done) is refused before it is buffered; the handshake
//! (hello, and the answer to a challenge when the role must authenticate:
//! `crate::auth`) must be done within `handshake_timeout_ms`, and no request
//! is read before it is; a connection with nothing in flight that sends
//! nothing for `idle_timeout_ms` is closed; a request counts as in flight
//! from when it is read until its response is written to the socket, and
//! past `max_in_flight_per_connection` a request is answered `Overloaded` at
//! once; past `max_output_buffer_bytes` of unwritten responses the reader
//! reads nothing more until they drain (the bytes of a write in progress
//! count too), and a connection whose responses
//! cannot be written within `write_stall_timeout_ms` is closed. So a client
//! that pipelines without reading holds at most the buffer plus the answers
//! of its in-flight requests. Anything that is not a verifiable frame of
//! ours gets an error frame and the connection is closed; other connections
//! never notice.
//!
//! The connection is generic over its byte stream ([`Transport`]): plain
//! TCP, or TLS over it (`crate::tls`), each compiled on its own, so the
//! plain path pays nothing for TLS.

use crate::service;
use crate::shard::Shard;
use futures::channel::oneshot;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::net::TcpStream;
use ringkv_net::frame::{FrameDecoder, FrameError};
use ringkv_net::proto::{
    decode, DecodeError, DecodeLimits, Encoder, ErrorCode, Hello, HelloAck, Message, Response, Role, WireError, MAGIC,
    PROTOCOL_VERSION,
};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

const READ_CHUNK: usize = 64 * 1024;
/// The largest frame read before the handshake is done: a hello or the
/// answer to a challenge is well under 1 KiB, so a stranger cannot make the
/// node buffer a full-size frame before it has proved anything.
const HANDSHAKE_MAX_FRAME_BYTES: usize = 4096;

/// A byte stream a connection runs over: plain TCP or TLS.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + 'static> Transport for T {}

/// The response side of a connection.
struct Output {
    buf: RefCell<Vec<u8>>,
    encoder: RefCell<Encoder>,
    kick: RefCell<Option<oneshot::Sender<()>>>,
    /// Wakes a reader that paused because `buf` was over the bound.
    drained: RefCell<Option<oneshot::Sender<()>>>,
    /// No more requests will be read; the writer exits once drained.
    closing: Cell<bool>,
    /// Requests read whose response is not written to the socket yet.
    in_flight: Cell<usize>,
    /// Responses to counted requests in `buf`, not yet handed to a write.
    buffered_responses: Cell<usize>,
    /// Bytes handed to the write in progress (out of `buf`, still held).
    writing: Cell<usize>,
}

impl Output {
    fn new() -> Rc<Output> {
        Rc::new(Output {
            buf: RefCell::new(Vec::with_capacity(4096)),
            encoder: RefCell::new(Encoder::new()),
            kick: RefCell::new(None),
            drained: RefCell::new(None),
            closing: Cell::new(false),
            in_flight: Cell::new(0),
            buffered_responses: Cell::new(0),
            writing: Cell::new(0),
        })
    }

    /// Response bytes held for this connection: encoded, or being written.
    fn unwritten(&self) -> usize {
        self.buf.borrow().len() + self.writing.get()
    }

    fn send(&self, msg: &Message) {
        self.encoder.borrow_mut().encode(msg, &mut self.buf.borrow_mut());
        self.wake();
    }

    fn wake(&self) {
        if let Some(k) = self.kick.borrow_mut().take() {
            let _ = k.send(());
        }
    }

    fn wake_reader(&self) {
        if let Some(k) = self.drained.borrow_mut().take() {
            let _ = k.send(());
        }
    }

    /// Sends a connection-level error and closes after it.
    fn fail(&self, code: ErrorCode, msg: impl Into<String>) {
        self.send(&Message::Error(WireError::new(code, msg)));
        self.close();
    }

    fn close(&self) {
        self.closing.set(true);
        self.wake();
        self.wake_reader();
    }
}

async fn write_loop<S: Transport>(out: Rc<Output>, mut wr: WriteHalf<S>, stall: Duration) {
    let mut spare = Vec::with_capacity(4096);
    loop {
        std::mem::swap(&mut spare, &mut *out.buf.borrow_mut());
        let responses = out.buffered_responses.replace(0);
        if spare.is_empty() {
            if out.closing.get() && out.in_flight.get() == 0 {
                break;
            }
            let (tx, rx) = oneshot::channel();
            *out.kick.borrow_mut() = Some(tx);
            let _ = rx.await;
            continue;
        }
        out.writing.set(spare.len());
        // The flush sends what TLS holds back (a no-op on plain TCP).
        let written = glommio::timer::timeout(stall, async {
            let sent = wr.write_all(&spare).await;
            Ok(if sent.is_ok() { wr.flush().await } else { sent })
        })
        .await;
        out.writing.set(0);
        match written {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                // The peer is gone: stop reading too.
                out.close();
                break;
            }
            Err(_) => {
                tracing::info!(
                    stall_ms = stall.as_millis() as u64,
                    "closing a connection that does not read its responses"
                );
                out.close();
                break;
            }
        }
        out.in_flight.set(out.in_flight.get() - responses);
        spare.clear();
        out.wake_reader();
    }
    let _ = wr.close().await;
}

/// Turns away a connection over a limit with an error frame.
pub async fn refuse(mut stream: TcpStream, why: String) {
    let msg = Message::Error(WireError::new(ErrorCode::Overloaded, why));
    let bytes = Encoder::new().to_vec(&msg);
    let _ = glommio::timer::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&bytes).await;
        Ok(())
    })
    .await;
}

/// Serves one accepted connection to its end. `peer_allowed`: whether it
/// may act as a peer as far as the transport goes (always on plain TCP;
/// over TLS, only with a certificate `tls_ca` signs).
pub async fn serve<S: Transport>(shard: Rc<Shard>, stream: S, peer_allowed: bool) {
    let (rd, wr) = futures_lite::io::split(stream);
    let out = Output::new();
    let stall = Duration::from_millis(shard.node.cfg.write_stall_timeout_ms);
    let writer = glommio::spawn_local(write_loop(out.clone(), wr, stall));
    read_loop(&shard, rd, &out, peer_allowed).await;
    out.close();
    writer.await;
}

/// Reads into the decoder; `false` on end of stream or error.
async fn fill<S: Transport>(rd: &mut ReadHalf<S>, dec: &mut FrameDecoder) -> bool {
    let buf = dec.spare(READ_CHUNK);
    match rd.read(buf).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            dec.commit(n);
            true
        }
    }
}

/// [`fill`], closing the connection (with an error frame) when it has had
/// nothing in flight and sent nothing for the idle timeout.
async fn fill_or_idle<S: Transport>(
    rd: &mut ReadHalf<S>,
    dec: &mut FrameDecoder,
    out: &Output,
    idle: Duration,
) -> bool {
    loop {
        let read = glommio::timer::timeout(idle, async { Ok(fill(rd, dec).await) }).await;
        match read {
            Ok(more) => return more,
            // Waiting on its own answers is not idling.
            Err(_) if out.in_flight.get() > 0 => continue,
            Err(_) => {
                out.fail(ErrorCode::Timeout, format!("idle for {} ms: closing", idle.as_millis()));
                return false;
            }
        }
    }
}

fn frame_error(out: &Output, e: FrameError) {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        FrameError::Empty => ErrorCode::MalformedFrame,
    };
    out.fail(code, e.to_string());
}

/// Why the handshake ended without a usable connection.
enum Refusal {
    /// Answer with this error and close.
    Fail(WireError),
    /// The other side went away or sent a frame we already answered.
    Gone,
}

/// The next handshake message, before `deadline`.
async fn handshake_message<S: Transport>(
    rd: &mut ReadHalf<S>,
    dec: &mut FrameDecoder,
    out: &Output,
    deadline: Instant,
    timeout: Duration,
) -> Result<Message, Refusal> {
    let left = deadline.saturating_duration_since(Instant::now());
    let got = glommio::timer::timeout(left, async {
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => return Ok(Some(decode(f, DecodeLimits::SERVER))),
                Ok(None) => {}
                Err(e) => {
                    frame_error(out, e);
                    return Ok(None);
                }
            }
            if !fill(rd, dec).await {
                return Ok(None);
            }
        }
    })
    .await;
    match got {
        Ok(Some(Ok(m))) => Ok(m),
        Ok(Some(Err(e))) => Err(Refusal::Fail(WireError::new(ErrorCode::MalformedFrame, e.to_string()))),
        Ok(None) => Err(Refusal::Gone),
        Err(_) => Err(Refusal::Fail(WireError::new(
            ErrorCode::Timeout,
            format!("handshake not done within {} ms", timeout.as_millis()),
        ))),
    }
}

/// Hello, the challenge if this role must authenticate, and the ack: the
/// role the connection may act in.
async fn handshake<S: Transport>(
    shard: &Rc<Shard>,
    rd: &mut ReadHalf<S>,
    dec: &mut FrameDecoder,
    out: &Output,
    peer_allowed: bool,
) -> Result<Role, Refusal> {
    let cfg = &shard.node.cfg;
    let timeout = Duration::from_millis(cfg.handshake_timeout_ms);
    let deadline = Instant::now() + timeout;
    let hello = match handshake_message(rd, dec, out, deadline, timeout).await? {
        Message::Hello(h) => h,
        _ => {
            return Err(Refusal::Fail(WireError::new(
                ErrorCode::ProtocolMismatch,
                "a connection must open with a hello",
            )))
        }
    };
    check_hello(shard, &hello).map_err(Refusal::Fail)?;
    if hello.role == Role::Peer && !peer_allowed {
        return Err(Refusal::Fail(WireError::new(
            ErrorCode::Unauthorized,
            "over TLS a peer must present a certificate signed by the node's tls_ca",
        )));
    }
    let auth = &shard.node.auth;
    if auth.required(hello.role) {
        let (challenge, pending) = auth.challenge(&cfg.cluster, &hello).map_err(Refusal::Fail)?;
        out.send(&Message::Challenge(challenge));
        let proof = match handshake_message(rd, dec, out, deadline, timeout).await? {
            Message::Auth { proof } => proof,
            _ => {
                return Err(Refusal::Fail(WireError::new(
                    ErrorCode::Unauthorized,
                    "expected the answer to the challenge",
                )))
            }
        };
        auth.verify(&cfg.cluster, &hello, &pending, &proof).map_err(Refusal::Fail)?;
    }
    out.send(&Message::HelloAck(HelloAck {
        protocol_version: PROTOCOL_VERSION,
        node_id: shard.node.node_id.clone(),
        shard: shard.id as u16,
        shards: shard.node.shards as u16,
        cluster: cfg.cluster.clone(),
    }));
    Ok(hello.role)
}

async fn read_loop<S: Transport>(shard: &Rc<Shard>, mut rd: ReadHalf<S>, out: &Rc<Output>, peer_allowed: bool) {
    let cfg = &shard.node.cfg;
    let mut dec = FrameDecoder::new(HANDSHAKE_MAX_FRAME_BYTES);
    let role = match handshake(shard, &mut rd, &mut dec, out, peer_allowed).await {
        Ok(role) => role,
        Err(Refusal::Fail(e)) => return out.fail(e.code, e.message),
        Err(Refusal::Gone) => return,
    };
    dec.set_max_frame(cfg.max_frame_bytes);
    let limits = if role == Role::Peer { DecodeLimits::PEER } else { DecodeLimits::SERVER };
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let (max_in_flight, max_buffered) = (cfg.max_in_flight_per_connection, cfg.max_output_buffer_bytes);
    loop {
        loop {
            // Unwritten responses over the bound: read nothing more until
            // the writer drains them (or gives up on this client).
            while out.unwritten() > max_buffered && !out.closing.get() {
                let (tx, rx) = oneshot::channel();
                *out.drained.borrow_mut() = Some(tx);
                let _ = rx.await;
            }
            if out.closing.get() {
                return;
            }
            let msg = match dec.next_frame() {
                Ok(Some(f)) => decode(f, limits),
                Ok(None) => break,
                Err(e) => return frame_error(out, e),
            };
            let req = match msg {
                Ok(Message::Request(r)) => r,
                Err(DecodeError::UnknownRequest { id, tag }) => {
                    let e = WireError::new(ErrorCode::UnknownMessage, format!("unknown request type {tag}"));
                    out.send(&Message::Response(Response::new(id, Err(e))));
                    continue;
                }
                Ok(other) => {
                    let what = match other {
                        Message::Hello(_) => "a second hello",
                        _ => "a message that is not a request",
                    };
                    return out.fail(ErrorCode::UnknownMessage, format!("client sent {what}"));
                }
                Err(e) => return out.fail(e.to_wire().code, e.to_string()),
            };
            if out.in_flight.get() >= max_in_flight {
                // Answered at once and not counted: the output bound above
                // caps what these answers can hold.
                let e = WireError::new(
                    ErrorCode::Overloaded,
                    format!("{max_in_flight} requests already in flight on this connection"),
                );
                out.send(&Message::Response(Response::new(req.id, Err(e))));
                continue;
            }
            out.in_flight.set(out.in_flight.get() + 1);
            let respond = responder(shard, out, req.id);
            // Most requests are answered without a task of their own.
            if let Err((req, respond)) = service::try_fast(shard, role, req, respond) {
                let shard = shard.clone();
                glommio::spawn_local(async move { respond(service::handle(&shard, role, req).await) }).detach();
            }
        }
        if out.closing.get() || !fill_or_idle(&mut rd, &mut dec, out, idle).await {
            return;
        }
    }
}

/// Where request `id`'s answer goes: encoded into the connection's output,
/// which the writer sends, batched with whatever else is ready. The request
/// stays in flight until that write is done.
fn responder(shard: &Rc<Shard>, out: &Rc<Output>, id: u64) -> service::Respond {
    let (shard, out) = (shard.clone(), out.clone());
    Box::new(move |result| {
        if let Err(e) = &result {
            shard.metrics.error(e.code);
        }
        out.buffered_responses.set(out.buffered_responses.get() + 1);
        out.send(&Message::Response(Response { id, result, ring_version: shard.view().ring_version() }));
    })
}

fn check_hello(shard: &Shard, h: &Hello) -> Result<(), WireError> {
    if h.magic != MAGIC {
        return Err(WireError::new(ErrorCode::ProtocolMismatch, "not a ringkv client (bad magic)"));
    }
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(WireError::new(
            ErrorCode::ProtocolMismatch,
            format!("protocol version {} is not supported (this node speaks {PROTOCOL_VERSION})", h.protocol_version),
        ));
    }
    if h.cluster != shard.node.cfg.cluster {
        return Err(WireError::new(
            ErrorCode::ClusterMismatch,
            format!("the node at the other end belongs to cluster {:?}, not {:?}", shard.node.cfg.cluster, h.cluster),
        ));
    }
    if h.role == Role::Peer && h.node_id.is_empty() {
        return Err(WireError::new(ErrorCode::ProtocolMismatch, "a peer must say which node it is"));
    }
    Ok(())
}
