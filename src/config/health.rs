//! The configuration of passive health, and what a backend marked down means for its connections.

use std::time::Duration;

/// Passive health: how connect failures take a backend out of rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PassiveHealth {
    /// Consecutive failed connects that mark a backend down (default 3).
    pub failure_threshold: u32,
    /// The first back-off (default 5 s); it doubles each time the backend is marked down again.
    pub backoff: Duration,
    /// The longest back-off (default 60 s).
    pub max_backoff: Duration,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            failure_threshold: 3,
            backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl PassiveHealth {
    /// The policy with these values.
    pub fn new(failure_threshold: u32, backoff: Duration, max_backoff: Duration) -> Self {
        PassiveHealth {
            failure_threshold,
            backoff,
            max_backoff,
        }
    }

    /// The back-off of the `downs`-th time in a row a backend is marked down (0 for the first): the first
    /// back-off doubled `downs` times, at most the longest one.
    pub fn backoff_after(&self, downs: u32) -> Duration {
        self.backoff
            .saturating_mul(1u32 << downs.min(16))
            .min(self.max_backoff.max(self.backoff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = PassiveHealth::new(3, Duration::from_millis(100), Duration::from_millis(350));
        let got: Vec<u64> = (0..4)
            .map(|d| p.backoff_after(d).as_millis() as u64)
            .collect();
        assert_eq!(got, [100, 200, 350, 350]);
        // Never overflows, whatever the count.
        assert_eq!(p.backoff_after(u32::MAX), Duration::from_millis(350));
    }
}

/// What happens to the connections open on a backend when it is marked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OnDown {
    /// They carry on (the default): a backend that stopped accepting may still serve what it has.
    #[default]
    Keep,
    /// They are reset at once (HAProxy's `on-marked-down shutdown-sessions`).
    Cut,
}

impl OnDown {
    /// `keep` or `cut`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnDown::Keep => "keep",
            OnDown::Cut => "cut",
        }
    }
}

impl std::str::FromStr for OnDown {
    type Err = super::ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(OnDown::Keep),
            "cut" => Ok(OnDown::Cut),
            _ => Err(super::ConfigError::Unknown {
                field: "on-down",
                value: s.to_string(),
                expected: "keep or cut",
            }),
        }
    }
}
