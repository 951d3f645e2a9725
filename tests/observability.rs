//! Observability, end to end against the real `ulb-tcp` binary started with `--admin`, whose admin port
//! serves `/metrics`:
//!
//! * `metrics_match_client_tallies_exactly`: in-test backends (echo, fixed reply, reset mid-stream, and an
//!   address that refuses), known traffic (some cut by a backend reset, some by `--idle-timeout`), then the
//!   scraped `ulb_connections_total` / `ulb_bytes_total` per backend and direction must equal the clients'
//!   own tallies exactly; plus `ulb_backend_up`, `ulb_connect_errors_total{reason="refused"}`, and more.
//! * `dashboard_and_alerts_are_well_formed`: the Grafana dashboard's structure (datasource variable used by
//!   every panel, backend variable, reserved rows) and that every metric named in the dashboard and the
//!   alert rules exists (a constant in `src/metrics/mod.rs`) or has a reserved prefix.
//! * `promtool_check_metrics_passes_on_a_real_scrape`, `promtool_check_rules_passes`: lint with promtool.
//! * `prometheus_evaluates_every_dashboard_and_alert_expression`: a real Prometheus scrapes the balancer
//!   while traffic flows and answers every PromQL expression of the dashboard and of the alert rules.
//!
//! The promtool/prometheus tests print "skipped: prometheus not installed" and pass where the tools are not
//! on PATH (CI installs them). Everything runs on 127.0.0.1 with free ports and bounded time; waits poll
//! with deadlines.

mod common;

use common::TempDir;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{header, Request, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");
/// How long any one wait (process start, metric values, a client exchange) may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// The alert rules in `grafana/alerts.yml`.
const ALERT_RULES: usize = 8;

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read_repo_file(rel: &str) -> String {
    let path = manifest_path(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------------------
// Processes, ports, temp dirs
// ---------------------------------------------------------------------------------------------------------

/// A port that was free a moment ago (bound on 127.0.0.1:0, then released). Callers retry on a clash.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// True when `name` is an executable file on PATH.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// A child process, killed and reaped on drop (so a panicking test cleans up too). Its stdout and stderr
/// go to `log`.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
        let out = File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc { child, log }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `ready` every `every` until it holds (true), or until the process exits (false: the caller
    /// retries on other ports); panics after DEADLINE.
    async fn wait_ready<F, Fut>(
        &mut self,
        what: &str,
        attempt: usize,
        every: Duration,
        mut ready: F,
    ) -> bool
    where
        F: FnMut(&Proc) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if ready(self).await {
                return true;
            }
            if let Some(status) = self.exited() {
                eprintln!(
                    "{what} attempt {attempt} exited ({status}); retrying on other ports:\n{}",
                    self.log_tail()
                );
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "{what} was not ready within {DEADLINE:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(every).await;
        }
    }

    /// The last lines of the log, for failure messages.
    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The balancer binary, running. Fields drop in order: the process before its log directory.
struct Balancer {
    proc: Proc,
    listen: SocketAddr,
    /// The admin port, where `/metrics` is served.
    admin: SocketAddr,
    _dir: TempDir,
}

/// Starts `ulb-tcp --listen <free> --backends <list> --admin <free> <extra...>` and waits until it logs
/// that it accepts connections. Retries with other ports if one was taken in the meantime.
async fn start_balancer(backends: &[SocketAddr], extra: &[&str]) -> Balancer {
    let list: Vec<String> = backends.iter().map(ToString::to_string).collect();
    let list = list.join(",");
    for attempt in 1..=5 {
        let dir = TempDir::new("ulb");
        let listen = loopback(free_port());
        let admin = loopback(free_port());
        if listen == admin {
            continue;
        }
        let mut cmd = Command::new(BIN);
        cmd.args(["--listen", &listen.to_string()])
            .args(["--backends", &list])
            .args(["--admin", &admin.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut proc = Proc::spawn(&mut cmd, dir.path().join("ulb-tcp.log"));
        let started = proc
            .wait_ready("ulb-tcp", attempt, Duration::from_millis(10), |p| {
                std::future::ready(p.log_text().contains("balancer accepting connections"))
            })
            .await;
        if started {
            return Balancer {
                proc,
                listen,
                admin,
                _dir: dir,
            };
        }
    }
    panic!("ulb-tcp could not start after 5 attempts");
}

// ---------------------------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------------------------

/// `GET target` from `addr` with the given HTTP/1.x version and `Connection: close`; returns the status
/// and the body. Bounded by 10 s.
async fn http_get(
    addr: SocketAddr,
    target: &str,
    version: Version,
) -> Result<(u16, String), String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let req = Request::get(format!("http://{addr}{target}"))
        .version(version)
        .header(header::USER_AGENT, "ulb-tcp-tests")
        .header(header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let exchange = async {
        let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "HTTP exchange timed out".to_string())?
}

// ---------------------------------------------------------------------------------------------------------
// Prometheus text format
//
// Kept by hand: the crates for it do not fit. prometheus-parse splits label pairs on ',' and '=' without
// regard to quotes, ignores escapes, and skips lines and values it cannot parse without an error;
// openmetrics-parser is LGPL-3.0 and unmaintained since 2024. Checked by
// `scrape_parser_reads_the_text_format`; promtool lints a real scrape in
// `promtool_check_metrics_passes_on_a_real_scrape`.
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses `{k="v",...}` (the text after the `{`); returns the labels and the rest of the line.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, c) => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key, value);
        rest = &rest[end + 1..];
    }
}

/// A parsed `/metrics` page.
struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: &str) -> Result<Scrape, String> {
        let mut samples = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || format!("cannot parse metrics line {line:?}");
            let name_end = line.find(['{', ' ']).ok_or_else(bad)?;
            let name = line[..name_end].to_string();
            let (labels, rest) = match line[name_end..].strip_prefix('{') {
                Some(after) => parse_labels(after).ok_or_else(bad)?,
                None => (BTreeMap::new(), &line[name_end..]),
            };
            let value = rest.split_whitespace().next().ok_or_else(bad)?;
            let value: f64 = value.parse().map_err(|_| bad())?;
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Ok(Scrape { samples })
    }

    /// The value of the one series named `name` whose labels include `labels`; `None` when there is none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        match matching.as_slice() {
            [] => None,
            [one] => Some(one.value),
            many => panic!("{} series match {name}{labels:?}: {many:?}", many.len()),
        }
    }
}

