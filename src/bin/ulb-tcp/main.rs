//! The `ulb-tcp` command: parses flags, sets up logging and metrics, binds, and hands over to the library.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::process::ExitCode;

use clap::Parser;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::runtime::Builder;
use tracing_subscriber::EnvFilter;

use ulb_tcp::{BalancerHandle, ShutdownReport, TcpBalancer};

mod cli;

use cli::{BalancerArgs, Cli, ClusterArgs, LogFormat, RuntimeArg};

/// Bad flags or values.
const EXIT_USAGE: u8 = 2;
/// The balancer could not start (listen address in use, metrics address in use, ...).
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line naming the bad value: clap's first paragraph, joined, without its usage hints.
            let text = e.to_string();
            let first = text.split("\n\n").next().unwrap_or("bad arguments");
            let line = first.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("ulb-tcp: {}", line.trim_start_matches("error: "));
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Some(cli::Subcommand::Cluster(args)) = cli.command {
        return cluster_main(args);
    }
    let cli = cli.balancer;
    init_logging(cli.log_format);
    let fd_limit = raise_fd_limit();

    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN));
    let mut builder = match cli.runtime {
        // Per-core: this runtime only waits for signals, resolves names, serves /metrics and runs the
        // drain; the serving threads run runtimes of their own.
        RuntimeArg::PerCore => Builder::new_current_thread(),
        RuntimeArg::WorkStealing => {
            let mut b = Builder::new_multi_thread();
            b.worker_threads(threads.get());
            b
        }
    };
    let runtime = match runtime(&mut builder) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(run(cli, threads, fd_limit))
}

async fn run(cli: BalancerArgs, threads: NonZeroUsize, fd_limit: Option<u64>) -> ExitCode {
    let listen = cli.listen;
    let metrics = cli.metrics;
    let mode = cli.runtime;
    let config = match cli.into_config(fd_limit).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ulb-tcp: {}", cli::in_flag_words(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(code) = install_metrics(metrics) {
        return code;
    }
    let backends: Vec<String> = config
        .backends
        .iter()
        .map(|b| format!("{}={}@{}", b.id, b.addr, b.weight))
        .collect();
    let balancer = match TcpBalancer::new(config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("ulb-tcp: {}", cli::in_flag_words(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let listeners = match Listeners::bind(listen, mode, threads) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ulb-tcp: cannot listen on {listen}: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let c = balancer.config();
    tracing::info!(
        listen = %listen,
        ?backends,
        strategy = %c.strategy,
        copy_mode = ?c.copy_mode,
        connect_timeout = ?c.connect_timeout,
        idle_timeout = ?c.idle_timeout,
        drain_timeout = ?c.drain_timeout,
        max_connections = c.max_connections,
        runtime = ?mode,
        threads,
        "ulb-tcp {} starting",
        env!("CARGO_PKG_VERSION")
    );
    match listeners.serve(balancer).await {
        Ok(_) if FORCED.load(Ordering::Relaxed) => ExitCode::from(EXIT_FAILURE),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ulb-tcp: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The bound listening socket(s), for the runtime chosen.
enum Listeners {
    /// One listener, served by the work-stealing runtime.
    One(tokio::net::TcpListener),
    /// One SO_REUSEPORT listener per serving thread.
    #[cfg(target_os = "linux")]
    PerCore(ulb_tcp::PerCoreListeners),
}

impl Listeners {
    fn bind(listen: SocketAddr, mode: RuntimeArg, threads: NonZeroUsize) -> io::Result<Self> {
        match mode {
            RuntimeArg::WorkStealing => ulb_tcp::bind(listen).map(Listeners::One),
            #[cfg(target_os = "linux")]
            RuntimeArg::PerCore => {
                ulb_tcp::PerCoreListeners::bind(listen, threads).map(Listeners::PerCore)
            }
            #[cfg(not(target_os = "linux"))]
            RuntimeArg::PerCore => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("--runtime per-core needs Linux ({threads} threads asked)"),
            )),
        }
    }

    async fn serve(self, balancer: TcpBalancer) -> io::Result<ShutdownReport> {
        let handle = balancer.handle();
        match self {
            Listeners::One(l) => balancer.serve(l, shutdown_signal(handle)).await,
            #[cfg(target_os = "linux")]
            Listeners::PerCore(l) => balancer.serve_per_core(l, shutdown_signal(handle)).await,
        }
    }
}

/// `ulb-tcp cluster`: checks everything (exit 2 on bad input, before any worker starts), then supervises.
fn cluster_main(args: ClusterArgs) -> ExitCode {
    let (config, command, metrics, log_format) = args.into_parts();
    if let Err(e) = config.validate() {
        eprintln!("ulb-tcp: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(e) = command.resolve() {
        eprintln!("ulb-tcp: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    init_logging(log_format);
    raise_fd_limit();
    let runtime = match runtime(&mut Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        if let Err(code) = install_metrics(metrics) {
            return code;
        }
        let cluster = match ulb_tcp::cluster::Cluster::new(config, command) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ulb-tcp: {e}");
                return ExitCode::from(if e.is_config() {
                    EXIT_USAGE
                } else {
                    EXIT_FAILURE
                });
            }
        };
        match cluster.run_with_signals().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ulb-tcp: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

/// Set by a second signal: the balancer was stopped at once, and the command exits 1.
static FORCED: AtomicBool = AtomicBool::new(false);

/// Resolves on the first SIGINT or SIGTERM. A second one resets every connection still open (a client
/// must never take a cut stream for a complete one) and the command exits 1 as soon as they are closed.
async fn shutdown_signal(handle: BalancerHandle) {
    ulb_tcp::signal::stop_then_force(
        "shutdown signal received; draining (send it again to exit at once)",
        "second signal; resetting the connections still open and exiting",
        move || {
            FORCED.store(true, Ordering::Relaxed);
            handle.force_shutdown();
        },
    )
    .await;
}

/// Serves Prometheus metrics on `addr`, if given; the exit code after saying why it cannot.
fn install_metrics(addr: Option<SocketAddr>) -> Result<(), ExitCode> {
    let Some(addr) = addr else {
        return Ok(());
    };
    if let Err(e) = ulb_tcp::metrics::install_prometheus(addr) {
        eprintln!("ulb-tcp: {e}");
        return Err(ExitCode::from(EXIT_FAILURE));
    }
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

/// The runtime `builder` describes, or the exit code after saying why it cannot start.
fn runtime(builder: &mut Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("ulb-tcp: cannot start the runtime: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Raises the soft limit on open files to the hard limit, as HAProxy does (every connection holds two),
/// and returns the limit in force.
#[cfg(unix)]
fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer, which lives on this stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            } else {
                tracing::warn!("cannot raise the open-file limit");
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every Unix
    Some(lim.rlim_cur as u64)
}

#[cfg(not(unix))]
fn raise_fd_limit() -> Option<u64> {
    None
}
