//! Shared helpers for the integration tests: small backends on loopback, a balancer in front, data.
#![allow(dead_code)]

pub mod redis;

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use ulb_tcp::{BalancerConfig, BalancerHandle, ShutdownReport, TcpBalancer};

/// A backend server on 127.0.0.1:0; aborted when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Serves each connection with `handler`.
    pub async fn spawn<F, Fut>(handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, handler)
    }

    /// Serves `listener` with `handler`.
    pub fn serve<F, Fut>(listener: TcpListener, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, SeqCst);
                conns.spawn(handler(stream));
                while conns.try_join_next().is_some() {}
            }
        });
        Backend {
            addr,
            accepted,
            task,
        }
    }

    /// Echoes everything; passes the client's FIN back once all is echoed.
    pub async fn echo() -> Backend {
        Self::spawn(echo).await
    }

    /// Writes its one-byte `tag` at once, then echoes until EOF: tells a client which backend it reached
    /// and holds the connection for as long as the client does.
    pub async fn tagged(tag: u8) -> Backend {
        Self::spawn(move |mut s| async move {
            if s.write_all(&[tag]).await.is_ok() {
                echo(s).await;
            }
        })
        .await
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }
}

pub async fn echo(mut s: TcpStream) {
    let (mut r, mut w) = s.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// An address on loopback where nothing listens: connects to it are refused.
pub fn refusing_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A listener that accepts nothing and whose accept queue is full: SYNs to it are dropped, so connects
/// to it time out.
pub fn blackhole() -> (socket2::Socket, std::net::TcpStream, std::net::SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap(); // fills the queue of one
    (s, filler, addr)
}

/// A balancer serving on 127.0.0.1:0; shut down and awaited by [`Running::stop`].
pub struct Running {
    pub addr: SocketAddr,
    pub handle: BalancerHandle,
    pub task: JoinHandle<std::io::Result<ShutdownReport>>,
}

impl Running {
    pub async fn start(config: BalancerConfig) -> Running {
        let balancer = TcpBalancer::new(config).unwrap();
        let handle = balancer.handle();
        let listener = ulb_tcp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(balancer.serve(listener, std::future::pending()));
        Running { addr, handle, task }
    }

    /// The same on `threads` per-core runtimes, each with its own SO_REUSEPORT listener.
    #[cfg(target_os = "linux")]
    pub async fn start_per_core(config: BalancerConfig, threads: usize) -> Running {
        let balancer = TcpBalancer::new(config).unwrap();
        let handle = balancer.handle();
        let threads = std::num::NonZeroUsize::new(threads).unwrap();
        let listeners =
            ulb_tcp::PerCoreListeners::bind("127.0.0.1:0".parse().unwrap(), threads).unwrap();
        let addr = listeners.local_addr();
        let task = tokio::spawn(balancer.serve_per_core(listeners, std::future::pending()));
        Running { addr, handle, task }
    }

    pub async fn stop(self) -> ShutdownReport {
        self.handle.shutdown();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("balancer did not stop")
            .unwrap()
            .unwrap()
    }

    /// Connects and reads the backend's tag byte.
    pub async fn tag(&self) -> (u8, TcpStream) {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("no tag from backend");
        (b[0], s)
    }

    /// Waits until `f` holds for the balancer's stats.
    pub async fn wait_for(&self, what: &str, f: impl Fn(&[ulb_tcp::BackendStats]) -> bool) {
        let handle = self.handle.clone();
        wait_until(what, Duration::from_secs(10), || f(&handle.backends())).await;
    }
}

/// Polls `cond` until it holds or `limit` passes (then panics naming `what`).
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many sockets listen on 127.0.0.1:`port` (from /proc/net/tcp: the kernel's view, no connection made).
#[cfg(target_os = "linux")]
pub fn listening_sockets(port: u16) -> usize {
    let want = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&want.as_str()) && fields.get(3) == Some(&"0A")
        })
        .count()
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a over the bytes: a cheap fingerprint for messages.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Sends `data` through `addr` to an echo backend while reading the echo; half-closes after sending and
/// returns everything read until EOF.
pub async fn echo_roundtrip(addr: SocketAddr, data: Arc<Vec<u8>>) -> std::io::Result<Vec<u8>> {
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let len = data.len();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(64 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::with_capacity(len);
    r.read_to_end(&mut got).await?;
    writer.await.expect("writer panicked")?;
    Ok(got)
}

/// A child process in a process group of its own; the whole group is killed and the child reaped when
/// dropped (SIGKILL also ends a stopped process).
pub struct Proc {
    pub child: Child,
    name: String,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, name: impl Into<String>) -> Proc {
        let name = name.into();
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name }
    }

    /// Sends `sig` to the whole process group (an nginx master and its workers).
    pub fn signal_group(&self, sig: i32) {
        // SAFETY: kill(2) on the process group of our own child; no memory is involved.
        let rc = unsafe { libc::kill(-(self.child.id() as libc::pid_t), sig) };
        assert_eq!(rc, 0, "kill({sig}) of {} failed", self.name);
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Its exit status, once it has exited; `None` if it still runs after `limit`.
    pub async fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: as in signal_group.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory under the system's temporary directory, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ulb-test-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port free now, never handed out before by this test binary (the kernel may give the same
/// ephemeral port twice in a row, and two servers must not race for one).
pub fn unique_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Where `name` is installed (PATH, then the sbin directories that PATH may lack).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The tool, or `None` after saying why the test is skipped (`.ci/run` installs every tool the tests use).
pub fn tool_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    let found = find_tool(name);
    if found.is_none() {
        eprintln!("SKIPPED {test}: `{name}` is not installed (`.ci/run` installs it from Debian)");
    }
    found
}

/// A fixed loopback port below the ephemeral range (20000-32000), free now and never handed out before
/// by this test binary: for configuration files, which name their ports.
pub fn fixed_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let start = 20_000 + (std::process::id() % 12_000) as u16;
    let mut given = GIVEN.lock().unwrap();
    for i in 0..12_000u16 {
        let port = 20_000 + (start - 20_000 + i * 7) % 12_000;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port in 20000-32000");
}
