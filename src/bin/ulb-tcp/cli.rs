//! Command-line flags (first layer) and their conversion into a validated `BalancerConfig` (second layer).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use std::ffi::OsString;

use clap::{Parser, ValueEnum};
use ulb_tcp::cluster::{ClusterConfig, ClusterError, RestartPolicy, WorkerCommand, MAX_PROCESSES};
use ulb_tcp::edge::{AcceptProxy, IpNet, ProxyVersion};
use ulb_tcp::{
    BackendSpec, BalancerConfig, CheckMode, ConfigError, CopyMode, HealthCheck, OnDown,
    PassiveHealth, Strategy, MAX_THREADS,
};

const EXAMPLES: &str = "\
Examples:
  ulb-tcp --listen 127.0.0.1:3000 --backends 127.0.0.1:8081,127.0.0.1:8082
  ulb-tcp --config /etc/ulb-tcp/ulb.toml        (several services; SIGHUP reloads the file)
  ulb-tcp check /etc/ulb-tcp/ulb.toml           (exit 0, or 2 with FILE:LINE: message)
  ulb-tcp cluster -p 4 --base-port 8081 --listen 127.0.0.1:3000 -- python3 -m http.server {port}
  ulb-tcp --listen 0.0.0.0:6379 --backends redis-a:6379@3 --backends redis-b:6379 \\
          --strategy least-connections --idle-timeout 1h --admin 127.0.0.1:9100

Durations take a unit: 250ms, 3s, 5m, 1h (a bare number is seconds).
Exit status: 0 after a graceful shutdown, 2 for bad flags or values, 1 when the balancer cannot start
(for example the listen address is in use). On SIGINT/SIGTERM it stops accepting, drains connections
in flight up to --drain-timeout and exits 0; a second signal exits at once with status 1.
Logs go to stderr; RUST_LOG (for example RUST_LOG=ulb_tcp=debug) overrides the level.";

/// A Layer-4 TCP load balancer: accepts TCP connections and splices each to a backend.
///
/// Without a subcommand it runs the balancer (`ulb-tcp --backends ...`); `ulb-tcp cluster` supervises
/// worker processes, optionally behind the balancer.
#[derive(Debug, Parser)]
#[command(
    name = "ulb-tcp",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// A subcommand; none runs the balancer.
    #[command(subcommand)]
    pub command: Option<Subcommand>,

    /// Run the services of a TOML configuration file (see ulb.example.toml) instead of one service from
    /// flags; SIGHUP or `POST /api/v1/reload` reloads it. Every balancer flag is a key of a
    /// `[[services]]` table; only --log-format may be given with it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// The balancer's flags (without a subcommand).
    #[command(flatten)]
    pub balancer: BalancerArgs,
}

/// Subcommands.
// Parsed once at start: the size of the larger variant costs nothing worth a Box.
#[derive(Debug, clap::Subcommand)]
#[allow(clippy::large_enum_variant)]
pub enum Subcommand {
    /// Supervise N worker processes of any program, optionally behind the balancer.
    #[command(after_help = CLUSTER_EXAMPLES)]
    Cluster(ClusterArgs),
    /// Check a configuration file without running it: exit 0 if it would load, 2 with FILE:LINE:
    /// message if not. Host names are resolved; nothing is bound.
    Check(CheckFileArgs),
    /// Talk to a running balancer's admin API: status, drain, ready, maint, weight, add, remove, reload.
    #[command(after_help = crate::ctl::CTL_EXAMPLES, arg_required_else_help = false)]
    Ctl(crate::ctl::CtlArgs),
}

/// `ulb-tcp check` arguments.
#[derive(Debug, clap::Args)]
pub struct CheckFileArgs {
    /// The TOML configuration file.
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
}

const CLUSTER_EXAMPLES: &str = "\
Examples:
  ulb-tcp cluster -p 4 --base-port 8081 --listen 127.0.0.1:3000 -- python3 -m http.server {port}
  ulb-tcp cluster -p 2 --base-port 9000 -- ./my-server --port {port} --name worker-{id}

Worker i gets ULB_WORKER_ID=i, ULB_WORKER_PORT=PORT=base+i and ULB_CLUSTER_SIZE; {id} and {port} in
the arguments are replaced. A worker that exits is restarted after 100ms, doubling to 30s (reset once
it stayed up 10s); more than --max-restarts crashes within --restart-window and it is given up; when
every worker is given up the command exits 1. SIGTERM/SIGINT: the balancer drains, then every worker
gets SIGTERM (SIGKILL after --kill-timeout), exit 0. SIGHUP: rolling restart, one worker at a time,
drained first. Output lines of worker i are prefixed with [worker i].";

/// `ulb-tcp cluster` flags.
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Number of worker processes. Default: the number of CPUs.
    #[arg(long, short = 'p', value_name = "N", value_parser = parse_count::<usize>, allow_hyphen_values = true)]
    pub processes: Option<usize>,

    /// Worker i listens on BASE+i (given as ULB_WORKER_PORT and PORT, and as {port} in the arguments).
    #[arg(long, value_name = "PORT", default_value_t = 8081)]
    pub base_port: u16,

    /// Run the balancer on ADDR with the workers as its backends. Without it, only supervise.
    #[arg(long, short = 'l', value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// How the balancer chooses a worker for each connection: round-robin, least-connections, random or
    /// p2c.
    #[arg(
        long,
        short = 's',
        value_name = "STRATEGY",
        default_value = "round-robin"
    )]
    pub strategy: Strategy,

    /// The admin HTTP server: metrics, health probes and the JSON API.
    #[command(flatten)]
    pub admin: AdminArgs,

    /// How long a rolling restart waits for a worker's connections, and a shutdown for the balancer's.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub drain_timeout: Duration,

    /// After SIGTERM, how long a worker may take to exit before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub kill_timeout: Duration,

    /// Crashes within --restart-window after which a worker is given up.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = parse_count::<u32>, allow_hyphen_values = true)]
    pub max_restarts: u32,

    /// See --max-restarts.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub restart_window: Duration,

    /// Keep up to BYTES of what a client sends until its worker answers; if the worker dies (or closes)
    /// before its first byte, send them to another worker instead (0: off, for workers that must never
    /// see a request twice).
    #[arg(long, value_name = "BYTES", default_value = "64k", value_parser = parse_size, allow_hyphen_values = true)]
    pub replay_limit: usize,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Active health checks of the workers (with --listen): a worker takes connections only once they
    /// pass, and one that stops answering them (hung, SIGSTOPped) leaves the rotation.
    #[command(flatten)]
    pub checks: CheckArgs,

    /// The workers' command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

impl ClusterArgs {
    /// The cluster's configuration and the workers' command (not yet validated).
    pub fn into_parts(self) -> (ClusterConfig, WorkerCommand, AdminArgs, LogFormat) {
        let mut config = ClusterConfig::new()
            .base_port(self.base_port)
            .strategy(self.strategy)
            .drain_timeout(self.drain_timeout)
            .kill_timeout(self.kill_timeout)
            .replay_limit(self.replay_limit)
            .restart(
                RestartPolicy::default().give_up_after(self.max_restarts, self.restart_window),
            );
        if let Some(n) = self.processes {
            config = config.processes(n);
        }
        if let Some(listen) = self.listen {
            config = config.balancer(listen);
        }
        let check = self.checks.health_check();
        if check.is_on() {
            config = config.check(check);
        }
        config = config.on_down(self.checks.on_down);
        let mut parts = self.command.into_iter();
        let program = parts.next().unwrap_or_default();
        let command = WorkerCommand::new(program).args(parts);
        (config, command, self.admin, self.log_format)
    }
}

