//! The supervisor: one task per worker (start, watch, restart with back-off, replace on request) and the
//! run loop that ties them to the balancer and the shutdown.

use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::output::{Output, Stream};
use super::{
    display_args, sys, Cluster, ClusterError, CrashLog, Shared, WorkerCmd, WorkerState,
    WorkerStatus, ENV_CLUSTER_SIZE, ENV_PORT, ENV_WORKER_ID, ENV_WORKER_PORT,
};
use crate::metrics::{WORKER_RESTARTS_TOTAL, WORKER_STATES, WORKER_UP};
use crate::{AdminState, BackendEvent, BackendEvents, BalancerHandle};

/// Metric handles, registered once.
#[derive(Debug)]
pub(super) struct ClusterMetrics {
    up: Vec<Gauge>,
    restarts: Vec<Counter>,
    states: Vec<(WorkerState, Gauge)>,
}

impl ClusterMetrics {
    pub(super) fn register(processes: usize) -> Self {
        describe_gauge!(
            WORKER_UP,
            "1 while the worker is running and accepting, else 0."
        );
        describe_counter!(
            WORKER_RESTARTS_TOTAL,
            "Restarts of the worker after it exited unexpectedly."
        );
        describe_gauge!(WORKER_STATES, "Workers by state.");
        let worker = |id: usize| [("worker", id.to_string())];
        ClusterMetrics {
            up: (0..processes)
                .map(|id| gauge!(WORKER_UP, &worker(id)))
                .collect(),
            restarts: (0..processes)
                .map(|id| counter!(WORKER_RESTARTS_TOTAL, &worker(id)))
                .collect(),
            states: WorkerState::ALL
                .iter()
                .map(|&s| (s, gauge!(WORKER_STATES, "state" => s.as_str())))
                .collect(),
        }
    }

    /// Sets `ulb_worker_states` (count by state) and `ulb_worker_up` from the workers' states.
    pub(super) fn publish_states(&self, workers: &[WorkerStatus]) {
        for (state, gauge) in &self.states {
            let n = workers.iter().filter(|w| w.state == *state).count();
            gauge.set(n as f64);
        }
        for (w, up) in workers.iter().zip(&self.up) {
            up.set(if w.state == WorkerState::Running {
                1.0
            } else {
                0.0
            });
        }
    }
}

/// See [`Cluster::run`].
pub(super) async fn run(
    cluster: Cluster,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClusterError> {
    let Cluster {
        shared,
        command,
        program,
        balancer,
        receivers,
    } = cluster;
    let config = &shared.config;

    // Every worker port must be free before any worker starts: a process that already listens there
    // would answer in a worker's place.
    if config.checks_port() {
        for id in 0..config.processes {
            let port = config.worker_port(id);
            if let Err(holder) = super::ports::ensure_free(port) {
                return Err(ClusterError::PortTaken { port, holder });
            }
        }
    }
    // Bind before starting any worker, so that an address in use fails fast and leaves nothing behind.
    let listener = match config.listen {
        Some(addr) if balancer.is_some() => {
            Some(crate::bind(addr).map_err(|source| ClusterError::Bind { addr, source })?)
        }
        _ => None,
    };
    let output = match Output::start() {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the output thread; workers write to our stdout/stderr directly");
            None
        }
    };
    tracing::info!(
        processes = config.processes,
        base_port = config.base_port,
        listen = ?config.listen,
        command = %display_args(&program, &command.args),
        "cluster starting"
    );

    // Health verdicts on the workers (from the balancer's checks), into their status and the log.
    let health_watch = shared.balancer.as_ref().map(|b| {
        let (events, shared) = (b.events(), shared.clone());
        tokio::spawn(report_health(shared, events))
    });
    let balancer_stop = CancellationToken::new();
    let mut serve = match (balancer, listener) {
        (Some(b), Some(l)) => Some(tokio::spawn(
            b.serve(l, balancer_stop.clone().cancelled_owned()),
        )),
        _ => None,
    };

    let mut workers = JoinSet::new();
    for (id, rx) in receivers.into_iter().enumerate() {
        let port = config.worker_port(id);
        let worker = Worker {
            id,
            port,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            backend_id: SocketAddr::from(([127, 0, 0, 1], port)).to_string(),
            shared: shared.clone(),
            program: program.clone(),
            arg0: command.program.clone(),
            args: command.args_for(id, port),
            output: output.clone(),
        };
        workers.spawn(worker.run(rx));
    }
    drop(output);

    let mut status = shared.status.subscribe();
    let n = config.processes;
    let all_given_up = status.wait_for(|w| w.iter().all(|w| w.state == WorkerState::GivenUp));
    let gave_up = tokio::select! {
        () = shutdown => false,
        () = shared.shutdown.cancelled() => false,
        r = all_given_up => r.is_ok(),
    };
    shared.shutdown.cancel();

    // The balancer first: it stops accepting and drains while the workers still serve.
    if let Some(serve) = serve.as_mut() {
        balancer_stop.cancel();
        tokio::select! {
            r = &mut *serve => match r {
                Ok(Ok(report)) => tracing::info!(forced = report.forced, "balancer drained"),
                Ok(Err(e)) => tracing::error!(error = %e, "balancer failed"),
                Err(e) => tracing::error!(error = %e, "balancer task failed"),
            },
            () = shared.hard_stop.cancelled() => {
                serve.abort();
                tracing::warn!("balancer drain cut short");
            }
        }
    }
    if let Some(watch) = health_watch {
        watch.abort();
    }
    shared.stop_workers.cancel();
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "a worker's supervisor task failed");
        }
    }
    if gave_up {
        tracing::error!(
            processes = n,
            "every worker was given up; the cluster stops"
        );
        return Err(ClusterError::AllGivenUp { processes: n });
    }
    tracing::info!("cluster stopped; every worker exited and was reaped");
    Ok(())
}

