//! The beam of one layer search: hnswlib's two heaps (a frontier of
//! candidates, nearest first, and the `ef` best results, farthest on top)
//! folded into one sorted array.
//!
//! ```text
//!   pool (accepted, nearest first, len <= ef)     detours (rejected by the
//!   ┌────┬────┬────┬────┬────┬────┐               filter, min-heap)
//!   │ x  │ x  │ x  │ .  │ x  │ .  │  x = expanded ┌───────────┐
//!   └────┴────┴────┴────┴────┴────┘               │ traversed │
//!                   ▲                   ▲          │ never     │
//!                 cursor           bound = last    │ returned  │
//!                 (first unexpanded)  when full    └───────────┘
//! ```
//!
//! Why one array: in hnswlib every admitted node is pushed on both heaps and
//! later popped from one or both; a node that falls out of the results can
//! never be expanded afterwards either (its distance exceeds the results'
//! bound, which only shrinks, and popping it ends the search). So the
//! frontier worth keeping is exactly the unexpanded part of the results.
//! Keeping the results sorted makes "next to expand" a cursor scan, "drop
//! the worst" a `pop`, and the final answer needs no sort. For the `ef`s a
//! search uses (tens to hundreds) a shift inside a small array is cheaper
//! than two heap sift-downs.
//!
//! Nodes the caller's filter rejects (tombstones, a `search_filtered`
//! predicate, the node being inserted) still guide the search but are never
//! results; they wait in a separate min-heap, so a selective filter cannot
//! grow the sorted array. The next node to expand is the nearer of the
//! pool's first unexpanded entry and the detour heap's top, which is
//! hnswlib's order; a detour farther than the bound ends the search, as in
//! hnswlib.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::scratch::Scored;

#[derive(Debug, Clone, Copy)]
struct PoolEntry {
    node: Scored,
    expanded: bool,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Beam {
    /// Accepted nodes, nearest first, at most `ef`.
    pool: Vec<PoolEntry>,
    /// `pool[i].node.dist`, contiguous, so the insertion point is a
    /// branch-free vectorised count instead of a dependent binary search.
    dists: Vec<f32>,
    /// Every pool entry before it is expanded.
    cursor: usize,
    ef: usize,
    /// Admitted nodes the filter rejected, nearest on top.
    detours: BinaryHeap<Reverse<Scored>>,
}

impl Beam {
    /// Empties the beam for a search of width `ef` (at least 1).
    pub(crate) fn reset(&mut self, ef: usize) {
        self.pool.clear();
        self.dists.clear();
        self.detours.clear();
        self.cursor = 0;
        self.ef = ef.max(1);
    }

    /// Whether a node at `dist` may enter: the pool is not full, or `dist`
    /// beats its farthest entry (hnswlib's `lowerBound`).
    #[inline]
    pub(crate) fn admits(&self, dist: f32) -> bool {
        self.dists.len() < self.ef || self.dists.last().is_some_and(|&worst| dist < worst)
    }

    /// Adds an admitted node: into the sorted pool if `accepted`, else onto
    /// the detour heap.
    #[inline]
    pub(crate) fn push(&mut self, node: Scored, accepted: bool) {
        if !accepted {
            self.detours.push(Reverse(node));
            return;
        }
        // After any equal distances: ties keep their arrival order.
        let at = self.dists.iter().filter(|&&d| d <= node.dist).count();
        if at >= self.ef {
            return;
        }
        if self.pool.len() == self.ef {
            self.pool.pop();
            self.dists.pop();
        }
        self.dists.insert(at, node.dist);
        self.pool.insert(
            at,
            PoolEntry {
                node,
                expanded: false,
            },
        );
        self.cursor = self.cursor.min(at);
    }

    /// Moves the cursor past expanded entries.
    #[inline]
    fn settle(&mut self) {
        while self
            .pool
            .get(self.cursor)
            .is_some_and(|entry| entry.expanded)
        {
            self.cursor += 1;
        }
    }

