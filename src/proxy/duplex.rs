//! Both directions of a connection, pumped side by side in one task, with the idle and half-close
//! timeouts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::pump::Pump;
use super::{Context, Counts, End, Side};
use crate::backend::Backend;

/// When the last byte moved, in milliseconds since the connection's splice began.
pub(super) struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Relaxed);
    }
    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Relaxed))
    }
}

/// Carries both directions until both have ended (`Closed`), one fails, or the connection has been idle
/// too long. `client_ended`: the client's FIN was already passed on (during the replay phase).
pub(super) async fn splice(
    ctx: &Context,
    client: &mut TcpStream,
    backend: &mut TcpStream,
    b: &Backend,
    counts: &Counts,
    client_ended: bool,
) -> End {
    let cfg = &ctx.settings;
    let activity = Activity {
        base: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    // Which directions have read their EOF: the last one to end leaves its FIN to the close.
    let (up_ended, down_ended) = (AtomicBool::new(client_ended), AtomicBool::new(false));
    let (client_read, client_write) = client.split();
    let (backend_read, backend_write) = backend.split();
    let up = Pump {
        from: client_read,
        to: backend_write,
        to_side: Side::Backend,
        carried: &counts.to_backend,
        backend: b,
        activity: &activity,
        ended: &up_ended,
        other_ended: &down_ended,
        buffer_size: cfg.buffer_size,
        max_pipes: cfg.max_pipes,
        metrics: &ctx.metrics,
    };
    let down = Pump {
        from: backend_read,
        to: client_write,
        to_side: Side::Client,
        carried: &counts.to_client,
        backend: b,
        activity: &activity,
        ended: &down_ended,
        other_ended: &up_ended,
        buffer_size: cfg.buffer_size,
        max_pipes: cfg.max_pipes,
        metrics: &ctx.metrics,
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
