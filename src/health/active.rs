//! Active health checks: one task per backend, all run from one place per balancer (the server's
//! background work, never once per serving thread), following the registry as backends come and go.
//!
//! Scheduling. Each backend's first check runs within `min(interval, 250ms)` of the start, the backends
//! spread over that window, so a healthy pool serves at once. Its second check comes at a phase of its
//! own within the next interval (the backends spread over it), and every later one an interval (± 10 %
//! jitter) after the end of the one before: checks never run in lockstep across backends. A backend in
//! transition (some passes while down, or some failures while up) waits a quarter of the interval
//! instead (HAProxy's `fastinter`).
//!
//! Verdicts. A backend that is up goes down after `fall` failures in a row; one that is down comes back
//! after `rise` passes in a row, however it went down (passive failures take it down at once). A backend
//! never checked goes up on its first pass. Verdicts are written through `Backend::set_health`, which
//! logs a change once, sends its event and counts it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{sleep_until, Instant};

use super::probe::{probe, words};
use crate::backend::{Backend, BackendEvent, BackendId, Registry};
use crate::config::HealthCheck;
use crate::metrics::CheckMetrics;

/// The first checks of all backends run within this of the start (or within the interval, if shorter).
const FIRST_WINDOW: Duration = Duration::from_millis(250);

/// Checks the members of `registry` with `check` until dropped (the server drops it at shutdown, which
/// aborts every check task).
pub(crate) async fn run(registry: &Registry, check: HealthCheck) {
    let check = Arc::new(check);
    // Subscribe before reading the members, so that no change falls between the two.
    let mut events = registry.subscribe();
    let mut checker = Checker {
        check: check.clone(),
        tasks: JoinSet::new(),
        running: HashMap::new(),
    };
    let members = registry.backends();
    let n = members.len();
    tracing::info!(
        backends = n,
        mode = %check.mode,
        interval = %words(check.interval),
        timeout = %words(check.timeout),
        rise = check.rise,
        fall = check.fall,
        "active health checks started"
    );
    for (i, backend) in members.into_iter().enumerate() {
        let start = Start::spread(i, n, check.interval);
        checker.start(backend, start);
    }
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    return std::future::pending().await; // the registry is gone: nothing to follow
                };
                // Take every event already waiting, so that a batch of changes costs one resync.
                let mut resync = checker.on_event(event);
                while let Some(event) = events.try_recv() {
                    resync |= checker.on_event(event);
                }
                if resync {
                    checker.resync(registry);
                }
            }
            Some(ended) = checker.tasks.join_next() => {
                if let Err(e) = ended {
                    if e.is_panic() {
                        tracing::error!("a health check task panicked; restarting the checks it ran");
                        checker.resync(registry);
                    }
                }
            }
        }
    }
}

/// The check tasks, by backend id.
struct Checker {
    check: Arc<HealthCheck>,
    tasks: JoinSet<()>,
    running: HashMap<BackendId, Running>,
}

/// One backend's check task.
struct Running {
    backend: Arc<Backend>,
    /// Told when the backend's address changed: the task checks the new one soon, streaks reset.
    retarget: Arc<Notify>,
    task: AbortHandle,
}

impl Checker {
    fn start(&mut self, backend: Arc<Backend>, start: Start) {
        let retarget = Arc::new(Notify::new());
        let task = self.tasks.spawn(watch(
            backend.clone(),
            self.check.clone(),
            start,
            retarget.clone(),
        ));
        if let Some(old) = self.running.insert(
            backend.id().clone(),
            Running {
                backend,
                retarget,
                task,
            },
        ) {
            old.task.abort();
        }
    }

    /// Handles one event; true when the members may have changed (the tasks must follow).
    fn on_event(&mut self, event: Result<BackendEvent, crate::backend::EventsLagged>) -> bool {
        match event {
            Ok(BackendEvent::Added { .. } | BackendEvent::Removed { .. }) => true,
            Ok(BackendEvent::AddressChanged { id, .. }) => {
                if let Some(r) = self.running.get(&id) {
                    r.retarget.notify_one();
                }
                false
            }
            Ok(_) => false,
            // Lagged: read the members again. (An address change missed is caught by the next check,
            // which reads the backend's address anyway.)
            Err(_) => true,
        }
    }

    /// Makes the tasks follow the members: one per member, none for a backend that left (an id that was
    /// removed and added again is a new backend, with a new task).
    fn resync(&mut self, registry: &Registry) {
        let members = registry.backends();
        let by_id: HashMap<&BackendId, &Arc<Backend>> =
            members.iter().map(|b| (b.id(), b)).collect();
        self.running.retain(|id, r| {
            let keep = by_id
                .get(id)
                .is_some_and(|b| Arc::ptr_eq(b, &r.backend) && !r.task.is_finished());
            if !keep {
                r.task.abort();
            }
            keep
        });
        for backend in &members {
            if !self.running.contains_key(backend.id()) {
                let start = Start::random(self.check.interval);
                self.start(backend.clone(), start);
            }
        }
    }
}

