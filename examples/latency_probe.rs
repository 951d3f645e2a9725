//! A small load and latency probe for `benches/compare.py`: an echo server, an open-loop latency load
//! and a connection holder, all on Tokio and nothing else.
//!
//! ```text
//! cargo run --release --example latency_probe -- echo-server --listen 127.0.0.1:9000
//! cargo run --release --example latency_probe -- load --target 127.0.0.1:9000 --rate 5000 \
//!     --connections 10 --seconds 4 --size 64
//! cargo run --release --example latency_probe -- hold --target 127.0.0.1:9000 --connections 10000
//! ```
//!
//! `load` sends `--size`-byte messages at a fixed total rate spread over `--connections` connections,
//! each on its own schedule, reads every echo back and prints one JSON line:
//! `{"p50_us":…,"p99_us":…,"p999_us":…,"max_us":…,"count":…,"errors":…,"rate":…}`.
//!
//! Coordinated omission: a message that could not be sent on time because the connection was still
//! waiting for the previous echo is timed from its *intended* send time, so a stall is charged to every
//! message it delayed. A message that is late only because the generator's timer fired late (Tokio's
//! timer has a 1 ms tick) is timed from its actual send, so timer granularity is not counted as latency.
//!
//! `hold` opens `--connections` connections, sends a few bytes on each and reads the echo, prints
//! `ready N` (N connections established and verified) and then holds them until it is killed.
//!
//! Every error ends the program with one line on stderr and exit status 1.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Echo server, fixed-rate latency load and connection holder for the benchmark harness.
#[derive(Debug, Parser)]
#[command(name = "latency_probe")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Echo every byte received back to the sender, on any number of connections.
    EchoServer {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
    },
    /// Send fixed-size messages at a fixed total rate, time each echo, print percentiles as JSON.
    Load {
        /// Address of the echo server (or of a balancer in front of it).
        #[arg(long, value_name = "ADDR")]
        target: SocketAddr,
        /// Total messages per second, spread evenly over the connections.
        #[arg(long, default_value_t = 5000)]
        rate: u32,
        /// Connections, each with its own share of the rate.
        #[arg(long, default_value_t = 10)]
        connections: u32,
        /// Seconds measured (after the warm-up).
        #[arg(long, default_value_t = 4.0)]
        seconds: f64,
        /// Warm-up seconds, sent at the same rate but not recorded.
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
        /// Bytes per message.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Open N connections, verify each with a small echo, print "ready N", hold them until killed.
    Hold {
        /// Address of the echo server (or of a balancer in front of it).
        #[arg(long, value_name = "ADDR")]
        target: SocketAddr,
        /// Connections to open and hold.
        #[arg(long, default_value_t = 10_000)]
        connections: u32,
        /// Connects in flight at once while opening.
        #[arg(long, default_value_t = 64)]
        parallel: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread is plenty for the rates used here and leaves the other cores to the system measured.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("latency_probe: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::EchoServer { listen } => echo_server(listen).await,
            Command::Load {
                target,
                rate,
                connections,
                seconds,
                warmup,
                size,
            } => load(target, rate, connections, seconds, warmup, size).await,
            Command::Hold {
                target,
                connections,
                parallel,
            } => hold(target, connections, parallel).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latency_probe: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn echo_server(listen: SocketAddr) -> Result<(), BoxError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (mut socket, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: say so, back off a little, keep serving.
                eprintln!("latency_probe: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if socket.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// What one load connection measured.
#[derive(Default)]
struct ConnResult {
    samples_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

async fn load(
    target: SocketAddr,
    rate: u32,
    connections: u32,
    seconds: f64,
    warmup: f64,
    size: usize,
) -> Result<(), BoxError> {
    if rate == 0 || connections == 0 || size == 0 {
        return Err("--rate, --connections and --size must be at least 1".into());
    }
    if !(seconds > 0.0 && seconds.is_finite() && warmup >= 0.0 && warmup.is_finite()) {
        return Err("--seconds must be positive and --warmup not negative".into());
    }
    // Each connection sends every `interval`; connections are staggered evenly within one interval.
    let interval = Duration::from_secs_f64(f64::from(connections) / f64::from(rate));
    let base = Instant::now() + Duration::from_millis(50);
    let record_from = base + Duration::from_secs_f64(warmup);
    let end = record_from + Duration::from_secs_f64(seconds);

    let mut tasks = Vec::with_capacity(connections as usize);
    for i in 0..connections {
        let offset = interval.mul_f64(f64::from(i) / f64::from(connections));
        let stream = TcpStream::connect(target)
            .await
            .map_err(|e| format!("cannot connect to {target}: {e}"))?;
        stream.set_nodelay(true)?;
        tasks.push(tokio::spawn(run_connection(
            stream,
            target,
            base + offset,
            interval,
            record_from,
            end,
            size,
        )));
    }

    let mut samples = Vec::new();
    let mut errors = 0u64;
    let mut first_error = None;
    for task in tasks {
        let r = task.await.map_err(|e| format!("a load task failed: {e}"))?;
        samples.extend(r.samples_ns);
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    if samples.is_empty() {
        return Err(format!(
            "no message came back from {target} ({errors} errors{})",
            first_error
                .map(|e| format!(", first: {e}"))
                .unwrap_or_default()
        )
        .into());
    }
    samples.sort_unstable();
    let pct = |p: f64| -> f64 {
        let idx = ((p / 100.0) * (samples.len() as f64)).ceil() as usize;
        let idx = idx.clamp(1, samples.len()) - 1;
        samples[idx] as f64 / 1000.0
    };
    let max = samples[samples.len() - 1] as f64 / 1000.0;
    println!(
        "{{\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\"count\":{},\"errors\":{},\"rate\":{:.1}}}",
        pct(50.0),
        pct(99.0),
        pct(99.9),
        max,
        samples.len(),
        errors,
        samples.len() as f64 / seconds
    );
    if let Some(e) = first_error {
        eprintln!("latency_probe: {errors} errors, first: {e}");
    }
    Ok(())
}

async fn run_connection(
    mut stream: TcpStream,
    target: SocketAddr,
    first: Instant,
    interval: Duration,
    record_from: Instant,
    end: Instant,
    size: usize,
) -> ConnResult {
    let mut result = ConnResult::default();
    let msg = vec![b'x'; size];
    let mut buf = vec![0u8; size];
    let mut intended = first;
    let mut last_done = Instant::now();
    while intended < end {
        // Busy with the previous echo past this slot: the system held us up, time from the slot.
        // Otherwise wait for the slot and time from the actual send (the timer's tick is not latency).
        let start = if last_done > intended {
            intended
        } else {
            tokio::time::sleep_until(intended).await;
            Instant::now()
        };
        let outcome = async {
            stream.write_all(&msg).await?;
            stream.read_exact(&mut buf).await?;
            Ok::<(), std::io::Error>(())
        }
        .await;
        let done = Instant::now();
        match outcome {
            Ok(()) => {
                if intended >= record_from {
                    let ns = done.saturating_duration_since(start).as_nanos();
                    result
                        .samples_ns
                        .push(u64::try_from(ns).unwrap_or(u64::MAX));
                }
            }
            Err(e) => {
                result.errors += 1;
                if result.first_error.is_none() {
                    result.first_error = Some(e.to_string());
                }
                // Reconnect and carry on with the schedule; skip the slots spent reconnecting.
                match TcpStream::connect(target).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        stream = s;
                    }
                    Err(e) => {
                        result.errors += 1;
                        if result.first_error.is_none() {
                            result.first_error = Some(format!("reconnect: {e}"));
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                let now = Instant::now();
                while intended <= now {
                    intended += interval;
                }
                last_done = now;
                continue;
            }
        }
        last_done = done;
        intended += interval;
    }
    result
}

async fn hold(target: SocketAddr, connections: u32, parallel: u32) -> Result<(), BoxError> {
    let parallel = parallel.max(1);
    let mut held: Vec<TcpStream> = Vec::with_capacity(connections as usize);
    let mut remaining = connections;
    while remaining > 0 {
        let batch = remaining.min(parallel);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            set.spawn(async move {
                let mut s = TcpStream::connect(target).await?;
                s.set_nodelay(true)?;
                s.write_all(b"hold").await?;
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await?;
                Ok::<TcpStream, std::io::Error>(s)
            });
        }
        while let Some(joined) = set.join_next().await {
            let stream = joined
                .map_err(|e| format!("a connect task failed: {e}"))?
                .map_err(|e| {
                    format!(
                        "connection {} of {connections} to {target}: {e}",
                        held.len() + 1
                    )
                })?;
            held.push(stream);
        }
        remaining -= batch;
    }
    println!("ready {}", held.len());
    std::future::pending::<()>().await;
    drop(held);
    Ok(())
}
