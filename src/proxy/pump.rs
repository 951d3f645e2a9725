//! One direction of a connection: read from one side, write to the other, pass the FIN on.

use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::Poll;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::buffer::PooledBuf;
use super::duplex::Activity;
use super::{End, Side};
use crate::backend::Backend;
use crate::config::CopyMode;

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
    pub(super) buffer_size: usize,
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

    /// Copies until EOF (then passes the FIN on) or an error, through pipes (`splice`) or buffers, or
    /// (`Auto`) through buffers until a read fills one, then through pipes.
    pub(super) async fn run(self, mode: CopyMode) -> Result<(), End> {
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
        use super::pipe::Pipe;
        use std::os::fd::AsRawFd;
        use tokio::io::Interest;

        let mut tally = self.tally();
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
        let mut tally = self.tally();
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
