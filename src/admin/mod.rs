//! The admin HTTP server (feature `admin`): Prometheus metrics, health probes and a JSON API to see and
//! steer the backends, on one port.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /` | the status page: one self-contained HTML page that shows the services and backends and refreshes itself from `/api/v1/services`; with the token typed in, buttons to drain, ready or maint a backend |
//! | `GET /metrics` | the Prometheus text format (with [`AdminOptions::metrics`]) |
//! | `GET /healthz` | readiness: 200 while every service serves with a backend in rotation; 503 while one shuts down or has none in rotation |
//! | `GET /livez` | liveness: 200 while the process serves, draining included |
//! | `GET /api/v1/services` | every service: listen addresses, strategy, queue, backends |
//! | `GET /api/v1/services/{service}` | one service |
//! | `GET /api/v1/services/{service}/backends[/{id}]` | its backends, or one |
//! | `POST /api/v1/services/{service}/backends` | add a backend: `{"address": "127.0.0.1:8081", "weight": 2}` (and `id`, `backup`, `max_connections`); 201 |
//! | `PATCH /api/v1/services/{service}/backends/{id}` | `{"state": "ready"\|"drain"\|"maint"}` and/or `{"weight": 3}`; 200 |
//! | `DELETE /api/v1/services/{service}/backends/{id}[?deadline=30s]` | out of rotation at once, removed once drained (its connections reset at the deadline, by default the service's drain timeout); 202 |
//! | `POST /api/v1/reload` | reload the configuration ([`AdminOptions::reload`]): 200 with what changed, 422 with the error (nothing changed), 409 when there is nothing to reload |
//!
//! Ids in paths are URL-encoded (`127.0.0.1%3A8081`). Errors are `{"error": "one line"}` with 400 (a
//! bad value, named), 401 (a mutating call without the token), 404 (no such path, service or backend),
//! 405 (with `Allow`), 408 (the body came too slowly), 409 (a duplicate id) or 413 (a body over the
//! cap). Only `POST`, `PATCH` and `DELETE` need the token; reading is open to whoever reaches the port.
//!
//! The server is built to face anything that connects, operators' tools or not:
//!
//! * at most [`AdminOptions::max_connections`] connections at once (256); past the cap new ones are
//!   closed at once, so idle connections cannot take the descriptors the data path needs;
//! * a request's head must come within the header timeout (5 s, from the connection's start or from the
//!   first byte after an idle spell), and a connection where nothing moves for the idle timeout (30 s) is
//!   closed; request bodies are capped (64 KiB) and must come within 10 s;
//! * a failed `accept()` (EMFILE: out of descriptors) pauses the accept loop, 10 ms doubling to 1 s, so
//!   it never spins;
//! * its warnings (accept errors, the cap, malformed requests) are rate-limited: at most one a second
//!   per kind, with the count of those held back.
//!
//! [`AdminServer::bind`] refuses a non-loopback address unless a token is set.
//!
//! ```
//! use std::time::Duration;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use ulb_tcp::admin::{AdminOptions, AdminServer, Services};
//! use ulb_tcp::{BackendConfig, BalancerConfig, TcpBalancer};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let balancer = TcpBalancer::new(BalancerConfig::new([BackendConfig::new("127.0.0.1:8081".parse()?)]))?;
//! let services = Services::single("default", balancer.handle())?;
//!
//! let admin = AdminServer::bind("127.0.0.1:0".parse()?, AdminOptions::new().token("s3cret")?)?;
//! let addr = admin.local_addr();
//! let stop = tokio_util::sync::CancellationToken::new();
//! let server = tokio::spawn(admin.serve(services, stop.clone().cancelled_owned()));
//!
//! // Drain the backend (a mutating call: it needs the token).
//! let mut s = tokio::net::TcpStream::connect(addr).await?;
//! let body = r#"{"state": "drain"}"#;
//! s.write_all(format!(
//!     "PATCH /api/v1/services/default/backends/127.0.0.1%3A8081 HTTP/1.1\r\nHost: x\r\n\
//!      Authorization: Bearer s3cret\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
//!     body.len()
//! ).as_bytes()).await?;
//! let mut answer = String::new();
//! s.read_to_string(&mut answer).await?;
//! assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
//! assert!(answer.contains(r#""state":"drain""#));
//!
//! stop.cancel();
//! server.await??;
//! # Ok(()) }
//! ```

mod api;
mod page;
mod ratelimit;
mod routes;
mod server;
mod services;
mod token;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use services::{Services, MAX_SERVICE_NAME_LEN};

use crate::metrics::PrometheusHandle;
use token::Token;

/// The default cap on admin connections at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// The default time a request's head may take to arrive.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The default time a connection may stay idle between requests.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The default time a request's body may take to arrive.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The default cap on a request body.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// Errors from setting up the admin server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// A non-loopback address with no token: anyone who reaches it could change the backends.
    #[error(
        "refusing to serve the admin API on {addr} without a token: only a loopback address may go without one"
    )]
    NoToken {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The admin address cannot be bound.
    #[error("cannot serve the admin API on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The token file cannot be read, or holds no usable token.
    #[error("admin token file {}: {why}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A token that cannot be used (empty, too long, or with whitespace inside).
    #[error("admin token: {0}")]
    BadToken(String),
    /// Two services with one name.
    #[error("a service named '{0}' is there already")]
    DuplicateService(String),
    /// A service name that cannot be used.
    #[error("service name '{0}' is not 1 to 64 letters, digits, '-', '_' or '.'")]
    BadServiceName(String),
}

