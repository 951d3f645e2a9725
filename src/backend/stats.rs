//! Point-in-time views of backends.

use std::net::SocketAddr;
use std::time::Duration;

use super::AdminState;

/// A point-in-time view of one backend, as returned by
/// [`BalancerHandle::backends`](crate::BalancerHandle::backends).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BackendStats {
    /// The backend's id within its service.
    pub id: String,
    /// The address connections go to.
    pub addr: SocketAddr,
    /// The configured weight.
    pub weight: u32,
    /// The weight the strategies use now: the configured one, or less while slow start ramps it up.
    pub effective_weight: f64,
    /// Ready, drain or maint.
    pub admin: AdminState,
    /// True once it has been removed and is draining its last connections.
    pub removing: bool,
    /// True for a backup, used only while no primary may be picked.
    pub backup: bool,
    /// Its cap on connections at once, if any.
    pub max_connections: Option<u32>,
    /// How long its health has been what it is (`up`).
    pub health_for: Duration,
    /// The last verdict on its health, in words (`connect: refused`, `http: status 503`, ...); empty
    /// before any.
    pub health_reason: String,
    /// Connections open to it now (including connects in progress).
    pub active: usize,
    /// Connections it has been given (successful connects) since it was added.
    pub total: u64,
    /// Connects to it that failed (refused, timed out or other) since it was added.
    pub connect_failures: u64,
    /// Bytes carried from clients to it.
    pub bytes_to_backend: u64,
    /// Bytes carried from it to clients.
    pub bytes_to_client: u64,
    /// False while it is inside a passive-health back-off, or while active checks hold it down (with
    /// checks on, from the start until its first check passes).
    pub up: bool,
    /// How long the back-off still runs, when down.
    pub down_for: Option<Duration>,
}

impl BackendStats {
    /// True when it may be given new connections: ready, not removed, and up.
    pub fn in_rotation(&self) -> bool {
        self.admin == AdminState::Ready && !self.removing && self.up
    }
}