/// The balancer's flags.
#[derive(Debug, clap::Args)]
pub struct BalancerArgs {
    /// Address to accept clients on.
    #[arg(
        long,
        short = 'l',
        value_name = "ADDR",
        default_value = "127.0.0.1:3000"
    )]
    pub listen: SocketAddr,

    /// Backends as HOST:PORT, comma-separated; the flag may repeat. Host names are resolved at start.
    /// A weight (1-256, default 1) follows an '@': `app-1:8080@3` takes three times the share of a
    /// weight-1 backend. Example: --backends 10.0.0.1:80@2,10.0.0.2:80
    #[arg(long, short = 'b', value_name = "LIST", value_delimiter = ',')]
    pub backends: Vec<BackendSpec>,

    /// Backup backends, HOST:PORT[@WEIGHT], comma-separated, repeatable: used only while no backend of
    /// --backends may be picked (all down, out of rotation, at their cap, or already tried by the client),
    /// as HAProxy's `backup`.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub backup: Vec<BackendSpec>,

    /// At most N connections at once to each backend (HAProxy's `maxconn`); when every backend that may
    /// be picked is at its cap, clients wait in a FIFO queue (--max-queue, --queue-timeout).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub backend_max_connections: Option<u32>,

    /// Clients that may wait for a backend below its cap; past it they are closed at once.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        allow_hyphen_values = true
    )]
    pub max_queue: usize,

    /// How long a client may wait for a backend below its cap before it is closed.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub queue_timeout: Duration,

    /// A backend that joins, or comes back up, ramps its weight from near 0 to full over this long, with
    /// every strategy (0: off).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub slow_start: Duration,

    /// Linux TCP_DEFER_ACCEPT: hand a client to the balancer only once its first bytes have arrived, or
    /// this long after its handshake (whole seconds, rounded up; at most 10m; 0: off). For protocols in
    /// which the client speaks first (HTTP, Redis, TLS): one wake-up less per connection, and silent
    /// clients hold no slot. Keep it off when the server speaks first (SMTP, MySQL, FTP).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub defer_accept: Duration,

    /// How to choose a backend for each connection: round-robin (weighted, smooth), least-connections
    /// (fewest active per unit of weight), random (weighted) or p2c (the less loaded of two random picks).
    #[arg(
        long,
        short = 's',
        value_name = "STRATEGY",
        default_value = "round-robin"
    )]
    pub strategy: Strategy,

    /// Longest time one connect to a backend may take before another backend is tried.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub connect_timeout: Duration,

    /// Backends tried per client connection (each a different one) before the client is closed.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = parse_count::<u32>, allow_hyphen_values = true)]
    pub connect_attempts: u32,

    /// Close both sides of a connection that carried no bytes either way for this long.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration, allow_hyphen_values = true)]
    pub idle_timeout: Duration,

    /// Once one side has half-closed (sent FIN), close both if the other stays silent this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub half_close_timeout: Duration,

    /// Connections carried at once; further clients wait in the kernel's accept backlog. Each holds two
    /// descriptors, and two more for each direction that holds a splice pipe (see --max-pipes). Default:
    /// of the open-file limit L, 64 are kept for the process; three quarters of the rest go to
    /// connections, at two each, (L - 64) * 3/8, at most 100000 (360 at L = 1024); the last quarter is
    /// left to pipes.
    #[arg(long, value_name = "N", value_parser = parse_count::<usize>, allow_hyphen_values = true)]
    pub max_connections: Option<usize>,

    /// Splice pipes open at once, in use and pooled (two descriptors each); past it, a direction carries
    /// its bytes through a buffer instead (never a reset). 0 turns splicing off. Default: what the
    /// open-file limit L leaves after 64 for the process and two per connection, (L - 64 - 2 *
    /// max-connections) / 2, at most 100000; at L = 1024 with the default --max-connections, 120.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub max_pipes: Option<usize>,

    /// On SIGINT/SIGTERM, how long connections in flight may take to finish before they are closed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub drain_timeout: Duration,

    /// Consecutive failed connects that take a backend out of rotation (passive health).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = parse_count::<u32>, allow_hyphen_values = true)]
    pub fail_threshold: u32,

    /// How long a failing backend stays out of rotation; doubles while it keeps failing, up to 60s.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub down_backoff: Duration,

    /// The admin HTTP server: metrics, health probes and the JSON API.
    #[command(flatten)]
    pub admin: AdminArgs,

    /// How bytes are moved: `auto` (pooled, and splice for bulk transfers on Linux), `pooled` (buffers
    /// borrowed only while data is in flight), `splice` (Linux zero-copy through pooled pipes) or `plain`
    /// (Tokio's copy_bidirectional, the benchmark baseline; it does not enforce the idle and half-close
    /// timeouts).
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub copy_mode: CopyMode,

    /// Buffer per direction while data is in flight, in the auto and pooled modes, and in splice for
    /// the bytes that get no pipe (bytes; k and m suffixes).
    #[arg(long, value_name = "BYTES", default_value = "64k", value_parser = parse_size, allow_hyphen_values = true)]
    pub buffer_size: usize,

    /// Keep up to BYTES of what a client sends until its backend answers; if the backend closes or
    /// resets before its first byte, send them to another backend instead (0: off). Only for backends
    /// where a request that got no answer may be delivered twice.
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_size, allow_hyphen_values = true)]
    pub replay_limit: usize,

    /// How connections are spread over threads: `per-core` (each thread runs its own single-threaded
    /// runtime and accepts on its own listener; the kernel spreads clients over the listeners with
    /// SO_REUSEPORT; Linux only) or `work-stealing` (one Tokio runtime whose threads share the work).
    #[arg(long, value_enum, default_value_t = RuntimeArg::DEFAULT)]
    pub runtime: RuntimeArg,

    /// Threads that carry connections, in either runtime. Default: the number of CPUs.
    #[arg(long, value_name = "N", value_parser = parse_threads, allow_hyphen_values = true)]
    pub threads: Option<NonZeroUsize>,

    /// Send a PROXY protocol header (`v1` text or `v2` binary) first on every backend connection,
    /// retries and replays included: the client's address, and the address it connected to.
    #[arg(long, value_name = "VERSION")]
    pub send_proxy: Option<ProxyVersion>,

    /// With --send-proxy v2: carry on the TLVs of the v2 header that the client's connection came with.
    #[arg(long, requires = "send_proxy")]
    pub send_proxy_tlvs: bool,

    /// Open each active health check with a PROXY header of the --send-proxy version, speaking for no
    /// client (v1 `PROXY UNKNOWN`, v2 `LOCAL`), like HAProxy's check-send-proxy.
    #[arg(long, requires = "send_proxy")]
    pub check_send_proxy: bool,

    /// Accept PROXY protocol headers (v1 or v2) from these sources only (CIDR networks or addresses,
    /// IPv4 or IPv6). The header's client address is the client's from then on. A header from any
    /// other source closes the connection.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_cidr)]
    pub accept_proxy_from: Vec<IpNet>,

    /// `required` (a trusted source that sends no header is closed) or `optional`.
    #[arg(long, value_enum, default_value_t = AcceptProxyArg::Required, requires = "accept_proxy_from")]
    pub accept_proxy: AcceptProxyArg,

    /// How long a trusted source may take to send its whole PROXY header.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub accept_proxy_timeout: Duration,

    /// Carry only clients from these networks (CIDR or addresses, IPv4 or IPv6; a v4-mapped IPv6 client
    /// matches its IPv4 network). Checked on the client's address, from its PROXY header when one was
    /// accepted, before any backend is touched.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_cidr)]
    pub allow: Vec<IpNet>,

    /// Refuse clients from these networks, even when --allow lists them.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_cidr)]
    pub deny: Vec<IpNet>,

    /// Concurrent connections per client source, at most (an IPv6 source is its --ipv6-prefix network).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub max_connections_per_ip: Option<u32>,

    /// New connections per second per client source, at most, with a burst of as many.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub rate_per_ip: Option<u32>,

    /// IPv6 client sources are grouped by this prefix for the per-source limits (1 to 128).
    #[arg(
        long,
        value_name = "LEN",
        default_value_t = 64,
        allow_hyphen_values = true
    )]
    pub ipv6_prefix: u8,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Active health checks.
    #[command(flatten)]
    pub checks: CheckArgs,
}

