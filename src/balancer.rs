//! [`TcpBalancer`]: the accept loop, the connection limit and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{now_ms, Backend, BackendStats};
use crate::config::{BalancerConfig, ConfigError};
use crate::metrics::GlobalMetrics;
use crate::strategy::{Selector, Strategy, Table};

/// State shared by the accept loop, every connection task and every handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: BalancerConfig,
    pub(crate) selector: Selector,
    pub(crate) metrics: GlobalMetrics,
    /// Fired to stop accepting and begin the drain.
    pub(crate) shutdown: CancellationToken,
    /// Fired at the drain deadline: connections still open are closed.
    pub(crate) hard_stop: CancellationToken,
    /// Every connection task, on whichever runtime it runs.
    pub(crate) tracker: TaskTracker,
    /// The connection limit: a permit per connection carried.
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) local_addr: OnceLock<SocketAddr>,
    last_no_backend_log: AtomicU64,
}

impl Shared {
    /// At most one "no backend reachable" warning a second, so that an outage does not flood the log.
    pub(crate) fn should_log_no_backend(&self) -> bool {
        let now = now_ms();
        let last = self.last_no_backend_log.load(Relaxed);
        now.saturating_sub(last) >= 1000
            && self
                .last_no_backend_log
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

/// A Layer-4 TCP load balancer.
///
/// Build it from a validated [`BalancerConfig`], take a [`BalancerHandle`] if you want to watch it or stop
/// it from elsewhere, then [`serve`](TcpBalancer::serve) a bound listener until a shutdown future fires.
///
/// ```no_run
/// use std::time::Duration;
/// use ulb_tcp::{BackendConfig, BalancerConfig, Strategy, TcpBalancer};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = BalancerConfig::new([
///     BackendConfig::new("127.0.0.1:8081".parse()?),
///     BackendConfig::new("127.0.0.1:8082".parse()?).with_weight(2),
/// ])
/// .strategy(Strategy::LeastConnections)
/// .connect_timeout(Duration::from_secs(1));
///
/// let balancer = TcpBalancer::new(config)?;
/// let handle = balancer.handle();
/// let listener = ulb_tcp::bind("127.0.0.1:0".parse()?)?;
/// println!("listening on {}", listener.local_addr()?);
///
/// // Serve until Ctrl-C, then drain connections in flight (up to the drain timeout).
/// let report = balancer
///     .serve(listener, async { let _ = tokio::signal::ctrl_c().await; })
///     .await?;
/// println!("{} connections were cut at the drain deadline", report.forced);
/// for b in handle.backends() {
///     println!("{}: {} connections in total", b.name, b.total);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TcpBalancer {
    shared: Arc<Shared>,
}

/// Reads live state of a running [`TcpBalancer`] and starts its graceful shutdown. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BalancerHandle {
    shared: Arc<Shared>,
}

/// What a graceful shutdown did, returned by [`TcpBalancer::serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still open when accepting stopped.
    pub in_flight: usize,
    /// Of those, how many were still open at the drain deadline and were closed.
    pub forced: usize,
}

impl TcpBalancer {
    /// Checks the configuration and builds the strategy table. Install a metrics recorder first if you
    /// want metrics (see [`crate::metrics`]).
    pub fn new(config: BalancerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let backends = config
            .backends
            .iter()
            .map(|b| Arc::new(Backend::new(&b.name, b.addr, b.weight)))
            .collect();
        let seed = config.seed.unwrap_or_else(rand::random);
        let selector = Selector::new(Table::new(backends), config.strategy, seed);
        let limit = Arc::new(Semaphore::new(config.max_connections));
        let shared = Shared {
            config,
            selector,
            metrics: GlobalMetrics::register(),
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            limit,
            local_addr: OnceLock::new(),
            last_no_backend_log: AtomicU64::new(0),
        };
        Ok(TcpBalancer {
            shared: Arc::new(shared),
        })
    }

