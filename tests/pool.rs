//! The blocking pool: bounds, queue, cancellation, panics, close, timeouts, and a balancer that stays
//! responsive while the pool is saturated.
//!
//! No sleep is used as synchronization: tests wait on observable state (the pool's counts, atomics) under
//! deadlines, and hold slots with jobs that block on a gate the test opens.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ulb_tcp::pool::{BlockingPool, HybridProcessor, PoolConfig, PoolError};
use ulb_tcp::{BackendConfig, BalancerConfig, TcpBalancer};

const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A gate that blocking jobs wait on until the test opens it (or a safety deadline passes).
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn new() -> Arc<Self> {
        Arc::new(Gate::default())
    }

    /// Blocks the calling (blocking) thread; true if opened, false at the safety deadline.
    fn wait(&self) -> bool {
        let guard = self.open.lock().unwrap();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, DEADLINE, |open| !*open)
            .unwrap();
        *guard
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

/// Spawns a task that runs one job holding a slot until `gate` opens.
fn hold_slot(
    pool: &BlockingPool,
    gate: &Arc<Gate>,
) -> tokio::task::JoinHandle<Result<bool, PoolError>> {
    let (pool, gate) = (pool.clone(), gate.clone());
    tokio::spawn(async move { pool.run(move |g: Arc<Gate>| g.wait(), gate).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_size_jobs_run_at_once() {
    const SIZE: usize = 3;
    const JOBS: usize = 1_000;
    let pool = BlockingPool::new(PoolConfig::new(SIZE, 16)).unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    let high = Arc::new(AtomicUsize::new(0));

    let mut tasks = Vec::with_capacity(JOBS);
    for i in 0..JOBS {
        let (pool, now, high) = (pool.clone(), now.clone(), high.clone());
        tasks.push(tokio::spawn(async move {
            pool.run(
                move |i: usize| {
                    let n = now.fetch_add(1, SeqCst) + 1;
                    high.fetch_max(n, SeqCst);
                    // A little work, so that jobs overlap.
                    let mut x = i as u64;
                    for _ in 0..2_000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                    now.fetch_sub(1, SeqCst);
                    (i, x)
                },
                i,
            )
            .await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (j, _) = t.await.unwrap().unwrap();
        assert_eq!(i, j);
    }
    let high = high.load(SeqCst);
    assert!(
        (1..=SIZE).contains(&high),
        "high-water mark {high} exceeds size {SIZE}"
    );
    assert_eq!((pool.running(), pool.queued()), (0, 0));
    println!("high-water mark {high} of {SIZE}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_jobs_do_run_together() {
    // Each job waits until all `SIZE` are running: they only finish if the pool runs them together.
    const SIZE: usize = 4;
    let pool = BlockingPool::new(PoolConfig::new(SIZE, 1)).unwrap();
    let arrived = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..SIZE {
        let (pool, arrived) = (pool.clone(), arrived.clone());
        tasks.push(tokio::spawn(async move {
            pool.run(
                move |_: ()| {
                    arrived.fetch_add(1, SeqCst);
                    let deadline = Instant::now() + DEADLINE;
                    while arrived.load(SeqCst) < SIZE && Instant::now() < deadline {
                        std::thread::yield_now();
                    }
                    arrived.load(SeqCst) >= SIZE
                },
                (),
            )
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(true));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_bound_holds_and_try_run_rejects_exactly_when_full() {
    const SIZE: usize = 2;
    const QUEUE: usize = 3;
    let pool = BlockingPool::new(PoolConfig::new(SIZE, QUEUE)).unwrap();
    let gate = Gate::new();

    // Fill the slots.
    let holders: Vec<_> = (0..SIZE).map(|_| hold_slot(&pool, &gate)).collect();
    wait_for("slots full", || pool.running() == SIZE).await;

    // Fill the queue but one place, with `run`.
    let mut queued: Vec<_> = (0..QUEUE - 1).map(|_| hold_slot(&pool, &gate)).collect();
    wait_for("queue all but full", || pool.queued() == QUEUE - 1).await;

    // One place left: try_run is admitted (and waits for a slot).
    let admitted = {
        let (pool, gate) = (pool.clone(), gate.clone());
        tokio::spawn(async move { pool.try_run(move |g: Arc<Gate>| g.wait(), gate).await })
    };
    wait_for("queue full", || pool.queued() == QUEUE).await;

    // Now the queue is full: try_run fails at once, and the job is not run.
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let r = pool
        .try_run(move |_: ()| flag.store(true, SeqCst), ())
        .await;
    assert_eq!(r, Err(PoolError::Full));

    // `run` waits for room instead; it stays out of the queue meanwhile.
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.run(|x: u32| x * 2, 21).await })
    };
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    assert_eq!((pool.running(), pool.queued()), (SIZE, QUEUE));

    gate.open();
    for h in holders {
        assert_eq!(h.await.unwrap(), Ok(true));
    }
    queued.push(admitted);
    for q in queued {
        assert_eq!(q.await.unwrap(), Ok(true));
    }
    assert_eq!(waiting.await.unwrap(), Ok(42));
    pool.wait_idle().await;
    assert!(!ran.load(SeqCst), "a job refused with Full ran");
    // With room again, try_run goes through.
    assert_eq!(pool.try_run(|x: u32| x + 1, 1).await, Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_is_isolated() {
    let pool = BlockingPool::new(PoolConfig::new(1, 4)).unwrap();
    let r = pool
        .run(|n: u32| -> u32 { panic!("bad input {n}") }, 7)
        .await;
    assert_eq!(r, Err(PoolError::Panicked("bad input 7".into())));
    let r = pool
        .run(|_: ()| -> u32 { panic!("static message") }, ())
        .await;
    assert_eq!(r, Err(PoolError::Panicked("static message".into())));
    let r = pool
        .run(|_: ()| -> u32 { std::panic::panic_any(42_i32) }, ())
        .await;
    assert!(matches!(r, Err(PoolError::Panicked(_))), "{r:?}");

    // The slot came back, and the pool (and this task) carry on.
    assert_eq!(pool.running(), 0);
    assert_eq!(pool.run(|n: u32| n + 1, 1).await, Ok(2));
    let results: Vec<_> = futures_join(
        (0..8)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.run(|i: u32| i * i, i).await })
            })
            .collect(),
    )
    .await;
    assert_eq!(
        results,
        (0..8).map(|i| Ok(i * i)).collect::<Vec<Result<u32, _>>>()
    );
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_dropped_before_it_starts_never_runs() {
    let pool = BlockingPool::new(PoolConfig::new(1, 4)).unwrap();
    let gate = Gate::new();
    let holder = hold_slot(&pool, &gate);
    wait_for("slot taken", || pool.running() == 1).await;

    let ran = Arc::new(AtomicBool::new(false));
    let dropped_unrun = Arc::new(AtomicBool::new(false));
    // The job owns a value whose drop tells us the closure was discarded.
    struct Witness(Arc<AtomicBool>);
    impl Drop for Witness {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }
    let witness = Witness(dropped_unrun.clone());
    let flag = ran.clone();
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.run(
                move |w: Witness| {
                    flag.store(true, SeqCst);
                    drop(w);
                },
                witness,
            )
            .await
        })
    };
    wait_for("job queued", || pool.queued() == 1).await;

    // Drop the caller's future (abort its task) while the job waits.
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    assert_eq!(pool.queued(), 0, "the queue place was not freed");
    assert!(dropped_unrun.load(SeqCst), "the job's data was not dropped");

    // Free the slot; the cancelled job must not run.
    gate.open();
    assert_eq!(holder.await.unwrap(), Ok(true));
    pool.wait_idle().await;
    // Run one more job through the single slot: had the cancelled one been pending, it would run first.
    assert_eq!(pool.run(|x: u8| x, 5).await, Ok(5));
    assert!(!ran.load(SeqCst), "a cancelled job ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_running_job_lets_it_finish() {
    // A started job cannot be cancelled: it runs to completion and keeps its slot until then.
    let pool = BlockingPool::new(PoolConfig::new(1, 1)).unwrap();
    let gate = Gate::new();
    let finished = Arc::new(AtomicBool::new(false));
    let (g, f) = (gate.clone(), finished.clone());
    let task = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.run(
                move |_: ()| {
                    g.wait();
                    f.store(true, SeqCst);
                },
                (),
            )
            .await
        })
    };
    wait_for("job running", || pool.running() == 1).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(pool.running(), 1, "the running job lost its slot");
    gate.open();
    pool.wait_idle().await;
    assert!(finished.load(SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_refuses_new_and_queued_jobs_and_lets_running_ones_finish() {
    let pool = BlockingPool::new(PoolConfig::new(1, 2)).unwrap();
    let gate = Gate::new();
    let running = hold_slot(&pool, &gate);
    wait_for("slot taken", || pool.running() == 1).await;

    let ran = Arc::new(AtomicUsize::new(0));
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let (pool, ran) = (pool.clone(), ran.clone());
            tokio::spawn(async move {
                pool.run(
                    move |_: ()| {
                        ran.fetch_add(1, SeqCst);
                    },
                    (),
                )
                .await
            })
        })
        .collect();
    wait_for("queue full", || pool.queued() == 2).await;

    pool.close();
    assert!(pool.is_closed());
    // Queued jobs are refused with Closed and never run.
    for q in queued {
        assert_eq!(q.await.unwrap(), Err(PoolError::Closed));
    }
    assert_eq!(pool.queued(), 0);
    // New jobs are refused, whichever way they come.
    assert_eq!(pool.run(|x: u8| x, 1).await, Err(PoolError::Closed));
    assert_eq!(pool.try_run(|x: u8| x, 1).await, Err(PoolError::Closed));
    assert_eq!(
        pool.run_timeout(|x: u8| x, 1, Duration::from_secs(5)).await,
        Err(PoolError::Closed)
    );
    // The running job is still running, and finishes normally once released.
    assert_eq!(pool.running(), 1);
    let idle = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.wait_idle().await })
    };
    tokio::task::yield_now().await;
    assert!(!idle.is_finished(), "wait_idle returned while a job ran");
    gate.open();
    assert_eq!(running.await.unwrap(), Ok(true));
    tokio::time::timeout(DEADLINE, idle)
        .await
        .expect("wait_idle did not return")
        .unwrap();
    assert_eq!(pool.running(), 0);
    assert_eq!(ran.load(SeqCst), 0, "a queued job ran after close");
    // shutdown on a closed, idle pool returns at once.
    tokio::time::timeout(DEADLINE, pool.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_timeout_gives_up_before_start() {
    let pool = BlockingPool::new(PoolConfig::new(1, 1)).unwrap();
    let gate = Gate::new();
    let holder = hold_slot(&pool, &gate);
    wait_for("slot taken", || pool.running() == 1).await;

    // Waiting for a slot: times out, never runs, leaves the queue.
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let started = Instant::now();
    let r = pool
        .run_timeout(
            move |_: ()| flag.store(true, SeqCst),
            (),
            Duration::from_millis(50),
        )
        .await;
    assert_eq!(r, Err(PoolError::Timeout));
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(pool.queued(), 0);

    // Waiting for room in a full queue: times out too.
    let queued = {
        let (pool, gate) = (pool.clone(), gate.clone());
        tokio::spawn(async move { pool.run(move |g: Arc<Gate>| g.wait(), gate).await })
    };
    wait_for("queue full", || pool.queued() == 1).await;
    let flag = ran.clone();
    let r = pool
        .run_timeout(
            move |_: ()| flag.store(true, SeqCst),
            (),
            Duration::from_millis(20),
        )
        .await;
    assert_eq!(r, Err(PoolError::Timeout));
    assert_eq!(pool.queued(), 1);

    gate.open();
    assert_eq!(holder.await.unwrap(), Ok(true));
    assert_eq!(queued.await.unwrap(), Ok(true));
    // With a free slot it runs; the deadline does not cover the run itself.
    let r = pool
        .run_timeout(
            |_: ()| {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(30) {
                    std::hint::spin_loop();
                }
                "done"
            },
            (),
            Duration::from_millis(10),
        )
        .await;
    assert_eq!(r, Ok("done"));
    assert!(!ran.load(SeqCst), "a timed-out job ran");
}

#[tokio::test]
async fn hybrid_processor_is_the_pool() {
    let p: HybridProcessor = HybridProcessor::new(PoolConfig::with_size(2)).unwrap();
    assert_eq!((p.size(), p.queue_bound()), (2, 8));
    assert_eq!(p.run(|s: String| s.len(), "hello".to_string()).await, Ok(5));
}

// ---------------------------------------------------------------------------------------------------
// A balancer on the same runtime stays responsive while the pool is saturated with CPU jobs.

/// An echo backend on an ephemeral loopback port.
async fn echo_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Round trips of 32 bytes on one connection through the balancer; returns each one's latency.
async fn echo_round_trips(stream: &mut tokio::net::TcpStream, n: usize) -> Vec<Duration> {
    let msg = [0x5a_u8; 32];
    let mut buf = [0_u8; 32];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        stream.write_all(&msg).await.unwrap();
        stream.read_exact(&mut buf).await.unwrap();
        out.push(t.elapsed());
        assert_eq!(buf, msg);
    }
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn fib(n: u64) -> u64 {
    if n < 2 {
        n
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_stays_responsive_while_the_pool_is_saturated() {
    let echo = echo_backend().await;
    let balancer = TcpBalancer::new(BalancerConfig::new([BackendConfig::new(echo)])).unwrap();
    let handle = balancer.handle();
    let listener = ulb_tcp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(balancer.serve(listener, std::future::pending()));

    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.set_nodelay(true).unwrap();
    // Warm up, then the baseline.
    echo_round_trips(&mut conn, 20).await;
    let baseline = echo_round_trips(&mut conn, 200).await;
    let base_p50 = pct(&baseline, 0.5);
    let bound = (base_p50 * 20).max(Duration::from_millis(50));

    // Saturate the pool: every slot busy with CPU work, the queue full, and more callers waiting.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = BlockingPool::new(PoolConfig::new(cpus, 4 * cpus)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..(cpus * 8) {
        let (pool, stop, done) = (pool.clone(), stop.clone(), done.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                // fib(27): a few ms of pure CPU per job.
                let r = pool.run(fib, 27).await;
                assert_eq!(r, Ok(196_418));
                done.fetch_add(1, SeqCst);
            }
        }));
    }
    wait_for("pool saturated", || {
        pool.running() == cpus && pool.queued() == 4 * cpus
    })
    .await;

    let done_before = done.load(SeqCst);
    let loaded = echo_round_trips(&mut conn, 500).await;
    // Demand never dropped (8 × cpus callers for cpus slots and 4 × cpus places), and jobs went on
    // finishing meanwhile: the pool was busy throughout.
    let still_busy = pool.running() + pool.queued() >= cpus;
    let jobs_meanwhile = done.load(SeqCst) - done_before;
    stop.store(true, SeqCst);
    for t in load {
        t.await.unwrap();
    }
    pool.shutdown().await;

    let (p50, p99) = (pct(&loaded, 0.5), pct(&loaded, 0.99));
    println!(
        "baseline p50 {base_p50:?} p99 {:?}; saturated p50 {p50:?} p99 {p99:?}; bound {bound:?}; {jobs_meanwhile} jobs done meanwhile",
        pct(&baseline, 0.99),
    );
    assert!(still_busy, "the pool drained during the measurement");
    assert!(jobs_meanwhile > 0, "no job finished during the measurement");
    assert!(p50 <= bound, "p50 {p50:?} above bound {bound:?}");
    assert!(p99 <= bound, "p99 {p99:?} above bound {bound:?}");

    drop(conn);
    handle.shutdown();
    let report = server.await.unwrap().unwrap();
    assert_eq!(report.forced, 0);
}
