//! Backend health: how the balancer decides that a backend may not take new connections.
//!
//! * Passive health ([`PassiveHealth`]): connect failures seen by real connections take a backend out,
//!   for a back-off that doubles while it keeps failing; when the back-off ends, one connection tries it
//!   (a half-open trial), not every connection at once. The verdicts are made where the connects are
//!   counted, in the backend's live state (`crate::backend`).
//! * Active checks ([`HealthCheck`], [`CheckMode`]), when configured: `active` schedules one check task
//!   per backend (rise/fall, jitter, a faster pace in transition) from one place per balancer, and
//!   follows the registry as backends come and go; `probe` runs one check of one address (`connect`,
//!   `send-expect`, `http`). With checks on, a backend starts down until its first check passes, and
//!   passive failures take it down until `rise` checks pass again.
//!
//! The verdicts are written into the backend's live state (`crate::backend`), which every table snapshot
//! reads, so a health change needs no rebuild. The configuration types live in `crate::config` (and are
//! re-exported here); this folder holds the machinery that runs checks, above the backends it judges.

pub(crate) mod active;
mod probe;

pub use crate::config::{
    escape, unescape, CheckMode, HealthCheck, OnDown, PassiveHealth, MAX_CHECK_PAYLOAD,
    MAX_HTTP_FIELD, MAX_RISE_FALL,
};
