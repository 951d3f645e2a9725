//! Metric names, their descriptions, and the handles the hot path records through.
//!
//! Every name is a constant here and is documented once (see also the README's table). Handles are
//! registered once per backend when the balancer is built, so recording on the hot path is an atomic add
//! on a handle, never a lookup of a label set. Install the recorder (for example with
//! [`install_prometheus`]) *before* building a [`TcpBalancer`](crate::TcpBalancer): handles bind to the
//! recorder in place when they are registered, and are no-ops without one.
//!
#![cfg_attr(
    not(feature = "prometheus"),
    doc = "[`install_prometheus`]: crate#features"
)]

mod handles;

use metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};

pub(crate) use handles::{BackendMetrics, CheckMetrics, GlobalMetrics};

/// Connections handed to a backend (successful connects), by `backend`.
pub const CONNECTIONS_TOTAL: &str = "ulb_connections_total";
/// Connections open (or being opened) to a backend now, by `backend`.
pub const CONNECTIONS_ACTIVE: &str = "ulb_connections_active";
/// Bytes carried, by `backend` and `direction` (`client_to_backend`, `backend_to_client`).
pub const BYTES_TOTAL: &str = "ulb_bytes_total";
/// Failed connects to a backend, by `backend` and `reason` (`refused`, `timeout`, `other`, and
/// `unanswered`: with replay on, the backend closed or reset before its first byte and the client's bytes
/// went to another backend).
pub const CONNECT_ERRORS_TOTAL: &str = "ulb_connect_errors_total";
/// Time to connect to a backend, by `backend` (histogram, seconds).
pub const CONNECT_DURATION_SECONDS: &str = "ulb_connect_duration_seconds";
/// Lifetime of proxied connections (histogram, seconds).
pub const CONNECTION_DURATION_SECONDS: &str = "ulb_connection_duration_seconds";
/// 1 while a backend is in rotation, 0 while passive health or active checks hold it down (or it is out
/// of rotation), by `backend`.
pub const BACKEND_UP: &str = "ulb_backend_up";
/// Changes of a backend's health, by `backend` and `to` (`up`, `down`).
pub const BACKEND_STATE_CHANGES_TOTAL: &str = "ulb_backend_state_changes_total";
/// A backend's configured weight, by `backend`.
pub const BACKEND_WEIGHT: &str = "ulb_backend_weight";
/// Picks that found no usable backend (every one down or already tried).
pub const NO_BACKEND_TOTAL: &str = "ulb_no_backend_total";
/// Errors from `accept()` (EMFILE and friends).
pub const ACCEPT_ERRORS_TOTAL: &str = "ulb_accept_errors_total";
/// Client connections closed without being carried, by `reason` (`no_backend`: none was available;
/// `connect_failed`: every one tried failed; `local_resources`: this host ran out of descriptors or
/// ports; `queue_full`, `queue_timeout`: every backend was at its cap, and the queue was full or the
/// wait ran out; `proxy_header`: a PROXY header missing, broken or late from a trusted source, or sent by
/// an untrusted one; `acl`: the client's address is denied, or not allowed; `per_ip_limit`: its source
/// holds its maximum of concurrent connections; `rate_limit`: its source opened its share of new
/// connections this second).
pub const CONNECTIONS_REJECTED_TOTAL: &str = "ulb_connections_rejected_total";
/// Clients waiting for a backend below its cap now (gauge).
pub const QUEUE_LENGTH: &str = "ulb_queue_length";
/// How long clients waited in the queue, served or not (histogram, seconds).
pub const QUEUE_WAIT_SECONDS: &str = "ulb_queue_wait_seconds";
/// Bursts that a spliced direction (copy mode `auto` once bulk, or `splice`) carried through a buffer
/// instead, because no pipe could be had, by `reason`: `max_pipes` (that many pipes were open already)
/// or `pipe_failed` (`pipe2` failed: the process or the system is out of descriptors, or of pipe
/// memory). The connection goes on; the next burst tries a pipe again.
pub const SPLICE_FALLBACKS_TOTAL: &str = "ulb_splice_fallbacks_total";
/// Label values of [`SPLICE_FALLBACKS_TOTAL`]'s `reason`: the `max_pipes` bound was reached.
pub const FALLBACK_MAX_PIPES: &str = "max_pipes";
/// See [`FALLBACK_MAX_PIPES`]: `pipe2` failed.
pub const FALLBACK_PIPE_FAILED: &str = "pipe_failed";
/// Time one active health check of a backend took, passed or not, by `backend` (histogram, seconds).
pub const CHECK_DURATION_SECONDS: &str = "ulb_check_duration_seconds";
/// Active health checks that failed, by `backend` and `reason`: `refused` (the connect was refused),
/// `timeout` (no connect, or no full reply, within the check timeout), `unexpected` (a reply or an HTTP
/// status that does not pass, or the backend closed before one) and `other` (any other error).
pub const CHECK_FAILURES_TOTAL: &str = "ulb_check_failures_total";
/// Always 1, with the `version` label.
pub const BUILD_INFO: &str = "ulb_build_info";
/// Reloads of the configuration file, by `result`: `ok` or `error` (the file was refused and the old
/// configuration kept serving).
pub const CONFIG_RELOADS_TOTAL: &str = "ulb_config_reloads_total";
/// When the configuration last loaded (at start, or a reload that was applied), as Unix seconds.
pub const CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP: &str =
    "ulb_config_last_reload_success_timestamp_seconds";
