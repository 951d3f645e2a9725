//! [`BlockingPool`]: CPU-heavy work on Tokio's blocking threads, behind bounded semaphores.
//!
//! Tokio's `spawn_blocking` is unbounded in practice (up to 512 threads by default): a burst of CPU-heavy
//! jobs starts as many threads as there are jobs, they fight the runtime's worker threads for the cores,
//! and every connection the balancer carries gets slower. A [`BlockingPool`] puts two bounds in front of
//! `spawn_blocking`:
//!
//! * **size**: at most this many jobs *run* at once (default: the number of CPUs);
//! * **queue bound**: at most this many jobs *wait* for a running slot (default: 4 × size).
//!
//! # Life of a job
//!
//! ```text
//! submit ─► admission (queue permit) ─► queued ─► slot (run permit) ─► spawn_blocking ─► result
//!              │ full: run waits,                   │ closed: Closed          │ panic: Panicked
//!              │ try_run → Full                     │ deadline: Timeout
//! ```
//!
//! Both bounds are [`tokio::sync::Semaphore`]s. A job first takes a *queue* permit (admission), then waits
//! for a *slot* permit; once it has a slot it gives its queue place back, and the slot permit is moved
//! into the `spawn_blocking` closure, so it is released exactly when the work ends, on the blocking
//! thread, whatever happens to the caller. All the waiting happens *inside the caller's future*: there is
//! no dispatcher task, and the queue is simply the set of futures that hold a queue permit.
//!
//! The three ways in mirror a bounded channel's `send`, `try_send` and `send_timeout`:
//!
//! * [`run`](BlockingPool::run) waits for room in the queue when it is full (backpressure), then for a
//!   slot;
//! * [`try_run`](BlockingPool::try_run) fails at once with [`PoolError::Full`] when the queue is full (load
//!   shedding), otherwise waits for a slot like `run`;
//! * [`run_timeout`](BlockingPool::run_timeout) waits for room and a slot for at most the given time, and
//!   fails with [`PoolError::Timeout`] if the job has not *started* by then.
//!
//! # Cancellation
//!
//! Dropping the future of a job that has not started (it waits for room or for a slot) removes the job:
//! its closure is dropped unrun and its queue place is freed at once. A job that has started **cannot be
//! cancelled**: the closure runs to completion on its blocking thread and keeps its slot until then;
//! dropping the future only discards the result.
//!
//! # Panics
//!
//! A job that panics is caught on its blocking thread (`catch_unwind`); the caller gets
//! [`PoolError::Panicked`] with the panic message, its slot is released, and the pool stays usable. The
//! caller's task is not torn down.
//!
//! # Closing
//!
//! [`close`](BlockingPool::close) refuses new jobs ([`PoolError::Closed`]) **and** removes the jobs still
//! queued: they get [`PoolError::Closed`] too and never run. Jobs already running finish, and their callers
//! get their results. [`wait_idle`](BlockingPool::wait_idle) waits until nothing runs or waits;
//! [`shutdown`](BlockingPool::shutdown) is `close` and then `wait_idle`.
//!
//! # Metrics
//!
//! Handles are registered once, when the pool is built (install the recorder first, see
//! [`crate::metrics`]); names are in [`crate::metrics`] (`POOL_*`):
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `ulb_pool_jobs_running` | gauge | jobs running now |
//! | `ulb_pool_jobs_queued` | gauge | jobs admitted and waiting for a slot now |
//! | `ulb_pool_jobs_total{outcome}` | counter | `ok`, `panicked`, `rejected` (full or closed), `timeout`, `cancelled` |
//! | `ulb_pool_queue_wait_seconds` | histogram | submission to start, jobs that started |
//! | `ulb_pool_run_seconds` | histogram | time on the blocking thread |
//!
//! Timeouts have their own outcome, `timeout`, rather than counting as `rejected`: a rejection says the
//! pool is over its bounds *now*, a timeout says that jobs wait longer than their callers can afford.
//!
//! # Example
//!
//! ```
//! use ulb_tcp::pool::{BlockingPool, PoolConfig, PoolError};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = BlockingPool::new(PoolConfig::new(2, 8))?;
//! let sum = pool.run(|n: u64| (1..=n).sum::<u64>(), 1_000).await?;
//! assert_eq!(sum, 500_500);
//!
//! let err = pool.run(|_: ()| -> u32 { panic!("bad input") }, ()).await.unwrap_err();
//! assert_eq!(err, PoolError::Panicked("bad input".into()));
//!
//! pool.shutdown().await;
//! assert_eq!(pool.run(|x: u8| x, 1).await, Err(PoolError::Closed));
//! # Ok(()) }
//! ```

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::metrics::{
    POOL_JOBS_QUEUED, POOL_JOBS_RUNNING, POOL_JOBS_TOTAL, POOL_OUTCOME_CANCELLED, POOL_OUTCOME_OK,
    POOL_OUTCOME_PANICKED, POOL_OUTCOME_REJECTED, POOL_OUTCOME_TIMEOUT, POOL_QUEUE_WAIT_SECONDS,
    POOL_RUN_SECONDS,
};

