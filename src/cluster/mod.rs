//! Cluster: supervise N worker processes of any program, optionally behind the balancer.
//!
//! A [`Cluster`] starts `processes` copies of a command (by default the current executable with its own
//! arguments, so one binary can be both supervisor and worker), tells each who it is through the
//! environment, restarts the ones that exit (with a doubling back-off, giving up on a crash loop), and on
//! request replaces them one at a time (a *rolling restart*) without dropping a connection.
//!
//! With the balancer on ([`ClusterConfig::balancer`]) the workers are its backends: worker `i` must listen
//! on `127.0.0.1:(base_port + i)`. A worker takes traffic only once its port accepts connections, and is
//! taken out of rotation the moment its process exits, before it is restarted.
//!
//! # Worker identity
//!
//! Each worker gets [`ENV_WORKER_ID`] (`0..N`), [`ENV_WORKER_PORT`] and [`ENV_PORT`] (both
//! `base_port + id`) and [`ENV_CLUSTER_SIZE`]; `{id}` and `{port}` in the command's arguments are replaced
//! too. Worker code reads them with [`worker_id`], [`worker_port`], [`is_worker`] and [`is_cluster_mode`].
//!
//! # Life of a worker
//!
//! ```text
//!  starting ──port accepts──► running ──exits──► backoff ──delay──► starting …
//!     │                          │                  └─ more than max_restarts crashes in window ─► given_up
//!     └──────── rolling restart / shutdown ─────────► stopping ──► starting (restart) / stopped (shutdown)
//! ```
//!
//! # Example
//!
//! ```no_run
//! use ulb_tcp::cluster::{self, Cluster, ClusterConfig, WorkerCommand};
//!
//! # async fn serve_http(_port: u16) {}
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     if let Some(port) = cluster::worker_port() {
//!         serve_http(port).await; // a worker: serve on 127.0.0.1:port
//!         return Ok(());
//!     }
//!     let config = ClusterConfig::new().base_port(8081).balancer("127.0.0.1:3000".parse()?);
//!     let cluster = Cluster::new(config, WorkerCommand::current_exe()?)?;
//!     cluster.run_with_signals().await?; // SIGTERM/SIGINT stop, SIGHUP rolls
//!     Ok(())
//! }
//! ```
//!
//! Unix only: signals, process groups and (on Linux) the parent-death signal. Elsewhere workers are
//! started and killed, without a graceful SIGTERM.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{HealthCheck, OnDown};
use crate::{BackendConfig, BalancerConfig, BalancerHandle, ConfigError, Strategy, TcpBalancer};

mod output;
mod ports;
mod supervisor;
mod sys;

/// Environment variable holding the worker's index, `0..N`.
pub const ENV_WORKER_ID: &str = "ULB_WORKER_ID";
/// Environment variable holding the port the worker should listen on (`base_port + id`).
pub const ENV_WORKER_PORT: &str = "ULB_WORKER_PORT";
/// The conventional `PORT`, set to the same value as [`ENV_WORKER_PORT`].
pub const ENV_PORT: &str = "PORT";
/// Environment variable holding the number of workers in the cluster.
pub const ENV_CLUSTER_SIZE: &str = "ULB_CLUSTER_SIZE";

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// This process's worker index, when it was started as a cluster worker.
pub fn worker_id() -> Option<usize> {
    env_parse(ENV_WORKER_ID)
}

/// The port this worker should listen on (on 127.0.0.1), when it was started as a cluster worker.
pub fn worker_port() -> Option<u16> {
    env_parse(ENV_WORKER_PORT)
}

/// The number of workers in the cluster this process runs under.
pub fn cluster_size() -> Option<usize> {
    env_parse(ENV_CLUSTER_SIZE)
}

/// True when this process is a cluster worker: it has a valid worker id and port.
pub fn is_worker() -> bool {
    worker_id().is_some() && worker_port().is_some()
}

/// True when this process runs under a cluster supervisor: a worker, or a process a worker started (the
/// environment is inherited). Unlike [`is_worker`] it only needs [`ENV_CLUSTER_SIZE`].
pub fn is_cluster_mode() -> bool {
    cluster_size().is_some()
}

/// The most worker processes one cluster supervises.
pub const MAX_PROCESSES: usize = 4096;

/// When and how often a worker that exits is restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestartPolicy {
    /// Delay before the first restart (default 100 ms); it doubles with each crash.
    pub initial_backoff: Duration,
    /// The longest delay (default 30 s).
    pub max_backoff: Duration,
    /// A worker that stayed up this long before it exited starts again from `initial_backoff`
    /// (default 10 s).
    pub reset_after: Duration,
    /// More than this many crashes within `window` (default 5) and the worker is given up.
    pub max_restarts: u32,
    /// See `max_restarts` (default 60 s).
    pub window: Duration,
}

