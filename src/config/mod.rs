//! Validated configuration: backends, strategy, timeouts and limits.
//!
//! Raw input (command-line flags, an embedding program's values) becomes one [`BalancerConfig`];
//! [`TcpBalancer::new`](crate::TcpBalancer::new) checks it once and everything after trusts it. Every
//! duration, size and count has a documented range, so that no accepted value can overflow a timer or a
//! counter later.
//!
//! * `backend`: [`BackendConfig`] and [`BackendSpec`], the `HOST:PORT@WEIGHT` form.
//! * `error`: [`ConfigError`], which names the field and the value.

mod backend;
mod check;
mod error;
mod health;

use std::collections::HashSet;
use std::time::Duration;

use crate::balance::Strategy;
pub use crate::edge::{AcceptProxy, IpNet, ProxyVersion, SourceLimits};
pub use backend::{BackendConfig, BackendSpec, MAX_ID_LEN};
pub(crate) use check::quoted;
pub use check::{
    escape, unescape, CheckMode, HealthCheck, MAX_CHECK_PAYLOAD, MAX_HTTP_FIELD, MAX_RISE_FALL,
};
pub use error::ConfigError;
pub use health::{OnDown, PassiveHealth};

/// The most networks in [`BalancerConfig::allow`], and in [`BalancerConfig::deny`].
pub const MAX_ACL_ENTRIES: usize = 1_000_000;

/// The largest weight a backend may have (as in HAProxy).
pub const MAX_WEIGHT: u32 = 256;

/// The longest timeout, back-off or deadline: 24 days (HAProxy's limit is 2^31 ms, 24.8 days). Far
/// below anything that could overflow a clock.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 24 * 3600);

/// The largest [`BalancerConfig::replay_limit`]: 16 MiB.
pub const MAX_REPLAY: usize = 16 << 20;

/// The smallest and largest [`BalancerConfig::buffer_size`]: 512 bytes to 16 MiB.
pub const BUFFER_SIZES: std::ops::RangeInclusive<usize> = 512..=16 << 20;

/// The largest [`BalancerConfig::max_connections`]: 16 million.
pub const MAX_CONNECTIONS: usize = 16_000_000;

/// The largest [`BalancerConfig::max_pipes`]: 16 million.
pub const MAX_PIPES: usize = 16_000_000;

/// The default [`BalancerConfig::max_pipes`]: 4096 pipes, 8192 descriptors.
pub const DEFAULT_MAX_PIPES: usize = 4096;

/// The largest [`BalancerConfig::connect_attempts`].
pub const MAX_CONNECT_ATTEMPTS: u32 = 64;

/// The largest [`PassiveHealth::failure_threshold`].
pub const MAX_FAILURE_THRESHOLD: u32 = 1000;

/// The most backends one service may have.
pub const MAX_BACKENDS: usize = 100_000;

/// Checks a backend's weight, 1..=[`MAX_WEIGHT`].
pub(crate) fn check_weight(id: &str, weight: u32) -> Result<(), ConfigError> {
    if weight == 0 || weight > MAX_WEIGHT {
        return Err(ConfigError::out_of_range(
            format!("backend '{id}' weight"),
            weight,
            format!("1..={MAX_WEIGHT}"),
        ));
    }
    Ok(())
}

/// Checks a duration against `min..=MAX_DURATION`.
fn check_duration(field: &str, d: Duration, min: Duration) -> Result<(), ConfigError> {
    if d < min || d > MAX_DURATION {
        return Err(ConfigError::out_of_range(
            field,
            format!("{d:?}"),
            format!("{min:?} to {}", "24 days"),
        ));
    }
    Ok(())
}

/// How bytes are moved between a client and its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
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
    /// bytes never enter user space. Same pumps, timeouts and accounting as `Pooled`; bytes that get no
    /// pipe (past [`BalancerConfig::max_pipes`]) go through a buffer, as in `Pooled`.
    Splice,
    /// Tokio's `copy_bidirectional` with two 8 KiB buffers per connection, held for its whole life. Kept as
    /// the portable baseline that the benchmarks compare against. Half-close and resets are handled as in
    /// `Pooled`, but the idle and half-close timeouts are not enforced (only the drain deadline is).
    Plain,
}

impl CopyMode {
    /// `auto`, `pooled`, `splice` or `plain`.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Auto => "auto",
            CopyMode::Pooled => "pooled",
            CopyMode::Splice => "splice",
            CopyMode::Plain => "plain",
        }
    }
}

