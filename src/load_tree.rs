//! A min-tree over the backends' loads: least connections in O(log n) for large tables.
//!
//! The tree is 8-ary and stored level by level in cache lines of eight `AtomicU64` keys, so a node's
//! children are one line: a walk from the root to a leaf reads one line per level (five at 10,000
//! backends), and an update reads one line per level on the way up.
//!
//! * A leaf's key is its backend's load per unit of weight: `active × scale`, with `scale = M / weight` for
//!   an `M` that every weight in the table divides (when that `M` is small enough; otherwise `scale` is
//!   rounded and exact ties between different weights may be missed). The leaf is itself the counter: the
//!   [`ActiveGuard`](crate::backend::ActiveGuard) adds `scale` when it is made and takes it off when dropped,
//!   so the leaf never loses a count.
//! * An internal node holds the least key among its children. After a leaf changes, the path to the root
//!   is recomputed line by line, stopping as soon as a node already holds the right value.
//! * Padding leaves past the last backend hold [`VACANT`], which no backend reaches.
//! * A backend found unavailable when a walk lands on it gets the `DOWN` bit in its key, which sorts it
//!   after every available backend. The bit is cleared by [`LoadTree::maintain`] once the backend's
//!   back-off has run out or the operator re-enabled it.
//!
//! The tree is as deep as it needs to be for eight children per node, and the root has only as many
//! children as it needs, so at least half of the leaves hold a backend (at 10,000 backends: 12,288 leaves,
//! 1,756 lines, 110 KiB). Backend `i` sits under root child `i mod k` (for `k` root children), at the
//! bit-reversed position of `i / k` within it, so that every subtree at every level holds an even share
//! of the backends; ties are then spread over the whole table (see [`LoadTree::walk`]).
//!
//! # Approximation
//!
//! Nodes are updated with plain loads and stores, not compare-and-swap. Two updates racing through the same
//! node can leave it holding a value that no longer matches its children, until the next update through
//! that node. A walk that finds such a node on its path corrects it; besides, one pick in eight recomputes
//! one internal node, sweeping the tree bottom-up, so that a stale node is corrected within one sweep even
//! if its subtree sees no traffic (eight picks per internal node, and there are fewer than 1.2 n internal
//! nodes: about 37,000 picks at 10,000 backends). Meanwhile a pick may land on a backend that is not the
//! least loaded; it never lands on one that is unavailable or excluded, since the caller checks the
//! backend it is given.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;

use crate::backend::{now_ms, Backend};

/// Children per node: eight keys fill one 64-byte cache line.
const FANOUT: usize = 8;
const FANOUT_BITS: u32 = 3;
/// Leaf positions are bit-reversed backend indices in a `u32`: at most ten levels (2^30 leaves).
const MAX_DEPTH: u32 = 10;
/// The key of a padding leaf (and of an excluded one, inside a walk). No backend's key reaches it.
pub(crate) const VACANT: u64 = u64::MAX;
/// Set in the key of a backend known to be unavailable, on top of its load.
const DOWN: u64 = 1 << 62;
/// Picks per node recomputed by the sweep.
const SWEEP_EVERY: u64 = 8;
/// The largest `M` in `scale = M / weight`; beyond it the scales are rounded.
const MAX_SCALE_BASE: u64 = 1 << 24;

/// One node's children.
#[repr(align(64))]
struct Line([AtomicU64; FANOUT]);

impl Line {
    #[inline]
    fn keys(&self) -> [u64; FANOUT] {
        std::array::from_fn(|s| self.0[s].load(Relaxed))
    }
}

/// For each 8-bit mask of equal children and each value `r` of the three tie bits: the child taken, the
/// `⌊r × c / 8⌋`-th of the `c` equal ones.
static CHOICE: [[u8; FANOUT]; 256] = {
    let mut t = [[0u8; FANOUT]; 256];
    let mut m = 1;
    while m < 256 {
        let mut nth = [0u8; FANOUT];
        let (mut c, mut s) = (0, 0);
        while s < FANOUT {
            if m & (1 << s) != 0 {
                nth[c] = s as u8;
                c += 1;
            }
            s += 1;
        }
        let mut r = 0;
        while r < FANOUT {
            t[m][r] = nth[r * c / FANOUT];
            r += 1;
        }
        m += 1;
    }
    t
};

