//! One backend's live state: load, totals, bytes, passive health, weights and admin state, in atomics.
//!
//! A [`Backend`] is shared (`Arc`) between the registry, every table snapshot that lists it, the
//! connections that use it and the handles that report on it. It lives as long as its id is configured
//! (and then until its last connection has ended), whatever tables are built over it. Nothing here takes a
//! lock on the hot path: a pick reads `active`, `down_until`, `effective_weight` and `admin`, and a
//! connection bumps `active` through an [`ActiveGuard`](super::ActiveGuard) whose `Drop` gives it back.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::events::{BackendEvent, EventSender};
use super::queue::WaitQueue;
use super::stats::BackendStats;
use super::Policy;
use super::{AdminState, BackendId};
use crate::balance::{Candidate, LoadSlot, FULL_ADMISSION};
use crate::clock::now_ms;
use crate::config::BackendConfig;
use crate::config::OnDown;
use crate::metrics::BackendMetrics;
use crate::trigger::Trigger;

/// Set in [`Backend::admin`] once the backend has left its service (it drains, then is forgotten).
const REMOVED: u8 = 0x80;

/// A backend and its live counters.
///
/// `repr(C)`, hot fields first: a pick reads `active`, `down_until`, `admin`, `health`, `cap`,
/// `ramp_start` and `weight`, and clones the `Arc`, whose counts sit just before them, so a pick touches
/// one cache line of the backend.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Backend {
    active: AtomicUsize,
    /// While `now_ms() < down_until` the backend is skipped by every strategy: a passive-health
    /// back-off. 0 when up. Once it is over, one connection at a time may try the backend (`probe`).
    down_until: AtomicU64,
    /// When the half-open trial after a back-off began (`now_ms`); 0 when none runs.
    probe: AtomicU64,
    /// When slow start began (`now_ms`); 0 when the backend is not ramping up.
    ramp_start: AtomicU64,
    /// The configured weight (1..=256).
    weight: AtomicU32,
    /// At most this many connections at once (0: no cap).
    cap: AtomicU32,
    /// [`AdminState`] bits, with [`REMOVED`] once it left its service. 0: ready, in its service.
    admin: AtomicU8,
    /// [`CHECKED_DOWN`] while active checks (or, with checks on, passive failures) hold it down.
    health: AtomicU8,
    backup: AtomicBool,
    /// Sequence number of the last least-connections pick of this backend by a scan.
    last_pick: AtomicU64,
    /// Its leaf in the least-connections tree of the table in force, if that table has one.
    slot: LoadSlot,
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
    policy: Arc<Policy>,
    /// Since when (`now_ms`) its health is what it is, and why (for stats).
    health_since: AtomicU64,
    health_reason: ArcSwap<String>,
    pub(crate) metrics: BackendMetrics,
    /// Woken when the count drops to 0 while the backend is out of rotation (a drain waits on it).
    idle: Notify,
    /// The service's wait queue, told when this backend frees a slot under its cap.
    queue: Arc<WaitQueue>,
    /// Fired to reset every connection open on this backend; replaced by a fresh one each time.
    cut: ArcSwap<Trigger>,
    /// The parent of every `cut` token: the balancer's hard stop.
    stop: CancellationToken,
    events: EventSender,
}

/// Set in [`Backend::health`] while the backend is held down by its checks.
const CHECKED_DOWN: u8 = 1;

/// Effective weights count in sixteenths of a configured weight, so that even a weight-1 backend ramps
/// up in steps.
pub(crate) const WEIGHT_UNITS: u32 = 16;

/// The least part of its share a backend ramping up takes (of [`FULL_ADMISSION`]): 1/64.
const MIN_ADMISSION: u32 = FULL_ADMISSION / 64;

impl Backend {
    /// The name of its service, if the balancer has one (the `service` label of its metrics).
    pub(crate) fn service(&self) -> Option<&str> {
        self.policy.service.as_deref()
    }