/// When a backend's first two checks run, from the start of its task.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Start {
    /// The first check: within `min(interval, 250ms)`.
    first: Duration,
    /// The second: this far into the interval that follows that window.
    phase: Duration,
}

impl Start {
    /// Backend `i` of `n` checked from the start: spread evenly over the windows, each at a random place
    /// within its own slot (stratified), so that no two start together and none waits long.
    fn spread(i: usize, n: usize, interval: Duration) -> Self {
        let mut rng = rand::thread_rng();
        let n = n.max(1) as f64;
        let slot = |u: f64| (i as f64 + u) / n;
        Start {
            first: first_window(interval).mul_f64(slot(rng.gen())),
            phase: interval.mul_f64(slot(rng.gen())),
        }
    }

    /// A backend that joined while the balancer runs: at random places in the windows.
    fn random(interval: Duration) -> Self {
        let mut rng = rand::thread_rng();
        Start {
            first: first_window(interval).mul_f64(rng.gen()),
            phase: interval.mul_f64(rng.gen()),
        }
    }
}

/// `min(interval, 250ms)`.
fn first_window(interval: Duration) -> Duration {
    interval.min(FIRST_WINDOW)
}

/// `d` ± 10 %.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.9..=1.1))
}

/// The address a check of `backend` goes to: its own, or another port of its host.
fn target(addr: SocketAddr, port: Option<u16>) -> SocketAddr {
    SocketAddr::new(addr.ip(), port.unwrap_or(addr.port()))
}

/// The checks of one backend, for as long as it is a member (its task is aborted when it leaves).
async fn watch(
    backend: Arc<Backend>,
    check: Arc<HealthCheck>,
    start: Start,
    retarget: Arc<Notify>,
) {
    let metrics = CheckMetrics::register(backend.service(), backend.id().as_str());
    let mut streak = Streak::new(check.rise, check.fall);
    let began = Instant::now();
    let mut next = began + start.first;
    // The second check's time, taken once the first has run.
    let mut second = Some(began + first_window(check.interval) + start.phase);
    loop {
        tokio::select! {
            () = sleep_until(next) => {}
            () = retarget.notified() => {
                // A new address is a new server: its streaks start again, and it is checked soon.
                streak.retarget();
                let soon = first_window(check.interval).mul_f64(rand::thread_rng().gen());
                next = Instant::now() + soon;
                continue;
            }
        }
        if backend.is_removed() {
            return;
        }
        let started = Instant::now();
        let addr = target(backend.addr(), check.port);
        let result = probe(&check, addr).await;
        metrics.checked(started.elapsed(), result.as_ref().err().map(|f| f.kind));
        let first = !streak.checked;
        let down = backend.is_checked_down();
        let verdict = streak.observe(result.is_ok(), down);
        match &result {
            Ok(passed) => {
                tracing::debug!(backend = %backend.who(), %addr, result = %passed, "check passed");
            }
            Err(failed) => {
                if first {
                    tracing::warn!(
                        backend = %backend.who(),
                        reason = %failed.reason,
                        "backend failed its first check; it stays out of rotation"
                    );
                } else {
                    tracing::debug!(backend = %backend.who(), %addr, reason = %failed.reason, "check failed");
                }
            }
        }
        if let Some(up) = verdict {
            let reason = match &result {
                Ok(passed) => passed,
                Err(failed) => &failed.reason,
            };
            backend.set_health(up, reason);
        }
        let wait = if streak.in_transition() {
            check.interval / 4
        } else {
            check.interval
        };
        // From the end of this check, as HAProxy does: a backend that takes the whole timeout to fail
        // still gets its pause between checks, and `rise` passes are spread over time.
        next = second
            .take()
            .unwrap_or_else(|| Instant::now() + jittered(wait))
            .max(Instant::now());
    }
}

/// A backend's passes and failures in a row, against the state it is in, and the verdicts they make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Streak {
    rise: u32,
    fall: u32,
    /// Passes in a row while down.
    passes: u32,
    /// Failures in a row while up.
    fails: u32,
    /// False until its first check.
    checked: bool,
}

impl Streak {
    pub(crate) fn new(rise: u32, fall: u32) -> Self {
        Streak {
            rise,
            fall,
            passes: 0,
            fails: 0,
            checked: false,
        }
    }

