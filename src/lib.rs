//! ulb-tcp: a Layer-4 TCP load balancer on Tokio.
//!
//! It accepts raw TCP, picks a backend from a lock-free strategy table and splices bytes both ways without
//! understanding them, so it carries HTTP, Redis, Postgres or anything else.
//!
//! # Layout, and how a connection flows through it
//!
//! ```text
//! accept ─► admit ─► pick ─► connect ─► (replay) ─► splice ─► account ─► close/abort
//! server/   server/  balance/ proxy/     proxy/       proxy/    backend/
//!  accept    limit    table    connect    replay       duplex    guard, stats
//!                       ▲        │ failure                        metrics/
//!                       │        ▼
//!            backend/registry ◄── health/passive
//!            (snapshots published on every change: handle calls, reload, discovery)
//! ```
//!
//! * `server`: [`TcpBalancer`] and its accept loops (one listener on the work-stealing runtime, or one
//!   per thread with per-core runtimes); the connection limit is a permit taken *before* `accept()`, so
//!   that at the limit clients wait in the kernel's backlog. [`BalancerHandle`] reads live state, changes
//!   the backends while the balancer runs, streams their events and starts the graceful shutdown.
//! * `proxy`: the life of one connection, which sees only its per-service `Context`: connect with
//!   retries on other backends, the optional replay phase, then two pumps (one per direction) with
//!   half-close, idle and half-close timeouts, and resets passed on as resets.
//! * [`balance`]: the [`Strategy`] table: an immutable snapshot of the backends with a smooth weighted
//!   schedule and, for least connections, a min-tree of loads. A pick is a few atomic loads and at most
//!   one `fetch_add`, and never locks.
//! * [`backend`]: one live state object per backend id (active connections, totals, bytes, health,
//!   weights, admin state), the guard that holds a connection's count, the registry that applies changes
//!   and publishes a new snapshot after each, and the event stream.
//! * [`health`]: how a backend is judged down: passive (failed connects, with a doubling back-off) and,
//!   when configured, active checks ([`HealthCheck`]: `connect`, `send-expect`, `http`), run from one
//!   place per balancer by the server's background work and written into each backend's state.
//! * [`config`]: the validated [`BalancerConfig`] with its documented ranges, and [`BackendSpec`], the
//!   `HOST:PORT@WEIGHT` form of the command line.
//! * [`edge`]: the PROXY protocol: the header parse (caps, then the `ppp` crate) and encoding, the trusted
//!   networks ([`edge::AcceptProxy`]), and reading a header off an accepted socket without taking a byte of
//!   the payload; `proxy` calls it at a connection's start only when configured.
//! * [`metrics`]: metric names, the Prometheus recorder, and handles registered once per backend.
//! * [`admin`] (feature `admin`): the admin HTTP server on one port: `/metrics`, `/healthz`, and a JSON
//!   API over a registry of named services ([`admin::Services`], each a [`BalancerHandle`]) that shows
//!   and changes their backends.
//! * [`cluster`] (feature `cluster`): supervises N worker processes (restarts with back-off, rolling
//!   restarts), optionally as the balancer's backends.
//! * [`pool`] (feature `pool`): CPU-heavy closures on Tokio's blocking threads behind bounded semaphores.
//!
//! Imports go one way: `server` → `proxy`, `health` → `backend` → `config` → `balance`, and each of them
//! → `metrics`; `cluster` and `admin` use only the public API of the others. The configuration types of
//! health live in `config`, below the backends; `health` holds the machinery that checks them, above.
//!
//! # Features
//!
//! All are on by default. With none (`default-features = false`) the crate is the balancer alone:
//! everything above but `cluster` and `pool`, with metrics recorded through whatever recorder the program
//! installs.
//!
//! * `prometheus`: [`metrics::install_prometheus`], the Prometheus recorder, rendered through its handle
//!   (metrics-exporter-prometheus, without its HTTP listener).
//! * `admin`: the [`admin`] server (hyper's HTTP/1 server, serde and serde_json); turns on `prometheus`.
//! * `cluster`: the [`cluster`] module (Tokio's `process` feature).
//! * `pool`: the [`pool`] module (no further dependency).
//! * `cli`: the `ulb-tcp` command (clap and tracing-subscriber); turns on `prometheus`, `admin` and
//!   `cluster`.
//!
//! # Example
//!
//! ```
//! use ulb_tcp::{BackendConfig, BalancerConfig, TcpBalancer};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A backend that greets.
//! let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let backend_addr = backend.local_addr()?;
//! tokio::spawn(async move {
//!     while let Ok((mut s, _)) = backend.accept().await {
//!         let _ = s.write_all(b"hello").await;
//!     }
//! });
//!
//! let balancer = TcpBalancer::new(BalancerConfig::new([BackendConfig::new(backend_addr)]))?;
//! let handle = balancer.handle();
//! let listener = ulb_tcp::bind("127.0.0.1:0".parse()?)?;
//! let addr = listener.local_addr()?;
//! let server = tokio::spawn(balancer.serve(listener, std::future::pending()));
//!
//! let mut reply = String::new();
//! tokio::net::TcpStream::connect(addr).await?.read_to_string(&mut reply).await?;
//! assert_eq!(reply, "hello");
//!
//! handle.shutdown();
//! let report = server.await??;
//! assert_eq!(report.forced, 0);
//! # Ok(()) }
//! ```
//!
// Links to what a feature left out go to the list of features instead.
#![cfg_attr(
    not(feature = "prometheus"),
    doc = "[`metrics::install_prometheus`]: #features"
)]
#![cfg_attr(not(feature = "cluster"), doc = "[`cluster`]: #features")]
#![cfg_attr(not(feature = "admin"), doc = "[`admin`]: #features")]
#![cfg_attr(not(feature = "admin"), doc = "[`admin::Services`]: #features")]
#![cfg_attr(not(feature = "pool"), doc = "[`pool`]: #features")]
#![deny(missing_docs)]

