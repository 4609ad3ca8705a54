//! The wire protocols the load generator speaks: requests to bytes, bytes to
//! replies. No I/O here; the driver owns the sockets.
//!
//! - ringkv: length-prefixed flatbuffer frames (`ringkv_net::proto`), replies
//!   matched by request id, in any order;
//! - redis: RESP2 `GET`/`SET`, replies in order;
//! - echo: the same frames a ringkv request would be, answered by a frame of
//!   the size the ringkv reply would have (see [`EchoCodec`]).
//!
//! Each codec keeps its buffers between requests so encoding allocates
//! nothing once warm. Decoding a ringkv reply goes through the library's
//! verifying decoder, which allocates the reply's value: that is the client
//! library's real cost and stays in the measurement.

use crate::resp::{self, Resp};
use crate::slots::{parse_redirect, Redirect};
use anyhow::{bail, Result};
use ringkv_net::proto::{
    decode, DecodeLimits, Encoder, GetResult, Level, Message, Reply as WireReply, Request, RequestFrame, Response,
};
use ringkv_net::session::CLIENT_MAX_FRAME_BYTES;
use std::borrow::Cow;

/// One request on the wire.
#[derive(Debug, Clone, Copy)]
pub enum WireReq<'a> {
    /// `value_len` is the size of the value the read is expected to return
    /// (only the echo target uses it, to size its reply).
    Get {
        key: &'a [u8],
        value_len: usize,
    },
    Put {
        key: &'a [u8],
        value: &'a [u8],
        context: &'a [u8],
    },
    /// ringkv only: the receiving replica's own copy (client-driven reads).
    GetCopy {
        key: &'a [u8],
    },
    /// Redis Cluster's ASKING, sent before a request redirected by ASK.
    Asking,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok { found: bool },
    Error(Cow<'static, str>),
    Redirect(Redirect),
}

#[derive(Debug, Clone)]
pub struct Reply {
    /// The request id for protocols that match by id; 0 for in-order ones.
    pub id: u64,
    pub outcome: Outcome,
    /// ringkv's causal context of what was read or written.
    pub context: Vec<u8>,
    /// A hash of the values a ringkv read returned (0 for anything else),
    /// so a client-driven read can compare its copies' answers.
    pub values: u64,
}

/// Options of ringkv requests.
#[derive(Debug, Clone, Copy)]
pub struct RingkvOptions {
    pub r: Level,
    pub w: Level,
    pub durable: Option<bool>,
    pub timeout_ms: u32,
}

pub enum Codec {
    Ringkv(RingkvCodec),
    Redis,
    Echo(EchoCodec),
}

impl Codec {
    /// Whether replies come in request order (else they carry ids).
    pub fn in_order(&self) -> bool {
        !matches!(self, Codec::Ringkv(_))
    }

    /// Appends `req` to `out`; returns its id (0 for in-order protocols).
    pub fn encode(&mut self, req: WireReq<'_>, out: &mut Vec<u8>) -> u64 {
        match self {
            Codec::Ringkv(c) => c.encode(req, out),
            Codec::Redis => {
                match req {
                    WireReq::Get { key, .. } => resp::encode_command(out, &[b"GET", key]),
                    WireReq::Put { key, value, .. } => resp::encode_command(out, &[b"SET", key, value]),
                    WireReq::Asking => resp::encode_command(out, &[b"ASKING"]),
                    WireReq::GetCopy { .. } => unreachable!("copy reads are ringkv-only"),
                }
                0
            }
            Codec::Echo(c) => c.encode(req, out),
        }
    }

    /// The next reply at the start of `buf`, with the bytes it used; `None`
    /// when it has not fully arrived. An error means the connection can no
    /// longer be trusted.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Reply, usize)>> {
        match self {
            Codec::Ringkv(_) => parse_ringkv(buf),
            Codec::Redis => parse_redis(buf),
            Codec::Echo(_) => parse_echo(buf),
        }
    }
}

