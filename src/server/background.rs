//! Background work of a running balancer, run beside its accept loops until shutdown: the upkeep of the
//! backend table (slow start rebuilds it as weights ramp up).

use std::time::Duration;

use super::Shared;

/// Runs until dropped (the serving future's `select!` drops it at shutdown).
pub(super) async fn run(shared: &Shared) {
    let window = shared.config.slow_start;
    if window.is_zero() {
        return std::future::pending().await;
    }
    // About 32 steps over a window, but never more than 20 rebuilds a second.
    let step = (window / 32).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(step);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        shared.ctx.backends.maintain();
    }
}