/// The default queue bound is this many waiting jobs per running slot.
pub const DEFAULT_QUEUE_PER_SLOT: usize = 4;

/// The largest size or queue bound accepted (Tokio's [`Semaphore::MAX_PERMITS`]).
pub const MAX_BOUND: usize = Semaphore::MAX_PERMITS;

/// Size and queue bound of a [`BlockingPool`].
///
/// ```
/// use ulb_tcp::pool::PoolConfig;
/// let config = PoolConfig::default().size(4).queue_bound(64);
/// assert_eq!((config.size, config.queue_bound), (4, 64));
/// assert_eq!(PoolConfig::with_size(3).queue_bound, 12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Jobs running at once. Default: the number of CPUs (`std::thread::available_parallelism`, 1 if
    /// unknown).
    pub size: usize,
    /// Jobs waiting for a running slot, beyond those running. Default: [`DEFAULT_QUEUE_PER_SLOT`] × size,
    /// so that a job admitted to a full queue waits for at most about four job durations.
    pub queue_bound: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        PoolConfig::with_size(cpus)
    }
}

impl PoolConfig {
    /// A size and a queue bound.
    pub fn new(size: usize, queue_bound: usize) -> Self {
        PoolConfig { size, queue_bound }
    }

    /// A size, with the default queue bound for it ([`DEFAULT_QUEUE_PER_SLOT`] × size).
    pub fn with_size(size: usize) -> Self {
        PoolConfig {
            size,
            queue_bound: size.saturating_mul(DEFAULT_QUEUE_PER_SLOT),
        }
    }

    /// Sets the number of jobs running at once (the queue bound is left as it is).
    pub fn size(mut self, size: usize) -> Self {
        self.size = size;
        self
    }

    /// Sets the number of jobs that may wait for a slot.
    pub fn queue_bound(mut self, queue_bound: usize) -> Self {
        self.queue_bound = queue_bound;
        self
    }

    /// Checks both bounds: each must be between 1 and [`MAX_BOUND`].
    pub fn validate(&self) -> Result<(), PoolConfigError> {
        for (field, value) in [("size", self.size), ("queue bound", self.queue_bound)] {
            if value == 0 || value > MAX_BOUND {
                return Err(PoolConfigError::OutOfRange {
                    field,
                    value,
                    max: MAX_BOUND,
                });
            }
        }
        Ok(())
    }
}

/// Why a [`PoolConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolConfigError {
    /// The size or the queue bound is zero, or larger than [`MAX_BOUND`].
    #[error("invalid blocking pool {field} {value}: it must be between 1 and {max}")]
    OutOfRange {
        /// `"size"` or `"queue bound"`.
        field: &'static str,
        /// The value refused.
        value: usize,
        /// The largest value accepted.
        max: usize,
    },
}

