//! `uring-forward`: a bare TCP forwarder in the shape of ulb-tcp's per-core data path, in two modes, to
//! measure io_uring against epoll on the same program (issue 14).
//!
//! ```text
//! uring-forward --listen ADDR --backend ADDR [--threads N] --mode uring|epoll
//!               [--buf BYTES] [--setup defer|coop|plain] [--direct] [--entries N]
//!               [--recv single|multi] [--bufs N]
//! ```
//!
//! N threads, each with its own `SO_REUSEPORT` listener (TCP_NODELAY set on it, inherited by the accepted
//! sockets) and its own loop: an io_uring ring driven by a completion state machine (`uring.rs`), or a
//! Tokio current-thread runtime (`epoll.rs`). Every client gets a backend connection and both directions
//! are copied through a buffer each; an EOF is passed on with `shutdown(SHUT_WR)`, the last one by the
//! close; a read or write error resets both sides (`SO_LINGER` 0).

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;

use socket2::{Domain, Protocol, Socket, Type};

mod epoll;
mod uring;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Uring,
    Epoll,
}

/// How the ring is set up (`--setup`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// No flags: task work is run by interrupting the thread (TWA_SIGNAL).
    Plain,
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN`.
    Coop,
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN`: task work only in `io_uring_enter`.
    Defer,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    pub backend: SocketAddr,
    pub threads: usize,
    pub buf: usize,
    pub setup: Setup,
    pub direct: bool,
    pub entries: u32,
    /// `--recv multi`: multishot recvs into a provided-buffer ring instead of one recv per buffer.
    pub recv_multi: bool,
    /// `--bufs`: buffers in that ring, per thread.
    pub bufs: u16,
}

const USAGE: &str =
    "usage: uring-forward --listen ADDR --backend ADDR [--threads N] --mode uring|epoll \
                     [--buf BYTES] [--setup defer|coop|plain] [--direct] [--entries N] \
                     [--recv single|multi] [--bufs N]";

fn parse() -> Result<(Mode, Options), String> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut backend, mut mode) = (None, None, None);
    let mut o = Options {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        backend: SocketAddr::from(([127, 0, 0, 1], 0)),
        threads: 2,
        buf: 32 * 1024,
        setup: Setup::Defer,
        direct: false,
        entries: 4096,
        recv_multi: false,
        bufs: 1024,
    };
    while let Some(flag) = args.next() {
        if flag == "--direct" {
            o.direct = true;
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => listen = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--backend" => backend = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--threads" => o.threads = value.parse().map_err(|e| bad(&e))?,
            "--buf" => o.buf = value.parse().map_err(|e| bad(&e))?,
            "--entries" => o.entries = value.parse().map_err(|e| bad(&e))?,
            "--bufs" => o.bufs = value.parse().map_err(|e| bad(&e))?,
            "--recv" => {
                o.recv_multi = match value.as_str() {
                    "single" => false,
                    "multi" => true,
                    _ => return Err(bad(&"want single or multi")),
                }
            }
            "--mode" => {
                mode = Some(match value.as_str() {
                    "uring" => Mode::Uring,
                    "epoll" => Mode::Epoll,
                    _ => return Err(bad(&"want uring or epoll")),
                })
            }
            "--setup" => {
                o.setup = match value.as_str() {
                    "defer" => Setup::Defer,
                    "coop" => Setup::Coop,
                    "plain" => Setup::Plain,
                    _ => return Err(bad(&"want defer, coop or plain")),
                }
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    o.listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    o.backend = backend.ok_or_else(|| format!("--backend is required\n{USAGE}"))?;
    let mode = mode.ok_or_else(|| format!("--mode is required\n{USAGE}"))?;
    if o.threads == 0 || o.threads > 256 {
        return Err("--threads must be 1..=256".into());
    }
    if !(512..=1 << 20).contains(&o.buf) {
        return Err("--buf must be 512..=1048576".into());
    }
    if !(8..=32768).contains(&o.entries) || !o.entries.is_power_of_two() {
        return Err("--entries must be a power of two in 8..=32768".into());
    }
    if !(16..=32768).contains(&o.bufs) || !o.bufs.is_power_of_two() {
        return Err("--bufs must be a power of two in 16..=32768".into());
    }
    Ok((mode, o))
}

/// One listener bound with `SO_REUSEADDR` and `SO_REUSEPORT`, `TCP_NODELAY` (inherited by every accepted
/// socket), backlog 4096.
pub fn listener(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s)
}

/// `threads` listeners on one address; with port 0 the first gets a port and the others share it.
fn listeners(addr: SocketAddr, threads: usize) -> io::Result<(Vec<Socket>, SocketAddr)> {
    let first = listener(addr)?;
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener has no IP address"))?;
    let mut all = vec![first];
    for _ in 1..threads {
        all.push(listener(bound)?);
    }
    Ok((all, bound))
}

/// Raises the soft open-file limit to the hard one (a forwarder holds two descriptors per connection, and
/// `--direct` sizes its registered file table by it).
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid, writable rlimit for the duration of both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// The soft open-file limit.
pub fn nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0 {
        l.rlim_cur
    } else {
        1024
    }
}

fn main() -> ExitCode {
    let (mode, opts) = match parse() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    raise_nofile();
    let (socks, bound) = match listeners(opts.listen, opts.threads) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("uring-forward: listen on {}: {e}", opts.listen);
            return ExitCode::FAILURE;
        }
    };
    // Tests read this line to learn the port chosen for port 0.
    println!("listening on {bound}");
    // Threads run until an error ends one; that ends the process.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for (i, sock) in socks.into_iter().enumerate() {
        let o = opts.clone();
        let tx = done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("fwd-{i}"))
            .spawn(move || {
                let r = match mode {
                    Mode::Uring => uring::run(sock, &o),
                    Mode::Epoll => epoll::run(sock, &o),
                };
                let _ = tx.send((i, r));
            });
        if let Err(e) = spawned {
            eprintln!("uring-forward: spawn thread {i}: {e}");
            return ExitCode::FAILURE;
        }
    }
    drop(done_tx);
    match done_rx.recv() {
        Ok((i, Err(e))) => {
            eprintln!("uring-forward: thread {i}: {e}");
            ExitCode::FAILURE
        }
        Ok((i, Ok(()))) => {
            eprintln!("uring-forward: thread {i} ended");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("uring-forward: a thread panicked");
            ExitCode::FAILURE
        }
    }
}
