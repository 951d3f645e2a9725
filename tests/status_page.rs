//! The status page at `/` of the admin server, in a real headless Chromium against the real `ulb-tcp`
//! binary (with active connect checks and a token file):
//!
//! * `--dump-dom` after the page's script ran: a row per backend with its state and health, API
//!   strings escaped, no buttons without a token and buttons with `#token=` in the fragment; a drain
//!   through the API and a backend that dies show on the next load; a screenshot is kept
//!   (`$CARGO_TARGET_TMPDIR/status-page.png`);
//! * one page kept open and driven through the DevTools protocol (a minimal WebSocket client here):
//!   it follows changes made through the API on its own refresh (with the highlight), its buttons send
//!   the PATCH with the typed token, a wrong token's 401 shows in the message line, and once the
//!   balancer is gone it says the refresh failed and keeps the last table.
//!
//! Skipped (with a line saying so) where Chromium is not installed; `.ci/run` installs it. Loopback
//! only; every process is killed and reaped on drop; every wait has a deadline.
#![cfg(target_os = "linux")]

mod common;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{find_tool, unique_port, Backend, Proc, TempDir};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");
const TOKEN: &str = "page-t0ken";
/// How long any one wait may take.
const DEADLINE: Duration = Duration::from_secs(30);

fn chromium(test: &str) -> Option<PathBuf> {
    let found = find_tool("chromium").or_else(|| find_tool("chromium-browser"));
    if found.is_none() {
        eprintln!("skipped: chromium is not installed ({test}; `.ci/run` installs it from Debian)");
    }
    found
}

/// `ulb-tcp` with `--admin` and a token file, active connect checks every 100 ms (one failure takes a
/// backend down, one pass brings it up).
struct Ulb {
    proc: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Ulb {
    async fn start(backends: &[SocketAddr]) -> Ulb {
        Ulb::start_checking(backends, &["--check", "connect"]).await
    }

    /// With the active checks `check` (a mode and its flags), every 100 ms, rise and fall 1.
    async fn start_checking(backends: &[SocketAddr], check: &[&str]) -> Ulb {
        let dir = TempDir::new("page");
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).expect("write token");
        let log = dir.path().join("ulb-tcp.log");
        let out = File::create(&log).expect("create log");
        let listen: SocketAddr = ([127, 0, 0, 1], unique_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], unique_port()).into();
        let list: Vec<String> = backends.iter().map(ToString::to_string).collect();
        let mut cmd = Command::new(BIN);
        cmd.args(["--listen", &listen.to_string()])
            .args(["--backends", &list.join(",")])
            .args(["--admin", &admin.to_string()])
            .arg("--admin-token-file")
            .arg(&token)
            .args(check)
            .args(["--check-interval", "100ms"])
            .args(["--check-timeout", "1s", "--rise", "1", "--fall", "1"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out);
        let mut ulb = Ulb {
            proc: Proc::spawn(&mut cmd, "ulb-tcp"),
            listen,
            admin,
            log,
            _dir: dir,
        };
        let start = Instant::now();
        while !(ulb.log_text().contains("balancer accepting connections")
            && TcpStream::connect(admin).await.is_ok())
        {
            assert!(!ulb.proc.exited(), "ulb-tcp exited:\n{}", ulb.log_text());
            assert!(
                start.elapsed() < DEADLINE,
                "ulb-tcp did not start:\n{}",
                ulb.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ulb
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, rest: &str) -> String {
        format!("http://{}/{rest}", self.admin)
    }
}

/// One HTTP/1.1 exchange on a new connection (`Connection: close`): the status, the head, the body.
/// Read to the end, or to the `Content-Length` (Chromium's DevTools server keeps the connection).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Json>,
) -> (u16, String, String) {
    let body = body.map(Json::to_string).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let head_only = method == "HEAD";
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            out.extend_from_slice(&buf[..n]);
            if n == 0 || (!head_only && whole(&out)) {
                return Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned());
            }
        }
    };
    let text = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: timed out"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// True once `answer` holds its head and the `Content-Length` it names (not for answers to HEAD).
