//! Active health checks against real servers: `redis-server` and `nginx` processes stopped with SIGSTOP
//! under load (through the `ulb-tcp` binary and through the library), an nginx whose `/healthz` fails,
//! a backend that flaps, the spread of the checks of 50 backends, a pool that was all down, and checks
//! that follow backends added, re-addressed and removed at run time.
//!
//! Everything runs on loopback with ephemeral ports; every process is killed and reaped (its whole
//! process group); every wait is on observable state with a deadline. A test whose Debian binary
//! (`redis-server`, `nginx`) is missing says so and passes.
#![cfg(target_os = "linux")]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::{tool_or_skip, unique_port as free_port, wait_until, Backend, Proc, Running, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ulb_tcp::{BackendConfig, BackendEvent, BalancerConfig, HealthCheck, TcpBalancer};

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");

const INTERVAL: Duration = Duration::from_millis(250);
const TIMEOUT: Duration = Duration::from_millis(250);
const RISE: u32 = 2;
const FALL: u32 = 3;

/// The bound on detection the checks promise: fall × (interval + timeout) + interval.
fn detection_bound() -> Duration {
    (INTERVAL + TIMEOUT) * FALL + INTERVAL
}

/// The bound on recovery: rise × interval + interval.
fn recovery_bound() -> Duration {
    INTERVAL * RISE + INTERVAL
}

// ---------------------------------------------------------------------------------------------------------
// Processes, temporary directories, tools.

fn id(addr: SocketAddr) -> String {
    addr.to_string()
}

// ---------------------------------------------------------------------------------------------------------
// Redis.

// ---------------------------------------------------------------------------------------------------------
// nginx.

