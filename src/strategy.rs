//! The strategy table: which backend the next connection goes to.
//!
//! The backends are published as an immutable [`Table`] snapshot behind an `ArcSwap`, so readers never lock and
//! a later reload or active health check can swap a new table in whole. Each table carries a *schedule*: a
//! smooth weighted sequence of backend indices in which backend `i` appears `weight[i]` times, spread out
//! rather than bunched (earliest-deadline-first over `(2k + 1) / 2w`). With it:
//!
//! * round robin is one `fetch_add` on a cursor and an index into the schedule: O(1), weighted and smooth;
//! * random is one draw from a lock-free seedable generator and an index into the schedule: O(1) and weighted;
//! * power of two choices is two such draws and a comparison of `active / weight`: O(1);
//! * least connections scans for the least `active / weight`, ties going to the backend picked longest ago,
//!   so that idle backends share evenly: O(n).
//!
//! A backend that is down (passive health) or that this connection already tried is skipped: the pick walks
//! on along the schedule from where it landed, so every strategy finds an available backend if there is one.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::backend::Backend;

/// How the next backend is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// Weighted, smooth round robin: weights 1,2,3 give 1:2:3 interleaved. The default; best when backends
    /// are alike and connections cost about the same.
    #[default]
    RoundRobin,
    /// The backend with the fewest active connections per unit of weight; ties are broken in rotation.
    /// Best for long or uneven connections (databases, streaming).
    LeastConnections,
    /// Weighted random. Needs no shared cursor; seedable for tests.
    Random,
    /// Power of two choices: two weighted random picks, the less loaded wins. Close to least connections
    /// at the cost of random, and robust when many balancers share backends.
    PowerOfTwoChoices,
}

impl Strategy {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastConnections => "least-connections",
            Strategy::Random => "random",
            Strategy::PowerOfTwoChoices => "p2c",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a strategy name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy '{0}' (expected round-robin, least-connections, random or p2c)")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "round-robin" | "roundrobin" | "rr" => Ok(Strategy::RoundRobin),
            "least-connections" | "leastconn" | "lc" => Ok(Strategy::LeastConnections),
            "random" => Ok(Strategy::Random),
            "p2c" | "power-of-two-choices" => Ok(Strategy::PowerOfTwoChoices),
            _ => Err(UnknownStrategy(s.to_string())),
        }
    }
}

/// An immutable snapshot of the backends and their smooth schedule.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) backends: Box<[Arc<Backend>]>,
    schedule: Box<[u32]>,
}

impl Table {
    pub(crate) fn new(backends: Vec<Arc<Backend>>) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight()).collect();
        Table {
            schedule: smooth_schedule(&weights).into_boxed_slice(),
            backends: backends.into_boxed_slice(),
        }
    }
}