/// Encodes ringkv requests through the library's [`Encoder`], moving the
/// reusable key/value/context buffers into the message and back out so no
/// request allocates.
pub struct RingkvCodec {
    encoder: Encoder,
    opts: RingkvOptions,
    next_id: u64,
    key: Vec<u8>,
    value: Vec<u8>,
    context: Vec<u8>,
}

impl RingkvCodec {
    pub fn new(opts: RingkvOptions) -> RingkvCodec {
        RingkvCodec {
            encoder: Encoder::new(),
            opts,
            next_id: 1,
            key: Vec::with_capacity(64),
            value: Vec::new(),
            context: Vec::with_capacity(64),
        }
    }

    fn encode(&mut self, req: WireReq<'_>, out: &mut Vec<u8>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut key = std::mem::take(&mut self.key);
        let body = match req {
            WireReq::Get { key: k, .. } => {
                key.clear();
                key.extend_from_slice(k);
                Request::Get { key, r: self.opts.r }
            }
            WireReq::GetCopy { key: k } => {
                key.clear();
                key.extend_from_slice(k);
                Request::GetCopy { key }
            }
            WireReq::Put { key: k, value, context } => {
                key.clear();
                key.extend_from_slice(k);
                let mut v = std::mem::take(&mut self.value);
                v.clear();
                v.extend_from_slice(value);
                let mut c = std::mem::take(&mut self.context);
                c.clear();
                c.extend_from_slice(context);
                Request::Put { key, value: v, context: c, w: self.opts.w, durable: self.opts.durable }
            }
            WireReq::Asking => unreachable!("ASKING is Redis-only"),
        };
        let msg = Message::Request(RequestFrame { id, timeout_ms: self.opts.timeout_ms, body, hops: 0 });
        self.encoder.encode(&msg, out);
        if let Message::Request(RequestFrame { body, .. }) = msg {
            match body {
                Request::Get { key, .. } | Request::GetCopy { key } => self.key = key,
                Request::Put { key, value, context, .. } => {
                    self.key = key;
                    self.value = value;
                    self.context = context;
                }
                _ => {}
            }
        }
        id
    }
}

fn frame(buf: &[u8]) -> Result<Option<&[u8]>> {
    let Some(header) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 || len > CLIENT_MAX_FRAME_BYTES {
        bail!("server sent a frame of {len} bytes");
    }
    Ok(buf.get(4..4 + len))
}

fn parse_ringkv(buf: &[u8]) -> Result<Option<(Reply, usize)>> {
    let Some(payload) = frame(buf)? else { return Ok(None) };
    let used = 4 + payload.len();
    let reply = match decode(payload, DecodeLimits::CLIENT) {
        Ok(Message::Response(Response { id, result, .. })) => match result {
            Ok(WireReply::Get(GetResult { found, context, values })) => {
                Reply { id, outcome: Outcome::Ok { found }, context, values: values_hash(&values) }
            }
            Ok(WireReply::Put { context }) => Reply { id, outcome: Outcome::Ok { found: true }, context, values: 0 },
            Ok(other) => Reply { id, outcome: Outcome::Error(unexpected(&other)), context: Vec::new(), values: 0 },
            Err(e) => {
                Reply { id, outcome: Outcome::Error(Cow::Borrowed(e.code.name())), context: Vec::new(), values: 0 }
            }
        },
        Ok(Message::Error(e)) => bail!("the server closed the connection: {e}"),
        Ok(other) => bail!("unexpected message from the server: {other:?}"),
        Err(e) => bail!("undecodable reply: {e}"),
    };
    Ok(Some((reply, used)))
}

/// Order-sensitive: a node returns siblings in its object's canonical order.
fn values_hash(values: &[Vec<u8>]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for v in values {
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v);
    }
    h.digest()
}

fn unexpected(r: &WireReply) -> Cow<'static, str> {
    Cow::Owned(format!("unexpected-reply-{}", if matches!(r, WireReply::Delete) { "delete" } else { "other" }))
}

