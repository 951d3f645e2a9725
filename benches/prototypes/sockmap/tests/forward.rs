//! Correctness through every mode, with real sockets on 127.0.0.1 and the real binary. Every wait has
//! a deadline (socket timeouts, channel timeouts); every process started is killed and reaped.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);

const MODES: &[&[&str]] = &[
    &["--mode", "userspace"],
    &["--mode", "sockmap", "--attach", "verdict"],
    &["--mode", "sockmap", "--attach", "stream"],
    &["--mode", "sockmap", "--attach", "stream-parser"],
];

/// The forwarder under test; killed and reaped when dropped.
struct Forwarder {
    child: Child,
    addr: SocketAddr,
    /// Its stderr, line by line (the `conn ...` lines of --log-conns).
    log: Receiver<String>,
    name: String,
}

impl Forwarder {
    fn start(mode: &[&str], backend: SocketAddr, extra: &[&str]) -> Forwarder {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sockmap-forward"))
            .args(["--listen", "127.0.0.1:0", "--backend", &backend.to_string()])
            .args(mode)
            .args(["--log-conns", "--drain-timeout", "5"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sockmap-forward");
        let (out_tx, out_rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = out_tx.send(line);
            }
        });
        let (log_tx, log) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = log_tx.send(line);
            }
        });
        let mut f = Forwarder {
            child,
            addr: "0.0.0.0:0".parse().expect("addr"),
            log,
            name: mode.join(" "),
        };
        let line = match out_rx.recv_timeout(DEADLINE) {
            Ok(l) => l,
            Err(_) => {
                let errs: Vec<String> = f.log.try_iter().collect();
                panic!("{}: no listening line; stderr: {errs:?}", f.name);
            }
        };
        f.addr = line
            .strip_prefix("listening on ")
            .expect("listening line")
            .parse()
            .expect("listen address");
        f
    }

    /// The next `conn ...` line, within the deadline.
    fn conn_line(&self) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let l = self
                .log
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{}: no conn line", self.name));
            if l.starts_with("conn ") {
                return l;
            }
            eprintln!("{}: {l}", self.name);
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect_timeout(&self.addr, DEADLINE).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        s.set_write_timeout(Some(DEADLINE)).expect("timeout");
        s
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            for l in self.log.try_iter() {
                eprintln!("{} log: {l}", self.name);
            }
        }
    }
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} in {line}"))
}

fn text_field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// A backend: accepts connections, each handled by `f` on its own thread, until the test ends (the
/// listener thread is left blocked in accept; it holds no process).
fn backend(f: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            s.set_read_timeout(Some(DEADLINE)).expect("timeout");
            s.set_write_timeout(Some(DEADLINE)).expect("timeout");
            thread::spawn(move || f(s));
        }
    });
    addr
}

/// Echoes until EOF, then passes the FIN back.
fn echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// xorshift64*: reproducible "random" bytes without a dependency.
fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        v.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(n);
    v
}

