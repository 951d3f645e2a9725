//! Picking a backend and connecting to it, with retries on other backends.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Context;
use crate::backend::{ActiveGuard, Backend, Place};
use crate::metrics::ConnectFailure;

/// Tries backends until one connects, never one in `tried` (those that already failed this client), for
/// at most `connect_attempts` connects. `None` once the client must be closed: every backend tried
/// failed, none was available, its wait in the queue ran out, or this host ran out of descriptors or
/// ports (which is counted and logged as such, never against a backend).
///
/// A backend the table picks may turn the connection away (its half-open trial is already under way, or
/// another connection took its last slot under its cap): the pick is made again without it. When every
/// backend that may be picked is at its cap, the client waits in the service's queue for a slot, up to
/// the queue timeout.
///
/// `hello` (a PROXY protocol header, or empty) is written on each new backend connection before it is
/// returned, within the same connect timeout; failing to write it fails that connect.
pub(crate) async fn connect(
    ctx: &Context,
    peer: SocketAddr,
    hello: &[u8],
    tried: &mut Vec<Arc<Backend>>,
) -> Option<(TcpStream, ActiveGuard)> {
    let settings = &ctx.settings;
    let queue = ctx.backends.queue();
    let mut attempts = 0;
    let mut passed_over: Vec<Arc<Backend>> = Vec::new();
    // Others wait already: take a place behind them rather than a slot they are waiting for.
    let mut queued: Option<Queued<'_>> = None;
    if queue.len() != 0 {
        queued = Some(Queued::join(ctx, peer)?);
    }
    while attempts < settings.connect_attempts {
        if let Some(q) = &mut queued {
            if !q.wait_turn().await {
                ctx.metrics.rejected_queue_timeout.increment(1);
                log_refusal(ctx, peer, "no slot came free before the queue timeout");
                return None;
            }
        }
        let picked = if passed_over.is_empty() {
            ctx.backends.pick(tried)
        } else {
            let skip: Vec<Arc<Backend>> = tried.iter().chain(&passed_over).cloned().collect();
            ctx.backends.pick(&skip)
        };
        let Some(backend) = picked else {
            if settings.max_queue > 0 && ctx.backends.has_full_backend() {
                if queued.is_none() {
                    queued = Some(Queued::join(ctx, peer)?);
                }
                passed_over.clear();
                continue;
            }
            ctx.metrics.no_backend.increment(1);
            break;
        };
        // The guard counts the connect in progress as load, so least-connections sees it at once.
        let guard = match ActiveGuard::claim(backend) {
            Ok(guard) => guard,
            Err(backend) => {
                passed_over.push(backend);
                continue;
            }
        };
        drop(queued.take());
        attempts += 1;
        let backend = guard.backend();
        let t0 = Instant::now();
        let connecting = async {
            let mut stream = open(backend.addr()).await?;
            if !hello.is_empty() {
                stream.write_all(hello).await?;
            }
            Ok::<_, io::Error>(stream)
        };
        let (reason, error) = match tokio::time::timeout(settings.connect_timeout, connecting).await
        {
            Ok(Ok(stream)) => {
                backend.connect_succeeded();
                backend.metrics.connected_in(t0.elapsed());
                guard.connected();
                let _ = stream.set_nodelay(true);
                return Some((stream, guard));
            }
            Ok(Err(e)) if is_local_exhaustion(&e) => {
                // Out of descriptors or ports here: not the backend's fault, and no other backend would
                // fare better.
                ctx.metrics.rejected_local_resources.increment(1);
                if ctx.should_log_refusal() {
                    tracing::warn!(client = %peer, error = %e,
                        "cannot open a backend connection: this host is out of descriptors or ports; closing client");
                }
                return None;
            }
            Ok(Err(e)) => (classify(&e), e.to_string()),
            Err(_) => (ConnectFailure::Timeout, "connect timed out".to_string()),
        };
        backend.metrics.connect_failed(reason);
        backend.connect_failed(&error);
        tracing::debug!(client = %peer, backend = %backend.who(), reason = reason.as_str(),
            error = %error, "connect to backend failed, trying another");
        tried.push(backend.clone());
    }
    let rejected = if tried.is_empty() {
        &ctx.metrics.rejected_no_backend
    } else {
        &ctx.metrics.rejected_connect_failed
    };
    rejected.increment(1);
    if ctx.should_log_refusal() {
        let tried: Vec<&str> = tried.iter().map(|b| b.id().as_str()).collect();
        tracing::warn!(client = %peer, ?tried, "no backend reachable; closing client");
    }
    None
}