/// Whether a trusted source must send a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AcceptProxyArg {
    /// It must: one that sends none is closed.
    Required,
    /// It may connect without one.
    Optional,
}

/// A CIDR network (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("'{s}' is not a CIDR network or an address"))
}

/// The flags of active health checks (the balancer's and the cluster's): --check and the flags that
/// tune it, then --on-down.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Active health checks, run from one place for the whole balancer: `connect` (a TCP connect within
    /// --check-timeout passes), `send-expect` (write --check-send, then the reply must start with
    /// --check-expect), `http` (GET --check-path; a 2xx or 3xx status passes) or `none` (passive health
    /// only). With checks on, a backend takes connections once its first check passes.
    #[arg(long, value_name = "MODE", default_value = "none")]
    pub check: CheckMode,

    /// send-expect: the bytes to write, with the escapes \r \n \t \\ and \xHH (for example
    /// 'PING\r\n'). May be left out, for servers that speak first.
    #[arg(long, value_name = "STR", value_parser = parse_escaped, allow_hyphen_values = true)]
    pub check_send: Option<Escaped>,

    /// send-expect: the bytes the reply must start with (same escapes; for example '+PONG').
    #[arg(long, value_name = "STR", value_parser = parse_escaped, allow_hyphen_values = true)]
    pub check_expect: Option<Escaped>,

    /// send-expect: the reply must contain --check-expect anywhere (in its first 64 KiB), not only at
    /// its start.
    #[arg(long)]
    pub check_contains: bool,

    /// http: the path to ask for (it starts with '/'). Default: /.
    #[arg(long, value_name = "PATH")]
    pub check_path: Option<String>,

    /// http: the Host header. Default: the address checked (IP:PORT).
    #[arg(long, value_name = "HOST")]
    pub check_host: Option<String>,

    /// http: the one status that passes (100-599). Default: any 2xx or 3xx.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub check_status: Option<u16>,

    /// Check this port of each backend's host instead of the backend's own port.
    #[arg(long, value_name = "PORT", allow_hyphen_values = true)]
    pub check_port: Option<u16>,

    /// Between two checks of a backend (± 10 %; a quarter of it while a backend is changing state).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub check_interval: Duration,

    /// One check, connect included, must pass within this.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub check_timeout: Duration,

    /// Passing checks in a row that bring a backend that is down back (1-1000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2,
        allow_hyphen_values = true
    )]
    pub rise: u32,

    /// Failing checks in a row that take a backend that is up down (1-1000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 3,
        allow_hyphen_values = true
    )]
    pub fall: u32,

    /// What a backend marked down (by checks or passive health) means for its open connections: `keep`
    /// (they carry on) or `cut` (they are reset at once).
    #[arg(long, value_name = "WHAT", default_value = "keep")]
    pub on_down: OnDown,
}

/// Bytes given with escapes (`--check-send`, `--check-expect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escaped(pub Vec<u8>);

/// Parses `PING\r\n`, `\x00\x00\x00\x08`, ... (see [`ulb_tcp::health::unescape`]).
pub fn parse_escaped(s: &str) -> Result<Escaped, String> {
    ulb_tcp::health::unescape(s).map(Escaped)
}

impl CheckArgs {
    /// The active health checks the flags ask for (mode `none`: off); not yet validated.
    pub fn health_check(&self) -> HealthCheck {
        let mut check = HealthCheck::new(self.check)
            .interval(self.check_interval)
            .timeout(self.check_timeout)
            .rise(self.rise)
            .fall(self.fall)
            .contains(self.check_contains);
        if let Some(Escaped(bytes)) = &self.check_send {
            check = check.send(bytes.clone());
        }
        if let Some(Escaped(bytes)) = &self.check_expect {
            check = check.expect(bytes.clone());
        }
        if let Some(path) = &self.check_path {
            check = check.path(path.clone());
        }
        if let Some(host) = &self.check_host {
            check = check.host(host.clone());
        }
        if let Some(status) = self.check_status {
            check = check.status(status);
        }
        if let Some(port) = self.check_port {
            check = check.port(port);
        }
        check
    }
}

/// The admin server's flags, for the balancer and the cluster alike.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Serve the admin HTTP server on ADDR (for example 127.0.0.1:9100): Prometheus metrics at
    /// /metrics, /healthz and /livez for probes, and the JSON API at /api/v1/services. An address that
    /// is not loopback needs --admin-token-file.
    #[arg(long, value_name = "ADDR", group = "admin_addr")]
    pub admin: Option<SocketAddr>,

    /// The same as --admin (its name from when the port served only metrics).
    #[arg(long, value_name = "ADDR", group = "admin_addr")]
    pub metrics: Option<SocketAddr>,

    /// Mutating admin API calls (POST, PATCH, DELETE) need `Authorization: Bearer TOKEN`, where TOKEN
    /// is this file's content, trimmed.
    #[arg(long, value_name = "FILE", requires = "admin_addr")]
    pub admin_token_file: Option<std::path::PathBuf>,
}

impl AdminArgs {
    /// The admin address, by either name.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.admin.or(self.metrics)
    }
}

/// An admin server error in the command's words, on one line.
pub fn admin_in_flag_words(e: &ulb_tcp::admin::AdminError) -> String {
    use ulb_tcp::admin::AdminError;
    let words = match e {
        AdminError::NoToken { addr } => format!(
            "--admin {addr} is not a loopback address: refusing to serve the admin API there without \
             a token (give --admin-token-file, or use 127.0.0.1)"
        ),
        AdminError::TokenFile { path, why } => {
            format!("--admin-token-file {}: {why}", path.display())
        }
        _ => e.to_string(),
    };
    escape_controls(&words)
}

/// `--runtime` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeArg {
    /// One current-thread runtime and one SO_REUSEPORT listener per thread.
    PerCore,
    /// One multi-threaded runtime whose threads steal tasks from each other.
    WorkStealing,
}