#[test]
fn echo_20_mib_byte_exact() {
    let be = backend(echo);
    for mode in MODES {
        let f = Forwarder::start(mode, be, &[]);
        let data = random_bytes(20 << 20, 0x9e37_79b9_7f4a_7c15);
        let mut s = f.connect();
        let mut w = s.try_clone().expect("clone");
        let sent = data.clone();
        let writer = thread::spawn(move || {
            w.write_all(&sent).expect("write");
            w.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut got = Vec::with_capacity(data.len());
        s.read_to_end(&mut got).expect("read echo");
        writer.join().expect("writer");
        assert_eq!(got.len(), data.len(), "{}: echoed length", f.name);
        assert!(got == data, "{}: echoed bytes differ", f.name);
        drop(s);
        let line = f.conn_line();
        assert_eq!(text_field(&line, "end"), "closed", "{}: {line}", f.name);
        assert_eq!(field(&line, "up"), data.len() as u64, "{}: {line}", f.name);
        assert_eq!(
            field(&line, "down"),
            data.len() as u64,
            "{}: {line}",
            f.name
        );
        assert_eq!(field(&line, "stray"), 0, "{}: {line}", f.name);
        if mode.contains(&"sockmap") {
            assert_eq!(
                field(&line, "up_tcp"),
                data.len() as u64,
                "{}: {line}",
                f.name
            );
            assert_eq!(
                field(&line, "down_tcp"),
                data.len() as u64,
                "{}: {line}",
                f.name
            );
        }
        eprintln!("{}: {line}", f.name);
    }
}

/// Many small request/answer exchanges on one connection, the first ones pipelined right after the
/// connect (so they are queued before the forwarder's backend connection exists, and cross the hand-over
/// from user space to the program), then a window of requests in flight.
#[test]
fn small_exchanges_pipelined_byte_exact() {
    small_exchanges(&[]);
}

/// The same, with the hand-over from user space to the program forced mid-stream: the program passes
/// each socket's bytes to user space until user space has forwarded its first read.
#[test]
fn small_exchanges_late_handover_byte_exact() {
    small_exchanges(&["--late-handover"]);
}

fn small_exchanges(extra: &[&str]) {
    let be = backend(echo);
    let late = !extra.is_empty();
    for mode in MODES {
        let f = Forwarder::start(mode, be, extra);
        let mut s = f.connect();
        s.set_nodelay(true).expect("nodelay");
        let exchanges = 20_000usize;
        let msg = |i: usize| -> Vec<u8> {
            let len = 1 + (i * 7919) % 200;
            random_bytes(len, i as u64 + 1)
        };
        let window = 16;
        let mut total = 0u64;
        for i in 0..window {
            let m = msg(i);
            total += m.len() as u64;
            s.write_all(&m).expect("pipelined write");
        }
        for i in 0..exchanges {
            let want = msg(i);
            let mut got = vec![0u8; want.len()];
            s.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("{}: answer {i}: {e}", f.name));
            assert!(got == want, "{}: answer {i} differs", f.name);
            if i + window < exchanges {
                let m = msg(i + window);
                total += m.len() as u64;
                s.write_all(&m).expect("write");
            }
        }
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("eof");
        assert!(rest.is_empty(), "{}: bytes after the last answer", f.name);
        let line = f.conn_line();
        eprintln!("{}: {line}", f.name);
        assert_eq!(text_field(&line, "end"), "closed", "{}: {line}", f.name);
        assert_eq!(field(&line, "up"), total, "{}: {line}", f.name);
        assert_eq!(field(&line, "down"), total, "{}: {line}", f.name);
        assert_eq!(field(&line, "stray"), 0, "{}: {line}", f.name);
        if mode.contains(&"sockmap") {
            assert!(
                field(&line, "up_redirected") > 0 && field(&line, "down_redirected") > 0,
                "{}: the program never took over: {line}",
                f.name
            );
            if late {
                assert!(
                    field(&line, "up_user") > 0 && field(&line, "down_user") > 0,
                    "{}: no bytes went through user space before the hand-over: {line}",
                    f.name
                );
            }
        }
    }
}

/// Backend side of `exchange_words`: echoes `n` 4-byte words; false once the client has gone.
fn echo_words(s: &mut TcpStream, n: usize) -> bool {
    let mut buf = [0u8; 4];
    (0..n).all(|_| s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok())
}

/// Client side: sends the words 0..n one at a time, each checked in its echo before the next, so that
/// the program has taken the connection over by the end.
fn exchange_words(s: &mut TcpStream, n: u32) {
    let mut buf = [0u8; 4];
    for i in 0..n {
        s.write_all(&i.to_le_bytes()).expect("write");
        s.read_exact(&mut buf).expect("echo");
        assert_eq!(u32::from_le_bytes(buf), i);
    }
}

/// A half-close once the program carries the connection: a few echoed exchanges, then the client sends
/// its request and half-closes; the backend answers (1 MiB) only after that EOF: the FIN may reach the
/// backend only after every redirected byte, and the answer comes back whole, then EOF.
#[test]
fn client_half_close_after_the_hand_over() {
    fn exchanges_then_answer_after_eof(mut s: TcpStream) {
        if !echo_words(&mut s, 20) {
            return;
        }
        let mut req = Vec::new();
        if s.read_to_end(&mut req).is_err() {
            return;
        }
        let mut ans = random_bytes(1 << 20, 11);
        ans.extend_from_slice(&req);
        let _ = s.write_all(&ans);
    }
    let be = backend(exchanges_then_answer_after_eof);
    for mode in MODES {
        let f = Forwarder::start(mode, be, &[]);
        let mut s = f.connect();
        exchange_words(&mut s, 20);
        let req = random_bytes(300_000, 5);
        s.write_all(&req).expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let mut want = random_bytes(1 << 20, 11);
        want.extend_from_slice(&req);
        assert_eq!(got.len(), want.len(), "{}: answer length", f.name);
        assert!(got == want, "{}: answer differs", f.name);
        let line = f.conn_line();
        eprintln!("{}: {line}", f.name);
        assert_eq!(text_field(&line, "end"), "closed", "{}: {line}", f.name);
        assert_eq!(
            field(&line, "up"),
            80 + req.len() as u64,
            "{}: {line}",
            f.name
        );
        assert_eq!(
            field(&line, "down"),
            80 + want.len() as u64,
            "{}: {line}",
            f.name
        );
        if mode.contains(&"sockmap") {
            assert!(
                field(&line, "up_redirected") > 0,
                "{}: not spliced: {line}",
                f.name
            );
            assert_eq!(
                field(&line, "up_tcp"),
                field(&line, "up"),
                "{}: {line}",
                f.name
            );
            assert_eq!(
                field(&line, "down_tcp"),
                field(&line, "down"),
                "{}: {line}",
                f.name
            );
        }
    }
}

/// The client sends its request and half-closes at once; the backend answers only after that EOF (1 MiB
/// plus the request's length), then closes: the client still receives the whole answer, then EOF.
#[test]
fn client_half_close_still_gets_the_answer() {
    fn answer_after_eof(mut s: TcpStream) {
        let mut req = Vec::new();
        if s.read_to_end(&mut req).is_err() {
            return;
        }
        let mut ans = random_bytes(1 << 20, 7);
        ans.extend_from_slice(&req);
        let _ = s.write_all(&ans);
    }
    let be = backend(answer_after_eof);
    for mode in MODES {
        let f = Forwarder::start(mode, be, &[]);
        let mut s = f.connect();
        s.write_all(b"half-close request").expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let mut want = random_bytes(1 << 20, 7);
        want.extend_from_slice(b"half-close request");
        assert_eq!(got.len(), want.len(), "{}: answer length", f.name);
        assert!(got == want, "{}: answer differs", f.name);
        let line = f.conn_line();
        eprintln!("{}: {line}", f.name);
        assert_eq!(text_field(&line, "end"), "closed", "{}: {line}", f.name);
        assert_eq!(
            field(&line, "down"),
            want.len() as u64,
            "{}: {line}",
            f.name
        );
    }
}

/// The backend answers a few exchanges (so the program has taken over), then resets: the client's read
/// fails with a reset, not with EOF.
#[test]
fn backend_reset_reaches_the_client_as_a_reset() {
    fn echo_then_reset(mut s: TcpStream) {
        if !echo_words(&mut s, 50) {
            return;
        }
        let mut buf = [0u8; 4];
        if s.read_exact(&mut buf).is_err() {
            return;
        }
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    }
    let be = backend(echo_then_reset);
    for mode in MODES {
        let f = Forwarder::start(mode, be, &[]);
        let mut s = f.connect();
        exchange_words(&mut s, 50);
        let mut buf = [0u8; 4];
        s.write_all(b"bye!").expect("write");
        let r = s.read(&mut buf);
        match r {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("{}: wanted a reset, got {other:?}", f.name),
        }
        let line = f.conn_line();
        eprintln!("{}: {line}", f.name);
        assert_eq!(text_field(&line, "end"), "reset", "{}: {line}", f.name);
    }
}

#[test]
fn two_hundred_concurrent_short_connections() {
    let be = backend(echo);
    for mode in MODES {
        let f = Forwarder::start(mode, be, &[]);
        let clients: Vec<_> = (0..200u64)
            .map(|i| {
                let mut s = f.connect();
                thread::spawn(move || {
                    let data = random_bytes(100 + i as usize * 10, i + 1);
                    s.write_all(&data).expect("write");
                    s.shutdown(Shutdown::Write).expect("shutdown");
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).expect("read");
                    got == data
                })
            })
            .collect();
        let ok = clients
            .into_iter()
            // A panicking client counts as a failure.
            .map(|c| c.join().unwrap_or(false))
            .filter(|&ok| ok)
            .count();
        assert_eq!(ok, 200, "{}: byte-exact connections", f.name);
        let mut spliced = 0;
        for _ in 0..200 {
            let line = f.conn_line();
            if line.contains("up_redirected=") && field(&line, "up_redirected") > 0 {
                spliced += 1;
            }
            assert_eq!(text_field(&line, "end"), "closed", "{}: {line}", f.name);
            assert_eq!(
                field(&line, "up"),
                field(&line, "down"),
                "{}: {line}",
                f.name
            );
            assert_eq!(field(&line, "stray"), 0, "{}: {line}", f.name);
        }
        // A client that half-closed before its sockets could enter the sockmap is carried in user space.
        eprintln!(
            "{}: {spliced} of 200 connections spliced by the program",
            f.name
        );
    }
}