/// For each 8-bit mask of equal children: the tie bits a choice among them uses up, `⌈log2 c⌉`.
static TIE_BITS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut m = 1;
    while m < 256 {
        let c = (m as u32).count_ones();
        t[m] = (u32::BITS - (c - 1).leading_zeros()) as u8;
        m += 1;
    }
    t
};

/// The least key of a line (pairwise, for a short dependency chain).
#[inline]
fn least(k: &[u64; FANOUT]) -> u64 {
    let (a, b) = (k[0].min(k[1]), k[2].min(k[3]));
    let (c, d) = (k[4].min(k[5]), k[6].min(k[7]));
    a.min(b).min(c.min(d))
}

/// The min-tree of one table. See the module documentation.
pub(crate) struct LoadTree {
    /// Level `d` runs from line `starts[d]` to line `starts[d + 1]`: level 1, the root's children, is one
    /// line (only its first `roots` keys in use); below, each node of level `d - 1` has its children in
    /// line `starts[d] + its index`; level `depth` holds the leaves.
    lines: Box<[Line]>,
    starts: [usize; MAX_DEPTH as usize + 2],
    depth: u32,
    /// Children of the root in use.
    roots: usize,
    backends: usize,
    /// Leaves holding the `DOWN` bit.
    down: AtomicUsize,
    /// The earliest time (`now_ms`) at which a backend marked down may be available again.
    next_expiry: AtomicU64,
    /// Set when a backend may have been re-enabled: the next pick looks at every backend marked down.
    recheck: AtomicBool,
    /// Held by the pick that looks at the backends marked down, so that only one does.
    repairing: AtomicBool,
}

impl fmt::Debug for LoadTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadTree")
            .field("backends", &self.backends)
            .field("depth", &self.depth)
            .field("down", &self.down.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// A backend's place in a [`LoadTree`], kept in the backend so that its guard can reach the tree.
pub(crate) struct TreeLink {
    tree: Arc<LoadTree>,
    leaf: u32,
    scale: u64,
}

impl fmt::Debug for TreeLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TreeLink")
            .field("leaf", &self.leaf)
            .field("scale", &self.scale)
            .finish_non_exhaustive()
    }
}

impl TreeLink {
    /// One more connection on the backend.
    #[inline]
    pub(crate) fn acquire(&self) {
        self.tree.leaf_key(self.leaf).fetch_add(self.scale, Relaxed);
        self.tree.propagate(self.leaf);
    }

    /// One connection fewer; only after a matching [`TreeLink::acquire`].
    #[inline]
    pub(crate) fn release(&self) {
        self.tree.leaf_key(self.leaf).fetch_sub(self.scale, Relaxed);
        self.tree.propagate(self.leaf);
    }

    /// This backend's leaf, when it belongs to `tree`.
    #[inline]
    pub(crate) fn leaf_in(&self, tree: &Arc<LoadTree>) -> Option<u32> {
        Arc::ptr_eq(&self.tree, tree).then_some(self.leaf)
    }
}

/// Leaves to walk around: the leaves of the backends a connection already tried.
#[derive(Debug, Default)]
pub(crate) struct Excluded {
    leaves: [u32; Excluded::CAPACITY],
    len: usize,
}

impl Excluded {
    /// More tried backends than this and the caller scans instead.
    pub(crate) const CAPACITY: usize = 8;