fn parse_redis(buf: &[u8]) -> Result<Option<(Reply, usize)>> {
    let Some((r, used)) = resp::parse(buf)? else { return Ok(None) };
    let outcome = match r {
        Resp::Bulk(v) => Outcome::Ok { found: v.is_some() },
        Resp::Simple(_) | Resp::Integer(_) | Resp::Array(_) => Outcome::Ok { found: true },
        Resp::Error(e) => match parse_redirect(e) {
            Some(redirect) => Outcome::Redirect(redirect),
            None => {
                // The error's first word is its kind: ERR, OOM, CLUSTERDOWN, TRYAGAIN...
                let word = e.split(|&b| b == b' ').next().unwrap_or(b"ERR");
                Outcome::Error(Cow::Owned(String::from_utf8_lossy(word).into_owned()))
            }
        },
    };
    Ok(Some((Reply { id: 0, outcome, context: Vec::new(), values: 0 }, used)))
}

/// The echo target's frames: the bytes of the ringkv request the workload
/// would send, with bytes 4..8 (the flatbuffer's root offset, which the echo
/// server does not read) replaced by the size of the reply to send back: the
/// size of ringkv's reply to that request, to within flatbuffer padding.
/// The echo server answers `[u32 len][len zero bytes]` of that total size.
/// So the echo run moves the same bytes per request in both directions as
/// the ringkv run, through the same client code, minus the server's work.
pub struct EchoCodec {
    ringkv: RingkvCodec,
    /// Reply frame bytes of a get returning an empty value.
    get_base: usize,
    put_reply: usize,
}

/// The causal context a one-node ringkv returns is about this long; the echo
/// replies include it.
pub const ECHO_CONTEXT_BYTES: usize = 24;

impl EchoCodec {
    pub fn new(opts: RingkvOptions) -> EchoCodec {
        let mut enc = Encoder::new();
        let ctx = vec![0u8; ECHO_CONTEXT_BYTES];
        let get = Message::Response(Response::new(
            u64::MAX,
            Ok(WireReply::Get(GetResult { found: true, values: vec![Vec::new()], context: ctx.clone() })),
        ));
        let put = Message::Response(Response::new(u64::MAX, Ok(WireReply::Put { context: ctx })));
        EchoCodec {
            ringkv: RingkvCodec::new(opts),
            get_base: enc.to_vec(&get).len(),
            put_reply: enc.to_vec(&put).len(),
        }
    }

    /// The reply size asked for `req`.
    pub fn reply_bytes(&self, req: &WireReq<'_>) -> usize {
        match req {
            WireReq::Get { value_len, .. } => self.get_base + value_len.next_multiple_of(4),
            _ => self.put_reply,
        }
    }

    fn encode(&mut self, req: WireReq<'_>, out: &mut Vec<u8>) -> u64 {
        let at = out.len();
        let reply = self.reply_bytes(&req) as u32;
        self.ringkv.encode(req, out);
        out[at + 4..at + 8].copy_from_slice(&reply.to_le_bytes());
        0
    }
}

