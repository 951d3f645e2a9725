//! A coarse monotonic clock for the hot path: milliseconds since a process-wide epoch.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds since a process-wide epoch, never 0 (0 means "not set" where it is stored).
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_millis() as u64 + 1
}

/// A gate that opens at most once a second, for warnings that would otherwise flood the log. The first
/// call always opens it, even in the process's first second.
#[derive(Debug, Default)]
pub(crate) struct OncePerSecond {
    /// When the gate last opened (`now_ms`); 0 if never.
    last: AtomicU64,
}

impl OncePerSecond {
    pub(crate) const fn new() -> OncePerSecond {
        OncePerSecond {
            last: AtomicU64::new(0),
        }
    }

    /// True for one caller at most per second.
    pub(crate) fn open(&self) -> bool {
        let now = now_ms();
        let last = self.last.load(Relaxed);
        (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_call_opens_and_the_next_in_the_same_second_does_not() {
        let _ = now_ms(); // the epoch starts now: every call below is in the process's first second
        let gate = OncePerSecond::new();
        assert!(gate.open());
        assert!(!gate.open());
        let other = OncePerSecond::new();
        assert!(other.open(), "a second gate is independent");
    }
}
