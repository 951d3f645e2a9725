//! Operator signals, shared by the balancer command and the cluster supervisor.

/// Resolves on the next SIGINT or SIGTERM (Ctrl-C elsewhere).
#[cfg(unix)]
pub async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves on the next Ctrl-C.
#[cfg(not(unix))]
pub async fn stop_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Resolves on the first SIGINT or SIGTERM, after logging `draining`. A second signal later runs
/// `force` (on a task of its own, so the caller's drain goes on meanwhile), after logging `forcing`.
pub async fn stop_then_force(
    draining: &'static str,
    forcing: &'static str,
    force: impl FnOnce() + Send + 'static,
) {
    stop_signal().await;
    tracing::info!("{draining}");
    tokio::spawn(async move {
        stop_signal().await;
        tracing::warn!("{forcing}");
        force();
    });
}
