//! One backend's live state: load, totals and passive health, all in atomics.
//!
//! A [`Backend`] is shared (`Arc`) between the strategy table snapshot, the connections that use it and the
//! handle that reports on it. Nothing here takes a lock: the hot path reads `active` and `down_until`, and a
//! connection bumps `active` through an [`ActiveGuard`] whose `Drop` gives the count back, so no error path can
//! leak a count.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::config::PassiveHealth;
use crate::load_tree::TreeLink;
use crate::metrics::BackendMetrics;

/// Milliseconds since a process-wide epoch, never 0 (0 means "not down" in [`Backend::down_until`]).
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_millis() as u64 + 1
}

/// A backend and its live counters.
///
/// `repr(C)`, hot fields first: a pick reads `active`, `down_until`, `weight` and `enabled`, and clones the
/// `Arc`, whose counts sit just before them, so a pick touches one cache line of the backend, two at worst
/// (instead of the three or four that the compiler's field order spread them over).
#[derive(Debug)]
#[repr(C)]
pub struct Backend {
    active: AtomicUsize,
    /// While `now_ms() < down_until` the backend is skipped by every strategy. 0 when up.
    down_until: AtomicU64,
    weight: u32,
    /// Cleared by the operator or a supervisor (`BalancerHandle::set_backend_enabled`): the backend takes no
    /// new connections, whatever its health; connections already open carry on.
    enabled: AtomicBool,
    /// The backend's leaf in the least-connections tree of its table, when the table has one: the
    /// [`ActiveGuard`] keeps it up to date. Set once; a backend belongs to at most one tree.
    pub(crate) load_link: OnceLock<TreeLink>,
    /// Sequence number of the last least-connections pick of this backend (ties go to the oldest).
    pub(crate) last_pick: AtomicU64,
    total: AtomicU64,
    connect_failures: AtomicU64,
    /// Consecutive failed connects; reset by a successful one.
    consecutive_failures: AtomicU32,
    /// How many times in a row it was marked down: the back-off doubles with each.
    downs_in_a_row: AtomicU32,
    name: Arc<str>,
    addr: SocketAddr,
    pub(crate) metrics: BackendMetrics,
}

impl Backend {
    pub(crate) fn new(name: &str, addr: SocketAddr, weight: u32) -> Self {
        let metrics = BackendMetrics::register(name);
        metrics.set_up(true); // healthy and enabled until told otherwise
        metrics.set_weight(weight);
        Backend {
            name: name.into(),
            addr,
            weight,
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            down_until: AtomicU64::new(0),
            downs_in_a_row: AtomicU32::new(0),
            enabled: AtomicBool::new(true),
            last_pick: AtomicU64::new(0),
            load_link: OnceLock::new(),
            metrics,
        }
    }

    /// The backend as configured (for example `app-1.internal:8080`): the name used in logs and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The resolved address connections go to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configured weight (1..=256).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Connections open, or being opened, to this backend right now.
    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// True while the backend may be picked: it is enabled and not inside a passive-health back-off.
    /// The clock is read only for a backend that has been down, so a healthy table costs no clock read.
    #[inline]
    pub(crate) fn is_available(&self) -> bool {
        let until = self.down_until.load(Relaxed);
        (until == 0 || until <= now_ms()) && self.enabled.load(Relaxed)
    }

    /// When an unavailable backend may be available again (`now_ms` time): the end of its back-off, or
    /// never (`u64::MAX`) while it is disabled, since only the operator brings it back.
    pub(crate) fn available_again_at(&self) -> u64 {
        if self.enabled.load(Relaxed) {
            self.down_until.load(Relaxed)
        } else {
            u64::MAX
        }
    }

    /// Takes the backend out of rotation (`false`) or puts it back (`true`). Returns the previous value.
    pub(crate) fn set_enabled(&self, enabled: bool) -> bool {
        let was = self.enabled.swap(enabled, Relaxed);
        if was != enabled {
            self.publish_up();
            tracing::info!(backend = %self.name, addr = %self.addr, enabled, "backend rotation changed");
        }
        was
    }

    /// Updates the `ulb_backend_up` gauge: 1 while enabled and healthy.
    fn publish_up(&self) {
        let until = self.down_until.load(Relaxed);
        let healthy = until == 0 || until <= now_ms();
        self.metrics.set_up(healthy && self.enabled.load(Relaxed));
    }

    /// A point-in-time copy of this backend's counters.
    pub fn stats(&self) -> BackendStats {
        let now = now_ms();
        let until = self.down_until.load(Relaxed);
        BackendStats {
            name: self.name.to_string(),
            addr: self.addr,
            weight: self.weight,
            active: self.active(),
            total: self.total.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            up: until == 0 || until <= now,
            enabled: self.enabled.load(Relaxed),
            down_for: (until > now).then(|| Duration::from_millis(until - now)),
        }
    }

    /// Records a successful connect: clears the failure streak and brings the backend back up.
    pub(crate) fn connect_succeeded(&self) {
        // Loads first: on a healthy backend this path stays read-only, so cores do not fight over the line.
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
        if self.downs_in_a_row.load(Relaxed) != 0 && self.downs_in_a_row.swap(0, Relaxed) != 0 {
            self.down_until.store(0, Relaxed);
            self.publish_up();
            tracing::info!(backend = %self.name, addr = %self.addr, "backend is up again");
        }
    }