impl RestartPolicy {
    /// The same policy, giving a worker up after more than `max_restarts` crashes within `window`.
    pub fn give_up_after(mut self, max_restarts: u32, window: Duration) -> Self {
        self.max_restarts = max_restarts;
        self.window = window;
        self
    }

    /// The same policy with these restart delays: the first, and the longest it doubles up to.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
            max_restarts: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// When a started worker counts as running (and, with the balancer, starts taking connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadyCheck {
    /// [`Port`](ReadyCheck::Port) with the balancer on, [`Spawned`](ReadyCheck::Spawned) without.
    #[default]
    Auto,
    /// Once `127.0.0.1:port` accepts a connection (polled every [`ClusterConfig::ready_poll_interval`]).
    Port,
    /// As soon as the process is started: for workers that serve no port.
    Spawned,
}

/// How a [`Cluster`] runs. Build it with [`ClusterConfig::new`] and the chained setters; every field is
/// public too.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// Number of worker processes (default: the number of CPUs).
    pub processes: usize,
    /// Worker `i` listens on `base_port + i` (default 8081).
    pub base_port: u16,
    /// Run the balancer on this address with the workers as its backends; `None` (the default)
    /// supervises only.
    pub listen: Option<SocketAddr>,
    /// The balancer's strategy (default round robin).
    pub strategy: Strategy,
    /// Restarts, back-off and crash loops.
    pub restart: RestartPolicy,
    /// How long a rolling restart waits for a worker's connections to finish, and how long a shutdown
    /// lets the balancer drain (default 30 s).
    pub drain_timeout: Duration,
    /// After SIGTERM, how long a worker may take to exit before it gets SIGKILL (default 10 s).
    pub kill_timeout: Duration,
    /// When a started worker counts as running.
    pub ready_check: ReadyCheck,
    /// How often a starting worker's port is tried (default 20 ms).
    pub ready_poll_interval: Duration,
    /// How long a rolling restart waits for a replacement to accept before it stops with an error
    /// (default 60 s). The worker itself keeps being supervised.
    pub ready_timeout: Duration,
    /// The balancer's [`BalancerConfig::replay_limit`] (default 64 KiB): a client whose worker dies
    /// before answering is carried to another worker with the bytes it sent. 0 turns it off, for
    /// workers that must never see a request twice.
    pub replay_limit: usize,
    /// Active health checks of the workers, by the balancer (default none). A worker takes connections
    /// only once it runs, owns its port and passes them; one that stops answering them leaves the
    /// rotation, and the supervisor reports it.
    pub check: Option<HealthCheck>,
    /// What a worker marked down means for its open connections (default: they are kept).
    pub on_down: OnDown,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            processes: std::thread::available_parallelism().map_or(1, |n| n.get()),
            base_port: 8081,
            listen: None,
            strategy: Strategy::RoundRobin,
            restart: RestartPolicy::default(),
            drain_timeout: Duration::from_secs(30),
            kill_timeout: Duration::from_secs(10),
            ready_check: ReadyCheck::Auto,
            ready_poll_interval: Duration::from_millis(20),
            ready_timeout: Duration::from_secs(60),
            replay_limit: 64 * 1024,
            check: None,
            on_down: OnDown::Keep,
        }
    }
}