impl AdminError {
    /// True for errors in what was asked (exit status 2 for the command), false for the system's
    /// (the address in use).
    pub fn is_config(&self) -> bool {
        !matches!(self, AdminError::Bind { .. })
    }
}

/// What `POST /api/v1/reload` runs: a reload of the configuration, answering what changed (a JSON
/// object) or, when nothing changed, why not (one line).
pub type ReloadFuture = Pin<Box<dyn Future<Output = Result<serde_json::Value, String>> + Send>>;

#[derive(Clone)]
pub(crate) struct ReloadHook(Arc<dyn Fn() -> ReloadFuture + Send + Sync>);

impl std::fmt::Debug for ReloadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadHook")
    }
}

/// How the admin server runs: its token, what it serves, and its limits.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    token: Option<Token>,
    metrics: Option<PrometheusHandle>,
    reload: Option<ReloadHook>,
    max_connections: usize,
    header_timeout: Duration,
    idle_timeout: Duration,
    request_timeout: Duration,
    max_body: usize,
}

impl Default for AdminOptions {
    fn default() -> Self {
        AdminOptions {
            token: None,
            metrics: None,
            reload: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

impl AdminOptions {
    /// No token, no metrics, the default limits.
    pub fn new() -> Self {
        AdminOptions::default()
    }

    /// Mutating calls need `Authorization: Bearer <token>` (`token` is trimmed; it must not be empty or
    /// hold whitespace, and is compared in constant time).
    pub fn token(mut self, token: &str) -> Result<Self, AdminError> {
        self.token = Some(Token::new(token).map_err(AdminError::BadToken)?);
        Ok(self)
    }

    /// [`token`](Self::token) from a file's content, trimmed.
    pub fn token_file(mut self, path: impl AsRef<Path>) -> Result<Self, AdminError> {
        self.token = Some(Token::from_file(path.as_ref())?);
        Ok(self)
    }

    /// True once a token is set.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Serves `/metrics` from this handle ([`install_prometheus`](crate::metrics::install_prometheus)).
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Serves `POST /api/v1/reload` (a mutating call: it needs the token) with `reload`. Without it the
    /// call answers 409: there is no configuration to reload.
    pub fn reload<F>(mut self, reload: F) -> Self
    where
        F: Fn() -> ReloadFuture + Send + Sync + 'static,
    {
        self.reload = Some(ReloadHook(Arc::new(reload)));
        self
    }

    /// Connections at once (at least 1); past it new ones are closed at once.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a request's head may take, from the connection's start or the first byte after idle.
    pub fn header_timeout(mut self, d: Duration) -> Self {
        self.header_timeout = d;
        self
    }

    /// How long a connection may carry nothing before it is closed.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// How long a request's body may take to arrive (408 past it).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// The largest request body (413 past it).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }
}

/// True for 127.0.0.0/8, `::1` and `::ffff:127.0.0.0/104`.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The admin HTTP server, bound. See the [module documentation](self).
#[derive(Debug)]
pub struct AdminServer {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    options: AdminOptions,
}

impl AdminServer {
    /// Checks the options, then binds `addr`. A non-loopback address without a token is refused
    /// ([`AdminError::NoToken`]) before anything is bound. Needs no runtime.
    pub fn bind(addr: SocketAddr, options: AdminOptions) -> Result<Self, AdminError> {
        if options.token.is_none() && !is_loopback(addr.ip()) {
            return Err(AdminError::NoToken { addr });
        }
        let bind_err = |source| AdminError::Bind { addr, source };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(bind_err)?;
        socket.set_reuse_address(true).map_err(bind_err)?;
        socket.bind(&addr.into()).map_err(bind_err)?;
        socket.listen(1024).map_err(bind_err)?;
        socket.set_nonblocking(true).map_err(bind_err)?;
        let listener: std::net::TcpListener = socket.into();
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(AdminServer {
            listener,
            addr,
            options,
        })
    }

    /// The address bound (with the port chosen, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `services` until `shutdown` completes; then stops accepting, lets the requests in flight
    /// finish (up to a second) and returns. Must run inside a Tokio runtime; fails only if the listener
    /// cannot be registered with it. Errors from `accept()` never end it.
    pub async fn serve(
        self,
        services: Services,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        let o = self.options;
        let limits = server::Limits {
            max_connections: o.max_connections,
            header_timeout: o.header_timeout,
            idle_timeout: o.idle_timeout,
        };
        let ctx = Arc::new(routes::Ctx {
            services,
            token: o.token,
            metrics: o.metrics,
            reload: o.reload,
            max_body: o.max_body,
            request_timeout: o.request_timeout,
        });
        tracing::info!(
            addr = %self.addr,
            token = ctx.token.is_some(),
            metrics = ctx.metrics.is_some(),
            "admin server listening (/, /metrics, /healthz, /livez, /api/v1)"
        );
        server::serve(listener, ctx, limits, shutdown).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses() {
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "0.0.0.0",
            "::",
            "10.0.0.1",
            "192.168.1.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_public_address_needs_a_token() {
        let e = AdminServer::bind("0.0.0.0:0".parse().unwrap(), AdminOptions::new()).unwrap_err();
        assert!(matches!(e, AdminError::NoToken { .. }), "{e}");
        assert!(e.is_config());
        assert!(AdminServer::bind("127.0.0.1:0".parse().unwrap(), AdminOptions::new()).is_ok());
    }
}
