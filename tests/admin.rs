//! The admin HTTP server, end to end against the real `ulb-tcp` binary started with `--admin`:
//!
//! * every endpoint round-trips (`/healthz`, `/livez`, `/metrics`, `/api/v1/services`, adding, patching
//!   and deleting a backend), with the errors each can give (400 naming the bad value, 401, 404, 405,
//!   409, 413);
//! * a drain through the API: no new connection reaches the backend, the one open finishes;
//! * the token: 401 without it, the call done with it; a non-loopback admin address without a token is
//!   refused at start (exit 2, one line);
//! * abuse, each found against the exporter's built-in listener that `--metrics` used to start: 1,000
//!   idle connections (the data path keeps serving), garbage requests (400s, logs bounded), and
//!   descriptor exhaustion under `prlimit` (no spinning: CPU and logs bounded).
//!
//! Everything runs on 127.0.0.1 with free ports; processes are killed and reaped on drop; every wait has
//! a deadline.
#![cfg(target_os = "linux")]

mod common;

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, TempDir};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");
/// The flag that starts the admin server.
const ADMIN_FLAG: &str = "--admin";
/// How long any one wait may take.
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------------------
// Processes, ports, temp dirs
// ---------------------------------------------------------------------------------------------------------

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

/// How to start the balancer.
#[derive(Default)]
struct Start<'a> {
    backends: Vec<SocketAddr>,
    extra: Vec<&'a str>,
    /// Run under `prlimit --nofile=N:N`.
    nofile: Option<u32>,
    /// Extra environment (RUST_LOG is `info` unless given).
    env: Vec<(&'a str, &'a str)>,
    /// The flag that gives the admin address (`--admin` unless given: `--metrics` is its alias).
    flag: Option<&'a str>,
}

