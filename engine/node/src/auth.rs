//! Who may connect, and as what: the node's side of authentication.
//!
//! Built once from the node's settings. A role needs authentication when the
//! node has credentials for it: the cluster secret for peers, tokens or
//! users for clients. Without them the hello's word is taken, which the
//! settings allow only on loopback addresses (`NodeConfig::validate`).
//!
//! Invariants: a wrong token, an unknown user and a wrong password get the
//! same answer, so the answer does not tell which names exist; every
//! candidate secret is checked in constant time; the node proves the
//! cluster secret to a peer before the peer answers (mutual).

use crate::config::NodeConfig;
use ringkv_net::auth::{self, Direction, Transcript};
use ringkv_net::proto::{Challenge, ErrorCode, Hello, Role, WireError};
use std::collections::BTreeMap;

pub struct Authenticator {
    cluster_secret: Option<String>,
    tokens: Vec<String>,
    users: BTreeMap<String, String>,
    peers_authenticate: bool,
    clients_authenticate: bool,
}

/// A challenge sent, waiting for its answer.
pub struct Pending {
    nonce: Vec<u8>,
}

impl Authenticator {
    pub fn new(cfg: &NodeConfig) -> Authenticator {
        Authenticator {
            cluster_secret: cfg.cluster_secret.clone(),
            tokens: cfg.auth_tokens.clone(),
            users: cfg.auth_users.clone(),
            peers_authenticate: cfg.authenticates(Role::Peer),
            clients_authenticate: cfg.authenticates(Role::Client),
        }
    }

    /// Whether connections of `role` must prove who they are.
    pub fn required(&self, role: Role) -> bool {
        match role {
            Role::Peer => self.peers_authenticate,
            Role::Client => self.clients_authenticate,
        }
    }

    /// The secret this node itself presents to other nodes, if any.
    pub fn cluster_secret(&self) -> Option<&str> {
        self.cluster_secret.as_deref()
    }

    /// The challenge for `hello`, or why the connection is refused at once.
    /// Only for a role that [`Authenticator::required`] says must prove itself.
    pub fn challenge(&self, cluster: &str, hello: &Hello) -> Result<(Challenge, Pending), WireError> {
        if hello.auth_nonce.len() != auth::NONCE_BYTES {
            return Err(unauthorized(match hello.role {
                Role::Peer => "this node requires peers to prove the cluster secret",
                Role::Client => "this node requires credentials (a token, or a user and password)",
            }));
        }
        let nonce = auth::nonce();
        let proof = match (hello.role, &self.cluster_secret) {
            (Role::Peer, Some(secret)) => {
                auth::proof(secret.as_bytes(), Direction::Node, &transcript(cluster, hello, &nonce))
            }
            _ => Vec::new(),
        };
        Ok((Challenge { nonce: nonce.clone(), proof }, Pending { nonce }))
    }

    /// Checks the answer to a challenge.
    pub fn verify(&self, cluster: &str, hello: &Hello, pending: &Pending, proof: &[u8]) -> Result<(), WireError> {
        let t = transcript(cluster, hello, &pending.nonce);
        let ok = match hello.role {
            Role::Peer => {
                self.cluster_secret.iter().any(|s| auth::verify(s.as_bytes(), Direction::Connecting, &t, proof))
            }
            Role::Client if hello.user.is_empty() => {
                // Check every token, not just until one matches: the time
                // taken says nothing about which one did.
                self.tokens
                    .iter()
                    .fold(false, |ok, tok| ok | auth::verify(tok.as_bytes(), Direction::Connecting, &t, proof))
            }
            Role::Client => {
                // An unknown user costs the same HMAC as a known one, so
                // the time taken does not say which names exist.
                let (password, known) = match self.users.get(&hello.user) {
                    Some(p) => (p.as_bytes(), true),
                    None => (&b"ringkv: no such user"[..], false),
                };
                auth::verify(password, Direction::Connecting, &t, proof) && known
            }
        };
        if ok {
            Ok(())
        } else {
            Err(unauthorized("wrong credentials"))
        }
    }
}

fn transcript<'a>(cluster: &'a str, hello: &'a Hello, node_nonce: &'a [u8]) -> Transcript<'a> {
    let peer = hello.role == Role::Peer;
    Transcript {
        cluster,
        role: if peer { "peer" } else { "client" },
        identity: if peer { &hello.node_id } else { &hello.user },
        connecting_nonce: &hello.auth_nonce,
        node_nonce,
    }
}

