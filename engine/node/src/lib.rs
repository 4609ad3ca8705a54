//! The ringkv node: the I/O shell around `ringkv-core`.
//!
//! - [`store`]: one log-structured store per shard on glommio DMA files;
//! - [`shard`]: the per-core runtime that owns a store and serves connections;
//! - [`server`]: starts the shards, checks the data directory, handles signals;
//! - [`config`]: every setting, declared once, and its checks;
//! - [`tls`]: the node's TLS on client ports and peer connections;
//! - [`preflight`]: what the host must offer glommio (kernel, io_uring, memlock).

pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod datadir;
pub mod driver;
pub mod events;
pub mod load;
pub mod metrics;
pub mod peer;
pub mod preflight;
pub mod server;
pub mod service;
pub mod shard;
pub mod store;
pub mod tls;
pub mod view;
