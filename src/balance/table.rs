//! The strategy table: an immutable snapshot of the backends in rotation, and the picks made from it.
//!
//! Each table carries a *schedule*: a smooth weighted sequence of backend indices in which backend `i`
//! appears `weight[i]` times, spread out rather than bunched (see [`schedule`](super::schedule)). With it:
//!
//! * round robin is one `fetch_add` on the table's cursor and an index into the schedule: O(1), weighted
//!   and smooth. A rebuilt table takes the cursor over where the old one stood (after the backend picked
//!   last), so a change elsewhere in the table does not send the rotation back to its start;
//! * random is one draw from a lock-free seedable generator and an index into the schedule: O(1), weighted;
//! * power of two choices is two such slots (from one draw) and a comparison of `active / weight`: O(1);
//! * least connections finds the least `active / weight`. From 16 backends on it reads the root of the
//!   table's min-tree of loads (`load_tree`): O(1) per pick, O(log n) per guard, equal backends taking turns
//!   as connections come and go. Below that it scans, O(n), ties going to the backend picked longest ago.
//!
//! The table sees a backend only through [`Candidate`]: its live count, its effective weight and whether it
//! may be picked now. A backend that is down, out of rotation, or already tried by this connection is
//! skipped by drawing again, so every strategy finds an available backend if there is one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::load_tree::{Excluded, LoadSlot, LoadTree};
use super::rng::AtomicRng;
use super::schedule::smooth_schedule;
use super::Strategy;

/// What a strategy reads of a backend. Implemented by the backend's live state; every method is a load.
pub(crate) trait Candidate {
    /// Connections open, or being opened, now.
    fn active(&self) -> usize;
    /// The effective weight (1..=256): the configured one, or less while it ramps up.
    fn weight(&self) -> u32;
    /// True while it may be given a new connection.
    fn is_available(&self) -> bool;
    /// When an unavailable backend may be available again (`clock::now_ms` time), `u64::MAX` for never
    /// without an operator.
    fn available_again_at(&self) -> u64;
    /// The sequence number of its last least-connections pick by a scan (ties go to the oldest).
    fn last_pick(&self) -> &AtomicU64;
    /// Its link to the least-connections tree of the table in force.
    fn load_slot(&self) -> &LoadSlot;
    /// How much of its share it may take now, in [`FULL_ADMISSION`] units: all of it, or a growing part
    /// while it ramps up (slow start). A pick that lands on it keeps it with this probability, so the ramp
    /// works alike for every strategy, even on an idle backend that least connections would otherwise
    /// send everything to.
    fn admission(&self) -> u32;
    /// True for a backup: used only while no primary may be picked.
    fn is_backup(&self) -> bool;
}

/// An admission of `1 << 16`: the whole share.
pub(crate) const FULL_ADMISSION: u32 = 1 << 16;

/// State the picks share across every table of one service: the generator of the random strategies, and
/// the sequence of least-connections picks.
#[derive(Debug)]
pub(crate) struct Picks {
    rng: AtomicRng,
    seq: AtomicU64,
}

impl Picks {
    pub(crate) fn new(seed: u64) -> Self {
        Picks {
            rng: AtomicRng::new(seed),
            seq: AtomicU64::new(0),
        }
    }
}

/// An immutable snapshot of a service's backends: the primaries, and the backups used only while no
/// primary may be picked.
#[derive(Debug)]
pub(crate) struct Table<B> {
    primary: Pool<B>,
    backup: Pool<B>,
}

/// One set of backends with its smooth schedule, cursor and least-connections tree.
#[derive(Debug)]
struct Pool<B> {
    strategy: Strategy,
    entries: Box<[Arc<B>]>,
    schedule: Box<[u32]>,
    /// The least-connections min-tree, for a least-connections table of [`TREE_MIN_BACKENDS`] or more.
    tree: Option<Arc<LoadTree>>,
    /// Round robin's position in the schedule.
    cursor: AtomicUsize,
}