    /// Adds a leaf; `false` when full.
    pub(crate) fn push(&mut self, leaf: u32) -> bool {
        if self.len == Self::CAPACITY {
            return false;
        }
        self.leaves[self.len] = leaf;
        self.len += 1;
        true
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when one of the leaves lies in `first..first + count`.
    #[inline]
    fn any_in(&self, first: u64, count: u64) -> bool {
        self.leaves[..self.len]
            .iter()
            .any(|&l| (first..first + count).contains(&u64::from(l)))
    }
}

impl LoadTree {
    /// Builds the tree for `backends` and links each backend to it. `None` when a backend already belongs
    /// to another tree (a backend has one link for its whole life) or the table is too large: the caller
    /// then scans.
    pub(crate) fn attach(backends: &[Arc<Backend>]) -> Option<Arc<LoadTree>> {
        let n = backends.len();
        if n < 2 || backends.iter().any(|b| b.load_link.get().is_some()) {
            return None;
        }
        let mut depth = 1;
        while (FANOUT as u64).pow(depth) < n as u64 {
            depth += 1;
            if depth > MAX_DEPTH {
                return None;
            }
        }
        let per_root = FANOUT.pow(depth - 1);
        let roots = n.div_ceil(per_root);
        let mut starts = [0; MAX_DEPTH as usize + 2];
        starts[2] = 1;
        for d in 2..=depth as usize {
            starts[d + 1] = starts[d] + roots * FANOUT.pow(d as u32 - 2);
        }
        let lines: Box<[Line]> = (0..starts[depth as usize + 1])
            .map(|_| Line(std::array::from_fn(|_| AtomicU64::new(VACANT))))
            .collect();
        let tree = Arc::new(LoadTree {
            lines,
            starts,
            depth,
            roots,
            backends: n,
            down: AtomicUsize::new(0),
            next_expiry: AtomicU64::new(u64::MAX),
            recheck: AtomicBool::new(false),
            repairing: AtomicBool::new(false),
        });
        // Every backend starts idle in the tree: guards made before the link existed never touch it.
        for i in 0..n {
            let leaf = tree.leaf_of(i);
            tree.leaf_key(leaf).store(0, Relaxed);
            tree.propagate(leaf);
        }
        let scales = scales(backends);
        for (i, (b, scale)) in backends.iter().zip(scales).enumerate() {
            let link = TreeLink {
                tree: tree.clone(),
                leaf: tree.leaf_of(i),
                scale,
            };
            if b.load_link.set(link).is_err() {
                return None; // linked elsewhere meanwhile
            }
        }
        Some(tree)
    }

    /// The key of node `j` of level `d`.
    #[inline]
    fn key(&self, d: u32, j: usize) -> &AtomicU64 {
        &self.lines[self.starts[d as usize] + j / FANOUT].0[j % FANOUT]
    }

    /// The children of node `j` of level `d - 1` (for `d = 1`, the root's children).
    #[inline]
    fn children(&self, d: u32, j: usize) -> &Line {
        &self.lines[self.starts[d as usize] + j]
    }

    #[inline]
    fn leaf_key(&self, leaf: u32) -> &AtomicU64 {
        self.key(self.depth, leaf as usize)
    }

    /// Leaf bits below the root's children.
    #[inline]
    fn sub_bits(&self) -> u32 {
        FANOUT_BITS * (self.depth - 1)
    }

    /// `x` bit-reversed over the leaf bits below the root's children.
    #[inline]
    fn reverse_sub(&self, x: usize) -> usize {
        let bits = self.sub_bits();
        if bits == 0 {
            0
        } else {
            ((x as u32).reverse_bits() >> (32 - bits)) as usize
        }
    }

    /// The leaf of backend `i`: under root child `i mod roots`, at `i / roots` bit-reversed.
    pub(crate) fn leaf_of(&self, i: usize) -> u32 {
        ((i % self.roots) << self.sub_bits() | self.reverse_sub(i / self.roots)) as u32
    }

    /// The backend at `leaf` (it may be past the last backend for a vacant leaf).
    #[inline]
    pub(crate) fn backend_of(&self, leaf: u32) -> usize {
        let leaf = leaf as usize;
        let bits = self.sub_bits();
        (leaf >> bits) + self.roots * self.reverse_sub(leaf & ((1 << bits) - 1))
    }

    /// Recomputes the ancestors of `leaf`, from the bottom, until one already holds the right key.
    #[inline]
    fn propagate(&self, leaf: u32) {
        let mut j = leaf as usize;
        for d in (2..=self.depth).rev() {
            let parent = j / FANOUT;
            let least = least(&self.children(d, parent).keys());
            let node = self.key(d - 1, parent);
            if node.load(Relaxed) == least {
                return;
            }
            node.store(least, Relaxed);
            j = parent;
        }
    }