/// Why a job gave no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// [`BlockingPool::try_run`] found the queue full; the job did not run.
    #[error("blocking pool queue is full")]
    Full,
    /// The pool was closed before the job started (or the runtime shut down before its blocking thread
    /// ran it); the job did not run.
    #[error("blocking pool is closed")]
    Closed,
    /// [`BlockingPool::run_timeout`]: the job had no running slot before the deadline; it did not run.
    #[error("timed out waiting for a blocking pool slot")]
    Timeout,
    /// The job panicked; the message is the panic's (`&str` or `String` payloads), or a placeholder.
    #[error("blocking pool job panicked: {0}")]
    Panicked(String),
    /// The job was submitted outside a Tokio runtime, so there was no blocking thread to run it on.
    #[error("blocking pool used outside a Tokio runtime")]
    NoRuntime,
}

/// A pool of bounded concurrency for CPU-heavy or blocking work, on Tokio's blocking threads.
///
/// See the [module documentation](self) for the queue, cancellation, panic and close semantics. Cheap to
/// clone: clones share the same bounds, counts and metrics.
#[derive(Debug, Clone)]
pub struct BlockingPool {
    inner: Arc<Inner>,
}

/// The name of the original (Dart) design, `HybridProcessor.processWork(handler, data)`: an async front
/// that hands CPU-heavy handlers to a bounded set of workers. Here it is [`BlockingPool::run`].
pub type HybridProcessor = BlockingPool;

#[derive(Debug)]
struct Inner {
    config: PoolConfig,
    /// Running slots: `size` permits.
    slots: Arc<Semaphore>,
    /// Queue places: `queue_bound` permits.
    queue: Arc<Semaphore>,
    running: AtomicUsize,
    queued: AtomicUsize,
    idle: Notify,
    metrics: PoolMetrics,
}

#[derive(Debug)]
struct PoolMetrics {
    running: Gauge,
    queued: Gauge,
    ok: Counter,
    panicked: Counter,
    rejected: Counter,
    timeout: Counter,
    cancelled: Counter,
    queue_wait: Histogram,
    run: Histogram,
}

impl PoolMetrics {
    fn register() -> Self {
        let outcome = |o: &'static str| counter!(POOL_JOBS_TOTAL, "outcome" => o);
        PoolMetrics {
            running: gauge!(POOL_JOBS_RUNNING),
            queued: gauge!(POOL_JOBS_QUEUED),
            ok: outcome(POOL_OUTCOME_OK),
            panicked: outcome(POOL_OUTCOME_PANICKED),
            rejected: outcome(POOL_OUTCOME_REJECTED),
            timeout: outcome(POOL_OUTCOME_TIMEOUT),
            cancelled: outcome(POOL_OUTCOME_CANCELLED),
            queue_wait: histogram!(POOL_QUEUE_WAIT_SECONDS),
            run: histogram!(POOL_RUN_SECONDS),
        }
    }
}

/// Describes the pool's metrics to the installed recorder (HELP lines). [`crate::metrics::describe`]
/// (which [`install_prometheus`] calls) does it too.
///
#[cfg_attr(
    feature = "prometheus",
    doc = "[`install_prometheus`]: crate::metrics::install_prometheus"
)]
#[cfg_attr(
    not(feature = "prometheus"),
    doc = "[`install_prometheus`]: crate#features"
)]
pub fn describe_metrics() {
    crate::metrics::describe_pool();
}

/// How a submission gets into the queue.
#[derive(Clone, Copy)]
enum Admission {
    Wait,
    Try,
}

impl BlockingPool {
    /// Builds a pool; refuses a size or queue bound of zero (or above [`MAX_BOUND`]). Registers the metric
    /// handles with the recorder installed now. Needs no runtime; running jobs does.
    pub fn new(config: PoolConfig) -> Result<Self, PoolConfigError> {
        config.validate()?;
        Ok(BlockingPool {
            inner: Arc::new(Inner {
                config,
                slots: Arc::new(Semaphore::new(config.size)),
                queue: Arc::new(Semaphore::new(config.queue_bound)),
                running: AtomicUsize::new(0),
                queued: AtomicUsize::new(0),
                idle: Notify::new(),
                metrics: PoolMetrics::register(),
            }),
        })
    }

