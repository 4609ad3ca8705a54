//! The client's error type, and how the wire's error codes map onto it.
//!
//! One enum for what a caller can act on: the node's verdicts (a quorum not
//! reachable, a pair too large, an overloaded or refusing node) and the
//! client's own (no answer in time, a broken connection). The mapping from
//! [`ErrorCode`] lives here and nowhere else ([`Error::from_wire`]), and so
//! does the rule of which errors another replica may fix
//! ([`Error::is_retryable_elsewhere`]).
//!
//! Errors are `Clone` (an I/O error is shared behind an `Arc`): a connection
//! that breaks fails every request multiplexed on it with the same error.

use ringkv_net::session::SessionError;
use ringkv_net::{ErrorCode, WireError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// The result of a client operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong with a request.
///
/// Match on the variants you handle and keep a `_` arm: new ones may come.
///
/// ```
/// use ringkv_client::Error;
///
/// fn should_back_off(e: &Error) -> bool {
///     matches!(e, Error::Overloaded { .. } | Error::Unavailable { .. })
/// }
/// assert!(!should_back_off(&Error::NoReplicas));
/// ```
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum Error {
    /// Too few replicas are reachable for the requested quorum; nothing was
    /// written.
    #[error("unavailable: {message}")]
    Unavailable {
        /// The node's explanation.
        message: String,
    },
    /// No answer in time: either the node's coordinator timed out waiting
    /// for replicas (`by_node`), or this client waited `after` for any
    /// replica. A write may have been applied on some replicas.
    #[error("timed out after {after:?}{}", if *by_node { " (the node's quorum timed out)" } else { "" })]
    Timeout {
        /// How long the client had waited when it gave up.
        after: Duration,
        /// Whether the node answered `Timeout` rather than not answering.
        by_node: bool,
    },
    /// The key plus the value exceed the node's `max_pair_bytes`; nothing
    /// was written.
    #[error("pair too large: {message}")]
    PairTooLarge {
        /// The node's explanation, with the limit.
        message: String,
    },
    /// The node refused the request for lack of capacity; it was not
    /// processed and may be retried later.
    #[error("overloaded: {message}")]
    Overloaded {
        /// The node's explanation.
        message: String,
    },
    /// Missing or wrong credentials, or a request this connection may not
    /// send.
    #[error("unauthorized: {message}")]
    Unauthorized {
        /// The node's explanation.
        message: String,
    },
    /// The node's store failed (for example, its disk is full).
    #[error("storage error on the node: {message}")]
    Storage {
        /// The node's explanation.
        message: String,
    },
    /// The node found the request malformed (an empty key, a bad context).
    #[error("bad request: {message}")]
    BadRequest {
        /// The node's explanation.
        message: String,
    },
    /// The node answered with another error code.
    #[error("{code:?}: {message}")]
    Server {
        /// The wire's code.
        code: ErrorCode,
        /// The node's explanation.
        message: String,
    },
    /// Connecting to `addr` failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        source: Arc<std::io::Error>,
    },
    /// A connection failed while requests were on it.
    #[error("connection failed: {0}")]
    Io(Arc<std::io::Error>),
    /// TLS with `addr` failed: its certificate is not signed by a CA the
    /// client trusts, does not carry the name checked, or the node refused
    /// the client's certificate (or its absence). Another node may have a
    /// good certificate, so requests move on; the error says which case.
    #[error("TLS with {addr}: {message}")]
    Tls {
        /// The endpoint.
        addr: SocketAddr,
        /// What failed, in words.
        message: String,
    },
    /// The node broke the protocol (or refused the handshake); the
    /// connection was closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The key has no replica the client can address (no topology yet, or
    /// every member unknown).
    #[error("the key has no reachable replica")]
    NoReplicas,
    /// A value read could not be decoded into the requested type.
    #[error("cannot decode a stored value: {0}")]
    Decode(String),
    /// The client was shut down.
    #[error("the client is closed")]
    Closed,
    /// The builder was given a setting that cannot work.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl Error {
    /// The client error for an error the node answered.
    pub fn from_wire(e: WireError) -> Error {
        let message = e.message;
        match e.code {
            ErrorCode::Unavailable => Error::Unavailable { message },
            ErrorCode::Timeout => Error::Timeout { after: Duration::ZERO, by_node: true },
            ErrorCode::PairTooLarge => Error::PairTooLarge { message },
            ErrorCode::Overloaded => Error::Overloaded { message },
            ErrorCode::Unauthorized => Error::Unauthorized { message },
            ErrorCode::Storage => Error::Storage { message },
            ErrorCode::BadRequest => Error::BadRequest { message },
            code => Error::Server { code, message },
        }
    }

    /// The client error for a session (handshake or decoding) failure.
    pub fn from_session(e: SessionError) -> Error {
        match e {
            SessionError::Refused(w) if w.code == ErrorCode::Unauthorized => Error::from_wire(w),
            other => Error::Protocol(other.to_string()),
        }
    }

    /// A TLS failure with `addr`.
    pub fn tls(addr: SocketAddr, e: &rustls::Error) -> Error {
        Error::Tls { addr, message: ringkv_net::tls::describe(e) }
    }

    /// An I/O error, shared.
    pub fn io(e: std::io::Error) -> Error {
        Error::Io(Arc::new(e))
    }

    /// Whether sending the same request to another replica may succeed:
    /// the replica did not answer (connection trouble, no answer in time on
    /// the client's side), refused for lack of capacity before doing
    /// anything, or said our ring is stale. A node's verdict on the request
    /// itself (a quorum not met, a pair too large, a node-side timeout, bad
    /// credentials) stands: another coordinator would reach the same
    /// replicas and say the same.
    pub fn is_retryable_elsewhere(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Io(_)
            | Error::Tls { .. }
            | Error::Protocol(_)
            | Error::Overloaded { .. } => true,
            Error::Timeout { by_node, .. } => !by_node,
            Error::Server { code, .. } => *code == ErrorCode::StaleTopology,
            _ => false,
        }
    }

    /// Whether the endpoint itself misbehaved (it did not answer, or the
    /// connection broke), so it should be tried last for a while.
    pub fn is_endpoint_failure(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::Io(_)
                | Error::Tls { .. }
                | Error::Protocol(_)
                | Error::Timeout { by_node: false, .. }
        )
    }

    /// A short name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Unavailable { .. } => "unavailable",
            Error::Timeout { .. } => "timeout",
            Error::PairTooLarge { .. } => "pair_too_large",
            Error::Overloaded { .. } => "overloaded",
            Error::Unauthorized { .. } => "unauthorized",
            Error::Storage { .. } => "storage",
            Error::BadRequest { .. } => "bad_request",
            Error::Server { .. } => "server",
            Error::Connect { .. } => "connect",
            Error::Io(_) => "io",
            Error::Tls { .. } => "tls",
            Error::Protocol(_) => "protocol",
            Error::NoReplicas => "no_replicas",
            Error::Decode(_) => "decode",
            Error::Closed => "closed",
            Error::Config(_) => "config",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_code_maps_to_a_typed_error_and_only_capacity_or_staleness_retries() {
        for code in ErrorCode::ALL {
            let e = Error::from_wire(WireError::new(code, "why"));
            let expected = match code {
                ErrorCode::Unavailable => "unavailable",
                ErrorCode::Timeout => "timeout",
                ErrorCode::PairTooLarge => "pair_too_large",
                ErrorCode::Overloaded => "overloaded",
                ErrorCode::Unauthorized => "unauthorized",
                ErrorCode::Storage => "storage",
                ErrorCode::BadRequest => "bad_request",
                _ => "server",
            };
            assert_eq!(e.kind(), expected, "{code:?}");
            let retry = matches!(code, ErrorCode::Overloaded | ErrorCode::StaleTopology);
            assert_eq!(e.is_retryable_elsewhere(), retry, "{code:?}");
            assert!(!e.is_endpoint_failure(), "{code:?}: the node answered, so it is up");
            if let Error::Unavailable { message } | Error::PairTooLarge { message } = &e {
                assert_eq!(message, "why", "the node's explanation is kept");
            }
        }
    }

    #[test]
    fn transport_failures_retry_elsewhere_and_mark_the_endpoint() {
        let io = Error::io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let late = Error::Timeout { after: Duration::from_millis(5), by_node: false };
        let addr = SocketAddr::from(([127, 0, 0, 1], 7070));
        let tls = Error::tls(addr, &rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        assert!(tls.to_string().contains("not signed by a CA trusted here"), "{tls}");
        for e in [io, late, tls] {
            assert!(e.is_retryable_elsewhere() && e.is_endpoint_failure(), "{e}");
        }
        let refused = Error::from_session(SessionError::Refused(WireError::new(ErrorCode::Unauthorized, "bad token")));
        assert!(matches!(refused, Error::Unauthorized { .. }), "{refused:?}");
        assert!(!refused.is_retryable_elsewhere(), "wrong credentials are wrong on every node");
    }
}
