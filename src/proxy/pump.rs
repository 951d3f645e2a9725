//! One direction of a connection: read from one side, write to the other, pass the FIN on.

use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::Poll;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::buffer::PooledBuf;
use super::duplex::Activity;
use super::{End, Side};
use crate::backend::Backend;
use crate::config::CopyMode;
use crate::metrics::GlobalMetrics;

/// One direction of a connection.
pub(super) struct Pump<'a> {
    pub(super) from: ReadHalf<'a>,
    pub(super) to: WriteHalf<'a>,
    pub(super) to_side: Side,
    /// The connection's own count of bytes this way.
    pub(super) carried: &'a AtomicU64,
    /// The backend, whose totals and metrics count them too.
    pub(super) backend: &'a Backend,
    pub(super) activity: &'a Activity,
    /// Set once this direction's EOF has been read.
    pub(super) ended: &'a AtomicBool,
    /// Set once the other direction's EOF has been read (or its FIN was passed on before the splice).
    pub(super) other_ended: &'a AtomicBool,
    pub(super) buffer_size: usize,
    /// The most pipes open in the process ([`BalancerConfig::max_pipes`](crate::BalancerConfig)).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(super) max_pipes: usize,
    /// Counts the bursts carried through a buffer for want of a pipe.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(super) metrics: &'a GlobalMetrics,
}

/// How a burst (the bytes one readiness of the source brought) ended.
#[derive(Debug, PartialEq, Eq)]
enum Burst {
    /// The source is drained for now.
    Drained,
    /// The source ended (EOF): the FIN is to be passed on.
    Ended,
    /// A read filled the whole buffer: bulk, which the splice path carries more cheaply.
    Bulk,
}

