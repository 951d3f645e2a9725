//! The registry: a service's backends by id, the changes made to them, and the table snapshot that the
//! picks read, rebuilt and published after every change.
//!
//! Writers (the handle's calls, a reload, a supervisor) take the registry's lock, change the members and
//! publish a new [`Table`] with `ArcSwap::store`; picks never lock, they load the table in force. The
//! state of a backend lives in its one [`Backend`] object, which a rebuild carries over, so no change ever
//! loses a count, a total, a health verdict or a rotation position.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::events::{BackendEvent, BackendEvents, EventSender};
use super::queue::WaitQueue;
use super::stats::BackendStats;
use super::Policy;
use super::{AdminState, Backend, BackendId};
use crate::balance::{Candidate, Picks, Strategy, Table};
use crate::config::{BackendConfig, ConfigError, MAX_DURATION};

/// Why a change to the backends was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// No backend has this id.
    #[error("no backend '{0}'")]
    NotFound(String),
    /// A backend with this id is already in the service.
    #[error("a backend with id '{0}' is already in the service")]
    Duplicate(String),
    /// The backend's configuration is not valid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// What the drain of removed backends did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// The backends drained.
    pub ids: Vec<BackendId>,
    /// How long it took for their last connection to end.
    pub waited: Duration,
    /// Connections still open at the deadline, which were reset.
    pub reset: usize,
}

/// What [`BalancerHandle::replace_backends`](crate::BalancerHandle::replace_backends) changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Replaced {
    /// Ids that were not there before: they start fresh.
    pub added: Vec<BackendId>,
    /// Ids that are no longer listed: they drain.
    pub removed: Vec<BackendId>,
    /// Ids kept whose weight or address changed; every other part of their state is kept.
    pub changed: Vec<BackendId>,
    /// Ids kept as they were, state and all.
    pub unchanged: Vec<BackendId>,
}

#[derive(Debug, Default)]
struct Members {
    /// The service's backends, in configuration order.
    list: Vec<Arc<Backend>>,
    /// Backends removed whose connections have not all ended yet.
    leaving: Vec<Arc<Backend>>,
}

impl Members {
    fn position(&self, id: &str) -> Option<usize> {
        self.list.iter().position(|b| b.id().as_str() == id)
    }

    fn find(&self, id: &str) -> Result<&Arc<Backend>, BackendError> {
        self.position(id)
            .map(|i| &self.list[i])
            .ok_or_else(|| BackendError::NotFound(id.to_string()))
    }

    /// Forgets the leaving backends whose last connection has ended.
    fn prune(&mut self) {
        self.leaving.retain(|b| b.active() != 0);
    }
}

/// One service's backends. See the module documentation.
#[derive(Debug)]
pub(crate) struct Registry {
    strategy: Strategy,
    table: ArcSwap<Table<Backend>>,
    picks: Picks,
    members: Mutex<Members>,
    events: EventSender,
    /// The balancer's hard stop: every backend's cut token is a child of it.
    stop: CancellationToken,
    /// What every backend follows (health, slow start).
    policy: Arc<Policy>,
    /// Clients waiting for a backend below its cap.
    queue: Arc<WaitQueue>,
}

impl Registry {
    /// The registry of `backends` (already validated: unique ids, weights in range).
    pub(crate) fn new(
        strategy: Strategy,
        seed: u64,
        backends: &[BackendConfig],
        policy: Policy,
        stop: CancellationToken,
    ) -> Self {
        let mut registry = Registry {
            strategy,
            table: ArcSwap::from_pointee(Table::new(strategy, Vec::new(), None)),
            picks: Picks::new(seed),
            members: Mutex::new(Members::default()),
            events: EventSender::new(),
            stop,
            policy: Arc::new(policy),
            queue: Arc::new(WaitQueue::default()),
        };
        let list: Vec<Arc<Backend>> = backends
            .iter()
            .map(|c| Arc::new(registry.new_backend(c, false)))
            .collect();
        registry.table = ArcSwap::from_pointee(Table::new(strategy, list.clone(), None));
        registry.members = Mutex::new(Members {
            list,
            leaving: Vec::new(),
        });
        registry
    }

    fn new_backend(&self, config: &BackendConfig, joining: bool) -> Backend {
        Backend::new(
            config,
            self.policy.clone(),
            joining,
            &self.stop,
            self.events.clone(),
            self.queue.clone(),
        )
    }

    /// The clients waiting for a backend below its cap.
    pub(crate) fn queue(&self) -> &WaitQueue {
        &self.queue
    }

