//! Accepting: the accept loop of [`TcpBalancer::serve`](super::TcpBalancer::serve), and what every
//! accept loop does with what `accept()` returned.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::Shared;

/// Never returns: shutdown is handled by the caller's `select!`, which drops this future.
pub(super) async fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
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
                shared.ctx.clone(),
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
    shared.ctx.metrics.accept_errors.increment(1);
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
