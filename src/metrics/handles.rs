//! The handles the hot path records through, registered once per backend or per balancer.

use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use super::{
    CheckFailure, ConnectFailure, ACCEPT_ERRORS_TOTAL, BACKEND_STATE_CHANGES_TOTAL, BACKEND_UP,
    BACKEND_WEIGHT, BYTES_TOTAL, CHECK_DURATION_SECONDS, CHECK_FAILURES_TOTAL, CONNECTIONS_ACTIVE,
    CONNECTIONS_REJECTED_TOTAL, CONNECTIONS_TOTAL, CONNECTION_DURATION_SECONDS,
    CONNECT_DURATION_SECONDS, CONNECT_ERRORS_TOTAL, DIRECTION_BACKEND_TO_CLIENT,
    DIRECTION_CLIENT_TO_BACKEND, FALLBACK_MAX_PIPES, FALLBACK_PIPE_FAILED, NO_BACKEND_TOTAL,
    QUEUE_LENGTH, QUEUE_WAIT_SECONDS, SPLICE_FALLBACKS_TOTAL,
};

/// The labels of a backend's series: `service` (when the balancer has a name), `backend`, then `more`.
fn labels(
    service: Option<&str>,
    backend: &str,
    more: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let mut all = Vec::with_capacity(2 + more.len());
    if let Some(s) = service {
        all.push(("service", s.to_string()));
    }
    all.push(("backend", backend.to_string()));
    all.extend(more.iter().map(|(k, v)| (*k, v.to_string())));
    all
}

/// Per-backend handles, registered once.
#[derive(Debug)]
pub(crate) struct BackendMetrics {
    connections: Counter,
    active: Gauge,
    pub(crate) bytes_to_backend: Counter,
    pub(crate) bytes_to_client: Counter,
    refused: Counter,
    timeout: Counter,
    other: Counter,
    unanswered: Counter,
    connect_duration: Histogram,
    up: Gauge,
    weight: Gauge,
    went_up: Counter,
    went_down: Counter,
}

