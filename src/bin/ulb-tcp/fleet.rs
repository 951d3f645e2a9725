//! The services of a configuration file, running, and their reload.
//!
//! Each service is a [`TcpBalancer`] run with [`TcpBalancer::run`], its listeners attached with
//! [`BalancerHandle::accept_on`] (work-stealing) or [`BalancerHandle::accept_on_threads`] (per-core, on
//! serving threads that every service shares). A reload diffs the new file against what runs, by service name and
//! then by backend id:
//!
//! * a service whose settings are unchanged is changed in place: its backends through
//!   [`BalancerHandle::replace_backends`] (kept ids keep their connections, counts, health, admin state
//!   and rotation position; new ids enter through their checks and slow start; missing ids drain up to
//!   the service's drain timeout), its listeners one by one (the others never stop accepting);
//! * a service whose settings changed (strategy, timeouts, checks, ...) is rebuilt: the new balancer
//!   starts beside the old one and, once a backend of it may be picked, takes the old one's listeners
//!   over without closing them (a closed listener would reset the clients in its backlog); the old
//!   one then drains its connections, as at shutdown. Its backends keep their admin state (`drain`,
//!   `maint`), which the file does not hold;
//! * a new service starts; a service no longer in the file stops accepting and drains.
//!
//! Nothing is changed until everything that can fail has been done: the file read and validated, every
//! new address bound. A reload that fails leaves every service as it was.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use ulb_tcp::admin::Services;
use ulb_tcp::metrics::{CONFIG_HASH, CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP, CONFIG_RELOADS_TOTAL};
use ulb_tcp::{AdminState, BalancerHandle, Bound, Listening, ShutdownReport, TcpBalancer};

use crate::file::{FileConfig, ServiceFile};

/// The most a rebuilt service waits for a backend of its own before it takes the listeners over.
const MAX_READY_WAIT: Duration = Duration::from_secs(30);

/// One running service.
struct Running {
    file: ServiceFile,
    handle: BalancerHandle,
    listeners: Vec<Listening>,
    task: JoinHandle<ShutdownReport>,
}

/// Where the services' connections run: the current (work-stealing) runtime, or per-core threads.
#[derive(Clone)]
pub enum Serving {
    Runtime,
    #[cfg(target_os = "linux")]
    PerCore(Arc<ulb_tcp::ServingThreads>),
}

/// Every running service, and the registry the admin server reads.
pub struct Fleet {
    running: Vec<Running>,
    registry: Services,
    serving: Serving,
    /// Services stopped by reloads, still draining.
    retired: Vec<(BalancerHandle, JoinHandle<ShutdownReport>)>,
    /// Every balancer running or draining, for a second signal to reach them all.
    live: Arc<std::sync::Mutex<Vec<BalancerHandle>>>,
}

/// A service made ready to start: built and bound, not yet serving.
struct Prepared {
    file: ServiceFile,
    balancer: TcpBalancer,
    listeners: Vec<Bound>,
}

impl Fleet {
    /// Binds every listener of every service, then starts them all; an address that cannot be bound
    /// fails it before anything serves.
    pub async fn start(
        config: FileConfig,
        registry: Services,
        serving: Serving,
    ) -> Result<Fleet, String> {
        let mut fleet = Fleet {
            running: Vec::new(),
            registry,
            serving,
            retired: Vec::new(),
            live: Arc::default(),
        };
        let mut prepared = Vec::new();
        for service in config.services {
            prepared.push(prepare(service, &HashMap::new(), &fleet.serving)?);
        }
        for p in prepared {
            let running = p.start(false, &fleet.serving).await?;
            fleet
                .registry
                .insert(&running.file.name, running.handle.clone())
                .map_err(|e| e.to_string())?;
            fleet.running.push(running);
        }
        loaded(config.hash);
        fleet.publish_live();
        Ok(fleet)
    }

    /// Every balancer running or still draining, kept up to date across reloads: what a second
    /// signal force-stops.
    pub fn live(&self) -> Arc<std::sync::Mutex<Vec<BalancerHandle>>> {
        self.live.clone()
    }

    fn publish_live(&self) {
        let all = self
            .running
            .iter()
            .map(|r| r.handle.clone())
            .chain(self.retired.iter().map(|(h, _)| h.clone()))
            .collect();
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = all;
    }

    /// Applies `config` (already read and validated) in place of what runs; see the module
    /// documentation. Says what changed, or why nothing did.
    pub async fn reload(&mut self, config: FileConfig) -> Result<Value, String> {
        let result = self.apply(config).await;
        match &result {
            Ok(report) => {
                counter!(CONFIG_RELOADS_TOTAL, "result" => "ok").increment(1);
                tracing::info!(%report, "configuration reloaded");
            }
            Err(why) => Self::refused(why),
        }
        result
    }

    /// Counts and logs a refused reload: the file could not be read, validated or applied (the services
    /// are untouched).
    pub fn refused(why: &str) {
        counter!(CONFIG_RELOADS_TOTAL, "result" => "error").increment(1);
        tracing::error!(error = %why, "configuration reload refused; the running one is kept");
    }

