//! The descriptor budget, through the real `ulb-tcp` binary under `prlimit`: a spliced direction holds a
//! pipe (two descriptors) as well as its two sockets, so at a small open-file limit the pipes must be
//! bounded, a direction that cannot have one must carry its bytes through a buffer instead (never reset
//! the connection), and pooled pipes must not pin descriptors once the clients have left.
#![cfg(target_os = "linux")]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, Backend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");

/// The open-file limit of the fault test that found the failure.
const NOFILE: u32 = 200;
/// Concurrent bulk transfers: what the old default (2 descriptors a connection) allowed at `NOFILE`.
const CLIENTS: usize = 68;
/// Bytes each client sends (and gets back from the echo backend).
const BULK: usize = 4 << 20;
/// The balancer's default pipe bound at `NOFILE`: (200 - 64 - 2 × 51) / 2, where 51 = (200 - 64) × 3/8
/// is its default connection limit there.
const DEFAULT_PIPES: usize = 17;
/// Pipe descriptors above the idle count allowed once the clients have left, for a bound of
/// `max_pipes`: the pools keep at most a quarter of the bound (at `DEFAULT_PIPES`, 4 pipes: 8
/// descriptors).
fn idle_slack(max_pipes: usize) -> usize {
    max_pipes / 4 * 2
}

/// A child process that is killed and reaped when dropped, and the thread that reads its log.
struct Proc(Child, Option<std::thread::JoinHandle<LogCounts>>);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Kills and reaps the balancer, then returns what its log said (its stderr ends with it).
    fn stop(mut self) -> LogCounts {
        let _ = self.0.kill();
        let _ = self.0.wait();
        self.1
            .take()
            .map(|t| t.join().expect("log reader panicked"))
            .unwrap_or_default()
    }
}

/// Lines of the balancer's log that say a descriptor was missing.
#[derive(Debug, Default)]
struct LogCounts {
    /// Carried connections that ended on EMFILE/ENFILE (a pipe, mid-stream).
    closed_for_want_of_a_descriptor: usize,
    /// Clients closed because their backend connection could not be opened.
    not_carried: usize,
    /// `accept()` failures.
    accept_failed: usize,
}

/// Counts the log lines of interest until the balancer's stderr closes.
fn read_log(stderr: std::process::ChildStderr) -> std::thread::JoinHandle<LogCounts> {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut c = LogCounts::default();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("connection closed") && line.contains("Too many open files") {
                c.closed_for_want_of_a_descriptor += 1;
            } else if line.contains("cannot open a backend connection") {
                c.not_carried += 1;
            } else if line.contains("accept failed") {
                c.accept_failed += 1;
            }
        }
        c
    })
}

