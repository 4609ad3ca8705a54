//! ringkv's wire protocol and client library.
//!
//! - [`frame`]: length-prefixed framing with a maximum frame size;
//! - [`proto`]: typed messages and their verified flatbuffer encoding;
//! - [`session`]: the client side of a connection as a sans-I/O state machine;
//! - [`client`]: a blocking, pipelining client for one endpoint;
//! - [`tls`]: PEM loading and the rustls settings every connecting side shares;
//! - [`topology`] and [`cluster`]: routing by the cluster's layout, and a
//!   client that sends each request straight to a replica's owning shard.
//!
//! The schema is `net/schema/ringkv.fbs`; the generated code lives in
//! `generated/` and is refreshed by `tools/gen-wire.sh`.

pub mod auth;
pub mod client;
pub mod cluster;
pub mod frame;
mod generated;
pub mod proto;
pub mod session;
pub mod tls;
pub mod topology;

pub use client::{Client, ClientConfig, ClientError, WriteOptions};
pub use cluster::ClusterClient;
pub use proto::{ErrorCode, GetResult, Level, Reply, Request, WireError};
pub use topology::Topology;
