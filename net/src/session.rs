//! The client side of a connection as a state machine, with no I/O.
//!
//! A [`Session`] turns requests into bytes to send and received bytes into
//! events. It owns the pending-request table, so it can tell a response to a
//! request we sent from a stray one. Blocking and async clients are thin
//! loops around it.
//!
//! With credentials the hello carries a nonce, and requests queued before
//! the handshake ends are held back until the node's challenge is answered
//! (the node reads that answer before any request). Connecting as a peer,
//! the session checks the node's own proof before it answers, so a peer
//! never talks to an impostor.

use crate::auth::{self, Credentials, Direction, Transcript};
use crate::frame::{FrameDecoder, FrameError};
use crate::proto::{
    decode, DecodeError, DecodeLimits, Encoder, Hello, HelloAck, Message, Request, RequestFrame, Response, Role,
    WireError, PROTOCOL_VERSION,
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
    /// Requests queued while a challenge may still come (credentials only).
    held: Vec<u8>,
    hello: Hello,
    credentials: Option<Credentials>,
    answered_challenge: bool,
    next_id: u64,
    pending: HashSet<u64>,
}

impl Session {
    /// A session that opens with `hello`; its bytes are queued for sending.
    pub fn new(hello: Hello) -> Session {
        Session::with_credentials(hello, None)
    }

    /// A session that authenticates with `credentials` if the node asks.
    pub fn with_credentials(mut hello: Hello, credentials: Option<Credentials>) -> Session {
        if let Some(c) = &credentials {
            hello.auth_nonce = auth::nonce();
            hello.user = c.user().to_string();
        }
        let mut s = Session {
            state: State::Handshaking,
            encoder: Encoder::new(),
            decoder: FrameDecoder::new(CLIENT_MAX_FRAME_BYTES),
            out: Vec::new(),
            held: Vec::new(),
            hello,
            credentials,
            answered_challenge: false,
            next_id: 1,
            pending: HashSet::new(),
        };
        s.encoder.encode(&Message::Hello(s.hello.clone()), &mut s.out);
        s
    }

    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn holding(&self) -> bool {
        self.state == State::Handshaking && self.credentials.is_some() && !self.answered_challenge
    }

