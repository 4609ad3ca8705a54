//! Test support for ringkv: real processes on loopback, and checkers.
//!
//! - [`harness`]: builds the `ringkv` binary, starts nodes on 127.0.0.x, and
//!   stops them however a test ends;
//! - [`certs`]: test CAs and certificates for TLS, made at test time;
//! - [`faults`]: network partitions between nodes with nftables rules;
//! - [`load`]: a bounded client load that records what it did;
//! - [`raw`]: protocol connections that misbehave on purpose;
//! - [`recorder`]: a `metrics` recorder that tallies what a library reports;
//! - [`history`]: the checker for such records (lost, resurrected, phantom
//!   values, stale reads).

pub mod certs;
pub mod faults;
pub mod harness;
pub mod history;
pub mod load;
pub mod raw;
pub mod recorder;
