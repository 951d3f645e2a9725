//! Background work of a running balancer, run beside its accept loops until shutdown: the upkeep of the
//! backend table (slow start rebuilds it as weights ramp up) and the active health checks, if they are
//! configured. It runs once per balancer (on the runtime of `serve`, or on the control runtime of
//! `serve_per_core`), never once per serving thread.

use std::time::Duration;

use super::Shared;
use crate::health::active;

/// Runs until dropped (the serving future's `select!` drops it at shutdown, which ends the checks).
pub(super) async fn run(shared: &Shared) {
    tokio::join!(upkeep(shared), checks(shared));
}

/// Rebuilds the table while slow start ramps a weight up.
async fn upkeep(shared: &Shared) {
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

/// The active health checks of every backend, when configured.
async fn checks(shared: &Shared) {
    match &shared.config.check {
        Some(check) if check.is_on() => active::run(&shared.ctx.backends, check.clone()).await,
        _ => std::future::pending().await,
    }
}
