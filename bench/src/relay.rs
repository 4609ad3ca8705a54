//! The relay floor: the machine's cost of one hop. `relay-server` accepts
//! connections and, for each, opens one to the upstream and copies bytes
//! both ways, parsing nothing. An echo server behind one relay costs what a
//! request relayed once by a node costs at the least (client, relay, echo,
//! relay, client: four messages, like a read coordinated at r=2); behind two
//! chained relays, two hops.
//!
//! One thread and one level-triggered epoll set, non-blocking sockets with
//! TCP_NODELAY, one fixed buffer per direction. Per readiness event it does
//! one read and one write (no read until it sees EAGAIN): the fewest system
//! calls a byte-copying hop can make without batching across connections.
//! A side is read only while the buffer it fills is empty, so a slow reader
//! holds its writer back (back-pressure) instead of growing memory; a write
//! that is cut short waits for EPOLLOUT. When either side closes or fails,
//! both are closed.
//!
//! The upstream connection is opened with a blocking connect before its
//! socket joins the loop: on loopback it completes at once, connections are
//! opened before a benchmark's measured window, and it keeps the loop free
//! of a connecting state.

use anyhow::{Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Bytes buffered per direction of a connection.
const BUF_BYTES: usize = 64 * 1024;
/// Readiness events taken per epoll_wait.
const EVENTS: usize = 256;
/// The token of the listening socket; a connection side's is
/// `slot << 1 | side`.
const LISTENER: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub cpus: Option<Vec<usize>>,
}

/// Bytes read from one side and not yet written to the other.
struct Pending {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Pending {
    fn new() -> Pending {
        Pending { buf: vec![0; BUF_BYTES].into_boxed_slice(), start: 0, end: 0 }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// One relayed connection: side 0 is the client, side 1 the upstream;
/// `pending[i]` holds bytes read from side i for side 1 - i.
struct Pair {
    sock: [TcpStream; 2],
    pending: [Pending; 2],
    /// The interest each side is registered with now.
    interest: [u32; 2],
}

enum Step {
    Open,
    Close,
}

/// The epoll set, closed on drop.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> Result<Epoll> {
        // SAFETY: no pointers; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid event for the call's duration; the kernel
        // copies it.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait(&self, events: &mut [libc::epoll_event]) -> std::io::Result<usize> {
        loop {
            // SAFETY: the buffer holds `events.len()` events.
            let n =
                unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as libc::c_int, -1) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Binds and relays until the process ends; calls `ready` with the bound
/// address once it accepts connections.
pub fn serve(cfg: &RelayConfig, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let listener = TcpListener::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    listener.set_nonblocking(true)?;
    if let Some(c) = cfg.cpus.as_ref().and_then(|c| c.first()) {
        crate::cpu::pin(*c)?;
    }
    let ep = Epoll::new()?;
    ep.ctl(libc::EPOLL_CTL_ADD, listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER)?;
    ready(listener.local_addr()?);
    let mut slots: Vec<Option<Pair>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    // Slots closed in this batch: reused only after it, so a later event of
    // the batch that names a closed slot cannot reach a new connection.
    let mut closed: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    loop {
        let n = ep.wait(&mut events)?;
        for ev in &events[..n] {
            let (token, ready) = (ev.u64, ev.events);
            if token == LISTENER {
                accept_all(&listener, cfg.upstream, &ep, &mut slots, &mut free)?;
                continue;
            }
            let (slot, side) = ((token >> 1) as usize, (token & 1) as usize);
            let Some(pair) = slots.get_mut(slot).and_then(Option::as_mut) else { continue };
            if let Step::Close = on_ready(pair, side, ready) {
                // Dropping the streams closes them, which also takes them
                // out of the epoll set.
                slots[slot] = None;
                closed.push(slot);
                continue;
            }
            sync_interest(&ep, pair, slot);
        }
        free.append(&mut closed);
    }
}

fn accept_all(
    listener: &TcpListener,
    upstream: SocketAddr,
    ep: &Epoll,
    slots: &mut Vec<Option<Pair>>,
    free: &mut Vec<usize>,
) -> Result<()> {
    loop {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e).context("accept"),
        };
        // A connection the upstream refuses is closed at once: the client
        // sees the hop fail as it would see the server fail.
        let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
            eprintln!("relay: cannot connect to upstream {upstream}; closing the client's connection");
            continue;
        };
        let mut ok = true;
        for s in [&client, &up] {
            ok &= s.set_nodelay(true).is_ok() && s.set_nonblocking(true).is_ok();
        }
        if !ok {
            continue;
        }
        let slot = free.pop().unwrap_or_else(|| {
            slots.push(None);
            slots.len() - 1
        });
        // Both buffers start empty: both sides are read, neither written.
        let start = libc::EPOLLIN as u32;
        let pair = Pair { sock: [client, up], pending: [Pending::new(), Pending::new()], interest: [start; 2] };
        let added = (0..2)
            .all(|side| ep.ctl(libc::EPOLL_CTL_ADD, pair.sock[side].as_raw_fd(), start, token(slot, side)).is_ok());
        if !added {
            free.push(slot);
            continue;
        }
        slots[slot] = Some(pair);
    }
}

