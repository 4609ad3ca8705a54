//! Raw protocol connections, for tests that misbehave on purpose: half a
//! frame, no hello, a forged peer, a client that never reads. What the
//! client library would never send, these helpers send byte for byte.

use ringkv_net::proto::{decode, DecodeLimits, Encoder, ErrorCode, Hello, Message, Request, RequestFrame};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A connection with no handshake yet; reads give up after five seconds.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connecting to the node");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    s
}

/// A connection that has done an unauthenticated client handshake.
pub fn client(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr);
    send(&mut s, &Message::Hello(Hello::client("ringkv")));
    let msg = read_frame(&mut s).expect("hello ack");
    assert!(matches!(msg, Message::HelloAck(_)), "got {msg:?}");
    s
}

pub fn send(s: &mut TcpStream, msg: &Message) {
    s.write_all(&Encoder::new().to_vec(msg)).expect("writing a frame");
}

/// A request frame.
pub fn request(id: u64, body: Request) -> Message {
    Message::Request(RequestFrame { id, timeout_ms: 0, hops: 0, body })
}

/// Reads one frame; `None` when the server closed the connection.
pub fn read_frame(s: &mut TcpStream) -> Option<Message> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut buf).ok()?;
    Some(decode(&buf, DecodeLimits::CLIENT).expect("server frames decode"))
}

pub fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

/// Expects an error frame with `code` and then the end of the connection;
/// returns the error's message.
pub fn expect_error_then_close(s: &mut TcpStream, code: ErrorCode) -> String {
    let message = match read_frame(s) {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, code, "{e}");
            e.message
        }
        other => panic!("expected an error frame, got {other:?}"),
    };
    assert!(closed(s), "connection closed after the error");
    message
}
