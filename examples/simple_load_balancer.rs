//! A standalone balancer with its own backends: three tiny HTTP servers started in-process and ulb-tcp in
//! front of them, round robin, on 127.0.0.1:3000 (or the port in `PORT`).
//!
//! ```text
//! cargo run --release --example simple_load_balancer
//! curl http://127.0.0.1:3000/      # run it a few times: the backends take turns
//! ```
//!
//! Ctrl-C stops it gracefully and prints what each backend carried.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use ulb_tcp::{BackendConfig, BalancerConfig, Strategy, TcpBalancer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let mut backends = Vec::new();
    for id in 1..=3 {
        backends.push(BackendConfig::new(spawn_backend(id).await?));
    }
    let config = BalancerConfig::new(backends).strategy(Strategy::RoundRobin);

    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p.parse().map_err(|_| format!("PORT={p} is not a port"))?,
        Err(_) => 3000,
    };
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let listener = ulb_tcp::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let balancer = TcpBalancer::new(config)?;
    let handle = balancer.handle();

    println!("ulb-tcp is balancing 3 backends on http://{listen}/");
    println!("try:   for i in 1 2 3 4 5 6; do curl -s http://{listen}/; done");
    println!("stop:  Ctrl-C (connections in flight are drained first)");

    let report = balancer
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    println!(
        "stopped ({} connections in flight, {} cut)",
        report.in_flight, report.forced
    );
    for b in handle.backends() {
        println!("  {:<21} carried {} connections", b.id, b.total);
    }
    Ok(())
}

/// A tiny HTTP/1.1 server that answers every request with its id, on an ephemeral loopback port.
async fn spawn_backend(id: u32) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                // Read one request head (good enough for curl), answer, close.
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("hello from backend {id} ({addr})\n");
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(addr)
}