    /// A pool with the default configuration: one slot per CPU, a queue of 4 × that.
    pub fn with_defaults() -> Result<Self, PoolConfigError> {
        BlockingPool::new(PoolConfig::default())
    }

    /// Runs `f(data)` on a blocking thread once a slot is free, and returns its result (the original
    /// design's `processWork(handler, data)`).
    ///
    /// If the queue is full it first waits for room (backpressure). Errors: [`PoolError::Panicked`] if `f`
    /// panicked, [`PoolError::Closed`] if the pool was closed before the job started, and
    /// [`PoolError::NoRuntime`] outside a Tokio runtime. Dropping the future before the job starts removes
    /// it; after, the job runs to completion regardless.
    pub async fn run<F, D, T>(&self, f: F, data: D) -> Result<T, PoolError>
    where
        F: FnOnce(D) -> T + Send + 'static,
        D: Send + 'static,
        T: Send + 'static,
    {
        let mut ticket = Ticket::new(&self.inner);
        let slot = ticket.enter(Admission::Wait).await?;
        self.spawn(slot, f, data).await
    }

    /// Like [`run`](Self::run), but fails at once with [`PoolError::Full`] if the queue is full (it does
    /// not wait for room). Once admitted, the job waits for a slot like `run`.
    pub async fn try_run<F, D, T>(&self, f: F, data: D) -> Result<T, PoolError>
    where
        F: FnOnce(D) -> T + Send + 'static,
        D: Send + 'static,
        T: Send + 'static,
    {
        let mut ticket = Ticket::new(&self.inner);
        let slot = ticket.enter(Admission::Try).await?;
        self.spawn(slot, f, data).await
    }

    /// Like [`run`](Self::run), but fails with [`PoolError::Timeout`] if the job has not *started* within
    /// `timeout` (waiting for room in the queue, then for a slot). The deadline does not cover the run
    /// itself: a started job cannot be cancelled. Needs a runtime with the time driver enabled.
    pub async fn run_timeout<F, D, T>(
        &self,
        f: F,
        data: D,
        timeout: Duration,
    ) -> Result<T, PoolError>
    where
        F: FnOnce(D) -> T + Send + 'static,
        D: Send + 'static,
        T: Send + 'static,
    {
        let mut ticket = Ticket::new(&self.inner);
        let slot = match tokio::time::timeout(timeout, ticket.enter(Admission::Wait)).await {
            Ok(slot) => slot?,
            Err(_) => return Err(ticket.refuse(PoolError::Timeout)),
        };
        self.spawn(slot, f, data).await
    }

