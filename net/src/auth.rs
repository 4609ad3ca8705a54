//! Authentication by challenge and response: what each side computes.
//!
//! Both sides hold the same secret: the cluster secret for peers, a token or
//! a user's password for clients. Neither sends it. The connecting side puts
//! a fresh nonce in its hello; a node that requires authentication answers
//! with a [`Challenge`](crate::proto::Challenge) carrying its own fresh nonce
//! (and, to a peer, its own proof, so a peer also knows it reached a member);
//! the connecting side answers with [`Message::Auth`](crate::proto::Message):
//! HMAC-SHA256, keyed with the secret, over a label, both nonces and the
//! hello's identity (cluster, role, user or node id). A recorded exchange is
//! worthless on another connection because the node's nonce differs.
//!
//! Invariants: proofs are compared in constant time ([`verify`]); the label
//! differs per direction, so a node's proof can never be replayed as a
//! peer's answer; nonces are [`NONCE_BYTES`] from the OS's generator.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of each side's nonce.
pub const NONCE_BYTES: usize = 32;

/// Which side a proof is from: the connecting side, or the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The side that sent the hello.
    Connecting,
    /// The node that sent the challenge.
    Node,
}

/// What a connecting side presents as who it is.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credentials {
    /// One of the tokens configured on the nodes (`auth_tokens`).
    Token(String),
    /// A user and password configured on the nodes (`auth_users`).
    User { name: String, password: String },
    /// The cluster secret: only nodes use it, as peers.
    ClusterSecret(String),
}

impl std::fmt::Debug for Credentials {
    // Never print a secret, even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Token(_) => f.write_str("Token(..)"),
            Credentials::User { name, .. } => write!(f, "User {{ name: {name:?}, .. }}"),
            Credentials::ClusterSecret(_) => f.write_str("ClusterSecret(..)"),
        }
    }
}

impl Credentials {
    /// The user name the hello carries (empty for a token or a secret).
    pub fn user(&self) -> &str {
        match self {
            Credentials::User { name, .. } => name,
            _ => "",
        }
    }

    /// The key the proof is computed with.
    pub fn secret(&self) -> &[u8] {
        match self {
            Credentials::Token(t) | Credentials::ClusterSecret(t) => t.as_bytes(),
            Credentials::User { password, .. } => password.as_bytes(),
        }
    }
}

/// Where the command-line tools take a client's credentials from, besides
/// their flags. The password has no flag: a flag shows in `ps`.
pub const TOKEN_ENV: &str = "RINGKV_TOKEN";
pub const USER_ENV: &str = "RINGKV_USER";
pub const PASSWORD_ENV: &str = "RINGKV_PASSWORD";

impl Credentials {
    /// A client's credentials from a token, or a user and password, as the
    /// tools take them (flags, else [`TOKEN_ENV`], [`USER_ENV`] and
    /// [`PASSWORD_ENV`]); `None` when none is given.
    pub fn from_options(
        token: Option<&str>,
        user: Option<&str>,
        password: Option<&str>,
    ) -> Result<Option<Credentials>, String> {
        let nonempty = |v: Option<&str>| v.filter(|s| !s.is_empty()).map(String::from);
        match (nonempty(token), nonempty(user)) {
            (Some(_), Some(_)) => Err("give a token or a user, not both".into()),
            (Some(t), None) => Ok(Some(Credentials::Token(t))),
            (None, Some(name)) => match nonempty(password) {
                Some(password) => Ok(Some(Credentials::User { name, password })),
                None => Err(format!("user {name:?} needs a password in ${PASSWORD_ENV}")),
            },
            (None, None) => Ok(None),
        }
    }
}

/// A fresh nonce from the operating system.
pub fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; NONCE_BYTES];
    getrandom::getrandom(&mut n).expect("the OS random source is available");
    n
}

/// What one side's proof covers besides the nonces: who the hello said it was.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    pub cluster: &'a str,
    /// "client" or "peer".
    pub role: &'a str,
    /// The user (clients) or node id (peers) from the hello.
    pub identity: &'a str,
    pub connecting_nonce: &'a [u8],
    pub node_nonce: &'a [u8],
}

