//! One backend's live state: load, totals, bytes, passive health, weights and admin state, in atomics.
//!
//! A [`Backend`] is shared (`Arc`) between the registry, every table snapshot that lists it, the
//! connections that use it and the handles that report on it. It lives as long as its id is configured
//! (and then until its last connection has ended), whatever tables are built over it. Nothing here takes a
//! lock on the hot path: a pick reads `active`, `down_until`, `effective_weight` and `admin`, and a
//! connection bumps `active` through an [`ActiveGuard`](super::ActiveGuard) whose `Drop` gives it back.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::events::{BackendEvent, EventSender};
use super::stats::BackendStats;
use super::{AdminState, BackendId};
use crate::balance::{Candidate, LoadSlot};
use crate::clock::now_ms;
use crate::health::PassiveHealth;
use crate::metrics::BackendMetrics;

/// Set in [`Backend::admin`] once the backend has left its service (it drains, then is forgotten).
const REMOVED: u8 = 0x80;

/// A backend and its live counters.
///
/// `repr(C)`, hot fields first: a pick reads `active`, `down_until`, `effective_weight` and `admin`, and
/// clones the `Arc`, whose counts sit just before them, so a pick touches one cache line of the backend.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Backend {
    active: AtomicUsize,
    /// While `now_ms() < down_until` the backend is skipped by every strategy. 0 when up.
    down_until: AtomicU64,
    /// The weight strategies use: the configured one (slow start will ramp it).
    effective_weight: AtomicU32,
    /// [`AdminState`] bits, with [`REMOVED`] once it left its service. 0: ready, in its service.
    admin: AtomicU8,
    /// Sequence number of the last least-connections pick of this backend by a scan.
    last_pick: AtomicU64,
    /// Its leaf in the least-connections tree of the table in force, if that table has one.
    slot: LoadSlot,
    weight: AtomicU32,
    total: AtomicU64,
    connect_failures: AtomicU64,
    /// Consecutive failed connects; reset by a successful one.
    consecutive_failures: AtomicU32,
    /// How many times in a row it was marked down: the back-off doubles with each.
    downs_in_a_row: AtomicU32,
    pub(crate) bytes_to_backend: AtomicU64,
    pub(crate) bytes_to_client: AtomicU64,
    addr: ArcSwap<SocketAddr>,
    id: BackendId,
    pub(crate) metrics: BackendMetrics,
    /// Woken when the count drops to 0 while the backend is out of rotation (a drain waits on it).
    idle: Notify,
    /// Cancelled to reset every connection open on this backend; replaced by a fresh one each time.
    cut: ArcSwap<CancellationToken>,
    /// The parent of every `cut` token: the balancer's hard stop.
    stop: CancellationToken,
    events: EventSender,
}

impl Backend {
    pub(crate) fn new(
        id: BackendId,
        addr: SocketAddr,
        weight: u32,
        stop: &CancellationToken,
        events: EventSender,
    ) -> Self {
        let metrics = BackendMetrics::register(id.as_str());
        metrics.set_up(true); // healthy and ready until told otherwise
        metrics.set_weight(weight);
        Backend {
            active: AtomicUsize::new(0),
            down_until: AtomicU64::new(0),
            effective_weight: AtomicU32::new(weight),
            admin: AtomicU8::new(0),
            last_pick: AtomicU64::new(0),
            slot: LoadSlot::default(),
            weight: AtomicU32::new(weight),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            downs_in_a_row: AtomicU32::new(0),
            bytes_to_backend: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            addr: ArcSwap::from_pointee(addr),
            id,
            metrics,
            idle: Notify::new(),
            cut: ArcSwap::from_pointee(stop.child_token()),
            stop: stop.clone(),
            events,
        }
    }

    /// The backend's id within its service: the name in logs, metrics and stats.
    pub(crate) fn id(&self) -> &BackendId {
        &self.id
    }

    /// The address connections go to now.
    pub(crate) fn addr(&self) -> SocketAddr {
        **self.addr.load()
    }

    /// The configured weight (1..=256).
    pub(crate) fn configured_weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub(crate) fn admin_state(&self) -> AdminState {
        AdminState::from_bits(self.admin.load(Relaxed))
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.admin.load(Relaxed) & REMOVED != 0
    }

    /// True while it is in rotation as far as the operator is concerned (ready and not removed).
    fn is_ready(&self) -> bool {
        self.admin.load(Relaxed) == 0
    }

    /// True while the backend is healthy: not inside a passive-health back-off.
    fn is_healthy(&self) -> bool {
        let until = self.down_until.load(Relaxed);
        until == 0 || until <= now_ms()
    }