/// The configuration in force, as a 32-bit FNV-1a hash of the file (exact in a float): it changes
/// when a reload applied a changed file.
pub const CONFIG_HASH: &str = "ulb_config_hash";

/// Label values of [`BYTES_TOTAL`]'s `direction`.
pub const DIRECTION_CLIENT_TO_BACKEND: &str = "client_to_backend";
/// See [`DIRECTION_CLIENT_TO_BACKEND`].
pub const DIRECTION_BACKEND_TO_CLIENT: &str = "backend_to_client";

/// Prefix reserved for the cluster supervisor's series.
pub const WORKER_PREFIX: &str = "ulb_worker_";
/// Prefix reserved for the blocking pool's series.
pub const POOL_PREFIX: &str = "ulb_pool_";

/// Histogram buckets for connect times (seconds): 100 µs to 10 s.
pub const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Histogram buckets for connection lifetimes (seconds): 1 ms to 1 hour.
pub const CONNECTION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Why a connect failed (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectFailure {
    Refused,
    Timeout,
    Other,
    /// Connected, then closed or reset before sending a byte (counted only when replay is on).
    Unanswered,
}

impl ConnectFailure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Other => "other",
            ConnectFailure::Unanswered => "unanswered",
        }
    }
}

/// Why an active health check failed (the `reason` label of [`CHECK_FAILURES_TOTAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckFailure {
    Refused,
    Timeout,
    /// A reply, or an HTTP status, that does not pass; or closed before one.
    Unexpected,
    Other,
}

impl CheckFailure {
    pub(crate) const ALL: [CheckFailure; 4] = [
        CheckFailure::Refused,
        CheckFailure::Timeout,
        CheckFailure::Unexpected,
        CheckFailure::Other,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CheckFailure::Refused => "refused",
            CheckFailure::Timeout => "timeout",
            CheckFailure::Unexpected => "unexpected",
            CheckFailure::Other => "other",
        }
    }
}

/// Describes every metric to the installed recorder (HELP lines) and sets `ulb_build_info`.
pub fn describe() {
    describe_counter!(CONNECTIONS_TOTAL, "Connections handed to a backend.");
    describe_gauge!(CONNECTIONS_ACTIVE, "Connections open to a backend now.");
    describe_counter!(BYTES_TOTAL, Unit::Bytes, "Bytes carried, by direction.");
    describe_counter!(
        CONNECT_ERRORS_TOTAL,
        "Failed connects to a backend, by reason."
    );
    describe_histogram!(
        CONNECT_DURATION_SECONDS,
        Unit::Seconds,
        "Time to connect to a backend."
    );
    describe_histogram!(
        CONNECTION_DURATION_SECONDS,
        Unit::Seconds,
        "Lifetime of proxied connections."
    );
    describe_gauge!(
        BACKEND_UP,
        "1 while the backend is in rotation, 0 while held down."
    );
    describe_gauge!(BACKEND_WEIGHT, "The backend's configured weight.");
    describe_counter!(
        BACKEND_STATE_CHANGES_TOTAL,
        "Changes of a backend's health, by the state it went to."
    );
    describe_histogram!(
        CHECK_DURATION_SECONDS,
        Unit::Seconds,
        "Time one active health check took."
    );
    describe_counter!(
        CHECK_FAILURES_TOTAL,
        "Active health checks that failed, by reason."
    );
    describe_counter!(NO_BACKEND_TOTAL, "Picks that found no usable backend.");
    describe_counter!(ACCEPT_ERRORS_TOTAL, "Errors returned by accept().");
    describe_counter!(
        CONNECTIONS_REJECTED_TOTAL,
        "Client connections closed without being carried."
    );
    describe_gauge!(QUEUE_LENGTH, "Clients waiting for a backend below its cap.");
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time clients waited in the queue."
    );
    describe_counter!(
        SPLICE_FALLBACKS_TOTAL,
        "Bursts a spliced direction carried through a buffer for want of a pipe, by reason."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Reloads of the configuration file, by result (ok, error: the old one kept serving)."
    );
    describe_gauge!(
        CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP,
        Unit::Seconds,
        "When the configuration last loaded, at start or by a reload, as Unix time."
    );
    describe_gauge!(
        CONFIG_HASH,
        "FNV-1a (32 bits) of the configuration file in force."
    );
    describe_pool();
}

