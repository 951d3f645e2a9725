//! Validated configuration: backends, strategy, timeouts and limits.
//!
//! Raw input (command-line flags, an embedding program's values) becomes one [`BalancerConfig`];
//! [`TcpBalancer::new`](crate::TcpBalancer::new) checks it once and everything after trusts it.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::strategy::Strategy;

/// The largest weight a backend may have (as in HAProxy).
pub const MAX_WEIGHT: u32 = 256;

/// The largest [`BalancerConfig::replay_limit`].
const MAX_REPLAY: usize = 16 << 20;

/// One backend: where to connect and how much traffic it takes relative to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The name in logs, metrics and stats; usually the address as written (`app-1:8080`).
    pub name: String,
    /// Where connections go.
    pub addr: SocketAddr,
    /// Relative share of connections, 1..=256.
    pub weight: u32,
}

impl BackendConfig {
    /// A backend of weight 1 named after its address.
    pub fn new(addr: SocketAddr) -> Self {
        BackendConfig {
            name: addr.to_string(),
            addr,
            weight: 1,
        }
    }

    /// The same backend with another weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// A backend as written on the command line, `HOST:PORT` or `HOST:PORT@WEIGHT`, before name resolution.
///
/// ```
/// use ulb_tcp::BackendSpec;
/// let spec: BackendSpec = "localhost:8081@3".parse().unwrap();
/// assert_eq!(spec.host_port, "localhost:8081");
/// assert_eq!(spec.weight, 3);
/// assert!("localhost".parse::<BackendSpec>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT`.
    pub host_port: String,
    /// The weight after `@`, 1 when absent.
    pub weight: u32,
}

impl FromStr for BackendSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ConfigError::BadBackend {
            value: s.to_string(),
            why: why.to_string(),
        };
        let s_trim = s.trim();
        let (host_port, weight) = match s_trim.rsplit_once('@') {
            Some((hp, w)) => {
                let weight: u32 = w
                    .parse()
                    .map_err(|_| bad("the weight after '@' must be a whole number"))?;
                (hp, weight)
            }
            None => (s_trim, 1),
        };
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(bad(&format!("weight must be 1..={MAX_WEIGHT}")));
        }
        let (host, port) = host_port
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        match port.parse::<u16>() {
            Ok(p) if p != 0 => {}
            _ => return Err(bad("the port must be 1..=65535")),
        }
        Ok(BackendSpec {
            host_port: host_port.to_string(),
            weight,
        })
    }
}

impl BackendSpec {
    /// Resolves the host (literal addresses need no lookup); the first address returned is used.
    pub async fn resolve(&self) -> Result<BackendConfig, ConfigError> {
        let unresolvable = |why: String| ConfigError::Unresolvable {
            value: self.host_port.clone(),
            why,
        };
        let addr = if let Ok(addr) = self.host_port.parse::<SocketAddr>() {
            addr
        } else {
            let lookup = tokio::net::lookup_host(self.host_port.as_str());
            match tokio::time::timeout(Duration::from_secs(10), lookup).await {
                Err(_) => return Err(unresolvable("lookup timed out after 10s".into())),
                Ok(Err(e)) => return Err(unresolvable(e.to_string())),
                Ok(Ok(mut addrs)) => addrs
                    .next()
                    .ok_or_else(|| unresolvable("no addresses".into()))?,
            }
        };
        Ok(BackendConfig {
            name: self.host_port.clone(),
            addr,
            weight: self.weight,
        })
    }
}

/// How bytes are moved between a client and its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CopyMode {
    /// `Pooled`, except that on Linux a direction whose read fills the whole buffer (a bulk transfer)
    /// goes on with `splice(2)`, as in `Splice`. Small exchanges keep the pooled path, which answers them
    /// with fewer system calls; bulk gets the zero-copy one. The default.
    #[default]
    Auto,
    /// ulb-tcp's own pumps: one per direction, buffers borrowed from a per-thread pool only while data is
    /// in flight, idle and half-close timeouts enforced.
    Pooled,
    /// Linux only: `splice(2)` through a pipe borrowed from a per-thread pool while data is in flight, so
    /// bytes never enter user space. Same pumps, timeouts and accounting as `Pooled`.
    Splice,
    /// Tokio's `copy_bidirectional` with two 8 KiB buffers per connection, held for its whole life. Kept as
    /// the portable baseline that the benchmarks compare against. Half-close and resets are handled as in
    /// `Pooled`, but the idle and half-close timeouts are not enforced (only the drain deadline is).
    Plain,
}

impl std::str::FromStr for CopyMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(CopyMode::Auto),
            "pooled" => Ok(CopyMode::Pooled),
            "plain" => Ok(CopyMode::Plain),
            "splice" => Ok(CopyMode::Splice),
            _ => Err(ConfigError::Invalid(format!(
                "unknown copy mode '{s}' (expected auto, pooled, splice or plain)"
            ))),
        }
    }
}