fn token(slot: usize, side: usize) -> u64 {
    ((slot as u64) << 1) | side as u64
}

/// Read a side while the buffer it fills is empty; write to it while the
/// other side's buffer holds bytes for it.
fn wanted_interest(pair: &Pair, side: usize) -> u32 {
    let mut want = 0;
    if pair.pending[side].is_empty() {
        want |= libc::EPOLLIN as u32;
    }
    if !pair.pending[1 - side].is_empty() {
        want |= libc::EPOLLOUT as u32;
    }
    want
}

fn sync_interest(ep: &Epoll, pair: &mut Pair, slot: usize) {
    for side in 0..2 {
        let want = wanted_interest(pair, side);
        if want != pair.interest[side]
            && ep.ctl(libc::EPOLL_CTL_MOD, pair.sock[side].as_raw_fd(), want, token(slot, side)).is_ok()
        {
            pair.interest[side] = want;
        }
    }
}

/// Handles one readiness event of `side`.
fn on_ready(pair: &mut Pair, side: usize, ready: u32) -> Step {
    let other = 1 - side;
    // Writable: drain what the other side sent.
    if ready & libc::EPOLLOUT as u32 != 0 && !pair.pending[other].is_empty() {
        if let Step::Close = flush(pair, other) {
            return Step::Close;
        }
    }
    // Readable (or hung up / failed: the read says which).
    let readable = (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32;
    if ready & readable != 0 && pair.pending[side].is_empty() {
        let p = &mut pair.pending[side];
        match pair.sock[side].read(&mut p.buf) {
            Ok(0) => return Step::Close,
            Ok(n) => (p.start, p.end) = (0, n),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Step::Close,
        }
        if !pair.pending[side].is_empty() {
            return flush(pair, side);
        }
    } else if ready & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 && ready & libc::EPOLLOUT as u32 == 0 {
        // Hung up while its buffer waits on the other side: nothing more
        // can come through in either direction that anyone will read.
        return Step::Close;
    }
    Step::Open
}

/// Writes what was read from `from` to the other side, as far as it goes.
fn flush(pair: &mut Pair, from: usize) -> Step {
    let p = &mut pair.pending[from];
    match pair.sock[1 - from].write(&p.buf[p.start..p.end]) {
        Ok(0) => Step::Close,
        Ok(n) => {
            p.start += n;
            if p.is_empty() {
                (p.start, p.end) = (0, 0);
            }
            Step::Open
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => Step::Open,
        Err(_) => Step::Close,
    }
}

/// Starts a relay on a thread of this process (for tests).
#[cfg(test)]
pub fn spawn_local(cfg: RelayConfig) -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("relay".into()).spawn(move || {
        let r = serve(&cfg, |a| {
            let _ = tx.send(Ok(a));
        });
        if let Err(e) = r {
            let _ = tx.send(Err(e));
        }
    })?;
    rx.recv().map_err(|_| anyhow::anyhow!("relay thread died"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;

    /// A plain byte echo: whatever comes in goes back, until EOF.
    fn byte_echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        addr
    }

    #[test]
    fn relays_large_and_small_payloads_through_two_hops_and_closes() {
        let echo = byte_echo();
        let cfg = |upstream| RelayConfig { listen: "127.0.0.1:0".parse().unwrap(), upstream, cpus: None };
        let hop1 = spawn_local(cfg(echo)).unwrap();
        let hop2 = spawn_local(cfg(hop1)).unwrap();
        let mut s = TcpStream::connect(hop2).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();

        // Small messages one at a time.
        for i in 0..50u8 {
            s.write_all(&[i; 7]).unwrap();
            let mut got = [0u8; 7];
            s.read_exact(&mut got).unwrap();
            assert_eq!(got, [i; 7]);
        }
        // Far more than the buffers and the socket buffers hold, written
        // from another thread while this one reads: back-pressure on every
        // hop, partial writes, nothing lost or reordered.
        let total = 8 << 20;
        let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = s.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
        let mut got = vec![0u8; total];
        s.read_exact(&mut got).unwrap();
        writer.join().unwrap();
        assert!(got == data, "the bytes came back in order");

        // Closing our side closes the relayed connection end to end.
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn a_refused_upstream_closes_the_client() {
        let gone = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let hop =
            spawn_local(RelayConfig { listen: "127.0.0.1:0".parse().unwrap(), upstream: gone, cpus: None }).unwrap();
        let mut s = TcpStream::connect(hop).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    }
}