impl RuntimeArg {
    /// Per-core where it exists (Linux): against the work-stealing runtime, round by round over 5 rounds
    /// with the order of targets rotated, it carried 1.05× the connection rate and 1.12× the keep-alive
    /// rate, with 0.97× the p99 latency (`benches/compare.py`).
    #[cfg(target_os = "linux")]
    pub const DEFAULT: RuntimeArg = RuntimeArg::PerCore;
    /// Work-stealing where per-core serving is not available.
    #[cfg(not(target_os = "linux"))]
    pub const DEFAULT: RuntimeArg = RuntimeArg::WorkStealing;
}

/// Parses a thread count, 1 to 1024.
pub fn parse_threads(s: &str) -> Result<NonZeroUsize, String> {
    s.trim()
        .parse::<NonZeroUsize>()
        .ok()
        .filter(|n| n.get() <= MAX_THREADS)
        .ok_or_else(|| format!("'{s}' is not a thread count (1 to {MAX_THREADS})"))
}

/// Parses a whole number for a count (its range is checked with the rest of the configuration). A
/// negative or oversized number is called that, rather than "invalid digit".
pub fn parse_count<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr<Err = std::num::ParseIntError>,
{
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "'{s}' is negative (a count is a whole number, 0 or more)"
        ));
    }
    t.parse::<T>().map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow => format!("'{s}' is too large for a count"),
        _ => format!("'{s}' is not a whole number"),
    })
}

/// Parses `65536`, `64k` or `1m`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    if t.starts_with('-') {
        return Err(format!(
            "'{s}' is negative (a size is 0 or more, for example 64k)"
        ));
    }
    let (num, scale) = match t.strip_suffix('k') {
        Some(n) => (n, 1024),
        None => match t.strip_suffix('m') {
            Some(n) => (n, 1024 * 1024),
            None => (t.as_str(), 1),
        },
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("'{s}' is not a size (try 65536, 64k or 1m)"))
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses `250ms`, `3s`, `5m`, `1h`, `2d` or a bare number of seconds, at most 24 days (the library's
/// [`MAX_DURATION`](ulb_tcp::config::MAX_DURATION)).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!(
            "'{s}' is negative (a duration is 0 or more, for example 3s)"
        ));
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (try 250ms, 3s, 5m or 1h)"))?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("'{s}' has an unknown unit (use ms, s, m, h or d)")),
    };
    let max = ulb_tcp::config::MAX_DURATION;
    match Duration::try_from_secs_f64(value * scale) {
        Ok(d) if d <= max => Ok(d),
        _ => Err(format!("'{s}' is too long (at most 24 days)")),
    }
}

impl BalancerArgs {
    /// Resolves the backends and builds the validated configuration.
    /// `fd_limit` is the process's open-file limit, for the default connection limit.
    pub async fn into_config(self, fd_limit: Option<u64>) -> Result<BalancerConfig, ConfigError> {
        let mut check = self.checks.health_check();
        if let (true, Some(version)) = (self.check_send_proxy, self.send_proxy) {
            check = check.send_proxy(version);
        }
        if let Some(cap) = self.backend_max_connections {
            let max = ulb_tcp::config::MAX_CONNECTIONS;
            if cap == 0 || cap as usize > max {
                return Err(ConfigError::OutOfRange {
                    field: "backend_max_connections".into(),
                    value: cap.to_string(),
                    range: format!("1..={max}"),
                });
            }
        }
        let mut backends = Vec::with_capacity(self.backends.len() + self.backup.len());
        for (spec, backup) in self
            .backends
            .iter()
            .map(|s| (s, false))
            .chain(self.backup.iter().map(|s| (s, true)))
        {
            let mut backend = spec.resolve().await?.with_backup(backup);
            if let Some(cap) = self.backend_max_connections {
                backend = backend.with_max_connections(cap);
            }
            backends.push(backend);
        }
        let max_connections = self
            .max_connections
            .unwrap_or_else(|| default_max_connections(fd_limit));
        let max_pipes = self
            .max_pipes
            .unwrap_or_else(|| default_max_pipes(fd_limit, max_connections));
        let config = BalancerConfig::new(backends)
            .slow_start(self.slow_start)
            .defer_accept(self.defer_accept)
            .queue(self.max_queue, self.queue_timeout)
            .strategy(self.strategy)
            .connect_timeout(self.connect_timeout)
            .connect_attempts(self.connect_attempts)
            .idle_timeout(self.idle_timeout)
            .half_close_timeout(self.half_close_timeout)
            .max_connections(max_connections)
            .max_pipes(max_pipes)
            .drain_timeout(self.drain_timeout)
            .copy_mode(self.copy_mode)
            .buffer_size(self.buffer_size)
            .replay_limit(self.replay_limit)
            .check(check)
            .on_down(self.checks.on_down)
            .health(PassiveHealth::new(
                self.fail_threshold,
                self.down_backoff,
                PassiveHealth::default().max_backoff,
            ));
        let mut config = config;
        config.send_proxy = self.send_proxy;
        config.send_proxy_tlvs = self.send_proxy_tlvs;
        if !self.accept_proxy_from.is_empty() {
            config.accept_proxy = Some(
                AcceptProxy::new(self.accept_proxy_from)
                    .timeout(self.accept_proxy_timeout)
                    .optional(self.accept_proxy == AcceptProxyArg::Optional),
            );
        }
        config.allow = self.allow;
        config.deny = self.deny;
        config.source_limits.max_connections = self.max_connections_per_ip;
        config.source_limits.rate = self.rate_per_ip;
        config.source_limits.ipv6_prefix = self.ipv6_prefix;
        config.validate()?;
        Ok(config)
    }
}

/// A flag error as the one line the command prints: clap's message without its usage, tips and
/// pointer to --help, on one line. (Not just its first paragraph: a value with a blank line in it would
/// cut the message before the flag is named.)
pub fn usage_error_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let message: Vec<&str> = text
        .split("\n\n")
        .filter(|p| {
            let p = p.trim_start();
            !(p.starts_with("Usage:")
                || p.starts_with("tip:")
                || p.starts_with("For more information"))
        })
        .collect();
    let joined = message.join(" ");
    let line = escape_controls(&joined.split_whitespace().collect::<Vec<_>>().join(" "));
    match line.trim_start_matches("error: ") {
        "" => "bad arguments (see --help)".to_string(),
        line => line.to_string(),
    }
}

/// `s` with every control character, line breaks included, written as an escape (`\n`, `\u{1b}`), so
/// that no value can break the line it is quoted in, or send the terminal a command.
pub fn escape_controls(s: &str) -> String {
    s.chars()
        .fold(String::with_capacity(s.len()), |mut out, c| {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
            out
        })
}

