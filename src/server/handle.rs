//! [`BalancerHandle`]: live state of a running balancer, runtime changes to its backends, its events, and
//! its shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::Shared;
use crate::backend::{
    AdminState, BackendError, BackendEvents, BackendStats, DrainReport, Registry, Replaced,
};
use crate::balance::Strategy;
use crate::config::BackendConfig;

/// Reads live state of a [`TcpBalancer`](crate::TcpBalancer), changes its backends while it runs, and
/// starts its graceful shutdown. Cheap to clone.
///
/// Backends are named by their id ([`BackendConfig::id`]: `HOST:PORT` as configured unless one was given).
/// Every change is published as a new table snapshot that the next pick reads; connections in flight are
/// never disturbed by it, and every count (active connections, totals, bytes, health, round-robin
/// position) carries over. See `examples/live_backends.rs`.
#[derive(Debug, Clone)]
pub struct BalancerHandle {
    pub(super) shared: Arc<Shared>,
}

/// The drain of removed backends: resolves once their last connection has ended, or at the deadline,
/// when those still open are reset. Removed backends leave the rotation when they are removed, not when
/// this is polled; dropping it leaves their connections to end on their own, with no deadline.
#[must_use = "a drain does nothing at its deadline unless it is awaited"]
pub struct Drain(Pin<Box<dyn Future<Output = DrainReport> + Send>>);

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Drain")
    }
}

impl Future for Drain {
    type Output = DrainReport;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<DrainReport> {
        self.0.as_mut().poll(cx)
    }
}

impl BalancerHandle {
    fn registry(&self) -> &Arc<Registry> {
        &self.shared.ctx.backends
    }

    fn drain(&self, removed: Vec<Arc<crate::backend::Backend>>, deadline: Duration) -> Drain {
        let registry = self.registry().clone();
        Drain(Box::pin(
            async move { registry.drain(removed, deadline).await },
        ))
    }

    /// Starts a graceful shutdown: accepting stops at once, connections in flight drain.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Shuts down at once: accepting stops, and every connection still open is reset (both sides get a
    /// reset, never a clean end that could pass for a complete stream), as at the drain deadline.
    pub fn force_shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.ctx.hard_stop.fire();
    }

    /// True once a shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// Resolves once a shutdown has begun.
    pub async fn shutting_down(&self) {
        self.shared.shutdown.cancelled().await
    }

    /// The address being served, once [`TcpBalancer::serve`](crate::TcpBalancer::serve) has started.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.listen_addrs().first().copied()
    }

    /// How long a graceful shutdown waits for connections in flight
    /// ([`BalancerConfig::drain_timeout`](crate::BalancerConfig::drain_timeout)); also the admin API's
    /// deadline for a removed backend's drain when the call gives none.
    pub fn drain_timeout(&self) -> Duration {
        self.shared.config.drain_timeout
    }

    /// The strategy in force.
    pub fn strategy(&self) -> Strategy {
        self.registry().strategy()
    }

    /// Client connections being carried now (including those still connecting to a backend).
    pub fn active_connections(&self) -> usize {
        self.shared.tracker.len()
    }

    /// Client sources the per-source limits track now (0 when none is set); never more than
    /// [`edge::limits::MAX_SOURCES`](crate::edge::limits::MAX_SOURCES).
    pub fn tracked_sources(&self) -> usize {
        self.shared
            .ctx
            .settings
            .limiter
            .as_ref()
            .map_or(0, |l| l.tracked())
    }

    /// Clients waiting now for a backend below its cap ([`BackendConfig::max_connections`]).
    pub fn queued(&self) -> usize {
        self.registry().queue().len()
    }

    /// Live state of every backend, in configuration order, then those removed and still draining.
    pub fn backends(&self) -> Vec<BackendStats> {
        self.registry().stats()
    }

    /// Live state of the backend with this id (also while it drains after removal).
    pub fn backend(&self, id: &str) -> Option<BackendStats> {
        self.registry().find(id).map(|b| b.stats())
    }

    /// A stream of every change to the backends from now on: added, removed, drained, admin state,
    /// weight, address and health changes.
    pub fn events(&self) -> BackendEvents {
        self.registry().subscribe()
    }

    /// Adds a backend. It starts fresh and takes new connections at once. Refused when its id is
    /// taken or its configuration is not valid.
    pub fn add_backend(&self, backend: BackendConfig) -> Result<(), BackendError> {
        self.registry().add(&backend)
    }

    /// Removes a backend: out of rotation at once; the connections open on it carry on. The returned
    /// [`Drain`] resolves when the last of them has ended or, at `deadline`, resets those still open.
    pub fn remove_backend(&self, id: &str, deadline: Duration) -> Result<Drain, BackendError> {
        let removed = self.registry().remove(id)?;
        Ok(self.drain(vec![removed], deadline))
    }

    /// Sets a backend's weight (1..=256); returns the previous one. New connections follow it at once.
    pub fn set_weight(&self, id: &str, weight: u32) -> Result<u32, BackendError> {
        self.registry().set_weight(id, weight)
    }

    /// Sets a backend's admin state; returns the previous one. [`AdminState::Drain`] and
    /// [`AdminState::Maint`] take it out of rotation at once, and the connections open on it carry on;
    /// [`reset_connections`](Self::reset_connections) ends them.
    pub fn set_admin_state(&self, id: &str, state: AdminState) -> Result<AdminState, BackendError> {
        self.registry().set_admin_state(id, state)
    }

    /// Resets every connection open on a backend now (both sides get a reset, never a clean end);
    /// returns how many were open. Its later connections are not affected.
    pub fn reset_connections(&self, id: &str) -> Result<usize, BackendError> {
        self.registry().reset_connections(id)
    }

    /// Makes the backends exactly `backends`, diffing by id: an id already there keeps its whole state
    /// (active connections, totals, health, admin state, rotation position) and takes the new weight and
    /// address; a new id starts fresh; an id no longer listed is removed and drains up to `deadline`
    /// (the returned [`Drain`]). This is the primitive a configuration reload and DNS discovery use.
    /// Nothing changes when the list is not valid (a duplicate id, a bad weight).
    pub fn replace_backends(
        &self,
        backends: Vec<BackendConfig>,
        deadline: Duration,
    ) -> Result<(Replaced, Drain), BackendError> {
        let (replaced, removed) = self.registry().replace(&backends)?;
        Ok((replaced, self.drain(removed, deadline)))
    }
}
