//! Compaction: unlinking removed entries from the graph.
//!
//! [`Index::remove`] leaves a *tombstone*: the entry leaves results at once,
//! but its vector and lists stay to bridge the graph until an insert reuses
//! the slot. Under a steady mix of removes and inserts that happens within
//! moments and tombstones never pile up. When removals outpace inserts they
//! do: every search walks through them, their vectors stay allocated, and
//! once most of a region is tombstones a search finds fewer than `k` live
//! entries there and falls back to an exact scan. [`Index::compact`] takes
//! them out:
//!
//! ```text
//!  compact()                     writers wait (writer gate, exclusive);
//!   │                            searches go on, lock-free, throughout
//!   ├─ 1 repair   every live node whose list names a removed node re-selects
//!   │             that list from its live neighbours plus the live nodes
//!   │             reached *through* the removed ones (a bounded walk), by
//!   │             the heuristic, refilled to the layer's degree
//!   ├─ 2 entry    a removed entry point hands over to a live node of the
//!   │             highest level left
//!   ├─ 3 detach   removed nodes: lists emptied, anchor cleared, cell word
//!   │             NO_CELL, vector cell retired (recycled after the epoch
//!   │             grace period); the slot stays on the free list
//!   └─ 4 anchors  the anchor tree is rebuilt breadth-first from the entry
//!                 point over layer 0; a live node no edge reached gets one
//!                 (`force_anchor`)
//! ```
//!
//! Why this is safe under concurrent searches: a search copies a list and
//! then reads each named node's cell word. A list copied before step 1 may
//! name a removed node; if step 3 has detached it, its cell word is
//! `NO_CELL` and the search skips it (the same path as a never-published
//! slot); if not, the node is still a valid tombstone with a vector. Every
//! list write happens under the node's entry lock, as for any writer, so
//! readers see whole lists. Anchors are read only by writers, who wait.
//!
//! What compaction does not do: shrink the slot arrays. A detached slot's
//! record (lock, lists, anchor: 8 + 8M bytes) stays allocated for the next
//! insert, while its vector cell is freed; a saved file keeps the slots
//! too. An index whose live set shrank for good and must give that memory
//! back is rebuilt from its live entries.

use std::collections::VecDeque;

use crate::graph::{NO_CELL, ROOT, TOMBSTONE, UNANCHORED};
use crate::index::Index;
use crate::insert::Pruned;
use crate::sync::Ordering;

/// What [`Index::compact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Compaction {
    /// Removed entries taken out of the graph.
    pub unlinked: usize,
    /// Neighbour lists of live nodes re-selected because they named a
    /// removed node.
    pub lists_repaired: usize,
    /// Live nodes that no kept edge reached from the entry point and that
    /// were given one (see `anchor.rs`'s `force_anchor`).
    pub forced_anchors: usize,
}

/// How many removed nodes one list repair may walk through, and how many
/// candidates per list slot it stops at: enough to refill a list when most
/// of its neighbourhood was removed, bounded when all of it was.
const MAX_WALKED: usize = 64;
const CANDIDATES_PER_SLOT: usize = 3;

