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

/// One pooled node without its distance (that lives in `Beam::dists`):
/// 8 bytes, so a push shifts half the bytes a full [`Scored`] would.
#[derive(Debug, Clone, Copy, Default)]
struct PoolEntry {
    slot: u32,
    /// The cell id, with [`EXPANDED`] set once the node was expanded. Cell
    /// ids stay below 2^31 (bit 31 is the tombstone bit of a cell word), so
    /// the flag never collides with an id.
    cell_and_flag: u32,
}

const EXPANDED: u32 = 1 << 31;

/// Entries one push moves with a fixed-size copy: with a constant length
/// the shift compiles to a few vector loads and stores instead of a
/// `memmove` call, whose overhead dominated small-`ef` searches (perf: 6% of
/// a siftsmall search at ef 12). Longer shifts (large `ef`) take the
/// general copy.
const WINDOW: usize = 16;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Beam {
    /// Accepted nodes, nearest first: `pool[..len]`. The vector is kept at
    /// `ef + WINDOW + 1` entries so a fixed-size shift never leaves it;
    /// entries past `len` are stale and never read as results.
    pool: Vec<PoolEntry>,
    /// `dists[i]` is `pool[i]`'s distance, contiguous, so the insertion
    /// point is a branch-free vectorised count instead of a dependent
    /// binary search. Same length and padding as `pool`.
    dists: Vec<f32>,
    /// Entries in the pool, at most `ef`.
    len: usize,
    /// Every pool entry before it is expanded.
    cursor: usize,
    ef: usize,
    /// Admitted nodes the filter rejected, nearest on top.
    detours: BinaryHeap<Reverse<Scored>>,
}

impl Beam {
    /// Empties the beam for a search of width `ef` (at least 1).
    pub(crate) fn reset(&mut self, ef: usize) {
        self.ef = ef.max(1);
        let room = self.ef + WINDOW + 1;
        if self.pool.len() < room {
            self.pool.resize(room, PoolEntry::default());
            self.dists.resize(room, f32::INFINITY);
        }
        self.len = 0;
        self.detours.clear();
        self.cursor = 0;
    }

    /// Whether a node at `dist` may enter: the pool is not full, or `dist`
    /// beats its farthest entry (hnswlib's `lowerBound`).
    #[inline]
    pub(crate) fn admits(&self, dist: f32) -> bool {
        self.len < self.ef
            || self.dists[..self.len]
                .last()
                .is_some_and(|&worst| dist < worst)
    }

    /// Adds an admitted node: into the sorted pool if `accepted`, else onto
    /// the detour heap.
    ///
    /// Always inlined: the search loops run inside a `#[target_feature]`
    /// function (see `Distance::dispatch`), and only an inlined copy of the
    /// insertion-point count gets that function's wide vector compares.
    #[inline(always)]
    pub(crate) fn push(&mut self, node: Scored, accepted: bool) {
        if !accepted {
            self.push_detour(node);
            return;
        }
        debug_assert!(node.cell < EXPANDED, "cell ids stay below 2^31");
        // After any equal distances: ties keep their arrival order.
        let at = self.dists[..self.len]
            .iter()
            .filter(|&&d| d <= node.dist)
            .count();
        if at >= self.ef {
            return;
        }
        // Entries at..moved_end shift one place right; in a full pool the
        // last entry falls off (it lands in the padding).
        let moved = self.len.min(self.ef - 1) - at;
        if moved <= WINDOW {
            // Fixed length: also moves stale padding, which stays in
            // bounds since at + 1 + WINDOW <= ef + WINDOW < pool.len().
            self.pool.copy_within(at..at + WINDOW, at + 1);
            self.dists.copy_within(at..at + WINDOW, at + 1);
        } else {
            self.pool.copy_within(at..at + moved, at + 1);
            self.dists.copy_within(at..at + moved, at + 1);
        }
        self.pool[at] = PoolEntry {
            slot: node.slot,
            cell_and_flag: node.cell,
        };
        self.dists[at] = node.dist;
        self.len = (self.len + 1).min(self.ef);
        self.cursor = self.cursor.min(at);
    }