impl ClusterConfig {
    /// The defaults: one worker per CPU from port 8081, no balancer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the number of worker processes.
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = n;
        self
    }

    /// Sets the first worker's port.
    pub fn base_port(mut self, port: u16) -> Self {
        self.base_port = port;
        self
    }

    /// Runs the balancer on `listen` in front of the workers.
    pub fn balancer(mut self, listen: SocketAddr) -> Self {
        self.listen = Some(listen);
        self
    }

    /// Sets the balancer's strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets the restart policy.
    pub fn restart(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// Sets the drain timeout.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Sets the kill timeout.
    pub fn kill_timeout(mut self, d: Duration) -> Self {
        self.kill_timeout = d;
        self
    }

    /// Sets how many bytes of a client's request may be replayed to another worker (0: never).
    pub fn replay_limit(mut self, bytes: usize) -> Self {
        self.replay_limit = bytes;
        self
    }

    /// Sets when a started worker counts as running.
    pub fn ready_check(mut self, check: ReadyCheck) -> Self {
        self.ready_check = check;
        self
    }

    /// The port of worker `id`.
    pub fn worker_port(&self, id: usize) -> u16 {
        (usize::from(self.base_port) + id) as u16
    }

    /// Whether workers are considered running only once their port accepts.
    pub fn checks_port(&self) -> bool {
        match self.ready_check {
            ReadyCheck::Auto => self.listen.is_some(),
            ReadyCheck::Port => true,
            ReadyCheck::Spawned => false,
        }
    }

    /// Checks the values; the error names the bad one.
    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.processes == 0 {
            return Err(ClusterError::NoProcesses);
        }
        if self.base_port == 0 {
            return Err(ClusterError::BasePortZero);
        }
        if self.processes > MAX_PROCESSES {
            return Err(ClusterError::TooManyProcesses {
                processes: self.processes,
            });
        }
        let last = usize::from(self.base_port) + self.processes - 1;
        if last > usize::from(u16::MAX) {
            return Err(ClusterError::PortRange {
                base_port: self.base_port,
                processes: self.processes,
            });
        }
        let r = &self.restart;
        let durations = [
            ("drain timeout", self.drain_timeout, Duration::ZERO),
            ("kill timeout", self.kill_timeout, Duration::ZERO),
            (
                "ready poll interval",
                self.ready_poll_interval,
                Duration::from_millis(1),
            ),
            (
                "ready timeout",
                self.ready_timeout,
                Duration::from_millis(1),
            ),
            (
                "restart initial back-off",
                r.initial_backoff,
                Duration::ZERO,
            ),
            ("restart max back-off", r.max_backoff, Duration::ZERO),
            ("restart reset-after", r.reset_after, Duration::ZERO),
            ("restart window", r.window, Duration::ZERO),
        ];
        for (what, value, min) in durations {
            if value < min || value > crate::config::MAX_DURATION {
                return Err(ClusterError::Duration { what, value, min });
            }
        }
        // Checked here too, not only by the balancer (which runs only with `listen`): a value out of
        // range is refused whether or not it is used.
        if self.replay_limit > crate::config::MAX_REPLAY {
            return Err(ClusterError::Balancer(ConfigError::out_of_range(
                "replay_limit",
                self.replay_limit,
                "0 to 16 MiB",
            )));
        }
        if self.check.is_some() && self.listen.is_none() {
            return Err(ClusterError::ChecksNeedBalancer);
        }
        if let Some(listen) = self.listen {
            let p = usize::from(listen.port());
            if p >= usize::from(self.base_port) && p <= last {
                return Err(ClusterError::ListenCollides {
                    listen,
                    first: self.base_port,
                    last: last as u16,
                });
            }
        }
        Ok(())
    }

    /// Checks the workers with `check` (through the balancer, which must be on).
    pub fn check(mut self, check: HealthCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// Sets what a worker marked down means for its open connections.
    pub fn on_down(mut self, on_down: OnDown) -> Self {
        self.on_down = on_down;
        self
    }

    /// The balancer's configuration: one weight-1 backend per worker at `127.0.0.1:(base_port + id)`, the
    /// strategy, drain timeout and replay limit from here, and a short passive-health back-off (1 s),
    /// since the supervisor takes exited workers out of rotation itself.
    pub fn balancer_config(&self) -> BalancerConfig {
        let backends = (0..self.processes).map(|id| {
            let addr = SocketAddr::from(([127, 0, 0, 1], self.worker_port(id)));
            BackendConfig::new(addr)
        });
        let config = BalancerConfig::new(backends)
            .strategy(self.strategy)
            .drain_timeout(self.drain_timeout)
            .replay_limit(self.replay_limit)
            .on_down(self.on_down)
            .health(crate::PassiveHealth {
                backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
                ..crate::PassiveHealth::default()
            });
        match &self.check {
            Some(check) => config.check(check.clone()),
            None => config,
        }
    }
}

