//! Changing a running balancer's backends from the embedding program: add one, re-weight one, drain one
//! for maintenance, remove one with a deadline, and replace the whole set as a reload would, while an
//! event stream reports every change. Runs on loopback and ends by itself:
//!
//! ```text
//! cargo run --example live_backends
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ulb_tcp::{AdminState, BackendConfig, BalancerConfig, BalancerHandle, Strategy, TcpBalancer};

/// A backend that greets each client with its name, then echoes until the client leaves.
async fn backend(name: &'static str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if s.write_all(name.as_bytes()).await.is_ok() {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    Ok(addr)
}

/// Connects through the balancer and returns the greeting, with the connection still open.
async fn visit(addr: SocketAddr) -> std::io::Result<(String, TcpStream)> {
    let mut s = TcpStream::connect(addr).await?;
    let mut name = [0u8; 5];
    s.read_exact(&mut name).await?;
    Ok((String::from_utf8_lossy(&name).into_owned(), s))
}

fn show(handle: &BalancerHandle, when: &str) {
    println!("-- {when}");
    for b in handle.backends() {
        println!(
            "   {:<8} {:<16} weight {} admin {:<5} active {} total {}{}",
            b.id,
            b.addr.to_string(),
            b.weight,
            b.admin.as_str(),
            b.active,
            b.total,
            if b.removing {
                " (removed, draining)"
            } else {
                ""
            },
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (a, b, c) = (
        backend("alpha").await?,
        backend("bravo").await?,
        backend("delta").await?,
    );
    let config = BalancerConfig::new([
        BackendConfig::new(a).with_id("alpha"),
        BackendConfig::new(b).with_id("bravo"),
    ])
    .strategy(Strategy::LeastConnections);
    let balancer = TcpBalancer::new(config)?;
    let handle = balancer.handle();
    let listener = ulb_tcp::bind("127.0.0.1:0".parse()?)?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(balancer.serve(listener, std::future::pending()));

    // Every change, as it happens.
    let mut events = handle.events();
    let watcher = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Ok(e) => println!("   event: {e:?}"),
                Err(lagged) => println!("   {lagged}"),
            }
        }
    });

    let (first, held) = visit(addr).await?;
    show(&handle, &format!("one client held on {first}"));

    // A third backend joins, with twice the share.
    handle.add_backend(BackendConfig::new(c).with_id("delta").with_weight(2))?;
    let (next, _) = visit(addr).await?;
    show(
        &handle,
        &format!("delta added; the next client went to {next}"),
    );

    // Maintenance on the held client's backend: no new connections, the held one carries on.
    handle.set_admin_state(&first, AdminState::Drain)?;
    show(&handle, &format!("{first} drained"));

    // Remove it for good; its last connection has 2 s to finish before it is reset.
    let drain = handle.remove_backend(&first, Duration::from_secs(2))?;
    show(&handle, &format!("{first} removed"));
    let report = drain.await;
    println!("   drain: {report:?}");
    drop(held);

    // A reload: the set becomes exactly this list; kept ids keep their counts, new ones start fresh.
    let (replaced, drained) = handle.replace_backends(
        vec![
            BackendConfig::new(b).with_id("bravo").with_weight(3),
            BackendConfig::new(a).with_id("alpha"),
        ],
        Duration::from_secs(5),
    )?;
    println!("   replaced: {replaced:?}");
    drained.await;
    show(&handle, "after the replace");

    handle.shutdown();
    let report = server.await??;
    println!("stopped: {report:?}");
    watcher.abort();
    Ok(())
}
