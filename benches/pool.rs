//! Blocking pool benchmarks.
//!
//! * `overhead/*`: the cost per job of `BlockingPool::run` against a bare `spawn_blocking`, one job at a
//!   time (latency) and 64 at once (throughput), where a bare semaphore in front of `spawn_blocking`
//!   separates the cost of bounding from the cost of the pool.
//! * `latency_under_load/*`: how long a cheap async operation takes (spawning an empty task and awaiting
//!   it; a 1 ms timer) while `8 × CPUs` callers keep CPU-heavy jobs coming, either through a pool of one
//!   slot per CPU or through unbounded `spawn_blocking`.
//!
//! ```text
//! cargo bench --bench pool -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tokio::runtime::Runtime;
use ulb_tcp::pool::{BlockingPool, PoolConfig};

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn overhead(c: &mut Criterion) {
    let rt = runtime();
    let pool = BlockingPool::new(PoolConfig::new(cpus(), 1024)).expect("pool");
    let mut g = c.benchmark_group("overhead");

    g.bench_function("spawn_blocking/sequential", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for i in 0..iters {
                    let r = tokio::task::spawn_blocking(move || black_box(i)).await;
                    black_box(r.expect("join"));
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("pool_run/sequential", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for i in 0..iters {
                    let r = pool.run(black_box, i).await;
                    black_box(r.expect("run"));
                }
                t.elapsed()
            })
        })
    });

    // 64 jobs at once; time per batch.
    const BATCH: u64 = 64;
    g.bench_function("spawn_blocking/batch64", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let hs: Vec<_> = (0..BATCH)
                        .map(|i| tokio::task::spawn_blocking(move || black_box(i)))
                        .collect();
                    for h in hs {
                        black_box(h.await.expect("join"));
                    }
                }
                t.elapsed()
            })
        })
    });
    // The minimal bounded equivalent: a bare semaphore permit moved into spawn_blocking. The gap between
    // this and `pool_run/batch64` is the pool's own cost; the gap to `spawn_blocking/batch64` is the
    // price of the bound itself (one hand-off of a slot per job).
    let sem = Arc::new(tokio::sync::Semaphore::new(cpus()));
    g.bench_function("semaphore_spawn_blocking/batch64", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let hs: Vec<_> = (0..BATCH)
                        .map(|i| {
                            let sem = sem.clone();
                            tokio::spawn(async move {
                                let permit = sem.acquire_owned().await.expect("permit");
                                tokio::task::spawn_blocking(move || {
                                    let _permit = permit;
                                    black_box(i)
                                })
                                .await
                            })
                        })
                        .collect();
                    for h in hs {
                        black_box(h.await.expect("join").expect("join"));
                    }
                }
                t.elapsed()
            })
        })
    });
    g.bench_function("pool_run/batch64", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let hs: Vec<_> = (0..BATCH)
                        .map(|i| {
                            let pool = pool.clone();
                            tokio::spawn(async move { pool.run(black_box, i).await })
                        })
                        .collect();
                    for h in hs {
                        black_box(h.await.expect("join").expect("run"));
                    }
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}

/// A CPU-heavy job: spins for 2 ms.
fn spin(_: ()) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2) {
        std::hint::spin_loop();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    Idle,
    Pool,
    Unbounded,
}

/// Starts `8 × CPUs` callers that submit CPU jobs back to back until `stop` is set.
fn start_load(
    rt: &Runtime,
    load: Load,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let pool = BlockingPool::new(PoolConfig::with_size(cpus())).expect("pool");
    let callers = if load == Load::Idle { 0 } else { 8 * cpus() };
    (0..callers)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            rt.spawn(async move {
                while !stop.load(Relaxed) {
                    match load {
                        Load::Pool => pool.run(spin, ()).await.expect("run"),
                        _ => tokio::task::spawn_blocking(|| spin(()))
                            .await
                            .expect("join"),
                    }
                }
            })
        })
        .collect()
}

fn latency_under_load(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("latency_under_load");
    for (name, load) in [
        ("idle", Load::Idle),
        ("pool_saturated", Load::Pool),
        ("unbounded_spawn_blocking", Load::Unbounded),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = start_load(&rt, load, &stop);
        g.bench_function(format!("spawn_roundtrip/{name}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        tokio::spawn(async {}).await.expect("join");
                    }
                    t.elapsed()
                })
            })
        });
        g.bench_function(format!("timer_1ms/{name}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        // Awaited on a worker thread, as a connection task would.
                        tokio::spawn(tokio::time::sleep(Duration::from_millis(1)))
                            .await
                            .expect("join");
                    }
                    t.elapsed()
                })
            })
        });
        stop.store(true, Relaxed);
        rt.block_on(async {
            for t in tasks {
                t.await.expect("load task");
            }
        });
    }
    g.finish();
}

criterion_group!(benches, overhead, latency_under_load);
criterion_main!(benches);