fn whole(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|len| body.len() >= len)
}

/// Sets a backend's admin state through the API, with the token.
async fn set_state(admin: SocketAddr, id: &str, state: &str) {
    let path = format!(
        "/api/v1/services/default/backends/{}",
        id.replace(':', "%3A")
    );
    let (status, _, body) = http(
        admin,
        "PATCH",
        &path,
        Some(TOKEN),
        Some(&json!({ "state": state })),
    )
    .await;
    assert_eq!(status, 200, "PATCH {path}: {body}");
}

/// A backend's admin state, from the API.
async fn state_of(admin: SocketAddr, id: &str) -> String {
    let (_, _, body) = http(admin, "GET", "/api/v1/services/default", None, None).await;
    let j: Json = serde_json::from_str(&body).expect("JSON");
    j["backends"]
        .as_array()
        .and_then(|l| l.iter().find(|b| b["id"] == id))
        .and_then(|b| b["state"].as_str())
        .unwrap_or_default()
        .to_string()
}

// ---------------------------------------------------------------------------------------------------------
// Chromium, one run at a time: --dump-dom and --screenshot
// ---------------------------------------------------------------------------------------------------------

/// Runs headless Chromium with `args` to its end (bounded by DEADLINE); its standard output.
async fn run_chromium(chromium: &Path, args: &[&str]) -> String {
    let dir = TempDir::new("chromium");
    let out_path = dir.path().join("out");
    let out = File::create(&out_path).expect("create output");
    let err = File::create(dir.path().join("err")).expect("create stderr");
    let mut cmd = Command::new(chromium);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(["--no-first-run", "--disable-extensions", "--mute-audio"])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .args(args)
        .stdout(out)
        .stderr(err);
    let mut proc = Proc::spawn(&mut cmd, "chromium");
    let start = Instant::now();
    while !proc.exited() {
        assert!(
            start.elapsed() < DEADLINE,
            "chromium {args:?} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::read_to_string(&out_path).unwrap_or_default()
}

/// The DOM of `url` once the page's script has run (3 s of virtual time: its first refresh and more).
async fn dump_dom(chromium: &Path, url: &str) -> String {
    run_chromium(chromium, &["--virtual-time-budget=3000", "--dump-dom", url]).await
}

/// Loads `url` again and again until `check` holds for its DOM; that DOM.
async fn dom_until(chromium: &Path, url: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let dom = dump_dom(chromium, url).await;
        if check(&dom) {
            return dom;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}:\n{dom}"
        );
    }
}

/// The row of backend `id` in a dumped DOM (`<tr ... data-backend="id">...</tr>`).
fn row<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("data-backend=\"{id}\""))?;
    let start = dom[..at].rfind("<tr")?;
    let end = at + dom[at..].find("</tr>")?;
    Some(&dom[start..end])
}

/// The text of the cell `data-field="field"` in a row.
fn cell<'a>(row: &'a str, field: &str) -> Option<&'a str> {
    let at = row.find(&format!("data-field=\"{field}\""))?;
    let text = &row[at + row[at..].find('>')? + 1..];
    Some(&text[..text.find('<')?])
}

fn field_of(dom: &str, id: &str, field: &str) -> Option<String> {
    row(dom, id).and_then(|r| cell(r, field)).map(String::from)
}