    /// A backend for `config`. `joining`: it joins a running service, so slow start (if on) applies.
    /// Under active checks it starts down, until its first check passes.
    pub(crate) fn new(
        config: &BackendConfig,
        policy: Arc<Policy>,
        joining: bool,
        stop: &CancellationToken,
        events: EventSender,
        queue: Arc<WaitQueue>,
    ) -> Self {
        let metrics = BackendMetrics::register(policy.service.as_deref(), &config.id);
        metrics.set_weight(config.weight);
        let checked_down = policy.checked;
        metrics.set_up(!checked_down);
        let ramp = if joining && !policy.slow_start.is_zero() {
            now_ms()
        } else {
            0
        };
        Backend {
            active: AtomicUsize::new(0),
            down_until: AtomicU64::new(0),
            probe: AtomicU64::new(0),
            ramp_start: AtomicU64::new(ramp),
            weight: AtomicU32::new(config.weight),
            cap: AtomicU32::new(config.max_connections.unwrap_or(0)),
            admin: AtomicU8::new(0),
            health: AtomicU8::new(if checked_down { CHECKED_DOWN } else { 0 }),
            backup: AtomicBool::new(config.backup),
            last_pick: AtomicU64::new(0),
            slot: LoadSlot::default(),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            downs_in_a_row: AtomicU32::new(0),
            bytes_to_backend: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            addr: ArcSwap::from_pointee(config.addr),
            id: config.id.as_str().into(),
            policy,
            health_since: AtomicU64::new(now_ms()),
            health_reason: ArcSwap::from_pointee(if checked_down {
                "not checked yet".to_string()
            } else {
                String::new()
            }),
            metrics,
            idle: Notify::new(),
            queue,
            cut: ArcSwap::from_pointee(Trigger::new(stop.child_token())),
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

    /// True while the backend is healthy: not held down by its checks, and not inside a passive-health
    /// back-off.
    fn is_healthy(&self) -> bool {
        let until = self.down_until.load(Relaxed);
        self.health.load(Relaxed) == 0 && (until == 0 || until <= now_ms())
    }

    /// True while its checks (or, under checks, passive failures) hold it down.
    pub(crate) fn is_checked_down(&self) -> bool {
        self.health.load(Relaxed) & CHECKED_DOWN != 0
    }

    /// The per-backend cap, if any.
    pub(crate) fn cap(&self) -> Option<u32> {
        let cap = self.cap.load(Relaxed);
        (cap != 0).then_some(cap)
    }

    /// True once it has as many connections as its cap allows.
    pub(crate) fn is_full(&self) -> bool {
        let cap = self.cap.load(Relaxed);
        cap != 0 && self.active.load(Relaxed) >= cap as usize
    }

    /// Sets the cap (`None`: none).
    pub(crate) fn set_cap(&self, cap: Option<u32>) {
        self.cap.store(cap.unwrap_or(0), Relaxed);
        self.queue.slot_freed();
    }

    /// Makes it a backup (used only while no primary may be picked) or a primary.
    pub(crate) fn set_backup(&self, backup: bool) -> bool {
        self.backup.swap(backup, Relaxed)
    }

    /// Claims the connection the table just picked this backend for. A backend inside a back-off that
    /// has just ended is tried by one connection at a time (a half-open trial): the others are refused
    /// here and pick again. A backend at its cap is refused too (two picks may race for its last slot).
    /// On success the connection is counted (see [`ActiveGuard`](super::ActiveGuard)).
    pub(crate) fn claim(&self) -> bool {
        let until = self.down_until.load(Relaxed);
        if until != 0 {
            let now = now_ms();
            if until > now {
                return false;
            }
            let probe = self.probe.load(Relaxed);
            let stale = self.policy.probe_stale.as_millis() as u64;
            if probe != 0 && now.saturating_sub(probe) <= stale {
                return false;
            }
            if self
                .probe
                .compare_exchange(probe, now, Relaxed, Relaxed)
                .is_err()
            {
                return false;
            }
            tracing::debug!(backend = %self.who(), "back-off over; one connection tries it");
        }
        let cap = self.cap.load(Relaxed);
        if cap == 0 {
            self.acquire();
            return true;
        }
        let mut now = self.active.load(Relaxed);
        loop {
            if now >= cap as usize {
                return false;
            }
            match self
                .active
                .compare_exchange_weak(now, now + 1, Relaxed, Relaxed)
            {
                Ok(_) => break,
                Err(seen) => now = seen,
            }
        }
        self.metrics.active_up();
        self.slot.took(now + 1);
        true
    }

    /// How far slow start has gone, in [`FULL_ADMISSION`] units (all of it when it is not ramping).
    fn ramp(&self) -> u32 {
        let start = self.ramp_start.load(Relaxed);
        if start == 0 {
            return FULL_ADMISSION;
        }
        let ramp = ramp_at(start, now_ms(), self.policy.slow_start);
        if ramp == FULL_ADMISSION {
            let _ = self.ramp_start.compare_exchange(start, 0, Relaxed, Relaxed);
        }
        ramp
    }

    /// True while slow start runs (the registry rebuilds the table as the weight grows).
    pub(crate) fn is_ramping(&self) -> bool {
        self.ramp() < FULL_ADMISSION
    }

    /// Starts slow start, if it is on.
    fn start_ramp(&self) {
        if !self.policy.slow_start.is_zero() {
            self.ramp_start.store(now_ms(), Relaxed);
        }
    }

    /// The effective weight: the configured one, times how far slow start has gone.
    pub(crate) fn effective_weight(&self) -> f64 {
        f64::from(self.configured_weight()) * f64::from(self.ramp()) / f64::from(FULL_ADMISSION)
    }

    /// For log lines: the id, and the address too when it is not the id.
    pub(crate) fn who(&self) -> Who<'_> {
        Who(self)
    }

    /// A trigger fired when this backend's connections are to be reset by the operator; its token is
    /// also cancelled by the balancer's hard stop (its parent).
    pub(crate) fn cut_trigger(&self) -> Arc<Trigger> {
        self.cut.load_full()
    }

    /// Resets every connection open on this backend now. Later ones are not affected, unless the backend
    /// has been removed: then every connection that still reaches it (a connect in progress) is reset too.
    pub(crate) fn cut_connections(&self) {
        if self.is_removed() {
            self.cut.load().fire();
        } else {
            self.cut
                .swap(Arc::new(Trigger::new(self.stop.child_token())))
                .fire();
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

    /// Records a verdict on its health: `up` or down, and why. Returns whether it changed. Logs the
    /// change once, sends a [`BackendEvent::HealthChanged`], and: coming up, starts slow start and forgets
    /// passive failures; going down with [`OnDown::Cut`], resets its connections.
    pub(crate) fn set_health(&self, up: bool, reason: &str) -> bool {
        let changed = if up {
            self.health.fetch_and(!CHECKED_DOWN, Relaxed) & CHECKED_DOWN != 0
        } else {
            self.health.fetch_or(CHECKED_DOWN, Relaxed) & CHECKED_DOWN == 0
        };
        self.health_reason.store(Arc::new(reason.to_string()));
        if !changed {
            return false;
        }
        self.health_since.store(now_ms(), Relaxed);
        if up {
            self.consecutive_failures.store(0, Relaxed);
            self.downs_in_a_row.store(0, Relaxed);
            self.down_until.store(0, Relaxed);
            self.probe.store(0, Relaxed);
            self.start_ramp();
            tracing::info!(backend = %self.who(), reason, "backend is up");
        } else {
            tracing::warn!(backend = %self.who(), reason, "backend is down");
        }
        self.metrics.state_changed(up);
        self.publish_up();
        self.events.send(BackendEvent::HealthChanged {
            id: self.id.clone(),
            up,
            reason: reason.to_string(),
        });
        if !up && self.policy.on_down == OnDown::Cut {
            self.cut_connections();
        }
        true
    }

    /// Updates the `ulb_backend_up` gauge: 1 while ready and healthy.
    fn publish_up(&self) {
        self.metrics.set_up(self.is_ready() && self.is_healthy());
    }

    /// A point-in-time copy of this backend's state.
    pub(crate) fn stats(&self) -> BackendStats {
        let now = now_ms();
        let until = self.down_until.load(Relaxed);
        let checked_down = self.health.load(Relaxed) & CHECKED_DOWN != 0;
        let since = self.health_since.load(Relaxed);
        BackendStats {
            id: self.id.to_string(),
            addr: self.addr(),
            weight: self.configured_weight(),
            effective_weight: self.effective_weight(),
            admin: self.admin_state(),
            removing: self.is_removed(),
            backup: self.backup.load(Relaxed),
            max_connections: self.cap(),
            health_for: Duration::from_millis(now.saturating_sub(since)),
            health_reason: (**self.health_reason.load()).clone(),
            active: self.active.load(Relaxed),
            total: self.total.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            bytes_to_backend: self.bytes_to_backend.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
            up: !checked_down && (until == 0 || until <= now),
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
        let cap = self.cap.load(Relaxed);
        if cap != 0 && now < cap as usize {
            self.queue.slot_freed(); // a slot is free: the first queued client may take it
        }
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

    /// Records a successful connect: clears the failure streak and ends a back-off (this was its
    /// half-open trial, or a connect that was in flight).
    pub(crate) fn connect_succeeded(&self) {
        // Loads first: on a healthy backend this path stays read-only, so cores do not fight over the line.
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
        if self.downs_in_a_row.load(Relaxed) != 0 && self.downs_in_a_row.swap(0, Relaxed) != 0 {
            self.down_until.store(0, Relaxed);
            self.probe.store(0, Relaxed);
            self.health_since.store(now_ms(), Relaxed);
            let reason = "passive: a connect succeeded";
            self.health_reason.store(Arc::new(reason.to_string()));
            self.start_ramp();
            self.metrics.state_changed(true);
            self.publish_up();
            tracing::info!(backend = %self.who(), reason, "backend is up");
            self.events.send(BackendEvent::HealthChanged {
                id: self.id.clone(),
                up: true,
                reason: reason.into(),
            });
        }
    }

    /// Records a failed connect. After `failure_threshold` failures in a row the backend is marked down:
    /// with active checks, until they pass again; without, for a back-off that doubles each time it is
    /// marked down again, up to `max_backoff`, after which one connection tries it. Returns the back-off
    /// when this call started one.
    pub(crate) fn connect_failed(&self, why: &str) -> Option<Duration> {
        let policy = &self.policy.passive;
        self.connect_failures.fetch_add(1, Relaxed);
        let streak = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if streak < policy.failure_threshold {
            return None;
        }
        let reason = format!("passive: {streak} connects failed in a row, the last: {why}");
        if self.policy.checked {
            self.set_health(false, &reason);
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
        self.probe.store(0, Relaxed);
        if downs == 0 {
            self.health_since.store(now, Relaxed);
            self.metrics.state_changed(false);
        }
        self.health_reason.store(Arc::new(reason.clone()));
        self.metrics.set_up(false);
        tracing::warn!(
            backend = %self.who(),
            backoff_ms = backoff.as_millis() as u64,
            reason,
            "backend is down"
        );
        self.events.send(BackendEvent::HealthChanged {
            id: self.id.clone(),
            up: false,
            reason,
        });
        if self.policy.on_down == OnDown::Cut {
            self.cut_connections();
        }
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

    /// The effective weight in sixteenths: the configured weight, ramped by slow start.
    #[inline]
    fn weight(&self) -> u32 {
        let weight = self.weight.load(Relaxed) * WEIGHT_UNITS;
        if self.ramp_start.load(Relaxed) == 0 {
            return weight;
        }
        let ramp = self.ramp();
        ((u64::from(weight) * u64::from(ramp) / u64::from(FULL_ADMISSION)) as u32).max(1)
    }

    /// Ready, in its service, healthy, below its cap, and not inside a passive-health back-off (once
    /// the back-off is over, available while no half-open trial runs). The clock is read only for a
    /// backend that has been down, so a healthy table costs no clock read.
    #[inline]
    fn is_available(&self) -> bool {
        if self.admin.load(Relaxed) != 0 || self.health.load(Relaxed) != 0 || self.is_full() {
            return false;
        }
        let until = self.down_until.load(Relaxed);
        if until == 0 {
            return true;
        }
        let now = now_ms();
        if until > now {
            return false;
        }
        let probe = self.probe.load(Relaxed);
        probe == 0 || now.saturating_sub(probe) > self.policy.probe_stale.as_millis() as u64
    }

    /// The end of its back-off, or never (`u64::MAX`) while it is out of rotation or held down by its
    /// checks, since only the operator or a check brings it back.
    fn available_again_at(&self) -> u64 {
        if self.is_ready() && self.health.load(Relaxed) == 0 {
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

    #[inline]
    fn admission(&self) -> u32 {
        if self.ramp_start.load(Relaxed) == 0 {
            FULL_ADMISSION
        } else {
            self.ramp()
        }
    }

    fn is_backup(&self) -> bool {
        self.backup.load(Relaxed)
    }
}

/// How far a ramp that began at `start` has gone at `now` (both `now_ms`), over `window`: from
/// [`MIN_ADMISSION`] up, linearly, to [`FULL_ADMISSION`] at the end of the window.
fn ramp_at(start: u64, now: u64, window: Duration) -> u32 {
    let window = window.as_millis() as u64;
    let elapsed = now.saturating_sub(start);
    if window == 0 || elapsed >= window {
        return FULL_ADMISSION;
    }
    ((elapsed * u64::from(FULL_ADMISSION) / window) as u32).max(MIN_ADMISSION)
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
    use crate::config::PassiveHealth;

    fn backend_with(policy: Policy) -> Arc<Backend> {
        let config = BackendConfig::new("127.0.0.1:1".parse().unwrap());
        Arc::new(Backend::new(
            &config,
            Arc::new(policy),
            false,
            &CancellationToken::new(),
            EventSender::new(),
            Arc::new(WaitQueue::default()),
        ))
    }

    fn backend() -> Arc<Backend> {
        backend_with(Policy {
            passive: PassiveHealth::new(3, Duration::from_millis(100), Duration::from_millis(350)),
            probe_stale: Duration::from_secs(1),
            ..Policy::default()
        })
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
        assert_eq!(b.connect_failed("refused"), None);
        assert_eq!(b.connect_failed("refused"), None);
        assert_eq!(
            b.connect_failed("refused"),
            Some(Duration::from_millis(100))
        );
        assert!(!b.is_available());
        // A failure while down changes nothing.
        assert_eq!(b.connect_failed("refused"), None);
        // Once the back-off is over, a further failure marks it down for twice as long, then capped.
        b.end_backoff();
        assert!(b.is_available());
        assert_eq!(
            b.connect_failed("refused"),
            Some(Duration::from_millis(200))
        );
        b.end_backoff();
        assert_eq!(
            b.connect_failed("refused"),
            Some(Duration::from_millis(350))
        );
        // A success brings it straight back and resets the streak.
        b.connect_succeeded();
        assert!(b.is_available());
        assert!(b.stats().up);
        assert_eq!(
            b.connect_failed("refused"),
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
        let open = b.cut_trigger();
        b.cut_connections();
        assert!(open.is_fired() && open.token().is_cancelled());
        assert!(!b.cut_trigger().is_fired(), "later connections are not cut");
    }

    /// Once a back-off is over, one connection claims the backend (the half-open trial); the others are
    /// refused until it reports, or until it is stale.
    #[test]
    fn a_backoff_ends_with_one_trial_connection() {
        let b = backend();
        for _ in 0..3 {
            b.connect_failed("refused");
        }
        assert!(!b.is_available() && !b.claim(), "inside the back-off");
        b.end_backoff();
        assert!(b.is_available());
        assert!(
            b.claim(),
            "the first connection after the back-off tries it"
        );
        assert!(
            !b.is_available() && !b.claim(),
            "a second one waits for the trial"
        );
        // The trial fails: a longer back-off, and again one trial after it.
        assert_eq!(
            b.connect_failed("refused"),
            Some(Duration::from_millis(200))
        );
        b.end_backoff();
        assert!(b.claim());
        b.connect_succeeded();
        assert!(b.claim() && b.claim(), "up again: every connection");
        assert_eq!(
            b.active(),
            4,
            "the three claims that were let through, and the trial before"
        );
    }

    #[test]
    fn a_capped_backend_takes_no_more_than_its_cap() {
        let config = BackendConfig::new("127.0.0.1:1".parse().unwrap()).with_max_connections(2);
        let b = Arc::new(Backend::new(
            &config,
            Arc::new(Policy::default()),
            false,
            &CancellationToken::new(),
            EventSender::new(),
            Arc::new(WaitQueue::default()),
        ));
        assert!(b.claim() && b.claim());
        assert!(!b.claim() && !b.is_available() && b.is_full());
        b.release();
        assert!(b.is_available() && b.claim());
    }

    #[test]
    fn under_checks_a_backend_starts_down_and_passive_failures_wait_for_the_checks() {
        let b = backend_with(Policy {
            passive: PassiveHealth::new(2, Duration::from_millis(100), Duration::from_millis(100)),
            checked: true,
            ..Policy::default()
        });
        assert!(!b.is_available() && !b.stats().up, "not checked yet");
        assert!(b.set_health(true, "connect: ok"));
        assert!(b.is_available());
        b.connect_failed("refused");
        b.connect_failed("refused");
        assert!(!b.is_available(), "down at once");
        b.end_backoff();
        assert!(
            !b.is_available(),
            "no back-off ends it: only a passing check"
        );
        assert!(b
            .stats()
            .health_reason
            .starts_with("passive: 2 connects failed"));
        assert!(b.set_health(true, "connect: ok"));
        assert!(b.is_available());
    }

    #[test]
    fn slow_start_ramps_the_effective_weight() {
        let config = BackendConfig::new("127.0.0.1:1".parse().unwrap()).with_weight(4);
        let b = Backend::new(
            &config,
            Arc::new(Policy {
                slow_start: Duration::from_secs(3600),
                ..Policy::default()
            }),
            true,
            &CancellationToken::new(),
            EventSender::new(),
            Arc::new(WaitQueue::default()),
        );
        assert!(b.is_ramping());
        assert!(b.effective_weight() < 0.1, "{}", b.effective_weight());
        assert_eq!(b.weight(), 1, "at least one sixteenth");
        assert_eq!(b.admission(), MIN_ADMISSION);
        let hour = Duration::from_secs(3600);
        assert_eq!(ramp_at(1000, 1000 + 1_800_000, hour), FULL_ADMISSION / 2);
        assert_eq!(ramp_at(1000, 1000 + 3_600_000, hour), FULL_ADMISSION);
        assert_eq!(ramp_at(1000, 1001, hour), MIN_ADMISSION, "near 0, never 0");
        // Once it is over, the whole weight, and the ramp is forgotten.
        b.ramp_start.store(u64::MAX, Relaxed);
        assert!(
            b.is_ramping(),
            "a ramp that has not begun yet is at its start"
        );
        b.ramp_start.store(0, Relaxed);
        assert_eq!(b.weight(), 4 * WEIGHT_UNITS);
        assert!(!b.is_ramping());
    }
}
