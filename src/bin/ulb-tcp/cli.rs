//! Command-line flags (first layer) and their conversion into a validated `BalancerConfig` (second layer).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use std::ffi::OsString;

use clap::{Parser, ValueEnum};
use ulb_tcp::cluster::{ClusterConfig, RestartPolicy, WorkerCommand};
use ulb_tcp::{
    BackendSpec, BalancerConfig, CheckMode, ConfigError, CopyMode, HealthCheck, OnDown,
    PassiveHealth, Strategy, MAX_THREADS,
};

const EXAMPLES: &str = "\
Examples:
  ulb-tcp --listen 127.0.0.1:3000 --backends 127.0.0.1:8081,127.0.0.1:8082
  ulb-tcp cluster -p 4 --base-port 8081 --listen 127.0.0.1:3000 -- python3 -m http.server {port}
  ulb-tcp --listen 0.0.0.0:6379 --backends redis-a:6379@3 --backends redis-b:6379 \\
          --strategy least-connections --idle-timeout 1h --metrics 127.0.0.1:9100

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

    /// The balancer's flags (without a subcommand).
    #[command(flatten)]
    pub balancer: BalancerArgs,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Subcommand {
    /// Supervise N worker processes of any program, optionally behind the balancer.
    #[command(after_help = CLUSTER_EXAMPLES)]
    Cluster(ClusterArgs),
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
    #[arg(long, short = 'p', value_name = "N", allow_hyphen_values = true)]
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

    /// Serve Prometheus metrics at http://ADDR/metrics (for example 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// How long a rolling restart waits for a worker's connections, and a shutdown for the balancer's.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub drain_timeout: Duration,

    /// After SIGTERM, how long a worker may take to exit before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub kill_timeout: Duration,

    /// Crashes within --restart-window after which a worker is given up.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5,
        allow_hyphen_values = true
    )]
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

    /// The workers' command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

impl ClusterArgs {
    /// The cluster's configuration and the workers' command (not yet validated).
    pub fn into_parts(self) -> (ClusterConfig, WorkerCommand, Option<SocketAddr>, LogFormat) {
        let mut config = ClusterConfig::new()
            .base_port(self.base_port)
            .strategy(self.strategy)
            .drain_timeout(self.drain_timeout)
            .kill_timeout(self.kill_timeout)
            .replay_limit(self.replay_limit)
            .restart(RestartPolicy {
                max_restarts: self.max_restarts,
                window: self.restart_window,
                ..RestartPolicy::default()
            });
        if let Some(n) = self.processes {
            config = config.processes(n);
        }
        if let Some(listen) = self.listen {
            config = config.balancer(listen);
        }
        let mut parts = self.command.into_iter();
        let program = parts.next().unwrap_or_default();
        let command = WorkerCommand::new(program).args(parts);
        (config, command, self.metrics, self.log_format)
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
    #[arg(
        long,
        short = 'b',
        value_name = "LIST",
        value_delimiter = ',',
        required = true
    )]
    pub backends: Vec<BackendSpec>,

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
    #[arg(
        long,
        value_name = "N",
        default_value_t = 3,
        allow_hyphen_values = true
    )]
    pub connect_attempts: u32,

    /// Close both sides of a connection that carried no bytes either way for this long.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration, allow_hyphen_values = true)]
    pub idle_timeout: Duration,

    /// Once one side has half-closed (sent FIN), close both if the other stays silent this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub half_close_timeout: Duration,

    /// Connections carried at once; further clients wait in the kernel's accept backlog. Default: as many
    /// as the open-file limit allows (two descriptors each), at most 100000.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub max_connections: Option<usize>,

    /// On SIGINT/SIGTERM, how long connections in flight may take to finish before they are closed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub drain_timeout: Duration,

    /// Consecutive failed connects that take a backend out of rotation (passive health).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 3,
        allow_hyphen_values = true
    )]
    pub fail_threshold: u32,

    /// How long a failing backend stays out of rotation; doubles while it keeps failing, up to 60s.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub down_backoff: Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics (for example 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// How bytes are moved: `auto` (pooled, and splice for bulk transfers on Linux), `pooled` (buffers
    /// borrowed only while data is in flight), `splice` (Linux zero-copy through pooled pipes) or `plain`
    /// (Tokio's copy_bidirectional, the benchmark baseline; it does not enforce the idle and half-close
    /// timeouts).
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub copy_mode: CopyMode,

    /// Buffer per direction while data is in flight, in the auto and pooled modes (bytes; k and m
    /// suffixes).
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

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    // Active health checks: --check and the flags that tune it, then --on-down.
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

