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

/// The inodes of the sockets listening on `port`, on any address, IPv4 or IPv6.
#[cfg(target_os = "linux")]
fn listening_inodes(port: u16) -> HashSet<u64> {
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
