//! The strategy table: which backend the next connection goes to.
//!
//! The backends are published as an immutable [`Table`] snapshot behind an `ArcSwap`, so readers never lock and
//! a later reload or active health check can swap a new table in whole. Each table carries a *schedule*: a
//! smooth weighted sequence of backend indices in which backend `i` appears `weight[i]` times, spread out
//! rather than bunched (earliest-deadline-first over `(2k + 1) / 2w`). With it:
//!
//! * round robin is one `fetch_add` on a cursor and an index into the schedule: O(1), weighted and smooth;
//! * random is one draw from a lock-free seedable generator and an index into the schedule: O(1) and weighted;
//! * power of two choices is two such slots (from one draw) and a comparison of `active / weight`: O(1);
//! * least connections finds the least `active / weight`. From 16 backends on it reads the root of a
//!   min-tree of the loads that the connection guards keep up to date (`load_tree`): O(1) per pick, O(log n)
//!   per guard, equal backends taking turns as connections come and go. Below that it scans, O(n), ties
//!   going to the backend picked longest ago.
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
use crate::load_tree::{Excluded, LoadTree};

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
    /// The least-connections min-tree, for a least-connections table of more than [`TREE_MIN_BACKENDS`].
    tree: Option<Arc<LoadTree>>,
}

impl Table {
    pub(crate) fn new(backends: Vec<Arc<Backend>>) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight()).collect();
        Table {
            schedule: smooth_schedule(&weights).into_boxed_slice(),
            backends: backends.into_boxed_slice(),
            tree: None,
        }
    }

    /// Builds the least-connections tree when the table is large enough to gain from it. Without it (a
    /// small table, or backends already linked to another table's tree) least connections scans.
    fn with_load_tree(mut self) -> Self {
        if self.backends.len() >= TREE_MIN_BACKENDS {
            self.tree = LoadTree::attach(&self.backends);
        }
        self
    }

    /// To be called after a backend was enabled or disabled by hand.
    pub(crate) fn availability_changed(&self) {
        if let Some(tree) = &self.tree {
            tree.recheck();
        }
    }
}

/// From this many backends on, least connections uses a min-tree instead of scanning. Measured per
/// connection (pick, plus the guard's upkeep of the tree): at 16 backends the two cost about the same
/// (41 ns scanning, 30 + 13 ns with the tree), at 32 the scan costs 79 ns and the tree still 44.
const TREE_MIN_BACKENDS: usize = 16;

/// Tries at the tree per pick before scanning: each one that lands on an unavailable backend marks it down
/// in the tree, so the next one goes elsewhere.
const TREE_WALKS: usize = 4;

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
        let table = match strategy {
            Strategy::LeastConnections => table.with_load_tree(),
            _ => table,
        };
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
                let from_tree = table
                    .tree
                    .as_ref()
                    .and_then(|tree| least_loaded_in_tree(tree, backends, tried));
                from_tree.or_else(|| {
                    let seq = self.cursor.fetch_add(1, Relaxed) as u64 + 1;
                    let best = least_loaded(backends, ok);
                    if let Some(b) = best {
                        b.last_pick.store(seq, Relaxed);
                    }
                    best
                })
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
        // Each draw from the shared generator gives two slots, one per 32-bit half: one draw per pick
        // unless the second slot holds the same backend as the first.
        let mut bits = 0u64;
        let mut halves = 0;
        let mut slot = || {
            if n > u32::MAX as usize {
                return self.rng.below(n);
            }
            if halves == 0 {
                bits = self.rng.next_u64();
                halves = 2;
            }
            halves -= 1;
            let half = u64::from(bits as u32);
            bits >>= 32;
            ((half * n as u64) >> 32) as usize
        };
        let a = schedule[slot()];
        // Second choice: a different backend. Draw a few times (weights may repeat `a`), then step along.
        let mut b = a;
        for _ in 0..4 {
            b = schedule[slot()];
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

/// Least connections through the table's min-tree: O(1) (O(log n) around tried backends). `None` sends
/// the caller to the scan: when every backend left is marked down or tried (the scan has the last word on
/// who is available), when a few picks in a row landed on backends that turned out to be unavailable, or
/// when too many were tried.
fn least_loaded_in_tree<'t>(
    tree: &Arc<LoadTree>,
    backends: &'t [Arc<Backend>],
    tried: &[Arc<Backend>],
) -> Option<&'t Arc<Backend>> {
    let count = tree_picks();
    tree.maintain(count, backends);
    let mut excluded = Excluded::default();
    for t in tried {
        if let Some(leaf) = t.load_link.get().and_then(|l| l.leaf_in(tree)) {
            if !excluded.push(leaf) {
                return None;
            }
        }
    }
    let ties = count.reverse_bits();
    for _ in 0..TREE_WALKS {
        let leaf = if excluded.is_empty() {
            tree.pick(ties)
        } else {
            tree.walk(ties, &excluded)
        }?;
        let b = backends.get(tree.backend_of(leaf))?;
        if !b.is_available() {
            tree.mark_down(leaf, b);
            continue;
        }
        // Tried backends were walked around; one that was not in the tree is left to the scan.
        return usable(b, tried).then_some(b);
    }
    None
}

