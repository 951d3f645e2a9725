//! Operator signals, shared by the balancer command and the cluster supervisor.

#[cfg(unix)]
use tokio::signal::unix::Signal;

/// SIGTERM and SIGINT, caught from the moment this is made: a signal that comes before anyone waits is
/// kept for the next wait, not lost, and never takes its default action (which would kill the process
/// without a drain). Make it before the listening socket is bound.
#[derive(Debug)]
pub struct StopSignals {
    #[cfg(unix)]
    caught: Option<(Signal, Signal)>,
}

impl StopSignals {
    /// Installs the handlers. Must be called inside a Tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => StopSignals {
                    caught: Some((term, int)),
                },
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot install the signal handlers; Ctrl-C only");
                    StopSignals { caught: None }
                }
            }
        }
        #[cfg(not(unix))]
        StopSignals {}
    }

    /// Resolves on the next SIGINT or SIGTERM (Ctrl-C where there are no Unix signals).
    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.caught {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }

    /// Resolves on the first signal, after logging `draining`. A second signal later runs `force` (on a
    /// task of its own, so that the caller's drain goes on meanwhile), after logging `forcing`.
    pub async fn stop_then_force(
        mut self,
        draining: &'static str,
        forcing: &'static str,
        force: impl FnOnce() + Send + 'static,
    ) {
        self.next().await;
        tracing::info!("{draining}");
        tokio::spawn(async move {
            self.next().await;
            tracing::warn!("{forcing}");
            force();
        });
    }
}