    /// Walks from the root to the least key, going around the `excluded` leaves, and returns its leaf.
    /// `None` when every leaf left is vacant, excluded or marked down.
    ///
    /// Equal children are chosen between by the top bits of `ties`: among `c` of them, the top three bits
    /// `r` take the `⌊r × c / 8⌋`-th, and `⌈log2 c⌉` bits are used up (none when there is no choice). With
    /// `ties` = a bit-reversed pick counter (a van der Corput sequence), consecutive picks among equal
    /// backends go to different subtrees: two equal backends alternate exactly, more share the picks
    /// evenly when they are eight to a node or spread evenly across nodes, and roughly otherwise.
    #[inline]
    pub(crate) fn walk(&self, ties: u64, excluded: &Excluded) -> Option<u32> {
        if excluded.is_empty() {
            self.walk_by(ties, true, |d, j| self.children(d, j).keys())
        } else {
            self.walk_by(ties, false, |d, j| {
                std::array::from_fn(|s| self.key_excluding(d, j * FANOUT + s, excluded))
            })
        }
    }

    /// The walk, reading the children of node `j` of level `d - 1` with `keys_of`; with `repair`, a node on
    /// the way whose key differs from its children's least is put right.
    #[inline(always)]
    fn walk_by(
        &self,
        mut ties: u64,
        repair: bool,
        keys_of: impl Fn(u32, usize) -> [u64; FANOUT],
    ) -> Option<u32> {
        let mut j = 0usize; // the node whose children are looked at, in level d - 1
        let mut above = VACANT; // that node's key: the least of the line above
        for d in 1..self.depth + 1 {
            let keys = keys_of(d, j);
            let least = least(&keys);
            if least >= DOWN {
                return None;
            }
            if repair && d > 1 && least != above {
                self.key(d - 1, j).store(least, Relaxed);
            }
            let e = |s: usize| usize::from(keys[s] == least) << s;
            let equal = ((e(0) | e(1)) | (e(2) | e(3))) | ((e(4) | e(5)) | (e(6) | e(7)));
            let child = CHOICE[equal][(ties >> (64 - FANOUT_BITS)) as usize];
            ties <<= TIE_BITS[equal];
            j = j * FANOUT + usize::from(child);
            above = least;
        }
        Some(j as u32)
    }

    /// The least key under node `j` of level `d`, not counting the `excluded` leaves.
    fn key_excluding(&self, d: u32, j: usize, excluded: &Excluded) -> u64 {
        let span = 1u64 << (FANOUT_BITS * (self.depth - d));
        if !excluded.any_in(j as u64 * span, span) {
            self.key(d, j).load(Relaxed)
        } else if d == self.depth {
            VACANT
        } else {
            (0..FANOUT)
                .map(|s| self.key_excluding(d + 1, j * FANOUT + s, excluded))
                .fold(VACANT, u64::min)
        }
    }

    /// Marks the backend at `leaf` as unavailable until further notice (see [`LoadTree::maintain`]).
    pub(crate) fn mark_down(&self, leaf: u32, backend: &Backend) {
        if self.leaf_key(leaf).fetch_or(DOWN, SeqCst) & DOWN == 0 {
            self.down.fetch_add(1, SeqCst);
            self.propagate(leaf);
        }
        self.next_expiry
            .fetch_min(backend.available_again_at(), SeqCst);
    }

    /// Asks the next pick to look at every backend marked down (one was re-enabled, perhaps).
    pub(crate) fn recheck(&self) {
        self.recheck.store(true, SeqCst);
    }

    /// Upkeep done by each pick, given the pick's sequence number: one pick in eight recomputes one internal
    /// node (the sweep that bounds how long a stale node can last), and, when a backend marked down may be available
    /// again, looks at all of them.
    #[inline]
    pub(crate) fn maintain(&self, seq: u64, backends: &[Arc<Backend>]) {
        // The sweep, one pick in eight: the lines after the first (the root's children have no stored
        // parent), last first.
        let lines = self.lines.len();
        if lines > 1 && seq % SWEEP_EVERY == 0 {
            let line = lines - 1 - ((seq / SWEEP_EVERY) % (lines as u64 - 1)) as usize;
            let d = (2..=self.depth)
                .rev()
                .find(|&d| self.starts[d as usize] <= line)
                .unwrap_or(2);
            let least = least(&self.lines[line].keys());
            let node = self.key(d - 1, line - self.starts[d as usize]);
            if node.load(Relaxed) != least {
                node.store(least, Relaxed);
            }
        }
        if self.down.load(Relaxed) != 0 {
            let next = self.next_expiry.load(Relaxed);
            if self.recheck.load(Relaxed) || (next != u64::MAX && now_ms() >= next) {
                self.repair(backends);
            }
        }
    }

