//! Per-core serving: N threads, each with a current-thread Tokio runtime of its own and a listener of its
//! own on the one address (`SO_REUSEPORT`: the kernel spreads new connections over the listeners), all
//! sharing the balancer's state (strategy table, backends, metrics, connection limit, task tracker).
//!
//! A connection lives its whole life on the thread that accepted it: no task moves between threads, and
//! the per-thread buffer and pipe pools of the data path are used by one thread each.
//!
//! Shutdown keeps the semantics of [`TcpBalancer::serve`](crate::TcpBalancer::serve): the control future
//! (on the caller's runtime) fires the shutdown token; every thread closes its listener at once and says
//! so; once all have, the shared drain runs (deadline, hard stop, one report); each thread keeps driving
//! its connections until the last connection of the balancer has ended, then drops its runtime and exits.
//!
//! A connection still queued in a listener's backlog when that listener is closed is reset by the kernel.
//! Listeners are therefore closed only at shutdown (when accepting stops anyway) or when their thread
//! fails, which ends the whole balancer.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::accept::on_accept;
use super::drain::drain;
use super::{Shared, ShutdownReport, MAX_THREADS};

/// One listening socket per thread, all bound to the same address with `SO_REUSEPORT`, ready for
/// [`TcpBalancer::serve_per_core`](crate::TcpBalancer::serve_per_core).
///
/// The sockets listen from the moment they are bound (clients queue in their backlogs until serving
/// starts), so tests can bind port 0, read [`local_addr`](Self::local_addr) and connect.
#[derive(Debug)]
pub struct PerCoreListeners {
    sockets: Vec<Socket>,
    addr: SocketAddr,
}

impl PerCoreListeners {
    /// Binds `threads` listeners to `addr` (each with `SO_REUSEADDR`, `SO_REUSEPORT` and a backlog of
    /// 4096, like [`bind`](crate::bind)). With port 0 the first one gets a free port from the kernel and the
    /// others bind to that port.
    ///
    /// Fails with `AddrInUse` when anything else listens on the address, even another process's
    /// `SO_REUSEPORT` listener (which would otherwise silently take a share of the clients), and with
    /// `InvalidInput` for 0 threads or more than [`MAX_THREADS`].
    pub fn bind(addr: SocketAddr, threads: NonZeroUsize) -> io::Result<Self> {
        if threads.get() > MAX_THREADS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{threads} threads is more than {MAX_THREADS}"),
            ));
        }
        if addr.port() != 0 {
            refuse_if_taken(addr)?;
        }
        let first = listen_reuseport(addr)?;
        let addr = first
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("the listener has no IP address"))?;
        let mut sockets = Vec::with_capacity(threads.get());
        sockets.push(first);
        for _ in 1..threads.get() {
            sockets.push(listen_reuseport(addr)?);
        }
        Ok(PerCoreListeners { sockets, addr })
    }

    /// The address bound (with the port the kernel chose, if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many listeners, hence serving threads.
    pub fn threads(&self) -> usize {
        self.sockets.len()
    }

    /// The listener of thread `i`, duplicated: an accept loop registers the duplicate with its own
    /// thread's runtime, and closing it leaves the listener open for its other holders.
    pub(crate) fn duplicate(&self, i: usize) -> io::Result<Socket> {
        let socket = self.sockets.get(i).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no listener {i}"))
        })?;
        let dup = socket.try_clone()?;
        dup.set_cloexec(true)?;
        Ok(dup)
    }
}

/// Binding a socket without `SO_REUSEPORT` fails if anything listens on `addr`, `SO_REUSEPORT` or not.
/// The probe is closed at once; it never listens.
fn refuse_if_taken(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())
}

fn listen_reuseport(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Inherited by every accepted socket on Linux (the only platform of this mode).
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket)
}

/// What a serving thread tells the control future, from `Drop` so that it is told on a panic too.
#[derive(Debug, Clone, Copy)]
struct Event {
    thread: usize,
    stage: Stage,
    panicked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The thread's listener is closed: it accepts no more.
    Closed,
    /// The thread has dropped its runtime and is about to exit.
    Exited,
}

/// Sends `Event { thread, stage, .. }` when dropped.
struct Notify {
    events: UnboundedSender<Event>,
    thread: usize,
    stage: Stage,
}

impl Drop for Notify {
    fn drop(&mut self) {
        let _ = self.events.send(Event {
            thread: self.thread,
            stage: self.stage,
            panicked: std::thread::panicking(),
        });
    }
}

