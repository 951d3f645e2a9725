//! Backend health: how the balancer decides that a backend may not take new connections.
//!
//! * [`passive`]: connect failures seen by real connections take a backend out, for a back-off that
//!   doubles while it keeps failing; when the back-off ends, one connection tries it (a half-open trial),
//!   not every connection at once.
//! * Active checks ([`HealthCheck`], [`CheckMode`]), when configured: `active` schedules one check task
//!   per backend (rise/fall, jitter, a faster pace in transition) from one place per balancer, and
//!   follows the registry as backends come and go; `probe` runs one check of one address (`connect`,
//!   `send-expect`, `http`). With checks on, a backend starts down until its first check passes, and
//!   passive failures take it down until `rise` checks pass again.
//!
//! The verdicts are written into the backend's live state (`crate::backend`), which every table snapshot
//! reads, so a health change needs no rebuild.

pub(crate) mod active;
mod check;
pub mod passive;
mod probe;

use std::time::Duration;

pub use check::{
    escape, unescape, CheckMode, HealthCheck, MAX_CHECK_PAYLOAD, MAX_HTTP_FIELD, MAX_RISE_FALL,
};
pub use passive::PassiveHealth;

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
    type Err = crate::ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(OnDown::Keep),
            "cut" => Ok(OnDown::Cut),
            _ => Err(crate::ConfigError::Unknown {
                field: "on-down",
                value: s.to_string(),
                expected: "keep or cut",
            }),
        }
    }
}

/// What every backend of a service follows: the passive policy, slow start, what a down means for the
/// open connections, and whether active checks decide its health.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    pub(crate) passive: PassiveHealth,
    /// A half-open trial older than this was abandoned (its connection never reported): another may go.
    pub(crate) probe_stale: Duration,
    /// How long a backend that joins or comes back up ramps its weight from near 0 (zero: off).
    pub(crate) slow_start: Duration,
    pub(crate) on_down: OnDown,
    /// Active checks decide when a backend is up: passive failures take it down, and only `rise`
    /// passing checks bring it back.
    pub(crate) checked: bool,
}