impl<'a> Pump<'a> {
    fn tally(&self) -> Tally<'a> {
        match self.to_side {
            Side::Backend => Tally::to_backend(self.carried, self.backend),
            Side::Client => Tally::to_client(self.carried, self.backend),
        }
    }

    fn source_side(&self) -> Side {
        match self.to_side {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    /// Copies until EOF (then passes the FIN on) or an error, burst by burst, each through a pipe
    /// (`splice`) or a buffer. `Splice` starts with pipes; `Auto` starts with buffers and goes on with
    /// pipes once a read fills one; `Pooled` (and everything off Linux, or with `max_pipes` 0) keeps to
    /// buffers.
    ///
    /// A burst that should go through a pipe but cannot have one (the `max_pipes` bound is reached, or
    /// `pipe2` fails for want of descriptors) goes through a buffer instead, and the next burst tries a
    /// pipe again: a connection is never ended for want of a pipe.
    pub(super) async fn run(mut self, mode: CopyMode) -> Result<(), End> {
        // Counted locally and published once per burst (and when dropped, whatever the way out), so that
        // the shared counters see one atomic add per burst rather than one per write, and stay exact.
        let mut tally = self.tally();
        // `max_pipes` 0 turns splicing off: no burst tries a pipe, and none is counted as a fallback.
        let splicing = cfg!(target_os = "linux") && self.max_pipes > 0;
        let splice_on_bulk = splicing && mode == CopyMode::Auto;
        let mut spliced = splicing && mode == CopyMode::Splice;
        loop {
            // Wait with no buffer or pipe held: an idle connection costs neither. `poll_read_ready` keeps
            // the task's waker in the socket's one reader slot, where the burst's last `poll_read` left it;
            // `readable()` would queue a waiter in the socket's list and take it out again, every burst.
            let from = self.from.as_ref();
            std::future::poll_fn(|cx| from.poll_read_ready(cx))
                .await
                .map_err(|e| End::ReadFailed(self.source_side(), e))?;
            #[cfg(target_os = "linux")]
            if spliced {
                use super::pipe::{NoPipe, Pipe};
                match Pipe::take(self.max_pipes) {
                    Ok(pipe) => {
                        if self.splice_burst(pipe, &mut tally).await? == Burst::Ended {
                            tally.flush();
                            return self.forward_eof().await;
                        }
                        tally.flush();
                        continue;
                    }
                    Err(NoPipe::Bound) => self.metrics.fallback_max_pipes.increment(1),
                    Err(e @ NoPipe::Failed(_)) => {
                        e.log();
                        self.metrics.fallback_pipe_failed.increment(1);
                    }
                }
            }
            // Through a buffer: this mode's way, or a spliced burst that got no pipe. The latter stops
            // at its first full read, so that the rest of the bulk tries a pipe again.
            let burst = self
                .buffered_burst(&mut tally, splice_on_bulk || spliced)
                .await?;
            tally.flush();
            match burst {
                Burst::Ended => return self.forward_eof().await,
                Burst::Bulk => spliced = true,
                // `poll_read` also says "not ready" when this task has used up its cooperative budget,
                // and then `poll_read_ready` would answer at once: yield here when the budget is gone, or
                // we would spin.
                Burst::Drained => tokio::task::consume_budget().await,
            }
        }
    }

    /// Passes the FIN on: the source has ended.
    ///
    /// When the other direction has ended already, this is the last one: the connection ends now and both
    /// sockets are closed at once, and the `close` sends the FIN (after every byte written), so the
    /// `shutdown(SHUT_WR)` is left out. Both receive queues are empty then (each direction's EOF was
    /// read, and nothing follows a FIN), so the close is a clean one, never a reset. While the other
    /// direction is still open, its peer may go on sending: the FIN goes out with `shutdown`, at most two
    /// scheduler turns later (see below).
    async fn forward_eof(&self) -> Result<(), End> {
        self.ended.store(true, Relaxed);
        if !self.other_ended.load(Relaxed) {
            // The first direction to end: wait for one poll of the I/O driver before the `shutdown`.
            // When the other side has sent its FIN meanwhile (a client that closes once it has its
            // answer), the other pump reads it and both FINs go out with the close: no `shutdown` at
            // all. `yield_now` resumes after the driver's poll; when that poll saw the other side's FIN
            // (read-closed readiness on the socket this pump writes to) but the other pump has not run
            // yet (`select!` polls in random order), one more turn lets it read that EOF. Otherwise the
            // FIN goes out now, one turn late, and the other side may go on sending.
            tokio::task::yield_now().await;
            if !self.other_ended.load(Relaxed) && read_closed(self.to.as_ref()) {
                tokio::task::yield_now().await;
            }
        }
        if self.other_ended.load(Relaxed) {
            return Ok(());
        }
        socket2::SockRef::from(self.to.as_ref())
            .shutdown(Shutdown::Write)
            .map_err(|e| End::WriteFailed(self.to_side, e))
    }

    /// The zero-copy burst: socket → pipe → socket with `splice(2)`, until the source is drained or
    /// ends. The pipe is always drained before it is filled again, so an `EAGAIN` while filling means the
    /// socket is empty (never that the pipe is full), and readiness stays truthful. The pipe goes back
    /// to the pool empty; on an error (or if this future is dropped) it may hold bytes, and is closed.
    #[cfg(target_os = "linux")]
    async fn splice_burst(
        &self,
        pipe: super::pipe::Pipe,
        tally: &mut Tally<'_>,
    ) -> Result<Burst, End> {
        use std::os::fd::AsRawFd;
        use tokio::io::Interest;

        let (from, to) = (self.from.as_ref(), self.to.as_ref());
        let (from_fd, to_fd) = (from.as_raw_fd(), to.as_raw_fd());
        let read_failed = |e| End::ReadFailed(self.source_side(), e);
        let write_failed = |e| End::WriteFailed(self.to_side, e);
        loop {
            let filled = from.try_io(Interest::READABLE, || {
                pipe.fill_from(from_fd, pipe.capacity())
            });
            let mut in_pipe = match filled {
                Ok(0) => {
                    pipe.give_back(self.max_pipes);
                    return Ok(Burst::Ended);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
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
            // try_io does not count against the task's cooperative budget: count each chunk here, so
            // that a transfer that never blocks still lets the worker thread run other tasks.
            tokio::task::consume_budget().await;
        }
        pipe.give_back(self.max_pipes);
        Ok(Burst::Drained)
    }

    /// The buffered burst: read into a pooled buffer, write it all out, until the source is drained or
    /// ends. Reads go through `poll_read`, which takes a short read as "drained" and clears readiness, so
    /// a burst costs no extra `read` that only returns `EAGAIN`.
    ///
    /// With `stop_on_bulk`, a read that fills the whole buffer ends the burst (once written) as
    /// [`Burst::Bulk`]: a bulk transfer, which the splice path carries at far less CPU per byte. Small
    /// exchanges (requests, keep-alive answers) stay here, where one message costs one `read` and one
    /// `write`; the splice path pays an extra `EAGAIN` call per message.
    async fn buffered_burst(
        &mut self,
        tally: &mut Tally<'_>,
        stop_on_bulk: bool,
    ) -> Result<Burst, End> {
        let mut buf = PooledBuf::take(self.buffer_size);
        loop {
            match read_if_ready(&mut self.from, &mut buf).await {
                None => return Ok(Burst::Drained),
                Some(Ok(0)) => return Ok(Burst::Ended),
                Some(Ok(n)) => {
                    self.activity.touch();
                    let written = write_all(&mut self.to, &buf[..n], tally).await;
                    written.map_err(|e| End::WriteFailed(self.to_side, e))?;
                    self.activity.touch();
                    if stop_on_bulk && n == buf.len() {
                        return Ok(Burst::Bulk);
                    }
                    if tally.pending >= TALLY_FLUSH_BYTES {
                        tally.flush();
                    }
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Some(Err(e)) => return Err(End::ReadFailed(self.source_side(), e)),
            }
        }
    }
}

/// Whether the socket's readiness already says its peer sent a FIN (`EPOLLRDHUP`), without a system call
/// and without waiting: one poll of `ready()` with a no-op waker (the future is dropped at once, which
/// takes its waiter off the socket again).
fn read_closed(s: &tokio::net::TcpStream) -> bool {
    use tokio::io::Interest;
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let fut = s.ready(Interest::READABLE);
    let mut fut = std::pin::pin!(fut);
    matches!(std::future::Future::poll(fut.as_mut(), &mut cx), Poll::Ready(Ok(r)) if r.is_read_closed())
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
pub(super) async fn write_all(
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
pub(super) struct Tally<'a> {
    pub(super) pending: u64,
    carried: &'a AtomicU64,
    total: &'a AtomicU64,
    metric: &'a Counter,
}

impl<'a> Tally<'a> {
    /// For bytes from the client to `backend`.
    pub(super) fn to_backend(carried: &'a AtomicU64, backend: &'a Backend) -> Self {
        Tally {
            pending: 0,
            carried,
            total: &backend.bytes_to_backend,
            metric: &backend.metrics.bytes_to_backend,
        }
    }

    /// For bytes from `backend` to the client.
    pub(super) fn to_client(carried: &'a AtomicU64, backend: &'a Backend) -> Self {
        Tally {
            pending: 0,
            carried,
            total: &backend.bytes_to_client,
            metric: &backend.metrics.bytes_to_client,
        }
    }

    pub(super) fn flush(&mut self) {
        if self.pending != 0 {
            self.carried.fetch_add(self.pending, Relaxed);
            self.total.fetch_add(self.pending, Relaxed);
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