    /// For log lines: the id, and the address too when it is not the id.
    pub(crate) fn who(&self) -> Who<'_> {
        Who(self)
    }

    /// A token cancelled when this backend's connections are to be reset (by the operator, or by the
    /// balancer's hard stop).
    pub(crate) fn cut_token(&self) -> CancellationToken {
        (**self.cut.load()).clone()
    }

    /// Resets every connection open on this backend now. Later ones are not affected, unless the backend
    /// has been removed: then every connection that still reaches it (a connect in progress) is reset too.
    pub(crate) fn cut_connections(&self) {
        if self.is_removed() {
            self.cut.load().cancel();
        } else {
            self.cut.swap(Arc::new(self.stop.child_token())).cancel();
        }
    }

    /// Sets the admin state; returns the previous one.
    pub(crate) fn set_admin_state(&self, state: AdminState) -> AdminState {
        let old = self
            .admin
            .fetch_update(Relaxed, Relaxed, |a| Some((a & REMOVED) | state.to_bits()))
            .unwrap_or_else(|a| a);
        let old = AdminState::from_bits(old);
        if old != state {
            self.publish_up();
            tracing::info!(backend = %self.who(), from = %old, to = %state, "backend admin state changed");
            self.events.send(BackendEvent::AdminChanged {
                id: self.id.clone(),
                from: old,
                to: state,
            });
        }
        old
    }

    /// Takes the backend out of its service for good (it drains).
    pub(crate) fn mark_removed(&self) {
        self.admin.fetch_or(REMOVED, Relaxed);
        self.publish_up();
    }

    /// Sets the configured weight and, for now, the effective one; returns the previous configured weight.
    pub(crate) fn set_weight(&self, weight: u32) -> u32 {
        let old = self.weight.swap(weight, Relaxed);
        self.effective_weight.store(weight, Relaxed);
        if old != weight {
            self.metrics.set_weight(weight);
            tracing::info!(backend = %self.who(), from = old, to = weight, "backend weight changed");
            self.events.send(BackendEvent::WeightChanged {
                id: self.id.clone(),
                from: old,
                to: weight,
            });
        }
        old
    }

    /// Points the backend at a new address (its name resolved to another); returns the previous one.
    pub(crate) fn set_addr(&self, addr: SocketAddr) -> SocketAddr {
        let old = *self.addr.swap(Arc::new(addr));
        if old != addr {
            tracing::info!(backend = %self.id, from = %old, to = %addr, "backend address changed");
            self.events.send(BackendEvent::AddressChanged {
                id: self.id.clone(),
                from: old,
                to: addr,
            });
        }
        old
    }

    /// Updates the `ulb_backend_up` gauge: 1 while ready and healthy.
    fn publish_up(&self) {
        self.metrics.set_up(self.is_ready() && self.is_healthy());
    }

    /// A point-in-time copy of this backend's state.
    pub(crate) fn stats(&self) -> BackendStats {
        let now = now_ms();
        let until = self.down_until.load(Relaxed);
        BackendStats {
            id: self.id.to_string(),
            addr: self.addr(),
            weight: self.configured_weight(),
            effective_weight: self.effective_weight.load(Relaxed),
            admin: self.admin_state(),
            removing: self.is_removed(),
            active: self.active.load(Relaxed),
            total: self.total.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            bytes_to_backend: self.bytes_to_backend.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
            up: until == 0 || until <= now,
            down_for: (until > now).then(|| Duration::from_millis(until - now)),
        }
    }

    /// One more connection (or connect in progress); the new count.
    pub(crate) fn acquire(&self) -> usize {
        let now = self.active.fetch_add(1, Relaxed) + 1;
        self.metrics.active_up();
        self.slot.took(now);
        now
    }

    /// One connection fewer. When that leaves none on a backend out of rotation, its drain is woken and a
    /// [`BackendEvent::Drained`] is sent.
    pub(crate) fn release(&self) {
        let now = self.active.fetch_sub(1, Relaxed) - 1;
        self.metrics.active_down();
        self.slot.gave_back(now);
        if now == 0 && !self.is_ready() {
            self.idle.notify_waiters();
            self.events.send(BackendEvent::Drained {
                id: self.id.clone(),
            });
        }
    }

    /// Counts a connection in the totals, once its connect has succeeded.
    pub(crate) fn connected(&self) {
        self.total.fetch_add(1, Relaxed);
        self.metrics.connected();
    }

    /// Resolves once no connection is open on this backend. Only meaningful while it is out of rotation
    /// (otherwise new connections keep coming).
    pub(crate) async fn idle(&self) {
        loop {
            let woken = self.idle.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.active.load(Relaxed) == 0 {
                return;
            }
            woken.await;
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
            tracing::info!(backend = %self.who(), "backend is up again");
            self.events.send(BackendEvent::HealthChanged {
                id: self.id.clone(),
                up: true,
                reason: "a connect succeeded".into(),
            });
        }
    }

    /// Records a failed connect. After `policy.failure_threshold` failures in a row the backend is marked
    /// down for a back-off that doubles each time it is marked down again, up to `policy.max_backoff`.
    /// Returns the back-off when this call marked it down.
    pub(crate) fn connect_failed(&self, policy: &PassiveHealth, why: &str) -> Option<Duration> {
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
        let backoff = policy.backoff_after(downs);
        let new_until = now.saturating_add(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX));
        if self
            .down_until
            .compare_exchange(until, new_until, Relaxed, Relaxed)
            .is_err()
        {
            return None; // another connection marked it down first
        }
        self.metrics.set_up(false);
        tracing::warn!(
            backend = %self.who(),
            consecutive_failures = streak,
            backoff_ms = backoff.as_millis() as u64,
            last_error = why,
            "backend marked down"
        );
        self.events.send(BackendEvent::HealthChanged {
            id: self.id.clone(),
            up: false,
            reason: format!("{streak} connects failed in a row, the last: {why}"),
        });
        Some(backoff)
    }

    #[cfg(test)]
    pub(crate) fn end_backoff(&self) {
        if self.down_until.load(Relaxed) != 0 {
            self.down_until.store(1, Relaxed);
        }
    }
}

