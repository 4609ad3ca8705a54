//! The Rust client library of ringkv.
//!
//! A [`Client`] (blocking) or, with the `tokio` feature, an `AsyncClient`
//! learns the cluster's topology from a seed and sends each request
//! straight to the owning shard of one of the key's replicas. Both are thin
//! shells over one sans-I/O [`core`]: the same routing, failover, hedging
//! and deadlines, tested without a network.
//!
//! - **Routing**: key -> partition -> replicas -> each replica's shard
//!   port, from the topology; refreshed when a node reports a newer ring
//!   or a request fails over.
//! - **Riding through failures**: a replica that does not answer within a
//!   deadline derived from the observed latency (twice the p99, bounded)
//!   is given up on and the next asked, for reads and writes; a broken or
//!   refused connection moves on at once; a failed endpoint is tried last
//!   for a back-off, then probed. Reads are also *hedged*: not answered
//!   after the observed p99, they go to the next replica as well.
//! - **Multiplexing**: many requests in flight on each connection,
//!   answered in any order; a connection that stops answering is detected
//!   by deadline and replaced.
//! - **Siblings**: [`Client::get`] returns every concurrent value and the
//!   causal [`Context`]; a [`Resolve`] merges them into one typed value,
//!   [`Client::get_resolved`] writes the merge back and [`Client::update`]
//!   reads, merges, changes and writes; [`check`] tests a merge's laws.
//! - **Errors**: one [`Error`] enum, typed from the wire's codes.
//! - **Telemetry**: metrics through the `metrics` facade and `tracing`
//!   spans, see [`telemetry`].
//!
//! - **TLS**: optional, with rustls ([`ClientBuilder::tls_ca`], a client
//!   certificate for nodes that require one); a TLS failure is
//!   [`Error::Tls`], saying whether a certificate was not trusted, did not
//!   carry the right name, or was refused. Without TLS, traffic (values
//!   included) crosses the network in clear.
//!
//! ```no_run
//! use ringkv_client::{Client, Level, WriteOptions};
//!
//! let mut client = Client::builder()
//!     .seeds(["127.0.0.1:7070", "127.0.0.2:7070", "127.0.0.3:7070"])
//!     .write_quorum(Level::Quorum)
//!     .build()?;
//! client.put("cart:42", "apples", &WriteOptions::default())?;
//! let read = client.get("cart:42")?;
//! for value in read.values() {
//!     println!("{}", String::from_utf8_lossy(value));
//! }
//! # Ok::<(), ringkv_client::Error>(())
//! ```
//!
//! Features: `tokio` (the async client), `proptest` ([`check`]'s
//! `merge_laws`, drawing values from a strategy).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
// Operating errors are values here; an invariant that must hold says so
// with `expect` and the reason.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

#[cfg(feature = "tokio")]
mod async_client;
mod blocking;
pub mod builder;
pub mod check;
pub mod core;
mod error;
mod requests;
mod resolve;
mod siblings;
pub mod telemetry;
mod tls;

#[cfg(feature = "tokio")]
pub use async_client::AsyncClient;
pub use blocking::Client;
pub use builder::ClientBuilder;
pub use error::{Error, Result};
pub use resolve::{resolve_siblings, LastWriterWins, LatestBy, Resolution, Resolve, Timestamped, Value};
pub use ringkv_net::auth::Credentials;
pub use ringkv_net::{ErrorCode, Level, Topology};
/// The TLS library of [`ClientBuilder::tls_roots`]: its `RootCertStore`.
pub use rustls;
pub use siblings::{Context, ReadOptions, Siblings, WriteOptions};
