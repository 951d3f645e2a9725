//! Backend health: how the balancer decides that a backend may not take new connections.
//!
//! * [`passive`]: connect failures seen by real connections take a backend out for a back-off that
//!   doubles while it keeps failing.
//!
//! The verdicts are applied to the backend's live state (`crate::backend`), which every table snapshot
//! reads, so a health change needs no rebuild.

pub mod passive;

pub use passive::PassiveHealth;