impl Candidate for Backend {
    #[inline]
    fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    #[inline]
    fn weight(&self) -> u32 {
        self.effective_weight.load(Relaxed)
    }

    /// Ready, in its service, and not inside a passive-health back-off. The clock is read only for a
    /// backend that has been down, so a healthy table costs no clock read.
    #[inline]
    fn is_available(&self) -> bool {
        let until = self.down_until.load(Relaxed);
        (until == 0 || until <= now_ms()) && self.admin.load(Relaxed) == 0
    }

    /// The end of its back-off, or never (`u64::MAX`) while it is out of rotation, since only the
    /// operator brings it back.
    fn available_again_at(&self) -> u64 {
        if self.is_ready() {
            self.down_until.load(Relaxed)
        } else {
            u64::MAX
        }
    }

    #[inline]
    fn last_pick(&self) -> &AtomicU64 {
        &self.last_pick
    }

    #[inline]
    fn load_slot(&self) -> &LoadSlot {
        &self.slot
    }
}

/// A backend for log lines: `id`, or `id (addr)` when the id is not the address.
pub(crate) struct Who<'a>(&'a Backend);

impl fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = self.0.addr();
        let id = self.0.id.as_str();
        if id == addr.to_string() {
            f.write_str(id)
        } else {
            write!(f, "{id} ({addr})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ActiveGuard;

    fn backend() -> Arc<Backend> {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Arc::new(Backend::new(
            addr.to_string().into(),
            addr,
            1,
            &CancellationToken::new(),
            EventSender::new(),
        ))
    }

    #[test]
    fn guard_gives_the_count_back() {
        let b = backend();
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
        let b = backend();
        let p = PassiveHealth::new(3, Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(b.connect_failed(&p, "refused"), None);
        assert_eq!(b.connect_failed(&p, "refused"), None);
        assert_eq!(
            b.connect_failed(&p, "refused"),
            Some(Duration::from_millis(100))
        );
        assert!(!b.is_available());
        // A failure while down changes nothing.
        assert_eq!(b.connect_failed(&p, "refused"), None);
        // Once the back-off is over, a further failure marks it down for twice as long, then capped.
        b.end_backoff();
        assert!(b.is_available());
        assert_eq!(
            b.connect_failed(&p, "refused"),
            Some(Duration::from_millis(200))
        );
        b.end_backoff();
        assert_eq!(
            b.connect_failed(&p, "refused"),
            Some(Duration::from_millis(350))
        );
        // A success brings it straight back and resets the streak.
        b.connect_succeeded();
        assert!(b.is_available());
        assert!(b.stats().up);
        assert_eq!(
            b.connect_failed(&p, "refused"),
            None,
            "the streak starts again from zero"
        );
    }

    #[test]
    fn admin_state_and_removal_take_it_out_of_rotation() {
        let b = backend();
        assert_eq!(b.set_admin_state(AdminState::Drain), AdminState::Ready);
        assert!(!b.is_available());
        assert_eq!(b.set_admin_state(AdminState::Ready), AdminState::Drain);
        assert!(b.is_available());
        b.mark_removed();
        assert!(!b.is_available() && b.is_removed());
        assert_eq!(
            b.admin_state(),
            AdminState::Ready,
            "removal keeps the admin state"
        );
    }

    #[test]
    fn cut_cancels_only_the_connections_open_now() {
        let b = backend();
        let open = b.cut_token();
        b.cut_connections();
        assert!(open.is_cancelled());
        assert!(
            !b.cut_token().is_cancelled(),
            "later connections are not cut"
        );
    }
}