struct Nginx {
    proc: Proc,
    addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    /// An nginx (master and one worker, `daemon off`) on a free loopback port: `/who` answers `tag`,
    /// `/healthz` answers `health`.
    async fn start(bin: &Path, tag: char, health: u16) -> Nginx {
        for _ in 0..5 {
            let dir = TempDir::new("nginx");
            let port = free_port();
            let d = dir.path().display();
            let conf = format!(
                "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 server {{\n    listen 127.0.0.1:{port};\n\
                 location = /healthz {{ return {health} \"health\\n\"; }}\n\
                 location = /ready {{ return 200 \"{tag}\"; }}\n\
                 location = /who {{ return 200 \"{tag}\"; }}\n  }}\n}}\n"
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let mut cmd = Command::new(bin);
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut proc = Proc::spawn(&mut cmd, format!("nginx :{port}"));
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) && !proc.exited() {
                if http_get(addr, "/ready").await == Some(tag.to_string()) {
                    return Nginx { proc, addr, dir };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("nginx never started");
    }

    /// Requests for `path` in its access log.
    fn requests(&self, path: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        let needle = format!("\"GET {path} ");
        log.lines().filter(|l| l.contains(&needle)).count()
    }
}

/// `GET path` with HTTP/1.0; the body of a 200 answer.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&got);
    let body = text.split_once("\r\n\r\n")?.1;
    text.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

// ---------------------------------------------------------------------------------------------------------
// Load through the balancer: one new connection every few milliseconds, each asking which backend it
// reached (redis `GET who`, or nginx `/who`) and waiting as long as it takes for the answer.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Redis,
    Http,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    started: Instant,
    /// The backend's tag, or `None` when the connection got no answer.
    tag: Option<char>,
    took: Duration,
}

async fn ask(lb: SocketAddr, proto: Proto) -> Option<char> {
    let mut s = TcpStream::connect(lb).await.ok()?;
    match proto {
        Proto::Redis => {
            s.write_all(b"GET who\r\n").await.ok()?;
            let mut got = Vec::new();
            while got.len() < 7 {
                let mut chunk = [0u8; 64];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                got.extend_from_slice(&chunk[..n]);
            }
            got.starts_with(b"$1\r\n").then(|| got[4] as char)
        }
        Proto::Http => {
            s.write_all(b"GET /who HTTP/1.0\r\nHost: test\r\n\r\n")
                .await
                .ok()?;
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.ok()?;
            let text = String::from_utf8_lossy(&got);
            text.split_once("\r\n\r\n")?.1.chars().next()
        }
    }
}

struct Load {
    records: Arc<Mutex<Vec<Record>>>,
    inflight: Arc<AtomicUsize>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    spawner: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(lb: SocketAddr, proto: Proto, every: Duration) -> Load {
        let records = Arc::new(Mutex::new(Vec::new()));
        let inflight = Arc::new(AtomicUsize::new(0));
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let spawner = tokio::spawn({
            let (records, inflight) = (records.clone(), inflight.clone());
            let (pause, paused, stop) = (pause.clone(), paused.clone(), stop.clone());
            async move {
                while !stop.load(SeqCst) {
                    let hold = pause.load(SeqCst);
                    paused.store(hold, SeqCst);
                    if !hold {
                        inflight.fetch_add(1, SeqCst);
                        let (records, inflight) = (records.clone(), inflight.clone());
                        tokio::spawn(async move {
                            let started = Instant::now();
                            let limit = Duration::from_secs(30);
                            let tag = tokio::time::timeout(limit, ask(lb, proto))
                                .await
                                .ok()
                                .flatten();
                            records.lock().unwrap().push(Record {
                                started,
                                tag,
                                took: started.elapsed(),
                            });
                            inflight.fetch_sub(1, SeqCst);
                        });
                    }
                    tokio::time::sleep(every).await; // paces the load
                }
                paused.store(true, SeqCst);
            }
        });
        Load {
            records,
            inflight,
            pause,
            paused,
            stop,
            spawner,
        }
    }

    /// Stops starting connections and waits until none is in flight.
    async fn pause(&self) {
        self.pause.store(true, SeqCst);
        wait_until("the load to pause", Duration::from_secs(10), || {
            self.paused.load(SeqCst)
        })
        .await;
        self.quiesce().await;
    }

    fn resume(&self) {
        self.pause.store(false, SeqCst);
        self.paused.store(false, SeqCst);
    }

    async fn quiesce(&self) {
        wait_until(
            "the connections in flight to end",
            Duration::from_secs(35),
            || self.inflight.load(SeqCst) == 0,
        )
        .await;
    }

    /// Waits until `n` more answered connections started after `since`.
    async fn wait_answered(&self, n: usize, since: Instant, what: &str) {
        wait_until(what, Duration::from_secs(20), || {
            let r = self.records.lock().unwrap();
            r.iter()
                .filter(|r| r.started > since && r.tag.is_some())
                .count()
                >= n
        })
        .await;
    }

    async fn wait_tag(&self, tag: char, since: Instant, what: &str) {
        wait_until(what, Duration::from_secs(20), || {
            let r = self.records.lock().unwrap();
            r.iter().any(|r| r.started > since && r.tag == Some(tag))
        })
        .await;
    }

    async fn finish(self) -> Vec<Record> {
        self.stop.store(true, SeqCst);
        tokio::time::timeout(Duration::from_secs(10), self.spawner)
            .await
            .expect("the load did not stop")
            .unwrap();
        wait_until(
            "the last connections to end",
            Duration::from_secs(35),
            || self.inflight.load(SeqCst) == 0,
        )
        .await;
        let r = self.records.lock().unwrap().clone();
        r
    }
}

// ---------------------------------------------------------------------------------------------------------
// The balancer as a process, with its JSON log lines read as they come.

struct Binary {
    _proc: Proc,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: Arc<Mutex<Vec<(Instant, serde_json::Value)>>>,
}

impl Binary {
    async fn start(args: &[String]) -> Binary {
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let mut cmd = Command::new(BIN);
            cmd.args([
                "--listen",
                &addr.to_string(),
                "--metrics",
                &metrics.to_string(),
            ])
            .args(["--log-format", "json", "--threads", "2"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
            let mut proc = Proc::spawn(&mut cmd, "ulb-tcp");
            let stderr = proc.child.stderr.take().unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            std::thread::spawn({
                let log = log.clone();
                move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        let value = serde_json::from_str(&line)
                            .unwrap_or_else(|_| serde_json::Value::String(line.clone()));
                        log.lock().unwrap().push((Instant::now(), value));
                    }
                }
            });
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) && !proc.exited() {
                if TcpStream::connect(addr).await.is_ok() {
                    return Binary {
                        _proc: proc,
                        addr,
                        metrics,
                        log,
                    };
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("ulb-tcp never started accepting");
    }

    /// When the balancer logged `message` for `backend` after `since` (waits for it, up to `limit`).
    async fn logged(
        &self,
        message: &str,
        backend: &str,
        since: Instant,
        limit: Duration,
    ) -> (Instant, String) {
        let find = || {
            let log = self.log.lock().unwrap();
            log.iter().find_map(|(at, v)| {
                let f = &v["fields"];
                (*at > since && f["message"] == message && f["backend"] == backend).then(|| {
                    let reason = f["reason"].as_str().unwrap_or_default().to_string();
                    (*at, reason)
                })
            })
        };
        let what = format!("ulb-tcp to log {message:?} for {backend}");
        wait_until(&what, limit, || find().is_some()).await;
        find().unwrap()
    }

    /// The value of the Prometheus series whose line starts with `name{` and holds every label given.
    async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let mut s = TcpStream::connect(self.metrics).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
            .await
            .ok()?;
        let mut got = String::new();
        s.read_to_string(&mut got).await.ok()?;
        got.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| labels.iter().all(|label| l.contains(label)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

/// The findings of a SIGSTOP run.
#[derive(Debug)]
struct StopRun {
    detected: Duration,
    recovered: Duration,
    reached_before_detection: usize,
}

/// Checks the records of a SIGSTOP run: the stopped backend `victim` got no connection that started
/// after it was marked down and before it was continued; every connection was answered.
fn judge_records(
    records: &[Record],
    victim: char,
    stopped: Instant,
    down: Instant,
    continued: Instant,
) -> usize {
    let unanswered: Vec<_> = records.iter().filter(|r| r.tag.is_none()).collect();
    assert!(
        unanswered.is_empty(),
        "{} connections got no answer: {:?}",
        unanswered.len(),
        &unanswered[..unanswered.len().min(5)]
    );
    let late: Vec<_> = records
        .iter()
        .filter(|r| r.tag == Some(victim) && r.started > down && r.started < continued)
        .collect();
    assert!(
        late.is_empty(),
        "{} connections reached the stopped backend after it was marked down: {late:?}",
        late.len()
    );
    let before: Vec<_> = records
        .iter()
        .filter(|r| r.tag == Some(victim) && r.started >= stopped && r.started <= down)
        .collect();
    let slowest = before.iter().map(|r| r.took).max().unwrap_or_default();
    eprintln!(
        "{} connections reached the stopped backend before it was marked down (answered after SIGCONT, \
         the slowest in {slowest:?}); {} connections in all",
        before.len(),
        records.len()
    );
    before.len()
}

// ---------------------------------------------------------------------------------------------------------

/// Three redis-server backends behind the `ulb-tcp` binary with send-expect checks (PING/+PONG); one is
/// stopped with SIGSTOP under load (its kernel still accepts connections, so connects succeed and
/// only a check that waits for the reply sees it), then continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_is_taken_out_by_send_expect_checks_and_comes_back() {
    let Some(redis) = tool_or_skip("redis-server", "redis SIGSTOP") else {
        return;
    };
    let backends = [
        Redis::start(&redis, 'a').await,
        Redis::start(&redis, 'b').await,
        Redis::start(&redis, 'c').await,
    ];
    let list: Vec<String> = backends.iter().map(|r| r.addr.to_string()).collect();
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let args: Vec<String> = [
        "--backends",
        &list.join(","),
        "--check",
        "send-expect",
        "--check-send",
        r"PING\r\n",
        "--check-expect",
        "+PONG",
        "--check-interval",
        &ms(INTERVAL),
        "--check-timeout",
        &ms(TIMEOUT),
        "--rise",
        &RISE.to_string(),
        "--fall",
        &FALL.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = Instant::now();
    let lb = Binary::start(&args).await;
    for r in &backends {
        let (at, reason) = lb
            .logged(
                "backend is up",
                &id(r.addr),
                started,
                Duration::from_secs(10),
            )
            .await;
        assert_eq!(reason, r#"send-expect: got "+PONG""#);
        eprintln!("{} up {:?} after start", r.addr, at - started);
    }

    let load = Load::start(lb.addr, Proto::Redis, Duration::from_millis(5));
    load.wait_answered(60, started, "load through every backend")
        .await;
    let victim = &backends[1];
    load.pause().await;
    let before = victim.gets().await;
    let stopped = Instant::now(); // every connection after this one started after the count
    victim.proc.signal_group(libc::SIGSTOP);
    load.resume();

    let (down, reason) = lb
        .logged(
            "backend is down",
            &id(victim.addr),
            stopped,
            Duration::from_secs(10),
        )
        .await;
    let detected = down - stopped;
    assert_eq!(
        reason,
        format!("send-expect: timed out after {}", ms(TIMEOUT))
    );
    // Traffic goes on, to the two others only.
    load.wait_answered(100, down, "load after the detection")
        .await;

    let continued = Instant::now();
    victim.proc.signal_group(libc::SIGCONT);
    let (up, _) = lb
        .logged(
            "backend is up",
            &id(victim.addr),
            continued,
            Duration::from_secs(10),
        )
        .await;
    let recovered = up - continued;
    load.wait_tag('b', up, "traffic to the continued backend")
        .await;
    let records = load.finish().await;

    let reached = judge_records(&records, 'b', stopped, down, continued);
    // What redis itself saw: exactly the GETs of the connections the clients counted, no other.
    let counted = records
        .iter()
        .filter(|r| r.tag == Some('b') && r.started > stopped)
        .count() as u64;
    assert_eq!(victim.gets().await - before, counted);

    let failures = lb
        .metric(
            "ulb_check_failures_total",
            &[
                &format!("backend=\"{}\"", victim.addr),
                "reason=\"timeout\"",
            ],
        )
        .await;
    assert!(failures >= Some(f64::from(FALL)), "{failures:?}");
    let checks = lb
        .metric(
            "ulb_check_duration_seconds_count",
            &[&format!("backend=\"{}\"", backends[0].addr)],
        )
        .await;
    assert!(checks >= Some(3.0), "{checks:?}");

    let run = StopRun {
        detected,
        recovered,
        reached_before_detection: reached,
    };
    assert!(run.reached_before_detection < records.len());
    eprintln!(
        "redis: {run:?} (bounds {:?} and {:?})",
        detection_bound(),
        recovery_bound()
    );
    assert!(detected <= detection_bound(), "{run:?}");
    assert!(recovered <= recovery_bound(), "{run:?}");
}

/// Three nginx backends (master and worker each) behind the library with http checks; one whole
/// process group is stopped under load, then continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_nginx_is_taken_out_by_http_checks_and_comes_back() {
    let Some(nginx) = tool_or_skip("nginx", "nginx SIGSTOP") else {
        return;
    };
    let backends = [
        Nginx::start(&nginx, 'a', 200).await,
        Nginx::start(&nginx, 'b', 200).await,
        Nginx::start(&nginx, 'c', 200).await,
    ];
    let config = BalancerConfig::new(backends.iter().map(|n| BackendConfig::new(n.addr))).check(
        HealthCheck::http("/healthz")
            .interval(INTERVAL)
            .timeout(TIMEOUT)
            .rise(RISE)
            .fall(FALL),
    );
    let lb = Running::start(config).await;
    let events = record_events(&lb);
    lb.wait_for("every nginx up", |b| b.iter().all(|b| b.up))
        .await;
    let start = Instant::now();

    let load = Load::start(lb.addr, Proto::Http, Duration::from_millis(5));
    load.wait_answered(60, start, "load through every backend")
        .await;
    let victim = &backends[1];
    load.pause().await;
    let before = victim.requests("/who");
    let stopped = Instant::now(); // every connection after this one started after the count
    victim.proc.signal_group(libc::SIGSTOP);
    load.resume();

    let down = events.wait(&id(victim.addr), false, stopped).await;
    let reason = lb.handle.backend(&id(victim.addr)).unwrap().health_reason;
    assert_eq!(
        reason,
        format!("http: timed out after {}ms", TIMEOUT.as_millis())
    );
    load.wait_answered(100, down, "load after the detection")
        .await;

    let continued = Instant::now();
    victim.proc.signal_group(libc::SIGCONT);
    let up = events.wait(&id(victim.addr), true, continued).await;
    load.wait_tag('b', up, "traffic to the continued backend")
        .await;
    let records = load.finish().await;
    let reached = judge_records(&records, 'b', stopped, down, continued);
    let counted = records
        .iter()
        .filter(|r| r.tag == Some('b') && r.started > stopped)
        .count();
    // nginx logs a request once it has answered it: wait for its log to catch up with the clients.
    wait_until("nginx's access log", Duration::from_secs(10), || {
        victim.requests("/who") - before >= counted
    })
    .await;
    assert_eq!(victim.requests("/who") - before, counted);

    let run = StopRun {
        detected: down - stopped,
        recovered: up - continued,
        reached_before_detection: reached,
    };
    eprintln!(
        "nginx: {run:?} (bounds {:?} and {:?})",
        detection_bound(),
        recovery_bound()
    );
    assert!(run.detected <= detection_bound(), "{run:?}");
    assert!(run.recovered <= recovery_bound(), "{run:?}");
    lb.stop().await;
}

/// The health changes a balancer announces, with when the test saw them.
struct Events(Arc<Mutex<Vec<(Instant, BackendEvent)>>>);

fn record_events(lb: &Running) -> Events {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut stream = lb.handle.events();
    tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(Ok(e)) = stream.recv().await {
                seen.lock().unwrap().push((Instant::now(), e));
            }
        }
    });
    Events(seen)
}

impl Events {
    fn health(&self, backend: &str) -> Vec<(Instant, bool)> {
        let seen = self.0.lock().unwrap();
        seen.iter()
            .filter_map(|(at, e)| match e {
                BackendEvent::HealthChanged { id, up, .. } if id.as_str() == backend => {
                    Some((*at, *up))
                }
                _ => None,
            })
            .collect()
    }

    /// When `backend` went `up` (or down) after `since`.
    async fn wait(&self, backend: &str, up: bool, since: Instant) -> Instant {
        let find = || {
            self.health(backend)
                .into_iter()
                .find(|&(at, u)| at > since && u == up)
                .map(|(at, _)| at)
        };
        let what = format!("{backend} to go {}", if up { "up" } else { "down" });
        wait_until(&what, Duration::from_secs(10), || find().is_some()).await;
        find().unwrap()
    }
}

/// An nginx whose `/healthz` answers 503 is never put in rotation: no client connection reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nginx_whose_healthz_fails_never_takes_a_connection() {
    let Some(nginx) = tool_or_skip("nginx", "nginx 503") else {
        return;
    };
    let good = [
        Nginx::start(&nginx, 'a', 200).await,
        Nginx::start(&nginx, 'c', 200).await,
    ];
    let bad = Nginx::start(&nginx, 'b', 503).await;
    let all = [&good[0], &bad, &good[1]];
    let config = BalancerConfig::new(all.iter().map(|n| BackendConfig::new(n.addr))).check(
        HealthCheck::http("/healthz")
            .interval(INTERVAL)
            .timeout(TIMEOUT),
    );
    let lb = Running::start(config).await;
    let events = record_events(&lb);
    // Clients from the very start, before any check has run, until each good nginx answered 150.
    let mut tags: HashMap<Option<char>, usize> = HashMap::new();
    let mut n = 0;
    let start = Instant::now();
    while tags
        .get(&Some('a'))
        .unwrap_or(&0)
        .min(tags.get(&Some('c')).unwrap_or(&0))
        < &150
    {
        assert!(start.elapsed() < Duration::from_secs(20), "{tags:?}");
        let tag = ask(lb.addr, Proto::Http).await;
        *tags.entry(tag).or_insert(0) += 1;
        n += 1;
    }
    wait_until(
        "the bad nginx to be checked",
        Duration::from_secs(10),
        || bad.requests("/healthz") >= 3,
    )
    .await;
    eprintln!("{n} connections: {tags:?}");
    assert_eq!(tags.get(&Some('b')), None, "{tags:?}");
    assert_eq!(bad.requests("/who"), 0);
    let stats = lb.handle.backend(&id(bad.addr)).unwrap();
    assert!(!stats.up && !stats.in_rotation());
    assert_eq!(stats.health_reason, "http: status 503");
    assert!(events.health(&id(bad.addr)).is_empty(), "it never changed");
    lb.stop().await;
}

/// A server that answers PING with +PONG and -ERR by turns (the first answer is `first_passes`); it
/// records when each check came.
async fn flapper(first_passes: bool) -> (SocketAddr, Arc<Mutex<Vec<Instant>>>, Backend) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let n = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = Backend::serve(listener, {
        let seen = seen.clone();
        move |mut s| {
            let i = n.fetch_add(1, SeqCst);
            seen.lock().unwrap().push(Instant::now());
            async move {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                let pass = (i % 2 == 0) == first_passes;
                let reply: &[u8] = if pass { b"+PONG\r\n" } else { b"-ERR no\r\n" };
                let _ = s.write_all(reply).await;
            }
        }
    });
    (addr, seen, backend)
}

