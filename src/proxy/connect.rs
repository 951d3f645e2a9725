//! Picking a backend and connecting to it, with retries on other backends.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Context;
use crate::backend::{ActiveGuard, Backend};
use crate::metrics::ConnectFailure;

/// Tries backends until one connects, never one in `tried` (those that already failed this client), until
/// `tried` holds `connect_attempts` of them. `None` once the client must be closed: every backend tried
/// failed, none was available, or this host ran out of descriptors or ports (which is counted and logged
/// as such, never against a backend).
pub(crate) async fn connect(
    ctx: &Context,
    peer: SocketAddr,
    tried: &mut Vec<Arc<Backend>>,
) -> Option<(TcpStream, ActiveGuard)> {
    let settings = &ctx.settings;
    while tried.len() < settings.connect_attempts as usize {
        let Some(backend) = ctx.backends.pick(tried) else {
            ctx.metrics.no_backend.increment(1);
            break;
        };
        // The guard counts the connect in progress as load, so least-connections sees it at once.
        let guard = ActiveGuard::new(backend);
        let backend = guard.backend();
        let t0 = Instant::now();
        let connecting = TcpStream::connect(backend.addr());
        let (reason, error) = match tokio::time::timeout(settings.connect_timeout, connecting).await
        {
            Ok(Ok(stream)) => {
                backend.connect_succeeded();
                backend.metrics.connected_in(t0.elapsed());
                guard.connected();
                let _ = stream.set_nodelay(true);
                return Some((stream, guard));
            }
            Ok(Err(e)) if is_local_exhaustion(&e) => {
                // Out of descriptors or ports here: not the backend's fault, and no other backend would
                // fare better.
                ctx.metrics.rejected_local_resources.increment(1);
                if ctx.should_log_refusal() {
                    tracing::warn!(client = %peer, error = %e,
                        "cannot open a backend connection: this host is out of descriptors or ports; closing client");
                }
                return None;
            }
            Ok(Err(e)) => (classify(&e), e.to_string()),
            Err(_) => (ConnectFailure::Timeout, "connect timed out".to_string()),
        };
        backend.metrics.connect_failed(reason);
        backend.connect_failed(&settings.health, &error);
        tracing::debug!(client = %peer, backend = %backend.who(), reason = reason.as_str(),
            error = %error, "connect to backend failed, trying another");
        tried.push(backend.clone());
    }
    let rejected = if tried.is_empty() {
        &ctx.metrics.rejected_no_backend
    } else {
        &ctx.metrics.rejected_connect_failed
    };
    rejected.increment(1);
    if ctx.should_log_refusal() {
        let tried: Vec<&str> = tried.iter().map(|b| b.id().as_str()).collect();
        tracing::warn!(client = %peer, ?tried, "no backend reachable; closing client");
    }
    None
}

fn classify(e: &io::Error) -> ConnectFailure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
        io::ErrorKind::TimedOut => ConnectFailure::Timeout,
        _ => ConnectFailure::Other,
    }
}

/// Errors that say this host ran out of something (descriptors, buffers, ephemeral ports).
fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}
