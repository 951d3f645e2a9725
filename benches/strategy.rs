//! Cost of one pick per strategy at 3, 100 and 10,000 backends, on one thread and contended from two, and
//! the cost of the per-connection bookkeeping (active guard and counters), also on least-connections
//! tables, whose guards keep the min-tree up to date.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
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

fn bookkeeping(c: &mut Criterion) {
    let picker = Picker::new(&weights(3), Strategy::RoundRobin);
    let mut i = 0usize;
    c.bench_function("bookkeeping/guard+counters", |b| {
        b.iter(|| {
            picker.bookkeeping(i);
            i = i.wrapping_add(1);
        })
    });
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

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = single_thread, contended, bookkeeping, bookkeeping_least_connections
}
criterion_main!(benches);
