//! One client connection: pick and connect a backend (with retries), then splice bytes both ways.
//!
//! The two directions are pumped by two futures inside the connection's one task, each with its own state,
//! so that half-close is first class: when one side sends FIN, the FIN is passed on (`shutdown(Write)`) and
//! the other direction keeps flowing. A pump holds a buffer only while data is in flight: it waits for
//! readiness with no buffer, borrows one from a per-thread pool, drains the socket, and gives it back.
//!
//! How a connection ends:
//! * both directions saw EOF → both sockets are closed normally;
//! * a read or write error on either side (a reset, a broken pipe) → both sockets are *aborted* (RST), so
//!   that a reset is passed on as a reset and never turns into a clean end of a truncated stream;
//! * no bytes either way for the idle timeout (or the shorter half-close timeout once one direction has
//!   ended), or the drain deadline of a shutdown → both sockets are aborted, for the same reason.

use std::cell::RefCell;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::backend::{ActiveGuard, Backend};
use crate::balancer::Shared;
use crate::config::CopyMode;
use crate::metrics::ConnectFailure;

/// Carries one accepted client connection to its end. `_permit` holds its place under the connection limit.
pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    // On Linux the accepted socket inherits TCP_NODELAY from the listener (set once by `serve`), which
    // saves a system call per connection. Elsewhere, best effort: a client that already left makes this
    // fail, and the first read will say so.
    #[cfg(not(target_os = "linux"))]
    let _ = client.set_nodelay(true);

    let mut tried = Vec::new();
    let connected = tokio::select! {
        c = connect(&shared, peer, &mut tried) => c,
        () = shared.hard_stop.cancelled() => None,
    };
    let Some((backend, guard)) = connected else {
        abort(&client);
        return;
    };

    let counts = Counts::default();
    let mut client = client;
    let (mut backend, guard, client_ended) = if shared.config.replay_limit == 0 {
        (backend, guard, false)
    } else {
        // Boxed: kept inline, its state would enlarge every connection's task, replay or not.
        let answered = Box::pin(until_answered(
            &shared,
            peer,
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
    let end = match shared.config.copy_mode {
        CopyMode::Auto | CopyMode::Pooled | CopyMode::Splice => tokio::select! {
            end = splice(&shared, &mut client, &mut backend, guard.backend(), &counts, client_ended) => end,
            () = shared.hard_stop.cancelled() => End::DrainDeadline,
        },
        CopyMode::Plain => tokio::select! {
            end = plain_copy(&mut client, &mut backend, guard.backend(), &counts) => end,
            () = shared.hard_stop.cancelled() => End::DrainDeadline,
        },
    };
    if !matches!(end, End::Closed) {
        abort(&client);
        abort(&backend);
    }
    let duration = started.elapsed();
    shared
        .metrics
        .connection_duration
        .record(duration.as_secs_f64());
    tracing::debug!(
        client = %peer,
        backend = %guard.backend().name(),
        bytes_to_backend = counts.to_backend.load(Relaxed),
        bytes_to_client = counts.to_client.load(Relaxed),
        duration_ms = duration.as_millis() as u64,
        end = %end,
        "connection closed"
    );
}

/// Tries backends until one connects, never one in `tried` (those that already failed this client), until
/// `tried` holds `connect_attempts` of them.
async fn connect(
    shared: &Shared,
    peer: SocketAddr,
    tried: &mut Vec<Arc<Backend>>,
) -> Option<(TcpStream, ActiveGuard)> {
    let config = &shared.config;
    while tried.len() < config.connect_attempts as usize {
        let Some(backend) = shared.selector.pick(tried) else {
            shared.metrics.no_backend.increment(1);
            break;
        };
        // The guard counts the connect in progress as load, so least-connections sees it at once.
        let guard = ActiveGuard::new(backend);
        let backend = guard.backend();
        let t0 = Instant::now();
        let failure =
            match tokio::time::timeout(config.connect_timeout, TcpStream::connect(backend.addr()))
                .await
            {
                Ok(Ok(stream)) => {
                    backend.connect_succeeded();
                    backend.metrics.connected_in(t0.elapsed());
                    guard.connected();
                    let _ = stream.set_nodelay(true);
                    return Some((stream, guard));
                }
                Ok(Err(e)) => (classify(&e), e.to_string(), is_local_exhaustion(&e)),
                Err(_) => (
                    ConnectFailure::Timeout,
                    "connect timed out".to_string(),
                    false,
                ),
            };
        backend.metrics.connect_failed(failure.0);
        if failure.2 {
            // Out of file descriptors or ports here: not the backend's fault, and no other backend would
            // fare better.
            tracing::warn!(client = %peer, error = %failure.1, "cannot open a backend connection");
            break;
        }
        backend.connect_failed(&config.health);
        tracing::debug!(client = %peer, backend = %backend.name(), reason = failure.0.as_str(),
            error = %failure.1, "connect to backend failed, trying another");
        tried.push(backend.clone());
    }
    let rejected = if tried.is_empty() {
        &shared.metrics.rejected_no_backend
    } else {
        &shared.metrics.rejected_connect_failed
    };
    rejected.increment(1);
    if shared.should_log_no_backend() {
        let tried: Vec<&str> = tried.iter().map(|b| b.name()).collect();
        tracing::warn!(client = %peer, ?tried, "no backend reachable; closing client");
    }
    None
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

/// Closes a socket with a reset (SO_LINGER 0) instead of a FIN.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Bytes carried by one connection, per direction.
#[derive(Debug, Default)]
struct Counts {
    to_backend: AtomicU64,
    to_client: AtomicU64,
}

/// Which side of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// How a spliced connection ended.
#[derive(Debug)]
enum End {
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
            End::NoAnswer => f.write_str("no backend answered"),
        }
    }
}

/// The replay phase (only with [`BalancerConfig::replay_limit`] above 0): carries the client's bytes to
/// the backend *and keeps them*, until the backend sends its first byte. If instead the backend closes or
/// resets first (or a write to it fails), it is counted as failed, another backend is connected, and the
/// kept bytes (and the client's FIN, if it came) are sent to that one. Returns the backend that answered,
/// its guard, and whether the client's FIN was already passed on; the bytes of the answer read so far
/// have been written to the client. Past the limit, the connection is committed to the backend at hand.
///
/// [`BalancerConfig::replay_limit`]: crate::BalancerConfig::replay_limit
async fn until_answered(
    shared: &Shared,
    peer: SocketAddr,
    client: &mut TcpStream,
    mut backend: TcpStream,
    mut guard: ActiveGuard,
    mut tried: Vec<Arc<Backend>>,
    counts: &Counts,
) -> Result<(TcpStream, ActiveGuard, bool), End> {
    use bytes::BufMut;

    let cfg = &shared.config;
    let mut kept: Vec<u8> = Vec::new();
    let mut client_ended = false;
    let mut last_activity = Instant::now();
    loop {
        let went_away = tokio::select! {
            biased;
            () = shared.hard_stop.cancelled() => {
                abort(&backend);
                return Err(End::DrainDeadline);
            }
            r = backend.readable() => {
                let mut buf = PooledBuf::take(cfg.buffer_size);
                match r.and_then(|()| backend.try_read(&mut buf)) {
                    // After the client's FIN, the backend's FIN is an answer: "nothing to say".
                    Ok(0) if client_ended => return Ok((backend, guard, client_ended)),
                    Ok(0) => "closed",
                    Ok(n) => {
                        let mut tally = Tally::new(&counts.to_client, &guard.backend().metrics.bytes_to_client);
                        let written = write_all(client, &buf[..n], &mut tally).await;
                        drop(tally);
                        if let Err(e) = written {
                            abort(&backend);
                            return Err(End::WriteFailed(Side::Client, e));
                        }
                        return Ok((backend, guard, client_ended));
                    }
                    Err(e) if is_retryable(&e) => continue,
                    Err(_) => "reset",
                }
            }
            r = client.readable(), if !client_ended => {
                let room = cfg.replay_limit - kept.len();
                if room == 0 {
                    // Too much to keep: commit to this backend, as if replay were off from here on.
                    return Ok((backend, guard, client_ended));
                }
                let start = kept.len();
                let read = r.and_then(|()| client.try_read_buf(&mut (&mut kept).limit(room)));
                match read {
                    Ok(0) => {
                        client_ended = true;
                        match socket2::SockRef::from(&backend).shutdown(Shutdown::Write) {
                            Ok(()) => continue,
                            Err(_) => "reset",
                        }
                    }
                    Ok(_) => {
                        last_activity = Instant::now();
                        let mut tally = Tally::new(&counts.to_backend, &guard.backend().metrics.bytes_to_backend);
                        match write_all(&mut backend, &kept[start..], &mut tally).await {
                            Ok(()) => continue,
                            Err(_) => "reset",
                        }
                    }
                    Err(e) if is_retryable(&e) => continue,
                    Err(e) => {
                        abort(&backend);
                        return Err(End::ReadFailed(Side::Client, e));
                    }
                }
            }
            () = tokio::time::sleep_until(last_activity + cfg.idle_timeout) => {
                abort(&backend);
                return Err(End::Idle { half_closed: client_ended });
            }
        };

        // The backend went away without a word: give the same bytes to another.
        let failed = guard.backend().clone();
        failed.metrics.connect_failed(ConnectFailure::Unanswered);
        failed.connect_failed(&cfg.health);
        tracing::debug!(client = %peer, backend = %failed.name(), how = went_away,
            kept = kept.len(), "backend went away before answering; replaying to another");
        abort(&backend);
        drop((backend, guard));
        tried.push(failed);
        let connected = tokio::select! {
            c = connect(shared, peer, &mut tried) => c,
            () = shared.hard_stop.cancelled() => return Err(End::DrainDeadline),
        };
        (backend, guard) = connected.ok_or(End::NoAnswer)?;
        let mut tally = Tally::new(
            &counts.to_backend,
            &guard.backend().metrics.bytes_to_backend,
        );
        // A failure here shows as this backend's close or reset, which the loop handles.
        if write_all(&mut backend, &kept, &mut tally).await.is_ok() && client_ended {
            let _ = socket2::SockRef::from(&backend).shutdown(Shutdown::Write);
        }
        drop(tally);
        last_activity = Instant::now();
    }
}

/// `WouldBlock` (spurious readiness) and `Interrupted`: try again.
fn is_retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// The baseline path: Tokio's `copy_bidirectional` with 8 KiB buffers. Byte counts are known only at the
/// end (or not at all when it fails), so metrics and the per-connection log see them late or never.
async fn plain_copy(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    b: &Backend,
    counts: &Counts,
) -> End {
    match tokio::io::copy_bidirectional_with_sizes(client, backend, 8192, 8192).await {
        Ok((up, down)) => {
            counts.to_backend.store(up, Relaxed);
            counts.to_client.store(down, Relaxed);
            b.metrics.bytes_to_backend.increment(up);
            b.metrics.bytes_to_client.increment(down);
            End::Closed
        }
        // copy_bidirectional does not say which side failed; either way both are reset.
        Err(e) => End::CopyFailed(e),
    }
}

/// When the last byte moved, in milliseconds since the connection's splice began.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Relaxed);
    }
    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Relaxed))
    }
}