/// Counts this thread's least-connections picks through a tree, to spread ties and drive the sweep. Per
/// thread, so that picks share no counter (they only read the tree); each thread starts at its own point.
fn tree_picks() -> u64 {
    static THREADS: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static PICKS: std::cell::Cell<u64> = std::cell::Cell::new(
            THREADS.fetch_add(1, Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
    }
    PICKS.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    })
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

    /// `a` carries no more load per unit of weight than `b`.
    fn no_more_loaded(a: &Backend, b: &Backend) -> bool {
        !less_loaded(b, a)
    }

    fn least_connections(bs: &[Arc<Backend>]) -> Selector {
        let sel = Selector::new(Table::new(bs.to_vec()), Strategy::LeastConnections, 5);
        assert!(
            sel.table().tree.is_some(),
            "{} backends: the tree is used",
            bs.len()
        );
        sel
    }

    #[test]
    fn least_connections_tree_finds_the_least_loaded_of_10000() {
        let bs = backends(&vec![1; 10_000]);
        let sel = least_connections(&bs);
        let mut held: Vec<_> = (0..10_000)
            .filter(|&i| i != 1234 && i != 8765)
            .map(|i| ActiveGuard::new(bs[i].clone()))
            .collect();
        let mut first_two: Vec<usize> = (0..2)
            .map(|_| {
                let b = sel.pick(&[]).unwrap();
                held.push(ActiveGuard::new(b.clone()));
                index_of(&bs, &b)
            })
            .collect();
        first_two.sort_unstable();
        assert_eq!(
            first_two,
            vec![1234, 8765],
            "the two idle backends go first"
        );

        // All at one now; backend 42 drops to zero, but is down: the next least loaded are at one.
        held.retain(|g| !Arc::ptr_eq(g.backend(), &bs[42]));
        let policy = crate::config::PassiveHealth {
            failure_threshold: 1,
            backoff: std::time::Duration::from_millis(30),
            max_backoff: std::time::Duration::from_millis(30),
        };
        bs[42].connect_failed(&policy);
        for _ in 0..100 {
            let b = sel.pick(&[]).unwrap();
            assert!(!Arc::ptr_eq(&b, &bs[42]), "backend 42 is down");
            assert_eq!(b.active(), 1);
        }
        // Once its back-off is over, it is the least loaded again.
        std::thread::sleep(std::time::Duration::from_millis(40));
        assert_eq!(index_of(&bs, &sel.pick(&[]).unwrap()), 42);
    }

    /// Random opens and closes over mixed weights: every pick has the least load per weight among the
    /// backends it may take (none down, none tried).
    #[test]
    fn least_connections_tree_always_picks_a_least_loaded_usable_backend() {
        let rng = AtomicRng::new(77);
        let weights: Vec<u32> = (0..300).map(|i| [1, 2, 3, 5][i % 4]).collect();
        let bs = backends(&weights);
        let sel = least_connections(&bs);
        let policy = crate::config::PassiveHealth::default();
        for i in [3, 150, 151] {
            for _ in 0..policy.failure_threshold {
                bs[i].connect_failed(&policy);
            }
        }
        bs[77].set_enabled(false);
        let mut held: Vec<ActiveGuard> = Vec::new();
        for step in 0..5000 {
            if !held.is_empty() && rng.below(10) < 4 {
                held.swap_remove(rng.below(held.len()));
                continue;
            }
            let tried: Vec<_> = (0..rng.below(3))
                .map(|_| bs[rng.below(300)].clone())
                .collect();
            let b = sel.pick(&tried).unwrap();
            let ok = |c: &Arc<Backend>| usable(c, &tried);
            assert!(ok(&b), "step {step}: picked an unusable backend");
            let best = bs.iter().filter(|c| ok(c)).all(|c| no_more_loaded(&b, c));
            assert!(
                best,
                "step {step}: {} is not a least loaded backend",
                b.name()
            );
            held.push(ActiveGuard::new(b));
        }
        // From idle, picks alone: the loads per weight end up within one of each other.
        held.clear();
        for _ in 0..2000 {
            held.push(ActiveGuard::new(sel.pick(&[]).unwrap()));
        }
        let per_weight: Vec<f64> = bs
            .iter()
            .filter(|b| b.is_available())
            .map(|b| b.active() as f64 / f64::from(b.weight()))
            .collect();
        let (lo, hi) = per_weight
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        assert!(hi - lo <= 1.0, "loads per weight spread from {lo} to {hi}");
    }

    /// Short connections one after the other (picked, opened, closed) over equal backends: they take turns.
    #[test]
    fn least_connections_tree_spreads_ties() {
        let bs = backends(&[1; 100]);
        let sel = least_connections(&bs);
        let short = |n: usize| -> Vec<usize> {
            (0..n)
                .map(|_| {
                    let b = sel.pick(&[]).unwrap();
                    drop(ActiveGuard::new(b.clone()));
                    index_of(&bs, &b)
                })
                .collect()
        };
        let mut counts = [0usize; 100];
        short(1000).into_iter().for_each(|i| counts[i] += 1);
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(
            *lo >= 8 && *hi <= 12,
            "1000 short connections over 100 idle backends: from {lo} to {hi} each"
        );

        // Two idle among busy ones alternate, whether under one root child or two.
        for pair in [(31, 64), (31, 33)] {
            let _busy: Vec<_> = (0..100)
                .filter(|&i| i != pair.0 && i != pair.1)
                .map(|i| ActiveGuard::new(bs[i].clone()))
                .collect();
            let picks = short(10);
            assert!(
                picks.iter().all(|&i| i == pair.0 || i == pair.1),
                "{pair:?}: {picks:?}"
            );
            assert!(
                picks.windows(2).all(|w| w[0] != w[1]),
                "{pair:?}: {picks:?} must alternate"
            );
        }
    }

    #[test]
    fn least_connections_tree_takes_re_enabled_backends_back() {
        let bs = backends(&[1; 50]);
        let sel = least_connections(&bs);
        let _busy: Vec<_> = (1..50).map(|i| ActiveGuard::new(bs[i].clone())).collect();
        bs[0].set_enabled(false);
        assert_ne!(index_of(&bs, &sel.pick(&[]).unwrap()), 0);
        bs[0].set_enabled(true);
        sel.table().availability_changed();
        assert_eq!(index_of(&bs, &sel.pick(&[]).unwrap()), 0);
        // Everything tried or down: nothing, as with the scan.
        assert!(sel.pick(&bs).is_none());
    }

    #[test]
    fn a_second_table_over_linked_backends_scans_and_stays_right() {
        let bs = backends(&[1; 20]);
        let first = least_connections(&bs);
        let second = Selector::new(Table::new(bs.clone()), Strategy::LeastConnections, 5);
        assert!(second.table().tree.is_none(), "backends have one link each");
        let _busy: Vec<_> = (0..20)
            .filter(|&i| i != 9)
            .map(|i| ActiveGuard::new(bs[i].clone()))
            .collect();
        assert_eq!(index_of(&bs, &first.pick(&[]).unwrap()), 9);
        assert_eq!(index_of(&bs, &second.pick(&[]).unwrap()), 9);
    }

    #[test]
    fn rng_below_stays_in_range() {
        let rng = AtomicRng::new(9);
        for n in [1, 2, 3, 7, 1000] {
            assert!((0..10_000).all(|_| rng.below(n) < n));
        }
    }
}
