//! Tells systemd that the node serves (`Type=notify`) and when it stops.
//!
//! The protocol (sd_notify(3)) is one datagram of `KEY=value` lines sent to
//! the unix socket named by `$NOTIFY_SOCKET`: a path, or `@name` for an
//! abstract socket. A process not started by systemd has no such variable
//! and nothing is sent. A failed send is logged and otherwise ignored: the
//! node serves either way, and systemd's start timeout reports the problem.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for a `Type=notify` service.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (for example `READY=1`) to systemd, if it is listening.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else { return };
    if let Err(e) = send(&target, state) {
        tracing::warn!("cannot tell systemd {state:?} through {}: {e}", target.to_string_lossy());
    }
}

fn send(target: &OsStr, state: &str) -> std::io::Result<()> {
    let addr = match target.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(target)?,
    };
    let n = UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    if n != state.len() {
        return Err(std::io::Error::other(format!("sent {n} of {} bytes", state.len())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_reaches_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("ringkv-notify-test-{}", std::process::id());
        let abs = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        send(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(send(OsStr::new("/nonexistent/notify"), "READY=1").is_err());
    }
}
