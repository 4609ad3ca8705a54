//! The sans-I/O core: everything the clients decide, with no sockets, no
//! clock and no threads, so it is tested by feeding it bytes and times.
//!
//! - [`conn`]: one connection's state machine (encode, receive, match
//!   answers to requests in any order, wire deadlines);
//! - [`route`]: the routing state (topology, endpoint health, observed
//!   latency, when to refresh);
//! - [`op`]: one request's attempts across replicas (failover, hedging,
//!   the overall deadline).
//!
//! The shells ([`crate::Client`], and `AsyncClient` with the `tokio`
//! feature) only move bytes and read the clock. Nothing here is `Send` by
//! requirement; a shell that moves a [`conn::Connection`] into a task
//! relies on it happening to be.

pub mod conn;
pub mod op;
pub mod route;