/// From this many backends on, least connections uses a min-tree instead of scanning. Measured per
/// connection (pick, plus the guard's upkeep of the tree) when the tree leaf was the counter: at 16
/// backends the two cost about the same (41 ns scanning, 30 + 13 ns with the tree), at 32 the scan costs
/// 79 ns and the tree still 44. Since guards reach the tree through the backend's `ArcSwapOption` link
/// (one load when the count goes up, one when it goes down), the upkeep costs about 45 ns instead of 13
/// (`bookkeeping_lc` less `bookkeeping_rr`): at 15 backends the scan and its guard cost 52 + 36 ns, at
/// 16 the tree and its guard 37 + 80, at 32 the tree 50 + 75, so the tree only pays off beyond about 32
/// backends now. The threshold is kept, since it also decides how ties are shared out.
const TREE_MIN_BACKENDS: usize = 16;

/// Tries at the tree per pick before scanning: each one that lands on an unavailable backend marks it down
/// in the tree, and each that lands on a stale leaf rewrites it, so the next one goes elsewhere.
const TREE_WALKS: usize = 4;

/// Random draws tried before falling back to a walk along the schedule.
const RANDOM_REDRAWS: usize = 8;

impl<B: Candidate> Table<B> {
    /// Builds the snapshot of `entries` (in this order) for `strategy`, weighted by their effective
    /// weights, the backups apart. With `previous`, the table it replaces: round robin goes on from where
    /// that one stood. A least-connections table points every entry's [`LoadSlot`] at its own tree (or
    /// at none).
    pub(crate) fn new(
        strategy: Strategy,
        entries: Vec<Arc<B>>,
        previous: Option<&Table<B>>,
    ) -> Self {
        let (backup, primary): (Vec<_>, Vec<_>) = entries.into_iter().partition(|b| b.is_backup());
        Table {
            primary: Pool::new(strategy, primary, previous.map(|p| &p.primary)),
            backup: Pool::new(strategy, backup, previous.map(|p| &p.backup)),
        }
    }

    /// The backends, primaries first, in rotation order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Arc<B>> {
        self.primary
            .entries
            .iter()
            .chain(self.backup.entries.iter())
    }

    /// To be called after a backend came back into rotation without a rebuild: the trees look again at
    /// the backends they hold as down.
    pub(crate) fn availability_changed(&self) {
        self.primary.availability_changed();
        self.backup.availability_changed();
    }

    /// Picks a backend that is available and not in `tried`: a primary, or a backup when no primary may
    /// be picked; `None` when there is none.
    #[inline]
    pub(crate) fn pick(&self, picks: &Picks, tried: &[Arc<B>]) -> Option<&Arc<B>> {
        match self.primary.pick(picks, tried) {
            Some(b) => Some(b),
            None if self.backup.entries.is_empty() => None,
            None => self.backup.pick(picks, tried),
        }
    }

    #[cfg(test)]
    pub(crate) fn has_tree(&self) -> bool {
        self.primary.tree.is_some()
    }
}

impl<B: Candidate> Pool<B> {
    fn new(strategy: Strategy, entries: Vec<Arc<B>>, previous: Option<&Pool<B>>) -> Self {
        let weights: Vec<u32> = entries.iter().map(|b| b.weight().max(1)).collect();
        let schedule = smooth_schedule(&weights).into_boxed_slice();
        let tree = match strategy {
            Strategy::LeastConnections if entries.len() >= TREE_MIN_BACKENDS => {
                LoadTree::attach(&entries)
            }
            _ => None,
        };
        if tree.is_none() {
            for b in &entries {
                b.load_slot().set(None);
            }
        }
        let cursor = previous.map_or(0, |p| p.cursor_for(&entries, &schedule));
        Pool {
            strategy,
            entries: entries.into_boxed_slice(),
            schedule,
            tree,
            cursor: AtomicUsize::new(cursor),
        }
    }

    fn availability_changed(&self) {
        if let Some(tree) = &self.tree {
            tree.recheck();
        }
    }

