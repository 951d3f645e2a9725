//! The replay phase: the client's first bytes are kept until the backend answers, and given to another
//! backend if it goes away before its first byte.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;

use bytes::BufMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::buffer::PooledBuf;
use super::connect::connect;
use super::pump::{write_all, Tally};
use super::{abort, Context, Counts, End, Side};
use crate::backend::{ActiveGuard, Backend};
use crate::metrics::ConnectFailure;

/// The replay phase (only with [`BalancerConfig::replay_limit`] above 0): carries the client's bytes to
/// the backend *and keeps them*, until the backend sends its first byte. If instead the backend closes or
/// resets first (or a write to it fails), it is counted as failed, another backend is connected, and the
/// kept bytes (and the client's FIN, if it came) are sent to that one. Returns the backend that answered,
/// its guard, and whether the client's FIN was already passed on; the bytes of the answer read so far
/// have been written to the client. Past the limit, the connection is committed to the backend at hand.
///
/// [`BalancerConfig::replay_limit`]: crate::BalancerConfig::replay_limit
pub(super) async fn until_answered(
    ctx: &Context,
    // The client's address, and the PROXY header each new backend connection gets first (or none).
    (peer, hello): (SocketAddr, &[u8]),
    client: &mut TcpStream,
    mut backend: TcpStream,
    mut guard: ActiveGuard,
    mut tried: Vec<Arc<Backend>>,
    counts: &Counts,
) -> Result<(TcpStream, ActiveGuard, bool), End> {
    let cfg = &ctx.settings;
    let mut kept: Vec<u8> = Vec::new();
    let mut client_ended = false;
    let mut last_activity = Instant::now();
    loop {
        let went_away = tokio::select! {
            biased;
            () = ctx.hard_stop.token().cancelled() => {
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
                        let mut tally = Tally::to_client(&counts.to_client, guard.backend());
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
                        let mut tally = Tally::to_backend(&counts.to_backend, guard.backend());
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
        failed.connect_failed(&format!("{went_away} before answering"));
        tracing::debug!(client = %peer, backend = %failed.who(), how = went_away,
            kept = kept.len(), "backend went away before answering; replaying to another");
        abort(&backend);
        drop((backend, guard));
        tried.push(failed);
        let connected = tokio::select! {
            c = connect(ctx, peer, hello, &mut tried) => c,
            () = ctx.hard_stop.token().cancelled() => return Err(End::DrainDeadline),
        };
        (backend, guard) = connected.ok_or(End::NoAnswer)?;
        let mut tally = Tally::to_backend(&counts.to_backend, guard.backend());
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