    /// One check's result, on a backend that is `down` now. Returns the verdict to record: `Some(true)`
    /// to bring it up, `Some(false)` to take it down (or, when it is down already, to keep it down with
    /// the latest reason), `None` to leave it as it is.
    pub(crate) fn observe(&mut self, passed: bool, down: bool) -> Option<bool> {
        let first = !std::mem::replace(&mut self.checked, true);
        if passed {
            self.fails = 0;
            if !down {
                self.passes = 0;
                return None;
            }
            self.passes = self.passes.saturating_add(1);
            if first || self.passes >= self.rise {
                self.passes = 0;
                return Some(true);
            }
            None
        } else {
            self.passes = 0;
            if down {
                self.fails = 0;
                return Some(false);
            }
            self.fails = self.fails.saturating_add(1);
            if self.fails >= self.fall {
                self.fails = 0;
                return Some(false);
            }
            None
        }
    }

    /// Some passes while down, or some failures while up: it is checked more often.
    pub(crate) fn in_transition(&self) -> bool {
        self.passes > 0 || self.fails > 0
    }

    /// The backend's address changed: what was seen of the old one no longer counts.
    fn retarget(&mut self) {
        self.passes = 0;
        self.fails = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `results` through a streak on a backend whose state follows the verdicts; returns the
    /// states after each check (true: up).
    fn run(streak: &mut Streak, mut up: bool, results: &[bool]) -> Vec<bool> {
        results
            .iter()
            .map(|&passed| {
                if let Some(v) = streak.observe(passed, !up) {
                    up = v;
                }
                up
            })
            .collect()
    }

    #[test]
    fn a_backend_never_checked_goes_up_on_its_first_pass() {
        let mut s = Streak::new(2, 3);
        assert_eq!(run(&mut s, false, &[true]), [true]);
        // But one whose first check failed needs `rise` passes.
        let mut s = Streak::new(2, 3);
        assert_eq!(
            run(&mut s, false, &[false, true, true]),
            [false, false, true]
        );
    }

    #[test]
    fn rise_and_fall_count_results_in_a_row() {
        let mut s = Streak::new(2, 3);
        let states = run(
            &mut s,
            false,
            &[true, false, false, true, false, false, false],
        );
        assert_eq!(states, [true, true, true, true, true, true, false]);
        assert!(!s.in_transition(), "just went down: no pass yet");
        let states = run(&mut s, false, &[true, false, true, true]);
        assert_eq!(states, [false, false, false, true]);
        let mut s = Streak::new(1, 1);
        assert_eq!(
            run(&mut s, true, &[false, true, false]),
            [false, true, false]
        );
    }

    #[test]
    fn flapping_never_changes_the_state() {
        for up in [true, false] {
            let mut s = Streak::new(2, 3);
            s.checked = true;
            let flaps: Vec<bool> = (0..100).map(|i| i % 2 == 0).collect();
            assert!(run(&mut s, up, &flaps).iter().all(|&state| state == up));
            // After a result against its state, it is checked more often.
            run(&mut s, up, &[!up]);
            assert!(
                s.in_transition(),
                "a flapping backend is checked more often"
            );
        }
    }

    #[test]
    fn after_a_passive_down_it_takes_rise_passes_to_come_back() {
        let mut s = Streak::new(3, 3);
        assert_eq!(s.observe(true, true), Some(true), "first check: up");
        for _ in 0..10 {
            assert_eq!(s.observe(true, false), None);
        }
        // Passive failures took it down between two checks: the passes seen while up do not count.
        assert_eq!(s.observe(true, true), None);
        assert_eq!(s.observe(true, true), None);
        assert_eq!(s.observe(true, true), Some(true));
    }

    #[test]
    fn starts_are_spread_over_their_windows() {
        let interval = Duration::from_secs(2);
        let n = 100;
        let starts: Vec<Start> = (0..n).map(|i| Start::spread(i, n, interval)).collect();
        for (i, s) in starts.iter().enumerate() {
            let slot = |w: Duration| {
                (
                    w.mul_f64(i as f64 / n as f64),
                    w.mul_f64((i + 1) as f64 / n as f64),
                )
            };
            let (lo, hi) = slot(FIRST_WINDOW);
            assert!(s.first >= lo && s.first <= hi, "{i}: {s:?}");
            let (lo, hi) = slot(interval);
            assert!(s.phase >= lo && s.phase <= hi, "{i}: {s:?}");
        }
        let short = Start::spread(0, 1, Duration::from_millis(100));
        assert!(short.first <= Duration::from_millis(100));
        for _ in 0..100 {
            let j = jittered(interval);
            assert!(j >= interval.mul_f64(0.9) && j <= interval.mul_f64(1.1));
        }
        assert_eq!(
            target("10.0.0.1:5432".parse().unwrap(), Some(8008)),
            "10.0.0.1:8008".parse::<SocketAddr>().unwrap()
        );
    }
}