impl std::fmt::Display for CopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CopyMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(CopyMode::Auto),
            "pooled" => Ok(CopyMode::Pooled),
            "plain" => Ok(CopyMode::Plain),
            "splice" => Ok(CopyMode::Splice),
            _ => Err(ConfigError::Unknown {
                field: "copy mode",
                value: s.to_string(),
                expected: "auto, pooled, splice or plain",
            }),
        }
    }
}

/// Everything a [`TcpBalancer`](crate::TcpBalancer) needs. Build it with [`BalancerConfig::new`] and the
/// chained setters; every field can also be read, and set, directly.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Each holds two descriptors (its two sockets), and two more for each direction that holds a pipe
    /// (see [`max_pipes`](Self::max_pipes)).
    pub max_connections: usize,
    /// The most `splice(2)` pipes open in the process at once, in use and pooled (default
    /// [`DEFAULT_MAX_PIPES`]; 0 to [`MAX_PIPES`]). Linux only; `Auto` and `Splice`.
    ///
    /// A direction holds a pipe (two descriptors) only while its bytes are in flight; when none can be
    /// had (this many are open, or `pipe2` fails for want of descriptors) the direction carries those
    /// bytes through a buffer instead, as in `Pooled`, and tries a pipe again for the next ones: a
    /// connection is never reset for want of a pipe (`ulb_splice_fallbacks_total` counts these). Set it
    /// so that `2 × max_connections + 2 × max_pipes` plus the process's own descriptors fit the
    /// open-file limit; the `ulb-tcp` command does so from the limit. 0 turns splicing off. Pipes are a
    /// process-wide resource: with several balancers in one process each holds the process's count of
    /// pipes to its own bound. Pipes given back are pooled per thread (at most 16 a thread, and a
    /// quarter of this bound in all) and closed beyond that.
    pub max_pipes: usize,
    /// How long a graceful shutdown waits for connections in flight (default 30 s).
    pub drain_timeout: Duration,
    /// Passive health checking.
    pub health: PassiveHealth,
    /// Bytes of buffer per direction while data is in flight (default 64 KiB; `Auto`, `Pooled`, and
    /// `Splice` for bytes that get no pipe). Idle connections hold none: buffers are borrowed from a
    /// per-thread pool only while bytes move.
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
    /// The service's name, when one process runs several: every per-backend metric then carries it as
    /// a `service` label, so that two services with a backend of the same id never share a series
    /// (default `None`: no label).
    pub service: Option<String>,
    /// A backend that joins, or comes back up, ramps its effective weight from near 0 to full over this
    /// long, with every strategy (default 0: off).
    pub slow_start: Duration,
    /// What happens to the connections open on a backend when it is marked down (default: they are kept).
    pub on_down: OnDown,
    /// Clients that find every backend that may be picked at its cap ([`BackendConfig::max_connections`])
    /// wait in a FIFO of at most this many (default 10,000); past it they are closed.
    pub max_queue: usize,
    /// How long a client may wait in that queue before it is closed (default 5 s).
    pub queue_timeout: Duration,
    /// Active health checks (default `None`: passive health alone). With checks on (any mode but
    /// [`CheckMode::None`]) a backend starts down until its first check passes; see [`HealthCheck`].
    pub check: Option<HealthCheck>,
    /// Send a PROXY protocol header of this version to the backends, first on every backend connection
    /// (retries and replays included), with the client's address and the address it connected to
    /// (default `None`).
    pub send_proxy: Option<ProxyVersion>,
    /// With [`send_proxy`](Self::send_proxy) v2: carry on the TLVs of the v2 header the client's
    /// connection came with (default `false`).
    pub send_proxy_tlvs: bool,
    /// Accept PROXY protocol headers from trusted sources (default `None`: a header is payload like any
    /// other byte). See [`AcceptProxy`].
    pub accept_proxy: Option<AcceptProxy>,
    /// Only clients from these networks are carried (default empty: every client not denied). Checked on
    /// the client's address (from its PROXY header, when one was accepted) before any backend is
    /// touched; IPv4, IPv6 and v4-mapped IPv6 are matched, in O(prefix length) however long the list.
    pub allow: Vec<IpNet>,
    /// Clients from these networks are refused, even when allowed (default empty).
    pub deny: Vec<IpNet>,
    /// Limits per client source: concurrent connections, new connections a second, the IPv6 grouping
    /// (default: none). See [`edge::limits`](crate::edge::limits) for the table's memory bound.
    pub source_limits: SourceLimits,
    /// Linux `TCP_DEFER_ACCEPT` on the balancer's listeners (default 0: off; at most
    /// [`MAX_DEFER_ACCEPT`], in whole seconds, rounded up). The kernel hands a connection to `accept()`
    /// only once the client's first bytes have arrived, or this long after the handshake: a client that
    /// speaks first (HTTP, Redis, TLS) costs one wake-up less, and one that connects and says nothing
    /// ties up no connection slot and no backend connection until then. Leave it off for protocols in
    /// which the server speaks first (SMTP, MySQL, FTP): their clients would wait this long for the
    /// greeting. Set on every listener the balancer accepts on, when it starts accepting.
    pub defer_accept: Duration,
}