async fn scrape(metrics: SocketAddr) -> Result<String, String> {
    match http_get(metrics, "/metrics", Version::HTTP_10).await {
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => Err(format!("GET /metrics: status {status}: {body}")),
        Err(e) => Err(format!("GET /metrics: {e}")),
    }
}

/// Scrapes until `check` passes (returning that scrape) or the deadline passes (panicking with the last
/// complaint).
async fn wait_for_metrics(
    metrics: SocketAddr,
    what: &str,
    check: impl Fn(&Scrape) -> Result<(), String>,
) -> Scrape {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let complaint = match scrape(metrics).await.and_then(|t| Scrape::parse(&t)) {
            Ok(s) => match check(&s) {
                Ok(()) => return s,
                Err(e) => e,
            },
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {DEADLINE:?}:\n{complaint}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Collects "name{labels}: expected X, scraped Y" mismatches.
struct Expect<'a> {
    scrape: &'a Scrape,
    problems: Vec<String>,
}

impl Expect<'_> {
    fn eq(&mut self, name: &str, labels: &[(&str, &str)], want: f64) {
        let got = self.scrape.value(name, labels);
        if got != Some(want) {
            self.problems.push(format!(
                "{name}{labels:?}: expected {want}, scraped {got:?}"
            ));
        }
    }

    fn done(self) -> Result<(), String> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(self.problems.join("\n"))
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// In-test backends and clients
// ---------------------------------------------------------------------------------------------------------

/// Every backend first sends a one-byte tag naming its behaviour, so that a client knows where the
/// balancer sent it and keeps its tallies per backend.
const TAG_ECHO: u8 = b'E';
const TAG_FIXED: u8 = b'F';
const TAG_RESET: u8 = b'R';
/// Bytes the fixed backend sends after its tag before it closes.
const FIXED_LEN: usize = 50_000;
/// Bytes the reset backend reads, then the bytes it replies before it waits for a 1-byte ack and resets.
const RESET_IN: usize = 5_000;
const RESET_OUT: usize = 3_000;

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

/// A backend listening on 127.0.0.1; the accept loop stops when this is dropped.
struct TestBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_backend(tag: u8) -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let _ = match tag {
                    TAG_ECHO => echo_backend(stream).await,
                    TAG_FIXED => fixed_backend(stream).await,
                    _ => reset_backend(stream).await,
                };
            });
        }
    });
    TestBackend {
        addr,
        accepted,
        task,
    }
}

/// Tag, then echoes until EOF, then FIN.
async fn echo_backend(mut s: TcpStream) -> io::Result<()> {
    s.write_all(&[TAG_ECHO]).await?;
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await?;
    }
    s.shutdown().await
}

/// Tag and FIXED_LEN bytes, then FIN; reads what the client sends until its EOF (so the close is clean).
async fn fixed_backend(mut s: TcpStream) -> io::Result<()> {
    let mut reply = vec![TAG_FIXED];
    reply.extend(pattern(FIXED_LEN, 1));
    s.write_all(&reply).await?;
    s.shutdown().await?;
    let mut sink = vec![0; 16 * 1024];
    while s.read(&mut sink).await? != 0 {}
    Ok(())
}

/// Tag; reads RESET_IN bytes; replies RESET_OUT bytes; reads a 1-byte ack; then resets (RST, SO_LINGER 0).
async fn reset_backend(mut s: TcpStream) -> io::Result<()> {
    s.write_all(&[TAG_RESET]).await?;
    let mut input = vec![0; RESET_IN];
    s.read_exact(&mut input).await?;
    s.write_all(&pattern(RESET_OUT, 2)).await?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await?;
    s.set_zero_linger()?;
    drop(s);
    Ok(())
}