/// The program the workers run, and its arguments (`{id}` and `{port}` are replaced per worker).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerCommand {
    /// A path, or a name looked up on `PATH`.
    pub program: OsString,
    /// Arguments; `{id}` and `{port}` in them are replaced by the worker's id and port.
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// `program` with no arguments.
    pub fn new(program: impl Into<OsString>) -> Self {
        WorkerCommand {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// Appends an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The current executable with this process's own arguments: the workers run the same program, and
    /// tell themselves apart with [`is_worker`].
    pub fn current_exe() -> Result<Self, ClusterError> {
        let exe = std::env::current_exe().map_err(ClusterError::CurrentExe)?;
        Ok(WorkerCommand::new(exe).args(std::env::args_os().skip(1)))
    }

    /// Finds the program (on `PATH` when it has no `/`) and checks that it is an executable file.
    pub fn resolve(&self) -> Result<PathBuf, ClusterError> {
        let program = Path::new(&self.program);
        let not_found = || ClusterError::CommandNotFound {
            program: self.program.to_string_lossy().into_owned(),
        };
        if self.program.is_empty() {
            return Err(not_found());
        }
        if program.components().count() > 1 || program.is_absolute() {
            return if program.exists() {
                check_executable(program).map(|()| program.to_path_buf())
            } else {
                Err(not_found())
            };
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut first_not_executable = None;
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(program);
            if candidate.is_file() {
                match check_executable(&candidate) {
                    Ok(()) => return Ok(candidate),
                    Err(e) => {
                        first_not_executable.get_or_insert(e);
                    }
                }
            }
        }
        Err(first_not_executable.unwrap_or_else(not_found))
    }

    /// The arguments for worker `id` on `port`.
    fn args_for(&self, id: usize, port: u16) -> Vec<OsString> {
        self.args
            .iter()
            .map(|a| match a.to_str() {
                Some(s) if s.contains("{id}") || s.contains("{port}") => OsString::from(
                    s.replace("{id}", &id.to_string())
                        .replace("{port}", &port.to_string()),
                ),
                _ => a.clone(),
            })
            .collect()
    }
}

fn check_executable(path: &Path) -> Result<(), ClusterError> {
    let bad = || ClusterError::NotExecutable {
        program: path.display().to_string(),
    };
    let meta = std::fs::metadata(path).map_err(|_| bad())?;
    if !meta.is_file() {
        return Err(bad());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(bad());
        }
    }
    Ok(())
}

