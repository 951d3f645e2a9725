//! Command-line flags (first layer) and their conversion into a validated `BalancerConfig` (second layer).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ulb_tcp::{BackendSpec, BalancerConfig, ConfigError, PassiveHealth, Strategy};

const EXAMPLES: &str = "\
Examples:
  ulb-tcp --listen 127.0.0.1:3000 --backends 127.0.0.1:8081,127.0.0.1:8082
  ulb-tcp --listen 0.0.0.0:6379 --backends redis-a:6379@3 --backends redis-b:6379 \\
          --strategy least-connections --idle-timeout 1h --metrics 127.0.0.1:9100

Durations take a unit: 250ms, 3s, 5m, 1h (a bare number is seconds).
Exit status: 0 after a graceful shutdown, 2 for bad flags or values, 1 when the balancer cannot start
(for example the listen address is in use). On SIGINT/SIGTERM it stops accepting, drains connections
in flight up to --drain-timeout and exits 0; a second signal exits at once with status 1.
Logs go to stderr; RUST_LOG (for example RUST_LOG=ulb_tcp=debug) overrides the level.";

/// A Layer-4 TCP load balancer: accepts TCP connections and splices each to a backend.
#[derive(Debug, Parser)]
#[command(name = "ulb-tcp", version, after_help = EXAMPLES)]
pub struct Cli {
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

    /// How to choose a backend for each connection.
    #[arg(long, short = 's', value_enum, default_value_t = StrategyArg::RoundRobin)]
    pub strategy: StrategyArg,

    /// Longest time one connect to a backend may take before another backend is tried.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Backends tried per client connection (each a different one) before the client is closed.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub connect_attempts: u32,

    /// Close both sides of a connection that carried no bytes either way for this long.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Once one side has half-closed (sent FIN), close both if the other stays silent this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub half_close_timeout: Duration,

    /// Connections carried at once; further clients wait in the kernel's accept backlog. Default: as many
    /// as the open-file limit allows (two descriptors each), at most 100000.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// On SIGINT/SIGTERM, how long connections in flight may take to finish before they are closed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Consecutive failed connects that take a backend out of rotation (passive health).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub fail_threshold: u32,

    /// How long a failing backend stays out of rotation; doubles while it keeps failing, up to 60s.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub down_backoff: Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics (for example 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// Weighted smooth round robin.
    RoundRobin,
    /// Fewest active connections per unit of weight.
    LeastConnections,
    /// Weighted random.
    Random,
    /// Power of two random choices, the less loaded wins.
    P2c,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Self {
        match s {
            StrategyArg::RoundRobin => Strategy::RoundRobin,
            StrategyArg::LeastConnections => Strategy::LeastConnections,
            StrategyArg::Random => Strategy::Random,
            StrategyArg::P2c => Strategy::PowerOfTwoChoices,
        }
    }
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses `250ms`, `3s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
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
        _ => return Err(format!("'{s}' has an unknown unit (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("'{s}' is out of range"))
}

impl Cli {
    /// Resolves the backends and builds the validated configuration.
    /// `fd_limit` is the process's open-file limit, for the default connection limit.
    pub async fn into_config(self, fd_limit: Option<u64>) -> Result<BalancerConfig, ConfigError> {
        let mut backends = Vec::with_capacity(self.backends.len());
        for spec in &self.backends {
            backends.push(spec.resolve().await?);
        }
        let config = BalancerConfig::new(backends)
            .strategy(self.strategy.into())
            .connect_timeout(self.connect_timeout)
            .connect_attempts(self.connect_attempts)
            .idle_timeout(self.idle_timeout)
            .half_close_timeout(self.half_close_timeout)
            .max_connections(
                self.max_connections
                    .unwrap_or_else(|| default_max_connections(fd_limit)),
            )
            .drain_timeout(self.drain_timeout)
            .health(PassiveHealth {
                failure_threshold: self.fail_threshold,
                backoff: self.down_backoff,
                ..PassiveHealth::default()
            });
        config.validate()?;
        Ok(config)
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
    }

    #[test]
    fn the_default_connection_limit_follows_the_descriptor_limit() {
        assert_eq!(default_max_connections(Some(1024)), 480);
        assert_eq!(default_max_connections(Some(10)), 1);
        assert_eq!(default_max_connections(Some(1 << 40)), 100_000);
        assert_eq!(default_max_connections(None), 10_000);
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
        let weights: Vec<u32> = cli.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [1, 3, 1]);
    }
}
