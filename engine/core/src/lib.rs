//! ringkv's pure core: the distributed logic as data and functions.
//!
//! Nothing in this crate touches a socket, a file, a clock or a random source:
//! time and messages are inputs. That keeps every algorithm testable in
//! isolation and lets a deterministic simulator drive a whole cluster of these
//! cores in one thread. The node crate (`ringkv-engine`) is the I/O shell
//! around it.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod antientropy;
pub mod autoscale;
pub mod codec;
pub mod coordinator;
pub mod effects;
pub mod exchange;
pub mod failure;
pub mod handoff;
pub mod hints;
pub mod keyspace;
pub mod latency;
pub mod membership;
pub mod merkle;
pub mod plan;
pub mod quorum;
pub mod ring;
pub mod topology;
pub mod version;

pub use keyspace::{key_hash, partition_of, PairError};
pub use version::{Actor, Dot, Object, Sibling, VersionVector};