    /// Where round robin goes on in a new table (`entries`, `schedule`) after this one: just after the
    /// backend this table handed out last, at about the same point of its cycle.
    fn cursor_for(&self, entries: &[Arc<B>], schedule: &[u32]) -> usize {
        let (old, new) = (self.schedule.len(), schedule.len());
        let cursor = self.cursor.load(Relaxed);
        if old == 0 || new == 0 || cursor == 0 {
            return 0;
        }
        let last = &self.entries[self.schedule[(cursor - 1) % old] as usize];
        let at = ((cursor % old) as u64 * new as u64 / old as u64) as usize;
        let Some(index) = entries.iter().position(|e| Arc::ptr_eq(e, last)) else {
            return at;
        };
        (1..=new)
            .map(|back| (at + new - back) % new)
            .find(|&slot| schedule[slot] as usize == index)
            .map_or(at, |slot| slot + 1)
    }

    #[inline]
    fn pick(&self, picks: &Picks, tried: &[Arc<B>]) -> Option<&Arc<B>> {
        let backends = &self.entries;
        let schedule = &self.schedule;
        match backends.len() {
            0 => return None,
            1 => {
                let b = &backends[0];
                return usable(b, tried).then_some(b);
            }
            _ => {}
        }
        let ok = |b: &Arc<B>| usable(b, tried);
        match self.strategy {
            // A slot whose backend is unusable is skipped by drawing again, not by walking on to the
            // neighbour: walking would hand every turn of a down backend to the one after it.
            Strategy::RoundRobin => {
                let draw = || self.cursor.fetch_add(1, Relaxed);
                redraw(backends, schedule, schedule.len(), draw, ok)
            }
            Strategy::Random => {
                let draw = || picks.rng.below(schedule.len());
                redraw(backends, schedule, RANDOM_REDRAWS, draw, ok)
            }
            Strategy::PowerOfTwoChoices => pick_p2c(backends, schedule, &picks.rng, ok),
            Strategy::LeastConnections => {
                let from_tree = self
                    .tree
                    .as_ref()
                    .and_then(|tree| least_loaded_in_tree(tree, backends, tried, &picks.rng));
                from_tree.or_else(|| {
                    let seq = picks.seq.fetch_add(1, Relaxed) + 1;
                    let best = least_loaded(backends, |b| ok(b) && admitted(&**b, &picks.rng));
                    if let Some(b) = best {
                        b.last_pick().store(seq, Relaxed);
                    }
                    best
                })
            }
        }
    }
}

fn pick_p2c<'t, B: Candidate>(
    backends: &'t [Arc<B>],
    schedule: &[u32],
    rng: &AtomicRng,
    ok: impl Fn(&Arc<B>) -> bool,
) -> Option<&'t Arc<B>> {
    let n = schedule.len();
    // Each draw from the shared generator gives two slots, one per 32-bit half: one draw per pick
    // unless the second slot holds the same backend as the first.
    let mut bits = 0u64;
    let mut halves = 0;
    let mut slot = || {
        if n > u32::MAX as usize {
            return rng.below(n);
        }
        if halves == 0 {
            bits = rng.next_u64();
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
        (true, true) => Some(if less_loaded(&**bb, &**ba) { bb } else { ba }),
        (true, false) => Some(ba),
        (false, true) => Some(bb),
        (false, false) => {
            let draw = || rng.below(n);
            redraw(backends, schedule, RANDOM_REDRAWS, draw, ok)
        }
    }
}

/// Available, and not tried by this connection.
#[inline]
fn usable<B: Candidate>(b: &Arc<B>, tried: &[Arc<B>]) -> bool {
    b.is_available() && !tried.iter().any(|t| Arc::ptr_eq(t, b))
}

/// Keeps a pick of `b` with probability `b.admission()` (always, when it is not ramping up). Least
/// connections needs it on top of the effective weight: an idle backend has the least load whatever its
/// weight, and would take every connection while it ramps up. The schedule-based strategies get the
/// ramp from the weights in the schedule alone.
#[inline]
fn admitted<B: Candidate>(b: &B, rng: &AtomicRng) -> bool {
    let admission = b.admission();
    admission >= FULL_ADMISSION || ((rng.next_u64() >> 48) as u32) < admission
}

