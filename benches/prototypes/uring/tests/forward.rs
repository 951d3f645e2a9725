//! Correctness through every mode: real sockets on 127.0.0.1, ports chosen by the kernel, a deadline on
//! every wait, and the forwarder killed and reaped at the end of each test (also when it fails).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

/// The variants tested: the epoll twin and the io_uring mode with each of its options.
const MODES: &[&[&str]] = &[
    &["--mode", "epoll"],
    &["--mode", "uring"],
    &["--mode", "uring", "--direct"],
    &["--mode", "uring", "--setup", "coop"],
    &["--mode", "uring", "--setup", "plain", "--buf", "4096"],
    &["--mode", "uring", "--recv", "multi"],
    // A small buffer ring: multishot recvs run out of buffers (ENOBUFS) and pause on long queues.
    &[
        "--mode", "uring", "--recv", "multi", "--direct", "--bufs", "16", "--buf", "4096",
    ],
];

struct Forwarder {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forwarder(mode: &[&str], backend: SocketAddr) -> Forwarder {
    let mut child = Command::new(env!("CARGO_BIN_EXE_uring-forward"))
        .args(["--listen", "127.0.0.1:0", "--backend", &backend.to_string()])
        .args(mode)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start uring-forward");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let mut f = Forwarder {
        child,
        addr: "0.0.0.0:0".parse().unwrap(),
    };
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("uring-forward says where it listens in time")
        .expect("read its stdout");
    f.addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("an address");
    f
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

/// A backend: every accepted connection is handed to `serve` on a thread of its own.
fn backend(serve: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            s.set_write_timeout(Some(DEADLINE)).unwrap();
            thread::spawn(move || serve(s));
        }
    });
    addr
}

/// Echoes until EOF, then closes.
fn echo(mut s: TcpStream) {
    let mut b = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&b[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads to EOF, then answers with ten copies of what it read, then closes.
fn after_eof(mut s: TcpStream) {
    let mut req = Vec::new();
    if s.read_to_end(&mut req).is_err() {
        return;
    }
    for _ in 0..10 {
        if s.write_all(&req).is_err() {
            return;
        }
    }
}

/// Reads 5 bytes, then resets the connection.
fn resetter(mut s: TcpStream) {
    let mut b = [0u8; 5];
    if s.read_exact(&mut b).is_ok() {
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    }
}

fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        v.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(n);
    v
}

#[test]
fn echo_20_mib_byte_exact() {
    let be = backend(echo);
    let data = random_bytes(20 << 20, 0x9E37_79B9_7F4A_7C15);
    for mode in MODES {
        let f = forwarder(mode, be);
        let s = connect(f.addr);
        let mut w = s.try_clone().unwrap();
        let sent = data.clone();
        let writer = thread::spawn(move || -> io::Result<()> {
            for chunk in sent.chunks(100_003) {
                w.write_all(chunk)?;
            }
            w.shutdown(Shutdown::Write)
        });
        let start = Instant::now();
        let mut got = Vec::with_capacity(data.len());
        (&s).read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{mode:?}: read the echo to EOF: {e}"));
        writer.join().unwrap().expect("write 20 MiB");
        assert!(start.elapsed() < DEADLINE, "{mode:?}: took too long");
        assert_eq!(got.len(), data.len(), "{mode:?}: length");
        assert!(got == data, "{mode:?}: bytes differ");
    }
}

#[test]
fn half_close_still_gets_the_answer() {
    let be = backend(after_eof);
    let req = random_bytes(100_000, 7);
    let want: Vec<u8> = req.iter().copied().cycle().take(req.len() * 10).collect();
    for mode in MODES {
        let f = forwarder(mode, be);
        let mut s = connect(f.addr);
        s.write_all(&req).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{mode:?}: the answer, then a clean EOF: {e}"));
        assert!(
            got == want,
            "{mode:?}: answer differs ({} bytes)",
            got.len()
        );
    }
}

#[test]
fn backend_reset_reaches_the_client_as_a_reset() {
    let be = backend(resetter);
    for mode in MODES {
        let f = forwarder(mode, be);
        let mut s = connect(f.addr);
        s.write_all(b"hello").unwrap();
        let mut b = [0u8; 16];
        let r = s.read(&mut b);
        match r {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{mode:?}: {e}"),
            Ok(n) => panic!("{mode:?}: read {n} (a clean EOF or data) instead of a reset"),
        }
    }
}

#[test]
fn many_concurrent_short_connections() {
    let be = backend(echo);
    for mode in MODES {
        let f = forwarder(mode, be);
        let addr = f.addr;
        let clients: Vec<_> = (0..200u64)
            .map(|i| {
                thread::spawn(move || {
                    let msg = random_bytes(100 + i as usize, i + 1);
                    let mut s = connect(addr);
                    s.write_all(&msg).unwrap();
                    s.shutdown(Shutdown::Write).unwrap();
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).unwrap();
                    got == msg
                })
            })
            .collect();
        let ok = clients
            .into_iter()
            .map(|c| c.join())
            .filter(|r| matches!(r, Ok(true)))
            .count();
        assert_eq!(ok, 200, "{mode:?}: {ok} of 200 connections echoed right");
    }
}
