//! sockmap-forward: a TCP forwarder (one backend) whose data path is either plain user-space copying
//! (`userspace`, the twin) or spliced in the kernel by a sockmap verdict program (`sockmap`). See
//! README.md for the design and how each correctness point is handled.

pub mod bpf;

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};

use bpf::{Map, Prog, SlotState, StateArray};

const BUF: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// BPF_SK_SKB_VERDICT: the verdict runs on each skb as it is read from the receive queue.
    Verdict,
    /// BPF_SK_SKB_STREAM_VERDICT without a parser (the kernel then runs it like `Verdict`).
    Stream,
    /// BPF_SK_SKB_STREAM_VERDICT with a BPF_SK_SKB_STREAM_PARSER (strparser; one message per skb).
    StreamParser,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Userspace,
    Sockmap(Attach),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub backend: SocketAddr,
    pub threads: usize,
    pub mode: Mode,
    pub idle_timeout: Duration,
    /// How long an ended direction may wait for its redirected bytes to reach the peer before the
    /// connection is reset.
    pub drain_timeout: Duration,
    pub log_conns: bool,
    /// Testing: the program passes each socket's bytes to user space until user space has forwarded a
    /// first read of them, so that the hand-over from user space to the program happens mid-stream.
    pub late_handover: bool,
}

pub const USAGE: &str = "usage: sockmap-forward --listen ADDR --backend ADDR [--threads N (2)] \
--mode sockmap|userspace [--attach verdict|stream|stream-parser (verdict)] [--idle-timeout SECS (300)] \
[--drain-timeout SECS (10)] [--log-conns] [--late-handover]";

pub fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut listen = None;
    let mut backend = None;
    let mut threads = 2;
    let mut mode = None;
    let mut attach = Attach::Verdict;
    let mut idle = 300.0;
    let mut drain = 10.0;
    let mut log_conns = false;
    let mut late_handover = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = Some(val()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--backend" => backend = Some(val()?.parse().map_err(|e| format!("--backend: {e}"))?),
            "--threads" => threads = val()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--mode" => mode = Some(val()?),
            "--attach" => {
                attach = match val()?.as_str() {
                    "verdict" => Attach::Verdict,
                    "stream" => Attach::Stream,
                    "stream-parser" => Attach::StreamParser,
                    o => return Err(format!("--attach: unknown {o}")),
                }
            }
            "--idle-timeout" => {
                idle = val()?.parse().map_err(|e| format!("--idle-timeout: {e}"))?
            }
            "--drain-timeout" => {
                drain = val()?
                    .parse()
                    .map_err(|e| format!("--drain-timeout: {e}"))?
            }
            "--log-conns" => log_conns = true,
            "--late-handover" => late_handover = true,
            o => return Err(format!("unknown argument {o}")),
        }
    }
    let mode = match mode.as_deref() {
        Some("userspace") => Mode::Userspace,
        Some("sockmap") => Mode::Sockmap(attach),
        Some(o) => return Err(format!("--mode: unknown {o}")),
        None => return Err("--mode is needed".into()),
    };
    if threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    Ok(Config {
        listen: listen.ok_or("--listen is needed")?,
        backend: backend.ok_or("--backend is needed")?,
        threads,
        mode,
        idle_timeout: Duration::from_secs_f64(idle),
        drain_timeout: Duration::from_secs_f64(drain),
        log_conns,
        late_handover,
    })
}

// ---------------------------------------------------------------------------------------------------
// The kernel side: maps and programs, shared by every thread.

/// Connection pairs (two sockets each) the maps hold.
const PAIRS: u32 = 16 * 1024;

struct Kernel {
    /// SOCKMAP: slot → socket. Slots 2p and 2p+1 are pair p's client and backend sockets.
    socks: Map,
    /// HASH: socket cookie → slot (how the program finds its socket's state).
    slots: Map,
    /// ARRAY (mmap-ed): slot → SlotState.
    state: StateArray,
    /// Kept so the programs are closed with the maps (they stay attached while the sockmap lives).
    _progs: Vec<Prog>,
}