    /// Hands a job that holds a slot to a blocking thread and waits for its result.
    async fn spawn<F, D, T>(&self, slot: Slot, f: F, data: D) -> Result<T, PoolError>
    where
        F: FnOnce(D) -> T + Send + 'static,
        D: Send + 'static,
        T: Send + 'static,
    {
        let handle = tokio::task::spawn_blocking(move || {
            let mut slot = slot;
            let start = Instant::now();
            let out = catch_unwind(AssertUnwindSafe(move || f(data)));
            slot.finish(start.elapsed(), out.is_ok());
            // The slot (and its permit) is released here, on the blocking thread, before the caller wakes.
            drop(slot);
            out
        });
        match handle.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(payload)) => Err(PoolError::Panicked(panic_message(payload.as_ref()))),
            Err(e) if e.is_panic() => {
                Err(PoolError::Panicked(panic_message(e.into_panic().as_ref())))
            }
            // The runtime shut down before a blocking thread took the job: it never ran.
            Err(_) => Err(PoolError::Closed),
        }
    }

    /// Refuses new jobs and removes the queued ones (they get [`PoolError::Closed`] and never run). Jobs
    /// already running finish normally. Idempotent.
    pub fn close(&self) {
        self.inner.queue.close();
        self.inner.slots.close();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.slots.is_closed()
    }

    /// Waits until no job runs and none is queued. On an open pool that is a moment that may not last;
    /// after [`close`](Self::close) it is final. Jobs still waiting for room in the queue (not admitted)
    /// are not waited for.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// [`close`](Self::close), then [`wait_idle`](Self::wait_idle): returns when every job that was
    /// running has finished.
    pub async fn shutdown(&self) {
        self.close();
        self.wait_idle().await;
    }

    /// The configuration in force.
    pub fn config(&self) -> PoolConfig {
        self.inner.config
    }

    /// Jobs allowed to run at once.
    pub fn size(&self) -> usize {
        self.inner.config.size
    }

    /// Jobs allowed to wait for a slot.
    pub fn queue_bound(&self) -> usize {
        self.inner.config.queue_bound
    }

    /// Jobs holding a slot now (never more than [`size`](Self::size)).
    pub fn running(&self) -> usize {
        self.inner.running.load(SeqCst)
    }

    /// Jobs admitted to the queue and waiting for a slot now (never more than
    /// [`queue_bound`](Self::queue_bound)).
    pub fn queued(&self) -> usize {
        self.inner.queued.load(SeqCst)
    }
}

impl Inner {
    fn is_idle(&self) -> bool {
        self.running.load(SeqCst) == 0 && self.queued.load(SeqCst) == 0
    }

    /// Called after `running` or `queued` went down.
    fn notify_if_idle(&self) {
        if self.is_idle() {
            self.idle.notify_waiters();
        }
    }
}

/// A submitted job that has not started. Dropping it frees its queue place, and counts the job as
/// cancelled unless an outcome was already recorded.
struct Ticket<'a> {
    inner: &'a Arc<Inner>,
    submitted: Instant,
    place: Option<OwnedSemaphorePermit>,
    settled: bool,
}

impl<'a> Ticket<'a> {
    fn new(inner: &'a Arc<Inner>) -> Self {
        Ticket {
            inner,
            submitted: Instant::now(),
            place: None,
            settled: false,
        }
    }

    /// Gets into the queue, then gets a slot.
    async fn enter(&mut self, admission: Admission) -> Result<Slot, PoolError> {
        // Fail before waiting if there is no runtime to run the job on.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(self.refuse(PoolError::NoRuntime));
        }
        let place = match admission {
            Admission::Try => match self.inner.queue.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(TryAcquireError::NoPermits) => return Err(self.refuse(PoolError::Full)),
                Err(TryAcquireError::Closed) => return Err(self.refuse(PoolError::Closed)),
            },
            Admission::Wait => match self.inner.queue.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return Err(self.refuse(PoolError::Closed)),
            },
        };
        self.inner.queued.fetch_add(1, SeqCst);
        self.inner.metrics.queued.increment(1.0);
        self.place = Some(place);

        let permit = match self.inner.slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return Err(self.refuse(PoolError::Closed)),
        };
        // Count as running before leaving the queue, so that the pool never looks idle in between.
        self.inner.running.fetch_add(1, SeqCst);
        self.inner.metrics.running.increment(1.0);
        self.settled = true;
        self.leave_queue();
        self.inner
            .metrics
            .queue_wait
            .record(self.submitted.elapsed().as_secs_f64());
        Ok(Slot {
            inner: self.inner.clone(),
            _permit: permit,
            finished: false,
        })
    }

    /// Records the outcome of a job that will not run, and hands the error back.
    fn refuse(&mut self, error: PoolError) -> PoolError {
        if !self.settled {
            self.settled = true;
            let m = &self.inner.metrics;
            match error {
                PoolError::Timeout => m.timeout.increment(1),
                _ => m.rejected.increment(1),
            }
        }
        self.leave_queue();
        error
    }

    fn leave_queue(&mut self) {
        if let Some(place) = self.place.take() {
            drop(place);
            self.inner.queued.fetch_sub(1, SeqCst);
            self.inner.metrics.queued.decrement(1.0);
            self.inner.notify_if_idle();
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.settled = true;
            self.inner.metrics.cancelled.increment(1);
        }
        self.leave_queue();
    }
}

