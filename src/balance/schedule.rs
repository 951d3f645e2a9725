//! The smooth weighted schedule: the sequence of backend indices that round robin walks and that random
//! and p2c draw from.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;

/// Builds the smooth weighted sequence: backend `i` appears `w[i] / gcd` times, each at its earliest
/// deadline `(2k + 1) / 2w`, so heavy backends are spread through the sequence instead of bunched.
pub(crate) fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
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

/// The greatest common divisor (`gcd(0, x) = x`).
pub(crate) fn gcd<T>(a: T, b: T) -> T
where
    T: Copy + PartialEq + Default + std::ops::Rem<Output = T>,
{
    if b == T::default() {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn gcd_of_numbers() {
        assert_eq!(gcd(12u32, 18), 6);
        assert_eq!(gcd(0u64, 7), 7);
        assert_eq!(gcd(7u64, 0), 7);
    }
}
