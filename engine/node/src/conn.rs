//! One client connection on one shard: handshake, framing, pipelining.
//!
//! The reader decodes frames and starts each request at once: most are
//! answered without a task of their own (see `service::try_fast`), the rest
//! run as their own task, so a slow request never holds up the ones behind
//! it. Responses are encoded into a shared buffer that one writer task
//! drains, batching whatever completed while the previous write was in
//! flight.
//!
//! Limits: a frame over `max_frame_bytes` is refused before it is buffered,
//! at most `max_in_flight_per_connection` requests run at once (the reader
//! stops reading until one finishes), and the hello must arrive within
//! [`HELLO_TIMEOUT`]. Anything that is not a verifiable frame of ours gets an
//! error frame and the connection is closed; other connections never notice.

use crate::service;
use crate::shard::Shard;
use futures::channel::oneshot;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::net::TcpStream;
use glommio::sync::{Semaphore, StaticPermit};
use ringkv_net::frame::{FrameDecoder, FrameError};
use ringkv_net::proto::{
    decode, DecodeError, DecodeLimits, Encoder, ErrorCode, Hello, HelloAck, Message, Response, Role, WireError, MAGIC,
    PROTOCOL_VERSION,
};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 64 * 1024;

/// The response side of a connection.
struct Output {
    buf: RefCell<Vec<u8>>,
    encoder: RefCell<Encoder>,
    kick: RefCell<Option<oneshot::Sender<()>>>,
    /// No more requests will be read; the writer exits once drained.
    closing: Cell<bool>,
    in_flight: Cell<usize>,
}

impl Output {
    fn new() -> Rc<Output> {
        Rc::new(Output {
            buf: RefCell::new(Vec::with_capacity(4096)),
            encoder: RefCell::new(Encoder::new()),
            kick: RefCell::new(None),
            closing: Cell::new(false),
            in_flight: Cell::new(0),
        })
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

    /// Sends a connection-level error and closes after it.
    fn fail(&self, code: ErrorCode, msg: impl Into<String>) {
        self.send(&Message::Error(WireError::new(code, msg)));
        self.close();
    }

    fn close(&self) {
        self.closing.set(true);
        self.wake();
    }
}

async fn write_loop(out: Rc<Output>, mut wr: WriteHalf<TcpStream>) {
    let mut spare = Vec::with_capacity(4096);
    loop {
        std::mem::swap(&mut spare, &mut *out.buf.borrow_mut());
        if spare.is_empty() {
            if out.closing.get() && out.in_flight.get() == 0 {
                break;
            }
            let (tx, rx) = oneshot::channel();
            *out.kick.borrow_mut() = Some(tx);
            let _ = rx.await;
            continue;
        }
        if wr.write_all(&spare).await.is_err() {
            // The peer is gone: stop reading too.
            out.closing.set(true);
            break;
        }
        spare.clear();
    }
    let _ = wr.close().await;
}

/// Turns away a connection over the shard's limit with an error frame.
pub async fn refuse(mut stream: TcpStream, limit: usize) {
    let msg = Message::Error(WireError::new(ErrorCode::Overloaded, format!("shard has {limit} connections already")));
    let bytes = Encoder::new().to_vec(&msg);
    let _ = glommio::timer::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&bytes).await;
        Ok(())
    })
    .await;
}

pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = futures_lite::io::split(stream);
    let out = Output::new();
    let writer = glommio::spawn_local(write_loop(out.clone(), wr));
    read_loop(&shard, rd, &out).await;
    out.close();
    writer.await;
}

/// Reads into the decoder; `false` on end of stream or error.
async fn fill(rd: &mut ReadHalf<TcpStream>, dec: &mut FrameDecoder) -> bool {
    let buf = dec.spare(READ_CHUNK);
    match rd.read(buf).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            dec.commit(n);
            true
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

async fn read_loop(shard: &Rc<Shard>, mut rd: ReadHalf<TcpStream>, out: &Rc<Output>) {
    let mut dec = FrameDecoder::new(shard.node.cfg.max_frame_bytes);
    let hello = glommio::timer::timeout(HELLO_TIMEOUT, async {
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => return Ok(Some(decode(f, DecodeLimits::SERVER))),
                Ok(None) => {}
                Err(e) => {
                    frame_error(out, e);
                    return Ok(None);
                }
            }
            if !fill(&mut rd, &mut dec).await {
                return Ok(None);
            }
        }
    })
    .await;
    let hello = match hello {
        Ok(Some(Ok(Message::Hello(h)))) => h,
        Ok(Some(Ok(_))) => return out.fail(ErrorCode::ProtocolMismatch, "a connection must open with a hello"),
        Ok(Some(Err(e))) => return out.fail(ErrorCode::MalformedFrame, e.to_string()),
        Ok(None) => return,
        Err(_) => return out.fail(ErrorCode::Timeout, "no hello within 10s"),
    };
    if let Err(e) = check_hello(shard, &hello) {
        return out.fail(e.code, e.message);
    }
    let role = hello.role;
    let limits = if role == Role::Peer { DecodeLimits::PEER } else { DecodeLimits::SERVER };
    out.send(&Message::HelloAck(HelloAck {
        protocol_version: PROTOCOL_VERSION,
        node_id: shard.node.node_id.clone(),
        shard: shard.id as u16,
        shards: shard.node.shards as u16,
        cluster: shard.node.cfg.cluster.clone(),
    }));

    let permits = Rc::new(Semaphore::new(shard.node.cfg.max_in_flight_per_connection as u64));
    loop {
        loop {
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
            let Ok(permit) = permits.acquire_static_permit(1).await else { return };
            out.in_flight.set(out.in_flight.get() + 1);
            let respond = responder(shard, out, req.id, permit);
            // Most requests are answered without a task of their own.
            if let Err((req, respond)) = service::try_fast(shard, role, req, respond) {
                let shard = shard.clone();
                glommio::spawn_local(async move { respond(service::handle(&shard, role, req).await) }).detach();
            }
        }
        if out.closing.get() || !fill(&mut rd, &mut dec).await {
            return;
        }
    }
}

/// Where request `id`'s answer goes: encoded into the connection's output
/// (which the writer sends, batched with whatever else is ready), then the
/// request's in-flight permit is given back.
fn responder(shard: &Rc<Shard>, out: &Rc<Output>, id: u64, permit: StaticPermit) -> service::Respond {
    let (shard, out) = (shard.clone(), out.clone());
    Box::new(move |result| {
        out.in_flight.set(out.in_flight.get() - 1);
        out.send(&Message::Response(Response { id, result, ring_version: shard.view().ring_version() }));
        drop(permit);
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