/// The MAC over a transcript, keyed with `secret`, ready to finalise or verify.
fn mac(secret: &[u8], direction: Direction, t: &Transcript<'_>) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    let label: &[u8] = match direction {
        Direction::Connecting => b"ringkv-auth-v1 connecting",
        Direction::Node => b"ringkv-auth-v1 node",
    };
    // Length-prefixed fields, so no two transcripts encode alike.
    for part in
        [label, t.cluster.as_bytes(), t.role.as_bytes(), t.identity.as_bytes(), t.connecting_nonce, t.node_nonce]
    {
        mac.update(&(part.len() as u32).to_le_bytes());
        mac.update(part);
    }
    mac
}

/// The proof `direction`'s side sends, keyed with `secret`.
pub fn proof(secret: &[u8], direction: Direction, t: &Transcript<'_>) -> Vec<u8> {
    mac(secret, direction, t).finalize().into_bytes().to_vec()
}

/// Whether `got` is `direction`'s proof for `secret`. The comparison takes
/// the same time however many bytes match (`hmac` compares in constant time).
pub fn verify(secret: &[u8], direction: Direction, t: &Transcript<'_>, got: &[u8]) -> bool {
    mac(secret, direction, t).verify_slice(got).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(cn: &'a [u8], nn: &'a [u8]) -> Transcript<'a> {
        Transcript { cluster: "c", role: "peer", identity: "n1", connecting_nonce: cn, node_nonce: nn }
    }

    #[test]
    fn a_proof_verifies_only_with_the_same_secret_nonces_and_direction() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b, "nonces are fresh");
        let p = proof(b"secret", Direction::Connecting, &t(&a, &b));
        assert!(verify(b"secret", Direction::Connecting, &t(&a, &b), &p));
        assert!(!verify(b"secreT", Direction::Connecting, &t(&a, &b), &p), "another secret");
        assert!(!verify(b"secret", Direction::Node, &t(&a, &b), &p), "a node's proof is not a peer's");
        assert!(!verify(b"secret", Direction::Connecting, &t(&a, &a), &p), "another node nonce: no replay");
        let other = Transcript { identity: "n2", ..t(&a, &b) };
        assert!(!verify(b"secret", Direction::Connecting, &other, &p), "bound to the identity");
        assert!(!verify(b"secret", Direction::Connecting, &t(&a, &b), &p[..31]));
    }

    /// The proof is part of the wire format: these values were computed
    /// apart from this code (Python's `hmac` over the same length-prefixed
    /// fields), so a change to what the proof covers fails here before it
    /// splits a cluster of mixed versions.
    #[test]
    fn proofs_match_an_independent_computation() {
        let (cn, nn): (Vec<u8>, Vec<u8>) = ((0..32).collect(), (32..64).collect());
        let t = Transcript { cluster: "ringkv", role: "peer", identity: "n1", connecting_nonce: &cn, node_nonce: &nn };
        let hex = |p: Vec<u8>| p.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let secret = b"0123456789abcdef";
        assert_eq!(
            hex(proof(secret, Direction::Connecting, &t)),
            "1941dc049b55eddb0e0e7fe994bea65cc14804ae4a8d982ae240daa5f918126c"
        );
        assert_eq!(
            hex(proof(secret, Direction::Node, &t)),
            "9015114e08bcb7af3bdee590e0ff4b586f618145d658f6f3de1471c97447cb28"
        );
    }

    #[test]
    fn tool_options_make_one_kind_of_credentials_or_say_what_is_missing() {
        assert_eq!(Credentials::from_options(None, None, Some("pw")), Ok(None));
        assert_eq!(Credentials::from_options(Some(""), Some(""), None), Ok(None), "empty means unset");
        assert_eq!(Credentials::from_options(Some("t"), None, None), Ok(Some(Credentials::Token("t".into()))));
        let alice = Credentials::User { name: "alice".into(), password: "pw".into() };
        assert_eq!(Credentials::from_options(None, Some("alice"), Some("pw")), Ok(Some(alice)));
        let e = Credentials::from_options(None, Some("alice"), None).unwrap_err();
        assert!(e.contains("RINGKV_PASSWORD") && e.contains("alice"), "{e}");
        assert!(Credentials::from_options(Some("t"), Some("alice"), Some("pw")).unwrap_err().contains("not both"));
    }

    #[test]
    fn credentials_never_print_their_secret() {
        let c = Credentials::User { name: "alice".into(), password: "hunter2".into() };
        let shown = format!("{c:?}");
        assert!(shown.contains("alice") && !shown.contains("hunter2"), "{shown}");
        assert!(!format!("{:?}", Credentials::Token("tok-123".into())).contains("tok-123"));
    }
}
