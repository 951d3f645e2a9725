//! Listeners attached to a running balancer: [`BalancerHandle::accept_on`] (on the current runtime) and
//! [`BalancerHandle::accept_on_threads`] (per-core, on [`ServingThreads`]) start accepting on a bound
//! listener, [`Listening::close`] stops it, and the balancer's shutdown stops them all. A configuration
//! reload adds and removes listeners this way while the others go on, and hands a listener from one
//! balancer to its successor without ever closing it (a closed listener resets the clients queued in its
//! backlog).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{accept, BalancerHandle, Shared};
#[cfg(target_os = "linux")]
use super::{PerCoreListeners, ServingThreads};

/// A bound listener that balancers accept on, shared: one Tokio listener, or one `SO_REUSEPORT`
/// listener per serving thread. The sockets close when the last holder drops it.
#[derive(Debug, Clone)]
pub enum Bound {
    /// For [`BalancerHandle::accept_on`].
    One(Arc<TcpListener>),
    /// For [`BalancerHandle::accept_on_threads`].
    #[cfg(target_os = "linux")]
    PerCore(Arc<PerCoreListeners>),
}

impl Bound {
    /// The address bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Bound::One(l) => l.local_addr(),
            #[cfg(target_os = "linux")]
            Bound::PerCore(p) => Ok(p.local_addr()),
        }
    }
}

/// The accept loops of a balancer on one listener. Dropping it leaves them running until the balancer
/// shuts down; [`close`](Listening::close) stops them sooner.
#[derive(Debug)]
pub struct Listening {
    bound: Bound,
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Listening {
    /// The address it accepts on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listener, for another balancer to accept on: a listener handed over that way is never
    /// closed, so no client queued in its backlog is lost.
    pub fn listener(&self) -> Bound {
        self.bound.clone()
    }

    /// Stops accepting on this listener; resolves once its loops have ended. Connections they accepted
    /// go on. The socket closes (new connects are refused) once no other holder is left.
    pub async fn close(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// One accept loop's life: until it is closed or the balancer shuts down.
async fn run_loop(
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
    accepting: impl std::future::Future<Output = ()>,
    last: bool,
) {
    tokio::select! {
        () = accepting => {}
        () = stop.cancelled() => {}
        () = shared.shutdown.cancelled() => {}
    }
    // Closed on its own (not by the shutdown, after which the addresses stay on show).
    if last && !shared.shutdown.is_cancelled() {
        shared.listening(addr, false);
    }
}

impl BalancerHandle {
    /// Accepts and carries connections on `listener` too, on the current Tokio runtime, until the
    /// balancer shuts down or the returned [`Listening`] is closed. With
    /// [`TcpBalancer::run`](super::TcpBalancer::run), every listener is attached this way or with
    /// [`accept_on_threads`](Self::accept_on_threads).
    ///
    /// Errors from `accept()` never end the loop: it backs off briefly and goes on. Must be called
    /// inside a Tokio runtime.
    pub fn accept_on(&self, listener: Arc<TcpListener>) -> io::Result<Listening> {
        let addr = listener.local_addr()?;
        #[cfg(unix)]
        super::listen::prepare(&*listener, &self.shared.config)?;
        self.shared.listening(addr, true);
        let stop = CancellationToken::new();
        let (shared, l) = (self.shared.clone(), listener.clone());
        let task = tokio::spawn(run_loop(
            self.shared.clone(),
            addr,
            stop.clone(),
            async move { accept::accept_loop(&shared, &l).await },
            true,
        ));
        tracing::info!(listen = %addr, "accepting connections");
        Ok(Listening {
            bound: Bound::One(listener),
            addr,
            stop,
            tasks: vec![task],
        })
    }

    /// Accepts on per-core `listeners`, listener `i` on serving thread `i` of `threads` (so there must
    /// be as many listeners as threads), until the balancer shuts down or the returned [`Listening`] is
    /// closed. Each loop registers a duplicate of its thread's listener with that thread's runtime, so a
    /// balancer that stops accepting leaves the listener open for the next.
    #[cfg(target_os = "linux")]
    pub fn accept_on_threads(
        &self,
        listeners: Arc<PerCoreListeners>,
        threads: &ServingThreads,
    ) -> io::Result<Listening> {
        use tokio::io::unix::AsyncFd;
        use tokio::io::Interest;
        let addr = listeners.local_addr();
        if listeners.threads() != threads.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} listeners on {addr} for {} serving threads",
                    listeners.threads(),
                    threads.len()
                ),
            ));
        }
        let dups = (0..threads.len())
            .map(|i| {
                let dup = listeners.duplicate(i)?;
                super::listen::prepare(&dup, &self.shared.config)?;
                Ok(dup)
            })
            .collect::<io::Result<Vec<_>>>()?;
        self.shared.listening(addr, true);
        let stop = CancellationToken::new();
        let mut tasks = Vec::with_capacity(dups.len());
        for (i, (dup, runtime)) in dups.into_iter().zip(threads.handles()).enumerate() {
            let shared = self.shared.clone();
            tasks.push(runtime.spawn(run_loop(
                self.shared.clone(),
                addr,
                stop.clone(),
                async move {
                    // Registered here, on the serving thread's own runtime.
                    // SAFETY: the `AsyncFd` takes ownership of the duplicated `Socket`, which owns its
                    // descriptor and closes it only when dropped, so the descriptor stays open and the
                    // same for the `AsyncFd`'s whole life.
                    let registered =
                        unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) };
                    match registered {
                        Ok(fd) => super::per_core::accept_loop(&shared, &fd).await,
                        Err(e) => {
                            tracing::error!(thread = i, error = %e, "cannot register a listener");
                        }
                    }
                },
                i == 0,
            )));
        }
        tracing::info!(listen = %addr, threads = threads.len(), "accepting connections (per-core)");
        Ok(Listening {
            bound: Bound::PerCore(listeners),
            addr,
            stop,
            tasks,
        })
    }

    /// The addresses the balancer accepts on now.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.shared.listen_addrs()
    }
}
