//! A real `redis-server` for the tests, and a client for one inline command.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{unique_port, Proc, TempDir};

/// A `redis-server` process on loopback, killed and reaped when dropped.
pub struct Redis {
    pub proc: Proc,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Redis {
    /// A `redis-server` on a free loopback port, no persistence, whose key `who` holds `tag`.
    pub async fn start(bin: &Path, tag: char) -> Redis {
        for _ in 0..5 {
            let dir = TempDir::new("redis");
            let port = unique_port();
            let mut cmd = Command::new(bin);
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--logfile", "", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut proc = Proc::spawn(&mut cmd, format!("redis-server :{port}"));
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) && !proc.exited() {
                let mine = format!("process_id:{}\r", proc.child.id());
                if resp(addr, "INFO server")
                    .await
                    .is_ok_and(|i| i.contains(&mine))
                {
                    let set = resp(addr, &format!("SET who {tag}")).await;
                    assert_eq!(set.ok().as_deref(), Some("+OK"));
                    return Redis {
                        proc,
                        addr,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("redis-server never started");
    }

    /// How many GET commands it has run (`INFO commandstats`).
    pub async fn gets(&self) -> u64 {
        let info = resp(self.addr, "INFO commandstats").await.unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
            .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
            .unwrap_or(0)
    }
}

/// Sends one inline command and returns the reply: a status line, or a bulk string's contents.
pub async fn resp(addr: SocketAddr, command: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("{command}\r\n").as_bytes()).await?;
    let mut got = Vec::new();
    let deadline = Duration::from_secs(5);
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(deadline, s.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::other("no reply"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        let Some(line_end) = text.find("\r\n") else {
            continue;
        };
        if let Some(len) = text.strip_prefix('$') {
            let len: usize = len[..line_end - 1].parse().unwrap();
            if got.len() >= line_end + 2 + len + 2 {
                return Ok(text[line_end + 2..line_end + 2 + len].to_string());
            }
        } else {
            return Ok(text[..line_end].to_string());
        }
    }
}