/// The library's configuration fields and the flags that set them.
const FLAGS: &[(&str, &str)] = &[
    ("connect_timeout", "--connect-timeout"),
    ("connect_attempts", "--connect-attempts"),
    ("idle_timeout", "--idle-timeout"),
    ("half_close_timeout", "--half-close-timeout"),
    ("drain_timeout", "--drain-timeout"),
    ("max_connections", "--max-connections"),
    ("max_pipes", "--max-pipes"),
    ("health.failure_threshold", "--fail-threshold"),
    ("health.backoff", "--down-backoff"),
    ("buffer_size", "--buffer-size"),
    ("replay_limit", "--replay-limit"),
    ("copy_mode", "--copy-mode"),
    ("slow_start", "--slow-start"),
    ("defer_accept", "--defer-accept"),
    ("queue_timeout", "--queue-timeout"),
    ("max_queue", "--max-queue"),
    ("backend_max_connections", "--backend-max-connections"),
    ("check.interval", "--check-interval"),
    ("check.timeout", "--check-timeout"),
    ("check.rise", "--rise"),
    ("check.fall", "--fall"),
    ("check.port", "--check-port"),
    ("check.send", "--check-send"),
    ("check.expect", "--check-expect"),
    ("check.contains", "--check-contains"),
    ("check.path", "--check-path"),
    ("check.host", "--check-host"),
    ("check.status", "--check-status"),
    ("accept_proxy.timeout", "--accept-proxy-timeout"),
    ("accept_proxy.from", "--accept-proxy-from"),
    ("allow", "--allow"),
    ("deny", "--deny"),
    ("max_connections_per_ip", "--max-connections-per-ip"),
    ("rate_per_ip", "--rate-per-ip"),
    ("ipv6_prefix", "--ipv6-prefix"),
];

/// A configuration error in the command's words, on one line: a field is named by the flag that sets
/// it, and a value that holds a line break (a host name, say) shows it escaped.
pub fn in_flag_words(e: &ConfigError) -> String {
    let flag = |field: &str| {
        FLAGS
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, flag)| *flag)
    };
    let words = match e {
        ConfigError::NoBackends => "no backends given (use --backends HOST:PORT[@WEIGHT],...)".into(),
        // A backend's id on the command line is its HOST:PORT as written: the same one twice.
        ConfigError::DuplicateBackend { id } => format!(
            "--backends lists '{id}' twice (list a backend once; a weight, {id}@2, gives it a larger share)"
        ),
        ConfigError::OutOfRange {
            field,
            value,
            range,
        } => match flag(field) {
            Some(flag) => format!("{flag} {value} is out of range ({range})"),
            None => e.to_string(),
        },
        ConfigError::Unsupported { field, value, why } => match flag(field) {
            Some(flag) if value.is_empty() => format!("{flag} {why}"),
            Some(flag) => format!("{flag} {value} {why}"),
            None => e.to_string(),
        },
        _ => e.to_string(),
    };
    escape_controls(&words)
}

/// A cluster's configuration error in the command's words, on one line: the flag that sets the value
/// is named with it.
pub fn cluster_in_flag_words(e: &ClusterError) -> String {
    let words = match e {
        ClusterError::NoProcesses => {
            format!("--processes 0 is out of range (1 to {MAX_PROCESSES})")
        }
        ClusterError::TooManyProcesses { processes } => {
            format!("--processes {processes} is out of range (1 to {MAX_PROCESSES})")
        }
        ClusterError::BasePortZero => "--base-port 0 is not a port workers can listen on".into(),
        ClusterError::PortRange {
            base_port,
            processes,
        } => format!(
            "--base-port {base_port} with --processes {processes} needs ports past 65535 \
             (worker i listens on base + i)"
        ),
        ClusterError::Duration { what, value, min } => {
            let flag = match *what {
                "drain timeout" => Some("--drain-timeout"),
                "kill timeout" => Some("--kill-timeout"),
                "restart window" => Some("--restart-window"),
                _ => None,
            };
            match flag {
                Some(flag) => format!("{flag} {value:?} is out of range ({min:?} to 24 days)"),
                None => e.to_string(),
            }
        }
        ClusterError::ListenCollides {
            listen,
            first,
            last,
        } => format!(
            "--listen {listen} collides with the worker ports {first}-{last} (--base-port, --processes)"
        ),
        ClusterError::Balancer(e) => return in_flag_words(e),
        _ => e.to_string(),
    };
    escape_controls(&words)
}

/// Descriptors kept for the process itself: standard streams, the runtimes' epoll and wake-up
/// descriptors, the listeners, the metrics endpoint and its scrapes, the signal pipe.
const RESERVED_FDS: u64 = 64;

/// The descriptor budget, from the open-file limit L. A connection holds 2 descriptors (its two
/// sockets), and each direction that is spliced holds a pipe, 2 more, while its bytes are in flight: up
/// to 6. Pipes are bounded on their own (`--max-pipes`, and a burst that gets none goes through a
/// buffer), so connections are not sized for the worst case: of the L - 64 descriptors that the process
/// leaves, three quarters go to connections, (L - 64) * 3/8 of them, and the last quarter to pipes (see
/// [`default_max_pipes`]). 100,000 at most, 1 at least; 10,000 when the limit is not known.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    match fd_limit {
        Some(n) => (n.saturating_sub(RESERVED_FDS) / 8 * 3).clamp(1, 100_000) as usize,
        None => 10_000,
    }
}

