//! What the client reports about itself, through the `metrics` facade and
//! `tracing` (both no-ops until the application installs a recorder or a
//! subscriber).
//!
//! Metrics (labels after the kind):
//!
//! | name | kind | what |
//! | --- | --- | --- |
//! | `ringkv_client_requests_total` | counter, `op`, `outcome` | requests finished; outcome `ok` or the error's kind |
//! | `ringkv_client_request_duration_seconds` | histogram, `op`, `outcome` | from the call to its result, every attempt included |
//! | `ringkv_client_attempts_total` | counter, `op` | sends to a node, failovers and hedges included |
//! | `ringkv_client_failovers_total` | counter, `op` | attempts made because an earlier one failed or was slow |
//! | `ringkv_client_hedges_total` | counter, `op` | speculative reads |
//! | `ringkv_client_copy_fallbacks_total` | counter, `op` | client-driven reads whose copies did not agree (or refused, or were late), read again through a coordinator |
//! | `ringkv_client_connections_opened_total` | counter | connections opened (so reconnects show) |
//! | `ringkv_client_connections_failed_total` | counter, `reason` | connections lost or refused |
//! | `ringkv_client_topology_refreshes_total` | counter, `outcome` | topology fetches |
//! | `ringkv_client_write_backs_failed_total` | counter, `reason` | merges a resolving read could not write back |
//!
//! Every request runs in a `ringkv_client.request` span (fields `op`,
//! `key_bytes`, then `outcome`, `attempts`, `failovers`, `hedges`); each
//! send after the first (a failover or a hedge), a lost connection and a
//! failed request are `debug` events in it.

use crate::core::op::Stats;
use crate::error::Error;
use std::time::Duration;
use tracing::field::Empty;

/// Metric names, for a user's dashboards and the tests.
pub mod names {
    /// Requests finished.
    pub const REQUESTS: &str = "ringkv_client_requests_total";
    /// Request durations.
    pub const DURATION: &str = "ringkv_client_request_duration_seconds";
    /// Sends to a node.
    pub const ATTEMPTS: &str = "ringkv_client_attempts_total";
    /// Attempts after a failure or a slow replica.
    pub const FAILOVERS: &str = "ringkv_client_failovers_total";
    /// Speculative reads.
    pub const HEDGES: &str = "ringkv_client_hedges_total";
    /// Client-driven reads read again through a coordinator.
    pub const COPY_FALLBACKS: &str = "ringkv_client_copy_fallbacks_total";
    /// Connections opened.
    pub const CONNECTIONS_OPENED: &str = "ringkv_client_connections_opened_total";
    /// Connections lost or refused.
    pub const CONNECTIONS_FAILED: &str = "ringkv_client_connections_failed_total";
    /// Topology fetches.
    pub const TOPOLOGY_REFRESHES: &str = "ringkv_client_topology_refreshes_total";
    /// Merges a resolving read could not write back.
    pub const WRITE_BACKS_FAILED: &str = "ringkv_client_write_backs_failed_total";
}

/// The span a request runs in.
pub(crate) fn request_span(op: &'static str, key: &[u8]) -> tracing::Span {
    tracing::debug_span!(
        "ringkv_client.request",
        op,
        key_bytes = key.len(),
        outcome = Empty,
        attempts = Empty,
        failovers = Empty,
        hedges = Empty
    )
}

/// The label of an outcome.
fn outcome<T>(result: &Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.kind(),
    }
}

/// Records a finished request.
pub(crate) fn request_done<T>(
    op: &'static str,
    span: &tracing::Span,
    elapsed: Duration,
    stats: Stats,
    result: &Result<T, Error>,
) {
    let outcome = outcome(result);
    metrics::counter!(names::REQUESTS, "op" => op, "outcome" => outcome).increment(1);
    metrics::histogram!(names::DURATION, "op" => op, "outcome" => outcome).record(elapsed.as_secs_f64());
    metrics::counter!(names::ATTEMPTS, "op" => op).increment(u64::from(stats.attempts));
    if stats.failovers > 0 {
        metrics::counter!(names::FAILOVERS, "op" => op).increment(u64::from(stats.failovers));
    }
    if stats.copy_fallbacks > 0 {
        metrics::counter!(names::COPY_FALLBACKS, "op" => op).increment(u64::from(stats.copy_fallbacks));
    }
    if stats.hedges > 0 {
        metrics::counter!(names::HEDGES, "op" => op).increment(u64::from(stats.hedges));
    }
    span.record("outcome", outcome);
    span.record("attempts", stats.attempts);
    span.record("failovers", stats.failovers);
    span.record("hedges", stats.hedges);
    if let Err(e) = result {
        tracing::debug!(parent: span, error = %e, "request failed");
    }
}

/// An attempt is sent; after the first, it is a failover or a hedge.
pub(crate) fn attempt_sent(addr: std::net::SocketAddr, attempt: u32) {
    if attempt > 0 {
        tracing::debug!(%addr, attempt, "sending to another replica");
    }
}

/// A connection was opened.
pub(crate) fn connection_opened(addr: std::net::SocketAddr) {
    metrics::counter!(names::CONNECTIONS_OPENED).increment(1);
    tracing::debug!(%addr, "connection opened");
}

/// A connection failed (or could not be opened).
pub(crate) fn connection_failed(addr: std::net::SocketAddr, error: &Error) {
    metrics::counter!(names::CONNECTIONS_FAILED, "reason" => error.kind()).increment(1);
    tracing::debug!(%addr, %error, "connection failed");
}

/// A topology fetch ended.
pub(crate) fn topology_refreshed(result: &Result<u64, Error>) {
    metrics::counter!(names::TOPOLOGY_REFRESHES, "outcome" => outcome(result)).increment(1);
    match result {
        Ok(version) => tracing::debug!(ring_version = version, "topology refreshed"),
        Err(error) => tracing::debug!(%error, "topology refresh failed"),
    }
}

/// A resolving read's write-back failed (the read itself succeeded).
pub(crate) fn write_back_failed(error: &Error) {
    metrics::counter!(names::WRITE_BACKS_FAILED, "reason" => error.kind()).increment(1);
    tracing::debug!(%error, "writing a merge back failed; the next read merges again");
}
