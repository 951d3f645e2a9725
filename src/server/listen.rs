//! Binding listeners the way the balancer wants them.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Binds a listening socket the way the balancer wants it: `SO_REUSEADDR`, a deep backlog (so that clients
/// held back by the connection limit wait in the kernel), non-blocking. Must be called inside a Tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Sets `TCP_NODELAY` on a listening socket: on Linux every socket it accepts inherits it, so connections
/// need no `setsockopt` of their own. Best effort; elsewhere each connection sets it.
#[cfg(unix)]
pub(super) fn set_listener_nodelay(listener: &impl std::os::fd::AsFd) {
    if let Err(e) = socket2::SockRef::from(listener).set_tcp_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on the listener");
    }
}