async fn splice(
    shared: &Shared,
    client: &mut TcpStream,
    backend: &mut TcpStream,
    b: &Backend,
    counts: &Counts,
    client_ended: bool,
) -> End {
    let cfg = &shared.config;
    let activity = Activity {
        base: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (client_read, client_write) = client.split();
    let (backend_read, backend_write) = backend.split();
    let up = Pump {
        from: client_read,
        to: backend_write,
        to_side: Side::Backend,
        carried: &counts.to_backend,
        metric: &b.metrics.bytes_to_backend,
        activity: &activity,
        buffer_size: cfg.buffer_size,
    };
    let down = Pump {
        from: backend_read,
        to: client_write,
        to_side: Side::Client,
        carried: &counts.to_client,
        metric: &b.metrics.bytes_to_client,
        activity: &activity,
        buffer_size: cfg.buffer_size,
    };
    let up = up.run(cfg.copy_mode);
    let down = down.run(cfg.copy_mode);
    tokio::pin!(up, down);
    // When the client's FIN was already passed on (during the replay phase), the up pump is never polled.
    let (mut up_done, mut down_done) = (client_ended, false);
    let idle = tokio::time::sleep(cfg.idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return e,
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return e,
            },
            () = &mut idle => {}
        }
        if up_done && down_done {
            return End::Closed;
        }
        let half_closed = up_done || down_done;
        let limit = if half_closed {
            cfg.idle_timeout.min(cfg.half_close_timeout)
        } else {
            cfg.idle_timeout
        };
        let deadline = activity.last() + limit;
        if deadline <= Instant::now() {
            return End::Idle { half_closed };
        }
        idle.as_mut().reset(deadline);
    }
}