/// A backend that alternates pass, fail, pass, ... never changes state with fall 3 and rise 2, whether
/// its first check passed (it stays up) or failed (it stays down). After each result against its
/// state (a failure while up, a pass while down) it is in transition and checked at a quarter of the
/// interval; after the next one, which ends the streak, at the interval again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_backend_never_changes_state() {
    let (up_addr, up_seen, _up) = flapper(true).await;
    let (down_addr, down_seen, _down) = flapper(false).await;
    let interval = Duration::from_millis(200);
    let config = BalancerConfig::new([BackendConfig::new(up_addr), BackendConfig::new(down_addr)])
        .check(
            HealthCheck::send_expect(&b"PING\r\n"[..], &b"+PONG"[..])
                .interval(interval)
                .timeout(TIMEOUT)
                .rise(2)
                .fall(3),
        );
    let lb = Running::start(config).await;
    let events = record_events(&lb);
    let checks = 24;
    wait_until("24 checks of each", Duration::from_secs(20), || {
        up_seen.lock().unwrap().len() >= checks && down_seen.lock().unwrap().len() >= checks
    })
    .await;
    let up_changes = events.health(&id(up_addr));
    assert_eq!(
        up_changes.iter().map(|c| c.1).collect::<Vec<_>>(),
        [true],
        "up on its first pass, then never again a change"
    );
    assert!(events.health(&id(down_addr)).is_empty());
    let stats = lb.handle.backends();
    assert!(stats[0].up && !stats[1].up, "{stats:?}");
    assert_eq!(
        stats[1].health_reason,
        r#"send-expect: got "-ERR no\r\n" (expected "+PONG")"#
    );
    lb.stop().await;
    // Check i (from 0) is against the state for odd i in both: the gap after it is a quarter interval.
    for (name, seen) in [("up", &up_seen), ("down", &down_seen)] {
        let t = seen.lock().unwrap().clone();
        let mean = |odd: bool| {
            let gaps: Vec<Duration> = (1..checks - 1)
                .filter(|i| (i % 2 == 1) == odd)
                .map(|i| t[i + 1] - t[i])
                .collect();
            gaps.iter().sum::<Duration>() / gaps.len() as u32
        };
        let (fast, slow) = (mean(true), mean(false));
        eprintln!("{name}: {fast:?} after a result against its state, {slow:?} after one for it");
        assert!(
            fast <= interval.mul_f64(0.25 * 1.1) + Duration::from_millis(30),
            "{fast:?}"
        );
        assert!(
            slow >= interval.mul_f64(0.9) - Duration::from_millis(20),
            "{slow:?}"
        );
    }
}