impl BalancerArgs {
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
        let check = self.health_check();
        let mut backends = Vec::with_capacity(self.backends.len());
        for spec in &self.backends {
            backends.push(spec.resolve().await?);
        }
        let config = BalancerConfig::new(backends)
            .strategy(self.strategy)
            .connect_timeout(self.connect_timeout)
            .connect_attempts(self.connect_attempts)
            .idle_timeout(self.idle_timeout)
            .half_close_timeout(self.half_close_timeout)
            .max_connections(
                self.max_connections
                    .unwrap_or_else(|| default_max_connections(fd_limit)),
            )
            .drain_timeout(self.drain_timeout)
            .copy_mode(self.copy_mode)
            .buffer_size(self.buffer_size)
            .replay_limit(self.replay_limit)
            .check(check)
            .on_down(self.on_down)
            .health(PassiveHealth::new(
                self.fail_threshold,
                self.down_backoff,
                PassiveHealth::default().max_backoff,
            ));
        config.validate()?;
        Ok(config)
    }
}

/// The library's configuration fields and the flags that set them.
const FLAGS: &[(&str, &str)] = &[
    ("connect_timeout", "--connect-timeout"),
    ("connect_attempts", "--connect-attempts"),
    ("idle_timeout", "--idle-timeout"),
    ("half_close_timeout", "--half-close-timeout"),
    ("drain_timeout", "--drain-timeout"),
    ("max_connections", "--max-connections"),
    ("health.failure_threshold", "--fail-threshold"),
    ("health.backoff", "--down-backoff"),
    ("buffer_size", "--buffer-size"),
    ("replay_limit", "--replay-limit"),
    ("copy_mode", "--copy-mode"),
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
];

/// A configuration error in the command's words: a field is named by the flag that sets it.
pub fn in_flag_words(e: &ConfigError) -> String {
    let flag = |field: &str| {
        FLAGS
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, flag)| *flag)
    };
    match e {
        ConfigError::NoBackends => {
            "no backends given (use --backends HOST:PORT[@WEIGHT],...)".into()
        }
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
    }
}

/// Two descriptors per connection, 64 kept for the process itself; 100,000 at most, 1 at least.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    match fd_limit {
        Some(n) => (n.saturating_sub(64) / 2).clamp(1, 100_000) as usize,
        None => 10_000,
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
        assert_eq!(default_max_connections(Some(1024)), 480);
        assert_eq!(default_max_connections(Some(10)), 1);
        assert_eq!(default_max_connections(Some(1 << 40)), 100_000);
        assert_eq!(default_max_connections(None), 10_000);
    }

    #[test]
    fn check_flags_make_the_health_check() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["ulb-tcp", "--backends", "127.0.0.1:1"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|cli| cli.balancer)
        };
        let off = parse(&[]).unwrap();
        assert_eq!(off.health_check().mode, CheckMode::None);
        assert_eq!(off.on_down, OnDown::Keep);
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
        let c = redis.health_check();
        assert_eq!(
            (c.mode, c.send.as_slice()),
            (CheckMode::SendExpect, &b"PING\r\n"[..])
        );
        assert_eq!((c.expect.as_slice(), c.rise, c.fall), (&b"+PONG"[..], 1, 3));
        assert_eq!(c.interval, Duration::from_millis(250));
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!(redis.on_down, OnDown::Cut);
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
        assert_eq!(pg.health_check().send, [0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]);
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
        let c = http.health_check();
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
            in_flag_words(&parse(extra).unwrap().health_check().validate().unwrap_err())
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