/// Builds the smooth weighted sequence: backend `i` appears `w[i] / gcd` times, each at its earliest
/// deadline `(2k + 1) / 2w`, so heavy backends are spread through the sequence instead of bunched.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<u64> = weights.iter().map(|&w| u64::from(w / g)).collect();
    let total: u64 = w.iter().sum();

    // Heap entry: backend `i` whose next slot `k` has deadline (2k+1)/(2 w_i); smallest deadline first,
    // ties to the lower index.
    #[derive(PartialEq, Eq)]
    struct Slot {
        k: u64,
        w: u64,
        i: u32,
    }
    impl Ord for Slot {
        fn cmp(&self, other: &Self) -> CmpOrdering {
            // self < other when (2k+1)/w is smaller; reversed because BinaryHeap is a max-heap.
            let a = (2 * self.k + 1) * other.w;
            let b = (2 * other.k + 1) * self.w;
            b.cmp(&a).then_with(|| other.i.cmp(&self.i))
        }
    }
    impl PartialOrd for Slot {
        fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
            Some(self.cmp(other))
        }
    }

    let mut heap: BinaryHeap<Slot> = w
        .iter()
        .enumerate()
        .filter(|(_, &w)| w > 0)
        .map(|(i, &w)| Slot {
            k: 0,
            w,
            i: i as u32,
        })
        .collect();
    let mut out = Vec::with_capacity(total as usize);
    while let Some(mut slot) = heap.pop() {
        out.push(slot.i);
        slot.k += 1;
        if slot.k < slot.w {
            heap.push(slot);
        }
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A lock-free, seedable generator (SplitMix64 over an atomic counter): one `fetch_add` per draw.
#[derive(Debug)]
pub(crate) struct AtomicRng(AtomicU64);

impl AtomicRng {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    pub(crate) fn new(seed: u64) -> Self {
        AtomicRng(AtomicU64::new(seed))
    }

    #[inline]
    pub(crate) fn next_u64(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(Self::GAMMA, Relaxed)
            .wrapping_add(Self::GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (multiply-shift; `n > 0`).
    #[inline]
    pub(crate) fn below(&self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// Picks backends from the current table.
#[derive(Debug)]
pub(crate) struct Selector {
    table: ArcSwap<Table>,
    strategy: Strategy,
    cursor: AtomicUsize,
    rng: AtomicRng,
}

impl Selector {
    pub(crate) fn new(table: Table, strategy: Strategy, seed: u64) -> Self {
        Selector {
            table: ArcSwap::from_pointee(table),
            strategy,
            cursor: AtomicUsize::new(0),
            rng: AtomicRng::new(seed),
        }
    }

    pub(crate) fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The current snapshot.
    pub(crate) fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Picks a backend that is available and not in `tried`; `None` when there is none.
    pub(crate) fn pick(&self, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        let table = self.table.load();
        let backends = &table.backends;
        let schedule = &table.schedule;
        match backends.len() {
            0 => return None,
            1 => {
                let b = &backends[0];
                return usable(b, tried).then(|| b.clone());
            }
            _ => {}
        }
        let ok = |b: &Arc<Backend>| usable(b, tried);
        let picked = match self.strategy {
            // A slot whose backend is unusable is skipped by drawing again, not by walking on to the
            // neighbour: walking would hand every turn of a down backend to the one after it.
            Strategy::RoundRobin => {
                let draw = || self.cursor.fetch_add(1, Relaxed);
                redraw(backends, schedule, schedule.len(), draw, ok)
            }
            Strategy::Random => {
                let draw = || self.rng.below(schedule.len());
                redraw(backends, schedule, RANDOM_REDRAWS, draw, ok)
            }
            Strategy::PowerOfTwoChoices => self.pick_p2c(backends, schedule, ok),
            Strategy::LeastConnections => {
                let seq = self.cursor.fetch_add(1, Relaxed) as u64 + 1;
                let best = least_loaded(backends, ok);
                if let Some(b) = best {
                    b.last_pick.store(seq, Relaxed);
                }
                best
            }
        };
        picked.cloned()
    }

    fn pick_p2c<'t>(
        &self,
        backends: &'t [Arc<Backend>],
        schedule: &[u32],
        ok: impl Fn(&Arc<Backend>) -> bool,
    ) -> Option<&'t Arc<Backend>> {
        let n = schedule.len();
        let first = self.rng.below(n);
        let a = schedule[first];
        // Second choice: a different backend. Draw a few times (weights may repeat `a`), then step along.
        let mut b = a;
        for _ in 0..4 {
            b = schedule[self.rng.below(n)];
            if b != a {
                break;
            }
        }
        if b == a {
            b = ((a as usize + 1) % backends.len()) as u32;
        }
        let (ba, bb) = (&backends[a as usize], &backends[b as usize]);
        match (ok(ba), ok(bb)) {
            (true, true) => Some(if less_loaded(bb, ba) { bb } else { ba }),
            (true, false) => Some(ba),
            (false, true) => Some(bb),
            (false, false) => {
                let draw = || self.rng.below(n);
                redraw(backends, schedule, RANDOM_REDRAWS, draw, ok)
            }
        }
    }
}

#[inline]
fn usable(b: &Arc<Backend>, tried: &[Arc<Backend>]) -> bool {
    b.is_available() && !tried.iter().any(|t| Arc::ptr_eq(t, b))
}

/// Random draws tried before falling back to a walk along the schedule.
const RANDOM_REDRAWS: usize = 8;

/// Draws slots with `draw` until one holds a usable backend (at most `tries` draws), then walks on from the
/// last draw so that a usable backend is found whenever there is one.
#[inline]
fn redraw<'t>(
    backends: &'t [Arc<Backend>],
    schedule: &[u32],
    tries: usize,
    mut draw: impl FnMut() -> usize,
    ok: impl Fn(&Arc<Backend>) -> bool,
) -> Option<&'t Arc<Backend>> {
    let n = schedule.len();
    let mut slot = 0;
    for _ in 0..tries.max(1) {
        slot = draw() % n;
        let b = &backends[schedule[slot] as usize];
        if ok(b) {
            return Some(b);
        }
    }
    walk(backends, schedule, slot, ok)
}

/// The first usable backend along the schedule from `start` (wrapping).
#[inline]
fn walk<'t>(
    backends: &'t [Arc<Backend>],
    schedule: &[u32],
    start: usize,
    ok: impl Fn(&Arc<Backend>) -> bool,
) -> Option<&'t Arc<Backend>> {
    let n = schedule.len();
    let start = start % n;
    (0..n)
        .map(|k| &backends[schedule[(start + k) % n] as usize])
        .find(|b| ok(b))
}

