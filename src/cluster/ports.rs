//! Whose is a listening port: the checks that keep a foreign process from taking a worker's traffic.
//!
//! On Linux the kernel's socket tables (`/proc/net/tcp`, `/proc/net/tcp6`) give the inode of every
//! listening socket with its port, and `/proc/<pid>/fd` the socket inodes each process holds. A worker is
//! ready only once a socket listening on its port belongs to its own process or one of its descendants;
//! before any worker starts, every worker port must be free, and the error names who holds one that is
//! not. Elsewhere these checks fall back to binding the port (free or not) and to connecting to it
//! (accepting or not), which cannot tell whose a listener is.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// Who listens on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Listener {
    /// Nobody.
    None,
    /// The worker (its process or a descendant).
    Ours,
    /// Another process: its pid and name, when `/proc` tells.
    Foreign(Option<(u32, String)>),
}

/// Checks that `port` is free, before a worker is started on it: `Err` with who holds it otherwise.
pub(super) fn ensure_free(port: u16) -> Result<(), Option<(u32, String)>> {
    #[cfg(target_os = "linux")]
    {
        let inodes = listening_inodes(port);
        if !inodes.is_empty() {
            return Err(holder(&inodes));
        }
    }
    // A bind without SO_REUSEADDR fails if anything holds the port on the wildcard or loopback address.
    match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(None),
        Err(_) => Ok(()), // not ours to judge (e.g. no IPv4): the worker will say
    }
}

/// Who listens on `port` now, for the worker whose process is `pid`.
#[cfg(target_os = "linux")]
pub(super) fn listener_on(port: u16, pid: u32) -> Listener {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return Listener::None;
    }
    let mut family = descendants(pid);
    family.push(pid);
    let ours: HashSet<u64> = family.iter().flat_map(|&p| socket_inodes(p)).collect();
    // Every listener on the port must be the worker's: with SO_REUSEPORT a foreign listener beside it
    // would take a share of the connections.
    let foreign: HashSet<u64> = inodes.difference(&ours).copied().collect();
    if foreign.is_empty() {
        Listener::Ours
    } else {
        Listener::Foreign(holder(&foreign))
    }
}

/// The inodes of the sockets listening on `port`, on any address, IPv4 or IPv6: from the kernel's socket
/// diagnostics (netlink), which list only listening sockets however many connections the host has; from
/// `/proc/net/tcp{,6}` (which lists every socket, thousands on a busy host) if netlink is not there.
#[cfg(target_os = "linux")]
fn listening_inodes(port: u16) -> HashSet<u64> {
    match diag::listeners() {
        Ok(listeners) => listeners
            .into_iter()
            .filter(|&(p, _)| p == port)
            .map(|(_, inode)| inode)
            .collect(),
        Err(_) => proc_listening_inodes(port),
    }
}

#[cfg(target_os = "linux")]
fn proc_listening_inodes(port: u16) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            if let Some(inode) = parse_listener(line, port) {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// One line of `/proc/net/tcp{,6}`: the socket's inode, when it listens on `port`.
fn parse_listener(line: &str, port: u16) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
    let local = fields.get(1)?;
    let state = fields.get(3)?;
    let inode = fields.get(9)?;
    let (_, hex_port) = local.rsplit_once(':')?;
    let listening = *state == "0A";
    (listening && u16::from_str_radix(hex_port, 16).ok()? == port)
        .then(|| inode.parse().ok())
        .flatten()
        .filter(|&i| i != 0)
}

/// The socket inodes `pid` holds open.
#[cfg(target_os = "linux")]
fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Every process below `pid` (children, their children, ...), from `/proc/*/stat`.
#[cfg(target_os = "linux")]
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = processes()
        .filter_map(|p| Some((p, parent_of(p)?)))
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p && !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

#[cfg(target_os = "linux")]
fn processes() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// The parent of `pid`: the fourth field of `/proc/pid/stat`, after the name in parentheses.
#[cfg(target_os = "linux")]
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// The first process holding one of `inodes`, with its name.
#[cfg(target_os = "linux")]
fn holder(inodes: &HashSet<u64>) -> Option<(u32, String)> {
    processes()
        .find(|&p| socket_inodes(p).iter().any(|i| inodes.contains(i)))
        .map(|p| {
            let name = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            (p, name.trim().to_string())
        })
}

#[cfg(not(target_os = "linux"))]
fn holder(_: &HashSet<u64>) -> Option<(u32, String)> {
    None
}

/// `NETLINK_SOCK_DIAG`: the listening TCP sockets of this network namespace, as `ss -lt` reads them.
#[cfg(target_os = "linux")]
mod diag {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const TCP_LISTEN: u32 = 10;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct SockId {
        sport: [u8; 2],
        dport: [u8; 2],
        src: [u32; 4],
        dst: [u32; 4],
        interface: u32,
        cookie: [u32; 2],
    }

