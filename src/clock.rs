//! A coarse monotonic clock for the hot path: milliseconds since a process-wide epoch.

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds since a process-wide epoch, never 0 (0 means "not set" where it is stored).
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_millis() as u64 + 1
}