    /// Records a failed connect. After `policy.failure_threshold` failures in a row the backend is marked
    /// down for a back-off that doubles each time it is marked down again, up to `policy.max_backoff`.
    /// Returns the back-off when this call marked it down.
    pub(crate) fn connect_failed(&self, policy: &PassiveHealth) -> Option<Duration> {
        self.connect_failures.fetch_add(1, Relaxed);
        let streak = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if streak < policy.failure_threshold {
            return None;
        }
        let now = now_ms();
        let until = self.down_until.load(Relaxed);
        if until > now {
            return None; // already down: a connect that was in flight when it went down
        }
        let downs = self.downs_in_a_row.fetch_add(1, Relaxed);
        let backoff = policy
            .backoff
            .saturating_mul(1u32 << downs.min(16))
            .min(policy.max_backoff.max(policy.backoff));
        let new_until = now + backoff.as_millis() as u64;
        if self
            .down_until
            .compare_exchange(until, new_until, Relaxed, Relaxed)
            .is_err()
        {
            return None; // another connection marked it down first
        }
        self.metrics.set_up(false);
        tracing::warn!(
            backend = %self.name,
            addr = %self.addr,
            consecutive_failures = streak,
            backoff_ms = backoff.as_millis() as u64,
            "backend marked down"
        );
        Some(backoff)
    }
}

/// A point-in-time view of one backend, as returned by [`BalancerHandle::backends`](crate::BalancerHandle::backends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStats {
    /// The backend as configured.
    pub name: String,
    /// The resolved address.
    pub addr: SocketAddr,
    /// The configured weight.
    pub weight: u32,
    /// Connections open to it now.
    pub active: usize,
    /// Connections it has been given (successful connects) since start.
    pub total: u64,
    /// Connects to it that failed (refused, timed out or other) since start.
    pub connect_failures: u64,
    /// False while it is inside a passive-health back-off.
    pub up: bool,
    /// False while it has been taken out of rotation by hand (or by the cluster supervisor).
    pub enabled: bool,
    /// How long the back-off still runs, when down.
    pub down_for: Option<Duration>,
}

/// Holds one connection on a backend, from the moment it is picked (so that connects in progress count as
/// load) until the connection ends; the count goes back down when the guard is dropped.
#[derive(Debug)]
pub(crate) struct ActiveGuard {
    backend: Arc<Backend>,
    /// Whether the count was also added to the backend's least-connections leaf (a link made after the
    /// guard must not be given back a count it never got).
    in_tree: bool,
}

impl ActiveGuard {
    pub(crate) fn new(backend: Arc<Backend>) -> Self {
        backend.active.fetch_add(1, Relaxed);
        backend.metrics.active_up();
        let in_tree = match backend.load_link.get() {
            Some(link) => {
                link.acquire();
                true
            }
            None => false,
        };
        ActiveGuard { backend, in_tree }
    }

    /// Counts the connection in the backend's totals, once its connect has succeeded.
    pub(crate) fn connected(&self) {
        self.backend.total.fetch_add(1, Relaxed);
        self.backend.metrics.connected();
    }

    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Relaxed);
        self.backend.metrics.active_down();
        if self.in_tree {
            if let Some(link) = self.backend.load_link.get() {
                link.release();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PassiveHealth {
        PassiveHealth {
            failure_threshold: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        }
    }

    #[test]
    fn guard_gives_the_count_back() {
        let b = Arc::new(Backend::new("b", "127.0.0.1:1".parse().unwrap(), 1));
        {
            let g1 = ActiveGuard::new(b.clone());
            let _g2 = ActiveGuard::new(b.clone());
            g1.connected();
            assert_eq!(b.active(), 2);
        }
        assert_eq!(b.active(), 0, "dropping the guards must release the count");
        assert_eq!(
            b.stats().total,
            1,
            "only connected guards count in the total"
        );
    }

    #[test]
    fn marked_down_after_threshold_and_backoff_grows() {
        let b = Backend::new("b", "127.0.0.1:1".parse().unwrap(), 1);
        let p = policy();
        assert_eq!(b.connect_failed(&p), None);
        assert_eq!(b.connect_failed(&p), None);
        assert_eq!(b.connect_failed(&p), Some(Duration::from_millis(100)));
        assert!(!b.is_available());
        // A failure while down changes nothing.
        assert_eq!(b.connect_failed(&p), None);
        // Once the back-off is over, a further failure marks it down for twice as long, then capped.
        b.down_until.store(1, Relaxed);
        assert!(b.is_available());
        assert_eq!(b.connect_failed(&p), Some(Duration::from_millis(200)));
        b.down_until.store(1, Relaxed);
        assert_eq!(b.connect_failed(&p), Some(Duration::from_millis(350)));
        // A success brings it straight back and resets the streak.
        b.connect_succeeded();
        assert!(b.is_available());
        assert!(b.stats().up);
        assert_eq!(
            b.connect_failed(&p),
            None,
            "the streak starts again from zero"
        );
    }
}
