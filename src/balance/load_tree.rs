//! A min-tree over the backends' loads: least connections without scanning large tables.
//!
//! The tree is 8-ary and stored level by level in cache lines of eight `AtomicU64` nodes, so that a node's
//! children are one line.
//!
//! * A node's value packs a key, the load per unit of weight, above the number of a leaf that has it
//!   (`key << LEAF_BITS | leaf`). A leaf's key is `active × scale`, with `scale = M / weight` for an `M`
//!   that every weight of the table divides (when that `M` is at most 2^16; otherwise `scale` is rounded
//!   and exact ties between different weights may be missed). The tree belongs to one table snapshot and
//!   holds no count of its own: the backend's live count is the truth, and a leaf is rewritten from it
//!   whenever a connection guard changes it (through the backend's [`LoadSlot`], which names the leaf in
//!   the current snapshot's tree). A snapshot rebuilt while connections run therefore starts from the
//!   live counts, and a guard taken on an old snapshot gives its count back to the same live state.
//! * An internal node holds a copy of one of its children with the least key, hence the least key of its
//!   subtree and a leaf that has it. After a leaf changes, its ancestors are recomputed bottom-up, stopping
//!   as soon as one is unchanged. A node keeps the child it holds as long as that child is still among the
//!   least; when it is not, or when the leaf it names has just taken a connection, the node moves on to the
//!   next least child after it, so that equal backends take turns as connections come and go.
//! * A pick therefore reads one line, the root's children, whatever the size of the table: O(1). It takes
//!   the least of them (spreading ties by a counter) and the leaf named in it, and checks that leaf's own
//!   value. Updates are O(log n): a guard on the leaf a pick just returned rewrites its whole path.
//! * A pick that must go around some leaves (backends this connection already tried) walks down from the
//!   root on the keys instead, in O(log n).
//! * Padding leaves past the last backend hold [`VACANT`], which no backend reaches.
//! * A backend found unavailable when a pick lands on it gets the `DOWN` bit in its key, which sorts it
//!   after every available backend. [`LoadTree::maintain`] clears the bit once the backend's back-off has
//!   run out or the operator put it back in rotation.
//!
//! The tree is as deep as it needs to be for eight children per node, and the root has only as many
//! children as it needs, so at least half of the leaves hold a backend (at 10,000 backends: 12,288 leaves,
//! 1,756 lines, 110 KiB). Backend `i` sits under root child `i mod k` (for `k` root children), at the
//! bit-reversed position of `i / k` within it, so that every subtree at every level holds an even share
//! of the backends.
//!
//! # Approximation
//!
//! Nodes are updated with plain loads and stores, not compare-and-swap, and two guards of one backend
//! racing can write its leaf in the wrong order (the older count last). So a node, or a leaf, can be stale
//! until the next update through it. A pick checks the leaf it lands on against the backend's live count
//! and, when the leaf claims less, rewrites it and picks again; a pick that finds the leaf more loaded than
//! its ancestors say recomputes that leaf's whole path and walks down instead. Besides, one pick in eight
//! rewrites one leaf from its live count and recomputes one internal node, sweeping the tree, so that any
//! stale value is corrected within one sweep even if its subtree sees no traffic (eight picks per leaf or
//! node: at 10,000 backends, 80,000 picks per thread for the leaves and 14,000 for the nodes).
//! Meanwhile a pick may land on a backend that is not the least loaded; it never lands on one that is
//! unavailable or excluded, since the caller checks the backend it is given.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::schedule::gcd;
use super::table::Candidate;
use crate::clock::now_ms;

