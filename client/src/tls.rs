//! TLS between a shell's socket and a [`Connection`], sans-I/O style: the
//! shell hands in whatever non-blocking `Read + Write` its socket is (a
//! std `TcpStream`, or a tokio one through [`TryIo`]) and these functions
//! move bytes between it, a rustls `ClientConnection` and the connection's
//! plaintext buffers. Both shells use them, so TLS behaves the same in the
//! blocking and the async client.
//!
//! Invariants: a connection without TLS never reaches this module (the
//! shells keep their plain path as it was); a TLS failure fails the
//! connection with [`Error::Tls`], after a best-effort send of the alert
//! rustls queued, so the node can log why.

use crate::builder::Config;
use crate::core::conn::Connection;
use crate::error::{Error, Result};
use rustls::ClientConnection;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

/// How much plaintext to take from TLS at once.
const READ_CHUNK: usize = 64 * 1024;

/// The TLS side of a new connection to `addr`, when the client uses TLS.
pub(crate) fn start(config: &Config, addr: SocketAddr) -> Result<Option<Box<ClientConnection>>> {
    let Some(tls) = &config.tls else { return Ok(None) };
    let conn = tls.connect(addr.ip()).map_err(|e| Error::tls(addr, &e))?;
    Ok(Some(Box::new(conn)))
}

/// Whether there is something for the socket to take: TLS records, or
/// plaintext that TLS will encrypt at once (before the handshake is done,
/// rustls holds plaintext back, so waiting to write it would spin).
pub(crate) fn wants_write(tls: &ClientConnection, core: &Connection) -> bool {
    tls.wants_write() || (!tls.is_handshaking() && !core.transmit().is_empty())
}

/// Passes what `core` has to send through TLS into `sock`, as far as the
/// socket takes it.
pub(crate) fn flush(tls: &mut ClientConnection, core: &mut Connection, sock: &mut impl Write) {
    loop {
        let mut progressed = false;
        let out = core.transmit();
        if !out.is_empty() {
            match tls.writer().write(out) {
                Ok(n) if n > 0 => {
                    core.advance_transmit(n);
                    progressed = true;
                }
                // rustls' buffer is full until the socket takes records.
                Ok(_) => {}
                Err(e) => return core.fail(Error::io(e)),
            }
        }
        if tls.wants_write() {
            match tls.write_tls(sock) {
                Ok(0) => return core.fail(Error::io(io::Error::from(io::ErrorKind::WriteZero))),
                Ok(_) => progressed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                Err(e) => return core.fail(Error::io(e)),
            }
        }
        if !progressed {
            return;
        }
    }
}

/// Reads what `sock` holds through TLS into `core`.
pub(crate) fn receive(
    tls: &mut ClientConnection,
    core: &mut Connection,
    sock: &mut (impl Read + Write),
    addr: SocketAddr,
) {
    while !core.is_failed() {
        let (eof, drained) = match tls.read_tls(sock) {
            Ok(0) => (true, false),
            Ok(_) => (false, false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (false, true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return core.fail(Error::io(e)),
        };
        if let Err(e) = tls.process_new_packets() {
            // Tell the node why (the alert rustls queued), then give up.
            let _ = tls.write_tls(sock);
            return core.fail(Error::tls(addr, &e));
        }
        loop {
            let buf = core.read_buffer(READ_CHUNK);
            match tls.reader().read(buf) {
                Ok(0) => return core.commit_read(0),
                Ok(n) => core.commit_read(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Closed without close_notify: the same as a TCP close.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return core.commit_read(0),
                Err(e) => return core.fail(Error::io(e)),
            }
        }
        if eof {
            return core.commit_read(0);
        }
        if drained {
            return;
        }
    }
}

/// A tokio socket as a non-blocking `Read + Write`, for [`flush`] and
/// [`receive`]: `WouldBlock` clears its readiness, as tokio requires.
#[cfg(feature = "tokio")]
pub(crate) struct TryIo<'a>(pub &'a tokio::net::TcpStream);

#[cfg(feature = "tokio")]
impl Read for TryIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

#[cfg(feature = "tokio")]
impl Write for TryIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