/// One direction of a connection.
struct Pump<'a> {
    from: ReadHalf<'a>,
    to: WriteHalf<'a>,
    to_side: Side,
    carried: &'a AtomicU64,
    metric: &'a Counter,
    activity: &'a Activity,
    buffer_size: usize,
}

impl Pump<'_> {
    fn source_side(&self) -> Side {
        match self.to_side {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    /// Copies until EOF (then passes the FIN on) or an error, through pipes (`splice`) or buffers, or
    /// (`Auto`) through buffers until a read fills one, then through pipes.
    async fn run(self, mode: CopyMode) -> Result<(), End> {
        #[cfg(target_os = "linux")]
        if mode == CopyMode::Splice {
            return self.run_splice().await;
        }
        self.run_buffered(mode == CopyMode::Auto).await
    }

    /// Passes the FIN on: the source has ended.
    fn forward_eof(&self) -> Result<(), End> {
        socket2::SockRef::from(self.to.as_ref())
            .shutdown(Shutdown::Write)
            .map_err(|e| End::WriteFailed(self.to_side, e))
    }

    /// The zero-copy pump: socket → pipe → socket with `splice(2)`. The pipe is always drained before it is
    /// filled again, so an `EAGAIN` while filling means the socket is empty (never that the pipe is full),
    /// and readiness stays truthful.
    #[cfg(target_os = "linux")]
    async fn run_splice(self) -> Result<(), End> {
        use crate::splice::Pipe;
        use std::os::fd::AsRawFd;
        use tokio::io::Interest;

        let mut tally = Tally::new(self.carried, self.metric);
        let (from, to) = (self.from.as_ref(), self.to.as_ref());
        let (from_fd, to_fd) = (from.as_raw_fd(), to.as_raw_fd());
        let read_failed = |e| End::ReadFailed(self.source_side(), e);
        let write_failed = |e| End::WriteFailed(self.to_side, e);
        loop {
            from.readable().await.map_err(read_failed)?;
            let pipe = Pipe::take().map_err(read_failed)?;
            loop {
                let filled = from.try_io(Interest::READABLE, || {
                    pipe.fill_from(from_fd, pipe.capacity())
                });
                let mut in_pipe = match filled {
                    Ok(0) => {
                        pipe.give_back();
                        tally.flush();
                        return self.forward_eof();
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // The pipe is dropped, not pooled: it may hold bytes.
                    Err(e) => return Err(read_failed(e)),
                };
                self.activity.touch();
                while in_pipe > 0 {
                    match to.try_io(Interest::WRITABLE, || pipe.drain_into(to_fd, in_pipe)) {
                        Ok(0) => return Err(write_failed(io::ErrorKind::WriteZero.into())),
                        Ok(n) => {
                            in_pipe -= n;
                            tally.pending += n as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            to.writable().await.map_err(write_failed)?;
                            self.activity.touch();
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(write_failed(e)),
                    }
                }
                if tally.pending >= TALLY_FLUSH_BYTES {
                    tally.flush();
                }
                // try_io does not count against the task's cooperative budget: count each chunk here,
                // so that a transfer that never blocks still lets the worker thread run other tasks.
                tokio::task::consume_budget().await;
            }
            pipe.give_back();
            tally.flush();
        }
    }

    /// The buffered pump: read into a pooled buffer, write it all out. Reads go through `poll_read`, which
    /// takes a short read as "drained" and clears readiness, so a burst costs no extra `read` that only
    /// returns `EAGAIN`.
    ///
    /// With `to_splice_on_bulk` (on Linux), a read that fills the whole buffer means a bulk transfer: once
    /// it is written, this direction goes on with `splice`, which costs far less CPU per byte. Small
    /// exchanges (requests, keep-alive answers) stay here, where one message costs one `read` and one
    /// `write`; the splice path pays an extra `EAGAIN` call per message.
    async fn run_buffered(mut self, to_splice_on_bulk: bool) -> Result<(), End> {
        // Counted locally and published once per burst (and when dropped, whatever the way out), so that
        // the shared counters see one atomic add per burst rather than one per write, and stay exact.
        let mut tally = Tally::new(self.carried, self.metric);
        loop {
            // Wait with no buffer held: an idle connection costs no buffer memory.
            self.from
                .readable()
                .await
                .map_err(|e| End::ReadFailed(self.source_side(), e))?;
            let mut buf = PooledBuf::take(self.buffer_size);
            loop {
                match read_if_ready(&mut self.from, &mut buf).await {
                    None => break,
                    Some(Ok(0)) => {
                        drop(buf);
                        tally.flush();
                        return self.forward_eof();
                    }
                    Some(Ok(n)) => {
                        self.activity.touch();
                        let written = write_all(&mut self.to, &buf[..n], &mut tally).await;
                        written.map_err(|e| End::WriteFailed(self.to_side, e))?;
                        self.activity.touch();
                        #[cfg(target_os = "linux")]
                        if to_splice_on_bulk && n == buf.len() {
                            drop((buf, tally));
                            return self.run_splice().await;
                        }
                        if tally.pending >= TALLY_FLUSH_BYTES {
                            tally.flush();
                        }
                    }
                    Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Some(Err(e)) => return Err(End::ReadFailed(self.source_side(), e)),
                }
            }
            tally.flush();
            drop(buf);
            // `poll_read` also says "not ready" when this task has used up its cooperative budget, and
            // then `readable()` would answer at once: yield here when the budget is gone, or we would spin.
            tokio::task::consume_budget().await;
        }
    }
}

/// One read if the socket is ready; `None` when it is not (a previous short read or `EAGAIN` cleared its
/// readiness), without a system call.
async fn read_if_ready(from: &mut ReadHalf<'_>, buf: &mut [u8]) -> Option<io::Result<usize>> {
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *from).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(rb.filled().len()))),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Ready(None),
        }
    })
    .await
}