/// Children per node: eight nodes fill one 64-byte cache line.
const FANOUT: usize = 8;
const FANOUT_BITS: u32 = 3;
/// At most seven levels (2^21 leaves), so that a leaf number fits in [`LEAF_BITS`].
const MAX_DEPTH: u32 = 7;
/// The low bits of a node's value: the leaf it names.
const LEAF_BITS: u32 = FANOUT_BITS * MAX_DEPTH;
const LEAF_MASK: u64 = (1 << LEAF_BITS) - 1;
/// The value of a padding leaf. Its key is above every backend's.
pub(crate) const VACANT: u64 = u64::MAX;
/// Set in the key of a backend known to be unavailable, on top of its load.
const DOWN: u64 = 1 << 63;
/// Keys from here on are down or vacant.
const DOWN_KEY: u64 = DOWN >> LEAF_BITS;
/// Picks per node recomputed by the sweep.
const SWEEP_EVERY: u64 = 8;
/// The largest `M` in `scale = M / weight`; beyond it the scales are rounded. With 42 bits of key, a
/// backend can hold 2^26 connections before its key would reach `DOWN`.
const MAX_SCALE_BASE: u64 = 1 << 16;
/// Connections counted in a key; a backend with more sorts as if it had this many (2^26 × 2^16 stays
/// below the `DOWN` bit).
const MAX_ACTIVE_IN_KEY: u64 = 1 << 26;

/// One node's children.
#[repr(align(64))]
struct Line([AtomicU64; FANOUT]);

impl Line {
    #[inline]
    fn values(&self) -> [u64; FANOUT] {
        std::array::from_fn(|s| self.0[s].load(Relaxed))
    }
}

/// The key of a node's value.
#[inline]
fn key(value: u64) -> u64 {
    value >> LEAF_BITS
}

/// The keys of a line's values.
#[inline]
fn keys(values: &[u64; FANOUT]) -> [u64; FANOUT] {
    values.map(key)
}

/// The least key of a line (pairwise, for a short dependency chain).
#[inline]
fn least(k: &[u64; FANOUT]) -> u64 {
    let (a, b) = (k[0].min(k[1]), k[2].min(k[3]));
    let (c, d) = (k[4].min(k[5]), k[6].min(k[7]));
    a.min(b).min(c.min(d))
}

/// The children whose key is `least`, as a bit mask.
#[inline]
fn equal_to(k: &[u64; FANOUT], least: u64) -> usize {
    let e = |s: usize| usize::from(k[s] == least) << s;
    ((e(0) | e(1)) | (e(2) | e(3))) | ((e(4) | e(5)) | (e(6) | e(7)))
}

/// For each 8-bit mask of equal children and each value `r` of three tie bits: the child taken, the
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

/// The first of the children in `equal` (not empty) after `slot`, going round: `slot` itself only when it
/// is the only one.
#[inline]
fn next_after(equal: usize, slot: usize) -> usize {
    let after = (equal | equal << FANOUT) >> (slot + 1);
    (slot + 1 + after.trailing_zeros() as usize) % FANOUT
}

/// The min-tree of one table. See the module documentation.
pub(crate) struct LoadTree {
    /// Level `d` runs from line `starts[d]` to line `starts[d + 1]`: level 1, the root's children, is one
    /// line (only its first `roots` nodes in use); below, each node of level `d - 1` has its children in
    /// line `starts[d] + its index`; level `depth` holds the leaves.
    lines: Box<[Line]>,
    starts: [usize; MAX_DEPTH as usize + 2],
    depth: u32,
    /// Children of the root in use.
    roots: usize,
    backends: usize,
    /// Per backend: `scale << LEAF_BITS`, what one connection adds to its leaf.
    units: Box<[u64]>,
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

/// A backend's leaf in one [`LoadTree`].
pub(crate) struct LoadLink {
    tree: Arc<LoadTree>,
    leaf: u32,
    /// `scale << LEAF_BITS`: what one connection adds to the leaf's value.
    unit: u64,
}

impl fmt::Debug for LoadLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadLink")
            .field("leaf", &self.leaf)
            .field("scale", &(self.unit >> LEAF_BITS))
            .finish_non_exhaustive()
    }
}

impl LoadLink {
    /// Rewrites the leaf from the backend's live count (keeping its `DOWN` bit) and recomputes its
    /// ancestors. `took`: the count just went up, so the nodes that named this leaf move on to the next
    /// least child.
    #[inline]
    fn update(&self, active: usize, took: bool) {
        let value = self.tree.set_leaf(self.leaf, self.unit, active);
        self.tree
            .propagate(self.leaf, value, took.then_some(self.leaf));
    }
}