/// 50 backends checked from one place (with per-core serving on two threads): the first checks are
/// spread over the first 250 ms and the steady ones over the interval, never in lockstep, and each
/// backend is checked once per interval (not once per serving thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_of_50_backends_are_spread_over_the_interval() {
    const N: usize = 50;
    let interval = Duration::from_millis(400);
    let mut servers = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..N {
        let times = Arc::new(Mutex::new(Vec::new()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t = times.clone();
        servers.push(Backend::serve(listener, move |_s| {
            t.lock().unwrap().push(Instant::now());
            async {}
        }));
        seen.push(times);
    }
    let config = BalancerConfig::new(servers.iter().map(|s| BackendConfig::new(s.addr)))
        .check(HealthCheck::connect().interval(interval).timeout(TIMEOUT));
    let balancer = TcpBalancer::new(config).unwrap();
    let handle = balancer.handle();
    let listeners = ulb_tcp::PerCoreListeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        std::num::NonZeroUsize::new(2).unwrap(),
    )
    .unwrap();
    let t0 = Instant::now();
    let task = tokio::spawn(balancer.serve_per_core(listeners, std::future::pending()));
    wait_until("6 checks of every backend", Duration::from_secs(20), || {
        seen.iter().all(|s| s.lock().unwrap().len() >= 6)
    })
    .await;
    let times: Vec<Vec<Duration>> = seen
        .iter()
        .map(|s| s.lock().unwrap().iter().map(|t| *t - t0).collect())
        .collect();
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let nth = |k: usize| -> Vec<Duration> { times.iter().map(|t| t[k]).collect() };
    let describe = |name: &str, v: &[Duration]| {
        let lo = v.iter().min().unwrap();
        let hi = v.iter().max().unwrap();
        eprintln!("{name}: from {lo:?} to {hi:?} after the start");
        (*lo, *hi)
    };
    // First checks: within the first 250 ms (some slack for a loaded machine), spread over them.
    let first = nth(0);
    let (lo, hi) = describe("first checks", &first);
    assert!(hi <= Duration::from_millis(250 + 150), "{first:?}");
    assert!(hi - lo >= Duration::from_millis(150), "spread: {first:?}");
    assert_spread(&first, Duration::from_millis(250), "first checks");
    // Steady checks: spread over the interval.
    for k in [2, 4] {
        let v = nth(k);
        let (lo, hi) = describe(&format!("check {}", k + 1), &v);
        assert!(hi - lo >= interval.mul_f64(0.6), "spread: {v:?}");
        assert_spread(&v, interval, &format!("check {}", k + 1));
    }
    // Each backend: one check per interval ± 10 % (and scheduling slack), never twice at once.
    for t in &times {
        for w in t[1..].windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= interval.mul_f64(0.9) - Duration::from_millis(40)
                    && gap <= interval.mul_f64(1.1) + Duration::from_millis(150),
                "gap {gap:?} in {t:?}"
            );
        }
    }
}