    /// The rare path of [`Beam::push`], kept out of the inlined copy.
    #[cold]
    #[inline(never)]
    fn push_detour(&mut self, node: Scored) {
        self.detours.push(Reverse(node));
    }

    /// Moves the cursor past expanded entries.
    #[inline]
    fn settle(&mut self) {
        while self.cursor < self.len && self.pool[self.cursor].cell_and_flag & EXPANDED != 0 {
            self.cursor += 1;
        }
    }

    /// Pool entry `i` (`i < len`) as a [`Scored`].
    #[inline]
    fn scored(&self, i: usize) -> Scored {
        let entry = self.pool[i];
        Scored {
            dist: self.dists[i],
            slot: entry.slot,
            cell: entry.cell_and_flag & !EXPANDED,
        }
    }

    /// The first unexpanded pool entry, if any (after [`Beam::settle`]).
    #[inline]
    fn next_in_pool(&self) -> Option<Scored> {
        (self.cursor < self.len).then(|| self.scored(self.cursor))
    }

    /// The next node to expand, marked expanded; `None` when the search is
    /// done.
    #[inline(always)]
    pub(crate) fn pop_nearest(&mut self) -> Option<Scored> {
        self.settle();
        let from_pool = self.next_in_pool();
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
        self.pool[self.cursor].cell_and_flag |= EXPANDED;
        self.cursor += 1;
        Some(node)
    }

    /// The node [`Beam::pop_nearest`] would most likely return next (for a
    /// prefetch hint; exactness does not matter).
    #[inline(always)]
    pub(crate) fn peek_nearest(&mut self) -> Option<Scored> {
        self.settle();
        let from_pool = self.next_in_pool();
        match (from_pool, self.detours.peek()) {
            (Some(p), Some(Reverse(d))) if d.dist < p.dist => Some(*d),
            (Some(p), _) => Some(p),
            (None, d) => d.map(|Reverse(d)| *d),
        }
    }

    /// The accepted nodes, nearest first (at most `ef`).
    pub(crate) fn results(&self) -> impl ExactSizeIterator<Item = Scored> + '_ {
        (0..self.len).map(|i| self.scored(i))
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

    /// The reference: a plain sorted vector with explicit flags. Sweeps `ef`
    /// across both shift paths (the fixed window and the general copy),
    /// with many ties, interleaving pushes and expansions.
    #[test]
    fn matches_a_sorted_vector_model_for_every_shift_length() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut beam = Beam::default();
        for ef in 1..=3 * WINDOW + 2 {
            for _ in 0..10 {
                beam.reset(ef);
                // (dist, slot, expanded)
                let mut model: Vec<(f32, u32, bool)> = Vec::new();
                for i in 0..300u32 {
                    if next() % 4 == 0 {
                        let expected = model.iter_mut().find(|e| !e.2).map(|e| {
                            e.2 = true;
                            e.1
                        });
                        assert_eq!(beam.pop_nearest().map(|s| s.slot), expected);
                        continue;
                    }
                    let d = (next() % 50) as f32;
                    let admits = model.len() < ef || d < model.last().unwrap().0;
                    assert_eq!(beam.admits(d), admits, "ef {ef}");
                    if !admits {
                        continue;
                    }
                    beam.push(
                        Scored {
                            dist: d,
                            slot: i,
                            cell: i * 7 + 1,
                        },
                        true,
                    );
                    let at = model.iter().filter(|e| e.0 <= d).count();
                    model.insert(at, (d, i, false));
                    model.truncate(ef);
                    let got: Vec<(f32, u32, u32)> =
                        beam.results().map(|s| (s.dist, s.slot, s.cell)).collect();
                    let want: Vec<(f32, u32, u32)> =
                        model.iter().map(|e| (e.0, e.1, e.1 * 7 + 1)).collect();
                    assert_eq!(got, want, "ef {ef}");
                }
            }
        }
    }
}
