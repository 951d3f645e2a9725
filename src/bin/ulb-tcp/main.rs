//! The `ulb-tcp` command: parses flags, sets up logging and metrics, binds, and hands over to the library.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::process::ExitCode;

use std::sync::atomic::{AtomicBool, Ordering};
use tokio::runtime::Builder;
use tracing_subscriber::EnvFilter;

use tokio_util::sync::CancellationToken;
use ulb_tcp::admin::{AdminOptions, AdminServer, Services};
use ulb_tcp::signal::StopSignals;
use ulb_tcp::{BalancerHandle, ShutdownReport, TcpBalancer};

mod cli;
mod ctl;
mod file;
mod fleet;

use clap::{CommandFactory, FromArgMatches};
use cli::{AdminArgs, BalancerArgs, Cli, ClusterArgs, LogFormat, RuntimeArg};

/// Bad flags or values.
const EXIT_USAGE: u8 = 2;
/// The balancer could not start (listen address in use, admin address in use, ...).
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) if e.use_stderr() => {
            eprintln!("ulb-tcp: {}", cli::usage_error_line(&e));
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match cli.command {
        Some(cli::Subcommand::Cluster(args)) => return cluster_main(args),
        Some(cli::Subcommand::Check(args)) => return check_main(&args.file),
        Some(cli::Subcommand::Ctl(args)) => return ctl::main(args),
        None => {}
    }
    if let Some(path) = cli.config {
        // With a file, the flags of a service belong in the file.
        let given: Vec<String> = matches
            .ids()
            .filter(|id| !matches!(id.as_str(), "config" | "log_format"))
            .filter(|id| {
                matches.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| format!("--{}", id.as_str().replace('_', "-")))
            .collect();
        if let Some(flag) = given.first() {
            eprintln!(
                "ulb-tcp: {flag} cannot be given with --config: set {} in the file",
                flag.trim_start_matches("--").replace('-', "_")
            );
            return ExitCode::from(EXIT_USAGE);
        }
        let log_format = (matches.value_source("log_format")
            == Some(clap::parser::ValueSource::CommandLine))
        .then_some(cli.balancer.log_format);
        return file_main(&path, log_format);
    }
    let cli = cli.balancer;
    init_logging(cli.log_format);
    let fd_limit = raise_fd_limit();

    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN));
    let runtime = match control_runtime(cli.runtime, threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(run(cli, threads, fd_limit))
}

