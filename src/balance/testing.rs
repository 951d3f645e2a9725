//! A stand-in for the live backend state, for the unit tests of this folder: the strategies and the load
//! tree see a backend only through [`Candidate`].

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::load_tree::LoadSlot;
use super::table::Candidate;
use crate::clock::now_ms;

#[derive(Debug, Default)]
pub(crate) struct TestBackend {
    active: AtomicUsize,
    weight: u32,
    /// `now_ms` time until which it is down; 0 when up.
    down_until: AtomicU64,
    out: AtomicBool,
    last_pick: AtomicU64,
    slot: LoadSlot,
    admission: AtomicU32,
    pub(crate) backup: bool,
}

impl TestBackend {
    pub(crate) fn set_out(&self, out: bool) {
        self.out.store(out, Relaxed);
    }
    pub(crate) fn set_admission(&self, admission: u32) {
        self.admission.store(admission, Relaxed);
    }
    pub(crate) fn down_for_ms(&self, ms: u64) {
        self.down_until.store(now_ms() + ms, Relaxed);
    }
}

impl Candidate for TestBackend {
    fn active(&self) -> usize {
        self.active.load(Relaxed)
    }
    /// As the real backend's: the weight, times its admission while it ramps up.
    fn weight(&self) -> u32 {
        let admission = self.admission.load(Relaxed);
        (((u64::from(self.weight) * u64::from(admission)) >> 16) as u32).max(1)
    }
    fn is_available(&self) -> bool {
        let until = self.down_until.load(Relaxed);
        (until == 0 || until <= now_ms()) && !self.out.load(Relaxed)
    }
    fn available_again_at(&self) -> u64 {
        if self.out.load(Relaxed) {
            u64::MAX
        } else {
            self.down_until.load(Relaxed)
        }
    }
    fn last_pick(&self) -> &AtomicU64 {
        &self.last_pick
    }
    fn load_slot(&self) -> &LoadSlot {
        &self.slot
    }
    fn admission(&self) -> u32 {
        self.admission.load(Relaxed)
    }
    fn is_backup(&self) -> bool {
        self.backup
    }
}

/// Backends of these weights.
pub(crate) fn backends(weights: impl IntoIterator<Item = u32>) -> Vec<Arc<TestBackend>> {
    weights
        .into_iter()
        .map(|weight| {
            Arc::new(TestBackend {
                weight,
                admission: AtomicU32::new(super::table::FULL_ADMISSION),
                ..TestBackend::default()
            })
        })
        .collect()
}

/// A backup of this weight.
pub(crate) fn backup(weight: u32) -> Arc<TestBackend> {
    Arc::new(TestBackend {
        weight,
        admission: AtomicU32::new(super::table::FULL_ADMISSION),
        backup: true,
        ..TestBackend::default()
    })
}

/// One connection held on a backend, as the real guard holds it.
#[derive(Debug)]
pub(crate) struct Held(pub(crate) Arc<TestBackend>);

impl Held {
    pub(crate) fn new(b: Arc<TestBackend>) -> Self {
        let now = b.active.fetch_add(1, Relaxed) + 1;
        b.slot.took(now);
        Held(b)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let now = self.0.active.fetch_sub(1, Relaxed) - 1;
        self.0.slot.gave_back(now);
    }
}
