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

/// Readies a listening socket for the balancer that starts accepting on it.
///
/// `TCP_NODELAY`: on Linux every socket it accepts inherits it, so connections need no `setsockopt` of
/// their own. Best effort; elsewhere each connection sets it.
///
/// `TCP_DEFER_ACCEPT` (Linux): set to the balancer's [`defer_accept`](crate::BalancerConfig::defer_accept)
/// in whole seconds, rounded up, and to 0 when it is off, since a listener handed over from another
/// balancer (a reload) may carry that one's setting. A failure is returned: the operator asked for it.
#[cfg(unix)]
pub(super) fn prepare(
    listener: &impl std::os::fd::AsFd,
    config: &crate::BalancerConfig,
) -> io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    if let Err(e) = socket.set_tcp_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on the listener");
    }
    #[cfg(target_os = "linux")]
    set_defer_accept(listener, config.defer_accept)?;
    #[cfg(not(target_os = "linux"))]
    let _ = config;
    Ok(())
}

/// `setsockopt(TCP_DEFER_ACCEPT)` with `wait` in whole seconds, rounded up (validated to at most
/// [`MAX_DEFER_ACCEPT`](crate::config::MAX_DEFER_ACCEPT), so the count fits an `int`).
#[cfg(target_os = "linux")]
fn set_defer_accept(
    listener: &impl std::os::fd::AsFd,
    wait: std::time::Duration,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = libc::c_int::try_from(secs)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "defer_accept is too long"))?;
    let fd = listener.as_fd().as_raw_fd();
    // SAFETY: `fd` is an open socket borrowed for this call, and the option value is a live `c_int` whose
    // size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot set TCP_DEFER_ACCEPT to {secs} s on the listener: {e}"),
        ));
    }
    Ok(())
}