/// One client connection's own account: which backend answered, bytes it sent that the backend is known
/// to have received, bytes it received, and how it ended.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    tag: u8,
    sent: u64,
    received: u64,
    end: End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// FIN both ways.
    Clean,
    /// Cut by the balancer's idle timeout.
    IdleCut,
    /// The backend reset the connection mid-stream; the balancer passed it on.
    BackendReset,
}

/// Reads until EOF or an error; Ok(bytes) for EOF, Err for a reset.
async fn read_until_closed(s: &mut TcpStream) -> Result<usize, io::Error> {
    let mut buf = vec![0; 4096];
    let mut total = 0;
    loop {
        match s.read(&mut buf).await? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

/// Drives one client connection through the balancer; the backend's tag decides the protocol. With
/// `idle_count`, every third echo connection (counted there) stays silent after its exchange until the
/// balancer's idle timeout cuts it.
async fn client(
    balancer: SocketAddr,
    seq: usize,
    idle_count: Option<Arc<AtomicU64>>,
) -> Result<Exchange, String> {
    let run = async {
        let mut s = TcpStream::connect(balancer)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag)
            .await
            .map_err(|e| format!("reading the tag: {e}"))?;
        let tag = tag[0];
        let idle = tag == TAG_ECHO && idle_count.is_some_and(|c| c.fetch_add(1, Relaxed) % 3 == 2);
        match tag {
            TAG_ECHO if idle => {
                let data = pattern(100 + seq, seq);
                s.write_all(&data)
                    .await
                    .map_err(|e| format!("echo write: {e}"))?;
                let mut back = vec![0; data.len()];
                s.read_exact(&mut back)
                    .await
                    .map_err(|e| format!("echo read: {e}"))?;
                if back != data {
                    return Err("echo returned other bytes".to_string());
                }
                // Silence: the balancer must cut both sides after its idle timeout.
                match read_until_closed(&mut s).await {
                    Ok(0) | Err(_) => {}
                    Ok(n) => return Err(format!("{n} unexpected bytes while idle")),
                }
                Ok(Exchange {
                    tag,
                    sent: data.len() as u64,
                    received: 1 + data.len() as u64,
                    end: End::IdleCut,
                })
            }
            TAG_ECHO => {
                let data = pattern(1_000 + (seq * 7_919) % 60_000, seq);
                let (mut rd, mut wr) = s.into_split();
                let write = async {
                    wr.write_all(&data).await?;
                    wr.shutdown().await
                };
                let mut back = Vec::with_capacity(data.len());
                let read = rd.read_to_end(&mut back);
                let (w, r) = tokio::join!(write, read);
                w.map_err(|e| format!("echo write: {e}"))?;
                r.map_err(|e| format!("echo read: {e}"))?;
                if back != data {
                    return Err(format!(
                        "echo returned {} bytes, not the {} sent",
                        back.len(),
                        data.len()
                    ));
                }
                Ok(Exchange {
                    tag,
                    sent: data.len() as u64,
                    received: 1 + data.len() as u64,
                    end: End::Clean,
                })
            }
            TAG_FIXED => {
                let data = pattern(10 + seq, seq);
                s.write_all(&data)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
                let mut body = Vec::new();
                s.read_to_end(&mut body)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if body != pattern(FIXED_LEN, 1) {
                    return Err(format!(
                        "fixed backend: {} bytes, expected {FIXED_LEN}",
                        body.len()
                    ));
                }
                Ok(Exchange {
                    tag,
                    sent: data.len() as u64,
                    received: 1 + FIXED_LEN as u64,
                    end: End::Clean,
                })
            }
            TAG_RESET => {
                s.write_all(&pattern(RESET_IN, seq))
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                let mut reply = vec![0; RESET_OUT];
                s.read_exact(&mut reply)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if reply != pattern(RESET_OUT, 2) {
                    return Err("reset backend replied other bytes".to_string());
                }
                s.write_all(b"!").await.map_err(|e| format!("ack: {e}"))?;
                match read_until_closed(&mut s).await {
                    Ok(0) | Err(_) => {}
                    Ok(n) => return Err(format!("{n} unexpected bytes after the reply")),
                }
                Ok(Exchange {
                    tag,
                    sent: RESET_IN as u64 + 1,
                    received: 1 + RESET_OUT as u64,
                    end: End::BackendReset,
                })
            }
            other => Err(format!("unknown tag {other}")),
        }
    };
    tokio::time::timeout(DEADLINE, run)
        .await
        .map_err(|_| format!("connection {seq} did not finish within {DEADLINE:?}"))?
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    connections: u64,
    sent: u64,
    received: u64,
}

fn add(tallies: &mut BTreeMap<u8, Tally>, ends: &mut BTreeMap<End, u64>, x: Exchange) {
    let t = tallies.entry(x.tag).or_default();
    t.connections += 1;
    t.sent += x.sent;
    t.received += x.received;
    *ends.entry(x.end).or_default() += 1;
}

// ---------------------------------------------------------------------------------------------------------
// a. Exactness
// ---------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_client_tallies_exactly() {
    let echo = start_backend(TAG_ECHO).await;
    let fixed = start_backend(TAG_FIXED).await;
    let reset = start_backend(TAG_RESET).await;
    // An address that refuses: bound, then closed.
    let dead = loopback(free_port());
    let names: BTreeMap<u8, String> = [
        (TAG_ECHO, echo.addr.to_string()),
        (TAG_FIXED, fixed.addr.to_string()),
        (TAG_RESET, reset.addr.to_string()),
    ]
    .into();
    let dead_name = dead.to_string();

    // One refused connect marks the dead backend down for longer than the test runs, so exactly one
    // connect to it is attempted while connections are driven one at a time.
    let lb = start_balancer(
        &[echo.addr, dead, fixed.addr, reset.addr],
        &[
            "--idle-timeout",
            "300ms",
            "--fail-threshold",
            "1",
            "--down-backoff",
            "60s",
            "--connect-timeout",
            "2s",
        ],
    )
    .await;

    let mut tallies: BTreeMap<u8, Tally> = BTreeMap::new();
    let mut ends: BTreeMap<End, u64> = BTreeMap::new();
    // Counts phase 2's echo connections: every third is left idle, to be cut by --idle-timeout.
    let echo_count = Arc::new(AtomicU64::new(0));
    let mut seq = 0;

    // Phase 1, one connection at a time until the dead backend has been tried (and marked down).
    loop {
        let x = client(lb.listen, seq, None)
            .await
            .unwrap_or_else(|e| panic!("connection {seq}: {e}\n{}", lb.proc.log_tail()));
        seq += 1;
        add(&mut tallies, &mut ends, x);
        let down = scrape(lb.admin)
            .await
            .and_then(|t| Scrape::parse(&t))
            .ok()
            .and_then(|s| s.value("ulb_backend_up", &[("backend", &dead_name)]))
            == Some(0.0);
        if down {
            break;
        }
        assert!(
            seq < 20,
            "the dead backend {dead_name} was never marked down"
        );
    }

    // Phase 2, batches of concurrent connections; the backend's tag decides each protocol.
    for _batch in 0..6 {
        let mut batch = Vec::new();
        for _ in 0..6 {
            let idle_count = Some(echo_count.clone());
            batch.push(tokio::spawn(client(lb.listen, seq, idle_count)));
            seq += 1;
        }
        for (i, h) in batch.into_iter().enumerate() {
            let x = h.await.expect("client task").unwrap_or_else(|e| {
                panic!("connection in batch, #{i}: {e}\n{}", lb.proc.log_tail())
            });
            add(&mut tallies, &mut ends, x);
        }
    }
    eprintln!("client tallies: {tallies:?}; endings: {ends:?}");
    for end in [End::Clean, End::IdleCut, End::BackendReset] {
        assert!(
            ends.get(&end).copied().unwrap_or(0) > 0,
            "no connection ended as {end:?}: {ends:?}"
        );
    }
    for (tag, backend) in [(TAG_ECHO, &echo), (TAG_FIXED, &fixed), (TAG_RESET, &reset)] {
        assert_eq!(
            backend.accepted.load(Relaxed),
            tallies.get(&tag).map_or(0, |t| t.connections),
            "backend {} accepted another number of connections than its clients counted",
            tag as char
        );
    }
    let total: u64 = tallies.values().map(|t| t.connections).sum();
    assert_eq!(total, seq as u64);

    let version = env!("CARGO_PKG_VERSION");
    let s = wait_for_metrics(lb.admin, "metrics equal to the client tallies", |s| {
        let mut e = Expect {
            scrape: s,
            problems: Vec::new(),
        };
        for (tag, name) in &names {
            let t = tallies.get(tag).copied().unwrap_or_default();
            let b = [("backend", name.as_str())];
            let n = t.connections as f64;
            e.eq("ulb_connections_total", &b, n);
            e.eq("ulb_connect_duration_seconds_count", &b, n);
            e.eq("ulb_connections_active", &b, 0.0);
            e.eq("ulb_backend_up", &b, 1.0);
            e.eq("ulb_backend_weight", &b, 1.0);
            let dir = |d| [("backend", name.as_str()), ("direction", d)];
            e.eq("ulb_bytes_total", &dir("client_to_backend"), t.sent as f64);
            e.eq(
                "ulb_bytes_total",
                &dir("backend_to_client"),
                t.received as f64,
            );
            for reason in ["refused", "timeout", "other"] {
                let r = [("backend", name.as_str()), ("reason", reason)];
                e.eq("ulb_connect_errors_total", &r, 0.0);
            }
        }
        let d = [("backend", dead_name.as_str())];
        e.eq("ulb_backend_up", &d, 0.0);
        e.eq("ulb_connections_total", &d, 0.0);
        e.eq("ulb_connections_active", &d, 0.0);
        e.eq("ulb_connect_duration_seconds_count", &d, 0.0);
        for direction in ["client_to_backend", "backend_to_client"] {
            let dir = [("backend", dead_name.as_str()), ("direction", direction)];
            e.eq("ulb_bytes_total", &dir, 0.0);
        }
        let err = |reason| [("backend", dead_name.as_str()), ("reason", reason)];
        e.eq("ulb_connect_errors_total", &err("refused"), 1.0);
        e.eq("ulb_connect_errors_total", &err("timeout"), 0.0);
        e.eq("ulb_connect_errors_total", &err("other"), 0.0);
        e.eq("ulb_connection_duration_seconds_count", &[], total as f64);
        e.eq("ulb_no_backend_total", &[], 0.0);
        e.eq("ulb_accept_errors_total", &[], 0.0);
        e.eq(
            "ulb_connections_rejected_total",
            &[("reason", "no_backend")],
            0.0,
        );
        e.eq(
            "ulb_connections_rejected_total",
            &[("reason", "connect_failed")],
            0.0,
        );
        e.eq("ulb_build_info", &[("version", version)], 1.0);
        e.done()
    })
    .await;

    // The histograms' +Inf buckets agree with their counts.
    for name in names.values() {
        let b = [("backend", name.as_str()), ("le", "+Inf")];
        assert_eq!(
            s.value("ulb_connect_duration_seconds_bucket", &b),
            s.value("ulb_connect_duration_seconds_count", &b[..1])
        );
    }
    assert_eq!(
        s.value("ulb_connection_duration_seconds_bucket", &[("le", "+Inf")]),
        Some(total as f64)
    );
}