/// Passive health: how connect failures take a backend out of rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Consecutive failed connects that mark a backend down (default 3).
    pub failure_threshold: u32,
    /// The first back-off (default 5 s); it doubles each time the backend is marked down again.
    pub backoff: Duration,
    /// The longest back-off (default 60 s).
    pub max_backoff: Duration,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            failure_threshold: 3,
            backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Everything a [`TcpBalancer`](crate::TcpBalancer) needs. Build it with [`BalancerConfig::new`] and the
/// chained setters; every field also stays public.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerConfig {
    /// The backends, at least one.
    pub backends: Vec<BackendConfig>,
    /// How backends are chosen.
    pub strategy: Strategy,
    /// How long one connect to a backend may take (default 3 s).
    pub connect_timeout: Duration,
    /// Backends tried per client connection before giving up, each a different one (default 3).
    pub connect_attempts: u32,
    /// A connection with no bytes either way for this long is closed on both sides (default 5 min).
    pub idle_timeout: Duration,
    /// Once one direction has ended (a FIN was passed on), the other may stay silent this long before
    /// both are closed (default 30 s; like HAProxy's `timeout client-fin` / `server-fin`).
    pub half_close_timeout: Duration,
    /// Connections carried at once; at the limit new clients wait in the kernel's backlog (default 10,000).
    pub max_connections: usize,
    /// How long a graceful shutdown waits for connections in flight (default 30 s).
    pub drain_timeout: Duration,
    /// Passive health checking.
    pub health: PassiveHealth,
    /// Bytes of buffer per direction while data is in flight (default 64 KiB; `Auto` and `Pooled`). Idle
    /// connections hold none: buffers are borrowed from a per-thread pool only while bytes move.
    pub buffer_size: usize,
    /// How bytes are moved (default [`CopyMode::Auto`]).
    pub copy_mode: CopyMode,
    /// Replay up to this many bytes of the client's data to another backend when the chosen one closes
    /// or resets the connection before sending a single byte back (default 0: off).
    ///
    /// Until the backend's first byte arrives, the client's bytes are kept (as well as sent); if the
    /// backend then goes away — it crashed, was killed, or its listen queue was dropped — another backend
    /// is connected, sent the same bytes (and the client's FIN, if it came) and the client never knows.
    /// Past the limit, or once the backend has answered, the connection is committed to it.
    ///
    /// Off by default because it is only safe when a request that got no answer may be delivered twice:
    /// a backend that acted on a request and died before replying will see it again on another backend.
    /// The cluster turns it on (its workers are replicas of one program, and a crashed worker is the
    /// event it exists to hide). Not with [`CopyMode::Plain`].
    pub replay_limit: usize,
    /// Seed for the random and p2c strategies; `None` takes one from the OS.
    pub seed: Option<u64>,
}

impl BalancerConfig {
    /// A configuration with these backends and every default.
    pub fn new(backends: impl IntoIterator<Item = BackendConfig>) -> Self {
        BalancerConfig {
            backends: backends.into_iter().collect(),
            strategy: Strategy::RoundRobin,
            connect_timeout: Duration::from_secs(3),
            connect_attempts: 3,
            idle_timeout: Duration::from_secs(300),
            half_close_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            health: PassiveHealth::default(),
            buffer_size: 64 * 1024,
            copy_mode: CopyMode::Auto,
            replay_limit: 0,
            seed: None,
        }
    }