impl Kernel {
    fn new(attach: Attach) -> io::Result<Kernel> {
        let socks = Map::create(bpf::MAP_TYPE_SOCKMAP, 4, 4, 2 * PAIRS, "fwd_socks", false)?;
        let slots = Map::create(bpf::MAP_TYPE_HASH, 8, 4, 2 * PAIRS, "fwd_slots", false)?;
        let state = StateArray::create(2 * PAIRS)?;
        let insns = bpf::verdict_program(&slots, state.map(), &socks)?;
        let verdict_type = match attach {
            Attach::Verdict => bpf::ATTACH_SK_SKB_VERDICT,
            Attach::Stream | Attach::StreamParser => bpf::ATTACH_SK_SKB_STREAM_VERDICT,
        };
        let verdict = Prog::load_sk_skb(&insns, "fwd_verdict", verdict_type)?;
        let mut progs = Vec::new();
        if attach == Attach::StreamParser {
            let parser = Prog::load_sk_skb(
                &bpf::parser_program()?,
                "fwd_parser",
                bpf::ATTACH_SK_SKB_STREAM_PARSER,
            )?;
            parser.attach(&socks, bpf::ATTACH_SK_SKB_STREAM_PARSER)?;
            progs.push(parser);
        }
        verdict.attach(&socks, verdict_type)?;
        progs.push(verdict);
        Ok(Kernel {
            socks,
            slots,
            state,
            _progs: progs,
        })
    }
}

// ---------------------------------------------------------------------------------------------------
// Threads, listeners, accept loops.

struct Shared {
    cfg: Config,
    kernel: Option<Kernel>,
}

struct ThreadCtx {
    shared: Arc<Shared>,
    /// This thread's free connection pairs (its own range of the maps).
    pairs: Mutex<Vec<u32>>,
}

fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Accepted sockets inherit it.
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Runs until killed. Prints `listening on ADDR` on stdout once every thread's listener is bound.
pub fn run(cfg: Config) -> io::Result<()> {
    let kernel = match cfg.mode {
        Mode::Userspace => None,
        Mode::Sockmap(attach) => Some(Kernel::new(attach)?),
    };
    let first = listener(cfg.listen)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..cfg.threads {
        listeners.push(listener(addr)?);
    }
    let threads = cfg.threads as u32;
    let shared = Arc::new(Shared { cfg, kernel });
    let per = PAIRS / threads;
    let mut handles = Vec::new();
    for (t, l) in listeners.into_iter().enumerate() {
        let t = t as u32;
        let ctx = Arc::new(ThreadCtx {
            shared: shared.clone(),
            pairs: Mutex::new((t * per..(t + 1) * per).rev().collect()),
        });
        handles.push(std::thread::Builder::new().name(format!("fwd-{t}")).spawn(
            move || -> io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(accept_loop(l, ctx))
            },
        )?);
    }
    println!("listening on {addr}");
    use std::io::Write;
    io::stdout().flush()?;
    for h in handles {
        match h.join() {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::other("a thread panicked")),
        }
    }
    Ok(())
}