    async fn apply(&mut self, config: FileConfig) -> Result<Value, String> {
        // Every listener now open, by address: a new file that keeps an address keeps its socket.
        let open: HashMap<SocketAddr, Bound> = self
            .running
            .iter()
            .flat_map(|r| r.listeners.iter().map(|l| (l.local_addr(), l.listener())))
            .collect();
        // Phase 1: everything that can fail. Nothing runs differently yet.
        enum Plan {
            Start(Prepared),
            InPlace(usize, ServiceFile, Vec<Bound>),
            Rebuild(usize, Prepared),
        }
        let mut plans = Vec::new();
        for service in config.services {
            let old = self
                .running
                .iter()
                .position(|r| r.file.name == service.name);
            plans.push(match old {
                None => Plan::Start(prepare(service, &open, &self.serving)?),
                Some(i) if self.running[i].file.settings == service.settings => {
                    let listeners = service
                        .listen
                        .iter()
                        .filter(|a| !self.running[i].file.listen.contains(a))
                        .map(|a| listener(&service.name, *a, &open, &self.serving))
                        .collect::<Result<Vec<_>, _>>()?;
                    Plan::InPlace(i, service, listeners)
                }
                Some(i) => Plan::Rebuild(i, prepare(service, &open, &self.serving)?),
            });
        }
        // Phase 2: apply. Services go in their new order.
        let mut old: Vec<Option<Running>> = std::mem::take(&mut self.running)
            .into_iter()
            .map(Some)
            .collect();
        let mut report = Vec::new();
        let mut next = Vec::new();
        for plan in plans {
            match plan {
                Plan::Start(p) => {
                    let name = p.file.name.clone();
                    let running = p.start(true, &self.serving).await?;
                    let _ = self.registry.replace(&name, running.handle.clone());
                    report.push(json!({"service": name, "action": "started"}));
                    next.push(running);
                }
                Plan::InPlace(i, service, added) => {
                    let Some(mut running) = old[i].take() else {
                        continue;
                    };
                    let changes = in_place(&mut running, service, added, &self.serving).await?;
                    report.push(changes);
                    next.push(running);
                }
                Plan::Rebuild(i, p) => {
                    let Some(previous) = old[i].take() else {
                        continue;
                    };
                    let name = p.file.name.clone();
                    p.inherit(&previous.handle);
                    let running = p.start(true, &self.serving).await?;
                    let _ = self.registry.replace(&name, running.handle.clone());
                    self.retire(previous).await;
                    report.push(json!({"service": name, "action": "rebuilt"}));
                    next.push(running);
                }
            }
        }
        // Services no longer in the file.
        for previous in old.into_iter().flatten() {
            let name = previous.file.name.clone();
            self.registry.remove(&name);
            self.retire(previous).await;
            report.push(json!({"service": name, "action": "stopped"}));
        }
        self.running = next;
        self.retired.retain(|(_, t)| !t.is_finished());
        self.publish_live();
        loaded(config.hash);
        Ok(json!({
            "result": "ok",
            "hash": format!("{:08x}", config.hash),
            "services": report,
        }))
    }

    /// Stops a service's listeners (a socket another service took over stays open) and starts its
    /// drain.
    async fn retire(&mut self, running: Running) {
        for l in running.listeners {
            l.close().await;
        }
        running.handle.shutdown();
        self.retired.push((running.handle, running.task));
    }

    /// Shuts every service down (the drain of each runs at once, side by side) and waits for them.
    pub async fn shutdown(self) -> Vec<ShutdownReport> {
        for r in &self.running {
            r.handle.shutdown();
        }
        let mut reports = Vec::new();
        for task in self
            .running
            .into_iter()
            .map(|r| r.task)
            .chain(self.retired.into_iter().map(|(_, t)| t))
        {
            if let Ok(report) = task.await {
                reports.push(report);
            }
        }
        reports
    }
}

/// Builds a service's balancer and gets its listeners: those already open are taken as they are, the
/// others bound now.
fn prepare(
    file: ServiceFile,
    open: &HashMap<SocketAddr, Bound>,
    serving: &Serving,
) -> Result<Prepared, String> {
    let balancer = TcpBalancer::new(file.config.clone())
        .map_err(|e| format!("service '{}': {e}", file.name))?;
    let listeners = file
        .listen
        .iter()
        .map(|a| listener(&file.name, *a, open, serving))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Prepared {
        file,
        balancer,
        listeners,
    })
}

/// The listener on `addr`: the one open now, or a new one of the kind `serving` needs.
fn listener(
    service: &str,
    addr: SocketAddr,
    open: &HashMap<SocketAddr, Bound>,
    serving: &Serving,
) -> Result<Bound, String> {
    if let Some(l) = open.get(&addr) {
        return Ok(l.clone());
    }
    let bound = match serving {
        Serving::Runtime => ulb_tcp::bind(addr).map(|l| Bound::One(Arc::new(l))),
        #[cfg(target_os = "linux")]
        Serving::PerCore(threads) => {
            let n =
                std::num::NonZeroUsize::new(threads.len()).unwrap_or(std::num::NonZeroUsize::MIN);
            ulb_tcp::PerCoreListeners::bind(addr, n).map(|l| Bound::PerCore(Arc::new(l)))
        }
    };
    bound.map_err(|e| format!("service '{service}': cannot listen on {addr}: {e}"))
}