/// What the open-file limit L leaves for pipes once the process has its 64 and every connection its
/// two: (L - 64 - 2 * max_connections) / 2, at most 100,000 (0 when nothing is left: every burst then
/// goes through a buffer). With the default connection limit, a quarter of L - 64 in descriptors;
/// the library's default (4096) when the limit is not known.
pub fn default_max_pipes(fd_limit: Option<u64>, max_connections: usize) -> usize {
    match fd_limit {
        Some(n) => {
            let sockets = (max_connections as u64).saturating_mul(2);
            (n.saturating_sub(RESERVED_FDS).saturating_sub(sockets) / 2).min(100_000) as usize
        }
        None => ulb_tcp::config::DEFAULT_MAX_PIPES,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("3x").unwrap_err().contains("'3x'"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1")
            .unwrap_err()
            .contains("'-1' is negative"));
        let huge = parse_duration("2600000000000000h").unwrap_err();
        assert!(huge.contains("too long"), "{huge}");
        assert_eq!(parse_duration("24d"), Ok(ulb_tcp::config::MAX_DURATION));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert!(parse_size("lots").unwrap_err().contains("'lots'"));
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count::<u32>("3"), Ok(3));
        assert_eq!(parse_count::<usize>(" 7 "), Ok(7));
        for (bad, why) in [
            ("-1", "is negative"),
            ("-0", "is negative"),
            ("4294967296", "is too large"),
            ("", "is not a whole number"),
            ("3x", "is not a whole number"),
            ("1.5", "is not a whole number"),
        ] {
            let e = parse_count::<u32>(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}' {why}")), "{bad:?}: {e}");
        }
    }

    /// The line printed for a flag error names the flag and the value, whatever the value holds.
    #[test]
    fn a_flag_error_is_one_line_naming_the_flag() {
        let line = |args: &[&str]| {
            let e = Cli::try_parse_from(args).unwrap_err();
            usage_error_line(&e)
        };
        // A blank line in the value used to cut the message at "invalid value '".
        let l = line(&["ulb-tcp", "-b", "127.0.0.1:1", "--idle-timeout", "\n\na"]);
        assert!(
            l.contains("--idle-timeout") && l.contains("not a duration"),
            "{l:?}"
        );
        for value in ["x\u{1b}[2Jy", "x\u{7}\ry", "x\u{0}y"] {
            let l = line(&["ulb-tcp", "-b", "127.0.0.1:1", "--strategy", value]);
            assert!(
                l.contains("--strategy") && l.contains("unknown strategy 'x"),
                "{l:?}"
            );
            assert!(!l.chars().any(char::is_control), "{l:?}");
        }
        // Usage and tips are left out.
        let l = line(&["ulb-tcp", "-b", "127.0.0.1:1", "--no-such-flag"]);
        assert_eq!(l, "unexpected argument '--no-such-flag' found");
    }

    #[test]
    fn configuration_errors_are_in_flag_words_on_one_line() {
        let e = ConfigError::DuplicateBackend {
            id: "127.0.0.1:1".into(),
        };
        assert_eq!(
            in_flag_words(&e),
            "--backends lists '127.0.0.1:1' twice (list a backend once; a weight, 127.0.0.1:1@2, \
             gives it a larger share)"
        );
        let e = ConfigError::Unresolvable {
            value: "a\nb:80".into(),
            why: "no such host".into(),
        };
        assert_eq!(
            in_flag_words(&e),
            "cannot resolve backend 'a\\nb:80': no such host"
        );
        let words = |c: ClusterConfig| cluster_in_flag_words(&c.validate().unwrap_err());
        assert_eq!(
            words(ClusterConfig::new().processes(5000)),
            "--processes 5000 is out of range (1 to 4096)"
        );
        assert_eq!(
            words(ClusterConfig::new().processes(0)),
            "--processes 0 is out of range (1 to 4096)"
        );
        assert!(
            words(ClusterConfig::new().kill_timeout(Duration::MAX)).starts_with("--kill-timeout ")
        );
        assert!(
            words(ClusterConfig::new().processes(1).replay_limit(17 << 20))
                .starts_with("--replay-limit 17825792 is out of range")
        );
    }

    #[test]
    fn thread_counts() {
        assert_eq!(parse_threads("2").map(NonZeroUsize::get), Ok(2));
        assert_eq!(parse_threads("1024").map(NonZeroUsize::get), Ok(1024));
        for bad in ["0", "1025", "-1", "two", ""] {
            let e = parse_threads(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_default_connection_limit_follows_the_descriptor_limit() {
        assert_eq!(default_max_connections(Some(1024)), 360);
        assert_eq!(default_max_connections(Some(200)), 51);
        assert_eq!(default_max_connections(Some(10)), 1);
        assert_eq!(default_max_connections(Some(1 << 40)), 100_000);
        assert_eq!(default_max_connections(None), 10_000);
    }

    #[test]
    fn the_default_pipe_limit_takes_what_the_connections_leave() {
        assert_eq!(default_max_pipes(Some(1024), 360), 120);
        assert_eq!(default_max_pipes(Some(200), 51), 17);
        // Connections and pipes at their limits fit the descriptors, with the process's 64.
        for limit in [100, 200, 1024, 4096, 65_536, 1 << 20] {
            let conns = default_max_connections(Some(limit));
            let pipes = default_max_pipes(Some(limit), conns);
            assert!(64 + 2 * conns as u64 + 2 * pipes as u64 <= limit, "{limit}");
            assert!(pipes > 0, "{limit}");
        }
        // A connection limit that takes every descriptor leaves none for pipes.
        assert_eq!(default_max_pipes(Some(48), 1000), 0);
        assert_eq!(default_max_pipes(Some(1 << 40), 100_000), 100_000);
        assert_eq!(default_max_pipes(None, 10_000), 4096);
    }

    #[test]
    fn check_flags_make_the_health_check() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["ulb-tcp", "--backends", "127.0.0.1:1"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|cli| cli.balancer)
        };
        let off = parse(&[]).unwrap();
        assert_eq!(off.checks.health_check().mode, CheckMode::None);
        assert_eq!(off.checks.on_down, OnDown::Keep);
        let redis = parse(&[
            "--check",
            "send-expect",
            "--check-send",
            r"PING\r\n",
            "--check-expect",
            "+PONG",
            "--check-interval",
            "250ms",
            "--rise",
            "1",
            "--on-down",
            "cut",
        ])
        .unwrap();
        let c = redis.checks.health_check();
        assert_eq!(
            (c.mode, c.send.as_slice()),
            (CheckMode::SendExpect, &b"PING\r\n"[..])
        );
        assert_eq!((c.expect.as_slice(), c.rise, c.fall), (&b"+PONG"[..], 1, 3));
        assert_eq!(c.interval, Duration::from_millis(250));
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!(redis.checks.on_down, OnDown::Cut);
        assert!(c.validate().is_ok());
        let pg = parse(&[
            "--check",
            "send-expect",
            "--check-send",
            r"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            "--check-expect",
            "N",
        ])
        .unwrap();
        assert_eq!(
            pg.checks.health_check().send,
            [0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]
        );
        let http = parse(&[
            "--check",
            "http",
            "--check-path",
            "/healthz",
            "--check-status",
            "204",
            "--check-port",
            "8080",
        ])
        .unwrap();
        let c = http.checks.health_check();
        assert_eq!(
            (c.path.as_deref(), c.status, c.port),
            (Some("/healthz"), Some(204), Some(8080))
        );
        // Errors name the flag and the value.
        let e = parse(&["--check", "ping"]).unwrap_err().to_string();
        assert!(e.contains("--check") && e.contains("'ping'"), "{e}");
        let e = parse(&["--check", "send-expect", "--check-send", r"PING\q"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--check-send") && e.contains(r"PING\q") && e.contains(r"'\q'"),
            "{e}"
        );
        let words = |extra: &[&str]| {
            in_flag_words(
                &parse(extra)
                    .unwrap()
                    .checks
                    .health_check()
                    .validate()
                    .unwrap_err(),
            )
        };
        assert_eq!(
            words(&["--check", "connect", "--rise", "0"]),
            "--rise 0 is out of range (1..=1000)"
        );
        assert_eq!(
            words(&["--check", "http", "--check-path", "healthz"]),
            "--check-path healthz must start with '/', without spaces or control characters (at most 4 KiB)"
        );
        assert_eq!(
            words(&["--check-send", "PING"]),
            "--check-send PING is only used by the send-expect mode"
        );
        assert_eq!(
            words(&["--check", "send-expect", "--check-send", "PING"]),
            "--check-expect must not be empty in the send-expect mode"
        );
        assert!(words(&["--check", "http", "--check-status", "700"])
            .starts_with("--check-status 700 is out of range"));
        assert!(words(&["--check", "connect", "--check-interval", "0"])
            .starts_with("--check-interval 0ns is out of range"));
    }

    #[test]
    fn access_and_per_source_flags_make_the_config() {
        let config = |extra: &[&str]| {
            let mut args = vec!["ulb-tcp", "--backends", "127.0.0.1:1"];
            args.extend_from_slice(extra);
            let cli = Cli::try_parse_from(args).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(cli.balancer.into_config(None))
        };
        let c = config(&[
            "--allow",
            "10.0.0.0/8,::1",
            "--deny",
            "10.0.0.3",
            "--max-connections-per-ip",
            "5",
            "--rate-per-ip",
            "20",
            "--ipv6-prefix",
            "48",
        ])
        .unwrap();
        assert_eq!(c.allow.len(), 2);
        assert_eq!(c.deny, ["10.0.0.3/32".parse::<IpNet>().unwrap()]);
        assert_eq!(c.source_limits.max_connections, Some(5));
        assert_eq!(c.source_limits.rate, Some(20));
        assert_eq!(c.source_limits.ipv6_prefix, 48);
        let off = config(&[]).unwrap();
        assert!(off.allow.is_empty() && off.source_limits.is_off());
        let words = |extra: &[&str]| in_flag_words(&config(extra).unwrap_err());
        assert_eq!(
            words(&["--max-connections-per-ip", "0"]),
            "--max-connections-per-ip 0 is out of range (1..=16000000)"
        );
        assert_eq!(
            words(&["--rate-per-ip", "0"]),
            "--rate-per-ip 0 is out of range (1..=1000000)"
        );
        assert_eq!(
            words(&["--ipv6-prefix", "0"]),
            "--ipv6-prefix 0 is out of range (1..=128)"
        );
    }

    #[test]
    fn backends_split_on_commas_and_repeat() {
        let cli = Cli::try_parse_from([
            "ulb-tcp",
            "--backends",
            "127.0.0.1:1,127.0.0.1:2@3",
            "--backends",
            "[::1]:4",
        ])
        .unwrap();
        let weights: Vec<u32> = cli.balancer.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [1, 3, 1]);
    }

    #[test]
    fn the_cluster_subcommand_takes_the_command_after_dashes() {
        let cli = Cli::try_parse_from([
            "ulb-tcp",
            "cluster",
            "-p",
            "4",
            "--base-port",
            "9000",
            "--listen",
            "127.0.0.1:3000",
            "--",
            "python3",
            "-m",
            "http.server",
            "{port}",
        ])
        .unwrap();
        let Some(Subcommand::Cluster(args)) = cli.command else {
            panic!("no subcommand");
        };
        let (config, command, _, _) = args.into_parts();
        assert_eq!((config.processes, config.base_port), (4, 9000));
        assert_eq!(config.listen, Some("127.0.0.1:3000".parse().unwrap()));
        assert_eq!(command.program, "python3");
        assert_eq!(command.args, ["-m", "http.server", "{port}"]);
        // Without a subcommand the balancer's flags work as before, and they do not mix with it.
        assert!(Cli::try_parse_from(["ulb-tcp", "--backends", "127.0.0.1:1"]).is_ok());
        assert!(Cli::try_parse_from([
            "ulb-tcp",
            "--backends",
            "127.0.0.1:1",
            "cluster",
            "--",
            "x"
        ])
        .is_err());
    }
}

