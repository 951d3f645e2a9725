//! The server: [`TcpBalancer`], its accept loops, the connection limit and graceful shutdown.
//!
//! * `accept`: the accept loop of [`TcpBalancer::serve`], and what every accept loop does with a new
//!   connection or a failed `accept()`.
//! * `per_core`: [`TcpBalancer::serve_per_core`], one current-thread runtime and listener per thread.
//! * `drain`: the second half of every shutdown.
//! * `handle`: [`BalancerHandle`]: live state, runtime changes to the backends, events, shutdown.
//! * `listen`: binding listeners the way the balancer wants them.

mod accept;
mod background;
mod drain;
mod handle;
mod listen;
mod listening;
#[cfg(target_os = "linux")]
mod per_core;
#[cfg(target_os = "linux")]
mod threads;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Policy;
use crate::backend::Registry;
use crate::config::{BalancerConfig, ConfigError};
use crate::proxy::{Context, Settings};

pub use handle::{BalancerHandle, Drain};
pub use listen::bind;
pub use listening::{Bound, Listening};
#[cfg(target_os = "linux")]
pub use per_core::PerCoreListeners;
#[cfg(target_os = "linux")]
pub use threads::ServingThreads;

/// The most serving threads (`PerCoreListeners::bind`, the command's `--threads`).
pub const MAX_THREADS: usize = 1024;

/// State shared by the accept loops, the handles and the drain. Connections see only `ctx`.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: BalancerConfig,
    /// What every connection shares (settings, backends, counters, the hard stop).
    pub(crate) ctx: Arc<Context>,
    /// Fired to stop accepting and begin the drain.
    pub(crate) shutdown: CancellationToken,
    /// Every connection task, on whichever runtime it runs.
    pub(crate) tracker: TaskTracker,
    /// The connection limit: a permit per connection carried.
    pub(crate) limit: Arc<Semaphore>,
    /// The addresses accepted on now, in the order their listeners were attached (one entry per
    /// accept loop: the per-core listeners of one address count once).
    pub(crate) listeners: Mutex<Vec<SocketAddr>>,
}

impl Shared {
    /// Records that a listener on `addr` started (`true`) or stopped accepting.
    pub(crate) fn listening(&self, addr: SocketAddr, on: bool) {
        let mut all = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            all.push(addr);
        } else if let Some(i) = all.iter().position(|a| *a == addr) {
            all.remove(i);
        }
    }

    pub(crate) fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
///     println!("{}: {} connections in total", b.id, b.total);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TcpBalancer {
    shared: Arc<Shared>,
}

/// What a graceful shutdown did, returned by [`TcpBalancer::serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
        let hard_stop = CancellationToken::new();
        let seed = config.seed.unwrap_or_else(rand::random);
        let policy = Policy {
            passive: config.health.clone(),
            probe_stale: config
                .connect_timeout
                .saturating_add(Duration::from_secs(1)),
            slow_start: config.slow_start,
            on_down: config.on_down,
            checked: config.is_checked(),
            service: config.service.as_deref().map(Arc::from),
        };
        let registry = Registry::new(
            config.strategy,
            seed,
            &config.backends,
            policy,
            hard_stop.clone(),
        );
        let ctx = Context::new(Settings::from(&config), Arc::new(registry), hard_stop);
        let limit = Arc::new(Semaphore::new(config.max_connections));
        let shared = Shared {
            config,
            ctx: Arc::new(ctx),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            limit,
            listeners: Mutex::new(Vec::new()),
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

    /// The configuration it was built with. The backends listed there are those it started with; the
    /// handle's [`backends`](BalancerHandle::backends) has the live set.
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
        #[cfg(unix)]
        listen::prepare(&listener, &shared.config)?;
        shared.listening(addr, true);
        tracing::info!(
            listen = %addr,
            strategy = %shared.ctx.backends.strategy(),
            backends = shared.config.backends.len(),
            max_connections = shared.config.max_connections,
            "balancer accepting connections"
        );

        tokio::pin!(shutdown);
        tokio::select! {
            () = accept::accept_loop(&shared, &listener) => {}
            () = background::run(&shared) => {}
            () = &mut shutdown => {}
            () = shared.shutdown.cancelled() => {}
        }
        drop(listener);
        Ok(drain::drain(&shared).await)
    }

    /// Runs the balancer with the listeners attached through [`BalancerHandle::accept_on`], before or
    /// while it runs, until `shutdown` completes or [`BalancerHandle::shutdown`] is called; then every
    /// accept loop stops at once, connections in flight drain up to the drain timeout, what is left is
    /// closed, and it returns. A listener socket closes once its last [`Listening`] and every other
    /// holder of it are dropped: the caller owns that moment (a configuration reload hands a listener
    /// over to the next balancer without closing it).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> ShutdownReport {
        let shared = self.shared;
        tokio::pin!(shutdown);
        tokio::select! {
            () = background::run(&shared) => {}
            () = &mut shutdown => {}
            () = shared.shutdown.cancelled() => {}
        }
        drain::drain(&shared).await
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
        listeners: PerCoreListeners,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<ShutdownReport> {
        per_core::serve(self.shared, listeners, shutdown).await
    }
}