fn unauthorized(msg: &str) -> WireError {
    WireError::new(ErrorCode::Unauthorized, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_net::auth::Credentials;
    use ringkv_net::proto::{Encoder, Message};
    use ringkv_net::session::{Event, Session};

    fn node(secret: Option<&str>, tokens: &[&str], users: &[(&str, &str)]) -> Authenticator {
        let cfg = NodeConfig {
            cluster_secret: secret.map(String::from),
            auth_tokens: tokens.iter().map(|t| t.to_string()).collect(),
            auth_users: users.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect(),
            ..NodeConfig::default()
        };
        Authenticator::new(&cfg)
    }

    /// Runs a client session against `a`; `Ok` when the node accepts it.
    fn handshake(a: &Authenticator, hello: Hello, creds: Option<Credentials>) -> Result<(), WireError> {
        let mut s = Session::with_credentials(hello, creds);
        let mut d = ringkv_net::frame::FrameDecoder::new(1 << 20);
        d.push(s.output());
        let n = s.output().len();
        s.consumed(n);
        let Message::Hello(h) =
            ringkv_net::proto::decode(d.next_frame().unwrap().unwrap(), ringkv_net::proto::DecodeLimits::SERVER)
                .unwrap()
        else {
            panic!()
        };
        let (ch, pending) = a.challenge("c", &h)?;
        s.receive(&Encoder::new().to_vec(&Message::Challenge(ch)));
        s.poll().map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
        d.push(s.output());
        let Message::Auth { proof } =
            ringkv_net::proto::decode(d.next_frame().unwrap().unwrap(), ringkv_net::proto::DecodeLimits::SERVER)
                .unwrap()
        else {
            panic!()
        };
        a.verify("c", &h, &pending, &proof)?;
        let ack = ringkv_net::proto::HelloAck {
            protocol_version: 1,
            node_id: "n".into(),
            shard: 0,
            shards: 1,
            cluster: "c".into(),
        };
        s.receive(&Encoder::new().to_vec(&Message::HelloAck(ack)));
        assert!(matches!(s.poll(), Ok(Some(Event::Connected(_)))));
        Ok(())
    }

    #[test]
    fn tokens_users_and_the_cluster_secret_authenticate_and_nothing_else_does() {
        let a = node(Some("s3cret-s3cret-s3cret"), &["tok-0123456789abcdef"], &[("alice", "pw")]);
        assert!(a.required(Role::Peer) && a.required(Role::Client));
        let client = Hello::client("c");
        let peer = Hello { role: Role::Peer, node_id: "n2".into(), ..Hello::client("c") };
        handshake(&a, client.clone(), Some(Credentials::Token("tok-0123456789abcdef".into()))).unwrap();
        let alice = Credentials::User { name: "alice".into(), password: "pw".into() };
        handshake(&a, client.clone(), Some(alice)).unwrap();
        handshake(&a, peer.clone(), Some(Credentials::ClusterSecret("s3cret-s3cret-s3cret".into()))).unwrap();

        let wrong = [
            (client.clone(), Credentials::Token("tok-0123456789abcdeF".into())),
            (client.clone(), Credentials::User { name: "alice".into(), password: "PW".into() }),
            (client.clone(), Credentials::User { name: "bob".into(), password: "pw".into() }),
            // A client token is not the cluster secret.
            (peer.clone(), Credentials::ClusterSecret("tok-0123456789abcdef".into())),
            // The secret is not a client token.
            (client.clone(), Credentials::Token("s3cret-s3cret-s3cret".into())),
        ];
        for (hello, creds) in wrong {
            let e = handshake(&a, hello, Some(creds)).unwrap_err();
            assert!(e.code == ErrorCode::Unauthorized || e.message.contains("cluster secret"), "{e}");
        }
        let e = a.challenge("c", &peer).map(|_| ()).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized, "a peer hello without a nonce is refused at once");
    }

    #[test]
    fn without_credentials_configured_no_role_is_challenged() {
        let a = node(None, &[], &[]);
        assert!(!a.required(Role::Peer) && !a.required(Role::Client));
    }
}