/// A running slot: owns the slot permit and travels into the blocking closure.
struct Slot {
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
    finished: bool,
}

impl Slot {
    fn finish(&mut self, took: Duration, ok: bool) {
        self.finished = true;
        let m = &self.inner.metrics;
        m.run.record(took.as_secs_f64());
        if ok {
            m.ok.increment(1);
        } else {
            m.panicked.increment(1);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.finished {
            // The closure was dropped unrun (the runtime shut down).
            self.inner.metrics.cancelled.increment(1);
        }
        // Leave `running` before the permit is released (after this body), so that `running` never
        // exceeds `size`.
        self.inner.running.fetch_sub(1, SeqCst);
        self.inner.metrics.running.decrement(1.0);
        self.inner.notify_if_idle();
    }
}

/// The message of a panic payload: `&str` and `String` payloads as they are, others as a placeholder.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::future::Future;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use metrics::{HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit as MUnit};

    #[test]
    fn zero_bounds_are_refused_by_name() {
        let e = BlockingPool::new(PoolConfig::new(0, 4)).unwrap_err();
        assert_eq!(
            e,
            PoolConfigError::OutOfRange {
                field: "size",
                value: 0,
                max: MAX_BOUND
            }
        );
        assert!(e.to_string().contains("size 0"), "{e}");
        let e = BlockingPool::new(PoolConfig::new(4, 0)).unwrap_err();
        assert!(e.to_string().contains("queue bound 0"), "{e}");
        let e = PoolConfig::new(MAX_BOUND + 1, 1).validate().unwrap_err();
        assert!(e.to_string().contains(&(MAX_BOUND + 1).to_string()), "{e}");
        assert!(PoolConfig::new(1, 1).validate().is_ok());
    }

