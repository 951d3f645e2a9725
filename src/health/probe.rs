//! One check of one address: a TCP connect, a `send-expect` exchange or an HTTP request, all within the
//! check's timeout. The verdict comes back in words (`connect: refused`, `http: status 503`, ...) with a
//! small fixed kind for the failure metric.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::config::{quoted, CheckMode, HealthCheck};
use crate::metrics::CheckFailure;

/// The most of a reply a `send-expect` check with `contains` reads, looking for its bytes.
const MAX_REPLY: usize = 64 * 1024;

/// The longest HTTP status line read.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// The most of a bad reply a failure reason shows.
const SHOWN: usize = 64;

/// A check that did not pass: why, in words, and its kind for the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) kind: CheckFailure,
    pub(crate) reason: String,
}

impl Failure {
    fn new(kind: CheckFailure, reason: String) -> Self {
        Failure { kind, reason }
    }

    fn timed_out(what: &str, after: Duration) -> Self {
        Failure::new(
            CheckFailure::Timeout,
            format!("{what}: timed out after {}", words(after)),
        )
    }

    fn io(what: &str, e: &io::Error) -> Self {
        let kind = match e.kind() {
            io::ErrorKind::ConnectionRefused => CheckFailure::Refused,
            io::ErrorKind::TimedOut => CheckFailure::Timeout,
            _ => CheckFailure::Other,
        };
        Failure::new(kind, format!("{what}: {}", io_words(e)))
    }

    fn unexpected(reason: String) -> Self {
        Failure::new(CheckFailure::Unexpected, reason)
    }
}

/// Runs one check of `addr`: `Ok` with what passed (`connect: ok`, `http: status 200`, ...), or why not.
pub(crate) async fn probe(check: &HealthCheck, addr: SocketAddr) -> Result<String, Failure> {
    let deadline = Instant::now() + check.timeout;
    let mut stream = match timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => return Err(Failure::timed_out("connect", check.timeout)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
            return Err(Failure::timed_out("connect", check.timeout))
        }
        Ok(Err(e)) => return Err(Failure::io("connect", &e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    if let Some(version) = check.send_proxy {
        let header = crate::edge::encode_local(version);
        match timeout_at(deadline, stream.write_all(&header)).await {
            Err(_) => return Err(Failure::timed_out("PROXY header", check.timeout)),
            Ok(Err(e)) => return Err(Failure::io("PROXY header: write failed", &e)),
            Ok(Ok(())) => {}
        }
    }
    let (what, exchange) = match check.mode {
        CheckMode::SendExpect => ("send-expect", true),
        CheckMode::Http => ("http", true),
        _ => ("connect", false),
    };
    if !exchange {
        return Ok("connect: ok".into());
    }
    let talk = async {
        if check.mode == CheckMode::Http {
            http(&mut stream, check, addr).await
        } else {
            send_expect(&mut stream, check).await
        }
    };
    match timeout_at(deadline, talk).await {
        Ok(verdict) => verdict,
        Err(_) => Err(Failure::timed_out(what, check.timeout)),
    }
}

/// Writes the check's bytes, then reads until the reply starts with (or contains) the expected ones.
async fn send_expect(s: &mut TcpStream, check: &HealthCheck) -> Result<String, Failure> {
    const WHAT: &str = "send-expect";
    if !check.send.is_empty() {
        s.write_all(&check.send)
            .await
            .map_err(|e| Failure::io("send-expect: write failed", &e))?;
    }
    let expect = check.expect.as_slice();
    let passed = || format!("{WHAT}: got {}", quoted(expect));
    let mut got: Vec<u8> = Vec::with_capacity(expect.len().clamp(64, 4096));
    loop {
        let before = got.len();
        got.reserve(4096);
        let n = s
            .read_buf(&mut got)
            .await
            .map_err(|e| Failure::io("send-expect: read failed", &e))?;
        if n == 0 {
            let expected = if check.contains {
                format!("expected {} in the reply", quoted(expect))
            } else {
                format!("expected {}", quoted(expect))
            };
            return Err(Failure::unexpected(if got.is_empty() {
                format!("{WHAT}: closed before a reply ({expected})")
            } else {
                format!("{WHAT}: got {} then closed ({expected})", shown(&got))
            }));
        }
        if check.contains {
            // Only where the new bytes can complete a match.
            let from = before.saturating_sub(expect.len().saturating_sub(1));
            if got[from..].windows(expect.len()).any(|w| w == expect) {
                return Ok(passed());
            }
            if got.len() >= MAX_REPLY {
                return Err(Failure::unexpected(format!(
                    "{WHAT}: no {} in the first 64 KiB of the reply",
                    quoted(expect)
                )));
            }
        } else {
            let common = got.len().min(expect.len());
            if got[..common] != expect[..common] {
                return Err(Failure::unexpected(format!(
                    "{WHAT}: got {} (expected {})",
                    shown(&got),
                    quoted(expect)
                )));
            }
            if got.len() >= expect.len() {
                return Ok(passed());
            }
        }
    }
}

/// `GET PATH HTTP/1.1`, then the status line: 2xx or 3xx passes, or exactly the status asked for.
async fn http(s: &mut TcpStream, check: &HealthCheck, addr: SocketAddr) -> Result<String, Failure> {
    let host = check.host.clone().unwrap_or_else(|| addr.to_string());
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ulb-tcp/{} health check\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        check.http_path(),
        env!("CARGO_PKG_VERSION"),
    );
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| Failure::io("http: write failed", &e))?;
    let mut got: Vec<u8> = Vec::with_capacity(256);
    let line_end = loop {
        got.reserve(1024);
        let n = s
            .read_buf(&mut got)
            .await
            .map_err(|e| Failure::io("http: read failed", &e))?;
        if let Some(end) = got.windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if n == 0 {
            return Err(Failure::unexpected(if got.is_empty() {
                "http: closed before a status line".into()
            } else {
                format!("http: got {} then closed", shown(&got))
            }));
        }
        if got.len() > MAX_STATUS_LINE {
            return Err(Failure::unexpected(format!(
                "http: no status line in the first 8 KiB: {}",
                shown(&got)
            )));
        }
    };
    let line = &got[..line_end];
    let status = parse_status(line).ok_or_else(|| {
        Failure::unexpected(format!("http: not an HTTP status line: {}", shown(line)))
    })?;
    let ok = match check.status {
        Some(want) => status == want,
        None => (200..400).contains(&status),
    };
    match (ok, check.status) {
        (true, _) => Ok(format!("http: status {status}")),
        (false, Some(want)) => Err(Failure::unexpected(format!(
            "http: status {status} (expected {want})"
        ))),
        (false, None) => Err(Failure::unexpected(format!("http: status {status}"))),
    }
}