/// Where a backend's live state keeps its link to the least-connections tree of the table in force, if
/// that table has one. Each rebuild of a least-connections table points it at the new tree; the backend's
/// connection guards update the tree through it.
#[derive(Debug, Default)]
pub(crate) struct LoadSlot {
    /// Set while `link` holds a link, so that tables without a tree cost one load per guard, no more.
    linked: AtomicBool,
    link: ArcSwapOption<LoadLink>,
}

impl LoadSlot {
    /// After the backend's count went up to `active`.
    #[inline]
    pub(crate) fn took(&self, active: usize) {
        self.update(active, true);
    }

    /// After the backend's count went down to `active`.
    #[inline]
    pub(crate) fn gave_back(&self, active: usize) {
        self.update(active, false);
    }

    #[inline]
    fn update(&self, active: usize, took: bool) {
        if self.linked.load(Relaxed) {
            if let Some(link) = &*self.link.load() {
                link.update(active, took);
            }
        }
    }

    /// Points the slot at a new tree's leaf (or at none).
    pub(crate) fn set(&self, link: Option<Arc<LoadLink>>) {
        if link.is_none() && !self.linked.load(Relaxed) {
            return; // a table without a tree over a backend that had none: nothing to store
        }
        self.linked.store(link.is_some(), Relaxed);
        self.link.store(link);
    }