/// The longest [`BalancerConfig::defer_accept`]: 10 minutes.
pub const MAX_DEFER_ACCEPT: Duration = Duration::from_secs(600);

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
            max_pipes: DEFAULT_MAX_PIPES,
            drain_timeout: Duration::from_secs(30),
            health: PassiveHealth::default(),
            buffer_size: 64 * 1024,
            copy_mode: CopyMode::Auto,
            replay_limit: 0,
            seed: None,
            service: None,
            slow_start: Duration::ZERO,
            on_down: OnDown::Keep,
            max_queue: 10_000,
            queue_timeout: Duration::from_secs(5),
            check: None,
            send_proxy: None,
            send_proxy_tlvs: false,
            accept_proxy: None,
            allow: Vec::new(),
            deny: Vec::new(),
            defer_accept: Duration::ZERO,
            source_limits: SourceLimits::default(),
        }
    }

    /// Sends PROXY protocol headers of this version to the backends.
    pub fn send_proxy(mut self, version: ProxyVersion) -> Self {
        self.send_proxy = Some(version);
        self
    }

    /// Accepts PROXY protocol headers from trusted sources.
    pub fn accept_proxy(mut self, accept: AcceptProxy) -> Self {
        self.accept_proxy = Some(accept);
        self
    }

    /// Carries only clients from these networks.
    pub fn allow(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.allow = nets.into_iter().collect();
        self
    }

    /// Refuses clients from these networks.
    pub fn deny(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.deny = nets.into_iter().collect();
        self
    }

    /// Caps concurrent connections per source.
    pub fn max_connections_per_ip(mut self, n: u32) -> Self {
        self.source_limits.max_connections = Some(n);
        self
    }

    /// Caps new connections a second per source (a burst of `n`).
    pub fn rate_per_ip(mut self, n: u32) -> Self {
        self.source_limits.rate = Some(n);
        self
    }

    /// Groups IPv6 sources by this prefix for the per-source limits (default 64).
    pub fn ipv6_prefix(mut self, len: u8) -> Self {
        self.source_limits.ipv6_prefix = len;
        self
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
    /// Sets the most pipes open at once for `splice(2)` (see [`BalancerConfig::max_pipes`]).
    pub fn max_pipes(mut self, n: usize) -> Self {
        self.max_pipes = n;
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
    /// Names the service (see [`BalancerConfig::service`]).
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.service = Some(name.into());
        self
    }
    /// Seeds the random and p2c strategies (for reproducible tests).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
    /// Sets the slow-start window (zero turns it off).
    pub fn slow_start(mut self, window: Duration) -> Self {
        self.slow_start = window;
        self
    }
    /// Sets `TCP_DEFER_ACCEPT` on the listeners (see [`defer_accept`](Self::defer_accept); 0: off).
    pub fn defer_accept(mut self, wait: Duration) -> Self {
        self.defer_accept = wait;
        self
    }
    /// Sets what a backend marked down means for its open connections.
    pub fn on_down(mut self, on_down: OnDown) -> Self {
        self.on_down = on_down;
        self
    }
    /// Sets the queue's bound and timeout for clients that find every backend at its cap.
    pub fn queue(mut self, max_queue: usize, timeout: Duration) -> Self {
        self.max_queue = max_queue;
        self.queue_timeout = timeout;
        self
    }

    /// Turns active health checks on (see [`HealthCheck`]; [`CheckMode::None`] leaves them off).
    pub fn check(mut self, check: HealthCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// True when active checks decide the backends' health.
    pub fn is_checked(&self) -> bool {
        self.check.as_ref().is_some_and(HealthCheck::is_on)
    }

    /// Checks every value against its documented range; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backends.is_empty() {
            return Err(ConfigError::NoBackends);
        }
        if self.backends.len() > MAX_BACKENDS {
            return Err(ConfigError::out_of_range(
                "backends",
                self.backends.len(),
                format!("1 to {MAX_BACKENDS} per service"),
            ));
        }
        let mut ids = HashSet::with_capacity(self.backends.len());
        for b in &self.backends {
            b.validate()?;
            if !ids.insert(b.id.as_str()) {
                return Err(ConfigError::DuplicateBackend { id: b.id.clone() });
            }
        }
        let ms = Duration::from_millis(1);
        check_duration("connect_timeout", self.connect_timeout, ms)?;
        check_duration("idle_timeout", self.idle_timeout, ms)?;
        check_duration("half_close_timeout", self.half_close_timeout, ms)?;
        check_duration("drain_timeout", self.drain_timeout, Duration::ZERO)?;
        check_duration("health.backoff", self.health.backoff, ms)?;
        check_duration("health.max_backoff", self.health.max_backoff, ms)?;
        check_duration("slow_start", self.slow_start, Duration::ZERO)?;
        check_duration("queue_timeout", self.queue_timeout, ms)?;
        if self.defer_accept > MAX_DEFER_ACCEPT {
            return Err(ConfigError::out_of_range(
                "defer_accept",
                format!("{:?}", self.defer_accept),
                "0 (off) to 10 minutes",
            ));
        }
        if self.max_queue > MAX_CONNECTIONS {
            return Err(ConfigError::out_of_range(
                "max_queue",
                self.max_queue,
                format!("0..={MAX_CONNECTIONS}"),
            ));
        }
        if !(1..=MAX_CONNECT_ATTEMPTS).contains(&self.connect_attempts) {
            return Err(ConfigError::out_of_range(
                "connect_attempts",
                self.connect_attempts,
                format!("1..={MAX_CONNECT_ATTEMPTS}"),
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(ConfigError::out_of_range(
                "max_connections",
                self.max_connections,
                format!("1..={MAX_CONNECTIONS}"),
            ));
        }
        if self.max_pipes > MAX_PIPES {
            return Err(ConfigError::out_of_range(
                "max_pipes",
                self.max_pipes,
                format!("0..={MAX_PIPES}"),
            ));
        }
        if !(1..=MAX_FAILURE_THRESHOLD).contains(&self.health.failure_threshold) {
            return Err(ConfigError::out_of_range(
                "health.failure_threshold",
                self.health.failure_threshold,
                format!("1..={MAX_FAILURE_THRESHOLD}"),
            ));
        }
        if !BUFFER_SIZES.contains(&self.buffer_size) {
            return Err(ConfigError::out_of_range(
                "buffer_size",
                self.buffer_size,
                "512 bytes to 16 MiB",
            ));
        }
        if self.replay_limit > MAX_REPLAY {
            return Err(ConfigError::out_of_range(
                "replay_limit",
                self.replay_limit,
                "0 to 16 MiB",
            ));
        }
        if let Some(check) = &self.check {
            check.validate()?;
        }
        if let Some(accept) = &self.accept_proxy {
            check_duration("accept_proxy.timeout", accept.timeout, ms)?;
            if accept.from.is_empty() {
                return Err(ConfigError::Unsupported {
                    field: "accept_proxy.from",
                    value: String::new(),
                    why: "needs at least one trusted network",
                });
            }
        }
        for (field, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if list.len() > MAX_ACL_ENTRIES {
                return Err(ConfigError::out_of_range(
                    field,
                    format!("{} networks", list.len()),
                    format!("0..={MAX_ACL_ENTRIES}"),
                ));
            }
        }
        let limits = &self.source_limits;
        if let Some(n) = limits.max_connections {
            if !(1..=MAX_CONNECTIONS).contains(&(n as usize)) {
                return Err(ConfigError::out_of_range(
                    "max_connections_per_ip",
                    n,
                    format!("1..={MAX_CONNECTIONS}"),
                ));
            }
        }
        if let Some(n) = limits.rate {
            if !(1..=crate::edge::limits::MAX_RATE).contains(&n) {
                return Err(ConfigError::out_of_range(
                    "rate_per_ip",
                    n,
                    format!("1..={}", crate::edge::limits::MAX_RATE),
                ));
            }
        }
        if !(1..=128).contains(&limits.ipv6_prefix) {
            return Err(ConfigError::out_of_range(
                "ipv6_prefix",
                limits.ipv6_prefix,
                "1..=128",
            ));
        }
        if self.copy_mode == CopyMode::Splice && !cfg!(target_os = "linux") {
            return Err(ConfigError::Unsupported {
                field: "copy_mode",
                value: "splice".into(),
                why: "needs Linux",
            });
        }
        if self.replay_limit > 0 && self.copy_mode == CopyMode::Plain {
            return Err(ConfigError::Unsupported {
                field: "copy_mode",
                value: "plain".into(),
                why: "cannot replay (replay needs copy mode auto, pooled or splice)",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field_and_the_value() {
        let b = BackendConfig::new("127.0.0.1:1".parse().unwrap());
        assert_eq!(
            BalancerConfig::new([]).validate(),
            Err(ConfigError::NoBackends)
        );
        let err = BalancerConfig::new([b.clone().with_weight(0)])
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "backend '127.0.0.1:1' weight 0 is out of range (1..=256)"
        );
        let err = BalancerConfig::new([b.clone()])
            .connect_timeout(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("connect_timeout 0ns is out of range"),
            "{err}"
        );
        let replay = BalancerConfig::new([b.clone()]).replay_limit(64 << 10);
        assert!(replay.clone().validate().is_ok());
        let err = replay.clone().copy_mode(CopyMode::Plain).validate();
        assert!(err.unwrap_err().to_string().contains("'plain'"));
        let err = replay.replay_limit(17 << 20).validate();
        assert!(err.unwrap_err().to_string().contains("17825792"));
        // Pipes: 0 (no splicing) to MAX_PIPES.
        assert!(BalancerConfig::new([b.clone()])
            .max_pipes(0)
            .validate()
            .is_ok());
        assert!(BalancerConfig::new([b.clone()])
            .max_pipes(MAX_PIPES)
            .validate()
            .is_ok());
        let err = BalancerConfig::new([b.clone()])
            .max_pipes(MAX_PIPES + 1)
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "max_pipes 16000001 is out of range (0..=16000000)"
        );
    }

    #[test]
    fn accepting_proxy_headers_needs_a_network_and_a_sane_timeout() {
        let b = BackendConfig::new("127.0.0.1:1".parse().unwrap());
        let net: crate::edge::IpNet = "10.0.0.0/8".parse().unwrap();
        let ok = BalancerConfig::new([b.clone()]).accept_proxy(AcceptProxy::new([net]));
        assert!(ok.validate().is_ok());
        let none = BalancerConfig::new([b.clone()]).accept_proxy(AcceptProxy::new([]));
        assert!(none
            .validate()
            .unwrap_err()
            .to_string()
            .contains("trusted network"));
        let zero = BalancerConfig::new([b])
            .accept_proxy(AcceptProxy::new([net]).timeout(Duration::ZERO))
            .validate()
            .unwrap_err();
        assert!(
            zero.to_string().starts_with("accept_proxy.timeout 0ns"),
            "{zero}"
        );
        // v4-mapped sources match their IPv4 network.
        let accept = AcceptProxy::new([net]);
        assert!(accept.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(accept.trusts("10.1.2.3".parse().unwrap()));
        assert!(!accept.trusts("11.1.2.3".parse().unwrap()));
        let v6 = AcceptProxy::new(["2001:db8::/32".parse().unwrap()]);
        assert!(v6.trusts("2001:db8::1".parse().unwrap()));
        assert!(!v6.trusts("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn a_duplicate_backend_is_refused() {
        let b = BackendConfig::new("127.0.0.1:1".parse().unwrap());
        let err = BalancerConfig::new([b.clone(), b.clone().with_weight(2)])
            .validate()
            .unwrap_err();
        assert_eq!(
            err,
            ConfigError::DuplicateBackend {
                id: "127.0.0.1:1".into()
            }
        );
        // The same address under two ids is two backends.
        let two = BalancerConfig::new([b.clone(), b.with_id("again")]);
        assert!(two.validate().is_ok());
    }

    #[test]
    fn every_duration_is_bounded() {
        let b = BackendConfig::new("127.0.0.1:1".parse().unwrap());
        let huge = Duration::from_secs(2_600_000_000_000_000 * 3600);
        let configs = [
            BalancerConfig::new([b.clone()]).idle_timeout(huge),
            BalancerConfig::new([b.clone()]).half_close_timeout(huge),
            BalancerConfig::new([b.clone()]).drain_timeout(huge),
            BalancerConfig::new([b.clone()]).connect_timeout(huge),
            BalancerConfig::new([b.clone()]).health(PassiveHealth::new(3, huge, huge)),
        ];
        for c in configs {
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains("out of range (") && err.contains("24 days"),
                "{err}"
            );
        }
        let at_max = BalancerConfig::new([b])
            .idle_timeout(MAX_DURATION)
            .half_close_timeout(MAX_DURATION)
            .drain_timeout(MAX_DURATION)
            .connect_timeout(MAX_DURATION);
        assert!(at_max.validate().is_ok());
    }
}