/// True when `a` carries less load per unit of weight than `b`: `a.active / a.weight < b.active / b.weight`.
#[inline]
fn less_loaded(a: &Backend, b: &Backend) -> bool {
    (a.active() as u64) * u64::from(b.weight()) < (b.active() as u64) * u64::from(a.weight())
}

/// The usable backend with the least load per unit of weight; among equals, the one picked longest ago, so
/// that ties are shared out in turn.
fn least_loaded(
    backends: &[Arc<Backend>],
    ok: impl Fn(&Arc<Backend>) -> bool,
) -> Option<&Arc<Backend>> {
    let mut best: Option<&Arc<Backend>> = None;
    for b in backends.iter().filter(|b| ok(b)) {
        let better = match best {
            None => true,
            Some(cur) => {
                less_loaded(b, cur)
                    || (!less_loaded(cur, b)
                        && b.last_pick.load(Relaxed) < cur.last_pick.load(Relaxed))
            }
        };
        if better {
            best = Some(b);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ActiveGuard;

    fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = format!("127.0.0.1:{}", 10_000 + i).parse().unwrap();
                Arc::new(Backend::new(&format!("b{i}"), addr, w))
            })
            .collect()
    }

    /// Four backends of weight 1; backend 1 has failed enough connects to be held down.
    fn four_with_backend_1_down() -> Vec<Arc<Backend>> {
        let bs = backends(&[1, 1, 1, 1]);
        let policy = crate::config::PassiveHealth::default();
        for _ in 0..policy.failure_threshold {
            bs[1].connect_failed(&policy);
        }
        bs
    }

    fn index_of(bs: &[Arc<Backend>], b: &Arc<Backend>) -> usize {
        bs.iter().position(|x| Arc::ptr_eq(x, b)).unwrap()
    }

    #[test]
    fn schedule_is_smooth_and_exact() {
        assert_eq!(smooth_schedule(&[1, 2, 3]), vec![2, 1, 0, 2, 1, 2]);
        assert_eq!(
            smooth_schedule(&[2, 2, 2]),
            vec![0, 1, 2],
            "gcd is divided out"
        );
        let s = smooth_schedule(&[5, 1, 1]);
        assert_eq!(s.len(), 7);
        // The heavy backend never runs more than three picks in a row.
        let longest = s.chunk_by(|a, b| a == b).map(<[u32]>::len).max().unwrap();
        assert!(longest <= 3, "schedule {s:?} is bursty");
    }

    #[test]
    fn round_robin_weighted_counts() {
        let bs = backends(&[1, 2, 3]);
        let sel = Selector::new(Table::new(bs.clone()), Strategy::RoundRobin, 1);
        let mut counts = [0; 3];
        for _ in 0..600 {
            counts[index_of(&bs, &sel.pick(&[]).unwrap())] += 1;
        }
        assert_eq!(counts, [100, 200, 300]);
    }

    #[test]
    fn every_strategy_skips_down_and_tried_backends() {
        for strategy in [
            Strategy::RoundRobin,
            Strategy::LeastConnections,
            Strategy::Random,
            Strategy::PowerOfTwoChoices,
        ] {
            let bs = four_with_backend_1_down();
            let sel = Selector::new(Table::new(bs.clone()), strategy, 7);
            for _ in 0..1000 {
                let b = sel.pick(&[bs[2].clone()]).unwrap();
                let i = index_of(&bs, &b);
                assert!(
                    i != 1 && i != 2,
                    "{strategy} picked backend {i}, which is down or tried"
                );
            }
            let all: Vec<_> = vec![bs[0].clone(), bs[2].clone(), bs[3].clone()];
            assert!(
                sel.pick(&all).is_none(),
                "{strategy}: nothing usable is left"
            );
        }
    }

    #[test]
    fn a_down_backend_s_turns_are_shared_by_all_the_others() {
        for strategy in [
            Strategy::RoundRobin,
            Strategy::Random,
            Strategy::PowerOfTwoChoices,
        ] {
            let bs = four_with_backend_1_down();
            let sel = Selector::new(Table::new(bs.clone()), strategy, 11);
            let mut counts = [0usize; 4];
            for _ in 0..3000 {
                counts[index_of(&bs, &sel.pick(&[]).unwrap())] += 1;
            }
            assert_eq!(counts[1], 0);
            for i in [0, 2, 3] {
                assert!(
                    (850..=1150).contains(&counts[i]),
                    "{strategy}: uneven shares {counts:?}"
                );
            }
            if strategy == Strategy::RoundRobin {
                assert_eq!(counts, [1000, 0, 1000, 1000]);
            }
        }
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_per_weight() {
        let bs = backends(&[1, 1, 2]);
        let sel = Selector::new(Table::new(bs.clone()), Strategy::LeastConnections, 1);
        let _g: Vec<_> = [0, 0, 1, 2, 2]
            .iter()
            .map(|&i| ActiveGuard::new(bs[i].clone()))
            .collect();
        // Loads per weight: 2/1, 1/1, 2/2: backends 1 and 2 tie, and ties are shared in turn.
        let mut seen = [0; 3];
        for _ in 0..10 {
            seen[index_of(&bs, &sel.pick(&[]).unwrap())] += 1;
        }
        assert_eq!(seen, [0, 5, 5]);
    }

    #[test]
    fn p2c_takes_the_less_loaded_of_two() {
        let bs = backends(&[1, 1]);
        let sel = Selector::new(Table::new(bs.clone()), Strategy::PowerOfTwoChoices, 3);
        let _g = ActiveGuard::new(bs[0].clone());
        for _ in 0..100 {
            assert_eq!(index_of(&bs, &sel.pick(&[]).unwrap()), 1);
        }
    }

    #[test]
    fn random_is_seeded_and_weighted() {
        let bs = backends(&[1, 3]);
        let run = |seed| {
            let sel = Selector::new(Table::new(bs.clone()), Strategy::Random, seed);
            (0..4000)
                .map(|_| index_of(&bs, &sel.pick(&[]).unwrap()))
                .collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42), "the same seed must give the same picks");
        let heavy = a.iter().filter(|&&i| i == 1).count();
        // Expected 3000; the binomial standard deviation is ~27, so ±200 is more than 7 sigma.
        assert!(
            (2800..=3200).contains(&heavy),
            "weight 3 of 4 got {heavy} of 4000"
        );
    }

    #[test]
    fn rng_below_stays_in_range() {
        let rng = AtomicRng::new(9);
        for n in [1, 2, 3, 7, 1000] {
            assert!((0..10_000).all(|_| rng.below(n) < n));
        }
    }
}