impl BackendMetrics {
    pub(crate) fn register(service: Option<&str>, backend: &str) -> Self {
        let labels = |more: &[(&'static str, &str)]| labels(service, backend, more);
        let b = || labels(&[]);
        let errors = |reason: ConnectFailure| {
            counter!(
                CONNECT_ERRORS_TOTAL,
                &labels(&[("reason", reason.as_str())])
            )
        };
        BackendMetrics {
            connections: counter!(CONNECTIONS_TOTAL, &b()),
            active: gauge!(CONNECTIONS_ACTIVE, &b()),
            bytes_to_backend: counter!(
                BYTES_TOTAL,
                &labels(&[("direction", DIRECTION_CLIENT_TO_BACKEND)])
            ),
            bytes_to_client: counter!(
                BYTES_TOTAL,
                &labels(&[("direction", DIRECTION_BACKEND_TO_CLIENT)])
            ),
            refused: errors(ConnectFailure::Refused),
            timeout: errors(ConnectFailure::Timeout),
            other: errors(ConnectFailure::Other),
            unanswered: errors(ConnectFailure::Unanswered),
            connect_duration: histogram!(CONNECT_DURATION_SECONDS, &b()),
            up: gauge!(BACKEND_UP, &b()),
            weight: gauge!(BACKEND_WEIGHT, &b()),
            went_up: counter!(BACKEND_STATE_CHANGES_TOTAL, &labels(&[("to", "up")])),
            went_down: counter!(BACKEND_STATE_CHANGES_TOTAL, &labels(&[("to", "down")])),
        }
    }

    pub(crate) fn active_up(&self) {
        self.active.increment(1.0);
    }
    pub(crate) fn active_down(&self) {
        self.active.decrement(1.0);
    }
    pub(crate) fn connected(&self) {
        self.connections.increment(1);
    }
    pub(crate) fn connected_in(&self, d: Duration) {
        self.connect_duration.record(d.as_secs_f64());
    }
    pub(crate) fn connect_failed(&self, why: ConnectFailure) {
        match why {
            ConnectFailure::Refused => &self.refused,
            ConnectFailure::Timeout => &self.timeout,
            ConnectFailure::Other => &self.other,
            ConnectFailure::Unanswered => &self.unanswered,
        }
        .increment(1);
    }
    pub(crate) fn set_up(&self, up: bool) {
        self.up.set(if up { 1.0 } else { 0.0 });
    }
    /// Counts a change of its health.
    pub(crate) fn state_changed(&self, up: bool) {
        if up { &self.went_up } else { &self.went_down }.increment(1);
    }
    pub(crate) fn set_weight(&self, w: u32) {
        self.weight.set(f64::from(w));
    }
}

/// Per-backend handles of its active health checks, registered once per backend checked.
#[derive(Debug)]
pub(crate) struct CheckMetrics {
    duration: Histogram,
    /// By [`CheckFailure`], in the order of [`CheckFailure::ALL`].
    failures: [Counter; 4],
}

impl CheckMetrics {
    pub(crate) fn register(service: Option<&str>, backend: &str) -> Self {
        let failures = CheckFailure::ALL.map(|reason| {
            counter!(
                CHECK_FAILURES_TOTAL,
                &labels(service, backend, &[("reason", reason.as_str())])
            )
        });
        CheckMetrics {
            duration: histogram!(CHECK_DURATION_SECONDS, &labels(service, backend, &[])),
            failures,
        }
    }

    /// One check, which took `took`, and why it failed, if it did.
    pub(crate) fn checked(&self, took: Duration, failure: Option<CheckFailure>) {
        self.duration.record(took.as_secs_f64());
        if let Some(f) = failure {
            self.failures[f as usize].increment(1);
        }
    }
}

/// Handles that do not depend on a backend.
#[derive(Debug)]
pub(crate) struct GlobalMetrics {
    pub(crate) no_backend: Counter,
    pub(crate) accept_errors: Counter,
    pub(crate) rejected_no_backend: Counter,
    pub(crate) rejected_connect_failed: Counter,
    pub(crate) rejected_local_resources: Counter,
    pub(crate) rejected_queue_full: Counter,
    pub(crate) rejected_queue_timeout: Counter,
    pub(crate) rejected_proxy_header: Counter,
    pub(crate) rejected_acl: Counter,
    pub(crate) rejected_per_ip_limit: Counter,
    pub(crate) rejected_rate_limit: Counter,
    pub(crate) connection_duration: Histogram,
    pub(crate) queue_length: Gauge,
    pub(crate) queue_wait: Histogram,
    /// A burst went through a buffer: `max_pipes` pipes were open.
    pub(crate) fallback_max_pipes: Counter,
    /// A burst went through a buffer: `pipe2` failed.
    pub(crate) fallback_pipe_failed: Counter,
}

impl GlobalMetrics {
    pub(crate) fn register() -> Self {
        GlobalMetrics {
            no_backend: counter!(NO_BACKEND_TOTAL),
            accept_errors: counter!(ACCEPT_ERRORS_TOTAL),
            rejected_no_backend: counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => "no_backend"),
            rejected_connect_failed: counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => "connect_failed"),
            rejected_local_resources: counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => "local_resources"),
            rejected_queue_full: counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => "queue_full"),
            rejected_queue_timeout: counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => "queue_timeout"),
            rejected_proxy_header: counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => "proxy_header"),
            rejected_acl: counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => "acl"),
            rejected_per_ip_limit: counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => "per_ip_limit"),
            rejected_rate_limit: counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => "rate_limit"),
            connection_duration: histogram!(CONNECTION_DURATION_SECONDS),
            queue_length: gauge!(QUEUE_LENGTH),
            queue_wait: histogram!(QUEUE_WAIT_SECONDS),
            fallback_max_pipes: counter!(SPLICE_FALLBACKS_TOTAL, "reason" => FALLBACK_MAX_PIPES),
            fallback_pipe_failed: counter!(SPLICE_FALLBACKS_TOTAL, "reason" => FALLBACK_PIPE_FAILED),
        }
    }
}