/// What went wrong. Configuration errors name the bad value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Zero processes.
    #[error("the number of processes must be at least 1, not 0")]
    NoProcesses,
    /// Base port 0.
    #[error("base port 0 is not a port workers can listen on")]
    BasePortZero,
    /// `base_port + processes - 1` is past 65535.
    #[error("base port {base_port} with {processes} processes needs ports past 65535")]
    PortRange {
        /// The base port.
        base_port: u16,
        /// The number of processes.
        processes: usize,
    },
    /// More processes than [`MAX_PROCESSES`].
    #[error("{processes} processes is more than {MAX_PROCESSES}")]
    TooManyProcesses {
        /// The number asked for.
        processes: usize,
    },
    /// A duration out of its range.
    #[error("{what} {value:?} is out of range ({min:?} to 24 days)")]
    Duration {
        /// Which one.
        what: &'static str,
        /// The value given.
        value: Duration,
        /// The least allowed.
        min: Duration,
    },
    /// Health checks were asked for without the balancer, which runs them.
    #[error("health checks of the workers need the balancer (--listen)")]
    ChecksNeedBalancer,
    /// A worker port is held by another process before any worker started.
    #[error("worker port {port} is already in use{}", holder_words(.holder))]
    PortTaken {
        /// The port.
        port: u16,
        /// The process holding it, when the system tells: its pid and name.
        holder: Option<(u32, String)>,
    },
    /// The balancer's port is one of the workers'.
    #[error("listen address {listen} collides with the worker ports {first}-{last}")]
    ListenCollides {
        /// The balancer's address.
        listen: SocketAddr,
        /// The first worker port.
        first: u16,
        /// The last worker port.
        last: u16,
    },
    /// The program is not on `PATH` or does not exist.
    #[error("command '{program}' not found")]
    CommandNotFound {
        /// The program as given.
        program: String,
    },
    /// The program exists but cannot be executed.
    #[error("command '{program}' is not executable")]
    NotExecutable {
        /// The program's path.
        program: String,
    },
    /// The current executable could not be found.
    #[error("cannot find the current executable: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// The balancer's configuration was refused.
    #[error(transparent)]
    Balancer(#[from] ConfigError),
    /// The balancer's address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Every worker crash-looped and was given up.
    #[error("every worker ({processes}) was given up after crashing repeatedly")]
    AllGivenUp {
        /// The number of workers.
        processes: usize,
    },
    /// A rolling restart's replacement for a worker did not come up.
    #[error("rolling restart stopped: worker {worker}'s replacement {reason}")]
    RollingRestart {
        /// The worker.
        worker: usize,
        /// What happened.
        reason: String,
    },
    /// The cluster is not running (not started yet, or shutting down).
    #[error("the cluster is not running")]
    NotRunning,
}

fn holder_words(holder: &Option<(u32, String)>) -> String {
    match holder {
        Some((pid, name)) => format!(" by {name} (pid {pid})"),
        None => String::new(),
    }
}

impl ClusterError {
    /// True for errors in the configuration or command (bad input), as opposed to failures at run time.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ClusterError::NoProcesses
                | ClusterError::BasePortZero
                | ClusterError::PortRange { .. }
                | ClusterError::TooManyProcesses { .. }
                | ClusterError::ChecksNeedBalancer
                | ClusterError::Duration { .. }
                | ClusterError::ListenCollides { .. }
                | ClusterError::CommandNotFound { .. }
                | ClusterError::NotExecutable { .. }
                | ClusterError::Balancer(_)
        )
    }
}

/// A worker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Started (or being started); not yet accepting.
    Starting,
    /// Running and, with a port check, accepting.
    Running,
    /// Exited; waiting out the back-off before the next start.
    Backoff,
    /// Being drained and stopped (rolling restart or shutdown).
    Stopping,
    /// Crash-looped; not restarted again (a rolling restart gives it another chance).
    GivenUp,
    /// Stopped by the shutdown.
    Stopped,
}

impl WorkerState {
    /// Every state, in the order above.
    pub const ALL: [WorkerState; 6] = [
        WorkerState::Starting,
        WorkerState::Running,
        WorkerState::Backoff,
        WorkerState::Stopping,
        WorkerState::GivenUp,
        WorkerState::Stopped,
    ];