/// Errors from [`install_prometheus`].
#[cfg(feature = "prometheus")]
#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus recorder: {source}")]
pub struct MetricsError {
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

#[cfg(feature = "prometheus")]
pub use metrics_exporter_prometheus::PrometheusHandle;

/// How often histograms are drained into their summaries between scrapes (what the exporter's own
/// listener did before the admin server took over).
#[cfg(feature = "prometheus")]
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the Prometheus recorder as the global one, with this crate's histogram buckets, describes
/// every metric, and returns the handle that renders the text format: serve it at `/metrics` with the
/// admin server ([`AdminOptions::metrics`]), or render it yourself. Must be called from inside a Tokio
/// runtime (a task runs the recorder's upkeep), before the balancer is built. Fails if a global recorder
/// is already installed.
///
#[cfg_attr(
    feature = "admin",
    doc = "[`AdminOptions::metrics`]: crate::admin::AdminOptions::metrics"
)]
#[cfg_attr(
    not(feature = "admin"),
    doc = "[`AdminOptions::metrics`]: crate#features"
)]
#[cfg(feature = "prometheus")]
pub fn install_prometheus() -> Result<PrometheusHandle, MetricsError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let err = |e: Box<dyn std::error::Error + Send + Sync>| MetricsError { source: e };
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| err(Box::new(e)))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(CONNECT_DURATION_SECONDS.into()),
            CONNECT_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(CONNECTION_DURATION_SECONDS.into()),
                CONNECTION_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(CHECK_DURATION_SECONDS.into()),
                CONNECT_BUCKETS,
            )
        })
        .and_then(|b| b.set_buckets_for_metric(Matcher::Prefix(POOL_PREFIX.into()), POOL_BUCKETS))
        .map_err(|e| err(Box::new(e)))?
        .install_recorder()
        .map_err(|e| err(Box::new(e)))?;
    let upkeep = handle.clone();
    runtime.spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    describe();
    Ok(handle)
}

/// Describes the blocking pool's metrics (HELP lines).
pub(crate) fn describe_pool() {
    describe_gauge!(POOL_JOBS_RUNNING, "Blocking pool jobs running now.");
    describe_gauge!(
        POOL_JOBS_QUEUED,
        "Blocking pool jobs waiting for a slot now."
    );
    describe_counter!(
        POOL_JOBS_TOTAL,
        "Blocking pool jobs, by outcome (ok, panicked, rejected, timeout, cancelled)."
    );
    describe_histogram!(
        POOL_QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time from submission to start of blocking pool jobs."
    );
    describe_histogram!(
        POOL_RUN_SECONDS,
        Unit::Seconds,
        "Time blocking pool jobs ran."
    );
}

// Blocking pool

/// Jobs running on a [`BlockingPool`] now (gauge; summed over pools).
///
#[cfg_attr(feature = "pool", doc = "[`BlockingPool`]: crate::pool::BlockingPool")]
#[cfg_attr(not(feature = "pool"), doc = "[`BlockingPool`]: crate#features")]
pub const POOL_JOBS_RUNNING: &str = "ulb_pool_jobs_running";
/// Jobs admitted to a pool's queue and waiting for a slot now (gauge; summed over pools).
pub const POOL_JOBS_QUEUED: &str = "ulb_pool_jobs_queued";
/// Pool jobs by `outcome`: `ok`, `panicked`, `rejected` (queue full or pool closed), `timeout` (no slot
/// before the deadline of `run_timeout`), `cancelled` (dropped before it started).
pub const POOL_JOBS_TOTAL: &str = "ulb_pool_jobs_total";
/// Time from submission of a pool job to its start, for jobs that started (histogram, seconds).
pub const POOL_QUEUE_WAIT_SECONDS: &str = "ulb_pool_queue_wait_seconds";
/// Time a pool job ran on its blocking thread (histogram, seconds).
pub const POOL_RUN_SECONDS: &str = "ulb_pool_run_seconds";
/// Label values of [`POOL_JOBS_TOTAL`]'s `outcome`: the job ran and returned.
pub const POOL_OUTCOME_OK: &str = "ok";
/// See [`POOL_OUTCOME_OK`]: the job ran and panicked.
pub const POOL_OUTCOME_PANICKED: &str = "panicked";
/// See [`POOL_OUTCOME_OK`]: the job was refused (queue full, or pool closed) and never ran.
pub const POOL_OUTCOME_REJECTED: &str = "rejected";
/// See [`POOL_OUTCOME_OK`]: no slot came before the deadline; the job never ran.
pub const POOL_OUTCOME_TIMEOUT: &str = "timeout";
/// See [`POOL_OUTCOME_OK`]: the caller dropped the job before it started (or the runtime shut down).
pub const POOL_OUTCOME_CANCELLED: &str = "cancelled";
/// Histogram buckets for pool queue waits and run times (seconds): 10 µs to 60 s.
pub const POOL_BUCKETS: &[f64] = &[
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0,
];

// Cluster

/// 1 while a cluster worker is running (and, with the balancer, accepting on its port), else 0, by
/// `worker` (its id).
pub const WORKER_UP: &str = "ulb_worker_up";
/// Restarts of a cluster worker after it exited unexpectedly, by `worker` (rolling restarts not counted).
pub const WORKER_RESTARTS_TOTAL: &str = "ulb_worker_restarts_total";
/// Cluster workers by `state`: `starting`, `running`, `backoff`, `stopping`, `given_up`, `stopped`.
pub const WORKER_STATES: &str = "ulb_worker_states";
