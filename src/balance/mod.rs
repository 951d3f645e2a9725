//! Choosing a backend: the strategies, the smooth schedule and the least-connections index.
//!
//! Everything here is an algorithm over `Candidate`s: a backend as a strategy sees it (a live count, an
//! effective weight, whether it may be picked). The tables are immutable snapshots; the backend registry
//! (`crate::backend`) builds a new one on every change and publishes it whole.
//!
//! * [`strategy`]: the [`Strategy`] names.
//! * `table`: the snapshot and the picks of each strategy.
//! * `schedule`: the smooth weighted sequence that round robin, random and p2c use.
//! * `load_tree`: the min-tree of loads that least connections reads on large tables.
//! * `rng`: the lock-free seedable generator.

mod load_tree;
mod rng;
mod schedule;
pub mod strategy;
mod table;
#[cfg(test)]
mod testing;

pub use strategy::{Strategy, UnknownStrategy};

pub(crate) use load_tree::LoadSlot;
pub(crate) use table::{Candidate, Picks, Table, FULL_ADMISSION};