/// Not in lockstep: no tenth of `window` holds more than 40 % of the checks (evenly spread, it holds a
/// tenth; in lockstep, all of them; a stall of the loaded test machine can pile up a few).
fn assert_spread(times: &[Duration], window: Duration, what: &str) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let slice = window / 10;
    let most = sorted
        .iter()
        .map(|&from| {
            sorted
                .iter()
                .filter(|&&t| t >= from && t < from + slice)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most * 10 <= times.len() * 4,
        "{what}: {most} of {} within {slice:?}: {sorted:?}",
        times.len()
    );
}

/// Every backend down (nothing listens), then one comes back: with checks, traffic flows again within
/// rise × interval + interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_all_backends_were_down_one_that_returns_takes_traffic_soon() {
    let backends = [
        Backend::tagged(b'a').await,
        Backend::tagged(b'b').await,
        Backend::tagged(b'c').await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = BalancerConfig::new(addrs.iter().map(|&a| BackendConfig::new(a))).check(
        HealthCheck::connect()
            .interval(INTERVAL)
            .timeout(TIMEOUT)
            .rise(RISE)
            .fall(FALL),
    );
    let lb = Running::start(config).await;
    lb.wait_for("every backend up", |b| b.iter().all(|b| b.up))
        .await;
    drop(backends); // nothing listens on their ports any more
    lb.wait_for("every backend down", |b| b.iter().all(|b| !b.up))
        .await;
    let reasons: Vec<String> = lb
        .handle
        .backends()
        .into_iter()
        .map(|b| b.health_reason)
        .collect();
    assert!(
        reasons.iter().all(|r| r == "connect: refused"),
        "{reasons:?}"
    );
    // No backend: clients are closed (reset, even before the connect has returned).
    if let Ok(mut s) = TcpStream::connect(lb.addr).await {
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0);
    }

    let back = Backend::serve(
        TcpListener::bind(addrs[1]).await.unwrap(),
        |mut s| async move {
            let _ = s.write_all(b"b").await;
            let mut sink = [0u8; 64];
            let _ = s.read(&mut sink).await;
        },
    );
    let returned = Instant::now();
    let flowed = loop {
        let tag = async {
            let mut s = TcpStream::connect(lb.addr).await.ok()?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.ok().map(|_| b[0])
        };
        if tag.await == Some(b'b') {
            break returned.elapsed();
        }
        assert!(
            returned.elapsed() < Duration::from_secs(10),
            "no traffic after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // paces the clients
    };
    eprintln!(
        "traffic flowed {flowed:?} after the backend returned (bound {:?})",
        recovery_bound()
    );
    assert!(flowed <= recovery_bound(), "{flowed:?}");
    assert!(back.accepted() >= RISE as usize);
    lb.stop().await;
}