    /// True when a backend that could be picked but for its cap is full: a client that found no backend
    /// may wait for a slot.
    pub(crate) fn has_full_backend(&self) -> bool {
        self.table.load().entries().any(|b| b.is_full())
    }

    /// Upkeep, called a few times a second by the server: while a backend ramps up (slow start), the
    /// table is rebuilt, so that the schedules and the least-connections tree follow its weight.
    pub(crate) fn maintain(&self) {
        let members = self.members();
        if members.list.iter().any(|b| b.is_ramping()) {
            self.publish(&members);
        }
    }

    pub(crate) fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Picks a backend that is available and not in `tried`, from the table in force; lock-free.
    #[inline]
    pub(crate) fn pick(&self, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        self.table.load().pick(&self.picks, tried).cloned()
    }

    /// The table in force.
    pub(crate) fn table(&self) -> Arc<Table<Backend>> {
        self.table.load_full()
    }

    pub(crate) fn subscribe(&self) -> BackendEvents {
        self.events.subscribe()
    }

    /// The members, even if a writer panicked while holding the lock (every change leaves them whole).
    fn members(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds the table of the members and publishes it; called with the lock held, so that tables are
    /// published in the order the changes were made.
    fn publish(&self, members: &Members) {
        let previous = self.table.load();
        let table = Table::new(self.strategy, members.list.clone(), Some(&previous));
        self.table.store(Arc::new(table));
    }

    /// Every backend of the service, in configuration order, then those still draining after removal.
    pub(crate) fn stats(&self) -> Vec<BackendStats> {
        let mut members = self.members();
        members.prune();
        members
            .list
            .iter()
            .chain(&members.leaving)
            .map(|b| b.stats())
            .collect()
    }

    /// The members now, in configuration order (not those draining after removal).
    pub(crate) fn backends(&self) -> Vec<Arc<Backend>> {
        self.members().list.clone()
    }

    /// The backend with this id: a member, or else one still draining after removal.
    pub(crate) fn find(&self, id: &str) -> Option<Arc<Backend>> {
        let members = self.members();
        let member = members.find(id).ok().cloned();
        member.or_else(|| {
            let mut leaving = members.leaving.iter().rev();
            leaving.find(|b| b.id().as_str() == id).cloned()
        })
    }

    /// Adds a backend: it starts fresh and takes connections at once.
    pub(crate) fn add(&self, config: &BackendConfig) -> Result<(), BackendError> {
        config.validate()?;
        let mut members = self.members();
        if members.position(&config.id).is_some() {
            return Err(BackendError::Duplicate(config.id.clone()));
        }
        let backend = Arc::new(self.new_backend(config, true));
        members.list.push(backend);
        members.prune();
        self.publish(&members);
        self.announce_added(config);
        Ok(())
    }

    /// Takes a backend out of the service: out of rotation at once; it drains. Returns its state, for
    /// [`Registry::drain`].
    pub(crate) fn remove(&self, id: &str) -> Result<Arc<Backend>, BackendError> {
        let mut members = self.members();
        let i = members
            .position(id)
            .ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        let backend = members.list.remove(i);
        self.retire(&mut members, backend.clone());
        self.publish(&members);
        Ok(backend)
    }

    /// Marks a member removed and keeps it among the leaving ones until it has drained.
    fn retire(&self, members: &mut Members, backend: Arc<Backend>) {
        backend.mark_removed();
        // It is in no table from now on: its guards need not keep any tree up to date.
        backend.load_slot().set(None);
        tracing::info!(backend = %backend.who(), active = backend.active(), "backend removed; draining");
        self.events.send(BackendEvent::Removed {
            id: backend.id().clone(),
        });
        if backend.active() == 0 {
            self.events.send(BackendEvent::Drained {
                id: backend.id().clone(),
            });
        } else {
            members.leaving.push(backend);
        }
    }

    /// Waits until the removed `backends` have no connection left, resetting those still open at
    /// `deadline` (capped at [`MAX_DURATION`]), then forgets them.
    pub(crate) async fn drain(
        &self,
        backends: Vec<Arc<Backend>>,
        deadline: Duration,
    ) -> DrainReport {
        let started = Instant::now();
        let until = tokio::time::Instant::now() + deadline.min(MAX_DURATION);
        let mut on_time = true;
        for b in &backends {
            if tokio::time::timeout_at(until, b.idle()).await.is_err() {
                on_time = false;
                break;
            }
        }
        let mut reset = 0;
        if !on_time {
            for b in backends.iter().filter(|b| b.active() != 0) {
                let open = b.active();
                tracing::warn!(backend = %b.who(), reset = open, "drain deadline passed; resetting its connections");
                reset += open;
                b.cut_connections();
            }
            for b in &backends {
                b.idle().await;
            }
        }
        let mut members = self.members();
        members
            .leaving
            .retain(|l| !backends.iter().any(|b| Arc::ptr_eq(b, l)));
        DrainReport {
            ids: backends.iter().map(|b| b.id().clone()).collect(),
            waited: started.elapsed(),
            reset,
        }
    }

    /// Sets a member's configured weight (1..=256) and rebuilds the table.
    pub(crate) fn set_weight(&self, id: &str, weight: u32) -> Result<u32, BackendError> {
        crate::config::check_weight(id, weight)?;
        let members = self.members();
        let old = members.find(id)?.set_weight(weight);
        if old != weight {
            self.publish(&members);
        }
        Ok(old)
    }

    /// Sets a member's admin state; returns the previous one. Effective at once, without a rebuild.
    pub(crate) fn set_admin_state(
        &self,
        id: &str,
        state: AdminState,
    ) -> Result<AdminState, BackendError> {
        let members = self.members();
        let old = members.find(id)?.set_admin_state(state);
        if state == AdminState::Ready && old != state {
            self.table.load().availability_changed();
        }
        Ok(old)
    }

    /// Resets every connection open on the backend with this id (a member, or one draining after
    /// removal); returns how many there were.
    pub(crate) fn reset_connections(&self, id: &str) -> Result<usize, BackendError> {
        let backend = self
            .find(id)
            .ok_or_else(|| BackendError::NotFound(id.to_string()))?;
        let open = backend.active();
        backend.cut_connections();
        Ok(open)
    }

    /// Makes the members exactly `list`, diffing by id: kept ids keep their whole state (counts, totals,
    /// health, admin state, rotation position) and take the new weight and address; new ids start fresh;
    /// missing ones are removed and drain. The members take the order of `list`. Returns what changed
    /// and the removed backends, for [`Registry::drain`]. Nothing changes if `list` is not valid.
    pub(crate) fn replace(
        &self,
        list: &[BackendConfig],
    ) -> Result<(Replaced, Vec<Arc<Backend>>), BackendError> {
        let mut ids = HashSet::with_capacity(list.len());
        for config in list {
            config.validate()?;
            if !ids.insert(config.id.as_str()) {
                return Err(BackendError::Duplicate(config.id.clone()));
            }
        }
        let mut members = self.members();
        let previous = std::mem::take(&mut members.list);
        let mut kept: HashMap<&str, &Arc<Backend>> =
            previous.iter().map(|b| (b.id().as_str(), b)).collect();
        let mut report = Replaced::default();
        let mut added = Vec::new();
        for config in list {
            let backend = match kept.remove(config.id.as_str()) {
                Some(b) => {
                    let weight = b.set_weight(config.weight);
                    let addr = b.set_addr(config.addr);
                    let backup = b.set_backup(config.backup);
                    let cap = b.cap();
                    b.set_cap(config.max_connections);
                    let same = weight == config.weight
                        && addr == config.addr
                        && backup == config.backup
                        && cap == config.max_connections;
                    let into = if same {
                        &mut report.unchanged
                    } else {
                        &mut report.changed
                    };
                    into.push(b.id().clone());
                    b.clone()
                }
                None => {
                    report.added.push(BackendId::from(config.id.as_str()));
                    added.push(config);
                    Arc::new(self.new_backend(config, true))
                }
            };
            members.list.push(backend);
        }
        // The ones no longer listed, in their old order.
        let gone: Vec<Arc<Backend>> = previous
            .iter()
            .filter(|b| !ids.contains(b.id().as_str()))
            .cloned()
            .collect();
        for b in &gone {
            report.removed.push(b.id().clone());
            self.retire(&mut members, b.clone());
        }
        members.prune();
        self.publish(&members);
        for config in added {
            self.announce_added(config);
        }
        Ok((report, gone))
    }

    fn announce_added(&self, config: &BackendConfig) {
        tracing::info!(backend = %config.id, addr = %config.addr, weight = config.weight, "backend added");
        self.events.send(BackendEvent::Added {
            id: config.id.as_str().into(),
            addr: config.addr,
            weight: config.weight,
        });
    }
}