#[cfg(feature = "admin")]
pub mod admin;
pub mod backend;
pub mod balance;
mod clock;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod config;
pub mod edge;
pub mod health;
pub mod metrics;
#[cfg(feature = "pool")]
pub mod pool;
mod proxy;
mod server;
pub mod signal;
mod trigger;

pub use backend::{
    AdminState, BackendError, BackendEvent, BackendEvents, BackendId, BackendStats, DrainReport,
    Replaced,
};
pub use balance::{Strategy, UnknownStrategy};
pub use config::{
    BackendConfig, BackendSpec, BalancerConfig, ConfigError, CopyMode, PassiveHealth,
};
pub use config::{CheckMode, HealthCheck, OnDown};
pub use server::{
    bind, BalancerHandle, Bound, Drain, Listening, ShutdownReport, TcpBalancer, MAX_THREADS,
};
#[cfg(target_os = "linux")]
pub use server::{PerCoreListeners, ServingThreads};

#[doc(hidden)]
pub mod bench_support {
    //! Internals exposed for the criterion benchmarks in `benches/`; not a stable API.

    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use crate::backend::{ActiveGuard, Backend, Registry};
    use crate::config::BackendConfig;
    use crate::Strategy;

    /// A registry over backends of the given weights (their addresses are never connected to).
    pub struct Picker {
        registry: Registry,
        backends: Vec<Arc<Backend>>,
    }

    fn configs(weights: &[u32]) -> Vec<BackendConfig> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let port = 1 + (i % 65_000) as u16;
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                BackendConfig::new(addr)
                    .with_id(format!("b{i}"))
                    .with_weight(w)
            })
            .collect()
    }

    impl Picker {
        /// Builds the registry and its first table.
        pub fn new(weights: &[u32], strategy: Strategy) -> Self {
            let registry = Registry::new(
                strategy,
                42,
                &configs(weights),
                crate::backend::Policy::default(),
                CancellationToken::new(),
            );
            let backends = registry.table().entries().cloned().collect();
            Picker { registry, backends }
        }

        /// One pick, as a connection makes it (the `Arc` it returns is dropped).
        #[inline]
        pub fn pick(&self) -> bool {
            self.registry.pick(&[]).is_some()
        }

        /// The per-connection bookkeeping: guard taken, counted as connected, dropped.
        #[inline]
        pub fn bookkeeping(&self, i: usize) {
            let guard = ActiveGuard::new(self.backends[i % self.backends.len()].clone());
            guard.connected();
        }

        /// Holds `n` guards spread over the backends, so least-connections has uneven load to compare.
        pub fn hold(&self, n: usize) -> Vec<impl Sized> {
            (0..n)
                .map(|i| ActiveGuard::new(self.backends[(i * 7) % self.backends.len()].clone()))
                .collect()
        }

        /// Changes backend `i`'s weight (between 1 and 2, always to the other one, so that every call
        /// rebuilds), which rebuilds and publishes the table: the cost of a rebuild.
        pub fn rebuild(&self, i: usize) {
            let backend = &self.backends[i % self.backends.len()];
            let weight = if backend.configured_weight() == 1 {
                2
            } else {
                1
            };
            let _ = self.registry.set_weight(backend.id().as_str(), weight);
        }
    }
}