// ---------------------------------------------------------------------------------------------------------
// The dashboard and the alert rules, as files
// ---------------------------------------------------------------------------------------------------------

const DASHBOARD: &str = "grafana/ulb-tcp-dashboard.json";
const ALERTS: &str = "grafana/alerts.yml";
const DATASOURCES: &str = "grafana/provisioning/datasources/prometheus.yaml";
const DASHBOARD_PROVIDER: &str = "grafana/provisioning/dashboards/ulb-tcp.yaml";

/// The elements of a JSON array; none for anything else (a missing key indexes to `null`).
fn items(v: &Json) -> &[Json] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// Every panel, rows' nested panels included.
fn all_panels(dashboard: &Json) -> Vec<&Json> {
    fn walk<'a>(panels: &'a [Json], out: &mut Vec<&'a Json>) {
        for p in panels {
            out.push(p);
            walk(items(&p["panels"]), out);
        }
    }
    let mut out = Vec::new();
    walk(items(&dashboard["panels"]), &mut out);
    out
}

/// (panel title, expr) for every target of every panel.
fn dashboard_exprs(dashboard: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dashboard) {
        for t in items(&p["targets"]) {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    expr.to_string(),
                ));
            }
        }
    }
    out
}

/// The one YAML document in `text`; panics naming `what` if it is not valid YAML.
fn yaml_doc(text: &str, what: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(docs.len(), 1, "{what}: {} YAML documents", docs.len());
    docs.remove(0)
}

