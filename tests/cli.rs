//! The `ulb-tcp` command as a user runs it: bad input, host names, signals, graceful drain, EMFILE.
#![cfg(unix)]

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, wait_until, Backend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");

/// Runs the command to completion (bounded) and returns its status and stderr.
fn run_to_end(args: &[&str]) -> (ExitStatus, String) {
    run_cmd(Command::new(BIN).args(args))
}

fn run_cmd(cmd: &mut Command) -> (ExitStatus, String) {
    let mut child = Proc(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = child
        .wait_for(Duration::from_secs(20))
        .expect("command hung");
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// A child process that is killed and reaped when dropped.
struct Proc(Child);

impl Proc {
    fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.0.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// CPU time (user + system) the process has used, from /proc.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts the balancer on a free port and waits until it accepts.
async fn start(extra: &[&str]) -> (Proc, SocketAddr) {
    start_wrapped(&[], extra).await
}

/// The same, run through `wrapper` (for example `prlimit --nofile=48:48`) when it is not empty.
async fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> (Proc, SocketAddr) {
    let (lb, addr, _) = start_inner(wrapper, extra, false).await;
    (lb, addr)
}

/// Starts the balancer on a free port, keeping what it writes to stderr.
async fn start_logged(extra: &[&str]) -> (Proc, SocketAddr, Stderr) {
    start_inner(&[], extra, true).await
}

/// What a process wrote to stderr so far, collected by a thread (which ends with the process).
#[derive(Clone, Default)]
struct Stderr(Arc<std::sync::Mutex<Vec<u8>>>);

impl Stderr {
    fn collect(&self, mut from: impl Read + Send + 'static) {
        let into = self.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn start_inner(wrapper: &[&str], extra: &[&str], log: bool) -> (Proc, SocketAddr, Stderr) {
    for _ in 0..5 {
        let listen = free_port();
        let mut args: Vec<String> = wrapper.iter().skip(1).map(|s| s.to_string()).collect();
        if !wrapper.is_empty() {
            args.push(BIN.to_string());
        }
        args.extend(["--listen".to_string(), listen.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let program = wrapper.first().copied().unwrap_or(BIN);
        let mut child = Proc(
            Command::new(program)
                .args(&args)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(if log { Stdio::piped() } else { Stdio::null() })
                .spawn()
                .unwrap(),
        );
        let stderr = Stderr::default();
        if let Some(pipe) = child.0.stderr.take() {
            stderr.collect(pipe);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect(listen).await.is_ok() {
                return (child, listen, stderr);
            }
            if child.0.try_wait().unwrap().is_some() {
                break; // the port was taken in between: try another
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = child.0.kill();
    }
    panic!("the balancer never started accepting");
}

// ---------------------------------------------------------------------------------------------------------
// Bad input: one clear line naming the value, the right exit code, never a panic.

fn assert_one_line_error(args: &[&str], code: i32, names: &str) {
    assert_error_names(args, code, &[names]);
}

/// The command exits `code` after one line, `ulb-tcp: ...`, that contains every one of `names`.
fn assert_error_names(args: &[&str], code: i32, names: &[&str]) {
    if let Err(why) = check_error_names(args, code, names) {
        panic!("{why}");
    }
}

/// What is wrong with the command's answer to `args`, if anything (see [`assert_error_names`]).
fn check_error_names(args: &[&str], code: i32, names: &[&str]) -> Result<(), String> {
    let (status, err) = run_to_end(args);
    if err.contains("panicked") {
        return Err(format!("{args:?}: panicked: {err:?}"));
    }
    if status.code() != Some(code) {
        return Err(format!("{args:?}: exit {status}, not {code}: {err:?}"));
    }
    let lines: Vec<&str> = err.lines().collect();
    if lines.len() != 1 || !lines[0].starts_with("ulb-tcp: ") {
        return Err(format!(
            "{args:?}: expected one line 'ulb-tcp: ...', got {err:?}"
        ));
    }
    match names.iter().find(|name| !lines[0].contains(*name)) {
        Some(name) => Err(format!("{args:?}: {err:?} should name {name:?}")),
        None => Ok(()),
    }
}

#[test]
fn bad_input_gets_one_line_and_exit_code_two() {
    assert_one_line_error(
        &["--backends", "127.0.0.1:1", "--strategy", "fastest"],
        2,
        "fastest",
    );
    assert_one_line_error(&["--backends", "127.0.0.1"], 2, "'127.0.0.1'");
    assert_one_line_error(&["--backends", "127.0.0.1:99999"], 2, "127.0.0.1:99999");
    assert_one_line_error(&["--backends", "127.0.0.1:80@0"], 2, "127.0.0.1:80@0");
    assert_one_line_error(&["--backends", "127.0.0.1:80@x"], 2, "127.0.0.1:80@x");
    assert_one_line_error(&["--backends", ""], 2, "''");
    assert_one_line_error(&[], 2, "--backends");
    assert_one_line_error(
        &["--backends", "127.0.0.1:1", "--connect-timeout", "3x"],
        2,
        "3x",
    );
    assert_one_line_error(
        &["--backends", "127.0.0.1:1", "--listen", "nowhere"],
        2,
        "nowhere",
    );
    assert_one_line_error(
        &["--backends", "127.0.0.1:1", "--max-connections", "0"],
        2,
        "--max-connections 0 is out of range",
    );
    assert_one_line_error(
        &["--backends", "127.0.0.1:1", "--replay-limit", "32m"],
        2,
        "--replay-limit 33554432 is out of range",
    );
    assert_one_line_error(
        &["--backends", "127.0.0.1:1", "--replay-limit", "lots"],
        2,
        "'lots'",
    );
    assert_one_line_error(&["--backends", "127.0.0.1:1", "--threads", "0"], 2, "'0'");
    assert_one_line_error(
        &["--backends", "127.0.0.1:1", "--threads", "5000"],
        2,
        "'5000'",
    );
    assert_one_line_error(
        &["--backends", "127.0.0.1:1", "--runtime", "fastest"],
        2,
        "fastest",
    );
}

/// Values a timer, a counter or an allocation could not take: each is refused before anything starts,
/// with exit status 2 and one line that names the flag and the value.
#[test]
fn out_of_range_values_are_refused_naming_flag_and_value() {
    // Checked before the command is looked up: a program that does not exist, so that a value let
    // through by mistake starts no worker.
    const NO_WORKER: &str = "/nonexistent/ulb-tcp-test-worker";
    // On a port of its own, should one be let through by mistake and start serving.
    const LISTEN: [&str; 2] = ["--listen", "127.0.0.1:0"];
    let balancer = |flag: &'static str, value: &'static str| -> Vec<&'static str> {
        vec![
            LISTEN[0],
            LISTEN[1],
            "--backends",
            "127.0.0.1:1",
            flag,
            value,
        ]
    };
    // (arguments, what the line must contain)
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        // Negative durations and counts: called negative, not "invalid digit".
        (
            balancer("--idle-timeout", "-1"),
            vec!["--idle-timeout", "'-1'", "negative"],
        ),
        (
            balancer("--drain-timeout", "-5s"),
            vec!["--drain-timeout", "'-5s'", "negative"],
        ),
        (
            balancer("--connect-attempts", "-1"),
            vec!["--connect-attempts", "'-1'", "negative"],
        ),
        (
            balancer("--max-connections", "-3"),
            vec!["--max-connections", "'-3'", "negative"],
        ),
        (
            balancer("--fail-threshold", "-2"),
            vec!["--fail-threshold", "'-2'", "negative"],
        ),
        // A blank line in a value must not cut the line before the flag is named.
        (
            balancer("--idle-timeout", "\n\n3x"),
            vec!["--idle-timeout", "3x", "unknown unit"],
        ),
        // Past 24 days (MAX_DURATION): a deadline this far out would overflow `Instant + Duration`.
        (
            balancer("--idle-timeout", "2600000000000000h"),
            vec!["--idle-timeout", "'2600000000000000h'", "24 days"],
        ),
        (
            balancer("--half-close-timeout", "25d"),
            vec!["--half-close-timeout", "'25d'", "24 days"],
        ),
        (
            balancer("--drain-timeout", "9999999999s"),
            vec!["--drain-timeout", "'9999999999s'", "24 days"],
        ),
        (
            balancer("--down-backoff", "30d"),
            vec!["--down-backoff", "'30d'", "24 days"],
        ),
        (
            balancer("--connect-timeout", "1e400"),
            vec!["--connect-timeout", "'1e400'"],
        ),
        (
            vec!["cluster", "--kill-timeout", "30d", "--", NO_WORKER],
            vec!["--kill-timeout", "'30d'", "24 days"],
        ),
        // Counts and sizes out of their documented ranges.
        (
            balancer("--max-connections", "99999999999"),
            vec!["--max-connections 99999999999 is out of range", "16000000"],
        ),
        (
            balancer("--max-connections", "99999999999999999999999"),
            vec![
                "--max-connections",
                "'99999999999999999999999'",
                "too large",
            ],
        ),
        (
            balancer("--buffer-size", "1"),
            vec!["--buffer-size 1 is out of range", "512 bytes"],
        ),
        (
            balancer("--buffer-size", "99m"),
            vec!["--buffer-size 103809024 is out of range", "16 MiB"],
        ),
        (
            balancer("--connect-attempts", "0"),
            vec!["--connect-attempts 0 is out of range", "1..=64"],
        ),
        (
            balancer("--connect-attempts", "65"),
            vec!["--connect-attempts 65 is out of range", "1..=64"],
        ),
        (
            balancer("--fail-threshold", "0"),
            vec!["--fail-threshold 0 is out of range", "1..=1000"],
        ),
        (
            balancer("--down-backoff", "0"),
            vec!["--down-backoff", "out of range"],
        ),
        (
            balancer("--defer-accept", "11m"),
            vec!["--defer-accept 660s is out of range", "10 minutes"],
        ),
        // The cluster: more processes than MAX_PROCESSES (4096), up to usize::MAX, whose last port
        // `base + n - 1` would overflow.
        (
            vec!["cluster", "-p", "18446744073709551615", "--", NO_WORKER],
            vec!["--processes", "18446744073709551615", "4096"],
        ),
        (
            vec!["cluster", "-p", "5000", "--", NO_WORKER],
            vec!["--processes", "5000", "4096"],
        ),
        (
            vec!["cluster", "-p", "0", "--", NO_WORKER],
            vec!["--processes", "0"],
        ),
        (
            vec!["cluster", "-p", "-1", "--", NO_WORKER],
            vec!["--processes", "'-1'", "negative"],
        ),
        (
            vec!["cluster", "--replay-limit", "32m", "--", NO_WORKER],
            vec!["--replay-limit", "33554432", "16 MiB"],
        ),
        // The same backend twice: one id, so refused, naming it.
        (
            vec![LISTEN[0], LISTEN[1], "-b", "127.0.0.1:1,127.0.0.1:1"],
            vec!["'127.0.0.1:1'", "twice", "--backends"],
        ),
        (
            vec![
                LISTEN[0],
                LISTEN[1],
                "-b",
                "127.0.0.1:1",
                "-b",
                "127.0.0.1:1@3",
            ],
            vec!["'127.0.0.1:1'", "twice", "--backends"],
        ),
    ];
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|(args, names)| check_error_names(args, 2, names).err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} cases:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}

#[test]
fn listen_address_in_use_or_not_permitted_exits_one() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_one_line_error(&["--backends", "127.0.0.1:1", "--listen", &addr], 1, &addr);
    #[cfg(target_os = "linux")]
    assert_one_line_error(
        &[
            "--backends",
            "127.0.0.1:1",
            "--listen",
            &addr,
            "--runtime",
            "per-core",
        ],
        1,
        &addr,
    );
    // An address this host does not have (TEST-NET-1): bind fails locally, nothing is sent.
    assert_one_line_error(
        &["--backends", "127.0.0.1:1", "--listen", "192.0.2.1:80"],
        1,
        "192.0.2.1:80",
    );
}

#[test]
fn an_unresolvable_host_is_named() {
    // Inside a network namespace of its own there is no resolver to ask, so the lookup fails at once and
    // no query leaves this machine.
    if !Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("skipped: `unshare -n` is not available here");
        return;
    }
    let (status, err) =
        run_cmd(Command::new("unshare").args(["-n", BIN, "--backends", "no-such-host.invalid:80"]));
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot resolve backend 'no-such-host.invalid:80'"),
        "{err}"
    );
    // A line break in the name stays on the line, escaped.
    let (status, err) =
        run_cmd(Command::new("unshare").args(["-n", BIN, "-b", "no\nsuch.invalid:80"]));
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(
        err.contains("cannot resolve backend 'no\\nsuch.invalid:80'"),
        "{err:?}"
    );
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--backends",
        "--strategy",
        "--connect-timeout",
        "--idle-timeout",
        "--max-connections",
        "--drain-timeout",
        "--log-format",
        "--metrics",
        "--admin",
        "--admin-token-file",
        "--replay-limit",
        "--runtime",
        "per-core",
        "work-stealing",
        "--threads",
        "Examples:",
        "@",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Running

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_resolve() {
    let first = std::net::ToSocketAddrs::to_socket_addrs("localhost:0")
        .unwrap()
        .next()
        .unwrap();
    let listener = tokio::net::TcpListener::bind(first).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _backend = Backend::serve(listener, common::echo);
    let target = format!("localhost:{port}");
    let (_lb, addr) = start(&["--backends", &target]).await;
    let data = Arc::new(pattern(1, 10_000));
    let got = common::echo_roundtrip(addr, data.clone()).await.unwrap();
    assert_eq!(got, *data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connects_and_drains_a_20_mib_transfer() {
    sigterm_drains(&["--runtime", "work-stealing"]).await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_per_core_runtimes_too() {
    sigterm_drains(&["--runtime", "per-core", "--threads", "3"]).await;
}

async fn sigterm_drains(runtime: &[&str]) {
    let backend = Backend::echo().await;
    let target = backend.addr.to_string();
    let mut args = vec!["--backends", &target, "--drain-timeout", "30s"];
    args.extend(runtime);
    let (mut lb, addr) = start(&args).await;

    let data = Arc::new(pattern(20, 20 << 20));
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(256 * 1024) {
            w.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await; // stay in flight for a while
        }
        w.shutdown().await.unwrap();
    });
    let mut got = vec![0u8; 2 << 20];
    r.read_exact(&mut got).await.unwrap();

    lb.signal(libc::SIGTERM);
    wait_until("new connects to be refused", Duration::from_secs(5), || {
        matches!(std::net::TcpStream::connect(addr),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await;
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), data.len(), "{runtime:?}");
    assert!(
        got == *data,
        "{runtime:?}: the 20 MiB transfer was not byte-exact"
    );

    let status = lb
        .wait_for(Duration::from_secs(10))
        .expect("no exit after drain");
    assert_eq!(status.code(), Some(0));
}

/// A signal that comes as soon as the port accepts is a shutdown like any other: the handlers must be
/// in place before the listener is, or the signal's default action kills the process (no drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_as_soon_as_the_port_accepts_is_a_graceful_shutdown() {
    let backend = Backend::echo().await;
    let target = backend.addr.to_string();
    let runtimes: &[&str] = if cfg!(target_os = "linux") {
        &["per-core", "work-stealing"]
    } else {
        &["work-stealing"]
    };
    let signals = [libc::SIGTERM, libc::SIGINT];
    for round in 0..16 {
        let runtime = runtimes[round % runtimes.len()];
        let (mut lb, _) = start(&["--backends", &target, "--runtime", runtime]).await;
        lb.signal(signals[round / 2 % 2]);
        let status = lb
            .wait_for(Duration::from_secs(10))
            .expect("no exit after the signal");
        assert_eq!(
            status.code(),
            Some(0),
            "round {round} ({runtime}): {status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let backend = Backend::tagged(0).await;
    let target = backend.addr.to_string();
    let (mut lb, addr) = start(&["--backends", &target, "--drain-timeout", "60s"]).await;
    let mut held = TcpStream::connect(addr).await.unwrap();
    let mut tag = [0u8; 1];
    held.read_exact(&mut tag).await.unwrap();
    lb.signal(libc::SIGINT);
    wait_until("new connects to be refused", Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(
        lb.0.try_wait().unwrap().is_none(),
        "it must wait for the held connection"
    );
    let t0 = Instant::now();
    lb.signal(libc::SIGTERM);
    let status = lb
        .wait_for(Duration::from_secs(5))
        .expect("second signal ignored");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(1));
}

/// Every duration at its maximum (24 days) with replay on: deadlines are computed as `Instant + limit`
/// on every connection (replay's idle timer, the splice's idle and half-close timers, the drain), and a
/// limit that overflowed them would panic each connection's task. Real traffic must come through
/// byte-exact, and the process must still be there, and drain, afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_duration_at_its_maximum_carries_traffic() {
    let backend = Backend::echo().await;
    let target = backend.addr.to_string();
    let max = "24d";
    let (mut lb, addr, stderr) = start_logged(&[
        "--backends",
        &target,
        "--idle-timeout",
        max,
        "--half-close-timeout",
        max,
        "--drain-timeout",
        max,
        "--connect-timeout",
        max,
        "--down-backoff",
        max,
        "--replay-limit",
        "64k",
    ])
    .await;

    // Small exchanges (answered within the replay phase) and bulk ones (past the replay limit, through
    // the splice with its half-close), at once.
    let mut transfers = tokio::task::JoinSet::new();
    for (i, len) in [1, 100, 64 << 10, (64 << 10) + 1, 1 << 20, 4 << 20]
        .into_iter()
        .enumerate()
    {
        let data = Arc::new(pattern(100 + i as u64, len));
        transfers.spawn(async move {
            let got = common::echo_roundtrip(addr, data.clone()).await;
            (len, got.map(|got| got == *data))
        });
    }
    while let Some(done) = transfers.join_next().await {
        let (len, exact) = done.unwrap();
        match exact {
            Ok(exact) => assert!(exact, "{len} bytes came back different"),
            Err(e) => panic!("{len} bytes: {e} (stderr: {})", stderr.text()),
        }
    }
    // A request–response on one connection: the answer ends the replay phase, the rest is spliced.
    let mut s = TcpStream::connect(addr).await.unwrap();
    for round in 0..3u64 {
        let msg = pattern(200 + round, 10_000);
        s.write_all(&msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert!(back == msg, "round {round} came back different");
    }
    drop(s);

    assert!(
        lb.0.try_wait().unwrap().is_none(),
        "the balancer exited: {}",
        stderr.text()
    );
    let log = stderr.text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("starting"), "{log}");
    // Nothing in flight: a 24-day drain ends at once.
    lb.signal(libc::SIGTERM);
    let status = lb
        .wait_for(Duration::from_secs(10))
        .expect("no exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", stderr.text());
    assert!(!stderr.text().contains("panicked"), "{}", stderr.text());
}

/// Reads at least `n` bytes of a stream that must go on (each read within 10 s).
async fn read_at_least(client: &mut TcpStream, n: usize) {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    while total < n {
        match tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("the stream ended after {total} bytes"),
            Ok(Ok(k)) => total += k,
            Ok(Err(e)) => panic!("the stream failed after {total} bytes: {e}"),
            Err(_) => panic!("the stream stalled after {total} bytes"),
        }
    }
}

/// A second SIGTERM during the drain stops at once, and a stream still in flight must end in a reset: a
/// clean FIN would let the client take a stream cut in the middle for a complete one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_resets_a_stream_in_flight() {
    second_signal_resets(&["--runtime", "work-stealing"]).await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_resets_a_stream_in_flight_per_core() {
    second_signal_resets(&["--runtime", "per-core", "--threads", "2"]).await;
}

async fn second_signal_resets(runtime: &[&str]) {
    // A backend that streams without end, 16 KiB every 5 ms, until its client goes away.
    let backend = Backend::spawn(|mut s| async move {
        let chunk = pattern(7, 16 << 10);
        while s.write_all(&chunk).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await; // pacing, not waiting for a state
        }
    })
    .await;
    let target = backend.addr.to_string();
    let mut args = vec!["--backends", &target, "--drain-timeout", "60s"];
    args.extend(runtime);
    let (mut lb, addr, stderr) = start_logged(&args).await;

    let mut client = TcpStream::connect(addr).await.unwrap();
    read_at_least(&mut client, 128 << 10).await;

    // The first signal: the drain begins (no new connects) and the stream goes on.
    lb.signal(libc::SIGTERM);
    wait_until("new connects to be refused", Duration::from_secs(5), || {
        matches!(std::net::TcpStream::connect(addr),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await;
    read_at_least(&mut client, 256 << 10).await;
    assert!(
        lb.0.try_wait().unwrap().is_none(),
        "{runtime:?}: it must drain the stream, not exit"
    );

    // The second signal: the stream ends with a reset, never a clean EOF.
    lb.signal(libc::SIGTERM);
    let mut buf = vec![0u8; 64 << 10];
    let deadline = Instant::now() + Duration::from_secs(10);
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, client.read(&mut buf)).await {
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(_)) => continue, // what was already on its way
            Ok(Err(e)) => break Err(e),
            Err(_) => panic!("{runtime:?}: the stream went on after the second signal"),
        }
    };
    match end {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{runtime:?}: {e}"
        ),
        Ok(()) => panic!("{runtime:?}: a clean EOF after the second signal; a reset was due"),
    }
    let status = lb
        .wait_for(Duration::from_secs(5))
        .expect("no exit after the second signal");
    assert_eq!(status.code(), Some(1), "{runtime:?}: {}", stderr.text());
    assert!(!stderr.text().contains("panicked"), "{}", stderr.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_neither_ends_nor_spins_the_server() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit is not available");
        return;
    }
    let backend = Backend::tagged(7).await;
    let target = backend.addr.to_string();
    let (mut lb, listen) = start_wrapped(
        &["prlimit", "--nofile=48:48"],
        &["--max-connections", "1000", "--backends", &target],
    )
    .await;
    // Far more clients than 48 descriptors allow: some are served, the rest wait in the backlog while
    // accept() fails with EMFILE.
    // (A client accepted when no descriptor is left for its backend connection is reset.)
    let mut clients = Vec::new();
    for _ in 0..40 {
        if let Ok(c) = TcpStream::connect(listen).await {
            clients.push(c);
        }
    }
    let served = |clients: &mut Vec<TcpStream>| {
        let mut n = 0;
        for c in clients.iter_mut() {
            let mut b = [0u8; 1];
            if matches!(c.try_read(&mut b), Ok(1)) {
                n += 1;
            }
        }
        n
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = served(&mut clients);
    assert!(
        first > 0 && first < 24,
        "{first} of 40 served with 48 descriptors"
    );
    let cpu0 = lb.cpu_time();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burned = lb.cpu_time() - cpu0;
    assert!(
        burned < Duration::from_millis(300),
        "spinning on EMFILE: {burned:?} CPU in 1 s"
    );
    assert!(lb.0.try_wait().unwrap().is_none(), "the server exited");

    // Free the descriptors: the server goes on and serves new clients.
    drop(clients);
    let t0 = Instant::now();
    loop {
        if let Ok(mut c) = TcpStream::connect(listen).await {
            let mut b = [0u8; 1];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut b)).await
            {
                assert_eq!(b[0], 7);
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never recovered");
    }
}

/// The descriptors process `pid` holds.
fn open_descriptors(pid: u32) -> Vec<usize> {
    let mut fds: Vec<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// Running out of descriptors here is this host's fault, not the backend's: it is logged once a second
/// at most, as such, and never marks the backend down or logs it as unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_never_blamed_on_the_backend() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit is not available");
        return;
    }
    let backend = Backend::tagged(7).await;
    let target = backend.addr.to_string();
    let (mut lb, listen, log) = start_inner(
        &[],
        &["--max-connections", "1000", "--backends", &target],
        true,
    )
    .await;
    // Each client served holds two descriptors (its own and the backend's), so with an even number
    // left an accept() always fails first and no connect ever runs out: leave an odd number. (Under a
    // fixed `prlimit --nofile` the parity would depend on how many the process opened at start.)
    let pid = lb.0.id();
    // Settled: the same descriptors in two looks 50 ms apart (the readiness probe's are gone).
    let settle = Instant::now();
    let mut held = open_descriptors(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = open_descriptors(pid);
        if std::mem::replace(&mut held, now) == held {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(5),
            "the descriptors never settled"
        );
    }
    // The kernel hands out the lowest free number below the limit: find the limit that leaves 25 free.
    let mut limit = 0;
    let mut free = 0;
    while free < 25 {
        if !held.contains(&limit) {
            free += 1;
        }
        limit += 1;
    }
    let set = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .unwrap();
    assert!(set.success(), "prlimit --pid failed");
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..3 {
        for _ in 0..40 {
            if let Ok(c) = TcpStream::connect(listen).await {
                clients.push(c);
            }
        }
        let text = log.text();
        if text.contains("out of descriptors or ports") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let elapsed = t0.elapsed();
    drop(clients);
    // It serves again at once: the backend was never taken out.
    let t1 = Instant::now();
    loop {
        if let Ok(mut c) = TcpStream::connect(listen).await {
            let mut b = [0u8; 1];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut b)).await
            {
                assert_eq!(b[0], 7);
                break;
            }
        }
        assert!(t1.elapsed() < Duration::from_secs(10), "never recovered");
    }
    lb.0.kill().unwrap();
    lb.0.wait().unwrap();
    let text = log.text();
    let local = text.matches("out of descriptors or ports").count();
    assert!(local >= 1, "no connect ran out of descriptors: {text}");
    let seconds = elapsed.as_secs() as usize + 2;
    assert!(
        local <= seconds,
        "{local} lines in {elapsed:?}: not rate-limited\n{text}"
    );
    assert!(
        !text.contains("backend is down"),
        "the backend was blamed:\n{text}"
    );
    assert!(
        !text.contains("no backend reachable"),
        "logged as unreachable:\n{text}"
    );
    assert!(!text.contains("connect to backend failed"), "{text}");
}
