//! The configuration file through the real command: `ulb-tcp check`, several services from one file, and
//! hot reload (SIGHUP and `POST /api/v1/reload`) under load, with real sockets on loopback.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{blackhole, fixed_port, fnv, pattern, wait_until, Backend, Proc, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------------------
// `ulb-tcp check`

/// Runs `ulb-tcp check FILE`: exit code, stdout, stderr.
fn check(file: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("check")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_example_checks_clean() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("ulb.example.toml");
    let (code, out, err) = check(&example);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok (2 services"), "{out}");
}

/// Each bad file: exit 2, one line `ulb-tcp: FILE:LINE: ...` with the right line and the key named.
#[test]
fn check_names_the_line_and_the_key_of_every_error() {
    let dir = TempDir::new("check");
    let good = r#"[admin]
listen = "127.0.0.1:29100"

[[services]]
name = "web"
listen = ["127.0.0.1:29001"]
strategy = "least-connections"
connect_timeout = "2s"
backends = [ { address = "127.0.0.1:29501", weight = 2 }, "127.0.0.1:29502" ]
check = { mode = "connect", interval = "500ms" }
"#;
    let path = dir.path().join("good.toml");
    std::fs::write(&path, good).unwrap();
    let (code, out, err) = check(&path);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 services, 1 listeners, 2 backends"), "{out}");

    let cases: &[(&str, &str, &str, usize, &[&str])] = &[
        // (what, replace, with, line, words the message must hold)
        (
            "unknown key",
            "strategy =",
            "stratgy =",
            7,
            &["unknown key 'stratgy'"],
        ),
        (
            "bad address",
            "127.0.0.1:29502",
            "127.0.0.1:70000",
            9,
            &["127.0.0.1:70000", "port"],
        ),
        (
            "duplicate id",
            "127.0.0.1:29502",
            "127.0.0.1:29501",
            9,
            &["127.0.0.1:29501", "twice"],
        ),
        (
            "bad duration",
            "\"2s\"",
            "\"2 lightyears\"",
            8,
            &["connect_timeout", "2 lightyears"],
        ),
        (
            "out of range",
            "\"2s\"",
            "\"90d\"",
            8,
            &["connect_timeout", "90d"],
        ),
        (
            "bad check key",
            "interval =",
            "intervl =",
            10,
            &["intervl", "check"],
        ),
        (
            "bad listen",
            "[\"127.0.0.1:29001\"]",
            "[\"localhost\"]",
            6,
            &["listen", "localhost"],
        ),
        (
            "bad strategy",
            "least-connections",
            "fastest",
            7,
            &["strategy", "fastest"],
        ),
        (
            "process key",
            "strategy =",
            "threads = 2\nstrategy =",
            7,
            &["threads", "top level"],
        ),
        ("top-level typo", "[admin]", "[admn]", 1, &["admn"]),
        ("syntax", "name = \"web\"", "name = \"web", 5, &[]),
        (
            "admin address",
            "127.0.0.1:29100",
            "nowhere",
            2,
            &["admin.listen", "nowhere"],
        ),
        (
            "public admin",
            "127.0.0.1:29100",
            "0.0.0.0:29100",
            2,
            &["admin.listen", "0.0.0.0:29100", "token_file"],
        ),
        (
            "token file",
            "listen = \"127.0.0.1:29100\"",
            "listen = \"127.0.0.1:29100\"\ntoken_file = \"/nonexistent/t\"",
            3,
            &["admin.token_file", "/nonexistent/t"],
        ),
    ];
    for (what, from, to, line, words) in cases {
        assert!(good.contains(from), "{what}: {from}");
        let path = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        let (code, _, err) = check(&path);
        assert_eq!(code, 2, "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: not one line: {err:?}");
        let prefix = format!("ulb-tcp: {}:{line}: ", path.display());
        assert!(
            err.starts_with(&prefix),
            "{what}: not at line {line}: {err}"
        );
        for w in *words {
            assert!(err.contains(w), "{what}: {w:?} missing: {err}");
        }
        assert!(!err.contains("panicked"), "{what}: {err}");
    }

    // A flag of a service given beside --config.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(dir.path().join("good.toml"))
        .args(["--idle-timeout", "1m"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--idle-timeout") && err.contains("idle_timeout"),
        "{err}"
    );
    // No such file.
    let (code, _, err) = check(&dir.path().join("missing.toml"));
    assert_eq!(code, 2);
    assert!(
        err.contains("missing.toml") && err.contains("cannot read"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Running from a file, and reloading it.

/// The command, run from a configuration file.
struct Ulb {
    proc: Proc,
    admin: SocketAddr,
    file: PathBuf,
    _dir: TempDir,
}

impl Ulb {
    async fn start(dir: TempDir, admin: SocketAddr, text: &str) -> Ulb {
        let file = dir.path().join("ulb.toml");
        std::fs::write(&file, text).unwrap();
        let log = std::fs::File::create(dir.path().join("ulb.log")).unwrap();
        let proc = Proc::spawn(
            Command::new(BIN)
                .arg("--config")
                .arg(&file)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log),
            "ulb-tcp",
        );
        let ulb = Ulb {
            proc,
            admin,
            file,
            _dir: dir,
        };
        let start = Instant::now();
        while http(admin, "GET", "/healthz", "").await.is_err() {
            assert!(
                start.elapsed() < DEADLINE,
                "the admin server never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ulb
    }

    /// What it logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.file.with_file_name("ulb.log")).unwrap_or_default()
    }

    fn rewrite(&self, text: &str) {
        // Written aside and renamed, so a reload never reads half a file.
        let tmp = self.file.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn sighup(&self) {
        // SAFETY: kill(2) on our own child; no memory is involved.
        assert_eq!(
            unsafe { libc::kill(self.proc.child.id() as libc::pid_t, libc::SIGHUP) },
            0
        );
    }

    async fn services(&self) -> serde_json::Value {
        let (status, body) = http(self.admin, "GET", "/api/v1/services", "")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The backend `id` of `service`, as the API shows it.
    async fn backend(&self, service: &str, id: &str) -> Option<serde_json::Value> {
        let all = self.services().await;
        all["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service)?["backends"]
            .as_array()?
            .iter()
            .find(|b| b["id"] == id)
            .cloned()
    }

    async fn metrics(&self) -> String {
        http(self.admin, "GET", "/metrics", "").await.unwrap().1
    }
}

/// One HTTP/1.1 request to the admin server: status and body.
async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: \
             application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// One exchange through `addr` with a tagged backend: the tag, then 4 KiB echoed back exactly.
async fn exchange(addr: SocketAddr, seed: u64) -> Result<u8, String> {
    let run = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag)
            .await
            .map_err(|e| format!("tag: {e}"))?;
        let data = pattern(seed, 4096);
        s.write_all(&data)
            .await
            .map_err(|e| format!("write: {e}"))?;
        s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if back != data {
            return Err(format!("{} bytes back, not the 4096 sent", back.len()));
        }
        Ok(tag[0])
    };
    tokio::time::timeout(DEADLINE, run)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Clients that run exchanges through `addr` back to back until stopped; they count exchanges and
/// failures, and which backend (tag) answered.
struct Load {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tags: Arc<std::sync::Mutex<Vec<u8>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            paused: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            done: Arc::new(AtomicUsize::new(0)),
            failures: Arc::default(),
            tags: Arc::default(),
            tasks: Vec::new(),
        };
        let mut load = load;
        for c in 0..clients {
            let (paused, in_flight) = (load.paused.clone(), load.in_flight.clone());
            let (stop, done, failures, tags) = (
                load.stop.clone(),
                load.done.clone(),
                load.failures.clone(),
                load.tags.clone(),
            );
            load.tasks.push(tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(SeqCst) {
                    in_flight.fetch_add(1, SeqCst);
                    if paused.load(SeqCst) {
                        in_flight.fetch_sub(1, SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    seq += 1;
                    let result = exchange(addr, (c as u64) << 32 | seq).await;
                    in_flight.fetch_sub(1, SeqCst);
                    match result {
                        Ok(tag) => tags.lock().unwrap().push(tag),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    done.fetch_add(1, SeqCst);
                }
            }));
        }
        load
    }

    /// Waits for `n` more exchanges.
    async fn more(&self, n: usize) {
        let target = self.done.load(SeqCst) + n;
        wait_until("more exchanges", DEADLINE, || {
            self.done.load(SeqCst) >= target
        })
        .await;
    }

    /// Holds the clients back, and waits until none is in an exchange (its connection closed).
    async fn pause(&self) {
        self.paused.store(true, SeqCst);
        wait_until("the clients to pause", DEADLINE, || {
            self.in_flight.load(SeqCst) == 0
        })
        .await;
    }

    fn resume(&self) {
        self.paused.store(false, SeqCst);
    }

    fn failed(&self) -> usize {
        self.failures.lock().unwrap().len()
    }

    fn saw(&self, tag: u8) -> bool {
        self.tags.lock().unwrap().contains(&tag)
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.done.load(SeqCst), failures)
    }
}

/// A 20 MiB echo through `addr` that sends its first half, waits for `go`, then the rest, and
/// checks every byte that comes back.
async fn transfer(addr: SocketAddr, go: Arc<tokio::sync::Notify>) -> Result<u8, String> {
    const HALF: usize = 10 << 20;
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).await.map_err(|e| e.to_string())?;
    let data = pattern(7, 2 * HALF);
    let (mut rd, mut wr) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent[..HALF]).await?;
        go.notified().await;
        wr.write_all(&sent[HALF..]).await?;
        wr.shutdown().await
    });
    let mut back = Vec::with_capacity(2 * HALF);
    rd.read_to_end(&mut back).await.map_err(|e| e.to_string())?;
    writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if fnv(&back) != fnv(&data) || back.len() != data.len() {
        return Err(format!("{} bytes back, not byte-exact", back.len()));
    }
    Ok(tag[0])
}

fn file(admin: SocketAddr, services: &str) -> String {
    format!("[admin]\nlisten = \"{admin}\"\n\n{services}")
}

fn file_on(runtime: &str, admin: SocketAddr, services: &str) -> String {
    format!("runtime = \"{runtime}\"\n{}", file(admin, services))
}

/// Reload under load, by SIGHUP and through the API: a backend added, one removed, one re-weighted, a
/// listener added and then removed, the strategy changed. No client fails; a 20 MiB transfer in flight
/// on the removed backend arrives byte-exact; the kept backends keep their connections, counts and
/// health; the new backend and the new listener take traffic; an invalid file changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_keeps_state_and_drops_nothing() {
    reload_under_load("per-core").await;
}