/// Connects to `addr` as `TcpStream::connect` does, less its `getsockopt(SO_ERROR)` after every connect:
/// the readiness event that ends a non-blocking connect already says how it went. A connect that failed
/// (refused, unreachable, reset, timed out in the kernel) is reported with `EPOLLERR` (and `EPOLLHUP`),
/// one that succeeded with `EPOLLOUT` alone, since a socket still in `SYN_SENT` is never writable. Only
/// a failure pays for `SO_ERROR`, to learn its reason. Tokio's `connect` reads `SO_ERROR` on the same
/// event, so the outcome and its classification (refused, timed out, other) are the same.
async fn open(addr: SocketAddr) -> io::Result<TcpStream> {
    // One `socket()` call, non-blocking and close-on-exec from the start.
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() || !ready.is_writable() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "connect failed")));
    }
    Ok(stream)
}

fn log_refusal(ctx: &Context, peer: SocketAddr, why: &str) {
    if ctx.should_log_refusal() {
        tracing::warn!(client = %peer, why, "every backend is at its cap; closing client");
    }
}

/// How often the client at the head of the queue looks for a slot even if it was not woken (a slot can
/// come free without a wake-up: a backend taken back into rotation, a cap raised).
const QUEUE_RECHECK: Duration = Duration::from_millis(50);

/// A client's place in the service's queue, held from its first wait until it leaves (served, timed
/// out, or gone); counted in the queue's length while held.
struct Queued<'a> {
    ctx: &'a Context,
    place: Place<'a>,
    since: Instant,
    /// Woken (or just joined) and not yet tried.
    fresh: bool,
}

impl<'a> Queued<'a> {
    /// Joins the queue; `None`, counted and logged, when it is full.
    fn join(ctx: &'a Context, peer: SocketAddr) -> Option<Self> {
        let Some(place) = ctx.backends.queue().join(ctx.settings.max_queue) else {
            ctx.metrics.rejected_queue_full.increment(1);
            log_refusal(ctx, peer, "the queue is full");
            return None;
        };
        ctx.metrics.queue_length.increment(1.0);
        Some(Queued {
            ctx,
            place,
            since: Instant::now(),
            fresh: true,
        })
    }

    /// Waits until this client is at the head of the queue and may pick again (`true`): at once when it
    /// has not tried since it joined or was last woken, else once woken (a freed slot, the client ahead
    /// leaving) or at the next recheck. `false` once the queue timeout has passed.
    async fn wait_turn(&mut self) -> bool {
        let deadline = self.since + self.ctx.settings.queue_timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let head = self.place.is_head();
            if head && self.fresh {
                self.fresh = false;
                return true;
            }
            let recheck = if head {
                (now + QUEUE_RECHECK).min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                () = self.place.woken() => {}
                () = tokio::time::sleep_until(recheck) => {}
            }
            self.fresh = true;
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.ctx.metrics.queue_length.decrement(1.0);
        self.ctx
            .metrics
            .queue_wait
            .record(self.since.elapsed().as_secs_f64());
    }
}

fn classify(e: &io::Error) -> ConnectFailure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
        io::ErrorKind::TimedOut => ConnectFailure::Timeout,
        _ => ConnectFailure::Other,
    }
}

/// Errors that say this host ran out of something (descriptors, buffers, ephemeral ports).
fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}
