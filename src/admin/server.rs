//! The admin server's connections: the accept loop (connection cap, back-off on accept errors), and
//! one task per connection that runs hyper's HTTP/1 under a watchdog (header and idle timeouts).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ratelimit::Logs;
use super::routes::{self, Ctx};

/// The first pause after a failed `accept()`; it doubles while accept keeps failing.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause after a failed `accept()`.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// How long connections may take to finish their request once the server stops.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// hyper's read buffer per connection, so the longest request head (hyper answers 431 past it).
const MAX_HEAD: usize = 16 * 1024;

/// The limits the connections run under.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_connections: usize,
    pub(super) header_timeout: Duration,
    pub(super) idle_timeout: Duration,
}

/// Accepts until `shutdown`, then lets the connections finish their request (up to a second).
pub(super) async fn serve(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let logs = Arc::new(Logs::default());
    let cap = Arc::new(Semaphore::new(limits.max_connections));
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut backoff = Duration::ZERO;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                match cap.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (ctx, logs, stop) = (ctx.clone(), logs.clone(), stop.clone());
                        tracker.spawn(async move {
                            connection(stream, peer, ctx, limits, &logs, stop).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        // At the cap: closed at once, so that idle connections cannot pile up and
                        // take the descriptors the data path needs.
                        drop(stream);
                        if let Some(suppressed) = logs.cap.allow() {
                            tracing::warn!(
                                %peer,
                                max = limits.max_connections,
                                suppressed,
                                "admin server at its connection cap; closing new connections"
                            );
                        }
                    }
                }
            }
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(error = %e, "admin accept failed for one connection");
            }
            Err(e) => {
                // Out of descriptors (or memory): the connection stays in the backlog and accept would
                // fail again at once, so pause, 10 ms doubling to 1 s, instead of spinning.
                backoff = (backoff * 2).clamp(FIRST_PAUSE, MAX_PAUSE);
                if let Some(suppressed) = logs.accept.allow() {
                    tracing::warn!(
                        error = %e,
                        pause_ms = backoff.as_millis() as u64,
                        suppressed,
                        "admin accept failed; pausing"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut shutdown => break,
                }
            }
        }
    }
    drop(listener);
    stop.cancel();
    tracker.close();
    let _ = tokio::time::timeout(CLOSE_GRACE * 2, tracker.wait()).await;
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

/// One connection: HTTP/1 with keep-alive, closed by the watchdog when a request's head takes longer
/// than the header timeout (counted from the connection's start, or from the first byte after an idle
/// spell) or when nothing moves for the idle timeout.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    limits: Limits,
    logs: &Logs,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        service_fn(move |req| {
            let (ctx, activity) = (ctx.clone(), activity.clone());
            async move {
                activity.begin_request();
                let res = routes::handle(ctx, req).await;
                activity.end_request();
                Ok::<_, std::convert::Infallible>(res)
            }
        })
    };
    let conn = http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        phase = watchdog(&activity, limits) => {
            tracing::debug!(%peer, phase, "admin connection closed: timed out");
            return;
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        if e.is_parse() || e.is_parse_too_large() {
            // hyper has answered 400 (or 431) already.
            if let Some(suppressed) = logs.bad_request.allow() {
                tracing::warn!(%peer, error = %e, suppressed, "admin server: bad request");
            }
        } else {
            tracing::debug!(%peer, error = %e, "admin connection ended with an error");
        }
    }
}

/// Resolves once the connection has overrun its current phase's limit; says which phase.
async fn watchdog(activity: &Activity, limits: Limits) -> &'static str {
    loop {
        let (phase, since) = activity.load();
        let limit = match phase {
            HEAD => limits.header_timeout,
            _ => limits.idle_timeout,
        };
        let deadline = activity.origin + since + limit;
        if Instant::now() >= deadline {
            return match phase {
                HEAD => "request head",
                BUSY => "request",
                _ => "idle",
            };
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Waiting for a request's head: from the connection's start, or from the first byte after idle.
const HEAD: u64 = 0;
/// A request is being answered.
const BUSY: u64 = 1;
/// Between requests.
const IDLE: u64 = 2;

/// Where a connection is and since when, in one atomic: the phase in the top byte, the milliseconds
/// since `origin` below. Written by the connection's task, read by its watchdog.
#[derive(Debug)]
struct Activity {
    origin: Instant,
    state: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            origin: Instant::now(),
            state: AtomicU64::new(HEAD << 56),
        }
    }

    fn now(&self) -> u64 {
        (self.origin.elapsed().as_millis() as u64) & ((1 << 56) - 1)
    }

    fn set(&self, phase: u64) {
        self.state.store(phase << 56 | self.now(), Relaxed);
    }

    fn load(&self) -> (u64, Duration) {
        let s = self.state.load(Relaxed);
        (s >> 56, Duration::from_millis(s & ((1 << 56) - 1)))
    }

    /// Bytes came in: a new request's head starts after an idle spell; a body moving is activity.
    fn read(&self) {
        match self.load().0 {
            IDLE => self.set(HEAD),
            BUSY => self.set(BUSY),
            _ => {} // the head's deadline does not move
        }
    }

    /// Bytes went out (an answer): activity, unless a head is awaited.
    fn wrote(&self) {
        match self.load().0 {
            HEAD => {}
            phase => self.set(phase),
        }
    }

    fn begin_request(&self) {
        self.set(BUSY);
    }

    fn end_request(&self) {
        self.set(IDLE);
    }
}

/// A connection's socket that tells its [`Activity`] when bytes move.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_move_as_bytes_and_requests_do() {
        let a = Activity::new();
        assert_eq!(a.load().0, HEAD);
        a.wrote();
        a.read();
        assert_eq!(
            a.load(),
            (HEAD, Duration::ZERO),
            "a head's deadline never moves"
        );
        a.begin_request();
        assert_eq!(a.load().0, BUSY);
        a.end_request();
        assert_eq!(a.load().0, IDLE);
        a.wrote();
        assert_eq!(a.load().0, IDLE);
        a.read();
        assert_eq!(
            a.load().0,
            HEAD,
            "the next request's head starts with its first byte"
        );
    }
}
