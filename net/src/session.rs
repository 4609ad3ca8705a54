//! The client side of a connection as a state machine, with no I/O.
//!
//! A [`Session`] turns requests into bytes to send and received bytes into
//! events. It owns the pending-request table, so it can tell a response to a
//! request we sent from a stray one, and it caps requests in flight. Blocking
//! and async clients are thin loops around it.

use crate::frame::{FrameDecoder, FrameError};
use crate::proto::{
    decode, DecodeError, DecodeLimits, Encoder, Hello, HelloAck, Message, Request, RequestFrame, Response, WireError,
    PROTOCOL_VERSION,
};
use std::collections::HashSet;
use thiserror::Error;

/// The largest frame a client accepts: a get may return many siblings.
pub const CLIENT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    #[error("the server refused the connection: {0}")]
    Refused(WireError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Connected(HelloAck),
    Response(Response),
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Handshaking,
    Ready,
}

pub struct Session {
    state: State,
    encoder: Encoder,
    decoder: FrameDecoder,
    out: Vec<u8>,
    next_id: u64,
    pending: HashSet<u64>,
}

impl Session {
    /// A session that opens with `hello`; its bytes are queued for sending.
    pub fn new(hello: Hello) -> Session {
        let mut s = Session {
            state: State::Handshaking,
            encoder: Encoder::new(),
            decoder: FrameDecoder::new(CLIENT_MAX_FRAME_BYTES),
            out: Vec::new(),
            next_id: 1,
            pending: HashSet::new(),
        };
        s.encoder.encode(&Message::Hello(hello), &mut s.out);
        s
    }

    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Queues a request and returns its id. Requests may be queued during the
    /// handshake; the server reads them after the hello.
    pub fn send(&mut self, body: Request, timeout_ms: u32) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id);
        self.encoder.encode(&Message::Request(RequestFrame { id, timeout_ms, body, hops: 0 }), &mut self.out);
        id
    }

    /// Bytes waiting to be written to the socket.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Marks `n` bytes of [`Session::output`] as written.
    pub fn consumed(&mut self, n: usize) {
        self.out.drain(..n);
    }

    /// Feeds bytes read from the socket.
    pub fn receive(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
    }

    /// A region to read into directly, see [`FrameDecoder::spare`].
    pub fn read_buffer(&mut self, min: usize) -> &mut [u8] {
        self.decoder.spare(min)
    }

    pub fn commit_read(&mut self, n: usize) {
        self.decoder.commit(n);
    }

    /// The next event from what has been received, if any. An error means the
    /// connection is unusable and must be closed.
    pub fn poll(&mut self) -> Result<Option<Event>, SessionError> {
        let Some(payload) = self.decoder.next_frame()? else {
            return Ok(None);
        };
        match decode(payload, DecodeLimits::CLIENT)? {
            Message::HelloAck(ack) if self.state == State::Handshaking => {
                if ack.protocol_version != PROTOCOL_VERSION {
                    return Err(SessionError::Protocol(format!(
                        "server speaks protocol {}, we speak {PROTOCOL_VERSION}",
                        ack.protocol_version
                    )));
                }
                self.state = State::Ready;
                Ok(Some(Event::Connected(ack)))
            }
            Message::Response(r) if self.state == State::Ready => {
                if !self.pending.remove(&r.id) {
                    return Err(SessionError::Protocol(format!("response to unknown request {}", r.id)));
                }
                Ok(Some(Event::Response(r)))
            }
            Message::Error(e) => Err(SessionError::Refused(e)),
            other => Err(SessionError::Protocol(format!("unexpected message {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ErrorCode, Level, Reply, Role};

    fn server_says(s: &mut Session, msg: Message) {
        let bytes = Encoder::new().to_vec(&msg);
        s.receive(&bytes);
    }

    fn ack() -> Message {
        Message::HelloAck(HelloAck {
            protocol_version: PROTOCOL_VERSION,
            node_id: "n".into(),
            shard: 0,
            shards: 1,
            cluster: "c".into(),
        })
    }

    #[test]
    fn pipelined_responses_match_their_requests_in_any_order() {
        let mut s = Session::new(Hello::client("c"));
        let a = s.send(Request::Get { key: b"a".to_vec(), r: Level::Default }, 0);
        let b = s.send(Request::Get { key: b"b".to_vec(), r: Level::Default }, 0);
        assert_eq!(s.in_flight(), 2);
        server_says(&mut s, ack());
        assert!(matches!(s.poll().unwrap(), Some(Event::Connected(_))));
        server_says(&mut s, Message::Response(Response::new(b, Ok(Reply::Delete))));
        server_says(&mut s, Message::Response(Response::new(a, Ok(Reply::Delete))));
        let ids: Vec<u64> = std::iter::from_fn(|| match s.poll().unwrap() {
            Some(Event::Response(r)) => Some(r.id),
            _ => None,
        })
        .collect();
        assert_eq!(ids, vec![b, a]);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn the_hello_is_the_first_thing_sent() {
        let s = Session::new(Hello::client("c"));
        let mut d = FrameDecoder::new(1 << 16);
        d.push(s.output());
        match decode(d.next_frame().unwrap().unwrap(), DecodeLimits::SERVER).unwrap() {
            Message::Hello(h) => assert_eq!(h.role, Role::Client),
            m => panic!("first frame was {m:?}"),
        }
    }

    #[test]
    fn a_refusal_and_a_stray_response_are_errors() {
        let mut s = Session::new(Hello::client("c"));
        server_says(&mut s, Message::Error(WireError::new(ErrorCode::ClusterMismatch, "no")));
        assert!(matches!(s.poll(), Err(SessionError::Refused(_))));

        let mut s = Session::new(Hello::client("c"));
        server_says(&mut s, ack());
        s.poll().unwrap();
        server_says(&mut s, Message::Response(Response::new(99, Ok(Reply::Delete))));
        assert!(matches!(s.poll(), Err(SessionError::Protocol(_))));
    }
}