    #[test]
    fn defaults_follow_the_cpu_count() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        let c = PoolConfig::default();
        assert_eq!(c.size, cpus);
        assert_eq!(c.queue_bound, DEFAULT_QUEUE_PER_SLOT * cpus);
        let pool = BlockingPool::with_defaults().unwrap();
        assert_eq!((pool.size(), pool.queue_bound()), (c.size, c.queue_bound));
    }

    #[test]
    fn panic_messages() {
        assert_eq!(panic_message(&"static"), "static");
        assert_eq!(panic_message(&String::from("owned")), "owned");
        assert_eq!(panic_message(&42_u32), "panic with a non-string payload");
    }

    #[test]
    fn no_runtime_is_an_error() {
        let pool = BlockingPool::new(PoolConfig::new(1, 1)).unwrap();
        // A runtime-free executor: poll by hand with a no-op waker.
        let fut = pool.run(|x: u8| x, 1);
        let mut fut = std::pin::pin!(fut);
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let waker = std::task::Waker::from(Arc::new(Noop));
        let mut cx = std::task::Context::from_waker(&waker);
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => assert_eq!(r, Err(PoolError::NoRuntime)),
            std::task::Poll::Pending => panic!("should fail at once"),
        }
        assert_eq!((pool.running(), pool.queued()), (0, 0));
    }

    /// A recorder that keeps every handle in a map, by name and labels.
    #[derive(Default)]
    struct TestRecorder {
        values: Mutex<HashMap<String, Arc<AtomicU64>>>,
        histograms: Mutex<HashMap<String, Arc<TestHistogram>>>,
    }

    #[derive(Default)]
    struct TestHistogram(Mutex<Vec<f64>>);

    impl HistogramFn for TestHistogram {
        fn record(&self, value: f64) {
            self.0.lock().unwrap().push(value);
        }
    }

    fn key_string(key: &Key) -> String {
        let mut s = key.name().to_string();
        for l in key.labels() {
            s.push_str(&format!(",{}={}", l.key(), l.value()));
        }
        s
    }

    impl TestRecorder {
        fn value(&self, key: &str) -> Arc<AtomicU64> {
            self.values
                .lock()
                .unwrap()
                .entry(key.to_string())
                .or_default()
                .clone()
        }
        fn counter_value(&self, key: &str) -> u64 {
            self.value(key).load(Ordering::SeqCst)
        }
        fn gauge_value(&self, key: &str) -> f64 {
            f64::from_bits(self.value(key).load(Ordering::SeqCst))
        }
        fn histogram_len(&self, key: &str) -> usize {
            self.histograms
                .lock()
                .unwrap()
                .get(key)
                .map_or(0, |h| h.0.lock().unwrap().len())
        }
    }

    impl Recorder for TestRecorder {
        fn describe_counter(&self, _: KeyName, _: Option<MUnit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<MUnit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<MUnit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
            metrics::Counter::from_arc(self.value(&key_string(key)))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::from_arc(self.value(&key_string(key)))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
            let h = self
                .histograms
                .lock()
                .unwrap()
                .entry(key_string(key))
                .or_default()
                .clone();
            metrics::Histogram::from_arc(h)
        }
    }

    #[tokio::test]
    async fn metrics_follow_every_outcome() {
        let rec = TestRecorder::default();
        let pool = metrics::with_local_recorder(&rec, || {
            describe_metrics();
            BlockingPool::new(PoolConfig::new(1, 1)).unwrap()
        });
        let total = |o: &str| rec.counter_value(&format!("{POOL_JOBS_TOTAL},outcome={o}"));

        assert_eq!(pool.run(|x: u32| x + 1, 1).await, Ok(2));
        let r = pool.run(|_: ()| -> u32 { panic!("boom") }, ()).await;
        assert_eq!(r, Err(PoolError::Panicked("boom".into())));

        // Hold the slot, fill the queue, then: Full, Timeout, cancelled.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(move |_: ()| rx.recv().is_ok(), ()).await })
        };
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|_: ()| (), ()).await })
        };
        wait_for(|| pool.running() == 1 && pool.queued() == 1).await;
        assert_eq!(rec.gauge_value(POOL_JOBS_RUNNING), 1.0);
        assert_eq!(rec.gauge_value(POOL_JOBS_QUEUED), 1.0);
        assert_eq!(pool.try_run(|_: ()| (), ()).await, Err(PoolError::Full));
        let r = pool
            .run_timeout(|_: ()| (), (), Duration::from_millis(20))
            .await;
        assert_eq!(r, Err(PoolError::Timeout));
        queued.abort();
        assert!(queued.await.unwrap_err().is_cancelled());
        assert_eq!(pool.queued(), 0);
        tx.send(()).unwrap();
        assert_eq!(holder.await.unwrap(), Ok(true));
        pool.wait_idle().await;

        assert_eq!(total("ok"), 2);
        assert_eq!(total("panicked"), 1);
        assert_eq!(total("rejected"), 1);
        assert_eq!(total("timeout"), 1);
        assert_eq!(total("cancelled"), 1);
        assert_eq!(rec.gauge_value(POOL_JOBS_RUNNING), 0.0);
        assert_eq!(rec.gauge_value(POOL_JOBS_QUEUED), 0.0);
        assert_eq!(rec.histogram_len(POOL_RUN_SECONDS), 3);
        assert_eq!(rec.histogram_len(POOL_QUEUE_WAIT_SECONDS), 3);

        pool.close();
        assert_eq!(pool.run(|_: ()| (), ()).await, Err(PoolError::Closed));
        assert_eq!(total("rejected"), 2);
    }

    async fn wait_for(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not met within 10 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