/// The elements of a YAML sequence; none for anything else (a missing key indexes to a bad value).
fn yaml_items(v: &Yaml) -> &[Yaml] {
    v.as_vec().map_or(&[], Vec::as_slice)
}

/// (alert or record name, expr) for every rule of a Prometheus rules file.
fn alert_exprs(yaml: &str) -> Vec<(String, String)> {
    let doc = yaml_doc(yaml, ALERTS);
    let mut out = Vec::new();
    for group in yaml_items(&doc["groups"]) {
        for rule in yaml_items(&group["rules"]) {
            let name = rule["alert"].as_str().or(rule["record"].as_str());
            let name = name.unwrap_or("?").to_string();
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("rule {name}: no expr string"));
            out.push((name, expr.trim().to_string()));
        }
    }
    out
}

/// Every `ulb_...` token in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"ulb_") && (i == 0 || !word(b[i - 1])) {
            let start = i;
            while i < b.len() && word(b[i]) {
                i += 1;
            }
            out.push(expr[start..i].to_string());
        } else {
            i += 1;
        }
    }
    out
}

/// The metric names defined as string constants in `src/metrics/mod.rs`.
fn defined_metrics() -> Vec<String> {
    let src = read_repo_file("src/metrics/mod.rs");
    let mut out = Vec::new();
    for line in src.lines() {
        let t = line.trim();
        if t.starts_with("pub const") && t.contains(": &str = \"ulb_") {
            if let Some(v) = t.split('"').nth(1) {
                if !v.ends_with('_') {
                    out.push(v.to_string());
                }
            }
        }
    }
    out
}

/// Replaces Grafana's variables with what a plain Prometheus query needs.
fn substitute(expr: &str, rate_interval: &str) -> String {
    expr.replace("$__rate_interval", rate_interval)
        .replace("${backend}", ".*")
        .replace("$backend", ".*")
}

