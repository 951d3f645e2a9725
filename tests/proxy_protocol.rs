//! PROXY protocol against real peers: nginx (`listen … proxy_protocol`) behind `ulb-tcp --send-proxy`,
//! HAProxy in front (`send-proxy-v2`) and as a backend (`accept-proxy`), and a table of malformed
//! headers against the accepting side. Loopback only, ephemeral ports; every process is killed and
//! reaped. A test whose tool is missing says so and passes.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{tool_or_skip, unique_port as free_port, Proc, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");

async fn wait_port(addr: SocketAddr, proc: &mut Proc) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) && !proc.exited() {
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// nginx answering `$proxy_protocol_addr $proxy_protocol_port` on a `proxy_protocol` listener.
struct Nginx {
    _proc: Proc,
    addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    async fn start(bin: &Path) -> Nginx {
        for _ in 0..5 {
            let dir = TempDir::new("nginx");
            let port = free_port();
            let d = dir.path().display();
            let conf = format!(
                "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n\
                 location / {{ return 200 \"$proxy_protocol_addr $proxy_protocol_port\"; }}\n  }}\n}}\n"
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
            let mut proc = Proc::spawn(&mut cmd, "peer");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            if wait_port(addr, &mut proc).await {
                return Nginx {
                    _proc: proc,
                    addr,
                    dir,
                };
            }
        }
        panic!("nginx never started");
    }

    fn requests(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .count()
    }
}

/// HAProxy in the foreground with this configuration (`PORT` replaced by its listening port).
struct Haproxy {
    _proc: Proc,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Haproxy {
    async fn start(bin: &Path, body: &str) -> Haproxy {
        for _ in 0..5 {
            let dir = TempDir::new("haproxy");
            let port = free_port();
            let conf = format!(
                "global\n  maxconn 256\ndefaults\n  timeout connect 2s\n  timeout client 10s\n  \
                 timeout server 10s\n{}",
                body.replace("PORT", &port.to_string())
            );
            let conf_path = dir.path().join("haproxy.cfg");
            std::fs::write(&conf_path, conf).unwrap();
            let mut cmd = Command::new(bin);
            cmd.arg("-db")
                .arg("-f")
                .arg(&conf_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut proc = Proc::spawn(&mut cmd, "peer");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            if wait_port(addr, &mut proc).await {
                return Haproxy {
                    _proc: proc,
                    addr,
                    _dir: dir,
                };
            }
        }
        panic!("haproxy never started");
    }
}

/// `ulb-tcp` with these flags, its log lines kept.
struct Ulb {
    _proc: Proc,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Ulb {
    async fn start(args: &[&str]) -> Ulb {
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let mut cmd = Command::new(BIN);
            cmd.args(["--listen", &addr.to_string()])
                .args(["--metrics", &metrics.to_string()])
                .args(["--threads", "1", "--log-format", "json"])
                .args(args)
                .env("RUST_LOG", "debug")
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut proc = Proc::spawn(&mut cmd, "peer");
            let stderr = proc.child.stderr.take().unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            std::thread::spawn({
                let log = log.clone();
                move || {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        log.lock().unwrap().push(line);
                    }
                }
            });
            // Readiness: the metrics port (a connect to the balancer's would be a client).
            if wait_port(metrics, &mut proc).await {
                return Ulb {
                    _proc: proc,
                    addr,
                    metrics,
                    log,
                };
            }
        }
        panic!("ulb-tcp never started");
    }

    async fn metric(&self, name: &str, label: &str) -> f64 {
        let Ok(mut s) = TcpStream::connect(self.metrics).await else {
            return 0.0;
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await;
        let mut got = String::new();
        let _ = s.read_to_string(&mut got).await;
        got.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    async fn rejected(&self) -> f64 {
        self.metric("ulb_connections_rejected_total", "reason=\"proxy_header\"")
            .await
    }

    fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

async fn wait_until(what: &str, limit: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Connects from `from` (bound first), retrying refusals for 2 s (the balancer's listener may come up
/// just after its metrics port).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> Option<TcpStream> {
    let start = Instant::now();
    loop {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind((from, 0).into()).unwrap();
        match socket.connect(to).await {
            Ok(s) => return Some(s),
            Err(_) if start.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(_) => return None,
        }
    }
}

/// An HTTP/1.0 GET to `to` from `from` (an address bound first): the local port and the body, or `None`
/// when the connection was closed without an answer.
async fn get_from(from: [u8; 4], to: SocketAddr) -> (u16, Option<String>) {
    let Some(mut s) = connect_from(from, to).await else {
        return (0, None);
    };
    let port = s.local_addr().unwrap().port();
    let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).to_string();
    match read {
        Ok(_) if text.starts_with("HTTP/1.") => {
            let body = text
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .to_string();
            (port, Some(body))
        }
        _ => (port, None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_sees_the_real_client_with_v1_and_v2() {
    let Some(nginx) = tool_or_skip("nginx", "nginx send-proxy") else {
        return;
    };
    let nginx = Nginx::start(&nginx).await;
    for version in ["v1", "v2"] {
        let ulb = Ulb::start(&[
            "--backends",
            &nginx.addr.to_string(),
            "--send-proxy",
            version,
        ])
        .await;
        for from in [[127, 0, 0, 2], [127, 0, 0, 3]] {
            let (port, body) = get_from(from, ulb.addr).await;
            let ip = format!("{}.{}.{}.{}", from[0], from[1], from[2], from[3]);
            assert_eq!(body, Some(format!("{ip} {port}")), "{version} from {ip}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_then_ulb_then_nginx_keeps_the_client_and_an_untrusted_header_is_refused()
{
    let (Some(nginx_bin), Some(haproxy)) = (
        tool_or_skip("nginx", "haproxy chain"),
        tool_or_skip("haproxy", "haproxy chain"),
    ) else {
        return;
    };
    let nginx = Nginx::start(&nginx_bin).await;
    let backend = nginx.addr.to_string();
    let trusting = Ulb::start(&[
        "--backends",
        &backend,
        "--accept-proxy-from",
        "127.0.0.1/32",
        "--send-proxy",
        "v2",
    ])
    .await;
    let front = |ulb: SocketAddr| {
        format!(
            "frontend f\n  mode tcp\n  bind 127.0.0.1:PORT\n  default_backend b\n\
             backend b\n  mode tcp\n  server s1 {ulb} send-proxy-v2\n"
        )
    };
    let hap = Haproxy::start(&haproxy, &front(trusting.addr)).await;
    let (port, body) = get_from([127, 0, 0, 2], hap.addr).await;
    assert_eq!(body, Some(format!("127.0.0.2 {port}")));
    // The client's address from the header is the one logged.
    wait_until(
        "the log to name the client",
        Duration::from_secs(5),
        async || trusting.logged(&format!("\"client\":\"127.0.0.2:{port}\"")),
    )
    .await;

    // Trusting only 127.0.0.9: HAProxy's header (from 127.0.0.1) is refused, nginx sees nothing.
    let before = nginx.requests();
    let untrusting = Ulb::start(&[
        "--backends",
        &backend,
        "--accept-proxy-from",
        "127.0.0.9/32",
        "--send-proxy",
        "v2",
    ])
    .await;
    let hap2 = Haproxy::start(&haproxy, &front(untrusting.addr)).await;
    let (_, body) = get_from([127, 0, 0, 2], hap2.addr).await;
    assert_eq!(body, None, "an untrusted header must not get through");
    wait_until(
        "the rejection to be counted",
        Duration::from_secs(5),
        async || untrusting.rejected().await >= 1.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(nginx.requests(), before, "nginx saw the refused connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_as_a_backend_accepts_v1_and_v2() {
    let Some(haproxy) = tool_or_skip("haproxy", "haproxy accept-proxy") else {
        return;
    };
    let hap = Haproxy::start(
        &haproxy,
        "frontend f\n  mode http\n  bind 127.0.0.1:PORT accept-proxy\n  \
         http-request return status 200 content-type text/plain lf-string \"%[src] %[src_port]\"\n",
    )
    .await;
    for version in ["v1", "v2"] {
        let ulb = Ulb::start(&["--backends", &hap.addr.to_string(), "--send-proxy", version]).await;
        let (port, body) = get_from([127, 0, 0, 3], ulb.addr).await;
        assert_eq!(body, Some(format!("127.0.0.3 {port}")), "{version}");
    }
}

/// A backend that counts its connections and every byte it gets.
async fn recording_backend() -> (SocketAddr, Arc<Mutex<(usize, Vec<u8>)>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new((0, Vec::new())));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            s2.lock().unwrap().0 += 1;
            let s3 = s2.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    s3.lock().unwrap().1.extend_from_slice(&buf[..n]);
                    let _ = s.write_all(b"ok").await;
                }
            });
        }
    });
    (addr, seen)
}

/// Sends `bytes`, then waits for the close; how long the close took.
async fn closed_after(to: SocketAddr, chunks: &[&[u8]], every: Duration) -> Duration {
    let mut s = connect_from([127, 0, 0, 1], to).await.unwrap();
    let start = Instant::now();
    let (mut r, mut w) = s.split();
    let send = async {
        for c in chunks {
            if w.write_all(c).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
        std::future::pending::<()>().await
    };
    let mut buf = [0u8; 64];
    let read = async {
        if let Ok(n @ 1..) = r.read(&mut buf).await {
            panic!("an answer ({n} bytes) came to a refused header");
        }
    };
    tokio::select! {
        () = send => {}
        () = read => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => panic!("never closed"),
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_are_closed_counted_and_never_forwarded() {
    let (backend, seen) = recording_backend().await;
    let ulb = Ulb::start(&[
        "--backends",
        &backend.to_string(),
        "--accept-proxy-from",
        "127.0.0.1/32",
        "--accept-proxy-timeout",
        "1500ms",
    ])
    .await;
    let sig = b"\r\n\r\n\0\r\nQUIT\n";
    let v2 = |vc: u8, fam: u8, len: u16, body: &[u8]| {
        let mut h = sig.to_vec();
        h.extend_from_slice(&[vc, fam]);
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(body);
        h.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
        h
    };
    let long_v1 = {
        let mut h = b"PROXY TCP4 ".to_vec();
        h.extend(std::iter::repeat_n(b'1', 120));
        h
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated v1", b"PROXY TCP4 127.0.0.2 127.0".to_vec()),
        ("truncated v2", sig[..9].to_vec()),
        (
            "bad signature",
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0cpayload".to_vec(),
        ),
        (
            "bad v1 signature",
            b"PROXZ TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET".to_vec(),
        ),
        ("not a header", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ("bad version", v2(0x31, 0x11, 12, &[0; 12])),
        ("unknown command", v2(0x2f, 0x11, 12, &[0; 12])),
        ("unknown family", v2(0x21, 0x41, 12, &[0; 12])),
        ("address too short", v2(0x21, 0x11, 4, &[0; 4])),
        ("v2 above the cap", v2(0x21, 0x11, 5000, &[0; 64])),
        (
            "v1 unknown protocol",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\nGET".to_vec(),
        ),
        (
            "v1 bad address",
            b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\nGET".to_vec(),
        ),
        ("no CRLF within 107 bytes", long_v1),
    ];
    let mut expected = 0.0;
    for (what, bytes) in &cases {
        let took = closed_after(ulb.addr, &[bytes], Duration::from_millis(50)).await;
        expected += 1.0;
        // Truncated ones wait for the header timeout; the others are closed at once.
        let bound = if what.starts_with("truncated") { 3 } else { 1 };
        assert!(
            took < Duration::from_secs(bound),
            "{what}: closed after {took:?}"
        );
        wait_until(
            &format!("{what} to be counted"),
            Duration::from_secs(5),
            async || ulb.rejected().await >= expected,
        )
        .await;
    }
    // One byte every 500 ms: closed at the header timeout (1.5 s), not before.
    let header = b"PROXY TCP4 127.0.0.2 127.0.0.1 1000 80\r\n";
    let bytes: Vec<&[u8]> = header.chunks(1).collect();
    let took = closed_after(ulb.addr, &bytes, Duration::from_millis(500)).await;
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(3000),
        "slow header closed after {took:?}"
    );
    expected += 1.0;
    wait_until(
        "the slow one to be counted",
        Duration::from_secs(5),
        async || ulb.rejected().await >= expected,
    )
    .await;
    let (connections, bytes) = seen.lock().unwrap().clone();
    assert_eq!(
        (connections, bytes.len()),
        (0, 0),
        "a refused header reached the backend"
    );

    // From an untrusted source (127.0.0.2): a v1 header is refused and counted too; plain bytes are
    // carried as they are.
    let mut s = connect_from([127, 0, 0, 2], ulb.addr).await.unwrap();
    s.write_all(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nhello")
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "untrusted header: {r:?}");
    expected += 1.0;
    wait_until(
        "the untrusted header to be counted",
        Duration::from_secs(5),
        async || ulb.rejected().await >= expected,
    )
    .await;
    assert_eq!(
        seen.lock().unwrap().0,
        0,
        "an untrusted header reached the backend"
    );
    let mut s = connect_from([127, 0, 0, 2], ulb.addr).await.unwrap();
    s.write_all(b"plain").await.unwrap();
    let mut ok = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ok))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.lock().unwrap().1, b"plain");
    seen.lock().unwrap().1.clear();

    // And a good header is consumed, never forwarded: the backend sees only the payload after it.
    let mut s = connect_from([127, 0, 0, 1], ulb.addr).await.unwrap();
    s.write_all(b"PROXY TCP4 127.0.0.2 127.0.0.1 1000 80\r\nhello")
        .await
        .unwrap();
    let mut ok = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ok))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.lock().unwrap().1, b"hello");
}

/// A backend that reads what it gets, then closes without a word (replay moves on from it).
async fn silent_backend() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 4096];
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(n) = s.read(&mut buf).await {
                s2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            drop(s);
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_connect_sends_its_own_header_first() {
    let (dead, dead_seen) = silent_backend().await;
    let (alive, alive_seen) = recording_backend().await;
    let ulb = Ulb::start(&[
        "--backends",
        &format!("{dead},{alive}"),
        "--replay-limit",
        "64k",
        "--send-proxy",
        "v1",
        "--strategy",
        "round-robin",
    ])
    .await;
    // Round robin starts with the first backend, which closes without answering: the bytes are replayed.
    let mut s = connect_from([127, 0, 0, 2], ulb.addr).await.unwrap();
    let port = s.local_addr().unwrap().port();
    s.write_all(b"request").await.unwrap();
    let mut ok = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ok))
        .await
        .unwrap()
        .unwrap();
    let header = format!(
        "PROXY TCP4 127.0.0.2 127.0.0.1 {port} {}\r\n",
        ulb.addr.port()
    );
    let want = [header.as_bytes(), b"request"].concat();
    assert_eq!(*dead_seen.lock().unwrap(), want, "the first backend");
    // The header and the replayed bytes are two writes: the backend may answer the first before it has
    // read the second (CI saw the header alone once), so wait for as many bytes as are wanted.
    common::wait_until("the replayed bytes", Duration::from_secs(5), || {
        alive_seen.lock().unwrap().1.len() >= want.len()
    })
    .await;
    assert_eq!(
        alive_seen.lock().unwrap().1,
        want,
        "the backend the bytes were replayed to"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_checks_with_check_send_proxy_pass_on_a_proxy_protocol_nginx() {
    let Some(nginx) = tool_or_skip("nginx", "check-send-proxy") else {
        return;
    };
    let nginx = Nginx::start(&nginx).await;
    for version in ["v1", "v2"] {
        let ulb = Ulb::start(&[
            "--backends",
            &nginx.addr.to_string(),
            "--send-proxy",
            version,
            "--check",
            "http",
            "--check-send-proxy",
            "--check-interval",
            "100ms",
        ])
        .await;
        // Backends start down until a check passes: without the header nginx would refuse every check.
        wait_until(
            &format!("{version}: an answer through a checked backend"),
            Duration::from_secs(10),
            async || get_from([127, 0, 0, 2], ulb.addr).await.1.is_some(),
        )
        .await;
    }
}
