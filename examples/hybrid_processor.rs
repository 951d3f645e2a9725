//! A small HTTP/1.0 server that computes Fibonacci numbers (naively, so it costs CPU) on a
//! [`BlockingPool`] while `GET /ping` on the same server stays fast.
//!
//! ```text
//! cargo run --release --example hybrid_processor -- 8080     # or PORT=8080
//! curl http://127.0.0.1:8080/fib/40      # CPU-heavy: runs on the pool
//! curl http://127.0.0.1:8080/ping        # stays fast meanwhile
//! curl http://127.0.0.1:8080/stats       # running and queued jobs
//! ```
//!
//! `GET /fib/<n>` answers 200 with the result, 503 when the pool's queue is full (`try_run`), 500 if the
//! job panicked, and 400 for n above 45 (the naive recursion would hold a slot for minutes).
//! Ctrl-C stops accepting, closes the pool and waits for the jobs running.

use std::error::Error;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ulb_tcp::pool::{HybridProcessor, PoolConfig, PoolError};

/// Largest n accepted: fib(45) takes seconds with the naive recursion (and fib(93) is the last u64).
const MAX_N: u64 = 45;

/// Naive recursive Fibonacci: exponential time, pure CPU.
fn fib(n: u64) -> u64 {
    if n < 2 {
        n
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let port: u16 = match std::env::args()
        .nth(1)
        .or_else(|| std::env::var("PORT").ok())
    {
        Some(p) => p.parse().map_err(|e| format!("bad port {p:?}: {e}"))?,
        None => 8080,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;

    // One running job per CPU, and a queue of 4 per CPU (the defaults).
    let pool = HybridProcessor::new(PoolConfig::default())?;
    println!(
        "hybrid_processor listening on http://{addr} (pool: {} running, {} queued at most)",
        pool.size(),
        pool.queue_bound()
    );
    println!("try:");
    println!("  curl http://{addr}/fib/40     # CPU-heavy, runs on the pool");
    println!("  curl http://{addr}/ping       # stays fast while fib runs");
    println!("  curl http://{addr}/stats");
    println!(
        "  for i in $(seq 20); do curl -s http://{addr}/fib/42 & done; time curl http://{addr}/ping"
    );

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, &pool).await {
                            eprintln!("connection error: {e}");
                        }
                    });
                }
                Err(e) => eprintln!("accept error: {e}"),
            },
            _ = &mut ctrl_c => break,
        }
    }
    println!("shutting down: waiting for {} running jobs", pool.running());
    pool.shutdown().await;
    Ok(())
}

/// Reads one request (up to the blank line), answers it and closes.
async fn serve(mut stream: TcpStream, pool: &HybridProcessor) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0_u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8 * 1024 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let mut words = request.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));

    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", "only GET\n".to_string())
    } else if path == "/ping" {
        ("200 OK", "pong\n".to_string())
    } else if path == "/stats" {
        let body = format!(
            "running {} / {}\nqueued {} / {}\n",
            pool.running(),
            pool.size(),
            pool.queued(),
            pool.queue_bound()
        );
        ("200 OK", body)
    } else if let Some(n) = path.strip_prefix("/fib/") {
        match n.parse::<u64>() {
            Ok(n) if n <= MAX_N => fib_response(pool, n).await,
            _ => (
                "400 Bad Request",
                format!("n must be an integer from 0 to {MAX_N}\n"),
            ),
        }
    } else {
        (
            "404 Not Found",
            "try /fib/<n>, /ping or /stats\n".to_string(),
        )
    };
    let response = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn fib_response(pool: &HybridProcessor, n: u64) -> (&'static str, String) {
    let start = Instant::now();
    match pool.try_run(fib, n).await {
        Ok(v) => (
            "200 OK",
            format!("fib({n}) = {v} ({:.1?} including queue)\n", start.elapsed()),
        ),
        Err(PoolError::Full) => (
            "503 Service Unavailable",
            "the pool's queue is full, try again later\n".to_string(),
        ),
        Err(e @ PoolError::Panicked(_)) => ("500 Internal Server Error", format!("{e}\n")),
        Err(e) => ("503 Service Unavailable", format!("{e}\n")),
    }
}