    /// Queues a request and returns its id. Requests may be queued during the
    /// handshake; the server reads them after the hello (and the answer to
    /// its challenge).
    pub fn send(&mut self, body: Request, timeout_ms: u32) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id);
        let msg = Message::Request(RequestFrame { id, timeout_ms, body, hops: 0 });
        let buf = if self.holding() { &mut self.held } else { &mut self.out };
        self.encoder.encode(&msg, buf);
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

    /// Bytes received that no event has consumed yet.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// Moves the whole output out (cheaper than [`Session::output`] plus
    /// [`Session::consumed`] when the caller writes it all anyway).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
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

    fn release_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.out.extend_from_slice(&held);
    }

    fn transcript<'a>(&'a self, node_nonce: &'a [u8]) -> Transcript<'a> {
        let peer = self.hello.role == Role::Peer;
        Transcript {
            cluster: &self.hello.cluster,
            role: if peer { "peer" } else { "client" },
            identity: if peer { &self.hello.node_id } else { &self.hello.user },
            connecting_nonce: &self.hello.auth_nonce,
            node_nonce,
        }
    }

    /// Answers the node's challenge (after checking a node's proof, as a peer).
    fn answer(&mut self, nonce: &[u8], node_proof: &[u8]) -> Result<(), SessionError> {
        let Some(creds) = self.credentials.clone() else {
            return Err(SessionError::Protocol("the node asks for credentials and none were given".into()));
        };
        if self.answered_challenge {
            return Err(SessionError::Protocol("a second challenge".into()));
        }
        let t = self.transcript(nonce);
        if self.hello.role == Role::Peer && !auth::verify(creds.secret(), Direction::Node, &t, node_proof) {
            return Err(SessionError::Protocol("the node could not prove it knows the cluster secret".into()));
        }
        let proof = auth::proof(creds.secret(), Direction::Connecting, &t);
        self.encoder.encode(&Message::Auth { proof }, &mut self.out);
        self.answered_challenge = true;
        self.release_held();
        Ok(())
    }

    /// The next event from what has been received, if any. An error means the
    /// connection is unusable and must be closed.
    pub fn poll(&mut self) -> Result<Option<Event>, SessionError> {
        loop {
            let Some(payload) = self.decoder.next_frame()? else {
                return Ok(None);
            };
            match decode(payload, DecodeLimits::CLIENT)? {
                Message::Challenge(c) if self.state == State::Handshaking => {
                    self.answer(&c.nonce, &c.proof)?;
                    continue;
                }
                Message::HelloAck(ack) if self.state == State::Handshaking => {
                    if ack.protocol_version != PROTOCOL_VERSION {
                        return Err(SessionError::Protocol(format!(
                            "server speaks protocol {}, we speak {PROTOCOL_VERSION}",
                            ack.protocol_version
                        )));
                    }
                    if self.hello.role == Role::Peer && self.credentials.is_some() && !self.answered_challenge {
                        // Mutual authentication: a node that does not ask
                        // for the secret cannot prove it knows it either.
                        return Err(SessionError::Protocol(
                            "the node did not ask for the cluster secret, so it cannot prove it is a member \
                             (is cluster_secret set on every node?)"
                                .into(),
                        ));
                    }
                    self.state = State::Ready;
                    // A node without authentication acknowledges at once.
                    self.release_held();
                    return Ok(Some(Event::Connected(ack)));
                }
                Message::Response(r) if self.state == State::Ready => {
                    if !self.pending.remove(&r.id) {
                        return Err(SessionError::Protocol(format!("response to unknown request {}", r.id)));
                    }
                    return Ok(Some(Event::Response(r)));
                }
                Message::Error(e) => return Err(SessionError::Refused(e)),
                other => return Err(SessionError::Protocol(format!("unexpected message {other:?}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ErrorCode, Level, Reply};

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

#[cfg(test)]
mod auth_tests {
    use super::*;
    use crate::proto::{Challenge, Level};

    fn frames(bytes: &[u8]) -> Vec<Message> {
        let mut d = FrameDecoder::new(1 << 20);
        d.push(bytes);
        std::iter::from_fn(|| d.next_frame().unwrap().map(|f| decode(f, DecodeLimits::PEER).unwrap())).collect()
    }

    fn peer_hello() -> Hello {
        Hello { role: Role::Peer, node_id: "n1".into(), ..Hello::client("c") }
    }

    #[test]
    fn requests_wait_behind_the_answer_to_the_challenge() {
        let mut s = Session::with_credentials(Hello::client("c"), Some(Credentials::Token("t".into())));
        s.send(Request::Get { key: b"k".to_vec(), r: Level::Default }, 0);
        let sent = frames(s.output());
        assert_eq!(sent.len(), 1, "only the hello goes before the challenge");
        let Message::Hello(h) = &sent[0] else { panic!() };
        assert_eq!(h.auth_nonce.len(), auth::NONCE_BYTES);
        let n = s.output().len();
        s.consumed(n);
        let node_nonce = auth::nonce();
        let ch = Message::Challenge(Challenge { nonce: node_nonce.clone(), proof: vec![] });
        s.receive(&Encoder::new().to_vec(&ch));
        assert!(s.poll().unwrap().is_none());
        let sent = frames(s.output());
        assert_eq!(sent.len(), 2, "the answer, then the held request");
        let Message::Auth { proof } = &sent[0] else { panic!("{:?}", sent[0]) };
        let t = Transcript {
            cluster: "c",
            role: "client",
            identity: "",
            connecting_nonce: &h.auth_nonce,
            node_nonce: &node_nonce,
        };
        assert!(auth::verify(b"t", Direction::Connecting, &t, proof));
        assert!(matches!(sent[1], Message::Request(_)));
    }

    #[test]
    fn a_peer_refuses_a_node_that_cannot_prove_the_secret() {
        let mut s = Session::with_credentials(peer_hello(), Some(Credentials::ClusterSecret("s".into())));
        let ch = Message::Challenge(Challenge { nonce: auth::nonce(), proof: vec![0; 32] });
        s.receive(&Encoder::new().to_vec(&ch));
        assert!(matches!(s.poll(), Err(SessionError::Protocol(m)) if m.contains("cluster secret")));
        assert_eq!(frames(s.output()).len(), 1, "no answer was given to the impostor");
    }

    #[test]
    fn a_peer_with_a_secret_refuses_a_node_that_skips_the_challenge() {
        let mut s = Session::with_credentials(peer_hello(), Some(Credentials::ClusterSecret("s".into())));
        let ack = HelloAck {
            protocol_version: PROTOCOL_VERSION,
            node_id: "n2".into(),
            shard: 0,
            shards: 1,
            cluster: "c".into(),
        };
        s.receive(&Encoder::new().to_vec(&Message::HelloAck(ack.clone())));
        assert!(matches!(s.poll(), Err(SessionError::Protocol(m)) if m.contains("did not ask")));
        // A client with a token may meet a node that needs none.
        let mut c = Session::with_credentials(Hello::client("c"), Some(Credentials::Token("t".into())));
        c.send(Request::Ping { payload: vec![] }, 0);
        c.receive(&Encoder::new().to_vec(&Message::HelloAck(ack)));
        assert!(matches!(c.poll(), Ok(Some(Event::Connected(_)))));
        assert_eq!(frames(c.output()).len(), 2, "the hello, then the request held until the ack");
    }

    #[test]
    fn a_client_without_credentials_refuses_a_challenge_with_a_clear_error() {
        let mut s = Session::new(Hello::client("c"));
        let ch = Message::Challenge(Challenge { nonce: auth::nonce(), proof: vec![] });
        s.receive(&Encoder::new().to_vec(&ch));
        assert!(matches!(s.poll(), Err(SessionError::Protocol(m)) if m.contains("credentials")));
    }
}
