//! What every backend of a service follows at run time.

use std::time::Duration;

use crate::config::{OnDown, PassiveHealth};

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
    /// The service's name, for the `service` label of its backends' metrics.
    pub(crate) service: Option<std::sync::Arc<str>>,
}