    /// The `state` label of `ulb_worker_states`: `starting`, `running`, `backoff`, `stopping`,
    /// `given_up`, `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Running => "running",
            WorkerState::Backoff => "backoff",
            WorkerState::Stopping => "stopping",
            WorkerState::GivenUp => "given_up",
            WorkerState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point-in-time view of one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// The worker's index.
    pub id: usize,
    /// Its port.
    pub port: u16,
    /// Its state.
    pub state: WorkerState,
    /// The current process's id, while there is one.
    pub pid: Option<u32>,
    /// Restarts after unexpected exits so far (rolling restarts are not counted).
    pub restarts: u64,
    /// Processes started for this worker so far, the first included.
    pub starts: u64,
    /// With health checks: whether its checks pass now (`None` without checks, or before its first
    /// verdict). A worker whose checks fail takes no new connections, though its process runs.
    pub healthy: Option<bool>,
}

/// Commands from the handle to a worker's task.
#[derive(Debug)]
enum WorkerCmd {
    /// Replace the process (drain, stop, start, wait until it accepts); the reply says how it went.
    Restart(oneshot::Sender<Result<(), String>>),
}

/// State shared by the supervisor, the worker tasks and every handle.
#[derive(Debug)]
struct Shared {
    config: ClusterConfig,
    status: watch::Sender<Vec<WorkerStatus>>,
    balancer: Option<BalancerHandle>,
    /// Fired by [`ClusterHandle::shutdown`].
    shutdown: CancellationToken,
    /// Fired when the workers must stop (after the balancer has drained).
    stop_workers: CancellationToken,
    /// Fired to skip the waits of a graceful stop (SIGKILL at once).
    hard_stop: CancellationToken,
    cmds: Vec<mpsc::Sender<WorkerCmd>>,
    rolling: tokio::sync::Mutex<()>,
    metrics: supervisor::ClusterMetrics,
}

impl Shared {
    fn update(&self, id: usize, f: impl FnOnce(&mut WorkerStatus)) {
        self.status.send_modify(|all| {
            if let Some(w) = all.get_mut(id) {
                f(w);
            }
            self.metrics.publish_states(all);
        });
    }
}

/// A supervisor of worker processes. See the [module documentation](self).
#[derive(Debug)]
pub struct Cluster {
    shared: Arc<Shared>,
    command: WorkerCommand,
    program: PathBuf,
    balancer: Option<TcpBalancer>,
    receivers: Vec<mpsc::Receiver<WorkerCmd>>,
}

/// Watches and steers a [`Cluster`]: worker states, rolling restarts, shutdown. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    shared: Arc<Shared>,
}

impl Cluster {
    /// Checks the configuration and the command (it must resolve to an executable file) and, with the
    /// balancer on, builds it with every backend out of rotation. Install a metrics recorder first if you
    /// want metrics. Nothing is started until [`run`](Cluster::run).
    pub fn new(config: ClusterConfig, command: WorkerCommand) -> Result<Self, ClusterError> {
        config.validate()?;
        let program = command.resolve()?;
        let balancer = match config.listen {
            Some(_) => {
                let balancer = TcpBalancer::new(config.balancer_config())?;
                let handle = balancer.handle();
                for b in handle.backends() {
                    let _ = handle.set_admin_state(&b.id, crate::AdminState::Maint);
                }
                Some(balancer)
            }
            None => None,
        };
        let status = (0..config.processes)
            .map(|id| WorkerStatus {
                id,
                port: config.worker_port(id),
                state: WorkerState::Starting,
                pid: None,
                restarts: 0,
                starts: 0,
                healthy: None,
            })
            .collect::<Vec<_>>();
        let metrics = supervisor::ClusterMetrics::register(config.processes);
        metrics.publish_states(&status);
        let (cmds, receivers) = (0..config.processes).map(|_| mpsc::channel(4)).unzip();
        let shared = Shared {
            status: watch::Sender::new(status),
            balancer: balancer.as_ref().map(TcpBalancer::handle),
            shutdown: CancellationToken::new(),
            stop_workers: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            cmds,
            rolling: tokio::sync::Mutex::new(()),
            metrics,
            config,
        };
        Ok(Cluster {
            shared: Arc::new(shared),
            command,
            program,
            balancer,
            receivers,
        })
    }

