//! One client connection, from the accepted socket to its close.
//!
//! * `connect`: pick a backend and connect, retrying on others (`connect_attempts`, each a different one).
//! * `replay`: with a replay limit, keep the client's first bytes until the backend answers, and give them
//!   to another backend if it goes away first.
//! * `duplex` and `pump`: the two directions, each pumped on its own with half-close, idle and half-close
//!   timeouts; `buffer` (pooled buffers) and `pipe` (`splice(2)` pipes, under a process-wide bound; a
//!   burst that gets no pipe goes through a buffer) move the bytes.
//! * `plain`: Tokio's `copy_bidirectional`, the benchmark baseline.
//!
//! A connection sees only its [`Context`]: the settings of the data path, the service's backends, the
//! balancer-wide counters and the hard stop; never the server's own state.
//!
//! How a connection ends:
//! * both directions saw EOF → both sockets are closed normally;
//! * a read or write error on either side (a reset, a broken pipe) → both sockets are *aborted* (RST), so
//!   that a reset is passed on as a reset and never turns into a clean end of a truncated stream;
//! * no bytes either way for the idle timeout (or the shorter half-close timeout once one direction has
//!   ended), the drain deadline of a shutdown, or a reset of its backend's connections → both sockets are
//!   aborted, for the same reason.

mod buffer;
mod connect;
mod duplex;
mod front;
#[cfg(target_os = "linux")]
mod pipe;
mod plain;
mod pump;
mod replay;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::Registry;
use crate::clock::OncePerSecond;
use crate::config::{BalancerConfig, CopyMode};
use crate::edge::{AcceptProxy, Acl, Limiter, ProxyVersion};
use crate::metrics::GlobalMetrics;
use crate::trigger::Trigger;

/// The settings of the data path, taken from the [`BalancerConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) connect_timeout: Duration,
    pub(crate) connect_attempts: u32,
    pub(crate) idle_timeout: Duration,
    pub(crate) half_close_timeout: Duration,
    pub(crate) buffer_size: usize,
    pub(crate) max_pipes: usize,
    pub(crate) copy_mode: CopyMode,
    pub(crate) replay_limit: usize,
    pub(crate) max_queue: usize,
    pub(crate) queue_timeout: Duration,
    pub(crate) send_proxy: Option<ProxyVersion>,
    pub(crate) send_proxy_tlvs: bool,
    pub(crate) accept_proxy: Option<Arc<AcceptProxy>>,
    /// `None` when both lists are empty.
    pub(crate) acl: Option<Arc<Acl>>,
    /// `None` when no per-source limit is set.
    pub(crate) limiter: Option<Arc<Limiter>>,
}

impl From<&BalancerConfig> for Settings {
    fn from(c: &BalancerConfig) -> Self {
        Settings {
            connect_timeout: c.connect_timeout,
            connect_attempts: c.connect_attempts,
            idle_timeout: c.idle_timeout,
            half_close_timeout: c.half_close_timeout,
            buffer_size: c.buffer_size,
            max_pipes: c.max_pipes,
            copy_mode: c.copy_mode,
            replay_limit: c.replay_limit,
            max_queue: c.max_queue,
            queue_timeout: c.queue_timeout,
            send_proxy: c.send_proxy,
            send_proxy_tlvs: c.send_proxy_tlvs,
            accept_proxy: c.accept_proxy.clone().map(Arc::new),
            acl: Some(Acl::new(&c.allow, &c.deny))
                .filter(|acl| !acl.is_empty())
                .map(Arc::new),
            limiter: Limiter::new(c.source_limits),
        }
    }
}

/// What every connection of one service shares: its settings, its backends, the counters that do not
/// depend on a backend, and the balancer's hard stop.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) settings: Settings,
    pub(crate) backends: Arc<Registry>,
    pub(crate) metrics: GlobalMetrics,
    /// Fired at the drain deadline: connections still open are reset. Its token is the parent of every
    /// backend's cut token.
    pub(crate) hard_stop: Trigger,
    /// Opens for the warning of a client that could not be carried, once a second at most.
    refusal_log: OncePerSecond,
}

impl Context {
    pub(crate) fn new(
        settings: Settings,
        backends: Arc<Registry>,
        hard_stop: CancellationToken,
    ) -> Self {
        let hard_stop = Trigger::new(hard_stop);
        Context {
            settings,
            backends,
            metrics: GlobalMetrics::register(),
            hard_stop,
            refusal_log: OncePerSecond::new(),
        }
    }

    /// At most one warning a second about clients that could not be carried (no backend reachable,
    /// descriptors exhausted), so that an outage does not flood the log.
    pub(crate) fn should_log_refusal(&self) -> bool {
        self.refusal_log.open()
    }

    /// Why a connection's cut token fired: the hard stop, or a reset of its backend's connections.
    fn cut_reason(&self) -> End {
        if self.hard_stop.is_fired() {
            End::DrainDeadline
        } else {
            End::Cut
        }
    }
}