/// The balancer binary, running: killed and reaped on drop, before its directory goes.
struct Ulb {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for Ulb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ulb {
    /// Starts `ulb-tcp --listen <free> --backends <list> --admin <free> <extra...>` and waits until both
    /// ports accept. Retries on other ports if one was taken in the meantime.
    async fn start(opts: Start<'_>) -> Ulb {
        let list: Vec<String> = opts.backends.iter().map(ToString::to_string).collect();
        for _ in 0..5 {
            let dir = TempDir::new("ulb");
            let (listen, admin) = (free_port(), free_port());
            if listen == admin {
                continue;
            }
            let log = dir.path().join("ulb-tcp.log");
            let out = File::create(&log).expect("create log");
            let err = out.try_clone().expect("clone log");
            let mut cmd = match opts.nofile {
                Some(n) => {
                    let mut c = Command::new("prlimit");
                    c.arg(format!("--nofile={n}:{n}")).arg(BIN);
                    c
                }
                None => Command::new(BIN),
            };
            cmd.args(["--listen", &listen.to_string()])
                .args(["--backends", &list.join(",")])
                .args([opts.flag.unwrap_or(ADMIN_FLAG), &admin.to_string()])
                .args(&opts.extra)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .envs(opts.env.iter().copied())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            let child = cmd.spawn().expect("start ulb-tcp");
            let mut ulb = Ulb {
                child,
                listen,
                admin,
                log,
                _dir: dir,
            };
            let start = Instant::now();
            loop {
                if ulb.log_text().contains("balancer accepting connections")
                    && TcpStream::connect(admin).await.is_ok()
                {
                    return ulb;
                }
                if let Ok(Some(status)) = ulb.child.try_wait() {
                    eprintln!("ulb-tcp exited ({status}), retrying:\n{}", ulb.log_text());
                    break;
                }
                assert!(
                    start.elapsed() < DEADLINE,
                    "ulb-tcp did not start:\n{}",
                    ulb.log_text()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("ulb-tcp could not start after 5 attempts");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_lines(&self) -> usize {
        self.log_text().lines().count()
    }

    /// The log's last lines, for failure messages.
    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// User plus system CPU time the process has used.
    fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }

    /// Descriptors the process holds now.
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// User plus system CPU time of process `pid`, from /proc/PID/stat (fields 14 and 15, in clock ticks).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz)
}

/// Runs the binary to completion with `args` (bounded by DEADLINE); its status and its stderr.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ulb-tcp");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return (status, err);
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ulb-tcp {args:?} did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------------------
// A small HTTP/1.1 client: one request per connection, `Connection: close`, read to the end
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Json {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): status {}: {}", self.status, self.body))
    }
}

/// Sends raw bytes on a new connection and reads the answer until the server closes; bounded by 10 s.
async fn raw(addr: SocketAddr, request: &[u8]) -> Result<String, String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        match s.read_to_end(&mut out).await {
            Ok(_) => {}
            // A reset after the answer (the server closed with unread bytes) still leaves the answer.
            Err(e) if !out.is_empty() => eprintln!("read after answer: {e}"),
            Err(e) => return Err(format!("read: {e}")),
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "HTTP exchange timed out".to_string())?
}

fn parse_response(text: &str) -> Result<Response, String> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// One request: `method target`, with `headers` and an optional body.
async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Response, String> {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    parse_response(&raw(addr, req.as_bytes()).await?)
}

async fn get(addr: SocketAddr, target: &str) -> Response {
    request(addr, "GET", target, &[], None)
        .await
        .unwrap_or_else(|e| panic!("GET {target}: {e}"))
}

/// Retries `GET target` until it answers `status`, or panics after DEADLINE.
async fn wait_for_status(addr: SocketAddr, target: &str, status: u16) -> Response {
    let start = Instant::now();
    loop {
        let last = request(addr, "GET", target, &[], None).await;
        match last {
            Ok(r) if r.status == status => return r,
            other => assert!(
                start.elapsed() < DEADLINE,
                "GET {target}: not {status} within {DEADLINE:?}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One exchange through the data path: connect, send, read the echo back. Bounded by 10 s.
async fn echo_once(addr: SocketAddr, seq: usize) -> Result<(), String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let msg = common::pattern(seq as u64, 1024);
        s.write_all(&msg).await.map_err(|e| format!("write: {e}"))?;
        s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if back != msg {
            return Err(format!("echo: {} bytes back of {}", back.len(), msg.len()));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Opens up to `n` connections to `addr` and holds them, sending nothing. Connects that fail are
/// counted, not fatal.
async fn hold_idle(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => failed += 1,
        }
    }
    (held, failed)
}

// ---------------------------------------------------------------------------------------------------------
// Abuse
// ---------------------------------------------------------------------------------------------------------

/// 1,000 idle connections to the admin port under the open-file limit of the fault test (1,024): the
/// admin server keeps at most its cap of them (and closes the rest at once), so the data path keeps its
/// descriptors and carries 200 of 200 clients; once the idle ones time out, the admin port answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_leave_the_data_path_alone() {
    let echo = Backend::echo().await;
    let ulb = Ulb::start(Start {
        backends: vec![echo.addr],
        nofile: Some(1024),
        ..Start::default()
    })
    .await;
    let before = ulb.open_fds();
    let (idle, failed) = hold_idle(ulb.admin, 1000).await;
    // Let the server accept what it will.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held_fds = ulb.open_fds();
    eprintln!(
        "1000 idle admin connections: {} connected, {failed} failed; descriptors {before} -> {held_fds}",
        idle.len()
    );

    let clients: Vec<_> = (0..200)
        .map(|seq| tokio::spawn(echo_once(ulb.listen, seq)))
        .collect();
    let mut errors = Vec::new();
    for (seq, c) in clients.into_iter().enumerate() {
        if let Err(e) = c.await.expect("client task") {
            errors.push(format!("client {seq}: {e}"));
        }
    }
    assert!(
        errors.is_empty(),
        "{} of 200 data-path clients failed with 1000 idle admin connections (descriptors {held_fds}):\n{}\n{}",
        errors.len(),
        errors[..errors.len().min(5)].join("\n"),
        ulb.log_tail()
    );
    assert!(
        held_fds < before + 300,
        "the idle admin connections held {held_fds} descriptors (from {before})"
    );
    assert!(
        ulb.log_text()
            .contains("admin server at its connection cap"),
        "{}",
        ulb.log_tail()
    );
    // The idle ones are closed at the header timeout, and the admin port serves again; the held
    // sockets are still open on this side.
    wait_for_status(ulb.admin, "/metrics", 200).await;
    drop(idle);
    let lines = ulb.log_lines();
    assert!(lines < 40, "{lines} log lines:\n{}", ulb.log_tail());
}

/// Garbage on the admin port gets 400, and the logs stay bounded: at most one warning a second per kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_requests_get_400_and_bounded_logs() {
    let echo = Backend::echo().await;
    let ulb = Ulb::start(Start {
        backends: vec![echo.addr],
        ..Start::default()
    })
    .await;
    let start_lines = ulb.log_lines();
    let garbage: [&[u8]; 5] = [
        b"GARBAGE\r\n\r\n",
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ];
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..500 {
        let text = raw(ulb.admin, garbage[i % garbage.len()])
            .await
            .unwrap_or_else(|e| panic!("garbage {i}: {e}"));
        let status = text.split(' ').nth(1).unwrap_or("none").to_string();
        *statuses.entry(status).or_insert(0) += 1;
    }
    let elapsed = started.elapsed();
    // The server is still fine.
    assert_eq!(get(ulb.admin, "/metrics").await.status, 200);
    let lines = ulb.log_lines() - start_lines;
    eprintln!("500 garbage requests in {elapsed:?}: statuses {statuses:?}, {lines} log lines");
    assert_eq!(statuses.get("400"), Some(&500), "statuses: {statuses:?}");
    let bound = (elapsed.as_secs() as usize + 2) * 2;
    assert!(
        lines <= bound,
        "{lines} log lines for 500 garbage requests in {elapsed:?} (bound {bound}):\n{}",
        ulb.log_tail()
    );
}

/// Out of descriptors (`prlimit --nofile=128`, every one held by idle admin connections, more waiting
/// in the backlog): the admin listener backs off instead of spinning on EMFILE. Over one second the
/// process uses under 300 ms of CPU, and the logs stay bounded; a client connection carried all along
/// goes on, and once the admin connections go, both ports serve new clients again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_does_not_spin() {
    let echo = Backend::echo().await;
    let ulb = Ulb::start(Start {
        backends: vec![echo.addr],
        nofile: Some(128),
        ..Start::default()
    })
    .await;
    // A client connection carried before the descriptors run out.
    let mut carried = TcpStream::connect(ulb.listen).await.expect("connect");
    echo_on(&mut carried, b"before").await;
    let (held, _) = hold_idle(ulb.admin, 200).await;
    // Wait until the process is at its limit (or close to it: a few descriptors may be in flux).
    let start = Instant::now();
    while ulb.open_fds() < 124 {
        assert!(
            start.elapsed() < DEADLINE,
            "descriptors never ran out: {} open",
            ulb.open_fds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (cpu0, lines0, t0) = (ulb.cpu_time(), ulb.log_lines(), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu1, lines1, t1) = (ulb.cpu_time(), ulb.log_lines(), Instant::now());
    let cpu = cpu1.saturating_sub(cpu0);
    let lines = lines1 - lines0;
    eprintln!(
        "out of descriptors ({} open): {cpu:?} CPU over {:?}, {lines} log lines ({lines1} in all)",
        ulb.open_fds(),
        t1 - t0
    );
    assert!(
        cpu < Duration::from_millis(300),
        "the process used {cpu:?} of CPU in {:?} out of descriptors:\n{}",
        t1 - t0,
        ulb.log_tail()
    );
    assert!(
        lines <= 5,
        "{lines} log lines in one second:\n{}",
        ulb.log_tail()
    );
    assert!(
        ulb.log_text().contains("admin accept failed"),
        "accept never failed: the test did not run out of descriptors:\n{}",
        ulb.log_tail()
    );
    // The connection carried all along still is.
    echo_on(&mut carried, b"while out of descriptors").await;
    drop(held);
    wait_for_status(ulb.admin, "/metrics", 200).await;
    echo_once(ulb.listen, 1)
        .await
        .unwrap_or_else(|e| panic!("a new client after the admin connections went: {e}"));
    let all = ulb.log_lines();
    assert!(all < 40, "{all} log lines in all:\n{}", ulb.log_tail());
}

// ---------------------------------------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------------------------------------

/// A backend id as a path segment: `127.0.0.1:8081` is `127.0.0.1%3A8081`.
fn enc(id: &str) -> String {
    form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

/// One API call: `method target` with an optional bearer token and JSON body.
async fn api(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
    body: Option<Json>,
) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let body = body.map(|b| b.to_string());
    request(addr, method, target, &headers, body.as_deref())
        .await
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

/// The error line of an error answer, checked to be `{"error": "..."}` with a JSON content type.
fn error_of(r: &Response) -> String {
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let e = r.json()["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error line: {r:?}"))
        .to_string();
    assert!(!e.is_empty() && !e.contains('\n'), "{e:?}");
    e
}

fn backends_of(services: &Json) -> Vec<&Json> {
    services["services"][0]["backends"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn ids(list: &[&Json]) -> Vec<String> {
    list.iter()
        .filter_map(|b| b["id"].as_str().map(String::from))
        .collect()
}

/// Connects through the balancer and reads the backend's tag; the stream stays open (an echo).
async fn tagged(addr: SocketAddr) -> (u8, TcpStream) {
    let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .expect("no tag in time")
        .expect("no tag");
    (b[0], s)
}

/// Sends `msg` on an open echo connection and reads it back.
async fn echo_on(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .expect("echo");
    assert_eq!(back, msg);
}

/// Polls `GET target` until `check` holds for its JSON, or panics after DEADLINE.
async fn wait_json(
    addr: SocketAddr,
    target: &str,
    what: &str,
    check: impl Fn(&Json) -> bool,
) -> Json {
    let start = Instant::now();
    loop {
        let r = get(addr, target).await;
        let j = r.json();
        if check(&j) {
            return j;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}: {j}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_round_trips() {
    let (a, b, c) = (
        Backend::tagged(b'A').await,
        Backend::tagged(b'B').await,
        Backend::tagged(b'C').await,
    );
    let ulb = Ulb::start(Start {
        backends: vec![a.addr, b.addr],
        ..Start::default()
    })
    .await;
    let adm = ulb.admin;
    let (a_id, b_id) = (a.addr.to_string(), b.addr.to_string());

    // Probes and metrics.
    let r = get(adm, "/livez").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    let r = get(adm, "/healthz").await;
    assert_eq!(r.status, 200, "{r:?}");
    let h = r.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["services"][0]["name"], "default");
    assert_eq!(h["services"][0]["in_rotation"], 2);
    let r = get(adm, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{r:?}"
    );
    assert!(r.body.contains("ulb_build_info{"), "{}", r.body);

    // One connection through, so that the counts move.
    let (tag, mut s) = tagged(ulb.listen).await;
    echo_on(&mut s, b"hello").await;
    drop(s);
    let served = if tag == b'A' { &a_id } else { &b_id };

    // The services, with every field of a backend.
    let j = wait_json(adm, "/api/v1/services", "the connection counted", |j| {
        backends_of(j)
            .iter()
            .any(|b| b["id"] == served.as_str() && b["active"] == 0 && b["total"] == 1)
    })
    .await;
    let svc = &j["services"][0];
    assert_eq!(svc["name"], "default");
    assert_eq!(svc["listen"], json!([ulb.listen.to_string()]));
    assert_eq!(svc["strategy"], "round-robin");
    assert_eq!(svc["queue"], 0);
    assert_eq!(ids(&backends_of(&j)), [a_id.clone(), b_id.clone()]);
    let one = backends_of(&j)
        .into_iter()
        .find(|b| b["id"] == served.as_str())
        .expect("served backend");
    for key in [
        "id",
        "address",
        "weight",
        "effective_weight",
        "state",
        "removing",
        "backup",
        "health",
        "active",
        "total",
        "bytes_to_backend",
        "bytes_to_client",
        "connect_errors",
        "max_connections",
    ] {
        assert!(one.get(key).is_some(), "no {key} in {one}");
    }
    assert_eq!(one["address"], served.as_str());
    assert_eq!(
        (one["weight"].as_u64(), one["effective_weight"].as_f64()),
        (Some(1), Some(1.0))
    );
    assert_eq!(
        (one["state"].as_str(), one["removing"].as_bool()),
        (Some("ready"), Some(false))
    );
    assert_eq!(one["health"]["status"], "up");
    assert!(
        one["health"]["since"].as_f64().is_some_and(|s| s >= 0.0),
        "{one}"
    );
    assert!(one["health"]["last_check"].is_string(), "{one}");
    assert_eq!(one["bytes_to_backend"], 5);
    assert_eq!(one["bytes_to_client"], 6); // the tag, then the echo
    assert_eq!(
        (
            one["connect_errors"].as_u64(),
            one["max_connections"].is_null()
        ),
        (Some(0), true)
    );
    // One service and its backends, by path.
    let r = get(adm, "/api/v1/services/default").await;
    assert_eq!(
        (r.status, r.json()["name"].as_str()),
        (200, Some("default"))
    );
    let r = get(adm, "/api/v1/services/default/backends").await;
    assert_eq!(r.json()["backends"].as_array().map(Vec::len), Some(2));
    let r = get(
        adm,
        &format!("/api/v1/services/default/backends/{}", enc(&a_id)),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["id"].as_str()),
        (200, Some(a_id.as_str()))
    );

    // Add a backend: 201 with it and where it lives; it takes traffic.
    let add = json!({"address": c.addr.to_string(), "weight": 2, "id": "c", "backup": false, "max_connections": 10});
    let r = api(
        adm,
        "POST",
        "/api/v1/services/default/backends",
        None,
        Some(add.clone()),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("/api/v1/services/default/backends/c")
    );
    let added = r.json();
    assert_eq!(
        (added["id"].as_str(), added["weight"].as_u64()),
        (Some("c"), Some(2))
    );
    assert_eq!(
        (added["max_connections"].as_u64(), added["backup"].as_bool()),
        (Some(10), Some(false))
    );
    assert_eq!(added["address"], c.addr.to_string());
    let mut tags = Vec::new();
    for _ in 0..8 {
        tags.push(tagged(ulb.listen).await.0);
    }
    assert!(
        tags.contains(&b'C'),
        "the added backend took none of {tags:?}"
    );
    // Without an id, the address is the id.
    let r = api(
        adm,
        "POST",
        "/api/v1/services/default/backends",
        None,
        Some(json!({"address": c.addr.to_string(), "backup": true})),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        (r.json()["id"].as_str(), r.json()["backup"].as_bool()),
        (Some(c.addr.to_string().as_str()), Some(true))
    );

    // 409: the id is taken.
    let r = api(
        adm,
        "POST",
        "/api/v1/services/default/backends",
        None,
        Some(add),
    )
    .await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(error_of(&r).contains("'c'"), "{r:?}");
    let r = api(
        adm,
        "POST",
        "/api/v1/services/default/backends",
        None,
        Some(json!({"address": a_id})),
    )
    .await;
    assert_eq!(r.status, 409, "{r:?}");

    // 400: each bad value named.
    for (body, named) in [
        (
            json!({"address": "127.0.0.1:9", "weight": 0, "id": "w0"}),
            "weight 0",
        ),
        (
            json!({"address": "127.0.0.1:9", "weight": 257, "id": "w257"}),
            "weight 257",
        ),
        (
            json!({"address": "127.0.0.1:9", "weight": "x"}),
            "weight: expected a whole number 1-256, got \"x\"",
        ),
        (json!({"address": "nope"}), "'nope'"),
        (json!({"address": "127.0.0.1:0"}), "'127.0.0.1:0'"),
        (json!({"address": "127.0.0.1:9@2"}), "\"127.0.0.1:9@2\""),
        (json!({"weight": 2}), "address: missing"),
        (
            json!({"address": "127.0.0.1:9", "colour": "red"}),
            "unknown field \"colour\"",
        ),
        (
            json!({"address": "127.0.0.1:9", "max_connections": 0, "id": "m0"}),
            "max_connections 0",
        ),
        (json!({"address": "127.0.0.1:9", "id": ""}), "backend id ''"),
        (json!(["127.0.0.1:9"]), "must be a JSON object"),
    ] {
        let r = api(
            adm,
            "POST",
            "/api/v1/services/default/backends",
            None,
            Some(body.clone()),
        )
        .await;
        assert_eq!(r.status, 400, "{body}: {r:?}");
        let e = error_of(&r);
        assert!(e.contains(named), "{body}: {e:?} does not name {named:?}");
    }
    let r = request(
        adm,
        "POST",
        "/api/v1/services/default/backends",
        &[],
        Some("{not json"),
    )
    .await
    .expect("POST");
    assert_eq!(r.status, 400);
    assert!(error_of(&r).starts_with("the body is not JSON"), "{r:?}");

    // PATCH: weight, state, both; the ids URL-encoded.
    let c_path = "/api/v1/services/default/backends/c";
    let r = api(adm, "PATCH", c_path, None, Some(json!({"weight": 3}))).await;
    assert_eq!(
        (r.status, r.json()["weight"].as_u64()),
        (200, Some(3)),
        "{r:?}"
    );
    let r = api(adm, "PATCH", c_path, None, Some(json!({"state": "maint"}))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (
            r.json()["state"].as_str(),
            r.json()["in_rotation"].as_bool()
        ),
        (Some("maint"), Some(false))
    );
    let a_path = format!("/api/v1/services/default/backends/{}", enc(&a_id));
    assert!(a_path.contains("%3A"), "{a_path}");
    let r = api(
        adm,
        "PATCH",
        &a_path,
        None,
        Some(json!({"state": "drain", "weight": 4})),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.json()["state"].as_str(), r.json()["weight"].as_u64()),
        (Some("drain"), Some(4))
    );
    let r = api(adm, "PATCH", &a_path, None, Some(json!({"state": "ready"}))).await;
    assert_eq!(r.json()["state"], "ready");
    // A refused weight changes nothing, not even the state given with it.
    let r = api(
        adm,
        "PATCH",
        c_path,
        None,
        Some(json!({"state": "ready", "weight": 300})),
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(error_of(&r).contains("weight 300"), "{r:?}");
    assert_eq!(get(adm, c_path).await.json()["state"], "maint");
    for (body, named) in [
        (
            json!({"state": "down"}),
            "state: expected \"ready\", \"drain\" or \"maint\", got \"down\"",
        ),
        (json!({}), "nothing to change"),
        (json!({"weight": -1}), "got -1"),
    ] {
        let r = api(adm, "PATCH", c_path, None, Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert!(error_of(&r).contains(named), "{body}: {r:?}");
    }

    // 404: unknown path, service or backend.
    for (method, target) in [
        ("GET", "/nope"),
        ("GET", "/api/v1/services/nope"),
        ("GET", "/api/v1/services/default/backends/nope"),
        ("PATCH", "/api/v1/services/default/backends/nope"),
        ("DELETE", "/api/v1/services/default/backends/nope"),
        ("POST", "/api/v1/services/nope/backends"),
    ] {
        let body = match method {
            "POST" => Some(json!({"weight": 2, "address": "127.0.0.1:9"})),
            "PATCH" => Some(json!({"weight": 2})),
            _ => None,
        };
        let r = api(adm, method, target, None, body).await;
        assert_eq!(r.status, 404, "{method} {target}: {r:?}");
        assert!(error_of(&r).contains("no "), "{r:?}");
    }
    // 405, with what is allowed.
    for (method, target, allow) in [
        ("PUT", "/api/v1/services", "GET"),
        ("POST", "/metrics", "GET"),
        ("DELETE", "/api/v1/services/default/backends", "GET, POST"),
        (
            "POST",
            "/api/v1/services/default/backends/c",
            "GET, PATCH, DELETE",
        ),
    ] {
        let r = api(adm, method, target, None, None).await;
        assert_eq!(r.status, 405, "{method} {target}: {r:?}");
        assert_eq!(r.header("allow"), Some(allow), "{r:?}");
        error_of(&r);
    }
    // 413: a body over the cap (64 KiB), declared or not.
    let big = format!(
        "{{\"address\": \"127.0.0.1:9\", \"id\": \"{}\"}}",
        "x".repeat(100 * 1024)
    );
    let r = request(
        adm,
        "POST",
        "/api/v1/services/default/backends",
        &[],
        Some(&big),
    )
    .await
    .expect("POST");
    assert_eq!(r.status, 413, "{}", r.status);
    error_of(&r);
    let chunked = format!(
        "POST /api/v1/services/default/backends HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let r =
        parse_response(&raw(adm, chunked.as_bytes()).await.expect("chunked POST")).expect("answer");
    assert_eq!(r.status, 413, "{r:?}");

    // DELETE: 202, out of rotation at once, gone once drained.
    let r = api(
        adm,
        "DELETE",
        &format!("{c_path}?deadline=soon"),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(error_of(&r).contains("\"soon\""), "{r:?}");
    let r = api(adm, "DELETE", &format!("{c_path}?colour=red"), None, None).await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = api(adm, "DELETE", &format!("{c_path}?deadline=5s"), None, None).await;
    assert_eq!(r.status, 202, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["id"].as_str(), j["removing"].as_bool()),
        (Some("c"), Some(true))
    );
    assert_eq!(j["drain_deadline"].as_f64(), Some(5.0));
    wait_json(adm, "/api/v1/services", "c gone", |j| {
        !ids(&backends_of(j)).contains(&"c".to_string())
    })
    .await;
    let r = api(
        adm,
        "DELETE",
        &format!(
            "/api/v1/services/default/backends/{}",
            enc(&c.addr.to_string())
        ),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(
        r.json()["drain_deadline"].as_f64(),
        Some(30.0),
        "the drain timeout by default"
    );

    // /healthz: 503 once no backend is in rotation, 200 again after.
    for id in [&a_id, &b_id] {
        let r = api(
            adm,
            "PATCH",
            &format!("/api/v1/services/default/backends/{}", enc(id)),
            None,
            Some(json!({"state": "maint"})),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let r = get(adm, "/healthz").await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (503, Some("no_backend_in_rotation")),
        "{r:?}"
    );
    assert_eq!(get(adm, "/livez").await.status, 200);
    let r = api(adm, "PATCH", &a_path, None, Some(json!({"state": "ready"}))).await;
    assert_eq!(r.status, 200);
    assert_eq!(get(adm, "/healthz").await.status, 200);
}

/// Drain through the API: the backend takes no new connection; the one open on it carries on and
/// finishes. Then removal through the API: the same, and the backend is gone once its connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_through_the_api() {
    let (a, b) = (Backend::tagged(b'A').await, Backend::tagged(b'B').await);
    let ulb = Ulb::start(Start {
        backends: vec![a.addr, b.addr],
        ..Start::default()
    })
    .await;
    let adm = ulb.admin;
    let by_tag = |t: u8| if t == b'A' { (&a, b'B') } else { (&b, b'A') };

    let (tag, mut open) = tagged(ulb.listen).await;
    let (drained, other) = by_tag(tag);
    let path = format!(
        "/api/v1/services/default/backends/{}",
        enc(&drained.addr.to_string())
    );
    let r = api(adm, "PATCH", &path, None, Some(json!({"state": "drain"}))).await;
    assert_eq!(
        (r.status, r.json()["active"].as_u64()),
        (200, Some(1)),
        "{r:?}"
    );
    let accepted = drained.accepted();
    for i in 0..20 {
        let (t, s) = tagged(ulb.listen).await;
        assert_eq!(t, other, "connection {i} went to the drained backend");
        drop(s);
    }
    assert_eq!(
        drained.accepted(),
        accepted,
        "the drained backend accepted a new connection"
    );
    echo_on(&mut open, &common::pattern(1, 64 * 1024)).await;
    drop(open);
    wait_json(adm, &path, "the drained backend idle", |j| j["active"] == 0).await;

    // Removal: the connection open on it finishes; it is gone once that ends.
    let r = api(adm, "PATCH", &path, None, Some(json!({"state": "ready"}))).await;
    assert_eq!(r.status, 200);
    let mut open = loop {
        let (t, s) = tagged(ulb.listen).await;
        if t == tag {
            break s;
        }
    };
    let r = api(adm, "DELETE", &format!("{path}?deadline=30s"), None, None).await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(
        (r.json()["removing"].as_bool(), r.json()["active"].as_u64()),
        (Some(true), Some(1))
    );
    let accepted = drained.accepted();
    for _ in 0..10 {
        assert_eq!(tagged(ulb.listen).await.0, other);
    }
    assert_eq!(drained.accepted(), accepted);
    let r = get(adm, &path).await;
    assert_eq!(
        (r.status, r.json()["removing"].as_bool()),
        (200, Some(true)),
        "still there while it drains: {r:?}"
    );
    echo_on(&mut open, b"still carried").await;
    drop(open);
    wait_json(adm, "/api/v1/services", "the removed backend gone", |j| {
        !ids(&backends_of(j)).contains(&drained.addr.to_string())
    })
    .await;
    assert_eq!(get(adm, &path).await.status, 404);
    let start = Instant::now();
    while !ulb
        .log_text()
        .contains("admin API: removed backend drained")
    {
        assert!(
            start.elapsed() < DEADLINE,
            "no drain report:\n{}",
            ulb.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_enforced() {
    let a = Backend::tagged(b'A').await;
    let dir = TempDir::new("token");
    let file = dir.path().join("token");
    std::fs::write(&file, "  s3cret-token\n").expect("write token");
    let file_arg = file.to_string_lossy().into_owned();
    let ulb = Ulb::start(Start {
        backends: vec![a.addr],
        extra: vec!["--admin-token-file", &file_arg],
        ..Start::default()
    })
    .await;
    let adm = ulb.admin;
    let list = "/api/v1/services/default/backends";
    let one = format!("{list}/{}", enc(&a.addr.to_string()));
    let add = json!({"address": "127.0.0.1:9", "id": "x"});

    // Reading needs no token.
    assert_eq!(get(adm, "/api/v1/services").await.status, 200);
    assert_eq!(get(adm, "/metrics").await.status, 200);
    // Mutating calls: 401 without it, or with another one.
    for token in [None, Some("wrong"), Some("s3cret-token2"), Some("")] {
        for (method, target, body) in [
            ("POST", list, Some(add.clone())),
            ("PATCH", one.as_str(), Some(json!({"state": "drain"}))),
            ("DELETE", one.as_str(), None),
        ] {
            let r = api(adm, method, target, token, body).await;
            assert_eq!(r.status, 401, "{method} with {token:?}: {r:?}");
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{r:?}"
            );
            error_of(&r);
        }
    }
    let r = request(
        adm,
        "PATCH",
        &one,
        &[("Authorization", "Basic s3cret-token")],
        Some("{\"weight\": 2}"),
    )
    .await
    .expect("PATCH");
    assert_eq!(r.status, 401);
    // Nothing changed.
    let r = get(adm, &one).await;
    assert_eq!(
        (r.json()["state"].as_str(), r.json()["removing"].as_bool()),
        (Some("ready"), Some(false))
    );
    assert_eq!(get(adm, &format!("{list}/x")).await.status, 404);
    // With it: done.
    let t = Some("s3cret-token");
    assert_eq!(api(adm, "POST", list, t, Some(add)).await.status, 201);
    let r = api(adm, "PATCH", &one, t, Some(json!({"state": "drain"}))).await;
    assert_eq!((r.status, r.json()["state"].as_str()), (200, Some("drain")));
    assert_eq!(
        api(adm, "DELETE", &format!("{list}/x"), t, None)
            .await
            .status,
        202
    );
    // The token never shows in the log.
    assert!(!ulb.log_text().contains("s3cret"), "{}", ulb.log_text());
}

/// Bad admin flags: exit 2 with one line, before anything is bound.
#[test]
fn bad_admin_flags_are_refused_at_start() {
    let dir = TempDir::new("flags");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, " \n").expect("write");
    let empty = empty.to_string_lossy().into_owned();
    let missing = dir.path().join("missing").to_string_lossy().into_owned();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken").expect("write");
    let token = token.to_string_lossy().into_owned();
    let b = ["--listen", "127.0.0.1:0", "--backends", "127.0.0.1:9"];
    for (args, want) in [
        (
            vec!["--admin", "0.0.0.0:0"],
            "--admin 0.0.0.0:0 is not a loopback address",
        ),
        (vec!["--metrics", "0.0.0.0:0"], "without a token"),
        (vec!["--admin", "[::]:0"], "without a token"),
        (
            vec!["--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
            "cannot be used with",
        ),
        (vec!["--admin-token-file", &token], "--admin"),
        (
            vec!["--admin", "127.0.0.1:0", "--admin-token-file", &empty],
            "the token is empty",
        ),
        (
            vec!["--admin", "127.0.0.1:0", "--admin-token-file", &missing],
            "--admin-token-file",
        ),
    ] {
        let mut all = b.to_vec();
        all.extend(&args);
        let started = Instant::now();
        let (status, err) = run_to_exit(&all);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains(want),
            "{args:?}: {err:?} does not say {want:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?}");
    }
    // An admin address in use: exit 1, one line.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let mut all = b.to_vec();
    all.extend(["--admin", &taken_addr]);
    let (status, err) = run_to_exit(&all);
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("cannot serve the admin API on {taken_addr}")),
        "{err}"
    );
    // The cluster too.
    let (status, err) = run_to_exit(&["cluster", "-p", "1", "--admin", "0.0.0.0:0", "--", "true"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("without a token") && err.lines().count() == 1,
        "{err}"
    );
}

/// `--metrics` is the old name of `--admin`: the same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_is_an_alias_of_admin() {
    let a = Backend::tagged(b'A').await;
    let ulb = Ulb::start(Start {
        backends: vec![a.addr],
        flag: Some("--metrics"),
        ..Start::default()
    })
    .await;
    assert_eq!(get(ulb.admin, "/metrics").await.status, 200);
    assert_eq!(get(ulb.admin, "/healthz").await.status, 200);
    let j = get(ulb.admin, "/api/v1/services").await.json();
    assert_eq!(ids(&backends_of(&j)), [a.addr.to_string()]);
}

/// `/healthz` answers 503 while the balancer drains, and the admin server stops once it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_503_while_draining() {
    let a = Backend::tagged(b'A').await;
    let mut ulb = Ulb::start(Start {
        backends: vec![a.addr],
        extra: vec!["--drain-timeout", "30s"],
        ..Start::default()
    })
    .await;
    let (_, open) = tagged(ulb.listen).await;
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(ulb.pid() as i32, libc::SIGTERM) }, 0);
    let r = wait_for_status(ulb.admin, "/healthz", 503).await;
    assert_eq!(r.json()["status"], "shutting_down");
    assert_eq!(get(ulb.admin, "/livez").await.status, 200);
    drop(open);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = ulb.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "ulb-tcp did not exit:\n{}",
            ulb.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}:\n{}", ulb.log_tail());
    assert!(
        TcpStream::connect(ulb.admin).await.is_err(),
        "the admin port still accepts"
    );
}

/// `ulb-tcp cluster --admin`: the workers are the default service's backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_serves_the_admin_api() {
    let python = match Command::new("python3").arg("--version").output() {
        Ok(o) if o.status.success() => "python3",
        _ => {
            eprintln!("skipped: python3 not installed");
            return;
        }
    };
    for attempt in 0..5u16 {
        let base = 24_000 + (std::process::id() % 400) as u16 * 10 + attempt * 2;
        let (listen, admin) = (free_port(), free_port());
        let dir = TempDir::new("cluster");
        let log = dir.path().join("cluster.log");
        let out = File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let child = Command::new(BIN)
            .args(["cluster", "-p", "2", "--base-port", &base.to_string()])
            .args([
                "--listen",
                &listen.to_string(),
                "--admin",
                &admin.to_string(),
            ])
            .args([
                "--",
                python,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "{port}",
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the cluster");
        let mut ulb = Ulb {
            child,
            listen,
            admin,
            log,
            _dir: dir,
        };
        // Ready once both workers are in rotation.
        let start = Instant::now();
        let ready = loop {
            if let Ok(r) = request(admin, "GET", "/healthz", &[], None).await {
                if r.status == 200 && r.json()["services"][0]["in_rotation"] == 2 {
                    break true;
                }
            }
            if ulb.child.try_wait().expect("wait").is_some() {
                break false;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the cluster was not ready:\n{}",
                ulb.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if !ready {
            eprintln!(
                "cluster attempt {attempt} exited; retrying:\n{}",
                ulb.log_tail()
            );
            continue;
        }
        let j = get(admin, "/api/v1/services").await.json();
        let backends = backends_of(&j);
        assert_eq!(backends.len(), 2, "{j}");
        assert!(
            backends
                .iter()
                .all(|b| b["state"] == "ready" && b["health"]["status"] == "up"),
            "{j}"
        );
        let r = get(admin, "/metrics").await;
        assert!(r.body.contains("ulb_worker_up"), "{}", r.body);
        // SAFETY: kill only sends a signal to our own child.
        assert_eq!(unsafe { libc::kill(ulb.pid() as i32, libc::SIGTERM) }, 0);
        let start = Instant::now();
        while ulb.child.try_wait().expect("wait").is_none() {
            assert!(
                start.elapsed() < DEADLINE,
                "the cluster did not exit:\n{}",
                ulb.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        return;
    }
    panic!("the cluster could not start after 5 attempts");
}

// ---------------------------------------------------------------------------------------------------------
// The server's limits, in process with short timeouts
// ---------------------------------------------------------------------------------------------------------

/// An admin server in this process (header timeout 400 ms, idle timeout 1.5 s, at most 3 connections)
/// over one service that does not serve.
async fn in_process() -> (SocketAddr, tokio_util::sync::CancellationToken) {
    use ulb_tcp::admin::{AdminOptions, AdminServer, Services};
    let config = ulb_tcp::BalancerConfig::new([ulb_tcp::BackendConfig::new(free_port())]);
    let balancer = ulb_tcp::TcpBalancer::new(config).expect("balancer");
    let services = Services::single("default", balancer.handle()).expect("services");
    let options = AdminOptions::new()
        .header_timeout(Duration::from_millis(400))
        .idle_timeout(Duration::from_millis(1500))
        .max_connections(3);
    let server = AdminServer::bind("127.0.0.1:0".parse().expect("addr"), options).expect("bind");
    let addr = server.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(server.serve(services, stop.clone().cancelled_owned()));
    (addr, stop)
}

/// How long until the server closes `s` (reading and dropping whatever it sends), up to 10 s.
async fn closed_after(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("not closed within 10s"),
        }
    }
}

/// Reads one answer with a `content-length` from a kept-alive connection.
async fn read_answer(s: &mut TcpStream) -> Response {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let r = parse_response(&format!("{head}\r\n\r\n")).expect("head");
            let len: usize = r
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .expect("length");
            if body.len() >= len {
                return Response {
                    body: body[..len].to_string(),
                    ..r
                };
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("answer timed out")
            .expect("read");
        assert!(n > 0, "closed before the answer: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_idle_connections_are_closed() {
    let (addr, _stop) = in_process().await;
    // Silent from the start: closed at the header timeout.
    let silent = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        closed_after(&mut s).await
    };
    // A head dribbled a header line every 100 ms: closed at the header timeout all the same.
    let dribble = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let start = Instant::now();
        s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        for i in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = closed_after(&mut s).await;
        start.elapsed()
    };
    // Kept alive: two requests answered, then closed at the idle timeout, not the header timeout.
    let keep_alive = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        for _ in 0..2 {
            s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            assert_eq!(read_answer(&mut s).await.status, 200);
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(read_answer(&mut s).await.status, 200);
        closed_after(&mut s).await
    };
    let (silent, dribble, idle) = tokio::join!(silent, dribble, keep_alive);
    eprintln!(
        "closed after: silent {silent:?}, dribbled head {dribble:?}, idle keep-alive {idle:?}"
    );
    let near = |d: Duration, want: u64| {
        d >= Duration::from_millis(want - 50) && d < Duration::from_millis(want + 1000)
    };
    assert!(
        near(silent, 400),
        "silent connection closed after {silent:?}"
    );
    assert!(near(dribble, 400), "dribbled head closed after {dribble:?}");
    assert!(
        near(idle, 1500),
        "idle keep-alive connection closed after {idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_connections_are_closed_at_once() {
    let (addr, _stop) = in_process().await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    let closed = closed_after(&mut extra).await;
    assert!(
        closed < Duration::from_millis(300),
        "the 4th connection lived {closed:?}"
    );
    // Once the held ones time out, there is room again.
    drop(held);
    wait_for_status(addr, "/livez", 200).await;
}