/// Starts accepting on `bound` for `handle`.
fn attach(handle: &BalancerHandle, bound: Bound, serving: &Serving) -> std::io::Result<Listening> {
    match (bound, serving) {
        (Bound::One(l), _) => handle.accept_on(l),
        #[cfg(target_os = "linux")]
        (Bound::PerCore(l), Serving::PerCore(threads)) => handle.accept_on_threads(l, threads),
        #[cfg(target_os = "linux")]
        (Bound::PerCore(_), Serving::Runtime) => Err(std::io::Error::other(
            "a per-core listener needs the serving threads",
        )),
    }
}

impl Prepared {
    /// Takes over the admin states (`drain`, `maint`) of the backends of `old` that it keeps: they are
    /// set through the API, the file has none, and a reload keeps them (see the README's rule).
    fn inherit(&self, old: &BalancerHandle) {
        let handle = self.balancer.handle();
        for b in old.backends() {
            if b.admin != AdminState::Ready && !b.removing {
                if let Ok(was) = handle.set_admin_state(&b.id, b.admin) {
                    tracing::debug!(backend = %b.id, from = ?was, to = ?b.admin, "admin state kept");
                }
            }
        }
    }

    /// Starts the balancer (and its checks); after a first backend may be picked, if `wait`, its
    /// listeners.
    async fn start(self, wait: bool, serving: &Serving) -> Result<Running, String> {
        let handle = self.balancer.handle();
        let name = self.file.name.clone();
        let task = tokio::spawn(self.balancer.run(std::future::pending()));
        if wait {
            ready(&handle).await;
        }
        let mut listeners = Vec::new();
        for l in self.listeners {
            match attach(&handle, l, serving) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    handle.shutdown();
                    return Err(format!("service '{name}': cannot accept: {e}"));
                }
            }
        }
        tracing::info!(
            service = %name,
            listen = ?self.file.listen,
            backends = self.file.config.backends.len(),
            strategy = %self.file.config.strategy,
            "service started"
        );
        Ok(Running {
            file: self.file,
            handle,
            listeners,
            task,
        })
    }
}

/// Waits until a backend of a new balancer may be picked (with active checks, its first check passed),
/// at most [`MAX_READY_WAIT`]; at once when none could be (all in `drain` or `maint`). Woken by the
/// backends' events (health and admin changes), not by polling.
async fn ready(handle: &BalancerHandle) {
    let mut events = handle.events();
    let can_take = |handle: &BalancerHandle| {
        let backends = handle.backends();
        backends.iter().any(|b| b.in_rotation())
            || !backends.iter().any(|b| b.admin == AdminState::Ready)
    };
    let waited = tokio::time::timeout(MAX_READY_WAIT, async {
        // Subscribed first, then checked: a change in between is not missed.
        while !can_take(handle) {
            if events.recv().await.is_none() {
                return;
            }
        }
    })
    .await;
    if waited.is_err() {
        tracing::warn!("no backend of the rebuilt service came up; it takes the listeners anyway");
    }
}

/// Changes a running service in place: its backends, then its listeners.
async fn in_place(
    running: &mut Running,
    service: ServiceFile,
    added: Vec<Bound>,
    serving: &Serving,
) -> Result<Value, String> {
    let name = service.name.clone();
    let deadline = running.handle.drain_timeout();
    let (replaced, drain) = running
        .handle
        .replace_backends(service.config.backends.clone(), deadline)
        .map_err(|e| format!("service '{name}': {e}"))?;
    tokio::spawn(async move {
        let report = drain.await;
        tracing::debug!(?report, "removed backends drained");
    });
    for l in added {
        let l = attach(&running.handle, l, serving)
            .map_err(|e| format!("service '{name}': cannot accept: {e}"))?;
        running.listeners.push(l);
    }
    let mut closed = Vec::new();
    let mut kept = Vec::new();
    for l in std::mem::take(&mut running.listeners) {
        if service.listen.contains(&l.local_addr()) {
            kept.push(l);
        } else {
            closed.push(l.local_addr().to_string());
            l.close().await;
        }
    }
    running.listeners = kept;
    let opened: Vec<String> = service
        .listen
        .iter()
        .filter(|a| !running.file.listen.contains(a))
        .map(ToString::to_string)
        .collect();
    running.file = service;
    let ids = |v: &[ulb_tcp::BackendId]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
    Ok(json!({
        "service": name,
        "action": "updated",
        "backends": {
            "added": ids(&replaced.added),
            "removed": ids(&replaced.removed),
            "changed": ids(&replaced.changed),
            "unchanged": replaced.unchanged.len(),
        },
        "listeners": { "added": opened, "removed": closed },
    }))
}

/// Records a configuration that was loaded.
fn loaded(hash: u32) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!(CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP).set(now);
    gauge!(CONFIG_HASH).set(f64::from(hash));
}