/// Carries one accepted client connection to its end. `_permit` holds its place under the connection limit.
pub(crate) async fn serve_connection(
    ctx: Arc<Context>,
    mut client: TcpStream,
    mut peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    // On Linux the accepted socket inherits TCP_NODELAY from the listener (set once by `serve`), which
    // saves a system call per connection. Elsewhere, best effort: a client that already left makes this
    // fail, and the first read will say so.
    #[cfg(not(target_os = "linux"))]
    let _ = client.set_nodelay(true);

    // The PROXY protocol, when on: the client's address from its header, and the header to send on.
    let mut hello = Vec::new();
    if ctx.settings.accept_proxy.is_some() || ctx.settings.send_proxy.is_some() {
        let front = tokio::select! {
            f = Box::pin(front::admit(&ctx, &mut client, peer)) => f,
            () = ctx.hard_stop.token().cancelled() => None,
        };
        let Some(front) = front else {
            abort(&client);
            return;
        };
        (peer, hello) = (front.client, front.hello);
    }

    // Allow and deny lists, per-source limits: on the client's address, before any backend is touched.
    // The guard holds this connection's place in its source's count until it ends.
    let _source = if ctx.settings.acl.is_some() || ctx.settings.limiter.is_some() {
        match front::check_source(&ctx, peer) {
            Ok(guard) => guard,
            Err(()) => {
                abort(&client);
                return;
            }
        }
    } else {
        None
    };

    let mut tried = Vec::new();
    let connected = tokio::select! {
        c = connect::connect(&ctx, peer, &hello, &mut tried) => c,
        () = ctx.hard_stop.token().cancelled() => None,
    };
    let Some((backend, guard)) = connected else {
        abort(&client);
        return;
    };

    let counts = Counts::default();
    let (mut backend, guard, client_ended) = if ctx.settings.replay_limit == 0 {
        (backend, guard, false)
    } else {
        // Boxed: kept inline, its state would enlarge every connection's task, replay or not.
        let answered = Box::pin(replay::until_answered(
            &ctx,
            (peer, &hello),
            &mut client,
            backend,
            guard,
            tried,
            &counts,
        ));
        match answered.await {
            Ok(answered) => answered,
            Err(end) => {
                abort(&client);
                tracing::debug!(client = %peer, end = %end, "connection closed before any backend answered");
                return;
            }
        }
    };
    // Fired by the balancer's hard stop (the drain deadline), or to reset this backend's connections (a
    // removal's deadline, the operator). Polled on every wake-up of this task: it reads two flags.
    let trigger = guard.backend().cut_trigger();
    let cut = trigger.wait(&ctx.hard_stop);
    let end = match ctx.settings.copy_mode {
        CopyMode::Plain => tokio::select! {
            end = plain::copy(&mut client, &mut backend, guard.backend(), &counts) => end,
            () = cut => ctx.cut_reason(),
        },
        _ => tokio::select! {
            end = duplex::splice(&ctx, &mut client, &mut backend, guard.backend(), &counts, client_ended) => end,
            () = cut => ctx.cut_reason(),
        },
    };
    if !matches!(end, End::Closed) {
        abort(&client);
        abort(&backend);
    }
    let duration = started.elapsed();
    ctx.metrics
        .connection_duration
        .record(duration.as_secs_f64());
    tracing::debug!(
        client = %peer,
        backend = %guard.backend().id(),
        bytes_to_backend = counts.to_backend.load(Relaxed),
        bytes_to_client = counts.to_client.load(Relaxed),
        duration_ms = duration.as_millis() as u64,
        end = %end,
        "connection closed"
    );
}

/// Closes a socket with a reset (SO_LINGER 0) instead of a FIN.
pub(crate) fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Bytes carried by one connection, per direction.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) to_backend: AtomicU64,
    pub(crate) to_client: AtomicU64,
}

/// Which side of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Backend,
}

/// How a spliced connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Both directions ended with a FIN that was passed on.
    Closed,
    /// No bytes either way for the idle (or half-close) timeout.
    Idle { half_closed: bool },
    /// Reading from `side` failed (a reset, typically).
    ReadFailed(Side, io::Error),
    /// Writing to `side` failed (it is gone).
    WriteFailed(Side, io::Error),
    /// The plain path's copy failed on one side or the other.
    CopyFailed(io::Error),
    /// A shutdown's drain deadline passed.
    DrainDeadline,
    /// The backend's connections were reset: its removal's deadline passed, or the operator asked.
    Cut,
    /// Replay was on, and no backend answered: each closed before its first byte, or none could be
    /// connected.
    NoAnswer,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::Idle { half_closed: false } => f.write_str("idle timeout"),
            End::Idle { half_closed: true } => f.write_str("half-close timeout"),
            End::ReadFailed(side, e) => write!(f, "read from {side:?} failed: {e}"),
            End::WriteFailed(side, e) => write!(f, "write to {side:?} failed: {e}"),
            End::CopyFailed(e) => write!(f, "copy failed: {e}"),
            End::DrainDeadline => f.write_str("closed at the drain deadline"),
            End::Cut => f.write_str("reset with the backend's connections"),
            End::NoAnswer => f.write_str("no backend answered"),
        }
    }
}
