//! Warnings that cannot flood the log: at most one a second per kind, with a count of those held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest time between two lines of one kind.
const EVERY: Duration = Duration::from_secs(1);

/// One kind of warning. [`allow`](Self::allow) says whether this occurrence may be logged, and how many
/// were held back since the last one that was.
#[derive(Debug, Default)]
pub(super) struct RateLimited {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// `Some(held back since the last line)` when this one may be logged now; `None` (and counted) when
    /// a line of this kind went out less than a second ago.
    pub(super) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        // A panic elsewhere while holding the lock cannot leave the two fields inconsistent.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.last {
            Some(last) if now.saturating_duration_since(last) < EVERY => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

/// The kinds of warnings the admin server gives, each limited on its own.
#[derive(Debug, Default)]
pub(super) struct Logs {
    /// `accept()` failed for want of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    pub(super) accept: RateLimited,
    /// A connection came past the connection cap and was closed at once.
    pub(super) cap: RateLimited,
    /// A request that is not HTTP (answered 400 by hyper).
    pub(super) bad_request: RateLimited,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_held_back() {
        let r = RateLimited::default();
        let t0 = Instant::now();
        assert_eq!(r.allow_at(t0), Some(0));
        for i in 1..=99 {
            assert_eq!(r.allow_at(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(r.allow_at(t0 + Duration::from_millis(1000)), Some(99));
        assert_eq!(r.allow_at(t0 + Duration::from_millis(1500)), None);
        assert_eq!(r.allow_at(t0 + Duration::from_millis(5000)), Some(1));
        assert_eq!(r.allow_at(t0 + Duration::from_millis(7000)), Some(0));
    }
}