/// Armed until the drain is done: if the control future is dropped before that, the threads must still
/// end, so it stops accepting, closes every connection and closes the tracker the threads wait on.
struct StopOnDrop<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.shutdown.cancel();
            self.shared.ctx.hard_stop.fire();
            self.shared.tracker.close();
        }
    }
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listeners: PerCoreListeners,
    shutdown: impl Future<Output = ()>,
) -> io::Result<ShutdownReport> {
    let PerCoreListeners { sockets, addr } = listeners;
    for socket in &sockets {
        super::listen::prepare(socket, &shared.config)?;
    }
    let threads = sockets.len();
    shared.listening(addr, true);
    // Every runtime is built before any thread starts, so that this failure leaves nothing running.
    let runtimes = (0..threads)
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .collect::<io::Result<Vec<Runtime>>>()?;

    let mut stop_on_drop = StopOnDrop {
        shared: &shared,
        armed: true,
    };
    let (events_tx, mut events) = unbounded_channel();
    let mut started = 0;
    let mut failure: Option<io::Error> = None;
    for (i, (socket, runtime)) in sockets.into_iter().zip(runtimes).enumerate() {
        let (shared, events) = (shared.clone(), events_tx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("ulb-tcp-{i}"))
            .spawn(move || run_thread(i, runtime, socket, shared, events));
        match spawned {
            Ok(_) => started += 1,
            Err(e) => {
                // The listeners of the threads not started are closed here, before serving began.
                failure = Some(io::Error::new(
                    e.kind(),
                    format!("cannot start serving thread {i}: {e}"),
                ));
                break;
            }
        }
    }
    drop(events_tx);

    tracing::info!(
        listen = %addr,
        threads = started,
        strategy = %shared.ctx.backends.strategy(),
        backends = shared.config.backends.len(),
        max_connections = shared.config.max_connections,
        "balancer accepting connections (per-core runtimes)"
    );
    let mut closed = 0;
    if failure.is_none() {
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {}
            () = shared.shutdown.cancelled() => {}
            () = super::background::run(&shared) => {}
            Some(event) = events.recv() => {
                // A thread's first event is always its listener closing; before any shutdown, it failed.
                // Stop them all.
                closed += usize::from(event.stage == Stage::Closed);
                if event.panicked || !shared.shutdown.is_cancelled() {
                    failure = Some(unexpected(event));
                }
            }
        }
    }
    shared.shutdown.cancel();
    // Only once every listener is closed do new connects meet a refusal; then the drain starts.
    while closed < started {
        let Some(event) = events.recv().await else {
            break;
        };
        // (A thread that panicked may exit before the others have closed their listeners.)
        closed += usize::from(event.stage == Stage::Closed);
        if event.panicked {
            failure.get_or_insert_with(|| unexpected(event));
        }
    }
    let report = drain(&shared).await;
    stop_on_drop.armed = false;
    // Each thread ends once the tracker is closed and empty, which it now is.
    while let Some(event) = events.recv().await {
        if event.panicked {
            failure.get_or_insert_with(|| unexpected(event));
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

fn unexpected(event: Event) -> io::Error {
    let thread = event.thread;
    let why = if event.panicked { "panicked" } else { "failed" };
    tracing::error!(thread, "serving thread {why}; shutting the balancer down");
    io::Error::other(format!("serving thread {thread} {why}"))
}

/// The body of serving thread `i`.
fn run_thread(
    i: usize,
    runtime: Runtime,
    socket: Socket,
    shared: Arc<Shared>,
    events: UnboundedSender<Event>,
) {
    let _exited = Notify {
        events: events.clone(),
        thread: i,
        stage: Stage::Exited,
    };
    runtime.block_on(async {
        let closed = Notify {
            events,
            thread: i,
            stage: Stage::Closed,
        };
        // SAFETY: the `AsyncFd` takes ownership of the `Socket`, which owns its descriptor and closes it only
        // when dropped, so the descriptor stays open and the same for the `AsyncFd`'s whole life.
        let registered = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) };
        match registered {
            Ok(listener) => {
                tokio::select! {
                    () = accept_loop(&shared, &listener) => {}
                    () = shared.shutdown.cancelled() => {}
                }
            }
            Err(e) => tracing::error!(thread = i, error = %e, "cannot register the listener"),
        }
        drop(closed);
        // Carry this thread's connections until every connection of the balancer has ended.
        shared.tracker.wait().await;
    });
    drop(runtime);
}

/// Returns only if the runtime's I/O driver fails; shutdown is handled by the caller's `select!`.
pub(super) async fn accept_loop(shared: &Arc<Shared>, listener: &AsyncFd<Socket>) {
    let mut backoff = Duration::ZERO;
    loop {
        // Wait for a client first, and only then for a permit under the connection limit: a thread that
        // held a permit while its own backlog was empty would keep it from a thread with a client waiting.
        // At the limit, clients wait in the kernel's backlog rather than being accepted and starved.
        let Ok(mut ready) = listener.readable().await else {
            return;
        };
        let Ok(permit) = shared.limit.clone().acquire_owned().await else {
            return; // the semaphore is never closed
        };
        let accepted = match ready.try_io(|l| {
            l.get_ref()
                .accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        }) {
            Ok(result) => result.and_then(register),
            Err(_would_block) => continue, // the backlog is empty; readiness is cleared
        };
        if let Some(pause) = on_accept(shared, accepted, permit, &mut backoff) {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Registers an accepted socket (`accept4` made it non-blocking and close-on-exec: the one system call
/// Tokio's own listener makes) with this thread's runtime.
fn register((socket, peer): (Socket, SockAddr)) -> io::Result<(TcpStream, SocketAddr)> {
    let peer = peer.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the peer has no IP address",
        )
    })?;
    Ok((TcpStream::from_std(socket.into())?, peer))
}
