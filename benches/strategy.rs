//! Cost of one pick per strategy at 3, 100 and 10,000 backends, on one thread and contended from two; the
//! cost of the per-connection bookkeeping (active guard and counters) on round-robin and least-connections
//! tables, whose guards keep the min-tree up to date; the cost of one rebuild-and-publish of the table;
//! and picks while another thread rebuilds the table without pause.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use ulb_tcp::bench_support::Picker;
use ulb_tcp::Strategy;

const STRATEGIES: [Strategy; 4] = [
    Strategy::RoundRobin,
    Strategy::LeastConnections,
    Strategy::Random,
    Strategy::PowerOfTwoChoices,
];
const SIZES: [usize; 3] = [3, 100, 10_000];

fn weights(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1 + (i % 3) as u32).collect()
}

fn single_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for strategy in STRATEGIES {
        for n in SIZES {
            let picker = Picker::new(&weights(n), strategy);
            let _load = picker.hold(n / 2);
            g.bench_with_input(BenchmarkId::new(strategy.as_str(), n), &n, |b, _| {
                b.iter(|| black_box(picker.pick()))
            });
        }
    }
    g.finish();
}

/// The same picks while a second thread hammers the same table: what two cores pay for sharing the
/// cursor, the generator and the active counters.
fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick_contended");
    for strategy in STRATEGIES {
        for n in SIZES {
            let picker = Arc::new(Picker::new(&weights(n), strategy));
            let _load = picker.hold(n / 2);
            let stop = Arc::new(AtomicBool::new(false));
            let other = {
                let (picker, stop) = (picker.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        black_box(picker.pick());
                        picker.bookkeeping(i);
                        i += 1;
                    }
                })
            };
            g.bench_with_input(BenchmarkId::new(strategy.as_str(), n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        black_box(picker.pick());
                    }
                    t0.elapsed()
                })
            });
            stop.store(true, Ordering::Relaxed);
            let _ = other.join();
        }
    }
    g.finish();
}

/// The per-connection bookkeeping on a round-robin table: the guard's count, the totals and the metrics
/// (the backend's slot holds no tree link, so the guard does not touch the table).
fn bookkeeping(c: &mut Criterion) {
    let mut g = c.benchmark_group("bookkeeping_rr");
    for n in SIZES {
        let picker = Picker::new(&weights(n), Strategy::RoundRobin);
        let _load = picker.hold(n / 2);
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("guard+counters", n), &n, |b, _| {
            b.iter(|| {
                picker.bookkeeping(i);
                i = i.wrapping_add(1);
            })
        });
    }
    g.finish();
}

/// The same bookkeeping on a least-connections table, where the guard also keeps the backend's leaf in the
/// min-tree up to date (from `TREE_MIN_BACKENDS` backends on; below that the table is scanned).
fn bookkeeping_least_connections(c: &mut Criterion) {
    let mut g = c.benchmark_group("bookkeeping_lc");
    for n in SIZES {
        let picker = Picker::new(&weights(n), Strategy::LeastConnections);
        let _load = picker.hold(n / 2);
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("guard+counters", n), &n, |b, _| {
            b.iter(|| {
                picker.bookkeeping(i);
                i = i.wrapping_add(1);
            })
        });
    }
    g.finish();
}

/// One change of one backend's weight, which rebuilds the table of the members and publishes it: the
/// smooth schedule for every strategy and, for least connections from 16 backends on (so at 100 and
/// 10,000 here, not at 3), a new min-tree of loads that every backend's slot is pointed at.
fn rebuild(c: &mut Criterion) {
    let mut g = c.benchmark_group("rebuild");
    g.sample_size(20)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(3));
    for strategy in STRATEGIES {
        for n in SIZES {
            let picker = Picker::new(&weights(n), strategy);
            let _load = picker.hold(n / 2);
            let mut i = 0usize;
            g.bench_with_input(BenchmarkId::new(strategy.as_str(), n), &n, |b, _| {
                b.iter(|| {
                    picker.rebuild(i);
                    i = i.wrapping_add(1);
                })
            });
        }
    }
    g.finish();
}

/// Picks at 10,000 backends while a second thread rebuilds and publishes the table without pause: picks
/// load the table in force and never wait for a writer. Compare with `pick/…/10000`; the rebuilds done
/// during each measurement are printed.
fn pick_during_rebuild(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick_during_rebuild");
    let n = 10_000;
    for strategy in [Strategy::RoundRobin, Strategy::LeastConnections] {
        let picker = Arc::new(Picker::new(&weights(n), strategy));
        let _load = picker.hold(n / 2);
        let stop = Arc::new(AtomicBool::new(false));
        let rebuilds = Arc::new(AtomicUsize::new(0));
        let other = {
            let (picker, stop, rebuilds) = (picker.clone(), stop.clone(), rebuilds.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    picker.rebuild(i);
                    rebuilds.fetch_add(1, Ordering::Relaxed);
                    i = i.wrapping_add(1);
                }
            })
        };
        let (mut picks, mut during) = (0u64, 0usize);
        let mut busy = Duration::ZERO;
        g.bench_with_input(BenchmarkId::new(strategy.as_str(), n), &n, |b, _| {
            b.iter_custom(|iters| {
                let before = rebuilds.load(Ordering::Relaxed);
                let t0 = Instant::now();
                for _ in 0..iters {
                    black_box(picker.pick());
                }
                let took = t0.elapsed();
                during += rebuilds.load(Ordering::Relaxed) - before;
                picks += iters;
                busy += took;
                took
            })
        });
        stop.store(true, Ordering::Relaxed);
        let _ = other.join();
        if picks > 0 {
            eprintln!(
                "pick_during_rebuild/{}/{n}: {during} rebuilds published while picking ({picks} picks, {:.0} rebuilds/s)",
                strategy.as_str(),
                during as f64 / busy.as_secs_f64(),
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = single_thread, contended, bookkeeping, bookkeeping_least_connections, rebuild,
        pick_during_rebuild
}
criterion_main!(benches);