/// Chromium, two echo backends and the balancer in front of them; `None` (the test skipped) without
/// Chromium.
async fn setup(test: &str) -> Option<(PathBuf, [Backend; 2], Ulb)> {
    let chromium = chromium(test)?;
    let backends = [Backend::echo().await, Backend::echo().await];
    let ulb = Ulb::start(&[backends[0].addr, backends[1].addr]).await;
    Some((chromium, backends, ulb))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_backends_and_their_changes() {
    let Some((chromium, [a, b], ulb)) =
        setup("the_page_shows_the_backends_and_their_changes").await
    else {
        return;
    };
    let (ida, idb) = (a.addr.to_string(), b.addr.to_string());

    // The page itself: self-contained, not cached, never with the token in it; HEAD too.
    let (status, head, page) = http(ulb.admin, "GET", "/", None, None).await;
    assert_eq!(status, 200, "{head}");
    for want in [
        "content-type: text/html; charset=utf-8",
        "cache-control: no-store",
        "x-content-type-options: nosniff",
        "content-security-policy: default-src 'none'; script-src 'unsafe-inline'",
    ] {
        assert!(head.contains(want), "{want:?} not in {head}");
    }
    assert!(page.starts_with("<!DOCTYPE html>") && !page.contains(TOKEN));
    let (status, head, body) = http(ulb.admin, "HEAD", "/", None, None).await;
    assert_eq!((status, body.as_str()), (200, ""), "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");

    // A backend whose id is markup: it must show as text.
    let evil = "<img id=pwn>";
    let (status, _, body) = http(
        ulb.admin,
        "POST",
        "/api/v1/services/default/backends",
        Some(TOKEN),
        Some(&json!({"address": a.addr.to_string(), "id": evil})),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let url = ulb.url("");
    let dom = dom_until(&chromium, &url, "both backends ready and up", |dom| {
        [&ida, &idb].iter().all(|id| {
            field_of(dom, id, "state").as_deref() == Some("ready")
                && field_of(dom, id, "health").as_deref() == Some("up")
        })
    })
    .await;
    assert_eq!(dom.matches("<tr class=\"state-").count(), 3, "{dom}");
    let ra = row(&dom, &ida).expect("row of a");
    assert!(ra.contains("data-service=\"default\""), "{ra}");
    assert!(
        ra.contains("state-ready") && ra.contains("health-up"),
        "{ra}"
    );
    assert_eq!(cell(ra, "address"), Some(ida.as_str()));
    assert_eq!(cell(ra, "last-check"), Some("connect: ok"));
    assert_eq!(cell(ra, "weight"), Some("1"));
    assert_eq!(cell(ra, "bytes-to-backend"), Some("0 B"));
    assert!(
        cell(ra, "health-since").is_some_and(|s| s.ends_with("s ago")),
        "{ra}"
    );
    assert!(
        dom.contains("data-field=\"strategy\">round-robin<"),
        "{dom}"
    );
    assert!(dom.contains("data-status=\"ok\""), "{dom}");
    // The markup id is text: escaped, no element made of it.
    assert!(dom.contains("&lt;img id=pwn&gt;"), "{dom}");
    assert!(!dom.contains("<img"), "{dom}");
    // Reading is open; without a token there are no buttons.
    assert!(!dom.contains("data-action="), "{dom}");

    // Traffic: 3 connections of 3,000 bytes each way, in the service's totals in binary units.
    for seed in 0..3 {
        let data = std::sync::Arc::new(common::pattern(seed, 3000));
        let back = common::echo_roundtrip(ulb.listen, data.clone())
            .await
            .expect("echo through the balancer");
        assert_eq!(back, *data);
    }
    let dom = dom_until(&chromium, &url, "the traffic counted", |dom| {
        dom.matches(">8.79 KiB<").count() == 2
    })
    .await;
    let total = dom
        .find("data-total")
        .map(|at| &dom[at..])
        .expect("totals row");
    assert!(total.contains("data-field=\"total\">3<"), "{total}");

    // Drained through the API: the next load shows it.
    set_state(ulb.admin, &ida, "drain").await;
    dom_until(&chromium, &url, "a drained", |dom| {
        field_of(dom, &ida, "state").as_deref() == Some("drain")
            && row(dom, &ida).is_some_and(|r| r.contains("state-drain"))
    })
    .await;

    // b dies (its listener closes): its checks fail and the page shows it down.
    drop(b);
    let dom = dom_until(&chromium, &url, "b down", |dom| {
        field_of(dom, &idb, "health").as_deref() == Some("down")
    })
    .await;
    let rb = row(&dom, &idb).expect("row of b");
    assert!(rb.contains("health-down"), "{rb}");
    assert_eq!(cell(rb, "last-check"), Some("connect: refused"), "{rb}");

    // With the token in the fragment (never sent to the server): a row's buttons, the current state's
    // one disabled.
    let dom = dump_dom(&chromium, &ulb.url(&format!("#token={TOKEN}"))).await;
    let ra = row(&dom, &ida).expect("row of a");
    for state in ["ready", "drain", "maint"] {
        assert!(ra.contains(&format!("data-action=\"{state}\"")), "{ra}");
    }
    assert!(ra.contains("data-action=\"drain\" disabled"), "{ra}");
    assert!(!ulb.log_text().contains(TOKEN), "{}", ulb.log_text());

    // The screenshot, kept with the build's artefacts.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &chromium,
        &[
            "--virtual-time-budget=3000",
            "--window-size=1280,800",
            &format!("--screenshot={}", shot.display()),
            &ulb.url(&format!("#token={TOKEN}")),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("screenshot: {}", shot.display());
}

// ---------------------------------------------------------------------------------------------------------
// One page kept open, driven through the DevTools protocol
// ---------------------------------------------------------------------------------------------------------

/// A WebSocket to one page's DevTools target: text frames out (masked, as a client's must be), whole
/// messages in.
struct DevTools {
    ws: TcpStream,
    next_id: u64,
    _proc: Proc,
    _dir: TempDir,
}

impl DevTools {
    /// Starts Chromium on `url` with remote debugging on a free port and connects to its page.
    async fn open(chromium: &Path, url: &str) -> DevTools {
        let dir = TempDir::new("devtools");
        let profile = dir.path().join("profile");
        let err = File::create(dir.path().join("err")).expect("create stderr");
        let mut cmd = Command::new(chromium);
        cmd.args(["--headless", "--no-sandbox", "--disable-gpu"])
            .args(["--no-first-run", "--disable-extensions", "--mute-audio"])
            .arg("--remote-debugging-address=127.0.0.1")
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(err);
        let mut proc = Proc::spawn(&mut cmd, "chromium");
        // Chromium writes the port it chose to DevToolsActivePort in the profile.
        let start = Instant::now();
        let port: u16 = loop {
            let text = std::fs::read_to_string(profile.join("DevToolsActivePort"));
            if let Some(p) = text.ok().and_then(|t| t.lines().next()?.parse().ok()) {
                break p;
            }
            assert!(!proc.exited(), "chromium exited");
            assert!(start.elapsed() < DEADLINE, "no DevTools port");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let debug: SocketAddr = ([127, 0, 0, 1], port).into();
        // The page's target.
        let path = loop {
            let (_, _, body) = http(debug, "GET", "/json/list", None, None).await;
            let targets: Json = serde_json::from_str(&body).unwrap_or(Json::Null);
            let page = targets
                .as_array()
                .and_then(|l| l.iter().find(|t| t["type"] == "page"));
            if let Some(ws) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
                let after_host = ws.splitn(4, '/').nth(3).unwrap_or_default();
                break format!("/{after_host}");
            }
            assert!(start.elapsed() < DEADLINE, "no page target: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut ws = TcpStream::connect(debug).await.expect("connect DevTools");
        let upgrade = format!(
            "GET {path} HTTP/1.1\r\nHost: {debug}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dWxiLXRjcCBzdGF0dXMgcGc=\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.write_all(upgrade.as_bytes()).await.expect("upgrade");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            ws.read_exact(&mut byte).await.expect("upgrade answer");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        DevTools {
            ws,
            next_id: 0,
            _proc: proc,
            _dir: dir,
        }
    }

    async fn send(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mut frame = vec![0x81]; // FIN, text
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x5a, 0x17, 0xc3, 0x8e];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.ws.write_all(&frame).await.expect("send to DevTools");
    }

    /// The next whole text message (continuation frames joined; pings and the like passed over).
    async fn receive(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.ws.read_exact(&mut h).await.expect("DevTools frame");
            let len = match h[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    self.ws.read_exact(&mut l).await.expect("length");
                    u64::from(u16::from_be_bytes(l))
                }
                127 => {
                    let mut l = [0u8; 8];
                    self.ws.read_exact(&mut l).await.expect("length");
                    u64::from_be_bytes(l)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0u8; usize::try_from(len).expect("frame length")];
            self.ws.read_exact(&mut payload).await.expect("payload");
            let opcode = h[0] & 0x0f;
            assert_ne!(opcode, 0x8, "DevTools closed the connection");
            if opcode <= 0x2 {
                message.extend_from_slice(&payload);
                if h[0] & 0x80 != 0 {
                    return String::from_utf8_lossy(&message).into_owned();
                }
            }
        }
    }

    /// Evaluates `expression` in the page (promises awaited); its value as JSON.
    async fn eval(&mut self, expression: &str) -> Json {
        self.next_id += 1;
        let id = self.next_id;
        let call = json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true, "awaitPromise": true},
        });
        self.send(&call.to_string()).await;
        let answer = tokio::time::timeout(DEADLINE, async {
            loop {
                let m: Json = serde_json::from_str(&self.receive().await).expect("JSON message");
                if m["id"] == id {
                    return m;
                }
            }
        })
        .await
        .expect("no DevTools answer in time");
        assert!(
            answer["result"]["exceptionDetails"].is_null(),
            "{expression}: {answer}"
        );
        answer["result"]["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is true (past DEADLINE: panics with the page's text).
    async fn until(&mut self, what: &str, expression: &str) {
        let start = Instant::now();
        while self.eval(expression).await != Json::Bool(true) {
            if start.elapsed() > DEADLINE {
                let page = self.eval("document.body.innerText").await;
                panic!("{what}: not within {DEADLINE:?}; the page says:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A JavaScript expression: the text of backend `id`'s cell `field` (undefined when there is none).
fn js_cell(id: &str, field: &str) -> String {
    format!(
        "(document.querySelector('tr[data-backend=\"{id}\"] [data-field=\"{field}\"]') || {{}}).textContent"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_page_refreshes_and_its_buttons_work() {
    let Some((chromium, [a, b], mut ulb)) =
        setup("the_open_page_refreshes_and_its_buttons_work").await
    else {
        return;
    };
    let (ida, idb) = (a.addr.to_string(), b.addr.to_string());
    let mut page = DevTools::open(&chromium, &ulb.url("?refresh=1")).await;

    let both_ready = format!(
        "{} === 'ready' && {} === 'ready'",
        js_cell(&ida, "state"),
        js_cell(&idb, "state")
    );
    page.until("both rows ready", &both_ready).await;
    assert_eq!(
        page.eval("document.getElementById('refresh-every').textContent")
            .await,
        "every 1 s"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('button[data-action]').length")
            .await,
        0
    );

    // A change through the API shows on the page's own refresh, highlighted once.
    set_state(ulb.admin, &idb, "maint").await;
    let b_row = format!("document.querySelector('tr[data-backend=\"{idb}\"]')");
    page.until(
        "b in maint on the open page",
        &format!("{} === 'maint'", js_cell(&idb, "state")),
    )
    .await;
    let classes = page.eval(&format!("{b_row}.className")).await;
    assert!(
        classes.as_str().is_some_and(|c| c.contains("state-maint")),
        "{classes}"
    );
    // The highlight: on the refresh that saw the change, gone on the next.
    page.until(
        "the highlight gone",
        &format!("!{b_row}.classList.contains('changed')"),
    )
    .await;

    // The token typed in: buttons; the drain button sends the PATCH.
    let type_token = |t: &str| {
        format!(
            "(() => {{ const i = document.getElementById('token'); i.value = '{t}'; \
             i.dispatchEvent(new Event('change')); return true; }})()"
        )
    };
    page.eval(&type_token(TOKEN)).await;
    assert_eq!(
        page.eval("sessionStorage.getItem('ulb-tcp.admin-token')")
            .await,
        TOKEN
    );
    let click = |id: &str, state: &str| {
        format!(
            "(() => {{ const b = document.querySelector('tr[data-backend=\"{id}\"] \
             button[data-action=\"{state}\"]'); if (!b || b.disabled) return false; b.click(); \
             return true; }})()"
        )
    };
    page.until("a's drain button clicked", &click(&ida, "drain"))
        .await;
    page.until(
        "a drained by the button",
        &format!(
            "{} === 'drain' && document.getElementById('message').dataset.kind === 'ok'",
            js_cell(&ida, "state")
        ),
    )
    .await;
    assert_eq!(state_of(ulb.admin, &ida).await, "drain");

    // A wrong token: the 401 shows in the message line, nothing changes.
    page.eval(&type_token("wrong")).await;
    page.until("a's ready button clicked", &click(&ida, "ready"))
        .await;
    page.until(
        "the 401 in the message line",
        "document.getElementById('message').dataset.kind === 'error' && \
         document.getElementById('message').textContent.includes('401')",
    )
    .await;
    assert_eq!(state_of(ulb.admin, &ida).await, "drain");

    // The balancer gone: the page says the refresh failed, and keeps the last table.
    let _ = ulb.proc.child.kill();
    let _ = ulb.proc.child.wait();
    page.until(
        "the failure shown",
        "document.getElementById('refresh-status').dataset.status === 'failed'",
    )
    .await;
    assert_eq!(page.eval(&js_cell(&ida, "state")).await, "drain");
    let status = page
        .eval("document.getElementById('refresh-status').textContent")
        .await;
    assert!(
        status
            .as_str()
            .is_some_and(|s| s.contains("balancer unreachable")),
        "{status}"
    );
}

/// A backend that hangs (SIGSTOP: its kernel still accepts connections, so only a check that wants an
/// answer sees it) turns `down` on the open page within the refresh, and `up` again once it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_turns_down_on_the_page() {
    let Some(chromium) = chromium("a stopped backend on the page") else {
        return;
    };
    let Some(redis) = common::tool_or_skip("redis-server", "a stopped backend on the page") else {
        return;
    };
    let a = common::redis::Redis::start(&redis, 'a').await;
    let b = common::redis::Redis::start(&redis, 'b').await;
    let ulb = Ulb::start_checking(
        &[a.addr, b.addr],
        &[
            "--check",
            "send-expect",
            "--check-send",
            "PING\\r\\n",
            "--check-expect",
            "+PONG",
        ],
    )
    .await;
    let (ida, idb) = (a.addr.to_string(), b.addr.to_string());
    let url = ulb.url("?refresh=1");
    dom_until(&chromium, &url, "both up", |dom| {
        field_of(dom, &ida, "health").as_deref() == Some("up")
            && field_of(dom, &idb, "health").as_deref() == Some("up")
    })
    .await;
    b.proc.signal_group(libc::SIGSTOP);
    let dom = dom_until(&chromium, &url, "the stopped backend down", |dom| {
        field_of(dom, &idb, "health").as_deref() == Some("down")
    })
    .await;
    assert_eq!(
        field_of(&dom, &ida, "health").as_deref(),
        Some("up"),
        "{dom}"
    );
    let row_b = row(&dom, &idb).unwrap_or_default().to_string();
    assert!(row_b.contains("health-down"), "{row_b}");
    b.proc.signal_group(libc::SIGCONT);
    dom_until(&chromium, &url, "the resumed backend up", |dom| {
        field_of(dom, &idb, "health").as_deref() == Some("up")
    })
    .await;
}
