//! The second half of every shutdown: the drain of the connections in flight.

use super::{Shared, ShutdownReport};

/// The second half of every shutdown, once no listener accepts any more: waits for the connections in
/// flight up to the drain timeout, closes what is left, and says what it did.
pub(crate) async fn drain(shared: &Shared) -> ShutdownReport {
    shared.shutdown.cancel();
    shared.tracker.close();

    let in_flight = shared.tracker.len();
    let drain = shared.config.drain_timeout;
    tracing::info!(in_flight, drain_timeout = ?drain, "stopped accepting; draining connections");
    let mut forced = 0;
    if tokio::time::timeout(drain, shared.tracker.wait())
        .await
        .is_err()
    {
        forced = shared.tracker.len();
        tracing::warn!(
            forced,
            "drain deadline passed; closing the connections still open"
        );
        shared.ctx.hard_stop.fire();
        shared.tracker.wait().await;
    }
    tracing::info!(in_flight, forced, "balancer stopped");
    ShutdownReport { in_flight, forced }
}