/// A server that accepts and records when each connection (a check) came.
async fn counting() -> (SocketAddr, Arc<Mutex<Vec<Instant>>>, Backend) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = seen.clone();
    let backend = Backend::serve(listener, move |_conn| {
        s.lock().unwrap().push(Instant::now());
        async {}
    });
    (addr, seen, backend)
}

fn count(seen: &Mutex<Vec<Instant>>) -> usize {
    seen.lock().unwrap().len()
}

/// The checks follow the backends while the balancer runs: one added is checked at once (and is down
/// until its first check passes), one whose address changes is checked at the new address only, and
/// one removed is no longer checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_follow_backends_added_readdressed_and_removed() {
    let (a_addr, a_seen, _a) = counting().await;
    let interval = Duration::from_millis(200);
    let config = BalancerConfig::new([BackendConfig::new(a_addr).with_id("a")])
        .check(HealthCheck::connect().interval(interval).timeout(TIMEOUT));
    let lb = Running::start(config).await;
    lb.wait_for("a up", |b| b[0].up).await;

    let (b_addr, b_seen, _b) = counting().await;
    let added = Instant::now();
    lb.handle
        .add_backend(BackendConfig::new(b_addr).with_id("b"))
        .unwrap();
    let stats = lb.handle.backend("b").unwrap();
    assert!(!stats.up, "not checked yet: {stats:?}");
    assert_eq!(stats.health_reason, "not checked yet");
    lb.wait_for("b up", |b| b.iter().any(|b| b.id == "b" && b.up))
        .await;
    let took = added.elapsed();
    eprintln!("an added backend was up {took:?} after it was added");
    assert!(took <= Duration::from_millis(250 + 150), "{took:?}");

    // The same id at another address: checks go there, and no longer to the old one.
    let (c_addr, c_seen, _c) = counting().await;
    let list = vec![
        BackendConfig::new(a_addr).with_id("a"),
        BackendConfig::new(c_addr).with_id("b"),
    ];
    let (replaced, drain) = lb
        .handle
        .replace_backends(list, Duration::from_secs(1))
        .unwrap();
    assert_eq!(replaced.changed.len(), 1);
    let _ = drain.await; // nothing was removed
    wait_until("a check at the new address", Duration::from_secs(5), || {
        count(&c_seen) >= 1
    })
    .await;
    let old = count(&b_seen);
    wait_until(
        "3 more checks at the new address",
        Duration::from_secs(5),
        || count(&c_seen) >= 4,
    )
    .await;
    assert!(
        count(&b_seen) <= old + 1,
        "the old address is still checked"
    );
    assert!(lb.handle.backend("b").unwrap().up, "it kept its state");

    // Removed: no longer checked.
    let drain = lb
        .handle
        .remove_backend("b", Duration::from_secs(1))
        .unwrap();
    let _ = drain.await;
    let left = count(&c_seen);
    let a_now = count(&a_seen);
    wait_until("3 more checks of a", Duration::from_secs(5), || {
        count(&a_seen) >= a_now + 3
    })
    .await;
    // (One check may have been connecting as it was removed.)
    assert!(
        count(&c_seen) <= left + 1,
        "a removed backend is still checked"
    );
    lb.stop().await;
}