    /// A handle for stats and shutdown.
    pub fn handle(&self) -> BalancerHandle {
        BalancerHandle {
            shared: self.shared.clone(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &BalancerConfig {
        &self.shared.config
    }

    /// Accepts and carries connections on `listener` until `shutdown` completes or
    /// [`BalancerHandle::shutdown`] is called; then stops accepting at once (the listener is closed, so new
    /// connects are refused), waits for connections in flight up to the drain timeout, closes what is
    /// left, and returns.
    ///
    /// Errors from `accept()` never end this loop: it backs off briefly and goes on.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<ShutdownReport> {
        let shared = self.shared;
        let addr = listener.local_addr()?;
        let _ = shared.local_addr.set(addr);
        #[cfg(unix)]
        set_listener_nodelay(&listener);
        tracing::info!(
            listen = %addr,
            strategy = %shared.selector.strategy(),
            backends = shared.config.backends.len(),
            max_connections = shared.config.max_connections,
            "balancer accepting connections"
        );

        tokio::pin!(shutdown);
        tokio::select! {
            () = accept_loop(&shared, &listener) => {}
            () = &mut shutdown => {}
            () = shared.shutdown.cancelled() => {}
        }
        drop(listener);
        Ok(drain(&shared).await)
    }

    /// Like [`serve`](Self::serve), on [`listeners.threads()`](crate::PerCoreListeners::threads) threads
    /// that each run a current-thread Tokio runtime of their own and accept on a listener of their own;
    /// the kernel spreads new connections over the listeners (`SO_REUSEPORT`), and a connection stays on the
    /// thread that accepted it. Everything else is shared: strategy table, backends, metrics, the
    /// connection limit, the [`BalancerHandle`].
    ///
    /// Call it from any Tokio runtime (a current-thread one is enough): it only waits for `shutdown`, then
    /// runs the drain. Shutdown is the same as for [`serve`](Self::serve): every listener is closed at
    /// once, connections in flight drain up to the drain timeout, the rest are closed, one
    /// [`ShutdownReport`]. The threads have exited when it returns. If a thread fails (it cannot register
    /// its listener, or it panics), the whole balancer shuts down the same way and an error is returned.
    ///
    /// ```no_run
    /// use std::num::NonZeroUsize;
    /// use ulb_tcp::{BackendConfig, BalancerConfig, PerCoreListeners, TcpBalancer};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let balancer = TcpBalancer::new(BalancerConfig::new([BackendConfig::new("127.0.0.1:8081".parse()?)]))?;
    /// let threads = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    /// let listeners = PerCoreListeners::bind("127.0.0.1:3000".parse()?, threads)?;
    /// let report = balancer
    ///     .serve_per_core(listeners, async { let _ = tokio::signal::ctrl_c().await; })
    ///     .await?;
    /// println!("{} connections were cut at the drain deadline", report.forced);
    /// # Ok(()) }
    /// ```
    #[cfg(target_os = "linux")]
    pub async fn serve_per_core(
        self,
        listeners: crate::PerCoreListeners,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<ShutdownReport> {
        crate::per_core::serve(self.shared, listeners, shutdown).await
    }
}

/// The second half of every shutdown, once no listener accepts any more: waits for the connections in
/// flight up to the drain timeout, closes what is left, and says what it did.
pub(crate) async fn drain(shared: &Shared) -> ShutdownReport {
    shared.shutdown.cancel();
    shared.tracker.close();

    let in_flight = shared.tracker.len();
    let drain = shared.config.drain_timeout;
    tracing::info!(in_flight, drain_timeout = ?drain, "stopped accepting; draining connections");
    let mut forced = 0;
    if tokio::time::timeout(drain, shared.tracker.wait())
        .await
        .is_err()
    {
        forced = shared.tracker.len();
        tracing::warn!(
            forced,
            "drain deadline passed; closing the connections still open"
        );
        shared.hard_stop.cancel();
        shared.tracker.wait().await;
    }
    tracing::info!(in_flight, forced, "balancer stopped");
    ShutdownReport { in_flight, forced }
}

/// Never returns: shutdown is handled by the caller's `select!`, which drops this future.
async fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut backoff = Duration::ZERO;
    loop {
        // At the limit, wait here: new clients queue in the kernel's backlog rather than being accepted
        // and starved.
        let Ok(permit) = shared.limit.clone().acquire_owned().await else {
            return; // the semaphore is never closed
        };
        let accepted = listener.accept().await;
        if let Some(pause) = on_accept(shared, accepted, permit, &mut backoff) {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Spawns the connection a successful `accept()` returned, under `permit`; after a failed one, gives the
/// permit back and says how long to pause, if at all (see [`accept_failed`]).
pub(crate) fn on_accept(
    shared: &Arc<Shared>,
    accepted: io::Result<(tokio::net::TcpStream, SocketAddr)>,
    permit: tokio::sync::OwnedSemaphorePermit,
    backoff: &mut Duration,
) -> Option<Duration> {
    match accepted {
        Ok((stream, peer)) => {
            *backoff = Duration::ZERO;
            shared.tracker.spawn(crate::proxy::serve_connection(
                shared.clone(),
                stream,
                peer,
                permit,
            ));
            None
        }
        Err(e) => accept_failed(shared, &e, backoff),
    }
}

/// Counts and logs a failed `accept()`. Returns how long to pause when resources ran out (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM), so that connections in flight can finish and free them; `None` when the error
/// concerned only the connection being accepted. Never spin, never exit.
pub(crate) fn accept_failed(
    shared: &Shared,
    e: &io::Error,
    backoff: &mut Duration,
) -> Option<Duration> {
    shared.metrics.accept_errors.increment(1);
    if is_per_connection(e) {
        tracing::debug!(error = %e, "accept failed for one connection");
        return None;
    }
    *backoff = (*backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
    tracing::warn!(error = %e, pause_ms = backoff.as_millis() as u64, "accept failed; pausing");
    Some(*backoff)
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

impl BalancerHandle {
    /// Starts a graceful shutdown: accepting stops at once, connections in flight drain.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// True once a shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// Resolves once a shutdown has begun.
    pub async fn shutting_down(&self) {
        self.shared.shutdown.cancelled().await
    }

    /// The address being served, once [`TcpBalancer::serve`] has started.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.local_addr.get().copied()
    }

    /// The strategy in force.
    pub fn strategy(&self) -> Strategy {
        self.shared.selector.strategy()
    }

    /// Client connections being carried now (including those still connecting to a backend).
    pub fn active_connections(&self) -> usize {
        self.shared.tracker.len()
    }

    /// Takes the backend at `addr` out of rotation (`enabled = false`: no new connections; open ones carry
    /// on) or puts it back. Returns `false` if no backend has that address.
    pub fn set_backend_enabled(&self, addr: SocketAddr, enabled: bool) -> bool {
        let table = self.shared.selector.table();
        let mut found = false;
        for b in table.backends.iter().filter(|b| b.addr() == addr) {
            b.set_enabled(enabled);
            found = true;
        }
        table.availability_changed();
        found
    }

    /// Live state of the backend at `addr`.
    pub fn backend(&self, addr: SocketAddr) -> Option<BackendStats> {
        let table = self.shared.selector.table();
        let found = table.backends.iter().find(|b| b.addr() == addr);
        found.map(|b| b.stats())
    }

    /// Live per-backend state, in configuration order.
    pub fn backends(&self) -> Vec<BackendStats> {
        self.shared
            .selector
            .table()
            .backends
            .iter()
            .map(|b| b.stats())
            .collect()
    }
}

/// Binds a listening socket the way the balancer wants it: `SO_REUSEADDR`, a deep backlog (so that clients
/// held back by the connection limit wait in the kernel), non-blocking. Must be called inside a Tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Sets `TCP_NODELAY` on a listening socket: on Linux every socket it accepts inherits it, so connections
/// need no `setsockopt` of their own. Best effort; elsewhere each connection sets it.
#[cfg(unix)]
fn set_listener_nodelay(listener: &impl std::os::fd::AsFd) {
    if let Err(e) = socket2::SockRef::from(listener).set_tcp_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on the listener");
    }
}