fn prlimit_available() -> bool {
    Command::new("prlimit")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts `ulb-tcp` under `prlimit --nofile=NOFILE:NOFILE` on a free port (and a metrics port) and waits
/// until it accepts. `prlimit` execs the command, so the child's pid is the balancer's.
async fn start(extra: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    for _ in 0..5 {
        let (listen, metrics) = (free_port(), free_port());
        let nofile = format!("--nofile={NOFILE}:{NOFILE}");
        let mut child = Command::new("prlimit")
            .arg(&nofile)
            .arg(BIN)
            .args(["--listen", &listen.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(extra)
            // Debug for the proxy: one line per connection closed, with how it ended.
            .env("RUST_LOG", "warn,ulb_tcp::proxy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = child.stderr.take().map(read_log);
        let mut child = Proc(child, log);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect(listen).await.is_ok() {
                return (child, listen, metrics);
            }
            if child.0.try_wait().unwrap().is_some() {
                break; // a port was taken in between: try others
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = child.0.kill();
    }
    panic!("the balancer never started accepting");
}

/// The process's open descriptors: (all, pipes).
fn open_fds(pid: u32) -> (usize, usize) {
    let (mut all, mut pipes) = (0, 0);
    for target in fd_targets(pid) {
        all += 1;
        if target.starts_with("pipe:") {
            pipes += 1;
        }
    }
    (all, pipes)
}

/// What each of `pid`'s descriptors names (`socket:[INODE]`, `pipe:[INODE]`, `anon_inode:[eventpoll]`...).
fn fd_targets(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect()
}

/// The `socket:[INODE]` names of every TCP socket on this host that is not listening.
fn tcp_connection_sockets() -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(&state), Some(&inode)) = (f.get(3), f.get(9)) {
                if state != "0A" {
                    out.insert(format!("socket:[{inode}]"));
                }
            }
        }
    }
    out
}

/// `pid`'s descriptors (all, pipes) if it holds no TCP connection: the same descriptors before and
/// after the kernel's TCP tables are read, none of them a connection in those tables. (One reading of
/// each could miss a connection opened or closed in between.)
fn idle_fds(pid: u32) -> Option<(usize, usize)> {
    let mut before = fd_targets(pid);
    let connections = tcp_connection_sockets();
    let mut after = fd_targets(pid);
    before.sort();
    after.sort();
    let idle = before == after && !after.iter().any(|t| connections.contains(t));
    idle.then(|| {
        let pipes = after.iter().filter(|t| t.starts_with("pipe:")).count();
        (after.len(), pipes)
    })
}

/// Polls until `pid` holds no TCP connection and at most `bound` descriptors (when given), or `limit`
/// passes; returns the descriptors open then.
async fn wait_until_idle(pid: u32, bound: Option<usize>, limit: Duration) -> (usize, usize) {
    let start = Instant::now();
    loop {
        if let Some(fds) = idle_fds(pid) {
            if bound.is_none_or(|b| fds.0 <= b) {
                return fds;
            }
        }
        if start.elapsed() > limit {
            return open_fds(pid);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How one client's transfer went.
#[derive(Debug)]
enum Outcome {
    /// Every byte came back, in order.
    Exact,
    /// The connection was reset, or another I/O error, after `got` bytes.
    Failed { got: usize, error: String },
    /// The echo ended early, or a byte differs (the first at `at`).
    Corrupt { got: usize, at: usize },
}

/// Sends `BULK` bytes (the shared pattern, rotated by `offset`, so that each stream is its own) through
/// the balancer to the echo backend while reading the echo, half-closes, and checks every byte.
async fn transfer(addr: SocketAddr, data: Arc<Vec<u8>>, offset: usize) -> Outcome {
    let s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            return Outcome::Failed {
                got: 0,
                error: format!("connect: {e}"),
            }
        }
    };
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        let (head, tail) = sent.split_at(offset);
        for chunk in tail.chunks(64 << 10).chain(head.chunks(64 << 10)) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let expected = |i: usize| data[(offset + i) % data.len()];
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 << 10];
    let outcome = loop {
        match r.read(&mut buf).await {
            Ok(0) => {
                break if got == data.len() {
                    Outcome::Exact
                } else {
                    Outcome::Corrupt { got, at: got }
                }
            }
            Ok(n) => {
                // Compare the run against the rotated pattern, in at most two slices.
                let start = (offset + got) % data.len();
                let first = n.min(data.len() - start);
                let ok = got + n <= data.len()
                    && buf[..first] == data[start..start + first]
                    && buf[first..n] == data[..n - first];
                if !ok {
                    let at = (0..n)
                        .find(|&i| got + i >= data.len() || buf[i] != expected(got + i))
                        .map_or(got, |i| got + i);
                    break Outcome::Corrupt { got: got + n, at };
                }
                got += n;
            }
            Err(e) => {
                break Outcome::Failed {
                    got,
                    error: e.to_string(),
                }
            }
        }
    };
    match writer.await.expect("writer panicked") {
        Ok(_) => outcome,
        Err(e) if matches!(outcome, Outcome::Exact) => Outcome::Failed {
            got,
            error: format!("write: {e}"),
        },
        Err(_) => outcome,
    }
}

/// Scrapes `/metrics` and returns the sum of the series named `name` (any labels), if there is one.
async fn scrape_sum(metrics: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(metrics).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let base = series.split('{').next().unwrap_or(series);
        if base == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}

/// One run at a time: each loads both cores, and they would compete for them.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a run saw.
#[derive(Debug)]
struct Report {
    exact: usize,
    failed: Vec<String>,
    /// Of the failed, those that got no byte back.
    before_any_byte: usize,
    baseline: (usize, usize),
    peak: (usize, usize),
    after: (usize, usize),
    fallbacks: Option<f64>,
    log: LogCounts,
}

/// `CLIENTS` concurrent bulk transfers through the balancer under `prlimit` (with `extra` flags, which
/// make its pipe bound `max_pipes`), then the descriptors it keeps once they have left.
async fn bulk_under_prlimit(extra: &[&str], max_pipes: usize) -> Report {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::echo().await;
    let target = backend.addr.to_string();
    let mut args = vec!["--backends", target.as_str()];
    args.extend_from_slice(extra);
    let (lb, listen, metrics) = start(&args).await;
    let pid = lb.pid();
    // The connect that saw it accepting may still be carried inside: the baseline is taken once the
    // balancer holds no TCP connection.
    let baseline = wait_until_idle(pid, None, Duration::from_secs(10)).await;

    let data = Arc::new(pattern(0xfd, BULK));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let data = data.clone();
        tasks.spawn(transfer(listen, data, i * 61_681 % BULK));
    }
    // Watch the descriptors while the transfers run.
    let mut peak = (0, 0);
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while outcomes.len() < CLIENTS {
        let now = open_fds(pid);
        peak = (peak.0.max(now.0), peak.1.max(now.1));
        match tokio::time::timeout(Duration::from_millis(20), tasks.join_next()).await {
            Ok(Some(r)) => outcomes.push(r.expect("a client panicked")),
            Ok(None) => break,
            Err(_elapsed) => {}
        }
        assert!(Instant::now() < deadline, "the transfers did not finish");
    }
    let exact = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Exact))
        .count();
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Exact => None,
            Outcome::Failed { got, error } => Some(format!("failed after {got} bytes: {error}")),
            Outcome::Corrupt { got, at } => {
                Some(format!("ended or differed at byte {at} ({got} bytes read)"))
            }
        })
        .collect();
    let before_any_byte = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o,
                Outcome::Failed { got: 0, .. } | Outcome::Corrupt { got: 0, .. }
            )
        })
        .count();
    let bound = baseline.0 + idle_slack(max_pipes);
    let after = wait_until_idle(pid, Some(bound), Duration::from_secs(10)).await;
    let fallbacks = scrape_sum(metrics, "ulb_splice_fallbacks_total").await;
    let log = lb.stop();
    Report {
        exact,
        failed,
        before_any_byte,
        baseline,
        peak,
        after,
        fallbacks,
        log,
    }
}