fn parse_echo(buf: &[u8]) -> Result<Option<(Reply, usize)>> {
    let Some(payload) = frame(buf)? else { return Ok(None) };
    Ok(Some((Reply { id: 0, outcome: Outcome::Ok { found: true }, context: Vec::new(), values: 0 }, 4 + payload.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_net::proto::WireError;

    fn opts() -> RingkvOptions {
        RingkvOptions { r: Level::Default, w: Level::Count(1), durable: Some(false), timeout_ms: 100 }
    }

    #[test]
    fn ringkv_requests_round_trip_and_reuse_buffers() {
        let mut c = Codec::Ringkv(RingkvCodec::new(opts()));
        let mut out = Vec::new();
        let a = c.encode(WireReq::Put { key: b"k1", value: &[7; 100], context: b"ctx" }, &mut out);
        let b = c.encode(WireReq::Get { key: b"k2", value_len: 0 }, &mut out);
        assert_eq!((a, b), (1, 2));
        let mut d = ringkv_net::frame::FrameDecoder::new(1 << 20);
        d.push(&out);
        let first = decode(d.next_frame().unwrap().unwrap(), DecodeLimits::SERVER).unwrap();
        match first {
            Message::Request(RequestFrame {
                id: 1,
                timeout_ms: 100,
                body: Request::Put { key, value, context, w, durable },
                ..
            }) => {
                assert_eq!((key.as_slice(), value.len(), context.as_slice()), (&b"k1"[..], 100, &b"ctx"[..]));
                assert_eq!((w, durable), (Level::Count(1), Some(false)));
            }
            m => panic!("{m:?}"),
        }
        let second = decode(d.next_frame().unwrap().unwrap(), DecodeLimits::SERVER).unwrap();
        assert!(matches!(second, Message::Request(RequestFrame { id: 2, body: Request::Get { .. }, .. })));
    }

    #[test]
    fn ringkv_replies_parse_including_partial_and_errors() {
        let mut enc = Encoder::new();
        let mut bytes = enc.to_vec(&Message::Response(Response::new(
            9,
            Ok(WireReply::Get(GetResult { found: true, values: vec![vec![1; 10]], context: vec![4, 5] })),
        )));
        let first = bytes.len();
        bytes.extend(
            enc.to_vec(&Message::Response(Response::new(
                3,
                Err(WireError::new(ringkv_net::ErrorCode::Timeout, "slow")),
            ))),
        );
        let mut c = Codec::Ringkv(RingkvCodec::new(opts()));
        for cut in 0..first {
            assert!(c.parse(&bytes[..cut]).unwrap().is_none(), "cut {cut}");
        }
        let (r, used) = c.parse(&bytes).unwrap().unwrap();
        assert_eq!((r.id, r.outcome, r.context, used), (9, Outcome::Ok { found: true }, vec![4, 5], first));
        let (r, _) = c.parse(&bytes[first..]).unwrap().unwrap();
        assert_eq!((r.id, r.outcome), (3, Outcome::Error(Cow::Borrowed("Timeout"))));
        assert!(c.parse(&[0, 0, 0, 0, 1]).is_err(), "an empty frame is a protocol error");
    }

    #[test]
    fn redis_replies_map_to_outcomes() {
        let mut c = Codec::Redis;
        let mut out = Vec::new();
        c.encode(WireReq::Put { key: b"k", value: b"v", context: b"" }, &mut out);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n");
        let input = b"+OK\r\n$-1\r\n$1\r\nv\r\n-MOVED 5 127.0.0.1:7001\r\n-OOM no memory\r\n";
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((r, used)) = c.parse(&input[at..]).unwrap() {
            got.push(r.outcome);
            at += used;
        }
        assert_eq!(
            got,
            vec![
                Outcome::Ok { found: true },
                Outcome::Ok { found: false },
                Outcome::Ok { found: true },
                Outcome::Redirect(Redirect::Moved { slot: 5, addr: "127.0.0.1:7001".parse().unwrap() }),
                Outcome::Error(Cow::Borrowed("OOM")),
            ]
        );
    }

    #[test]
    fn echo_frames_have_ringkv_sizes() {
        let mut ringkv = RingkvCodec::new(opts());
        let mut echo = EchoCodec::new(opts());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let get = WireReq::Get { key: b"user123", value_len: 1024 };
        ringkv.encode(get, &mut a);
        echo.encode(get, &mut b);
        assert_eq!(a.len(), b.len(), "the request is as long as ringkv's");
        let asked = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
        let real = Encoder::new()
            .to_vec(&Message::Response(Response::new(
                1,
                Ok(WireReply::Get(GetResult {
                    found: true,
                    values: vec![vec![0; 1024]],
                    context: vec![0; ECHO_CONTEXT_BYTES],
                })),
            )))
            .len();
        assert!(asked.abs_diff(real) <= 8, "asked {asked} real {real}");
        let mut reply = (asked as u32 - 4).to_le_bytes().to_vec();
        reply.resize(asked, 0);
        let (r, used) = Codec::Echo(echo).parse(&reply).unwrap().unwrap();
        assert_eq!((r.outcome, used), (Outcome::Ok { found: true }, asked));
    }
}
