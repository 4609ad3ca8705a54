//! Test support for ringkv: real processes on loopback, and checkers.
//!
//! - [`harness`]: builds the `ringkv` binary, starts nodes on 127.0.0.x, and
//!   stops them however a test ends.

pub mod harness;
