//! Clock reads for the shell (the core takes time as an input).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Microseconds on the monotonic clock since the process first asked: the
/// time base every protocol machine of this node runs on.
pub fn now_us() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static BASE: OnceLock<Instant> = OnceLock::new();
    // Starts at one second, so "zero" never looks like a real deadline.
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1_000_000
}
