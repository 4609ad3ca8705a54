//! The echo server: the loopback round-trip floor, the least a server can do.
//!
//! A request is a frame `[u32 len][u32 reply_size][len - 4 bytes]` (the echo
//! target's frames, see `codec::EchoCodec`); the answer is one frame of
//! `reply_size` bytes in total, `[u32 reply_size - 4][zeros]`. Nothing is
//! parsed beyond the two lengths and nothing is allocated per request.
//!
//! Two modes:
//! - blocking (default): a thread per connection doing read() / write()
//!   on a blocking socket: one read and one write system call per batch of
//!   requests, no event loop, no runtime. The thread sleeps in read(), so
//!   each request pays one wake-up, as any non-spinning server does.
//! - busy-poll: one thread spins over non-blocking sockets and never sleeps:
//!   no wake-up at all, the physical floor of the machine, at the price of a
//!   whole core.

use anyhow::{Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

/// CPU time of the exited connection threads of an in-process echo server
/// (live ones are read from /proc), so `echo://local` can report the
/// server's CPU per request apart from the client's.
static EXITED_THREADS_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// CPU time used so far by this process's echo server threads.
pub fn in_process_cpu_ns() -> u64 {
    EXITED_THREADS_CPU_NS.load(Ordering::Relaxed) + crate::placement::threads_cpu_ns(std::process::id(), "echo-")
}

/// The largest reply the server agrees to produce.
const MAX_REPLY: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct EchoConfig {
    pub listen: SocketAddr,
    pub cpus: Option<Vec<usize>>,
    pub busy_poll: bool,
}

/// Binds and serves until the process ends; calls `ready` with the bound
/// address once it accepts connections.
pub fn serve(cfg: &EchoConfig, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let listener = TcpListener::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    if let Some(c) = cfg.cpus.as_ref().and_then(|c| c.first()) {
        crate::cpu::pin(*c)?;
    }
    ready(addr);
    if cfg.busy_poll {
        busy_poll(listener)
    } else {
        loop {
            let (stream, _) = listener.accept()?;
            let cpus = cfg.cpus.clone();
            std::thread::Builder::new().name("echo-conn".into()).spawn(move || {
                if let Some(c) = cpus.as_ref().and_then(|c| c.first()) {
                    let _ = crate::cpu::pin(*c);
                }
                let _ = serve_blocking(stream);
                EXITED_THREADS_CPU_NS.fetch_add(crate::cpu::thread_cpu_ns(), Ordering::Relaxed);
            })?;
        }
    }
}

/// Answers the complete requests in `buf[..]`, appending replies to `out`;
/// returns the bytes consumed.
fn answer(buf: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut at = 0;
    while buf.len() - at >= 8 {
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if !(4..=MAX_REPLY).contains(&len) {
            return Err(std::io::Error::new(ErrorKind::InvalidData, "bad echo frame"));
        }
        if buf.len() - at < 4 + len {
            break;
        }
        let reply = u32::from_le_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]) as usize;
        let reply = reply.clamp(5, MAX_REPLY);
        out.extend_from_slice(&((reply - 4) as u32).to_le_bytes());
        out.resize(out.len() + reply - 4, 0);
        at += 4 + len;
    }
    Ok(at)
}

/// How far the next frame needs the buffer to reach (to grow it for frames
/// larger than the buffer).
fn needed(buf: &[u8]) -> usize {
    if buf.len() < 4 {
        return 8;
    }
    4 + u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

fn serve_blocking(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut out = Vec::with_capacity(256 * 1024);
    let (mut start, mut end) = (0, 0);
    loop {
        let n = s.read(&mut buf[end..])?;
        if n == 0 {
            return Ok(());
        }
        end += n;
        start += answer(&buf[start..end], &mut out)?;
        if !out.is_empty() {
            s.write_all(&out)?;
            out.clear();
        }
        buf.copy_within(start..end, 0);
        end -= start;
        start = 0;
        let want = needed(&buf[..end]);
        if want > buf.len() {
            buf.resize(want.min(MAX_REPLY + 8), 0);
        }
    }
}

struct Polled {
    s: TcpStream,
    buf: Vec<u8>,
    end: usize,
}

fn busy_poll(listener: TcpListener) -> Result<()> {
    listener.set_nonblocking(true)?;
    let mut conns: Vec<Polled> = Vec::new();
    let mut out = Vec::with_capacity(256 * 1024);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                conns.push(Polled { s, buf: vec![0; 256 * 1024], end: 0 });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        let mut i = 0;
        while i < conns.len() {
            let c = &mut conns[i];
            let alive = match c.s.read(&mut c.buf[c.end..]) {
                Ok(0) => false,
                Ok(n) => {
                    c.end += n;
                    match answer(&c.buf[..c.end], &mut out) {
                        Ok(used) => {
                            c.buf.copy_within(used..c.end, 0);
                            c.end -= used;
                            let want = needed(&c.buf[..c.end]);
                            if want > c.buf.len() {
                                c.buf.resize(want.min(MAX_REPLY + 8), 0);
                            }
                            let ok = write_spinning(&mut c.s, &out).is_ok();
                            out.clear();
                            ok
                        }
                        Err(_) => false,
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => true,
                Err(_) => false,
            };
            if alive {
                i += 1;
            } else {
                conns.swap_remove(i);
            }
        }
        std::hint::spin_loop();
    }
}

fn write_spinning(s: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match s.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Starts an echo server on a thread of this process (for `echo://local`).
pub fn spawn_local(cfg: EchoConfig) -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("echo-server".into()).spawn(move || {
        let r = serve(&cfg, |a| {
            let _ = tx.send(Ok(a));
        });
        if let Err(e) = r {
            let _ = tx.send(Err(e));
        }
    })?;
    rx.recv().context("echo server thread died")?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(len: usize, reply: usize) -> Vec<u8> {
        let mut f = ((len - 4) as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&(reply as u32).to_le_bytes());
        f.resize(len, 7);
        f
    }

    #[test]
    fn answers_whole_frames_with_the_asked_size() {
        let mut input = request(40, 100);
        input.extend(request(12, 9));
        input.extend(&request(30, 50)[..20]);
        let mut out = Vec::new();
        let used = answer(&input, &mut out).unwrap();
        assert_eq!(used, 52);
        assert_eq!(out.len(), 109);
        assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()), 96);
        assert_eq!(u32::from_le_bytes(out[100..104].try_into().unwrap()), 5);
        assert!(answer(&[0, 0, 0, 0, 0, 0, 0, 0], &mut out).is_err());
    }

    #[test]
    fn serves_over_tcp() {
        // Busy-poll mode is left out: its thread would spin for the rest of
        // the test process on a 2-core machine.
        let addr =
            spawn_local(EchoConfig { listen: "127.0.0.1:0".parse().unwrap(), cpus: None, busy_poll: false }).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        let big = request(300_000, 400_000);
        s.write_all(&big).unwrap();
        s.write_all(&request(10, 8)).unwrap();
        let mut got = vec![0u8; 400_008];
        s.read_exact(&mut got).unwrap();
        assert_eq!(u32::from_le_bytes(got[..4].try_into().unwrap()), 399_996);
        assert_eq!(u32::from_le_bytes(got[400_000..400_004].try_into().unwrap()), 4);
    }
}