/// The status of `HTTP/1.x NNN reason`.
fn parse_status(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/")?;
    let space = rest.iter().position(|&b| b == b' ')?;
    let code = rest.get(space + 1..space + 4)?;
    let after = rest.get(space + 4).copied();
    if !code.iter().all(u8::is_ascii_digit) || !matches!(after, None | Some(b' ')) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Up to [`SHOWN`] bytes of `bytes`, quoted and escaped, with `…` when there was more.
fn shown(bytes: &[u8]) -> String {
    if bytes.len() <= SHOWN {
        quoted(bytes)
    } else {
        let q = quoted(&bytes[..SHOWN]);
        format!("{}…\"", &q[..q.len() - 1])
    }
}

/// A duration as people write it: `1s`, `250ms`, `1500ms`.
pub(crate) fn words(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{d:?}")
    }
}

/// An I/O error in a few words, without the OS error number.
fn io_words(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::ConnectionReset => "reset by the backend".into(),
        io::ErrorKind::ConnectionAborted => "aborted".into(),
        io::ErrorKind::BrokenPipe => "closed by the backend (broken pipe)".into(),
        io::ErrorKind::AddrNotAvailable => "no local address or port available".into(),
        _ => {
            let text = e.to_string();
            match text.find(" (os error") {
                Some(i) => text[..i].to_lowercase(),
                None => text,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that reads what it is sent, then writes `reply` and closes; its address.
    async fn replying(reply: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(reply).await;
                });
            }
        });
        addr
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn connect_checks_and_their_reasons() {
        let up = replying(b"").await;
        assert_eq!(
            probe(&HealthCheck::connect(), up).await,
            Ok("connect: ok".into())
        );
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refused = l.local_addr().unwrap();
        drop(l);
        let f = probe(&HealthCheck::connect(), refused).await.unwrap_err();
        assert_eq!(
            (f.kind, f.reason.as_str()),
            (CheckFailure::Refused, "connect: refused")
        );
    }

    #[tokio::test]
    async fn send_expect_checks_and_their_reasons() {
        let ping = |addr| {
            let c = HealthCheck::send_expect(&b"PING\r\n"[..], &b"+PONG"[..]).timeout(ms(300));
            async move { probe(&c, addr).await }
        };
        assert_eq!(
            ping(replying(b"+PONG\r\n").await).await,
            Ok("send-expect: got \"+PONG\"".into())
        );
        let f = ping(replying(b"-ERR unknown command\r\n").await)
            .await
            .unwrap_err();
        assert_eq!(f.kind, CheckFailure::Unexpected);
        assert_eq!(
            f.reason,
            r#"send-expect: got "-ERR unknown command\r\n" (expected "+PONG")"#
        );
        let f = ping(replying(b"+PO").await).await.unwrap_err();
        assert_eq!(
            f.reason,
            r#"send-expect: got "+PO" then closed (expected "+PONG")"#
        );
        // A server that accepts and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = ping(silent.local_addr().unwrap()).await.unwrap_err();
        assert_eq!(
            (f.kind, f.reason.as_str()),
            (CheckFailure::Timeout, "send-expect: timed out after 300ms")
        );
        // Anywhere in the reply, across reads.
        let anywhere = HealthCheck::send_expect("INFO\r\n", "role:master")
            .contains(true)
            .timeout(ms(300));
        let addr = replying(b"# Replication\r\nrole:master\r\n").await;
        assert!(probe(&anywhere, addr).await.is_ok());
        let addr = replying(b"# Replication\r\nrole:slave\r\n").await;
        let f = probe(&anywhere, addr).await.unwrap_err();
        assert!(
            f.reason
                .ends_with(r#"(expected "role:master" in the reply)"#),
            "{}",
            f.reason
        );
        // A long bad reply is cut.
        let f = ping(replying(&[b'x'; 200]).await).await.unwrap_err();
        assert!(f.reason.contains("xxx…\" (expected"), "{}", f.reason);
    }

    #[tokio::test]
    async fn http_checks_and_their_reasons() {
        let get = |addr, c: HealthCheck| async move { probe(&c.timeout(ms(300)), addr).await };
        let ok = replying(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(
            get(ok, HealthCheck::http("/healthz")).await,
            Ok("http: status 204".into())
        );
        let f = get(ok, HealthCheck::http("/").status(200))
            .await
            .unwrap_err();
        assert_eq!(f.reason, "http: status 204 (expected 200)");
        let down = replying(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let f = get(down, HealthCheck::http("/")).await.unwrap_err();
        assert_eq!(
            (f.kind, f.reason.as_str()),
            (CheckFailure::Unexpected, "http: status 503")
        );
        let junk = replying(b"+PONG\r\n").await;
        let f = get(junk, HealthCheck::http("/")).await.unwrap_err();
        assert_eq!(f.reason, r#"http: not an HTTP status line: "+PONG""#);
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = get(silent.local_addr().unwrap(), HealthCheck::http("/"))
            .await
            .unwrap_err();
        assert_eq!(f.reason, "http: timed out after 300ms");
    }

    #[tokio::test]
    async fn the_http_request_names_the_path_and_host() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
            }
            seen
        });
        probe(&HealthCheck::http("/healthz?x=1"), addr)
            .await
            .unwrap();
        probe(&HealthCheck::http("/").host("app.example"), addr)
            .await
            .unwrap();
        let seen = server.await.unwrap();
        assert!(
            seen[0].starts_with("GET /healthz?x=1 HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(
            seen[0].contains(&format!("\r\nHost: {addr}\r\n")),
            "{}",
            seen[0]
        );
        assert!(seen[0].contains("\r\nConnection: close\r\n"));
        assert!(seen[0].ends_with("\r\n\r\n"));
        assert!(seen[1].contains("\r\nHost: app.example\r\n"), "{}", seen[1]);
    }

    #[test]
    fn status_lines_and_durations() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 20 OK"), None);
        assert_eq!(parse_status(b"HTTP/1.1 2000"), None);
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(words(Duration::from_secs(1)), "1s");
        assert_eq!(words(ms(250)), "250ms");
        assert_eq!(words(ms(1500)), "1500ms");
    }
}