impl Index {
    /// Unlinks every removed entry from the graph, repairs the lists that
    /// named them, and frees their vectors (see the module docs above for
    /// the steps).
    ///
    /// Writers wait while it runs; searches do not. Cost: one pass over
    /// every list, plus a heuristic re-selection for each list that named a
    /// removed entry. Nothing to do (no removed entries in the graph) costs
    /// one pass over the slots.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(2, Metric::L2))?;
    /// for key in 0..1000u64 {
    ///     index.insert(key, &[(key % 40) as f32, (key / 40) as f32])?;
    /// }
    /// for key in (0..1000u64).filter(|k| k % 10 != 0) {
    ///     index.remove(key)?;   // 90% removed: tombstones crowd the graph
    /// }
    /// let done = index.compact();
    /// assert_eq!(done.unlinked, 900);
    /// assert_eq!(index.stats().tombstones, 0);
    /// index.check_invariants()?;
    /// let hits = index.search(&[20.0, 10.0], 1, 32)?;
    /// assert_eq!(hits[0].key, 420);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn compact(&self) -> Compaction {
        let _quiescent = self.writer_gate.write();
        // Acquire is more than needed: `next_slot` only bounds the scan (it
        // is handed out Relaxed); each slot's cell word is loaded with
        // Acquire, pairing with its Release publication, before use.
        let slots = self.next_slot.load(Ordering::Acquire) as u32;
        let removed: Vec<u32> = (0..slots).filter(|&s| self.is_tombstone(s)).collect();
        if removed.is_empty() {
            return Compaction::default();
        }
        let lists_repaired = self.repair_lists(slots);
        self.hand_over_entry(slots);
        let guard = self.pin();
        for &slot in &removed {
            let Some(node) = self.graph.lock_node(slot) else {
                continue;
            };
            for layer in 0..=self.graph.level(slot) {
                self.graph.write_links(&node, layer, &[]);
            }
            self.graph.set_anchor(slot, UNANCHORED);
            let old = self.graph.publish_cell(&node, NO_CELL);
            if old != NO_CELL {
                self.graph.vectors.retire(old & !TOMBSTONE, &guard);
            }
        }
        drop(guard);
        let forced_anchors = self.rebuild_anchor_tree(slots);
        Compaction {
            unlinked: removed.len(),
            lists_repaired,
            forced_anchors,
        }
    }

    /// A removed entry still linked in the graph.
    fn is_tombstone(&self, slot: u32) -> bool {
        let word = self.graph.cell_word(slot);
        word != NO_CELL && word & TOMBSTONE != 0
    }

    fn is_live(&self, slot: u32) -> bool {
        self.graph.cell_word(slot) & TOMBSTONE == 0
    }

    /// Step 1, on every core: re-selects each live list that names a removed
    /// node. Workers take disjoint blocks of slots and write only the lists
    /// of their own slots; removed nodes' lists, which the walks read, are
    /// not written until step 3.
    fn repair_lists(&self, slots: u32) -> usize {
        const BLOCK: usize = 256;
        let blocks = (slots as usize).div_ceil(BLOCK);
        let repaired = crate::parallel::map_indexed(blocks, 0, |b| {
            let guard = self.pin();
            let (mut list, mut walked_list, mut candidates) = (Vec::new(), Vec::new(), Vec::new());
            let mut frontier = VecDeque::new();
            let mut seen = Vec::new();
            let mut repaired = 0;
            let end = ((b + 1) * BLOCK).min(slots as usize) as u32;
            for slot in (b * BLOCK) as u32..end {
                if !self.is_live(slot) {
                    continue;
                }
                for layer in 0..=self.graph.level(slot) {
                    let Some(node) = self.graph.lock_node(slot) else {
                        continue;
                    };
                    self.graph.read_links_locked(&node, layer, &mut list);
                    if !list.iter().any(|&n| self.is_tombstone(n)) {
                        continue;
                    }
                    let max = self.graph.max_degree(layer);
                    candidates.clear();
                    frontier.clear();
                    seen.clear();
                    for &n in &list {
                        if self.is_tombstone(n) {
                            frontier.push_back(n);
                            seen.push(n);
                        } else {
                            candidates.push(n);
                        }
                    }
                    // Breadth-first through removed nodes: the live nodes
                    // they linked are this node's two-hop (or further)
                    // neighbours, the candidates hnswlib-style repair uses.
                    let mut walked = 0;
                    while let Some(t) = frontier.pop_front() {
                        if walked == MAX_WALKED || candidates.len() >= CANDIDATES_PER_SLOT * max {
                            break;
                        }
                        walked += 1;
                        self.graph.read_links(t, layer, &mut walked_list);
                        for &n in &walked_list {
                            if n == slot || seen.contains(&n) {
                                continue;
                            }
                            seen.push(n);
                            if self.is_tombstone(n) {
                                frontier.push_back(n);
                            } else if self.is_live(n) {
                                candidates.push(n);
                            }
                        }
                    }
                    let selected =
                        self.reselect(slot, &candidates, max, layer, Pruned::Refill, &guard);
                    self.graph.write_links(&node, layer, &selected);
                    repaired += 1;
                }
            }
            repaired
        });
        repaired.into_iter().sum()
    }

    /// Step 2: if the entry point was removed, the first live node of the
    /// highest level left takes over (or the graph becomes empty).
    fn hand_over_entry(&self, slots: u32) {
        let Some((entry, _)) = self.graph.entry() else {
            return;
        };
        if self.is_live(entry) {
            return;
        }
        let mut best: Option<(u32, usize)> = None;
        for slot in 0..slots {
            if self.is_live(slot) {
                let level = self.graph.level(slot);
                if best.is_none_or(|(_, l)| level > l) {
                    best = Some((slot, level));
                }
            }
        }
        match best {
            Some((slot, level)) => self.graph.set_entry(slot, level),
            None => self.graph.clear_entry(),
        }
    }

    /// Step 4: anchors from scratch. Breadth-first from the entry point over
    /// layer-0 edges, each node anchoring at most `max_anchored` of the
    /// nodes it reaches first; a live node left over is linked by
    /// `force_anchor` (from an anchored node, so no cycle can form) and the
    /// search continues below it. Returns how many were forced.
    fn rebuild_anchor_tree(&self, slots: u32) -> usize {
        let Some((entry, _)) = self.graph.entry() else {
            return 0;
        };
        for slot in 0..slots {
            if self.is_live(slot) {
                self.graph.set_anchor(slot, UNANCHORED);
            }
        }
        self.graph.set_anchor(entry, ROOT);
        let mut queue = VecDeque::from([entry]);
        let mut list = Vec::new();
        let mut forced = 0;
        let guard = self.pin();
        let mut next_unvisited = 0;
        loop {
            while let Some(parent) = queue.pop_front() {
                self.graph.read_links(parent, 0, &mut list);
                let mut anchored = 0;
                for &child in &list {
                    if anchored == self.max_anchored() {
                        break;
                    }
                    if self.is_live(child) && self.graph.anchor(child) == UNANCHORED {
                        self.graph.set_anchor(child, parent);
                        anchored += 1;
                        queue.push_back(child);
                    }
                }
            }
            let left = (next_unvisited..slots)
                .find(|&s| self.is_live(s) && self.graph.anchor(s) == UNANCHORED);
            let Some(orphan) = left else {
                break;
            };
            next_unvisited = orphan + 1;
            self.force_anchor(orphan, &[], &guard);
            forced += 1;
            queue.push_back(orphan);
        }
        forced
    }
}