    /// A handle for states, rolling restarts and shutdown.
    pub fn handle(&self) -> ClusterHandle {
        ClusterHandle {
            shared: self.shared.clone(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &ClusterConfig {
        &self.shared.config
    }

    /// Binds the balancer (if any), starts every worker and supervises them until `shutdown` completes
    /// or [`ClusterHandle::shutdown`] is called. Then the balancer stops accepting and drains (up to the
    /// drain timeout) while the workers still serve, and only then every worker gets SIGTERM (SIGKILL
    /// after the kill timeout) and is reaped.
    ///
    /// Returns [`ClusterError::Bind`] if the balancer's address cannot be bound (before any worker
    /// starts), and [`ClusterError::AllGivenUp`] once every worker has been given up.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ClusterError> {
        supervisor::run(self, shutdown).await
    }

    /// [`run`](Cluster::run) until SIGINT or SIGTERM; SIGHUP starts a rolling restart. A second
    /// SIGINT/SIGTERM skips the drain and kills the workers at once. Without Unix signals: until Ctrl-C.
    pub async fn run_with_signals(self) -> Result<(), ClusterError> {
        // Caught from now on, before any port is bound or worker started: an early signal drains too.
        self.run_with(crate::signal::StopSignals::install()).await
    }

    /// [`run_with_signals`](Cluster::run_with_signals), with the stop signals a caller installed
    /// earlier, before it bound ports of its own (an admin server, say): a signal that came meanwhile
    /// starts the shutdown as soon as this runs.
    pub async fn run_with(self, signals: crate::signal::StopSignals) -> Result<(), ClusterError> {
        let handle = self.handle();
        #[cfg(unix)]
        let hup = tokio::spawn(sys::rolling_restart_on_sighup(handle.clone()));
        let result = self.run(sys::stop_signal(handle, signals)).await;
        #[cfg(unix)]
        hup.abort();
        result
    }
}

impl ClusterHandle {
    /// Every worker's state, by id.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.shared.status.borrow().clone()
    }

    /// Resolves once `done` holds for the worker states (checked now and after every change).
    pub async fn wait_for(&self, mut done: impl FnMut(&[WorkerStatus]) -> bool) {
        let mut rx = self.shared.status.subscribe();
        let _ = rx.wait_for(|w| done(w)).await;
    }

    /// The balancer's handle, when the balancer is on.
    pub fn balancer(&self) -> Option<BalancerHandle> {
        self.shared.balancer.clone()
    }

    /// The balancer's bound address, once it is serving.
    pub fn balancer_addr(&self) -> Option<SocketAddr> {
        self.shared.balancer.as_ref().and_then(|b| b.local_addr())
    }

    /// The configuration in force.
    pub fn config(&self) -> &ClusterConfig {
        &self.shared.config
    }

    /// Starts the graceful shutdown, as if `run`'s shutdown future had completed.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Skips the remaining waits of a shutdown: the balancer's drain is cut short and workers get SIGKILL
    /// at once. Also starts the shutdown if it had not begun.
    pub fn force_shutdown(&self) {
        self.shared.hard_stop.cancel();
        self.shared.shutdown.cancel();
    }

    /// Replaces every worker, one at a time: take it out of the balancer, wait until its connections
    /// finish (or the drain timeout), SIGTERM it (SIGKILL after the kill timeout), start its replacement,
    /// wait until that accepts, put it back. Given-up workers are started again too. Only one rolling
    /// restart runs at a time; a second call waits for the first.
    ///
    /// Stops at the first worker whose replacement does not come up (so that a broken new version does
    /// not replace every worker), with [`ClusterError::RollingRestart`].
    pub async fn rolling_restart(&self) -> Result<(), ClusterError> {
        let _one_at_a_time = self.shared.rolling.lock().await;
        let c = &self.shared.config;
        let limit = c.drain_timeout + c.kill_timeout * 2 + c.ready_timeout;
        tracing::info!(workers = c.processes, "rolling restart starting");
        for (id, cmd) in self.shared.cmds.iter().enumerate() {
            if self.shared.shutdown.is_cancelled() {
                return Err(ClusterError::NotRunning);
            }
            let (tx, rx) = oneshot::channel();
            cmd.send(WorkerCmd::Restart(tx))
                .await
                .map_err(|_| ClusterError::NotRunning)?;
            let fail = |reason: String| ClusterError::RollingRestart { worker: id, reason };
            match tokio::time::timeout(limit, rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(reason))) => return Err(fail(reason)),
                Ok(Err(_)) => return Err(ClusterError::NotRunning),
                Err(_) => return Err(fail(format!("did not accept within {limit:?}"))),
            }
        }
        tracing::info!(workers = c.processes, "rolling restart done");
        Ok(())
    }
}

