//! ulb-tcp: a Layer-4 TCP load balancer on Tokio.
//!
//! It accepts raw TCP, picks a backend from a lock-free strategy table and splices bytes both ways without
//! understanding them, so it carries HTTP, Redis, Postgres or anything else.
//!
//! # Layout, and how a connection flows through it
//!
//! * [`config`]: the validated [`BalancerConfig`] (backends with weights, strategy, timeouts, limits) and
//!   [`BackendSpec`], the `HOST:PORT@WEIGHT` form of the command line.
//! * `balancer`: [`TcpBalancer`]. Its accept loop takes a permit under the connection limit *before*
//!   accepting (so that at the limit clients wait in the kernel's backlog), accepts, and spawns one task per
//!   connection on a `TaskTracker`; shutdown closes the listener and drains that tracker under a deadline.
//!   [`BalancerHandle`] reads live state and starts the shutdown.
//! * `strategy`: the [`Strategy`] table. Backends live in an immutable snapshot behind an `ArcSwap` with a
//!   precomputed smooth weighted schedule; a pick is a few atomic loads and at most one `fetch_add`.
//! * `backend`: one backend's atomics (active, totals, passive health) and the guard that holds an active
//!   count for exactly as long as the connection lives.
//! * `load_tree`: the min-tree of backend loads that least connections reads on large tables; the guards
//!   keep it up to date.
//! * `proxy`: the life of one connection: connect with retries on other backends, then two pumps (one per
//!   direction) with half-close, idle and half-close timeouts, and resets passed on as resets.
//! * [`metrics`]: metric names, the Prometheus exporter, and handles registered once per backend.
//! * [`cluster`]: supervises N worker processes (restarts with back-off, rolling restarts), optionally as
//!   the balancer's backends.
//!
//! ```text
//! accept ─► permit ─► task ─► Selector::pick ─► connect (timeout, ≤ N backends) ─► splice ─► close/abort
//!                                 ▲                     │ failure
//!                                 └── passive health ◄──┘
//! ```
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
#![deny(missing_docs)]

mod backend;
mod balancer;
pub mod cluster;
pub mod config;
mod load_tree;
pub mod metrics;
#[cfg(target_os = "linux")]
mod per_core;
pub mod pool;
mod proxy;
pub mod signal;
#[cfg(target_os = "linux")]
mod splice;
mod strategy;

pub use backend::BackendStats;
pub use balancer::{bind, BalancerHandle, ShutdownReport, TcpBalancer};
pub use config::{
    BackendConfig, BackendSpec, BalancerConfig, ConfigError, CopyMode, PassiveHealth,
};
#[cfg(target_os = "linux")]
pub use per_core::{PerCoreListeners, MAX_THREADS};
pub use strategy::{Strategy, UnknownStrategy};

#[doc(hidden)]
pub mod bench_support {
    //! Internals exposed for the criterion benchmarks in `benches/`; not a stable API.

    use std::sync::Arc;

    use crate::backend::{ActiveGuard, Backend};
    use crate::strategy::{Selector, Table};
    use crate::Strategy;

    /// A strategy table over backends of the given weights (their addresses are never connected to).
    pub struct Picker {
        selector: Selector,
        backends: Vec<Arc<Backend>>,
    }

    impl Picker {
        /// Builds the table.
        pub fn new(weights: &[u32], strategy: Strategy) -> Self {
            let backends: Vec<Arc<Backend>> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| {
                    let port = 1 + (i % 65_000) as u16;
                    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                    Arc::new(Backend::new(&format!("b{i}"), addr, w))
                })
                .collect();
            Picker {
                selector: Selector::new(Table::new(backends.clone()), strategy, 42),
                backends,
            }
        }

        /// One pick, as a connection makes it (the `Arc` it returns is dropped).
        #[inline]
        pub fn pick(&self) -> bool {
            self.selector.pick(&[]).is_some()
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
    }
}