/// Writes all of `data`, counting every byte that got through in `tally`, even when a later write fails.
async fn write_all(
    to: &mut (impl AsyncWrite + Unpin),
    mut data: &[u8],
    tally: &mut Tally<'_>,
) -> io::Result<()> {
    while !data.is_empty() {
        match to.write(data).await {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                tally.pending += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes written but not yet published; a long burst publishes at least this often.
const TALLY_FLUSH_BYTES: u64 = 1 << 20;

/// Bytes one pump has written and not yet added to the connection's and the backend's counters.
struct Tally<'a> {
    pending: u64,
    carried: &'a AtomicU64,
    metric: &'a Counter,
}

impl<'a> Tally<'a> {
    fn new(carried: &'a AtomicU64, metric: &'a Counter) -> Self {
        Tally {
            pending: 0,
            carried,
            metric,
        }
    }

    fn flush(&mut self) {
        if self.pending != 0 {
            self.carried.fetch_add(self.pending, Relaxed);
            self.metric.increment(self.pending);
            self.pending = 0;
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A buffer borrowed from the current thread's pool, given back on drop.
struct PooledBuf(Vec<u8>);

thread_local! {
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers kept per thread; more than this are freed, so a burst does not pin memory for ever.
const POOL_PER_THREAD: usize = 64;

impl PooledBuf {
    fn take(size: usize) -> Self {
        let reused = BUFFERS.with(|p| {
            let mut pool = p.borrow_mut();
            // Buffers of another size (another balancer in this process) are not reused.
            pool.pop().filter(|b| b.len() == size)
        });
        PooledBuf(reused.unwrap_or_else(|| vec![0; size]))
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        BUFFERS.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_PER_THREAD {
                pool.push(buf);
            }
        });
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}