/// Why [`Worker::supervise`] returned.
enum Outcome {
    Exited(std::io::Result<ExitStatus>),
    Restart(oneshot::Sender<Result<(), String>>),
    Stop,
}

type Reply = Option<oneshot::Sender<Result<(), String>>>;

struct Worker {
    id: usize,
    port: u16,
    addr: SocketAddr,
    /// Its id as the balancer's backend (the address).
    backend_id: String,
    shared: Arc<Shared>,
    program: PathBuf,
    #[cfg_attr(not(unix), allow(dead_code))]
    arg0: OsString,
    args: Vec<OsString>,
    output: Option<Output>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<WorkerCmd>) {
        let policy = self.shared.config.restart.clone();
        let stop = self.shared.stop_workers.clone();
        let mut backoff = policy.initial_backoff;
        let mut crashes = CrashLog::default();
        let mut pending: Reply = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            self.set(WorkerState::Starting, None);
            let started = Instant::now();
            let status = match sys::spawn(self.command()).await {
                Ok(mut child) => {
                    let pid = child.id();
                    self.shared.update(self.id, |w| {
                        w.pid = pid;
                        w.starts += 1;
                    });
                    self.forward_output(&mut child);
                    tracing::info!(worker = self.id, pid, port = self.port, "worker started");
                    match self.supervise(&mut child, &mut rx, &mut pending).await {
                        Outcome::Exited(status) => status,
                        Outcome::Stop => {
                            self.stop(&mut child, false).await;
                            break;
                        }
                        Outcome::Restart(reply) => {
                            self.stop(&mut child, true).await;
                            settle(&mut pending, Err("superseded by another restart".into()));
                            pending = Some(reply);
                            backoff = policy.initial_backoff;
                            crashes = CrashLog::default();
                            continue;
                        }
                    }
                }
                Err(e) => Err(e),
            };

            // It exited on its own (or could not be started): out of rotation before anything else.
            self.set_rotation(AdminState::Maint);
            let uptime = started.elapsed();
            if uptime >= policy.reset_after {
                backoff = policy.initial_backoff;
            }
            let crashed = crashes.record(policy.window);
            let how = match &status {
                Ok(s) => s.to_string(),
                Err(e) => format!("could not be started: {e}"),
            };
            if crashed > policy.max_restarts as usize {
                tracing::error!(
                    worker = self.id,
                    port = self.port,
                    exit = %how,
                    crashes = crashed,
                    window = ?policy.window,
                    "WORKER GIVEN UP: it crashed {crashed} times within {:?}; it will not be restarted \
                     (a rolling restart, SIGHUP, starts it again)",
                    policy.window
                );
                self.set(WorkerState::GivenUp, None);
                settle(
                    &mut pending,
                    Err(format!("crash-looped and was given up ({how})")),
                );
                tokio::select! {
                    () = stop.cancelled() => return,
                    Some(WorkerCmd::Restart(reply)) = rx.recv() => {
                        tracing::info!(worker = self.id, "restarting a given-up worker");
                        pending = Some(reply);
                        backoff = policy.initial_backoff;
                        crashes = CrashLog::default();
                        continue;
                    }
                }
            }
            tracing::warn!(
                worker = self.id,
                port = self.port,
                exit = %how,
                uptime = ?uptime,
                backoff = ?backoff,
                "worker exited; restarting after the back-off"
            );
            self.set(WorkerState::Backoff, None);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => break,
                Some(WorkerCmd::Restart(reply)) = rx.recv() => {
                    settle(&mut pending, Err("superseded by another restart".into()));
                    pending = Some(reply);
                }
            }
            backoff = (backoff * 2).min(policy.max_backoff);
            self.shared.metrics.restarts[self.id].increment(1);
            self.shared.update(self.id, |w| w.restarts += 1);
        }
        settle(&mut pending, Err("the cluster is stopping".into()));
        self.set(WorkerState::Stopped, None);
    }

    /// Watches a started process until it exits, a restart is asked for, or the workers must stop.
    async fn supervise(
        &self,
        child: &mut Child,
        rx: &mut mpsc::Receiver<WorkerCmd>,
        pending: &mut Reply,
    ) -> Outcome {
        let config = &self.shared.config;
        let mut ready = !config.checks_port();
        if ready {
            self.running(pending);
        }
        let accepting = wait_listening(self.id, self.addr, child.id(), config.ready_poll_interval);
        tokio::pin!(accepting);
        let mut slow = Box::pin(tokio::time::sleep(Duration::from_secs(30)));
        loop {
            tokio::select! {
                biased;
                status = child.wait() => return Outcome::Exited(status),
                () = self.shared.stop_workers.cancelled() => return Outcome::Stop,
                Some(WorkerCmd::Restart(reply)) = rx.recv() => return Outcome::Restart(reply),
                () = &mut accepting, if !ready => {
                    ready = true;
                    self.running(pending);
                }
                () = &mut slow, if !ready => {
                    tracing::warn!(
                        worker = self.id,
                        port = self.port,
                        "worker has not accepted on its port for 30 s; it takes no traffic until it does"
                    );
                    slow.as_mut().reset(Instant::now() + Duration::from_secs(3600));
                }
            }
        }
    }

    /// The process is running and (with a port check) accepting: into rotation.
    fn running(&self, pending: &mut Reply) {
        self.set(WorkerState::Running, None);
        self.set_rotation(AdminState::Ready);
        tracing::info!(worker = self.id, port = self.port, "worker running");
        settle(pending, Ok(()));
    }

    /// Takes the worker out of rotation, optionally waits for its connections to finish, then SIGTERM
    /// (SIGKILL after the kill timeout) and reaps it.
    async fn stop(&self, child: &mut Child, drain: bool) {
        let config = &self.shared.config;
        self.set(WorkerState::Stopping, None);
        // Subscribed before the worker leaves the rotation, so that its last connection's end is seen.
        let mut events = self.shared.balancer.as_ref().map(|b| b.events());
        self.set_rotation(AdminState::Drain);
        let pid = child.id();
        if let (true, Some(balancer), Some(events)) = (drain, &self.shared.balancer, &mut events) {
            let drained = wait_drained(balancer, &self.backend_id, events);
            tokio::select! {
                () = drained => {}
                () = tokio::time::sleep(config.drain_timeout) => {
                    let active = balancer.backend(&self.backend_id).map_or(0, |b| b.active);
                    tracing::warn!(
                        worker = self.id,
                        active,
                        "drain deadline passed; stopping the worker with connections open"
                    );
                }
                () = self.shared.hard_stop.cancelled() => {}
                _ = child.wait() => {}
            }
        }
        let status = self.terminate(child).await;
        match status {
            Ok(s) => tracing::info!(worker = self.id, pid, exit = %s, "worker stopped"),
            Err(e) => tracing::error!(worker = self.id, pid, error = %e, "cannot reap the worker"),
        }
    }

    async fn terminate(&self, child: &mut Child) -> std::io::Result<ExitStatus> {
        let hard = &self.shared.hard_stop;
        #[cfg(unix)]
        {
            if let Some(pid) = child.id() {
                let sig = if hard.is_cancelled() {
                    sys::KILL
                } else {
                    sys::TERM
                };
                sys::signal_group(pid, sig);
            }
            tokio::select! {
                status = child.wait() => return status,
                () = tokio::time::sleep(self.shared.config.kill_timeout) => {
                    tracing::warn!(worker = self.id, timeout = ?self.shared.config.kill_timeout,
                        "worker ignored SIGTERM; sending SIGKILL");
                }
                () = hard.cancelled() => {}
            }
            if let Some(pid) = child.id() {
                sys::signal_group(pid, sys::KILL);
            }
        }
        #[cfg(not(unix))]
        let _ = hard;
        let _ = child.start_kill();
        child.wait().await
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        #[cfg(unix)]
        c.arg0(&self.arg0);
        c.args(&self.args)
            .env(ENV_WORKER_ID, self.id.to_string())
            .env(ENV_WORKER_PORT, self.port.to_string())
            .env(ENV_PORT, self.port.to_string())
            .env(ENV_CLUSTER_SIZE, self.shared.config.processes.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if self.output.is_some() {
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        c
    }

    fn forward_output(&self, child: &mut Child) {
        let Some(output) = &self.output else {
            return;
        };
        if let Some(out) = child.stdout.take() {
            output.forward(self.id, Stream::Out, out);
        }
        if let Some(err) = child.stderr.take() {
            output.forward(self.id, Stream::Err, err);
        }
    }

    fn set(&self, state: WorkerState, pid: Option<u32>) {
        self.shared.update(self.id, |w| {
            w.state = state;
            if state != WorkerState::Running && state != WorkerState::Stopping {
                w.pid = pid;
            }
        });
    }

    /// Puts the worker in rotation (`Ready`) or takes it out (`Drain` while it stops, `Maint` while it is
    /// not running).
    fn set_rotation(&self, state: AdminState) {
        if let Some(b) = &self.shared.balancer {
            if let Err(e) = b.set_admin_state(&self.backend_id, state) {
                tracing::error!(worker = self.id, error = %e, "cannot change the worker's rotation");
            }
        }
    }
}

/// Answers a waiting rolling restart, if any.
fn settle(pending: &mut Reply, result: Result<(), String>) {
    if let Some(reply) = pending.take() {
        let _ = reply.send(result);
    }
}

/// Follows the balancer's health verdicts on the workers' backends: each goes into the worker's status,
/// and a worker that stops answering its checks (hung, SIGSTOPped) is reported once, with the reason.
async fn report_health(shared: Arc<Shared>, mut events: BackendEvents) {
    while let Some(event) = events.recv().await {
        let Ok(BackendEvent::HealthChanged { id, up, reason }) = event else {
            continue;
        };
        let ports = 0..shared.config.processes;
        let Some(worker) = ports.into_iter().find(|&w| {
            SocketAddr::from(([127, 0, 0, 1], shared.config.worker_port(w))).to_string()
                == id.as_str()
        }) else {
            continue;
        };
        let pid = shared.status.borrow().get(worker).and_then(|w| w.pid);
        if up {
            tracing::info!(worker, pid, reason = %reason, "worker passes its checks; in rotation");
        } else {
            tracing::warn!(worker, pid, reason = %reason,
                "worker fails its checks (hung or overloaded?); out of rotation while its process runs");
        }
        shared.update(worker, |w| w.healthy = Some(up));
    }
}

/// Resolves once the backend `id` (out of rotation) has no connection open: at once if it has none, else
/// on its [`BackendEvent::Drained`]. A stream that lagged reads the count again.
async fn wait_drained(balancer: &BalancerHandle, id: &str, events: &mut BackendEvents) {
    loop {
        if balancer.backend(id).is_none_or(|b| b.active == 0) {
            return;
        }
        match events.recv().await {
            Some(Ok(BackendEvent::Drained { id: drained })) if drained.as_str() == id => return,
            Some(_) => {}
            None => return,
        }
    }
}

/// Resolves once the worker whose process is `pid` listens on `addr`'s port, and nobody else does
/// (on Linux, read from the kernel's socket tables: a foreign process that listens there never puts the
/// worker in rotation, and is reported once), and `addr` accepts a connection. Tries every `interval`.
async fn wait_listening(worker: usize, addr: SocketAddr, pid: Option<u32>, interval: Duration) {
    let mut reported = false;
    loop {
        #[cfg(target_os = "linux")]
        let ours = match pid.map(|pid| super::ports::listener_on(addr.port(), pid)) {
            Some(super::ports::Listener::Ours) => true,
            Some(super::ports::Listener::Foreign(holder)) => {
                if !reported {
                    reported = true;
                    let holder = holder.map(|(pid, name)| format!("{name} (pid {pid})"));
                    tracing::warn!(
                        worker,
                        port = addr.port(),
                        holder = holder.as_deref().unwrap_or("another process"),
                        "another process listens on the worker's port; the worker takes no traffic until only it does"
                    );
                }
                false
            }
            Some(super::ports::Listener::None) | None => false,
        };
        #[cfg(not(target_os = "linux"))]
        let ours = {
            let _ = (worker, pid, &mut reported);
            true
        };
        if ours {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
            {
                return;
            }
        }
        tokio::time::sleep(interval).await;
    }
}