async fn run(cli: BalancerArgs, threads: NonZeroUsize, fd_limit: Option<u64>) -> ExitCode {
    let listen = cli.listen;
    let admin = cli.admin.clone();
    let mode = cli.runtime;
    let config = match cli.into_config(fd_limit).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ulb-tcp: {}", cli::in_flag_words(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Before anything listens: a signal that comes as soon as a port accepts must start the drain,
    // not take its default action (which ends the process on the spot).
    let signals = StopSignals::install();
    // The metrics recorder goes in before the balancer is built (its handles bind to it).
    let admin_server = match bind_admin(&admin) {
        Ok(a) => a,
        Err(code) => return code,
    };
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
        max_pipes = c.max_pipes,
        runtime = ?mode,
        threads,
        "ulb-tcp {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let services = Services::new();
    if let Err(e) = services.insert("default", balancer.handle()) {
        eprintln!("ulb-tcp: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let admin = RunningAdmin::start(admin_server, services);
    let served = listeners.serve(balancer, signals).await;
    // The admin server answers through the drain (/healthz says 503), and stops once it is over.
    admin.stop().await;
    match served {
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

    async fn serve(
        self,
        balancer: TcpBalancer,
        signals: StopSignals,
    ) -> io::Result<ShutdownReport> {
        let stop = shutdown_signal(balancer.handle(), signals);
        match self {
            Listeners::One(l) => balancer.serve(l, stop).await,
            #[cfg(target_os = "linux")]
            Listeners::PerCore(l) => balancer.serve_per_core(l, stop).await,
        }
    }
}

/// `ulb-tcp cluster`: checks everything (exit 2 on bad input, before any worker starts), then supervises.
fn cluster_main(args: ClusterArgs) -> ExitCode {
    let (config, command, admin, log_format) = args.into_parts();
    if let Err(e) = config.validate() {
        eprintln!("ulb-tcp: {}", cli::cluster_in_flag_words(&e));
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(e) = command.resolve() {
        eprintln!("ulb-tcp: {}", cli::cluster_in_flag_words(&e));
        return ExitCode::from(EXIT_USAGE);
    }
    init_logging(log_format);
    raise_fd_limit();
    let runtime = match runtime(&mut Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        // Caught before the admin port listens (see `run`).
        let signals = StopSignals::install();
        let admin_server = match bind_admin(&admin) {
            Ok(a) => a,
            Err(code) => return code,
        };
        let cluster = match ulb_tcp::cluster::Cluster::new(config, command) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ulb-tcp: {}", cli::cluster_in_flag_words(&e));
                return ExitCode::from(if e.is_config() {
                    EXIT_USAGE
                } else {
                    EXIT_FAILURE
                });
            }
        };
        let services = Services::new();
        if let Some(balancer) = cluster.handle().balancer() {
            if let Err(e) = services.insert("default", balancer) {
                eprintln!("ulb-tcp: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
        let admin = RunningAdmin::start(admin_server, services);
        let result = cluster.run_with(signals).await;
        admin.stop().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ulb-tcp: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

/// `ulb-tcp check FILE`: 0 when the file would load, 2 with `FILE:LINE: message` when not.
fn check_main(path: &std::path::Path) -> ExitCode {
    let runtime = match runtime(&mut Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(file::load(path, raise_fd_limit())) {
        Ok(config) => {
            let backends: usize = config
                .services
                .iter()
                .map(|s| s.config.backends.len())
                .sum();
            let listeners: usize = config.services.iter().map(|s| s.listen.len()).sum();
            println!(
                "{}: ok ({} services, {listeners} listeners, {backends} backends; hash {:08x})",
                path.display(),
                config.services.len(),
                config.hash
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ulb-tcp: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// A reload asked through the admin API, and where its answer goes.
type ReloadRequest = tokio::sync::oneshot::Sender<Result<serde_json::Value, String>>;

/// `ulb-tcp --config FILE`: the file's services, on one work-stealing runtime, reloaded on SIGHUP and
/// `POST /api/v1/reload`.
fn file_main(path: &std::path::Path, log_format: Option<LogFormat>) -> ExitCode {
    let fd_limit = raise_fd_limit();
    // Read before logging starts and before the runtime is sized: both come from the file.
    let loaded = match Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(file::load(path, fd_limit)),
        Err(e) => {
            eprintln!("ulb-tcp: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ulb-tcp: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(log_format.or(config.log_format).unwrap_or(LogFormat::Text));
    let threads = config
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN));
    let mode = config.runtime.unwrap_or(RuntimeArg::DEFAULT);
    let runtime = match control_runtime(mode, threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let serving = match mode {
        RuntimeArg::WorkStealing => fleet::Serving::Runtime,
        #[cfg(target_os = "linux")]
        RuntimeArg::PerCore => match ulb_tcp::ServingThreads::start(threads) {
            Ok(t) => fleet::Serving::PerCore(std::sync::Arc::new(t)),
            Err(e) => {
                eprintln!("ulb-tcp: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        },
        #[cfg(not(target_os = "linux"))]
        RuntimeArg::PerCore => fleet::Serving::Runtime,
    };
    runtime.block_on(run_file(path.to_path_buf(), config, fd_limit, serving))
}

async fn run_file(
    path: std::path::PathBuf,
    config: file::FileConfig,
    fd_limit: Option<u64>,
    serving: fleet::Serving,
) -> ExitCode {
    let signals = StopSignals::install();
    #[cfg(unix)]
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot catch SIGHUP; reload through the admin API only");
            None
        }
    };
    let (reload_tx, mut reloads) = tokio::sync::mpsc::channel::<ReloadRequest>(8);
    let options = AdminOptions::new().reload(move || {
        let tx = reload_tx.clone();
        Box::pin(async move {
            let (answer, answered) = tokio::sync::oneshot::channel();
            tx.send(answer)
                .await
                .map_err(|_| "the balancer is shutting down".to_string())?;
            answered
                .await
                .map_err(|_| "the balancer is shutting down".to_string())?
        })
    });
    let process = Process::of(&config);
    let admin_server = match bind_admin_with(&process.admin, options) {
        Ok(a) => a,
        Err(code) => return code,
    };
    tracing::info!(
        config = %path.display(),
        services = config.services.len(),
        hash = format!("{:08x}", config.hash),
        "ulb-tcp {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let services = Services::new();
    let mut fleet = match fleet::Fleet::start(config, services.clone(), serving.clone()).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ulb-tcp: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let admin = RunningAdmin::start(admin_server, services);
    let stop = signals.stop_then_force(
        "shutdown signal received; draining every service (send it again to exit at once)",
        "second signal; resetting the connections still open and exiting",
        {
            let live = fleet.live();
            move || {
                FORCED.store(true, Ordering::Relaxed);
                for h in live.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    h.force_shutdown();
                }
            }
        },
    );
    tokio::pin!(stop);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match &mut hangups {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            () = &mut stop => break,
            Some(()) = hangup => {
                tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
                let _ = reload(&mut fleet, &path, fd_limit, &process).await;
            }
            Some(answer) = reloads.recv() => {
                tracing::info!(config = %path.display(), "admin API: reloading the configuration");
                let _ = answer.send(reload(&mut fleet, &path, fd_limit, &process).await);
            }
        }
    }
    fleet.shutdown().await;
    // Every service has drained: the serving threads have nothing left to carry.
    #[cfg(target_os = "linux")]
    if let fleet::Serving::PerCore(threads) = serving {
        if let Ok(threads) = std::sync::Arc::try_unwrap(threads) {
            threads.stop().await;
        }
    }
    admin.stop().await;
    if FORCED.load(Ordering::Relaxed) {
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}

/// What of a file applies to the whole process, and only at start.
struct Process {
    admin: AdminArgs,
    log_format: Option<LogFormat>,
    threads: Option<NonZeroUsize>,
    runtime: Option<RuntimeArg>,
}

impl Process {
    fn of(config: &file::FileConfig) -> Process {
        Process {
            admin: config.admin.clone(),
            log_format: config.log_format,
            threads: config.threads,
            runtime: config.runtime,
        }
    }

    /// The keys of `config` that differ from these, which a reload cannot apply.
    fn changed_in(&self, config: &file::FileConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if config.admin.addr() != self.admin.addr() {
            keys.push("admin.listen");
        }
        if config.admin.admin_token_file != self.admin.admin_token_file {
            keys.push("admin.token_file");
        }
        if config.log_format != self.log_format {
            keys.push("log_format");
        }
        if config.threads != self.threads {
            keys.push("threads");
        }
        if config.runtime != self.runtime {
            keys.push("runtime");
        }
        keys
    }
}

/// Reads `path` again and applies it; the old configuration goes on serving if it is not valid.
async fn reload(
    fleet: &mut fleet::Fleet,
    path: &std::path::Path,
    fd_limit: Option<u64>,
    process: &Process,
) -> Result<serde_json::Value, String> {
    let config = match file::load(path, fd_limit).await {
        Ok(c) => c,
        Err(e) => {
            let why = e.to_string();
            fleet::Fleet::refused(&why);
            return Err(why);
        }
    };
    let restart = process.changed_in(&config);
    let mut report = fleet.reload(config).await?;
    if let (false, Some(obj)) = (restart.is_empty(), report.as_object_mut()) {
        tracing::warn!(keys = ?restart, "process-wide keys changed: they apply at the next restart");
        obj.insert("restart_needed".into(), serde_json::json!(restart));
    }
    Ok(report)
}

/// Set by a second signal: the balancer was stopped at once, and the command exits 1.
static FORCED: AtomicBool = AtomicBool::new(false);

/// Resolves on the first SIGINT or SIGTERM. A second one resets every connection still open (a client
/// must never take a cut stream for a complete one) and the command exits 1 as soon as they are closed.
async fn shutdown_signal(handle: BalancerHandle, signals: StopSignals) {
    signals
        .stop_then_force(
            "shutdown signal received; draining (send it again to exit at once)",
            "second signal; resetting the connections still open and exiting",
            move || {
                FORCED.store(true, Ordering::Relaxed);
                handle.force_shutdown();
            },
        )
        .await;
}

/// With `--admin` (or `--metrics`): reads the token file, installs the Prometheus recorder and binds the
/// admin port (`AdminServer::bind` refuses a non-loopback one without a token before it binds anything);
/// `None` without. Else the exit code, after saying why: 2 for what was asked (no token, a bad token
/// file), 1 for the system (the address in use).
fn bind_admin(args: &AdminArgs) -> Result<Option<AdminServer>, ExitCode> {
    bind_admin_with(args, AdminOptions::new())
}

/// [`bind_admin`] with `options` to start from (a reload hook).
fn bind_admin_with(
    args: &AdminArgs,
    options: AdminOptions,
) -> Result<Option<AdminServer>, ExitCode> {
    let Some(addr) = args.addr() else {
        return Ok(None);
    };
    let fail = |e: ulb_tcp::admin::AdminError| {
        eprintln!("ulb-tcp: {}", cli::admin_in_flag_words(&e));
        ExitCode::from(if e.is_config() {
            EXIT_USAGE
        } else {
            EXIT_FAILURE
        })
    };
    let mut options = options;
    if let Some(path) = &args.admin_token_file {
        options = options.token_file(path).map_err(fail)?;
    }
    let handle = ulb_tcp::metrics::install_prometheus().map_err(|e| {
        eprintln!("ulb-tcp: {e}");
        ExitCode::from(EXIT_FAILURE)
    })?;
    AdminServer::bind(addr, options.metrics(handle))
        .map(Some)
        .map_err(fail)
}

/// The admin server's task, and what stops it.
struct RunningAdmin(Option<(tokio::task::JoinHandle<io::Result<()>>, CancellationToken)>);

impl RunningAdmin {
    fn start(server: Option<AdminServer>, services: Services) -> Self {
        RunningAdmin(server.map(|server| {
            let stop = CancellationToken::new();
            let task = tokio::spawn(server.serve(services, stop.clone().cancelled_owned()));
            (task, stop)
        }))
    }

    async fn stop(self) {
        let Some((task, stop)) = self.0 else {
            return;
        };
        stop.cancel();
        match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "admin server failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "admin server task failed"),
            Err(_) => tracing::warn!("admin server did not stop within 5s"),
        }
    }
}

/// The runtime the command runs on. Per-core: it only waits for signals, resolves names, runs the
/// admin server, reloads, checks and drains; the serving threads run runtimes of their own.
/// Work-stealing: `threads` threads that carry the connections too.
fn control_runtime(
    mode: RuntimeArg,
    threads: NonZeroUsize,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = match mode {
        RuntimeArg::PerCore => Builder::new_current_thread(),
        RuntimeArg::WorkStealing => {
            let mut b = Builder::new_multi_thread();
            b.worker_threads(threads.get());
            b
        }
    };
    runtime(&mut builder)
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

/// Raises the soft limit on open files to the hard limit, as HAProxy does (every connection holds two,
/// and a spliced direction two more for its pipe), and returns the limit in force, from which the
/// defaults of --max-connections and --max-pipes are drawn.
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