/// Checks a run: every transfer exact, no more than `max_pipes` pipes open at any sample, and once the
/// clients have left no more pipe descriptors than at idle plus the pools' share (a quarter of the
/// bound, at most 4 pipes: 8 descriptors), and every other descriptor back to the idle count. (The idle
/// count is taken after the probe that saw the balancer accept; in `splice` mode that probe leaves one
/// pipe in a pool, so the idle count holds it.)
fn check(mode: &str, r: &Report, max_pipes: usize) {
    eprintln!(
        "{mode}: {} of {CLIENTS} exact, {} failed ({} before any byte came back); descriptors (all, pipes): idle {:?}, peak {:?}, \
         after the clients left {:?}; ulb_splice_fallbacks_total {:?}; log: {:?}",
        r.exact,
        r.failed.len(),
        r.before_any_byte,
        r.baseline,
        r.peak,
        r.after,
        r.fallbacks,
        r.log
    );
    for f in r.failed.iter().take(5) {
        eprintln!("  {f}");
    }
    assert!(
        r.failed.is_empty(),
        "{mode}: {} of {CLIENTS} transfers failed (first: {:?})",
        r.failed.len(),
        r.failed.first()
    );
    assert_eq!(r.exact, CLIENTS);
    assert!(
        r.peak.0 <= NOFILE as usize,
        "{mode}: peak {:?} over the limit",
        r.peak
    );
    assert!(
        r.peak.1 <= r.baseline.1 + 2 * max_pipes,
        "{mode}: {} pipe descriptors open at the peak, {} idle, for at most {max_pipes} pipes",
        r.peak.1,
        r.baseline.1
    );
    let slack = idle_slack(max_pipes);
    assert!(
        r.after.1 <= r.baseline.1 + slack,
        "{mode}: {} pipe descriptors open after the clients left, {} idle, {slack} more allowed",
        r.after.1,
        r.baseline.1
    );
    // Every other descriptor (sockets, runtimes) is back to the idle count.
    assert!(
        r.after.0 - r.after.1 <= r.baseline.0 - r.baseline.1,
        "{mode}: {} descriptors other than pipes open after the clients left, {} idle",
        r.after.0 - r.after.1,
        r.baseline.0 - r.baseline.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_mode_at_200_descriptors_resets_nothing_and_gives_the_pipes_back() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not available");
        return;
    }
    let r = bulk_under_prlimit(&["--copy-mode", "splice"], DEFAULT_PIPES).await;
    check("splice", &r, DEFAULT_PIPES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_at_200_descriptors_resets_nothing_and_gives_the_pipes_back() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not available");
        return;
    }
    let r = bulk_under_prlimit(&[], DEFAULT_PIPES).await;
    check("auto", &r, DEFAULT_PIPES);
}

/// With one pipe for 51 connections' 102 directions, `--copy-mode splice` carries nearly every burst
/// through a buffer, and counts each as a fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_mode_with_one_pipe_falls_back_to_buffers() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not available");
        return;
    }
    let r = bulk_under_prlimit(&["--copy-mode", "splice", "--max-pipes", "1"], 1).await;
    check("splice, --max-pipes 1", &r, 1);
    assert!(
        r.fallbacks.is_some_and(|n| n > 0.0),
        "fallbacks not counted: {:?}",
        r.fallbacks
    );
}

/// `--max-pipes 0` turns splicing off: every byte through buffers, and no fallback counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_mode_with_no_pipes_carries_everything_through_buffers() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not available");
        return;
    }
    let r = bulk_under_prlimit(&["--copy-mode", "splice", "--max-pipes", "0"], 0).await;
    check("splice, --max-pipes 0", &r, 0);
    assert_eq!(r.fallbacks, Some(0.0));
}

/// The connection limit the old default gave at `NOFILE` (two descriptors each, nothing left for pipes):
/// the pipe bound then defaults to 0, and nothing is reset either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_connection_limit_leaves_no_pipes_and_resets_nothing() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not available");
        return;
    }
    let r = bulk_under_prlimit(&["--max-connections", "68"], 0).await;
    check("auto, --max-connections 68", &r, 0);
}
