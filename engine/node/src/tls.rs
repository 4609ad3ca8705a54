//! The node's TLS: built once at start-up from the `tls_*` settings, shared
//! by every shard (docs/SECURITY.md, "TLS").
//!
//! With a certificate configured, every connection is TLS: the client ports
//! accept only TLS ([`NodeTls::accept`]), and peers are dialled over TLS
//! ([`NodeTls::connect`]). Both directions check the other side against
//! `tls_ca`: a node dialling a peer checks the peer's server certificate
//! for the peer's IP address (or `tls_peer_server_name`) and presents its
//! own certificate as a client certificate; a node accepting a connection
//! verifies a client certificate whenever one is presented, requires one
//! from every client with `tls_require_client_cert`, and from every peer
//! always (the connection says whether it had one: [`Accepted::certified`]).
//! Authentication (challenge and response) then runs inside TLS unchanged.
//!
//! Invariants: a file that is missing, not PEM, or a key that does not go
//! with its certificate fails start-up with one line naming the setting; a
//! connection that is not TLS, or whose TLS handshake fails, is closed with
//! a log line and costs the node nothing else.

use crate::config::NodeConfig;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::{client, server, TlsAcceptor, TlsConnector};
use glommio::net::TcpStream;
use ringkv_net::proto::{Encoder, ErrorCode, Message, WireError};
use ringkv_net::tls::{self, ClientTls, Identity, HANDSHAKE_RECORD};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The node's TLS settings, loaded; cheap to clone (shared configurations).
#[derive(Clone)]
pub struct NodeTls {
    acceptor: TlsAcceptor,
    peers: ClientTls,
    connector: TlsConnector,
}

/// A TLS connection accepted on a client port.
pub struct Accepted {
    pub stream: server::TlsStream<TcpStream>,
    /// It presented a certificate that `tls_ca` signs (the verifier refused
    /// any other): what a connection needs to act as a peer.
    pub certified: bool,
}

impl NodeTls {
    /// The node's TLS, or `None` when `tls_cert` is unset. The combination
    /// of settings was checked by `NodeConfig::validate`; this reads and
    /// checks the files.
    pub fn load(cfg: &NodeConfig) -> Result<Option<NodeTls>, String> {
        let (Some(cert), Some(key), Some(ca)) = (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_ca) else {
            return Ok(None);
        };
        let identity = Identity::load(cert, "tls_cert", key, "tls_key")?;
        let roots = Arc::new(tls::load_roots(ca, "tls_ca")?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), tls::provider());
        // Without the requirement a client may come without a certificate;
        // one it presents is still verified, and peers are held to theirs
        // after the hello.
        let verifier = if cfg.tls_require_client_cert { verifier } else { verifier.allow_unauthenticated() };
        let verifier = verifier.build().map_err(|e| format!("tls_ca: {e}"))?;
        let server = ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(|e| format!("tls_cert: {e}"))?;
        let peers = ClientTls::new((*roots).clone(), Some(identity), cfg.tls_peer_server_name.as_deref())
            .map_err(|e| format!("tls_peer_server_name: {e}"))?;
        let connector = TlsConnector::from(peers.config.clone());
        Ok(Some(NodeTls { acceptor: TlsAcceptor::from(Arc::new(server)), peers, connector }))
    }

    /// The TLS handshake with a connection accepted on a client port, its
    /// first byte and the handshake both within `timeout`; `None` (logged,
    /// closed) when it is not TLS or fails.
    pub async fn accept(&self, stream: TcpStream, timeout: Duration) -> Option<Accepted> {
        let from = stream.peer_addr().ok();
        let deadline = Instant::now() + timeout;
        let mut first = [0u8; 1];
        let peeked = glommio::timer::timeout(timeout, async { Ok(stream.peek(&mut first).await.unwrap_or(0)) }).await;
        match peeked {
            Ok(1) if first[0] == HANDSHAKE_RECORD => {}
            Ok(1) => {
                tracing::info!(?from, "refused a plain TCP connection: this node speaks TLS only");
                refuse_plain(stream).await;
                return None;
            }
            _ => return None,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let shaken = glommio::timer::timeout(left, async { Ok(self.acceptor.accept(stream).await) }).await;
        match shaken {
            Ok(Ok(stream)) => {
                let certified = stream.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                Some(Accepted { stream, certified })
            }
            Ok(Err(e)) => {
                tracing::info!(?from, error = %io_reason(&e), "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::info!(?from, timeout_ms = timeout.as_millis() as u64, "TLS handshake not done in time");
                None
            }
        }
    }

    /// The TLS handshake with the peer at `addr` over `stream`.
    pub async fn connect(&self, addr: SocketAddr, stream: TcpStream) -> Result<client::TlsStream<TcpStream>, String> {
        self.connector
            .connect(self.peers.name_for(addr.ip()), stream)
            .await
            .map_err(|e| format!("{addr}: TLS: {}", io_reason(&e)))
    }
}

/// What went wrong in a TLS stream's I/O error.
fn io_reason(e: &std::io::Error) -> String {
    tls::from_io(e).map_or_else(|| e.to_string(), tls::describe)
}

/// Tells a plain ringkv client, in its own protocol, that it must use TLS.
/// Its hello is read (and dropped) first, so that closing does not reset
/// the connection before the client has read the answer.
async fn refuse_plain(mut stream: TcpStream) {
    let msg = Message::Error(WireError::new(
        ErrorCode::ProtocolMismatch,
        "this node accepts TLS connections only: connect with TLS (docs/SECURITY.md)",
    ));
    let bytes = Encoder::new().to_vec(&msg);
    let _ = glommio::timer::timeout(Duration::from_secs(1), async {
        let mut hello = [0u8; 4096];
        let _ = stream.write_all(&bytes).await;
        let _ = stream.read(&mut hello).await;
        Ok(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// A self-signed certificate for 127.0.0.1 and its key, as PEM files.
    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    fn cfg(cert: &Path, key: &Path, ca: &Path) -> NodeConfig {
        NodeConfig {
            tls_cert: Some(cert.into()),
            tls_key: Some(key.into()),
            tls_ca: Some(ca.into()),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn bad_tls_files_fail_with_one_line_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "a");
        let (_, other_key) = self_signed(dir.path(), "b");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not PEM at all\n").unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(NodeTls::load(&NodeConfig::default()).unwrap().is_none(), "off without a certificate");
        assert!(NodeTls::load(&cfg(&cert, &key, &cert)).unwrap().is_some(), "a self-signed node is its own CA");
        let cases = [
            (cfg(&missing, &key, &cert), "tls_cert: cannot read"),
            (cfg(&cert, &missing, &cert), "tls_key: cannot read"),
            (cfg(&cert, &key, &missing), "tls_ca: cannot read"),
            (cfg(&garbage, &key, &cert), "tls_cert:"),
            (cfg(&cert, &garbage, &cert), "tls_key:"),
            (cfg(&cert, &key, &garbage), "tls_ca:"),
            (cfg(&cert, &other_key, &cert), "does not go with the certificate"),
        ];
        for (c, expected) in cases {
            let e = NodeTls::load(&c).err().unwrap_or_else(|| panic!("{expected}: loaded"));
            assert!(e.contains(expected), "{expected}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