/// Draws slots with `draw` until one holds a usable backend (at most `tries` draws), then walks on from the
/// last draw so that a usable backend is found whenever there is one.
#[inline]
fn redraw<'t, B>(
    backends: &'t [Arc<B>],
    schedule: &[u32],
    tries: usize,
    mut draw: impl FnMut() -> usize,
    ok: impl Fn(&Arc<B>) -> bool,
) -> Option<&'t Arc<B>> {
    let n = schedule.len();
    let mut slot = 0;
    for _ in 0..tries.max(1) {
        slot = draw() % n;
        let b = &backends[schedule[slot] as usize];
        if ok(b) {
            return Some(b);
        }
    }
    // The first usable backend along the schedule from the last draw (wrapping).
    (0..n)
        .map(|k| &backends[schedule[(slot + k) % n] as usize])
        .find(|b| ok(b))
}

/// True when `a` carries less load per unit of weight than `b`: `a.active / a.weight < b.active / b.weight`.
#[inline]
fn less_loaded<B: Candidate>(a: &B, b: &B) -> bool {
    (a.active() as u64) * u64::from(b.weight()) < (b.active() as u64) * u64::from(a.weight())
}

/// The usable backend with the least load per unit of weight; among equals, the one picked longest ago, so
/// that ties are shared out in turn.
fn least_loaded<B: Candidate>(
    backends: &[Arc<B>],
    ok: impl Fn(&Arc<B>) -> bool,
) -> Option<&Arc<B>> {
    let mut best: Option<&Arc<B>> = None;
    for b in backends.iter().filter(|b| ok(b)) {
        let better = match best {
            None => true,
            Some(cur) => {
                less_loaded(&**b, &**cur)
                    || (!less_loaded(&**cur, &**b)
                        && b.last_pick().load(Relaxed) < cur.last_pick().load(Relaxed))
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
/// who is available), when a few picks in a row landed on backends that turned out to be unavailable or
/// on stale leaves, or when too many were tried.
#[inline]
fn least_loaded_in_tree<'t, B: Candidate>(
    tree: &Arc<LoadTree>,
    backends: &'t [Arc<B>],
    tried: &[Arc<B>],
    rng: &AtomicRng,
) -> Option<&'t Arc<B>> {
    let count = tree_picks();
    tree.maintain(count, backends);
    let mut excluded = Excluded::default();
    for t in tried {
        if let Some(leaf) = t.load_slot().leaf_in(tree) {
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
        let i = tree.backend_of(leaf);
        let b = backends.get(i)?;
        if !b.is_available() {
            tree.mark_down(leaf, b.available_again_at());
            continue;
        }
        // The leaf may hold a count written out of order by racing guards: check it against the live one.
        if tree.sync_leaf_at(leaf, i, b.active()) {
            continue;
        }
        // A backend ramping up that its ramp does not admit this time is walked around.
        if !admitted(&**b, rng) {
            if !excluded.push(leaf) {
                return None;
            }
            continue;
        }
        // Tried backends were walked around; one that was not in the tree is left to the scan.
        return (!tried.iter().any(|t| Arc::ptr_eq(t, b))).then_some(b);
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
    use crate::balance::testing::{backends as weighted, Held, TestBackend};

    /// A table and the pick state beside it, as a service holds them.
    struct Sel {
        table: Table<TestBackend>,
        picks: Picks,
    }

    impl Sel {
        fn new(strategy: Strategy, bs: &[Arc<TestBackend>], seed: u64) -> Self {
            Sel {
                table: Table::new(strategy, bs.to_vec(), None),
                picks: Picks::new(seed),
            }
        }
        fn pick(&self, tried: &[Arc<TestBackend>]) -> Option<Arc<TestBackend>> {
            self.table.pick(&self.picks, tried).cloned()
        }
    }

    fn backends(weights: &[u32]) -> Vec<Arc<TestBackend>> {
        weighted(weights.iter().copied())
    }

    /// Four backends of weight 1; backend 1 is down.
    fn four_with_backend_1_down() -> Vec<Arc<TestBackend>> {
        let bs = backends(&[1, 1, 1, 1]);
        bs[1].down_for_ms(60_000);
        bs
    }

    fn index_of(bs: &[Arc<TestBackend>], b: &Arc<TestBackend>) -> usize {
        bs.iter().position(|x| Arc::ptr_eq(x, b)).unwrap()
    }

    #[test]
    fn round_robin_weighted_counts() {
        let bs = backends(&[1, 2, 3]);
        let sel = Sel::new(Strategy::RoundRobin, &bs, 1);
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
            let sel = Sel::new(strategy, &bs, 7);
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
            let sel = Sel::new(strategy, &bs, 11);
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
        let sel = Sel::new(Strategy::LeastConnections, &bs, 1);
        let _g: Vec<_> = [0, 0, 1, 2, 2]
            .iter()
            .map(|&i| Held::new(bs[i].clone()))
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
        let sel = Sel::new(Strategy::PowerOfTwoChoices, &bs, 3);
        let _g = Held::new(bs[0].clone());
        for _ in 0..100 {
            assert_eq!(index_of(&bs, &sel.pick(&[]).unwrap()), 1);
        }
    }

    #[test]
    fn random_is_seeded_and_weighted() {
        let bs = backends(&[1, 3]);
        let run = |seed| {
            let sel = Sel::new(Strategy::Random, &bs, seed);
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
    fn no_more_loaded(a: &TestBackend, b: &TestBackend) -> bool {
        !less_loaded(b, a)
    }

    fn least_connections(bs: &[Arc<TestBackend>]) -> Sel {
        let sel = Sel::new(Strategy::LeastConnections, bs, 5);
        assert!(
            sel.table.has_tree(),
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
            .map(|i| Held::new(bs[i].clone()))
            .collect();
        let mut first_two: Vec<usize> = (0..2)
            .map(|_| {
                let b = sel.pick(&[]).unwrap();
                held.push(Held::new(b.clone()));
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
        held.retain(|g| !Arc::ptr_eq(&g.0, &bs[42]));
        bs[42].down_for_ms(30);
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
        for i in [3, 150, 151] {
            bs[i].down_for_ms(60_000);
        }
        bs[77].set_out(true);
        let mut held: Vec<Held> = Vec::new();
        for step in 0..5000 {
            if !held.is_empty() && rng.below(10) < 4 {
                held.swap_remove(rng.below(held.len()));
                continue;
            }
            let tried: Vec<_> = (0..rng.below(3))
                .map(|_| bs[rng.below(300)].clone())
                .collect();
            let b = sel.pick(&tried).unwrap();
            let ok =
                |c: &Arc<TestBackend>| c.is_available() && !tried.iter().any(|t| Arc::ptr_eq(t, c));
            assert!(ok(&b), "step {step}: picked an unusable backend");
            let best = bs.iter().filter(|c| ok(c)).all(|c| no_more_loaded(&b, c));
            assert!(
                best,
                "step {step}: {} is not a least loaded backend",
                index_of(&bs, &b)
            );
            held.push(Held::new(b));
        }
        // From idle, picks alone: the loads per weight end up within one of each other.
        held.clear();
        for _ in 0..2000 {
            held.push(Held::new(sel.pick(&[]).unwrap()));
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
                    drop(Held::new(b.clone()));
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
                .map(|i| Held::new(bs[i].clone()))
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
        let _busy: Vec<_> = (1..50).map(|i| Held::new(bs[i].clone())).collect();
        bs[0].set_out(true);
        assert_ne!(index_of(&bs, &sel.pick(&[]).unwrap()), 0);
        bs[0].set_out(false);
        sel.table.availability_changed();
        assert_eq!(index_of(&bs, &sel.pick(&[]).unwrap()), 0);
        // Everything tried or down: nothing, as with the scan.
        assert!(sel.pick(&bs).is_none());
    }

    /// Round robin over a rebuilt table goes on after the backend picked last, whatever else changed.
    #[test]
    fn round_robin_keeps_its_position_through_a_rebuild() {
        let bs = backends(&[1, 1, 1]);
        let sel = Sel::new(Strategy::RoundRobin, &bs, 1);
        let first: Vec<usize> = (0..2)
            .map(|_| index_of(&bs, &sel.pick(&[]).unwrap()))
            .collect();
        assert_eq!(first, [0, 1]);
        // A fourth backend joins: the rotation goes on with the third, not back to the first.
        let mut more = bs.clone();
        more.extend(backends(&[1]));
        let table = Table::new(Strategy::RoundRobin, more.clone(), Some(&sel.table));
        let next: Vec<usize> = (0..4)
            .map(|_| index_of(&more, table.pick(&sel.picks, &[]).unwrap()))
            .collect();
        assert_eq!(next, [2, 3, 0, 1]);
    }

    /// A least-connections table rebuilt while connections are held starts from their live counts, and
    /// guards taken on the old table give their counts back to the new one's tree.
    #[test]
    fn a_rebuilt_least_connections_table_keeps_every_count() {
        let bs = backends(&[1; 20]);
        let first = least_connections(&bs);
        let busy: Vec<_> = (0..20)
            .filter(|&i| i != 9)
            .map(|i| Held::new(bs[i].clone()))
            .collect();
        assert_eq!(index_of(&bs, &first.pick(&[]).unwrap()), 9);
        let second = Sel {
            table: Table::new(Strategy::LeastConnections, bs.clone(), Some(&first.table)),
            picks: Picks::new(5),
        };
        assert!(second.table.has_tree());
        assert_eq!(index_of(&bs, &second.pick(&[]).unwrap()), 9);
        // Backend 3's connection, taken before the rebuild, ends: the new table sees it idle.
        let _nine = Held::new(bs[9].clone());
        drop(busy);
        let _all_but_3: Vec<_> = (0..20)
            .filter(|&i| i != 3)
            .map(|i| Held::new(bs[i].clone()))
            .collect();
        assert_eq!(index_of(&bs, &second.pick(&[]).unwrap()), 3);
    }

    /// Backups take picks only while no primary may be picked, with every strategy.
    #[test]
    fn backups_only_while_no_primary_is_available() {
        for strategy in Strategy::ALL {
            let mut bs = backends(&[1, 1]);
            let backup = crate::balance::testing::backup(1);
            bs.push(backup.clone());
            let sel = Sel::new(strategy, &bs, 3);
            for _ in 0..50 {
                assert!(!Arc::ptr_eq(&sel.pick(&[]).unwrap(), &backup), "{strategy}");
            }
            bs[0].down_for_ms(60_000);
            assert!(Arc::ptr_eq(&sel.pick(&[]).unwrap(), &bs[1]), "{strategy}");
            // The last primary tried by this connection: the backup.
            assert!(
                Arc::ptr_eq(&sel.pick(&[bs[1].clone()]).unwrap(), &backup),
                "{strategy}"
            );
            bs[1].set_out(true);
            assert!(Arc::ptr_eq(&sel.pick(&[]).unwrap(), &backup), "{strategy}");
            backup.set_out(true);
            assert!(sel.pick(&[]).is_none(), "{strategy}");
        }
    }

    /// A backend admitted a tenth of the time takes about a tenth of its share, with every strategy,
    /// least connections on an idle backend included.
    #[test]
    fn a_ramping_backend_takes_its_admitted_part_of_its_share() {
        for strategy in Strategy::ALL {
            // Weights in sixteenths, as the backends' effective weights are.
            let bs = backends(&[16; 20]);
            bs[7].set_admission(FULL_ADMISSION / 10);
            let sel = Sel::new(strategy, &bs, 17);
            let mut held = Vec::new();
            let mut seven = 0;
            for _ in 0..20_000 {
                let b = sel.pick(&[]).unwrap();
                seven += usize::from(Arc::ptr_eq(&b, &bs[7]));
                // Least connections: hold a while, so that loads stay level and the ramp decides.
                held.push(Held::new(b));
                if held.len() > 100 {
                    held.remove(0);
                }
            }
            // The fair share is 1,000 of 20,000; a tenth of it is 100.
            assert!(
                (40..=250).contains(&seven),
                "{strategy}: {seven} picks of the ramping backend"
            );
        }
    }
}
