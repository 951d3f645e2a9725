//! One binary, two roles: run it and it supervises one worker per CPU behind the balancer on
//! 127.0.0.1:3000, re-running itself as the workers; as a worker it serves a tiny HTTP greeting.
//!
//! ```sh
//! cargo run --release --example cluster
//! curl 127.0.0.1:3000      # hello from worker 0 (pid …), then worker 1, …
//! kill -HUP <supervisor>   # rolling restart: new pids, no failed request
//! ```

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ulb_tcp::cluster::{self, Cluster, ClusterConfig, WorkerCommand};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if cluster::is_worker() {
        return worker().await;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = ClusterConfig::new() // one worker per CPU
        .base_port(8081)
        .balancer("127.0.0.1:3000".parse()?);
    let cluster = Cluster::new(config, WorkerCommand::current_exe()?)?;
    println!("balancer on http://127.0.0.1:3000; Ctrl-C stops, SIGHUP rolls the workers");
    cluster.run_with_signals().await?;
    Ok(())
}

/// A worker: `hello from worker <id> (pid <pid>)` to every HTTP request on 127.0.0.1:$ULB_WORKER_PORT.
async fn worker() -> Result<(), Box<dyn std::error::Error>> {
    let id = cluster::worker_id().ok_or("no worker id")?;
    let port = cluster::worker_port().ok_or("no worker port")?;
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on 127.0.0.1:{port}");
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            // Read the request head (up to the blank line, or 8 KiB); the body of a GET is empty.
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("hello from worker {id} (pid {})\n", std::process::id());
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