/// Property tests: whatever the flags' values, the command either builds a configuration that validates
/// or says what is wrong in one line; nothing panics.
#[cfg(test)]
mod props {
    use super::{cluster_in_flag_words, in_flag_words, usage_error_line, Cli, Subcommand};
    use clap::Parser;
    use proptest::prelude::*;
    use std::net::SocketAddr;
    use ulb_tcp::config::MAX_DURATION;
    use ulb_tcp::BackendSpec;

    /// Numbers at and around every limit, and past every integer type.
    const EDGES: &[&str] = &[
        "0",
        "1",
        "2",
        "3",
        "63",
        "64",
        "65",
        "511",
        "512",
        "999",
        "1000",
        "1001",
        "1024",
        "1025",
        "4096",
        "4097",
        "65535",
        "65536",
        "16000000",
        "16000001",
        "16777216",
        "16777217",
        "2073600",
        "2073601",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999999",
        "0.5",
        "1.",
        ".5",
        ".",
        "1.5e3",
        "-0",
        "-1",
        "-5",
        "-18446744073709551616",
        "+3",
        " 7 ",
        "NaN",
        "inf",
        "1e400",
        "0x10",
    ];
    /// Units of durations and sizes, some wrong.
    const UNITS: &[&str] = &[
        "", "", "ms", "s", "m", "h", "d", "k", "K", "M", "g", "us", "ns", "µs", "w", "y", " s",
        "s ", "mss", "-", ".",
    ];

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => proptest::sample::select(EDGES).prop_map(String::from),
            4 => (0u64..100_000).prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<u128>().prop_map(|n| n.to_string()),
            1 => "[0-9]{1,40}",
            1 => "[0-9]{0,8}\\.[0-9]{0,12}",
        ]
    }

    /// A value for any flag: numbers with units, words the flags know, addresses, and garbage.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => (number(), proptest::sample::select(UNITS)).prop_map(|(n, u)| format!("{n}{u}")),
            2 => proptest::sample::select(&[
                "auto", "pooled", "splice", "plain", "round-robin", "least-connections", "random",
                "p2c", "per-core", "work-stealing", "text", "json", "PLAIN", "fastest", "",
                "127.0.0.1:0", "[::1]:0", "0.0.0.0:65535", "127.0.0.1:65536", "localhost",
                "--help", "--version", "-", "--", "cluster",
            ][..]).prop_map(String::from),
            1 => any::<String>(),
            1 => "[0-9a-z.:@, \\t\\n\\r\\x00\\x01\\x1b\\x7f]{0,12}",
            1 => "\\PC{0,12}",
            1 => "[ -~]{0,16}",
        ]
    }

    /// One backend: literal addresses (valid or not), duplicates of a few, weights around the limits.
    fn backend() -> impl Strategy<Value = String> {
        prop_oneof![
            20 => (
                proptest::sample::select(&["127.0.0.1", "[::1]", "10.0.0.1", "[::ffff:127.0.0.1]"][..]),
                // Few ports, so that the same backend is often listed twice.
                prop_oneof![20 => 1u32..=3, 20 => 1u32..=65535, 1 => Just(0), 1 => any::<u32>()],
                proptest::option::weighted(0.4, prop_oneof![
                    12 => (1u32..=256).prop_map(|w| w.to_string()),
                    1 => proptest::sample::select(&[
                        "0", "256", "257", "-1", "x", "", "4294967296",
                    ][..]).prop_map(String::from),
                ]),
            )
                .prop_map(|(host, port, weight)| match weight {
                    Some(w) => format!("{host}:{port}@{w}"),
                    None => format!("{host}:{port}"),
                }),
            1 => value(),
        ]
        .prop_filter("no name lookups in a unit test", |s| no_lookup(s))
    }

    /// True unless some comma-separated part of `s` is a host name that would have to be looked up.
    fn no_lookup(s: &str) -> bool {
        s.split(',').all(|part| match part.parse::<BackendSpec>() {
            Ok(spec) => spec.host_port.parse::<SocketAddr>().is_ok(),
            Err(_) => true,
        })
    }

    /// What a flag takes, for values of the right form most of the time (so that most cases reach the
    /// configuration's checks), of any form otherwise.
    #[derive(Clone, Copy)]
    enum Kind {
        Duration,
        Count,
        Size,
        Word(&'static [&'static str]),
        Addr,
    }

    /// Mostly values of the right form and within range (so that most cases reach the configuration's
    /// checks, and some pass them), then edge and huge numbers with units, then anything.
    fn value_for(kind: Kind) -> BoxedStrategy<String> {
        let unit = |units: &'static [&'static str]| proptest::sample::select(units);
        let right = match kind {
            Kind::Duration => prop_oneof![
                (0u64..=2_100_000_000).prop_map(|n| format!("{n}ms")),
                (0u64..=2_100_000).prop_map(|n| n.to_string()),
                (0u64..=2_100_000).prop_map(|n| format!("{n}s")),
                (0u64..=35_000).prop_map(|n| format!("{n}m")),
                (0u64..=600).prop_map(|n| format!("{n}h")),
                (0u64..=25).prop_map(|n| format!("{n}d")),
                (0.0f64..30.0).prop_map(|n| format!("{n}d")),
            ]
            .boxed(),
            Kind::Count => prop_oneof![
                4 => (0u64..=100).prop_map(|n| n.to_string()),
                1 => (0u64..=20_000_000).prop_map(|n| n.to_string()),
            ]
            .boxed(),
            Kind::Size => prop_oneof![
                (0u64..=20_000_000).prop_map(|n| n.to_string()),
                (0u64..=20_000).prop_map(|n| format!("{n}k")),
                (0u64..=20).prop_map(|n| format!("{n}m")),
            ]
            .boxed(),
            Kind::Word(words) => proptest::sample::select(words)
                .prop_map(String::from)
                .boxed(),
            Kind::Addr => prop_oneof![
                8 => unit(&["127.0.0.1:0", "[::1]:0", "0.0.0.0:65535"]),
                1 => unit(&["127.0.0.1:65536", "localhost:80", "::1", ""]),
            ]
            .prop_map(String::from)
            .boxed(),
        };
        let edge = match kind {
            Kind::Duration => (number(), unit(UNITS))
                .prop_map(|(n, u)| format!("{n}{u}"))
                .boxed(),
            Kind::Size => (number(), unit(&["", "k", "m", "K", "M", "g", "kb"]))
                .prop_map(|(n, u)| format!("{n}{u}"))
                .boxed(),
            _ => number().boxed(),
        };
        prop_oneof![12 => right, 2 => edge, 1 => value()].boxed()
    }

    /// Every flag of the balancer but `--backends`, and what it takes.
    const FLAGS: &[(&str, Kind)] = &[
        ("--listen", Kind::Addr),
        (
            "--strategy",
            Kind::Word(&["round-robin", "least-connections", "random", "p2c"]),
        ),
        ("--connect-timeout", Kind::Duration),
        ("--connect-attempts", Kind::Count),
        ("--idle-timeout", Kind::Duration),
        ("--half-close-timeout", Kind::Duration),
        ("--defer-accept", Kind::Duration),
        ("--max-connections", Kind::Count),
        ("--drain-timeout", Kind::Duration),
        ("--fail-threshold", Kind::Count),
        ("--down-backoff", Kind::Duration),
        ("--metrics", Kind::Addr),
        (
            "--copy-mode",
            Kind::Word(&["auto", "pooled", "splice", "plain"]),
        ),
        ("--buffer-size", Kind::Size),
        ("--replay-limit", Kind::Size),
        ("--runtime", Kind::Word(&["per-core", "work-stealing"])),
        ("--threads", Kind::Count),
        ("--log-format", Kind::Word(&["text", "json"])),
    ];

    /// The cluster's flags but the command, and what each takes.
    const CLUSTER_FLAGS: &[(&str, Kind)] = &[
        ("-p", Kind::Count),
        ("--base-port", Kind::Count),
        ("--listen", Kind::Addr),
        ("--drain-timeout", Kind::Duration),
        ("--kill-timeout", Kind::Duration),
        ("--max-restarts", Kind::Count),
        ("--restart-window", Kind::Duration),
        ("--replay-limit", Kind::Size),
    ];

    fn balancer_args() -> impl Strategy<Value = Vec<String>> {
        let values: Vec<_> = FLAGS
            .iter()
            .map(|&(_, kind)| proptest::option::weighted(0.3, value_for(kind)))
            .collect();
        (proptest::collection::vec(backend(), 0..=3), values).prop_map(|(backends, values)| {
            let mut args = vec!["ulb-tcp".to_string()];
            for b in backends {
                args.extend(["--backends".to_string(), b]);
            }
            for ((flag, _), v) in FLAGS.iter().zip(values) {
                if let Some(v) = v {
                    args.extend([flag.to_string(), v]);
                }
            }
            args
        })
    }

    /// One line: something to read, and no line break or other control character in it.
    fn is_one_line(s: &str) -> bool {
        !s.trim().is_empty() && !s.chars().any(char::is_control)
    }

    /// The line printed for a flag error is one line and, for a bad value, names the flag.
    fn check_usage_error(args: &[String], e: &clap::Error) -> Result<(), TestCaseError> {
        use clap::error::{ContextKind, ContextValue};
        let line = usage_error_line(e);
        prop_assert!(is_one_line(&line), "{args:?}: {line:?}");
        if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) {
            let flag = arg.split(' ').next().unwrap_or(arg);
            prop_assert!(
                line.contains(flag),
                "{args:?}: {line:?} does not name {flag}"
            );
        }
        Ok(())
    }

    proptest! {
        // Bounded, to stay fast; failures are shrunk and reported, not saved (regressions found here
        // become explicit cases in tests/cli.rs).
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn balancer_flags_validate_or_say_why_in_one_line(
            args in balancer_args(),
            fd_limit in proptest::option::of(any::<u64>()),
        ) {
            match Cli::try_parse_from(&args) {
                Err(e) if e.use_stderr() => check_usage_error(&args, &e)?,
                Err(_) => {} // --help or --version
                Ok(cli) => {
                    prop_assert!(cli.command.is_none());
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    match rt.block_on(cli.balancer.into_config(fd_limit)) {
                        Ok(config) => {
                            prop_assert_eq!(config.validate(), Ok(()), "{:?}", args);
                            for d in [
                                config.connect_timeout,
                                config.idle_timeout,
                                config.half_close_timeout,
                                config.drain_timeout,
                                config.health.backoff,
                                config.health.max_backoff,
                            ] {
                                prop_assert!(d <= MAX_DURATION, "{args:?}: {d:?}");
                            }
                        }
                        Err(e) => {
                            let line = in_flag_words(&e);
                            prop_assert!(is_one_line(&line), "{args:?}: {line:?}");
                        }
                    }
                }
            }
        }

        #[test]
        fn cluster_flags_validate_or_say_why_in_one_line(
            values in CLUSTER_FLAGS
                .iter()
                .map(|&(_, kind)| proptest::option::weighted(0.5, value_for(kind)))
                .collect::<Vec<_>>(),
        ) {
            let flags = CLUSTER_FLAGS.iter().map(|(flag, _)| flag);
            let mut args = vec!["ulb-tcp".to_string(), "cluster".to_string()];
            for (flag, v) in flags.zip(values) {
                if let Some(v) = v {
                    args.extend([flag.to_string(), v]);
                }
            }
            args.extend(["--".to_string(), "true".to_string()]);
            match Cli::try_parse_from(&args) {
                Err(e) if e.use_stderr() => check_usage_error(&args, &e)?,
                Err(_) => {}
                Ok(cli) => {
                    let Some(Subcommand::Cluster(c)) = cli.command else {
                        return Err(TestCaseError::fail(format!("{args:?}: no cluster")));
                    };
                    let (config, _, _, _) = c.into_parts();
                    match config.validate() {
                        // What the cluster accepts, its balancer accepts too.
                        Ok(()) => prop_assert_eq!(
                            config.balancer_config().validate(), Ok(()), "{:?}", args
                        ),
                        Err(e) => {
                            let line = cluster_in_flag_words(&e);
                            prop_assert!(is_one_line(&line), "{args:?}: {line:?}");
                        }
                    }
                }
            }
        }
    }
}