    /// The next node to expand, marked expanded; `None` when the search is
    /// done.
    #[inline]
    pub(crate) fn pop_nearest(&mut self) -> Option<Scored> {
        self.settle();
        let from_pool = self.pool.get(self.cursor).map(|entry| entry.node);
        if let Some(Reverse(detour)) = self.detours.peek().copied() {
            if from_pool.is_none_or(|p| detour.dist < p.dist) {
                self.detours.pop();
                if !self.admits(detour.dist) {
                    // Farther than every result, so is everything still
                    // waiting: hnswlib stops here too.
                    self.detours.clear();
                    return None;
                }
                return Some(detour);
            }
        }
        let node = from_pool?;
        self.pool[self.cursor].expanded = true;
        self.cursor += 1;
        Some(node)
    }

    /// The node [`Beam::pop_nearest`] would most likely return next (for a
    /// prefetch hint; exactness does not matter).
    #[inline]
    pub(crate) fn peek_nearest(&mut self) -> Option<Scored> {
        self.settle();
        let from_pool = self.pool.get(self.cursor).map(|entry| entry.node);
        match (from_pool, self.detours.peek()) {
            (Some(p), Some(Reverse(d))) if d.dist < p.dist => Some(*d),
            (Some(p), _) => Some(p),
            (None, d) => d.map(|Reverse(d)| *d),
        }
    }

    /// The accepted nodes, nearest first (at most `ef`).
    pub(crate) fn results(&self) -> impl ExactSizeIterator<Item = Scored> + '_ {
        self.pool.iter().map(|entry| entry.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(dist: f32, slot: u32) -> Scored {
        Scored {
            dist,
            slot,
            cell: slot,
        }
    }

    fn slots(beam: &Beam) -> Vec<u32> {
        beam.results().map(|s| s.slot).collect()
    }

    #[test]
    fn keeps_the_ef_nearest_accepted_sorted() {
        let mut beam = Beam::default();
        beam.reset(3);
        for (i, d) in [5.0, 1.0, 4.0, 3.0, 2.0, 6.0].into_iter().enumerate() {
            if beam.admits(d) {
                beam.push(node(d, i as u32), true);
            }
        }
        assert_eq!(slots(&beam), vec![1, 4, 3]);
        assert!(!beam.admits(3.0));
        assert!(beam.admits(2.5));
    }

    #[test]
    fn expands_in_distance_order_and_revisits_newly_closer_entries() {
        let mut beam = Beam::default();
        beam.reset(4);
        beam.push(node(3.0, 0), true);
        beam.push(node(5.0, 1), true);
        assert_eq!(beam.pop_nearest().map(|s| s.slot), Some(0));
        // A node nearer than the expanded one goes before the cursor and is
        // expanded next.
        beam.push(node(1.0, 2), true);
        assert_eq!(beam.pop_nearest().map(|s| s.slot), Some(2));
        assert_eq!(beam.pop_nearest().map(|s| s.slot), Some(1));
        assert_eq!(beam.pop_nearest(), None);
    }

    #[test]
    fn detours_are_traversed_in_order_but_never_returned() {
        let mut beam = Beam::default();
        beam.reset(2);
        beam.push(node(2.0, 0), true);
        beam.push(node(1.0, 1), false);
        beam.push(node(3.0, 2), true);
        assert_eq!(beam.pop_nearest().map(|s| s.slot), Some(1));
        assert_eq!(beam.pop_nearest().map(|s| s.slot), Some(0));
        assert_eq!(beam.pop_nearest().map(|s| s.slot), Some(2));
        assert_eq!(slots(&beam), vec![0, 2]);
    }

    #[test]
    fn a_detour_beyond_a_full_pool_ends_the_search() {
        let mut beam = Beam::default();
        beam.reset(1);
        beam.push(node(1.0, 0), true);
        assert_eq!(beam.pop_nearest().map(|s| s.slot), Some(0));
        beam.push(node(0.5, 1), false);
        beam.push(node(0.2, 2), true);
        // The pool's bound is now 0.2: the 0.5 detour can no longer help.
        assert_eq!(beam.pop_nearest().map(|s| s.slot), Some(2));
        assert_eq!(beam.pop_nearest(), None);
    }
}