/// Crash times within the restart window.
#[derive(Debug, Default)]
struct CrashLog(VecDeque<tokio::time::Instant>);

impl CrashLog {
    /// Records a crash now; returns how many fall within `window`.
    fn record(&mut self, window: Duration) -> usize {
        let now = tokio::time::Instant::now();
        self.0.push_back(now);
        while self
            .0
            .front()
            .is_some_and(|&t| now.duration_since(t) > window)
        {
            self.0.pop_front();
        }
        self.0.len()
    }
}

fn display_args(program: &Path, args: &[OsString]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(&OsStr::to_string_lossy(a));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_values() {
        let c = ClusterConfig::new().processes(0);
        assert!(matches!(c.validate(), Err(ClusterError::NoProcesses)));
        let c = ClusterConfig::new().processes(4).base_port(65534);
        assert!(c.validate().unwrap_err().to_string().contains("65534"));
        let c = ClusterConfig::new().processes(2).base_port(65534);
        assert!(c.validate().is_ok());
        let c = ClusterConfig::new()
            .processes(4)
            .base_port(8081)
            .balancer("127.0.0.1:8084".parse().unwrap());
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("127.0.0.1:8084") && e.contains("8081-8084"),
            "{e}"
        );
        // What the balancer would refuse is refused without one too.
        let c = ClusterConfig::new().processes(2).replay_limit(17 << 20);
        let e = c.validate().unwrap_err();
        assert!(e.is_config() && e.to_string().contains("17825792"), "{e}");
        let c = ClusterConfig::new().processes(MAX_PROCESSES + 1);
        assert!(matches!(
            c.validate(),
            Err(ClusterError::TooManyProcesses { .. })
        ));
        let c = ClusterConfig::new().processes(usize::MAX);
        assert!(matches!(
            c.validate(),
            Err(ClusterError::TooManyProcesses { .. })
        ));
    }

    #[test]
    fn placeholders_are_replaced() {
        let c = WorkerCommand::new("x").args(["--port={port}", "{id}", "plain"]);
        assert_eq!(c.args_for(3, 9000), ["--port=9000", "3", "plain"]);
    }

    #[test]
    fn commands_are_resolved() {
        assert!(WorkerCommand::new("sh").resolve().is_ok());
        let e = WorkerCommand::new("no-such-program-ulb").resolve();
        assert!(matches!(e, Err(ClusterError::CommandNotFound { .. })));
        let file = std::env::temp_dir().join(format!("ulb-not-exec-{}", std::process::id()));
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        let e = WorkerCommand::new(file.as_os_str()).resolve();
        let _ = std::fs::remove_file(&file);
        assert!(
            matches!(e, Err(ClusterError::NotExecutable { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn crash_log_keeps_the_window() {
        let mut log = CrashLog::default();
        assert_eq!(log.record(Duration::from_secs(60)), 1);
        assert_eq!(log.record(Duration::from_secs(60)), 2);
        assert_eq!(log.record(Duration::ZERO), 1);
    }
}
