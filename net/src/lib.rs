//! ringkv's wire protocol and client library.
//!
//! - [`frame`]: length-prefixed framing with a maximum frame size;
//! - [`proto`]: typed messages and their verified flatbuffer encoding;
//! - [`session`]: the client side of a connection as a sans-I/O state machine;
//! - [`client`]: a blocking, pipelining client for one endpoint;
//! - [`tls`]: PEM loading and the rustls settings every connecting side shares;
//! - [`topology`]: routing by the cluster's layout (which replica's shard
//!   serves each key), for ring-aware clients such as `ringkv-client`.
//!
//! The schema is `net/schema/ringkv.fbs`; the generated code lives in
//! `generated/` and is refreshed by `tools/gen-wire.sh`.

pub mod auth;
pub mod client;
pub mod frame;
mod generated;
pub mod proto;
pub mod session;
pub mod tls;
pub mod topology;

pub use client::{Client, ClientConfig, ClientError, WriteOptions};
pub use proto::{ErrorCode, GetResult, Level, Reply, Request, WireError};
pub use topology::Topology;
