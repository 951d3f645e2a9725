//! The backends of one service: stable identities, live state, and the registry that publishes them.
//!
//! * [`BackendId`]: a backend's name within its service, `HOST:PORT` as configured unless one is given.
//! * `state`: the one live state object per id (active connections, totals, bytes, health, configured and
//!   effective weight, admin state). It outlives every table snapshot that lists it.
//! * `guard`: holds one connection's count on a backend for exactly as long as the connection lives, and
//!   keeps the least-connections index of the table in force up to date.
//! * `registry`: the members, the changes made to them (add, remove with a drain, weight, admin state,
//!   replace), and the table snapshot rebuilt and published after each one.
//! * `events`: what changed, as a stream for embedders and the cluster supervisor.
//! * `queue`: the clients waiting, first come first served, for a backend below its cap.
//! * `stats`: point-in-time views for handles and the admin API.

mod events;
mod guard;
mod policy;
mod queue;
mod registry;
mod state;
mod stats;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use events::{BackendEvent, BackendEvents, EventsLagged};
pub use registry::{BackendError, DrainReport, Replaced};
pub use stats::BackendStats;

pub(crate) use guard::ActiveGuard;
pub(crate) use policy::Policy;
pub(crate) use queue::Place;
pub(crate) use registry::Registry;
pub(crate) use state::Backend;

/// A backend's stable identity within its service. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(Arc<str>);

impl BackendId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for BackendId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for BackendId {
    fn from(s: &str) -> Self {
        BackendId(s.into())
    }
}

impl From<String> for BackendId {
    fn from(s: String) -> Self {
        BackendId(s.into())
    }
}

/// Whether a backend takes new connections, as the operator (or the cluster supervisor) set it.
/// Health is separate: a `Ready` backend that is down takes none either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AdminState {
    /// In rotation (the default).
    #[default]
    Ready,
    /// No new connections; those open carry on (HAProxy's DRAIN).
    Drain,
    /// Maintenance: no new connections; those open carry on unless they are reset
    /// ([`BalancerHandle::reset_connections`](crate::BalancerHandle::reset_connections)).
    Maint,
}

impl AdminState {
    /// `ready`, `drain` or `maint`.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    pub(crate) fn to_bits(self) -> u8 {
        match self {
            AdminState::Ready => 0,
            AdminState::Drain => 1,
            AdminState::Maint => 2,
        }
    }

    pub(crate) fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            0 => AdminState::Ready,
            1 => AdminState::Drain,
            _ => AdminState::Maint,
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for an admin state name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown admin state '{0}' (expected ready, drain or maint)")]
pub struct UnknownAdminState(pub String);

impl FromStr for AdminState {
    type Err = UnknownAdminState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ready" => Ok(AdminState::Ready),
            "drain" => Ok(AdminState::Drain),
            "maint" | "maintenance" => Ok(AdminState::Maint),
            _ => Err(UnknownAdminState(s.to_string())),
        }
    }
}
