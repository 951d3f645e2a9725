//! Listeners attached to a running balancer: [`BalancerHandle::accept_on`] starts an accept loop on a
//! listener, [`Listening::close`] stops it, and the balancer's shutdown stops them all. A configuration
//! reload adds and removes listeners this way while the others go on, and hands a listener from one
//! balancer to its successor without ever closing it (a closed listener resets the clients queued in its
//! backlog).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{accept, BalancerHandle};

/// An accept loop on one listener of a balancer. Dropping it leaves the loop running until the
/// balancer shuts down; [`close`](Listening::close) stops it sooner.
#[derive(Debug)]
pub struct Listening {
    listener: Arc<TcpListener>,
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Listening {
    /// The address it accepts on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listener, for [`BalancerHandle::accept_on`] of another balancer: a listener handed over
    /// that way is never closed, so no client queued in its backlog is lost.
    pub fn listener(&self) -> Arc<TcpListener> {
        self.listener.clone()
    }

    /// Stops accepting on this listener; resolves once the loop has ended. Connections it accepted go
    /// on. The socket closes (new connects are refused) once no other balancer accepts on it.
    pub async fn close(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl BalancerHandle {
    /// Accepts and carries connections on `listener` too, on the current Tokio runtime, until the
    /// balancer shuts down or the returned [`Listening`] is closed. With
    /// [`TcpBalancer::run`](super::TcpBalancer::run), every listener is attached this way.
    ///
    /// Errors from `accept()` never end the loop: it backs off briefly and goes on. Must be called
    /// inside a Tokio runtime.
    pub fn accept_on(&self, listener: Arc<TcpListener>) -> std::io::Result<Listening> {
        let addr = listener.local_addr()?;
        #[cfg(unix)]
        super::listen::set_listener_nodelay(&*listener);
        self.shared.listening(addr, true);
        let stop = CancellationToken::new();
        let shared = self.shared.clone();
        let (loop_listener, loop_stop) = (listener.clone(), stop.clone());
        let task = tokio::spawn(async move {
            tokio::select! {
                () = accept::accept_loop(&shared, &loop_listener) => {}
                () = loop_stop.cancelled() => {}
                () = shared.shutdown.cancelled() => {}
            }
            // Closed on its own (not by the shutdown, after which the addresses stay on show).
            if !shared.shutdown.is_cancelled() {
                shared.listening(addr, false);
            }
        });
        tracing::info!(listen = %addr, "accepting connections");
        Ok(Listening {
            listener,
            addr,
            stop,
            task: Some(task),
        })
    }

    /// The addresses the balancer accepts on now.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.shared.listen_addrs()
    }
}