    #[repr(C)]
    struct Request {
        len: u32,
        kind: u16,
        flags: u16,
        seq: u32,
        pid: u32,
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: SockId,
    }

    /// The header of a message, and the start of an `inet_diag_msg` after it.
    const HEADER: usize = 16;
    /// Offsets in `inet_diag_msg`: the local port (big-endian), and the inode.
    const SPORT: usize = 4;
    const INODE: usize = 4 + 48 + 16;

    /// Every listening TCP socket: (local port, inode).
    pub(super) fn listeners() -> io::Result<Vec<(u16, u64)>> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and belongs to nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut found = Vec::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let request = Request {
                len: std::mem::size_of::<Request>() as u32,
                kind: SOCK_DIAG_BY_FAMILY,
                flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
                seq: 1,
                pid: 0,
                family,
                protocol: libc::IPPROTO_TCP as u8,
                ext: 0,
                pad: 0,
                states: 1 << TCP_LISTEN,
                id: SockId::default(),
            };
            // SAFETY: sends the bytes of `request`, a plain repr(C) struct that lives across the call,
            // on a descriptor we own; the kernel's netlink address is the default (pid 0).
            let sent = unsafe {
                libc::send(
                    fd.as_raw_fd(),
                    (&request as *const Request).cast(),
                    std::mem::size_of::<Request>(),
                    0,
                )
            };
            if sent < 0 {
                return Err(io::Error::last_os_error());
            }
            read_dump(&fd, &mut found)?;
        }
        Ok(found)
    }

    /// Reads one dump's answers until its end.
    fn read_dump(fd: &OwnedFd, found: &mut Vec<(u16, u64)>) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`, which lives across the call.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut msg = &buf[..n as usize];
            while msg.len() >= HEADER {
                let len = u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
                let kind = u16::from_ne_bytes([msg[4], msg[5]]);
                if len < HEADER || len > msg.len() {
                    return Err(io::Error::other("a malformed sock_diag answer"));
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the request")),
                    _ => {
                        let body = &msg[HEADER..len];
                        if body.len() >= INODE + 4 {
                            let port = u16::from_be_bytes([body[SPORT], body[SPORT + 1]]);
                            let inode = u32::from_ne_bytes([
                                body[INODE],
                                body[INODE + 1],
                                body[INODE + 2],
                                body[INODE + 3],
                            ]);
                            found.push((port, u64::from(inode)));
                        }
                    }
                }
                // Messages are aligned to 4 bytes.
                let next = (len + 3) & !3;
                msg = &msg[next.min(msg.len())..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_are_read() {
        let line = "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_listener(line, 8080), Some(123_456));
        assert_eq!(parse_listener(line, 8081), None);
        let established = line.replace(" 0A ", " 01 ");
        assert_eq!(parse_listener(&established, 8080), None);
        assert_eq!(parse_listener("garbage", 8080), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn netlink_and_proc_see_the_same_listeners() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let l6 = TcpListener::bind("[::1]:0").ok();
        let port = l.local_addr().unwrap().port();
        let from_netlink: HashSet<u64> = diag::listeners()
            .unwrap()
            .into_iter()
            .filter(|&(p, _)| p == port)
            .map(|(_, i)| i)
            .collect();
        assert_eq!(from_netlink.len(), 1);
        assert_eq!(from_netlink, proc_listening_inodes(port));
        if let Some(l6) = l6 {
            let port6 = l6.local_addr().unwrap().port();
            let six: Vec<_> = diag::listeners()
                .unwrap()
                .into_iter()
                .filter(|&(p, _)| p == port6)
                .collect();
            assert_eq!(six.len(), 1, "the IPv6 listener is listed too");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn our_own_listener_is_ours_and_a_port_in_use_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listener_on(port, std::process::id()), Listener::Ours);
        let held = ensure_free(port).unwrap_err();
        assert_eq!(held.map(|(pid, _)| pid), Some(std::process::id()));
        drop(l);
        assert!(ensure_free(port).is_ok());
        assert_eq!(listener_on(port, std::process::id()), Listener::None);
        // Held by this process, but judged for another (a child that holds nothing): foreign, and named.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let judged = listener_on(port, other.id());
        let _ = other.kill();
        let _ = other.wait();
        assert_eq!(
            judged.clone(),
            Listener::Foreign(holder(&listening_inodes(port))),
            "{judged:?}"
        );
        assert!(matches!(judged, Listener::Foreign(Some((pid, _))) if pid == std::process::id()));
    }
}