async fn accept_loop(l: std::net::TcpListener, ctx: Arc<ThreadCtx>) -> io::Result<()> {
    let l = TcpListener::from_std(l)?;
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve(s, ctx.clone()));
            }
            Err(e) => {
                eprintln!("accept: {e}");
                // Out of descriptors and the like: let connections end before trying again.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// One connection.

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// Both directions ended with a FIN, every byte carried.
    Closed,
    /// One side failed (a reset, or an error): both are reset.
    Failed(&'static str, io::Error),
    Idle,
}

/// Per-direction byte counts.
#[derive(Default)]
struct Counts {
    /// Bytes user space wrote into the destination.
    user: AtomicU64,
    /// Bytes read after the hand-over to the program (should stay 0: see README, point 1).
    stray: AtomicU64,
    /// sockmap: what the destination socket had taken (TCP_INFO) when the direction ended, before its FIN.
    tcp: AtomicU64,
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec. CLOCK_MONOTONIC is what bpf_ktime_get_ns() reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn reset(s: &impl std::os::fd::AsFd) {
    // SO_LINGER 0: the close sends a RST.
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

async fn serve(client: TcpStream, ctx: Arc<ThreadCtx>) {
    let cfg = &ctx.shared.cfg;
    let backend =
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(cfg.backend)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                if cfg.log_conns {
                    eprintln!("conn end=connect-failed error={e}");
                }
                reset(&client);
                return;
            }
            Err(_) => {
                reset(&client);
                return;
            }
        };
    let _ = backend.set_nodelay(true);
    let (up, down) = (Counts::default(), Counts::default());
    let pair = match (&ctx.shared.kernel, ctx.pairs.lock()) {
        (Some(_), Ok(mut p)) => p.pop(),
        _ => None,
    };
    let (end, kernel_counts) = match (&ctx.shared.kernel, pair) {
        (Some(k), Some(pair)) => {
            // Closes both sockets (so that they leave the sockmap) before the pair is used again.
            let r = spliced(k, pair, client, backend, cfg, &up, &down).await;
            if let Ok(mut p) = ctx.pairs.lock() {
                p.push(pair);
            }
            r
        }
        // userspace mode, or no free pair: carried in user space.
        _ => (userspace(&client, &backend, cfg, &up, &down).await, None),
    };
    if cfg.log_conns {
        let (ur, dr) = kernel_counts.unwrap_or((0, 0));
        let (up_tcp, down_tcp) = (
            up.tcp.load(Ordering::Relaxed),
            down.tcp.load(Ordering::Relaxed),
        );
        let err = match &end {
            End::Failed(what, e) => format!(" error={what}:{e}"),
            _ => String::new(),
        };
        let end_name = match end {
            End::Closed => "closed",
            End::Failed(..) => "reset",
            End::Idle => "idle",
        };
        let (uu, du) = (
            up.user.load(Ordering::Relaxed),
            down.user.load(Ordering::Relaxed),
        );
        eprintln!(
            "conn end={end_name} up={} down={} up_user={uu} up_redirected={ur} down_user={du} \
             down_redirected={dr} up_tcp={up_tcp} down_tcp={down_tcp} stray={}{err}",
            uu + ur,
            du + dr,
            up.stray.load(Ordering::Relaxed) + down.stray.load(Ordering::Relaxed),
        );
    }
}

async fn write_all(dst: &TcpStream, mut b: &[u8], counts: &Counts) -> io::Result<()> {
    while !b.is_empty() {
        match dst.try_write(b) {
            Ok(n) => {
                b = &b[n..];
                counts.user.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `last()` (ns, CLOCK_MONOTONIC) is `idle` old.
async fn idle_watch(last: impl Fn() -> u64, idle: Duration) {
    let idle = idle.as_nanos() as u64;
    loop {
        let deadline = last().saturating_add(idle);
        let now = now_ns();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_nanos(deadline - now)).await;
    }
}

/// Runs both directions and the idle watch: `Closed` once both directions ended.
async fn both(
    up: impl std::future::Future<Output = Result<(), End>>,
    down: impl std::future::Future<Output = Result<(), End>>,
    idle: impl std::future::Future<Output = ()>,
) -> End {
    tokio::pin!(up, down, idle);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return e,
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return e,
            },
            () = &mut idle => return End::Idle,
        }
        if up_done && down_done {
            return End::Closed;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// userspace: the twin.

async fn userspace(
    client: &TcpStream,
    backend: &TcpStream,
    cfg: &Config,
    up: &Counts,
    down: &Counts,
) -> End {
    let last = AtomicU64::new(now_ns());
    let end = both(
        copy(client, backend, up, &last, "client", "backend"),
        copy(backend, client, down, &last, "backend", "client"),
        idle_watch(|| last.load(Ordering::Relaxed), cfg.idle_timeout),
    )
    .await;
    if let End::Failed(..) = end {
        reset(client);
        reset(backend);
    }
    end
}

async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    counts: &Counts,
    last: &AtomicU64,
    src_name: &'static str,
    dst_name: &'static str,
) -> Result<(), End> {
    let mut buf = vec![0u8; BUF];
    loop {
        src.readable().await.map_err(|e| End::Failed(src_name, e))?;
        match src.try_read(&mut buf) {
            Ok(0) => {
                return SockRef::from(dst)
                    .shutdown(Shutdown::Write)
                    .map_err(|e| End::Failed(dst_name, e))
            }
            Ok(n) => {
                last.store(now_ns(), Ordering::Relaxed);
                write_all(dst, &buf[..n], counts)
                    .await
                    .map_err(|e| End::Failed(dst_name, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(End::Failed(src_name, e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// sockmap: the kernel-spliced path.

fn cookie(s: &TcpStream) -> io::Result<u64> {
    let mut v = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid and writable, `len` is `v`'s size.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            &mut v as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Every byte ever written into this socket (accepted into its send queue): tcpi_bytes_sent −
/// tcpi_bytes_retrans + tcpi_notsent_bytes, from one TCP_INFO (taken under the socket lock).
fn tcp_written(fd: RawFd) -> io::Result<u64> {
    let mut info = [0u8; 232];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes; the kernel writes at most `len` and sets it.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < 216 {
        return Err(io::Error::other(
            "TCP_INFO too short for tcpi_bytes_retrans",
        ));
    }
    let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().unwrap_or([0; 8]));
    let notsent = u32::from_ne_bytes(info[144..148].try_into().unwrap_or([0; 4])) as u64;
    Ok(u64_at(200) - u64_at(208) + notsent)
}

/// Makes the socket's data_ready run now (`SO_RCVLOWAT` calls `tcp_data_ready`), so that bytes queued
/// before it entered the sockmap go through the verdict program like the later ones.
fn kick(s: &TcpStream) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn init_slot(st: &SlotState, peer: u32) {
    st.ready.store(0, Ordering::Release);
    st.peer.store(peer, Ordering::Relaxed);
    st.passed.store(0, Ordering::Relaxed);
    st.forwarded.store(0, Ordering::Relaxed);
    st.redirected.store(0, Ordering::Relaxed);
    st.last_ns.store(now_ns(), Ordering::Release);
}

enum Refused {
    /// Nothing was lost: carry the connection in user space.
    Fallback,
    /// Bytes may have been lost (or the maps are broken): reset the connection.
    Fatal(io::Error),
}

/// Puts both sockets in the maps and hands them to the program. Returns their cookies.
///
/// The kernel takes only ESTABLISHED TCP sockets into a sockmap (EOPNOTSUPP otherwise): a client that
/// half-closed before we got here (CLOSE_WAIT) stays in user space, which is then the whole connection's
/// path.
fn enter(
    k: &Kernel,
    slot_c: u32,
    slot_b: u32,
    client: &TcpStream,
    backend: &TcpStream,
    late_handover: bool,
) -> Result<[u64; 2], Refused> {
    let fatal = Refused::Fatal;
    let (cc, cb) = (
        cookie(client).map_err(fatal)?,
        cookie(backend).map_err(fatal)?,
    );
    let (st_c, st_b) = (k.state.get(slot_c), k.state.get(slot_b));
    init_slot(st_c, slot_b);
    init_slot(st_b, slot_c);
    let forget = || {
        let _ = k.slots.delete(&cc);
        let _ = k.slots.delete(&cb);
    };
    if let Err(e) = k
        .slots
        .update(&cc, &slot_c)
        .and_then(|()| k.slots.update(&cb, &slot_b))
    {
        forget();
        return Err(fatal(e));
    }
    if k.socks
        .update(&slot_c, &(client.as_raw_fd() as u32))
        .is_err()
    {
        forget();
        return Err(Refused::Fallback);
    }
    if k.socks
        .update(&slot_b, &(backend.as_raw_fd() as u32))
        .is_err()
    {
        let _ = k.socks.delete(&slot_c);
        forget();
        // Bytes the program passed to the client's psock queue meanwhile went with the psock.
        if st_c.passed.load(Ordering::Acquire) == 0 {
            return Err(Refused::Fallback);
        }
        return Err(fatal(io::Error::other(
            "backend refused by the sockmap after bytes were passed",
        )));
    }
    // Both are in the sockmap now: a redirect finds its peer.
    if !late_handover {
        st_c.ready.store(1, Ordering::Release);
        st_b.ready.store(1, Ordering::Release);
    }
    if let Err(e) = kick(client).and_then(|()| kick(backend)) {
        forget();
        return Err(fatal(e));
    }
    Ok([cc, cb])
}

type KernelCounts = Option<(u64, u64)>;

async fn spliced(
    k: &Kernel,
    pair: u32,
    client: TcpStream,
    backend: TcpStream,
    cfg: &Config,
    up: &Counts,
    down: &Counts,
) -> (End, KernelCounts) {
    let (slot_c, slot_b) = (2 * pair, 2 * pair + 1);
    let cookies = match enter(k, slot_c, slot_b, &client, &backend, cfg.late_handover) {
        Ok(c) => c,
        Err(Refused::Fallback) => {
            return (userspace(&client, &backend, cfg, up, down).await, None);
        }
        Err(Refused::Fatal(e)) => {
            reset(&client);
            reset(&backend);
            return (End::Failed("sockmap setup", e), None);
        }
    };
    // Off tokio's epoll: each socket gets an epoll of its own whose interest we can narrow (see Watched).
    let socks = client
        .into_std()
        .and_then(Watched::new)
        .and_then(|c| Ok((c, backend.into_std().and_then(Watched::new)?)));
    let (client, backend) = match socks {
        Ok(s) => s,
        Err(e) => {
            for c in cookies {
                let _ = k.slots.delete(&c);
            }
            // The sockets, dropped here, are closed by a RST: their bytes may be anywhere.
            return (End::Failed("watch setup", e), None);
        }
    };
    let (client, backend) = (&client, &backend);
    let (st_c, st_b) = (k.state.get(slot_c), k.state.get(slot_b));
    let end = both(
        redirected_pump(client, backend, st_c, up, cfg, "client", "backend"),
        redirected_pump(backend, client, st_b, down, cfg, "backend", "client"),
        idle_watch(
            || {
                st_c.last_ns
                    .load(Ordering::Relaxed)
                    .max(st_b.last_ns.load(Ordering::Relaxed))
            },
            cfg.idle_timeout,
        ),
    )
    .await;
    let counts = Some((
        st_c.redirected.load(Ordering::Acquire),
        st_b.redirected.load(Ordering::Acquire),
    ));
    for c in cookies {
        let _ = k.slots.delete(&c);
    }
    if let End::Failed(..) = end {
        reset(&client.sock);
        reset(&backend.sock);
    }
    // The sockets leave the sockmap when they are closed, here.
    (end, counts)
}

/// A socket of a spliced connection, off tokio's epoll: it sits alone in an epoll of its own, which
/// tokio watches. Its interest is EPOLLIN | EPOLLOUT | EPOLLRDHUP while user space reads it, and only
/// EPOLLOUT | EPOLLRDHUP (EPOLLERR and EPOLLHUP come anyway) once the program carries its bytes: then
/// the wake-up of each redirected skb (`sk_psock_data_ready`, keyed EPOLLIN) is filtered out by the
/// kernel before it reaches any epoll, and this process sleeps while the kernel forwards.
///
/// Both directions wait on the same readiness (one reads the socket, the other writes it): every wait
/// ends on any event and every waiter retries its operation, so no wake-up is lost.
struct Watched {
    sock: std::net::TcpStream,
    epoll: AsyncFd<OwnedFd>,
}

const WATCH_ALL: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const WATCH_NO_DATA: u32 = (libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

impl Watched {
    fn new(sock: std::net::TcpStream) -> io::Result<Watched> {
        // SAFETY: plain system call; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` was just returned to us and is owned by nothing else.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        epoll_ctl(
            ep.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            sock.as_raw_fd(),
            WATCH_ALL,
        )?;
        // SAFETY: `ep` is an open epoll fd, owned by the AsyncFd for its whole life (OwnedFd's fd never
        // changes).
        let epoll = unsafe { AsyncFd::register_with_interest(ep, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Watched { sock, epoll })
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Stops (for good) the wake-ups of this socket's data.
    fn ignore_data(&self) -> io::Result<()> {
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_MOD,
            self.fd(),
            WATCH_NO_DATA,
        )
    }

    /// Until the next event of this socket (any).
    async fn wait(&self) -> io::Result<()> {
        loop {
            let mut g = self.epoll.readable().await?;
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
            // SAFETY: `evs` is a writable array of 2 epoll_events; timeout 0 does not block.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), evs.as_mut_ptr(), 2, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            g.clear_ready();
            if n > 0 {
                return Ok(());
            }
        }
    }

    async fn write_all(&self, mut b: &[u8], counts: &Counts) -> io::Result<()> {
        while !b.is_empty() {
            match raw_send(self.fd(), b) {
                Ok(n) => {
                    b = &b[n..];
                    counts.user.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn epoll_ctl(ep: RawFd, op: libc::c_int, fd: RawFd, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: 0 };
    // SAFETY: `ep` and `fd` are open descriptors; `ev` is a valid epoll_event.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn raw_send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a readable buffer of `buf.len()` bytes.
    let r = unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// recv(2), non-blocking.
fn raw_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a writable buffer of `buf.len()` bytes.
    let r = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Polls with a growing pause (1 ms up to 32 ms) until `done()` or `limit`: there is no event for "the
/// peer's psock backlog has written everything" nor for "the passed bytes reached the queue".
async fn poll_until(mut done: impl FnMut() -> io::Result<bool>, limit: Duration) -> io::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if done()? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "redirected bytes not drained",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(32));
    }
}

/// One direction of a spliced connection, `src` → `dst`:
/// 1. while the program passes `src`'s bytes, read and forward them (publishing `forwarded`);
/// 2. once it redirects (and every passed byte is forwarded), wait only for EOF or an error;
/// 3. at EOF, wait until `dst` has taken every byte (forwarded + redirected), then pass the FIN on.
async fn redirected_pump(
    src: &Watched,
    dst: &Watched,
    st: &SlotState,
    counts: &Counts,
    cfg: &Config,
    src_name: &'static str,
    dst_name: &'static str,
) -> Result<(), End> {
    let read_failed = |e| End::Failed(src_name, e);
    let write_failed = |e| End::Failed(dst_name, e);
    let mut buf = vec![0u8; BUF];
    let mut forwarded = 0u64;
    let mut eof = false;
    // 1. Passing. `passed` is read after `redirected`: once the program redirects, `passed` stays.
    while !(st.redirected.load(Ordering::Acquire) > 0
        && st.passed.load(Ordering::Acquire) == forwarded)
    {
        match raw_recv(src.fd(), &mut buf) {
            Ok(0) => {
                if st.passed.load(Ordering::Acquire) == forwarded {
                    eof = true;
                    break;
                }
                // EOF read while passed bytes are still in the psock's backlog (on their way to the
                // queue): they come before the FIN.
                poll_until(
                    || Ok(st.passed.load(Ordering::Acquire) == forwarded || has_data(src.fd())),
                    cfg.drain_timeout,
                )
                .await
                .map_err(read_failed)?;
            }
            Ok(n) => {
                dst.write_all(&buf[..n], counts)
                    .await
                    .map_err(write_failed)?;
                forwarded += n as u64;
                st.forwarded.store(forwarded, Ordering::Release);
                // --late-handover: the program may redirect from now on.
                st.ready.store(1, Ordering::Release);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                src.wait().await.map_err(read_failed)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_failed(e)),
        }
    }
    // 2. Redirecting: only EOF, a reset or an error wakes us.
    if !eof {
        src.ignore_data().map_err(read_failed)?;
        loop {
            match raw_recv(src.fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    // Should not happen (README, point 1); carried and counted if it does.
                    counts.stray.fetch_add(n as u64, Ordering::Relaxed);
                    dst.write_all(&buf[..n], counts)
                        .await
                        .map_err(write_failed)?;
                    forwarded += n as u64;
                    st.forwarded.store(forwarded, Ordering::Release);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.wait().await.map_err(read_failed)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_failed(e)),
            }
        }
    }
    // 3. Drain, then the FIN.
    let fd = dst.fd();
    poll_until(
        || {
            let taken = tcp_written(fd)?;
            counts.tcp.store(taken, Ordering::Relaxed);
            Ok(taken >= forwarded + st.redirected.load(Ordering::Acquire))
        },
        cfg.drain_timeout,
    )
    .await
    .map_err(write_failed)?;
    dst.sock.shutdown(Shutdown::Write).map_err(write_failed)
}

/// Whether a read would find bytes (FIONREAD is not meaningful on a psock; a peek is).
fn has_data(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: `b` is a writable 1-byte buffer.
    let r = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr() as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    r > 0
}