    /// Clears the `DOWN` bit of every backend that is available again; O(n), once per expiry.
    #[cold]
    fn repair(&self, backends: &[Arc<Backend>]) {
        if self.repairing.swap(true, SeqCst) {
            return; // another pick is on it
        }
        // Reset first, then look: a backend marked down meanwhile is either seen below or records its
        // expiry after the reset.
        self.recheck.store(false, SeqCst);
        self.next_expiry.store(u64::MAX, SeqCst);
        for (i, b) in backends.iter().enumerate() {
            let leaf = self.leaf_of(i);
            let key = self.leaf_key(leaf);
            if key.load(SeqCst) & DOWN == 0 {
                continue;
            }
            if b.is_available() {
                if key.fetch_and(!DOWN, SeqCst) & DOWN != 0 {
                    self.down.fetch_sub(1, SeqCst);
                    self.propagate(leaf);
                }
            } else {
                self.next_expiry.fetch_min(b.available_again_at(), SeqCst);
            }
        }
        self.repairing.store(false, SeqCst);
    }

    /// The least key of the whole tree, read from the root's children (for tests).
    #[cfg(test)]
    pub(crate) fn least_key(&self) -> u64 {
        least(&self.children(1, 0).keys())
    }

    /// The key of backend `i`'s leaf (for tests).
    #[cfg(test)]
    pub(crate) fn backend_key(&self, i: usize) -> u64 {
        self.leaf_key(self.leaf_of(i)).load(Relaxed)
    }
}

/// Per-backend scales: `M / weight` for the least `M` that all weights divide, when that `M` is at most
/// 2^24 (so equal loads per weight give equal keys); otherwise `2^24 / weight`, rounded.
fn scales(backends: &[Arc<Backend>]) -> Vec<u64> {
    let weights: Vec<u64> = backends
        .iter()
        .map(|b| u64::from(b.weight().max(1)))
        .collect();
    let lcm = weights.iter().try_fold(1u64, |m, &w| {
        let next = m / gcd(m, w) * w;
        (next <= MAX_SCALE_BASE).then_some(next)
    });
    match lcm {
        Some(m) => weights.iter().map(|&w| m / w).collect(),
        None => weights
            .iter()
            .map(|&w| ((MAX_SCALE_BASE + w / 2) / w).max(1))
            .collect(),
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ActiveGuard;
    use crate::strategy::AtomicRng;

    fn backends(weights: impl IntoIterator<Item = u32>) -> Vec<Arc<Backend>> {
        weights
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1 + (i % 60_000) as u16));
                Arc::new(Backend::new(&format!("t{i}"), addr, w))
            })
            .collect()
    }

    impl LoadTree {
        /// Every internal node holds the least key of its children.
        fn assert_consistent(&self) {
            for d in 2..=self.depth {
                for j in 0..self.starts[d as usize + 1] - self.starts[d as usize] {
                    let want = least(&self.children(d, j).keys());
                    let got = self.key(d - 1, j).load(Relaxed);
                    assert_eq!(got, want, "node {j} of level {} is stale", d - 1);
                }
            }
        }
    }

    #[test]
    fn leaves_are_a_permutation_of_the_backends() {
        let bs = backends(std::iter::repeat(1).take(100));
        let tree = LoadTree::attach(&bs).unwrap();
        assert_eq!(tree.depth, 3, "100 backends need three levels of eight");
        assert_eq!(tree.roots, 2, "two root children of 64 leaves each");
        assert_eq!(tree.lines.len(), 1 + 2 + 16);
        let mut seen = [false; 128];
        for i in 0..100 {
            let leaf = tree.leaf_of(i);
            assert_eq!(tree.backend_of(leaf), i);
            assert!(!std::mem::replace(&mut seen[leaf as usize], true));
        }
        // Each root child holds 50 backends, 6 or 7 under each of its eight children.
        for s in 0..16 {
            let under = (0..100)
                .filter(|&i| tree.leaf_of(i) as usize >> 3 == s)
                .count();
            assert!((6..=7).contains(&under), "subtree {s} holds {under}");
        }
        tree.assert_consistent();
        for n in [2, 8, 9, 513, 4096, 10_000] {
            let tree = LoadTree::attach(&backends(std::iter::repeat(1).take(n))).unwrap();
            let mut leaves: Vec<u32> = (0..n).map(|i| tree.leaf_of(i)).collect();
            assert!((0..n).all(|i| tree.backend_of(leaves[i]) == i), "n = {n}");
            leaves.sort_unstable();
            leaves.dedup();
            assert_eq!(leaves.len(), n, "n = {n}: one leaf each");
            let capacity = tree.roots << tree.sub_bits();
            assert!(
                leaves[n - 1] < capacity as u32 && 2 * n >= capacity,
                "n = {n}"
            );
            tree.assert_consistent();
        }
    }

    #[test]
    fn exact_scales_for_small_weight_sets_and_rounded_ones_otherwise() {
        assert_eq!(scales(&backends([1, 2, 3])), vec![6, 3, 2]);
        assert_eq!(scales(&backends([4, 4])), vec![1, 1]);
        // lcm(1..=256) is far beyond 2^24: rounded.
        let s = scales(&backends(1..=256));
        assert_eq!(s[0], 1 << 24);
        assert_eq!(s[255], (1 << 24) / 256);
        assert_eq!(s[2], ((1 << 24) + 1) / 3);
    }

    /// Random acquires and releases on one thread: after each, every node is consistent, the leaves hold
    /// `active × scale`, and the root's least key is the least over the backends.
    #[test]
    fn the_tree_minimum_follows_random_acquires_and_releases() {
        let rng = AtomicRng::new(2024);
        for n in [9, 70, 700] {
            let bs = backends((0..n).map(|i| 1 + (i % 4) as u32));
            let tree = LoadTree::attach(&bs).unwrap();
            let scale = scales(&bs);
            let mut held: Vec<ActiveGuard> = Vec::new();
            for step in 0..3000 {
                if held.is_empty() || rng.below(10) < 6 {
                    held.push(ActiveGuard::new(bs[rng.below(n)].clone()));
                } else {
                    held.swap_remove(rng.below(held.len()));
                }
                let want = (0..n)
                    .map(|i| bs[i].active() as u64 * scale[i])
                    .min()
                    .unwrap();
                assert_eq!(tree.least_key(), want, "n = {n}, step {step}");
                if step % 100 == 0 {
                    tree.assert_consistent();
                    for i in 0..n {
                        assert_eq!(tree.backend_key(i), bs[i].active() as u64 * scale[i]);
                    }
                }
            }
            drop(held);
            tree.assert_consistent();
            assert_eq!(tree.least_key(), 0, "n = {n}: all released");
            assert!((0..n).all(|i| tree.backend_key(i) == 0), "n = {n}");
        }
    }

    #[test]
    fn the_walk_goes_around_excluded_and_down_leaves() {
        let bs = backends(std::iter::repeat(1).take(40));
        let tree = LoadTree::attach(&bs).unwrap();
        let _load: Vec<_> = (0..40)
            .filter(|&i| i != 5 && i != 17 && i != 33)
            .map(|i| ActiveGuard::new(bs[i].clone()))
            .collect();
        let walk = |ties: u64, ex: &Excluded| tree.walk(ties, ex).map(|l| tree.backend_of(l));
        let none = Excluded::default();
        let mut idle: Vec<usize> = (0..64).map(|k| walk(k << 58, &none).unwrap()).collect();
        idle.sort_unstable();
        idle.dedup();
        assert_eq!(
            idle,
            vec![5, 17, 33],
            "ties among the idle backends reach all three"
        );

        let mut ex = Excluded::default();
        assert!(ex.push(tree.leaf_of(5)) && ex.push(tree.leaf_of(33)));
        assert!((0..64).all(|k| walk(k << 58, &ex) == Some(17)));

        tree.mark_down(tree.leaf_of(17), &bs[17]);
        assert!(
            (0..64).all(|k| walk(k << 58, &ex).is_some_and(|i| i != 5 && i != 17 && i != 33)),
            "the next least loaded, once the idle ones are excluded or down"
        );
        tree.assert_consistent();
    }
}