    /// This backend's leaf, when its link is to `tree`.
    #[inline]
    pub(crate) fn leaf_in(&self, tree: &Arc<LoadTree>) -> Option<u32> {
        let link = self.link.load();
        link.as_ref()
            .and_then(|l| Arc::ptr_eq(&l.tree, tree).then_some(l.leaf))
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

    pub(crate) fn is_empty(&self) -> bool {
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
    /// Builds the tree for `backends`, with each leaf at the backend's live count, and points each
    /// backend's [`LoadSlot`] at its leaf. `None` when the table is too small or too large for a tree: the
    /// caller then scans (and the slots are left to the caller to clear).
    pub(crate) fn attach<B: Candidate>(backends: &[Arc<B>]) -> Option<Arc<LoadTree>> {
        let n = backends.len();
        if n < 2 {
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
        let units: Box<[u64]> = scales(backends)
            .into_iter()
            .map(|s| s << LEAF_BITS)
            .collect();
        let tree = Arc::new(LoadTree {
            lines,
            starts,
            depth,
            roots,
            backends: n,
            units,
            down: AtomicUsize::new(0),
            next_expiry: AtomicU64::new(u64::MAX),
            recheck: AtomicBool::new(false),
            repairing: AtomicBool::new(false),
        });
        // Link first, then read the counts: a guard that changes a count after its leaf was written here
        // finds the link and writes the leaf again.
        for (i, b) in backends.iter().enumerate() {
            b.load_slot().set(Some(Arc::new(LoadLink {
                tree: tree.clone(),
                leaf: tree.leaf_of(i),
                unit: tree.units[i],
            })));
        }
        for (i, b) in backends.iter().enumerate() {
            let leaf = tree.leaf_of(i);
            tree.leaf(leaf).store(u64::from(leaf), Relaxed); // from vacant to idle and up
            let value = tree.set_leaf(leaf, tree.units[i], b.active());
            tree.propagate(leaf, value, None);
        }
        Some(tree)
    }

    /// Writes `active` connections of `unit` each into `leaf`, keeping its `DOWN` bit; returns the value.
    #[inline]
    fn set_leaf(&self, leaf: u32, unit: u64, active: usize) -> u64 {
        let load = (active as u64).min(MAX_ACTIVE_IN_KEY) * unit;
        let cell = self.leaf(leaf);
        let mut old = cell.load(Relaxed);
        loop {
            let new = (old & DOWN) | load | u64::from(leaf);
            match cell.compare_exchange_weak(old, new, Relaxed, Relaxed) {
                Ok(_) => return new,
                Err(now) => old = now,
            }
        }
    }

    /// When the leaf of backend `i` does not hold the backend's live count, rewrites it (and its path) and
    /// says so: a pick that landed on it must look again.
    #[inline]
    pub(crate) fn sync_leaf(&self, i: usize, active: usize) -> bool {
        self.sync_leaf_at(self.leaf_of(i), i, active)
    }

    /// [`LoadTree::sync_leaf`] for a caller that has the leaf of backend `i` at hand (`leaf_of(i)`). The
    /// check is inlined into the pick; the rewrite, rare, is not.
    #[inline]
    pub(crate) fn sync_leaf_at(&self, leaf: u32, i: usize, active: usize) -> bool {
        let unit = self.units[i];
        let live = (active as u64).min(MAX_ACTIVE_IN_KEY) * unit;
        if self.leaf(leaf).load(Relaxed) & !DOWN & !LEAF_MASK == live {
            return false;
        }
        self.rewrite_leaf(leaf, unit, active);
        true
    }

    #[cold]
    #[inline(never)]
    fn rewrite_leaf(&self, leaf: u32, unit: u64, active: usize) {
        let value = self.set_leaf(leaf, unit, active);
        self.propagate(leaf, value, None);
    }

    /// Node `j` of level `d`.
    #[inline]
    fn node(&self, d: u32, j: usize) -> &AtomicU64 {
        &self.lines[self.starts[d as usize] + j / FANOUT].0[j % FANOUT]
    }

    /// The children of node `j` of level `d - 1` (for `d = 1`, the root's children).
    #[inline]
    fn children(&self, d: u32, j: usize) -> &Line {
        &self.lines[self.starts[d as usize] + j]
    }

    #[inline]
    fn leaf(&self, leaf: u32) -> &AtomicU64 {
        self.node(self.depth, leaf as usize)
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

    /// The slot, within its line of level `d`, of the node on the way to the leaf that `value` names.
    #[inline]
    fn slot(&self, d: u32, value: u64) -> usize {
        ((value & LEAF_MASK) >> (FANOUT_BITS * (self.depth - d))) as usize % FANOUT
    }

    /// Recomputes node `j` of level `d - 1` from its children (line `j` of level `d`). The node keeps the
    /// child it holds while that child is among the least, else takes the next least one after it; when it
    /// names the leaf `used` (which just took a connection), it takes the next least child after it in any
    /// case, so that equal subtrees take turns. Returns the node's new value, `None` when unchanged.
    #[inline]
    fn refresh(&self, d: u32, j: usize, used: Option<u32>) -> Option<u64> {
        let values = self.children(d, j).values();
        let k = keys(&values);
        let equal = equal_to(&k, least(&k));
        let node = self.node(d - 1, j);
        let held = node.load(Relaxed);
        let slot = self.slot(d, held);
        let child = if equal & (1 << slot) != 0 && used != Some((held & LEAF_MASK) as u32) {
            slot
        } else {
            next_after(equal, slot)
        };
        let value = values[child];
        (value != held).then(|| {
            node.store(value, Relaxed);
            value
        })
    }

    /// Recomputes the ancestors of `leaf`, now holding `value`, from the bottom until one is unchanged.
    /// `used`: see [`LoadTree::refresh`].
    ///
    /// A parent that holds another child, with a key no greater than the changed child's, stays as it is:
    /// that is checked on the parent alone before its line is read.
    #[inline]
    fn propagate(&self, leaf: u32, mut value: u64, used: Option<u32>) {
        let mut j = leaf as usize;
        for d in (2..self.depth + 1).rev() {
            let slot = j % FANOUT;
            j /= FANOUT;
            let held = self.node(d - 1, j).load(Relaxed);
            if self.slot(d, held) != slot && key(value) >= key(held) {
                return;
            }
            match self.refresh(d, j, used) {
                Some(v) => value = v,
                None => return,
            }
        }
    }

    /// Recomputes every ancestor of `leaf` from its children.
    #[cold]
    fn recompute_path(&self, leaf: u32) {
        let mut j = leaf as usize;
        for d in (2..self.depth + 1).rev() {
            j /= FANOUT;
            self.refresh(d, j, None);
        }
    }

    /// The leaf of a least loaded backend, from the root's children: `None` when every backend is marked
    /// down. Among equal children of the root, the top bits of `ties` choose (see [`LoadTree::walk`]).
    ///
    /// The leaf's own value is checked against the root's copy: if the leaf is more loaded than the root
    /// says (a stale path), its path is recomputed and the pick walks down instead.
    #[inline]
    pub(crate) fn pick(&self, ties: u64) -> Option<u32> {
        let values = self.children(1, 0).values();
        let k = keys(&values);
        let least = least(&k);
        if least >= DOWN_KEY {
            return None;
        }
        let equal = equal_to(&k, least);
        let value = values[usize::from(CHOICE[equal][(ties >> (64 - FANOUT_BITS)) as usize])];
        let leaf = (value & LEAF_MASK) as u32;
        if key(self.leaf(leaf).load(Relaxed)) <= least {
            return Some(leaf);
        }
        self.recompute_path(leaf);
        self.walk(ties, &Excluded::default())
    }

    /// Walks down from the root on the keys to a least one, going around the `excluded` leaves: O(log n).
    /// `None` when every leaf left is vacant, excluded or marked down.
    ///
    /// Equal children are chosen between by the top bits of `ties`: among `c` of them, the top three bits
    /// `r` take the `⌊r × c / 8⌋`-th, and `⌈log2 c⌉` bits are used up (none when there is no choice). With
    /// `ties` = a bit-reversed pick counter (a van der Corput sequence), consecutive picks among equal
    /// children go to different ones: two alternate exactly, more share the picks about evenly.
    pub(crate) fn walk(&self, mut ties: u64, excluded: &Excluded) -> Option<u32> {
        let mut j = 0usize; // the node whose children are looked at, in level d - 1
        for d in 1..self.depth + 1 {
            let k: [u64; FANOUT] = if excluded.is_empty() {
                keys(&self.children(d, j).values())
            } else {
                std::array::from_fn(|s| self.key_excluding(d, j * FANOUT + s, excluded))
            };
            let least = least(&k);
            if least >= DOWN_KEY {
                return None;
            }
            let equal = equal_to(&k, least);
            let child = CHOICE[equal][(ties >> (64 - FANOUT_BITS)) as usize];
            ties <<= TIE_BITS[equal];
            j = j * FANOUT + usize::from(child);
        }
        Some(j as u32)
    }

    /// The least key under node `j` of level `d`, not counting the `excluded` leaves.
    fn key_excluding(&self, d: u32, j: usize, excluded: &Excluded) -> u64 {
        let span = 1u64 << (FANOUT_BITS * (self.depth - d));
        if !excluded.any_in(j as u64 * span, span) {
            key(self.node(d, j).load(Relaxed))
        } else if d == self.depth {
            key(VACANT)
        } else {
            (0..FANOUT)
                .map(|s| self.key_excluding(d + 1, j * FANOUT + s, excluded))
                .fold(key(VACANT), u64::min)
        }
    }

    /// Marks the backend at `leaf` as unavailable until further notice (see [`LoadTree::maintain`]).
    pub(crate) fn mark_down(&self, leaf: u32, available_again_at: u64) {
        let was = self.leaf(leaf).fetch_or(DOWN, SeqCst);
        if was & DOWN == 0 {
            self.down.fetch_add(1, SeqCst);
            self.propagate(leaf, was | DOWN, None);
        }
        self.next_expiry.fetch_min(available_again_at, SeqCst);
    }

    /// Asks the next pick to look at every backend marked down (one was re-enabled, perhaps).
    pub(crate) fn recheck(&self) {
        self.recheck.store(true, SeqCst);
    }

    /// Upkeep done by each pick, given a counter of the picks (of this thread): one pick in eight
    /// rewrites one leaf from its backend's live count and recomputes one internal node (the sweep that
    /// bounds how long a stale value can last), and, when a backend marked down may be available again,
    /// looks at all of them.
    #[inline]
    pub(crate) fn maintain<B: Candidate>(&self, count: u64, backends: &[Arc<B>]) {
        if count % SWEEP_EVERY == 0 && !backends.is_empty() {
            let i = ((count / SWEEP_EVERY) % backends.len() as u64) as usize;
            self.sync_leaf(i, backends[i].active());
        }
        // The sweep: the lines after the first (the root's children have no stored parent), last first.
        let lines = self.lines.len();
        if lines > 1 && count % SWEEP_EVERY == 0 {
            let line = lines - 1 - ((count / SWEEP_EVERY) % (lines as u64 - 1)) as usize;
            let d = (2..self.depth + 1)
                .rev()
                .find(|&d| self.starts[d as usize] <= line)
                .unwrap_or(2);
            self.refresh(d, line - self.starts[d as usize], None);
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
    fn repair<B: Candidate>(&self, backends: &[Arc<B>]) {
        if self.repairing.swap(true, SeqCst) {
            return; // another pick is on it
        }
        // Reset first, then look: a backend marked down meanwhile is either seen below or records its
        // expiry after the reset.
        self.recheck.store(false, SeqCst);
        self.next_expiry.store(u64::MAX, SeqCst);
        for (i, b) in backends.iter().enumerate() {
            let leaf = self.leaf_of(i);
            let value = self.leaf(leaf);
            if value.load(SeqCst) & DOWN == 0 {
                continue;
            }
            if b.is_available() {
                let was = value.fetch_and(!DOWN, SeqCst);
                if was & DOWN != 0 {
                    self.down.fetch_sub(1, SeqCst);
                    self.propagate(leaf, was & !DOWN, None);
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
        least(&keys(&self.children(1, 0).values()))
    }

    /// The key of backend `i`'s leaf (for tests).
    #[cfg(test)]
    pub(crate) fn backend_key(&self, i: usize) -> u64 {
        key(self.leaf(self.leaf_of(i)).load(Relaxed))
    }
}

/// Per-backend scales: `M / weight` for the least `M` that all weights divide, when that `M` is at most
/// 2^16 (so equal loads per weight give equal keys); otherwise `2^16 / weight`, rounded.
fn scales<B: Candidate>(backends: &[Arc<B>]) -> Vec<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::rng::AtomicRng;
    use crate::balance::testing::{backends, Held};

    impl LoadTree {
        /// Every internal node holds a copy of one of its children with the least key.
        fn assert_consistent(&self) {
            for d in 2..=self.depth {
                for j in 0..self.starts[d as usize + 1] - self.starts[d as usize] {
                    let values = self.children(d, j).values();
                    let least = least(&keys(&values));
                    let got = self.node(d - 1, j).load(Relaxed);
                    assert!(
                        key(got) == least && values.contains(&got),
                        "node {j} of level {} holds {got:#x}, its children {values:x?}",
                        d - 1
                    );
                }
            }
        }
    }

    #[test]
    fn leaves_are_a_permutation_of_the_backends() {
        let bs = backends(std::iter::repeat_n(1, 100));
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
            let tree = LoadTree::attach(&backends(std::iter::repeat_n(1, n))).unwrap();
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
        // lcm(1..=256) is far beyond 2^16: rounded.
        let s = scales(&backends(1..=256));
        assert_eq!(s[0], 1 << 16);
        assert_eq!(s[255], (1 << 16) / 256);
        assert_eq!(s[2], ((1 << 16) + 1) / 3);
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
            let mut held: Vec<Held> = Vec::new();
            for step in 0..3000 {
                if held.is_empty() || rng.below(10) < 6 {
                    held.push(Held::new(bs[rng.below(n)].clone()));
                } else {
                    held.swap_remove(rng.below(held.len()));
                }
                let want = (0..n)
                    .map(|i| bs[i].active() as u64 * scale[i])
                    .min()
                    .unwrap();
                assert_eq!(tree.least_key(), want, "n = {n}, step {step}");
                let leaf = tree.pick(rng.next_u64()).unwrap();
                let picked = tree.backend_of(leaf);
                assert_eq!(
                    bs[picked].active() as u64 * scale[picked],
                    want,
                    "n = {n}, step {step}: the pick names a least loaded backend"
                );
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

    /// A node whose copy went stale (as two racing updates can leave it) is put right by the pick that is
    /// led astray by it, or else by the sweep.
    #[test]
    fn stale_nodes_are_repaired() {
        let bs = backends(std::iter::repeat_n(1, 700));
        let tree = LoadTree::attach(&bs).unwrap();
        let _load: Vec<_> = (0..700)
            .filter(|&i| i != 123)
            .map(|i| Held::new(bs[i].clone()))
            .collect();
        let idle = tree.leaf_of(123);
        assert_eq!(tree.roots, 2);
        assert_eq!(
            idle >> tree.sub_bits(),
            1,
            "backend 123 is under the second root child"
        );
        // Stale low: the first root child claims key 0 for a leaf under it that has 1.
        let busy = tree.leaf_of(124);
        assert_eq!(busy >> tree.sub_bits(), 0);
        let root = |c: usize| tree.node(1, c);
        root(0).store(u64::from(busy), Relaxed);
        for t in 0..16u64 {
            let leaf = tree.pick(t << 60).unwrap();
            assert_eq!(
                tree.backend_of(leaf),
                123,
                "ties {t}: only backend 123 is idle"
            );
        }
        tree.assert_consistent();

        // Stale high: the root child over the idle leaf claims a load of one: a tie with the first, which
        // the pick with tie bits 0 takes.
        root(1).store((1u64 << LEAF_BITS) | u64::from(idle), Relaxed);
        assert_ne!(tree.backend_of(tree.pick(0).unwrap()), 123);
        let sweep = SWEEP_EVERY * (tree.lines.len() as u64 - 1);
        (0..sweep).for_each(|count| tree.maintain(count, &bs));
        tree.assert_consistent();
        assert_eq!(tree.backend_of(tree.pick(0).unwrap()), 123);
    }

    /// Threads racing through acquires, releases and picks: the leaves keep exact counts, and after one
    /// sweep every node is right again.
    #[test]
    fn concurrent_updates_are_made_exact_by_one_sweep() {
        let bs = backends((0..300).map(|i| 1 + (i % 2) as u32));
        let tree = LoadTree::attach(&bs).unwrap();
        let held: Vec<_> = (0..150).map(|i| Held::new(bs[i * 2].clone())).collect();
        std::thread::scope(|s| {
            for seed in 0..4u64 {
                let (bs, tree) = (&bs, &tree);
                s.spawn(move || {
                    let rng = AtomicRng::new(seed);
                    let mut mine = Vec::new();
                    for _ in 0..20_000 {
                        if let Some(leaf) = tree.pick(rng.next_u64()) {
                            mine.push(Held::new(bs[tree.backend_of(leaf)].clone()));
                        }
                        if !mine.is_empty() && (mine.len() > 20 || rng.below(2) == 0) {
                            mine.swap_remove(rng.below(mine.len()));
                        }
                    }
                });
            }
        });
        // Racing guards of one backend may have written its leaf out of order; one sweep rewrites every
        // leaf from the live counts and every node from its children.
        let sweep = SWEEP_EVERY * (tree.lines.len() as u64 - 1).max(bs.len() as u64);
        (0..sweep).for_each(|count| tree.maintain(count, &bs));
        let scale = scales(&bs);
        for (i, b) in bs.iter().enumerate() {
            assert_eq!(
                tree.backend_key(i),
                b.active() as u64 * scale[i],
                "leaf {i}"
            );
        }
        tree.assert_consistent();
        drop(held);
        tree.assert_consistent();
        assert_eq!(tree.least_key(), 0);
    }

    #[test]
    fn the_walk_goes_around_excluded_and_down_leaves() {
        let bs = backends(std::iter::repeat_n(1, 40));
        let tree = LoadTree::attach(&bs).unwrap();
        let _load: Vec<_> = (0..40)
            .filter(|&i| i != 5 && i != 17 && i != 33)
            .map(|i| Held::new(bs[i].clone()))
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

        tree.mark_down(tree.leaf_of(17), u64::MAX);
        assert!(
            (0..64).all(|k| walk(k << 58, &ex).is_some_and(|i| i != 5 && i != 17 && i != 33)),
            "the next least loaded, once the idle ones are excluded or down"
        );
        tree.assert_consistent();
    }
}