#[test]
fn dashboard_and_alerts_are_well_formed() {
    let dash: Json =
        serde_json::from_str(&read_repo_file(DASHBOARD)).expect("the dashboard is valid JSON");
    let schema = dash["schemaVersion"]
        .as_f64()
        .unwrap_or_else(|| panic!("schemaVersion: {:?}", dash["schemaVersion"]));
    assert!(
        schema >= 36.0,
        "schemaVersion {schema} is older than Grafana 10"
    );
    assert!(dash["uid"].is_string() && dash["title"].is_string());

    // Variables: a Prometheus datasource picker and a multi-select backend with All.
    let vars = items(&dash["templating"]["list"]);
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no template variable {name:?}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"].as_str(), Some("datasource"));
    assert_eq!(ds["query"].as_str(), Some("prometheus"));
    let backend = var("backend");
    assert_eq!(backend["type"].as_str(), Some("query"));
    assert_eq!(
        backend["definition"].as_str(),
        Some("label_values(ulb_backend_up, backend)")
    );
    assert_eq!(backend["multi"].as_bool(), Some(true));
    assert_eq!(backend["includeAll"].as_bool(), Some(true));
    assert_eq!(backend["datasource"]["uid"].as_str(), Some("${datasource}"));

    // The datasource variable's default is the provisioned data source.
    let default_ds = ds["current"]["value"]
        .as_str()
        .expect("datasource variable default");
    let provisioned = yaml_doc(&read_repo_file(DATASOURCES), DATASOURCES);
    assert!(
        yaml_items(&provisioned["datasources"])
            .iter()
            .any(|d| d["uid"].as_str() == Some(default_ds)),
        "{DATASOURCES} has no data source with uid {default_ds}"
    );
    let providers = yaml_doc(&read_repo_file(DASHBOARD_PROVIDER), DASHBOARD_PROVIDER);
    assert!(
        yaml_items(&providers["providers"])
            .iter()
            .any(|p| p["type"].as_str() == Some("file")),
        "{DASHBOARD_PROVIDER} has no provider of type file"
    );

    // Every panel and every target uses ${datasource}; ids are unique; rate windows are $__rate_interval.
    let panels = all_panels(&dash);
    let mut ids = std::collections::BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        match p["id"].as_f64() {
            Some(id) => assert!(ids.insert(id as i64), "duplicate panel id {id}"),
            None => panic!("panel {title:?} has id {:?}", p["id"]),
        }
        assert!(p.get("gridPos").is_some(), "panel {title:?} has no gridPos");
        if p["type"].as_str() == Some("row") {
            continue;
        }
        let uid = p["datasource"]["uid"].as_str();
        assert_eq!(uid, Some("${datasource}"), "panel {title:?}");
        assert!(
            !items(&p["targets"]).is_empty(),
            "panel {title:?} has no target"
        );
        for t in items(&p["targets"]) {
            let uid = t["datasource"]["uid"].as_str();
            assert_eq!(uid, Some("${datasource}"), "a target of panel {title:?}");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.is_empty(), "a target of panel {title:?} has no expr");
            if expr.contains("rate(") || expr.contains("increase(") {
                assert!(
                    expr.contains("[$__rate_interval]"),
                    "panel {title:?}: use $__rate_interval: {expr}"
                );
            }
        }
    }

    // The reserved rows exist and hold panels on their series.
    for (row, prefix) in [
        // the `ulb_worker_*` series.
        ("Workers (cluster)", "ulb_worker"),
        ("Blocking pool", "ulb_pool_"),
    ] {
        let r = panels
            .iter()
            .find(|p| p["type"].as_str() == Some("row") && p["title"].as_str() == Some(row))
            .unwrap_or_else(|| panic!("no row {row:?}"));
        let nested = items(&r["panels"]);
        assert!(!nested.is_empty(), "row {row:?} has no panels");
        for p in nested {
            for t in items(&p["targets"]) {
                let expr = t["expr"].as_str().unwrap_or_default();
                assert!(expr.contains(prefix), "row {row:?}: {expr}");
            }
        }
    }

    // Every metric named in the dashboard or the alerts exists, or is reserved for later.
    let defined = defined_metrics();
    assert!(defined.len() >= 12, "metric constants: {defined:?}");
    let exprs = dashboard_exprs(&dash);
    let alerts = alert_exprs(&read_repo_file(ALERTS));
    assert_eq!(alerts.len(), ALERT_RULES, "alert rules found: {alerts:?}");
    for (what, expr) in exprs.iter().chain(&alerts) {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what}: no ulb_ metric in {expr}");
        for n in names {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|b| defined.iter().any(|d| d == b))
                .unwrap_or(&n);
            assert!(
                defined.iter().any(|d| d == base)
                    || n.starts_with("ulb_worker_")
                    || n.starts_with("ulb_pool_"),
                "{what}: unknown metric {n} in {expr}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// b, c. promtool
// ---------------------------------------------------------------------------------------------------------

fn skip_without(tool: &str) -> bool {
    if on_path(tool) {
        return false;
    }
    eprintln!("skipped: prometheus not installed ({tool} is not on PATH)");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_check_metrics_passes_on_a_real_scrape() {
    if skip_without("promtool") {
        return;
    }
    let echo = start_backend(TAG_ECHO).await;
    let dead = loopback(free_port());
    let lb = start_balancer(&[echo.addr, dead], &[]).await;
    for seq in 0..6 {
        client(lb.listen, seq, None)
            .await
            .unwrap_or_else(|e| panic!("connection {seq}: {e}"));
    }
    let echo_name = echo.addr.to_string();
    wait_for_metrics(lb.admin, "six connections counted", |s| {
        match s.value("ulb_connections_total", &[("backend", &echo_name)]) {
            Some(6.0) => Ok(()),
            other => Err(format!("ulb_connections_total: {other:?}")),
        }
    })
    .await;
    let text = scrape(lb.admin).await.expect("scrape");

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    let mut stdin = child.stdin.take().expect("promtool stdin");
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().expect("promtool output");
    writer
        .join()
        .expect("writer thread")
        .expect("write to promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{report}",
        out.status
    );
    assert!(
        report.trim().is_empty(),
        "promtool check metrics reported problems:\n{report}"
    );
}

#[test]
fn promtool_check_rules_passes() {
    if skip_without("promtool") {
        return;
    }
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(manifest_path(ALERTS))
        .output()
        .expect("run promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{report}"
    );
    assert!(
        report.contains(&format!("SUCCESS: {ALERT_RULES} rules found")),
        "unexpected promtool output:\n{report}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// d. A real Prometheus
// ---------------------------------------------------------------------------------------------------------

struct Prometheus {
    proc: Proc,
    addr: SocketAddr,
}

/// Starts Prometheus on a free loopback port with `config` and waits for `/-/ready`.
async fn start_prometheus(dir: &TempDir, config: &Path) -> Prometheus {
    for attempt in 1..=5 {
        let addr = loopback(free_port());
        let data = dir.path().join(format!("data-{attempt}"));
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut proc = Proc::spawn(
            &mut cmd,
            dir.path().join(format!("prometheus-{attempt}.log")),
        );
        let ready = proc
            .wait_ready(
                "prometheus",
                attempt,
                Duration::from_millis(50),
                |_| async move {
                    matches!(
                        http_get(addr, "/-/ready", Version::HTTP_11).await,
                        Ok((200, _))
                    )
                },
            )
            .await;
        if ready {
            return Prometheus { proc, addr };
        }
    }
    panic!("prometheus could not start after 5 attempts");
}

/// An instant query's answer: Ok(result array) on "status":"success", Err(the error text) otherwise.
async fn prom_query(prom: SocketAddr, expr: &str) -> Result<Vec<Json>, String> {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", expr)
        .finish();
    let target = format!("/api/v1/query?{query}");
    let (status, body) = http_get(prom, &target, Version::HTTP_11)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let json: Json = serde_json::from_str(&body)
        .map_err(|e| format!("status {status}, bad JSON ({e}): {body}"))?;
    if json["status"].as_str() != Some("success") {
        return Err(format!(
            "status {status}: {}: {}",
            json["errorType"].as_str().unwrap_or("?"),
            json["error"].as_str().unwrap_or(&body)
        ));
    }
    Ok(items(&json["data"]["result"]).to_vec())
}

/// The sample values of an instant vector (or a scalar's one value).
fn result_values(result: &[Json]) -> Vec<f64> {
    result
        .iter()
        .filter_map(|r| r["value"][1].as_str()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_dashboard_and_alert_expression() {
    if skip_without("prometheus") {
        return;
    }
    let echo = start_backend(TAG_ECHO).await;
    let fixed = start_backend(TAG_FIXED).await;
    let dead = loopback(free_port());
    let lb = start_balancer(&[echo.addr, fixed.addr, dead], &["--down-backoff", "2s"]).await;
    let dead_name = dead.to_string();

    // Traffic until the end of the test.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let traffic = tokio::spawn({
        let (stop, failures, listen) = (stop.clone(), failures.clone(), lb.listen);
        async move {
            let mut seq = 0;
            while !stop.load(Relaxed) {
                if let Err(e) = client(listen, seq, None).await {
                    eprintln!("traffic connection {seq}: {e}");
                    failures.fetch_add(1, Relaxed);
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seq
        }
    });

    let dir = TempDir::new("prom");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {alerts}\n\
             scrape_configs:\n  - job_name: ulb-tcp\n    static_configs:\n      - targets: ['{target}']\n",
            alerts = manifest_path(ALERTS).display(),
            target = lb.admin,
        ),
    )
    .expect("write prometheus.yml");
    let prom = start_prometheus(&dir, &config).await;

    // Wait until the target is up and rates over 10s have enough samples.
    let ready = [
        r#"up{job="ulb-tcp"} == 1"#,
        "sum(rate(ulb_connections_total[10s])) > 0",
        "sum(rate(ulb_connect_duration_seconds_bucket[10s])) > 0",
        "count_over_time(ulb_build_info[10s]) >= 4",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    for q in ready {
        loop {
            match prom_query(prom.addr, q).await {
                Ok(r) if !r.is_empty() => break,
                other => assert!(
                    Instant::now() < deadline,
                    "Prometheus: {q} not true within 30s: {other:?}\n{}",
                    prom.proc.log_tail()
                ),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    let dash: Json = serde_json::from_str(&read_repo_file(DASHBOARD)).expect("dashboard JSON");
    let mut queries: Vec<(String, String, bool)> = Vec::new();
    for (title, expr) in dashboard_exprs(&dash) {
        // Traffic series exist from the first scrape: their panels must show data.
        let traffic_panel = [
            "ulb_connections_total",
            "ulb_connections_active",
            "ulb_bytes_total",
            "ulb_connect_duration_seconds_bucket",
        ]
        .iter()
        .any(|m| metric_names(&expr).iter().any(|n| n == m));
        queries.push((format!("panel {title:?}"), expr, traffic_panel));
    }
    // The backend variable's label_values(ulb_backend_up, backend), as PromQL.
    queries.push((
        "variable backend".into(),
        "count by (backend) (ulb_backend_up)".into(),
        true,
    ));
    for (name, expr) in alert_exprs(&read_repo_file(ALERTS)) {
        queries.push((format!("alert {name}"), expr, false));
    }

    let mut problems = Vec::new();
    for (what, expr, must_have_data) in &queries {
        let q = substitute(expr, "10s");
        match prom_query(prom.addr, &q).await {
            Err(e) => problems.push(format!("{what}: {q}\n    -> {e}")),
            Ok(r) if *must_have_data && r.is_empty() => {
                problems.push(format!("{what}: {q}\n    -> no data"))
            }
            // Connections/s and throughput panels must show the traffic itself, not just zeros.
            Ok(r)
                if (what.contains("Connections/s") || what.contains("Throughput"))
                    && !result_values(&r).iter().any(|v| *v > 0.0) =>
            {
                problems.push(format!("{what}: {q}\n    -> no positive value: {r:?}"))
            }
            Ok(_) => {}
        }
    }
    eprintln!("{} expressions evaluated", queries.len());

    // The rules file loaded, every rule evaluates cleanly, and the dead backend's alert is on its way.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_get(prom.addr, "/api/v1/rules", Version::HTTP_11)
            .await
            .expect("GET /api/v1/rules");
        let json: Json = serde_json::from_str(&body).expect("rules JSON");
        let rules: Vec<&Json> = items(&json["data"]["groups"])
            .iter()
            .flat_map(|g| items(&g["rules"]))
            .collect();
        let unhealthy: Vec<String> = rules
            .iter()
            .filter(|r| r["health"].as_str() != Some("ok"))
            .map(|r| {
                format!(
                    "{}: health {:?} {:?}",
                    r["name"].as_str().unwrap_or("?"),
                    r["health"].as_str(),
                    r["lastError"].as_str()
                )
            })
            .collect();
        let down_alert = rules.iter().any(|r| {
            r["name"].as_str() == Some("UlbBackendDown")
                && items(&r["alerts"])
                    .iter()
                    .any(|a| a["labels"]["backend"].as_str() == Some(dead_name.as_str()))
        });
        if rules.len() == ALERT_RULES && unhealthy.is_empty() && down_alert {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules: {} loaded, unhealthy {unhealthy:?}, UlbBackendDown for {dead_name} pending: {down_alert}\n{body}",
            rules.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    stop.store(true, Relaxed);
    let carried = traffic.await.expect("traffic task");
    assert!(
        problems.is_empty(),
        "{} of {} expressions failed:\n{}",
        problems.len(),
        queries.len(),
        problems.join("\n")
    );
    assert_eq!(
        failures.load(Relaxed),
        0,
        "traffic connections failed (of {carried})"
    );
}

#[test]
fn metric_names_are_extracted() {
    assert_eq!(
        metric_names("sum(rate(ulb_a_total[5m])) / x_ulb_b + ulb_c_bucket"),
        ["ulb_a_total", "ulb_c_bucket"]
    );
}

/// No maintained crate parses the text format correctly (see the Prometheus text format section), so
/// the test's own parser is checked here: escaped label values, histogram series, timestamps, garbage.
#[test]
fn scrape_parser_reads_the_text_format() {
    let text = r#"# HELP x_total Requests.
# TYPE x_total counter
x_total{backend="127.0.0.1:1",path="a \"q\" \\ b,c=d}"} 3
x_total{backend="127.0.0.1:2", msg="two\nlines",} 4 1700000000000
# TYPE h histogram
h_bucket{le="0.5"} 1
h_bucket{le="+Inf"} 2
h_sum 0.7
h_count 2
up 1e0
"#;
    let s = Scrape::parse(text).expect("valid exposition");
    assert_eq!(
        s.value("x_total", &[("path", r#"a "q" \ b,c=d}"#)]),
        Some(3.0)
    );
    assert_eq!(s.value("x_total", &[("backend", "127.0.0.1:2")]), Some(4.0));
    assert_eq!(s.value("x_total", &[("msg", "two\nlines")]), Some(4.0));
    assert_eq!(s.value("x_total", &[("backend", "127.0.0.1:3")]), None);
    assert_eq!(s.value("h_bucket", &[("le", "+Inf")]), Some(2.0));
    assert_eq!(s.value("h_bucket", &[("le", "0.5")]), Some(1.0));
    assert_eq!(s.value("h_sum", &[]), Some(0.7));
    assert_eq!(s.value("h_count", &[]), Some(2.0));
    assert_eq!(s.value("up", &[]), Some(1.0));
    for bad in [
        r#"x_total{backend="a" 1"#,
        r#"x_total{backend=a} 1"#,
        "x_total one",
        "x_total",
    ] {
        assert!(Scrape::parse(bad).is_err(), "{bad:?} was accepted");
    }
}