/// An idle connection is closed after --idle-timeout, also once the program carries it (its last-activity
/// time is the program's).
#[test]
fn idle_connection_is_closed() {
    let be = backend(echo);
    for mode in MODES {
        let f = Forwarder::start(mode, be, &["--idle-timeout", "0.5"]);
        let mut s = f.connect();
        let mut buf = [0u8; 4];
        let start = Instant::now();
        // Activity for longer than the timeout: not cut while bytes flow.
        let mut i = 0u32;
        let mut last_echo = Instant::now();
        while start.elapsed() < Duration::from_millis(1200) {
            s.write_all(&i.to_le_bytes()).expect("write");
            s.read_exact(&mut buf).expect("echo while active");
            last_echo = Instant::now();
            i += 1;
            let t = Instant::now();
            // Pace the exchanges without sleeping: wait on the socket itself (nothing comes).
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let r = s.read(&mut buf);
            assert!(
                matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
                "{}: unexpected {r:?}",
                f.name
            );
            assert!(t.elapsed() >= Duration::from_millis(40));
            s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        }
        let r = s.read(&mut buf);
        assert!(
            matches!(r, Ok(0)),
            "{}: wanted EOF at the idle timeout, got {r:?}",
            f.name
        );
        // The forwarder saw the echo's bytes before we did: its idle time starts a little earlier.
        let waited = last_echo.elapsed();
        assert!(
            waited >= Duration::from_millis(480) && waited < Duration::from_secs(5),
            "{}: closed {waited:?} after the last echo",
            f.name
        );
        let line = f.conn_line();
        eprintln!("{}: {line}", f.name);
        assert_eq!(text_field(&line, "end"), "idle", "{}: {line}", f.name);
    }
}