/// The same on the work-stealing runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_keeps_state_and_drops_nothing_work_stealing() {
    reload_under_load("work-stealing").await;
}

async fn reload_under_load(runtime: &str) {
    let a = Backend::tagged(1).await;
    let b = Backend::tagged(2).await;
    let c = Backend::tagged(3).await;
    let (_dead_socket, _, dead) = blackhole();
    let admin: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let l1: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let l2: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let service = |listen: &str, backends: &str, strategy: &str| {
        format!(
            "[[services]]\nname = \"web\"\nlisten = {listen}\nstrategy = \"{strategy}\"\n\
             connect_timeout = \"500ms\"\ncheck = {{ mode = \"connect\", interval = \"200ms\", \
             timeout = \"200ms\", rise = 1, fall = 1 }}\nbackends = [{backends}]\n"
        )
    };
    let (ida, idb, idc, idd) = (
        a.addr.to_string(),
        b.addr.to_string(),
        c.addr.to_string(),
        dead.to_string(),
    );
    let first = file_on(
        runtime,
        admin,
        &service(
            &format!("\"{l1}\""),
            &format!("\"{ida}\", \"{idb}\", \"{idd}\""),
            "least-connections",
        ),
    );
    let ulb = Ulb::start(TempDir::new("reload"), admin, &first).await;
    wait_until("the listener's log line", DEADLINE, || {
        ulb.log().contains("accepting connections")
    })
    .await;
    assert_eq!(
        ulb.log().contains("accepting connections (per-core)"),
        runtime == "per-core",
        "{}",
        ulb.log()
    );
    wait_until_async("health: d down, a up", || async {
        ulb.backend("web", &idd)
            .await
            .is_some_and(|d| d["health"]["status"] == "down")
            && ulb
                .backend("web", &ida)
                .await
                .is_some_and(|d| d["health"]["status"] == "up")
    })
    .await;

    // Held connections: least-connections counts that must survive.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(l1).await.unwrap();
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).await.unwrap();
        held.push((tag[0], s));
    }
    let held_on_a = held.iter().filter(|(t, _)| *t == 1).count();
    assert!(held_on_a > 0, "least-connections put none of 4 on a");
    let go = Arc::new(tokio::sync::Notify::new());
    // The transfer must go to b, the backend the reload removes: hold connections until a pick is b.
    let mut big = None;
    for _ in 0..8 {
        let t = tokio::spawn(transfer(l1, go.clone()));
        wait_until_async("the transfer's connection", || async {
            let bb = ulb.backend("web", &idb).await.unwrap();
            let aa = ulb.backend("web", &ida).await.unwrap();
            bb["active"].as_u64().unwrap() + aa["active"].as_u64().unwrap()
                > held.len() as u64 + u64::from(big.is_some())
        })
        .await;
        let on_b = ulb.backend("web", &idb).await.unwrap()["active"]
            .as_u64()
            .unwrap();
        if on_b as usize > held.iter().filter(|(t, _)| *t == 2).count() {
            big = Some(t);
            break;
        }
        go.notify_one();
        t.await.unwrap().unwrap();
    }
    let big = big.expect("no transfer went to b");
    let before_a = ulb.backend("web", &ida).await.unwrap();
    let before_d = ulb.backend("web", &idd).await.unwrap();
    let load = Load::start(l1, 4);
    load.more(50).await;

    // Reload 1, by SIGHUP: b removed (it drains), c added, a re-weighted, listener l2 added.
    let second = file_on(
        runtime,
        admin,
        &service(
            &format!("[\"{l1}\", \"{l2}\"]"),
            &format!("{{ address = \"{ida}\", weight = 3 }}, \"{idc}\", \"{idd}\""),
            "least-connections",
        ),
    );
    ulb.rewrite(&second);
    ulb.sighup();
    wait_until_async("c in the API", || async {
        ulb.backend("web", &idc).await.is_some()
    })
    .await;
    // With the clients held back, a's count is exactly what it was: no connection lost or doubled.
    load.pause().await;
    let after_a = ulb.backend("web", &ida).await.unwrap();
    load.resume();
    assert_eq!(after_a["weight"], 3, "{after_a}");
    assert_eq!(
        after_a["active"], before_a["active"],
        "{after_a} then {before_a}"
    );
    assert_eq!(after_a["active"], held_on_a as u64);
    assert_eq!(load.failed(), 0, "a client failed across the SIGHUP reload");
    assert!(after_a["total"].as_u64() >= before_a["total"].as_u64());
    assert_eq!(after_a["health"]["status"], "up");
    let d = ulb.backend("web", &idd).await.unwrap();
    assert_eq!(
        d["health"]["status"], "down",
        "the dead backend's health was kept: {d}"
    );
    assert!(
        d["health"]["since"].as_f64() >= before_d["health"]["since"].as_f64(),
        "down since the start, not since the reload: {d} then {before_d}"
    );
    // The new listener serves; the new backend takes traffic.
    let load2 = Load::start(l2, 2);
    load2.more(20).await;
    wait_until("c takes traffic", DEADLINE, || load.saw(3) || load2.saw(3)).await;
    // The transfer on the removed b goes on, and finishes byte-exact.
    go.notify_one();
    assert_eq!(big.await.unwrap(), Ok(2));

    // Reload 2, through the API, of an invalid file: 422 with the line, nothing changes.
    ulb.rewrite(&second.replace("500ms", "500 parsecs"));
    let (status, body) = http(admin, "POST", "/api/v1/reload", "").await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("ulb.toml:") && body.contains("connect_timeout"),
        "{body}"
    );
    assert!(ulb.backend("web", &idc).await.is_some());
    load.more(20).await;

    // Reload 3, through the API: the strategy changes, so the service is rebuilt; its listeners
    // are handed over, never closed.
    let third = file_on(
        runtime,
        admin,
        &service(
            &format!("[\"{l1}\", \"{l2}\"]"),
            &format!("\"{ida}\", \"{idc}\""),
            "round-robin",
        ),
    );
    ulb.rewrite(&third);
    let (status, body) = http(admin, "POST", "/api/v1/reload", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("rebuilt"), "{body}");
    let all = ulb.services().await;
    assert_eq!(all["services"][0]["strategy"], "round-robin", "{all}");
    assert_eq!(
        load.failed(),
        0,
        "a client failed across the rebuild:\n{}",
        ulb.log()
    );
    load.more(40).await;
    load2.more(20).await;

    // Reload 4: l2 removed. Its clients stop; l1 goes on.
    let (_, fails2) = load2.stop().await;
    let fourth = file_on(
        runtime,
        admin,
        &service(
            &format!("\"{l1}\""),
            &format!("\"{ida}\", \"{idc}\""),
            "round-robin",
        ),
    );
    ulb.rewrite(&fourth);
    let (status, body) = http(admin, "POST", "/api/v1/reload", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    wait_until_async("l2 closed", || async {
        TcpStream::connect(l2).await.is_err()
    })
    .await;
    load.more(20).await;
    let (done, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {done} failed: {failures:?}\n{}",
        failures.len(),
        ulb.log()
    );
    assert!(fails2.is_empty(), "through l2: {fails2:?}");
    // The connections held across every reload still carry bytes.
    for (_, s) in &mut held {
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
    }

    let m = ulb.metrics().await;
    assert!(
        m.contains("ulb_config_reloads_total{result=\"ok\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("ulb_config_reloads_total{result=\"error\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ulb_config_last_reload_success_timestamp_seconds"),
        "{m}"
    );
    assert!(m.contains("ulb_config_hash"), "{m}");
    // Per-backend series carry the service's name.
    assert!(
        m.contains(&format!(
            "ulb_connections_total{{service=\"web\",backend=\"{ida}\"}}"
        )),
        "{m}"
    );
    drop(ulb);
}

/// The rule between the API and reloads: a reload makes each service what the file says. A backend
/// added through the API and not in the file is removed, a weight set through the API goes back to the
/// file's; an admin state (drain, maint), which the file does not hold, is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_makes_each_service_what_the_file_says_and_keeps_admin_states() {
    let a = Backend::tagged(1).await;
    let b = Backend::tagged(2).await;
    let x = Backend::tagged(9).await;
    let admin: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let l1: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let l3: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let (ida, idb) = (a.addr.to_string(), b.addr.to_string());
    let text = file(
        admin,
        &format!(
            "[[services]]\nname = \"web\"\nlisten = \"{l1}\"\nbackends = [\"{ida}\", \"{idb}\"]\n"
        ),
    );
    let ulb = Ulb::start(TempDir::new("rule"), admin, &text).await;
    let enc = |id: &str| id.replace(':', "%3A");
    let (s, body) = http(
        admin,
        "PATCH",
        &format!("/api/v1/services/web/backends/{}", enc(&ida)),
        r#"{"state": "drain"}"#,
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{body}");
    let (s, body) = http(
        admin,
        "PATCH",
        &format!("/api/v1/services/web/backends/{}", enc(&idb)),
        r#"{"weight": 7}"#,
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{body}");
    let (s, body) = http(
        admin,
        "POST",
        "/api/v1/services/web/backends",
        &format!(r#"{{"address": "{}"}}"#, x.addr),
    )
    .await
    .unwrap();
    assert_eq!(s, 201, "{body}");
    // An unrelated change: a second service (and a process-wide key, which waits for a restart).
    ulb.rewrite(&format!(
        "log_format = \"json\"\n{text}\n[[services]]\nname = \"other\"\nlisten = \"{l3}\"\nbackends = [\"{ida}\"]\n"
    ));
    // Through `ulb-tcp ctl reload`, the operator's way.
    let out = Command::new(BIN)
        .args(["ctl", "--admin", &admin.to_string(), "reload"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("reload: ok"), "{said}");
    assert!(
        said.contains("log_format"),
        "the restart-only key is named: {said}"
    );
    let a_now = ulb.backend("web", &ida).await.unwrap();
    assert_eq!(a_now["state"], "drain", "{a_now}");
    let b_now = ulb.backend("web", &idb).await.unwrap();
    assert_eq!(b_now["weight"], 1, "{b_now}");
    let x_now = ulb.backend("web", &x.addr.to_string()).await;
    assert!(
        x_now.is_none() || x_now.as_ref().is_some_and(|v| v["removing"] == true),
        "{x_now:?}"
    );
    // The drained a takes no new connection; b does; the new service serves a.
    for i in 0..6 {
        assert_eq!(exchange(l1, i).await, Ok(2));
    }
    assert_eq!(exchange(l3, 99).await, Ok(1));
    // A change of settings rebuilds the service: the drain set through the API is kept there too.
    ulb.rewrite(&format!(
        "{}\n[[services]]\nname = \"other\"\nlisten = \"{l3}\"\nbackends = [\"{ida}\"]\n",
        text.replace(
            "backends = [",
            "strategy = \"least-connections\"\nbackends = ["
        )
    ));
    let (s, body) = http(admin, "POST", "/api/v1/reload", "").await.unwrap();
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("rebuilt"), "{body}");
    let a_now = ulb.backend("web", &ida).await.unwrap();
    assert_eq!(a_now["state"], "drain", "{a_now}");
    for i in 0..6 {
        assert_eq!(exchange(l1, 100 + i).await, Ok(2));
    }
    let all = ulb.services().await;
    let names: Vec<&str> = all["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "other"]);
}

/// A flag-started balancer has no file: reload answers 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_a_file_is_refused() {
    let a = Backend::tagged(1).await;
    let admin: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let _p = Proc::spawn(
        Command::new(BIN)
            .args([
                "--listen",
                &listen.to_string(),
                "--backends",
                &a.addr.to_string(),
            ])
            .args(["--admin", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "ulb-tcp",
    );
    wait_until_async("the admin server", || async {
        http(admin, "GET", "/healthz", "").await.is_ok()
    })
    .await;
    let (s, body) = http(admin, "POST", "/api/v1/reload", "").await.unwrap();
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("--config"), "{body}");
}

/// Polls an async condition until it holds, or panics after [`DEADLINE`].
async fn wait_until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The README's key table names every flag of a service as a key (a flag added later must be
/// documented as a key too).
#[test]
fn the_readme_documents_every_key() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("## Operating ulb-tcp")
        .expect("no Operating section");
    let end = start + readme[start..].find("## Admin server and API").unwrap();
    let section = &readme[start..end];
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let process = [
        "help",
        "version",
        "config",
        "admin",
        "metrics",
        "admin-token-file",
        "log-format",
        "runtime",
        "threads",
    ];
    let mut checked = 0;
    for line in help.lines() {
        let t = line.trim_start();
        let Some(rest) = t
            .strip_prefix("--")
            .or_else(|| t.get(4..).and_then(|r| r.strip_prefix("--")))
        else {
            continue;
        };
        let flag: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if flag.is_empty() || process.contains(&flag.as_str()) {
            continue;
        }
        let key = flag.replace('-', "_");
        assert!(
            section.contains(&format!("`{key}`")),
            "README lacks the key `{key}` (--{flag})"
        );
        checked += 1;
    }
    assert!(checked > 30, "only {checked} flags found in --help");
}

/// SIGTERM drains every service; a second SIGTERM resets what is still open on every one of them,
/// services started by a reload included, and the command exits 1 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_reaches_services_started_by_a_reload() {
    let a = Backend::tagged(1).await;
    let late = Backend::tagged(5).await;
    let admin: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let l1: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let l2: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let web = format!(
        "[[services]]\nname = \"web\"\nlisten = \"{l1}\"\nbackends = [\"{}\"]\n",
        a.addr
    );
    let mut ulb = Ulb::start(TempDir::new("force"), admin, &file(admin, &web)).await;
    ulb.rewrite(&file(
        admin,
        &format!(
            "{web}\n[[services]]\nname = \"late\"\nlisten = \"{l2}\"\nbackends = [\"{}\"]\n",
            late.addr
        ),
    ));
    let (s, body) = http(admin, "POST", "/api/v1/reload", "").await.unwrap();
    assert_eq!(s, 200, "{body}");
    // A connection held on each service.
    let mut held = Vec::new();
    for (addr, tag) in [(l1, 1), (l2, 5)] {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut t = [0u8; 1];
        c.read_exact(&mut t).await.unwrap();
        assert_eq!(t[0], tag);
        held.push(c);
    }
    let term = |ulb: &Ulb| {
        // SAFETY: kill(2) on our own child; no memory is involved.
        assert_eq!(
            unsafe { libc::kill(ulb.proc.child.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
    };
    term(&ulb);
    wait_until("the drain to start", DEADLINE, || {
        ulb.log().contains("draining")
    })
    .await;
    term(&ulb);
    let status = ulb.proc.exit_within(Duration::from_secs(5)).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "still running 5 s after the second signal (the drain timeout is 30 s):\n{}",
            ulb.log()
        )
    });
    assert_eq!(status.code(), Some(1), "{}", ulb.log());
    // Both held connections were reset, not ended cleanly.
    for mut c in held {
        let mut rest = Vec::new();
        let end = tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(end.is_err(), "a clean end after a forced stop: {end:?}");
    }
}

/// A reload that cannot bind a new listener (the address is taken) changes nothing: 422 naming the
/// address, the running services as they were. Then SIGTERM drains: a connection in flight finishes,
/// new connects are refused, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_bind_changes_nothing_and_sigterm_drains() {
    let a = Backend::tagged(1).await;
    let b = Backend::tagged(2).await;
    let admin: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let l1: SocketAddr = format!("127.0.0.1:{}", fixed_port()).parse().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let one = |listen: &str, backend: SocketAddr| {
        format!("[[services]]\nname = \"web\"\nlisten = {listen}\nbackends = [\"{backend}\"]\n")
    };
    let mut ulb = Ulb::start(
        TempDir::new("bind"),
        admin,
        &file(admin, &one(&format!("\"{l1}\""), a.addr)),
    )
    .await;
    ulb.rewrite(&file(
        admin,
        &one(&format!("[\"{l1}\", \"{busy}\"]"), b.addr),
    ));
    let (s, body) = http(admin, "POST", "/api/v1/reload", "").await.unwrap();
    assert_eq!(s, 422, "{body}");
    assert!(
        body.contains(&busy.to_string()) && body.contains("cannot listen"),
        "{body}"
    );
    // Nothing changed: the old backend serves, the new one is not there.
    assert_eq!(exchange(l1, 1).await, Ok(1));
    assert!(ulb.backend("web", &b.addr.to_string()).await.is_none());
    let m = ulb.metrics().await;
    assert!(
        m.contains("ulb_config_reloads_total{result=\"error\"} 1"),
        "{m}"
    );
    drop(taken);

    // SIGTERM with a connection in flight: it carries on, new connects are refused, exit 0.
    let mut c = TcpStream::connect(l1).await.unwrap();
    let mut t = [0u8; 1];
    c.read_exact(&mut t).await.unwrap();
    // SAFETY: kill(2) on our own child; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(ulb.proc.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    wait_until_async("new connects refused", || async {
        TcpStream::connect(l1).await.is_err()
    })
    .await;
    c.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    drop(c);
    let status = ulb.proc.exit_within(DEADLINE).await;
    let status = status.unwrap_or_else(|| panic!("no exit after the drain:\n{}", ulb.log()));
    assert_eq!(status.code(), Some(0), "{}", ulb.log());
}