    /// Sets the strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }
    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    /// Sets how many backends one client connection may try.
    pub fn connect_attempts(mut self, n: u32) -> Self {
        self.connect_attempts = n;
        self
    }
    /// Sets the idle timeout.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }
    /// Sets the half-close timeout.
    pub fn half_close_timeout(mut self, d: Duration) -> Self {
        self.half_close_timeout = d;
        self
    }
    /// Sets the connection limit.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }
    /// Sets the drain deadline of a graceful shutdown.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }
    /// Sets the passive health policy.
    pub fn health(mut self, health: PassiveHealth) -> Self {
        self.health = health;
        self
    }
    /// Sets the per-direction buffer size.
    pub fn buffer_size(mut self, bytes: usize) -> Self {
        self.buffer_size = bytes;
        self
    }
    /// Sets how bytes are moved.
    pub fn copy_mode(mut self, mode: CopyMode) -> Self {
        self.copy_mode = mode;
        self
    }
    /// Sets how many of the client's bytes may be replayed to another backend that has not answered yet
    /// (0 turns replay off; see [`BalancerConfig::replay_limit`]).
    pub fn replay_limit(mut self, bytes: usize) -> Self {
        self.replay_limit = bytes;
        self
    }
    /// Seeds the random and p2c strategies (for reproducible tests).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Checks every value; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backends.is_empty() {
            return Err(ConfigError::NoBackends);
        }
        for b in &self.backends {
            if b.weight == 0 || b.weight > MAX_WEIGHT {
                return Err(ConfigError::BadBackend {
                    value: format!("{}@{}", b.name, b.weight),
                    why: format!("weight must be 1..={MAX_WEIGHT}"),
                });
            }
        }
        let nonzero = [
            ("connect timeout", self.connect_timeout),
            ("idle timeout", self.idle_timeout),
            ("half-close timeout", self.half_close_timeout),
        ];
        for (what, d) in nonzero {
            if d.is_zero() {
                return Err(ConfigError::Invalid(format!("{what} must be more than 0")));
            }
        }
        if self.connect_attempts == 0 {
            return Err(ConfigError::Invalid(
                "connect attempts must be at least 1".into(),
            ));
        }
        if self.max_connections == 0 || self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError::Invalid(format!(
                "max connections {} is out of range (1..={})",
                self.max_connections,
                tokio::sync::Semaphore::MAX_PERMITS
            )));
        }
        if self.copy_mode == CopyMode::Splice && !cfg!(target_os = "linux") {
            return Err(ConfigError::Invalid(
                "copy mode 'splice' needs Linux".into(),
            ));
        }
        if self.health.failure_threshold == 0 {
            return Err(ConfigError::Invalid(
                "failure threshold must be at least 1".into(),
            ));
        }
        if !(512..=16 << 20).contains(&self.buffer_size) {
            return Err(ConfigError::Invalid(format!(
                "buffer size {} is out of range (512 bytes to 16 MiB)",
                self.buffer_size
            )));
        }
        if self.replay_limit > 0 && self.copy_mode == CopyMode::Plain {
            return Err(ConfigError::Invalid(
                "replay needs copy mode 'pooled' or 'splice', not 'plain' (the benchmark baseline)"
                    .into(),
            ));
        }
        if self.replay_limit > MAX_REPLAY {
            return Err(ConfigError::Invalid(format!(
                "replay limit {} is out of range (0 to 16 MiB)",
                self.replay_limit
            )));
        }
        Ok(())
    }
}

/// A configuration that cannot be used. Each message names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No backend was given.
    #[error("no backends given (use --backends HOST:PORT[@WEIGHT],...)")]
    NoBackends,
    /// A backend that does not parse or has a bad weight.
    #[error("bad backend '{value}': {why}")]
    BadBackend {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A backend host that does not resolve.
    #[error("cannot resolve backend '{value}': {why}")]
    Unresolvable {
        /// The value as given.
        value: String,
        /// The resolver's answer.
        why: String,
    },
    /// Any other bad value.
    #[error("{0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_specs_parse_and_reject() {
        let ok = |s: &str| s.parse::<BackendSpec>().unwrap();
        assert_eq!(ok("127.0.0.1:80").weight, 1);
        assert_eq!(ok("[::1]:80@7").host_port, "[::1]:80");
        assert_eq!(ok("[::1]:80@7").weight, 7);
        for bad in [
            "", "host", "host:", ":80", "h:0", "h:70000", "h:80@0", "h:80@x", "h:80@257",
        ] {
            let err = bad.parse::<BackendSpec>().unwrap_err().to_string();
            assert!(
                err.contains(&format!("'{bad}'")),
                "{err} should name {bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn literal_addresses_resolve_without_lookup() {
        let spec: BackendSpec = "[::1]:8080@2".parse().unwrap();
        let b = spec.resolve().await.unwrap();
        assert_eq!(b.addr, "[::1]:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(b.weight, 2);
        assert_eq!(b.name, "[::1]:8080");
    }

    #[test]
    fn validation_names_the_problem() {
        let b = BackendConfig::new("127.0.0.1:1".parse().unwrap());
        assert_eq!(
            BalancerConfig::new([]).validate(),
            Err(ConfigError::NoBackends)
        );
        let err = BalancerConfig::new([b.clone().with_weight(0)])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:1@0"), "{err}");
        let err = BalancerConfig::new([b.clone()])
            .connect_timeout(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("connect timeout"), "{err}");
        let replay = BalancerConfig::new([b]).replay_limit(64 << 10);
        assert!(replay.clone().validate().is_ok());
        let err = replay.clone().copy_mode(CopyMode::Plain).validate();
        assert!(err.unwrap_err().to_string().contains("'plain'"));
        let err = replay.replay_limit(17 << 20).validate();
        assert!(err.unwrap_err().to_string().contains("17825792"));
    }
}
