//! The anchor tree: the in-edges pruning may never remove, which keep every
//! node reachable on layer 0.
//!
//! HNSW's neighbour heuristic prunes a list whenever it overflows, and can
//! drop a node's last in-edge: the node becomes unreachable (hnswlib #522's
//! "isolated islands"; usearch #735 for the concurrent variant). nann gives
//! every node an *anchor*: one layer-0 in-edge that pruning never removes.
//!
//! ```text
//!   entry point (ROOT)
//!     ├── a ── anchored by the entry point: the edge entry -> a is protected
//!     │   ├── c
//!     │   └── d
//!     └── b
//!         └── e        every other edge may be pruned freely:
//!                      the protected edges alone reach every node
//! ```
//!
//! Rules, each argued where it is enforced:
//! * A fresh node's anchor is the first forward neighbour that accepts its
//!   reverse link, is itself anchored, and anchors fewer than
//!   [`Index::max_anchored`] nodes; the anchor is set under that neighbour's
//!   entry lock, so no pruner of its list can miss the protection.
//!   Otherwise [`Index::force_anchor`] finds one.
//! * Only an anchored node (or the root) may anchor: a reachable but
//!   unanchored fresh node could otherwise end up anchored below its own
//!   child, a cycle cut off from the root.
//! * A promoted entry point adopts the old root (`insert.rs`), so the root is
//!   always the entry point.
//! * Re-anchoring (after an update moved a node) takes the anchor lock,
//!   re-checks the edge under the new anchor's entry lock, and refuses any
//!   anchor in the node's own subtree, so the tree never gains a cycle.
//!
//! Lock order: the anchor lock is taken before one entry lock, never while
//! holding one.

use crossbeam_epoch::Guard;

use crate::graph::{NodeGuard, ROOT, UNANCHORED};
use crate::index::Index;
use crate::sync::Ordering;

impl Index {
    /// The layer-0 neighbours of `node` that it anchors (must never be dropped).
    pub(crate) fn anchored_children(
        &self,
        node: &NodeGuard<'_>,
        buffer: &mut Vec<u32>,
    ) -> Vec<u32> {
        self.graph.read_links_locked(node, 0, buffer);
        buffer
            .iter()
            .copied()
            .filter(|&c| self.graph.anchor(c) == node.slot())
            .collect()
    }

    /// How many nodes one node may anchor: an eighth of the layer-0 degree.
    /// Without a cap, a hub (a large-norm vector under inner product, say)
    /// anchors every node near it and its list fills with protected entries
    /// the heuristic can no longer choose. Measured on 20k x 64
    /// inner-product data (R@10 at ef 10): no anchors 0.995, uncapped 0.881,
    /// cap M0/4 0.992, cap M0/8 0.997; hnswlib 0.992.
    /// At least 2, so the anchor tree can branch: with a cap of 1 it would
    /// have to be a single chain, and concurrent inserts would race for its
    /// one free end.
    pub(crate) fn max_anchored(&self) -> usize {
        self.graph.max_degree(0).div_ceil(8).max(2)
    }

    /// How many entries of `list` (a layer-0 list of `base`) `base` anchors.
    pub(crate) fn anchored_count(&self, base: u32, list: &[u32]) -> usize {
        list.iter()
            .filter(|&&c| self.graph.anchor(c) == base)
            .count()
    }

    /// Fallback when no neighbour accepted a fresh node as its anchored child:
    /// link it from one of its forward neighbours that has room and is below
    /// the anchoring cap; failing that, from a node drawn at random (a hashed
    /// starting point, then a scan) below the cap, preferring one with room
    /// over giving up an unanchored entry. One always exists: n - 1 anchor
    /// edges over n nodes average below one per node.
    ///
    /// Under inner product most nodes land here (hub lists are full and at
    /// the cap: 151k of 200k inserts on the benchmark set). Measured there,
    /// random long-range anchors give R@10 0.999 at ef 10, anchors forced
    /// into nearby lists 0.955-0.974: the random edges double as NSW-style
    /// long links. Under L2 the fallback is rare (315 of 100k inserts).
    pub(crate) fn force_anchor(&self, slot: u32, preferred: &[u32], guard: &Guard) {
        if self.try_force_anchor(slot, preferred.iter().copied(), false, guard) {
            return;
        }
        // A pass can come up empty only if concurrent inserts took the last
        // free places it looked at; the next pass sees the nodes they added.
        let mut backoff = crate::sync::Backoff::new();
        loop {
            let slots = self.next_slot.load(Ordering::Acquire) as u32;
            let start = (crate::level::splitmix64(slot as u64) % slots.max(1) as u64) as u32;
            if self.try_force_anchor(slot, (start..slots).chain(0..start), false, guard)
                || self.try_force_anchor(slot, (start..slots).chain(0..start), true, guard)
            {
                return;
            }
            backoff.snooze();
        }
    }

    fn try_force_anchor(
        &self,
        slot: u32,
        candidates: impl Iterator<Item = u32>,
        evict: bool,
        guard: &Guard,
    ) -> bool {
        let mut list = Vec::new();
        for n in candidates {
            if n == slot || matches!(self.graph.anchor(n), UNANCHORED) {
                continue;
            }
            let Some(node) = self.graph.lock_node(n) else {
                continue;
            };
            self.graph.read_links_locked(&node, 0, &mut list);
            let linked = list.contains(&slot);
            // Cheap test first: a full list is no use without eviction.
            if !linked && !evict && list.len() >= self.graph.max_degree(0) {
                continue;
            }
            if self.anchored_count(n, &list) >= self.max_anchored() {
                continue;
            }
            if !linked {
                if list.len() >= self.graph.max_degree(0) {
                    if !evict {
                        continue;
                    }
                    // Replace the farthest entry that `n` does not anchor.
                    let Some(base) = self.graph.vector(n, guard) else {
                        continue;
                    };
                    let victim = list
                        .iter()
                        .enumerate()
                        .filter(|(_, &c)| self.graph.anchor(c) != n)
                        .filter_map(|(i, &c)| self.score(base.vector, c, guard).map(|s| (s, i)))
                        .max_by(|a, b| a.0.cmp(&b.0));
                    let Some((_, index)) = victim else {
                        continue;
                    };
                    list[index] = slot;
                } else {
                    list.push(slot);
                }
                self.graph.write_links(&node, 0, &list);
            }
            self.graph.set_anchor(slot, n);
            return true;
        }
        false
    }

    /// Moves `slot`'s anchor to the first of `candidates` that links it on
    /// layer 0 and is not in its subtree (after an update moved the node).
    pub(crate) fn reanchor(&self, slot: u32, candidates: &[u32]) {
        for &q in candidates {
            match self.try_anchor_at(slot, q) {
                AnchorOutcome::Moved | AnchorOutcome::Unchanged => return,
                AnchorOutcome::Refused => {}
            }
        }
    }

    /// Makes `q` the anchor of `child` if `q` links `child` on layer 0 and is
    /// not `child`'s descendant in the anchor tree.
    pub(crate) fn try_anchor_at(&self, child: u32, q: u32) -> AnchorOutcome {
        let _anchors = self.anchor_lock.lock();
        let current = self.graph.anchor(child);
        if current == ROOT || current == UNANCHORED {
            return AnchorOutcome::Unchanged;
        }
        if current == q {
            return AnchorOutcome::Unchanged;
        }
        let Some(node) = self.graph.lock_node(q) else {
            return AnchorOutcome::Refused;
        };
        let mut list = Vec::new();
        self.graph.read_links_locked(&node, 0, &mut list);
        if !list.contains(&child)
            || self.anchored_count(q, &list) >= self.max_anchored()
            || self.is_descendant(q, child)
        {
            return AnchorOutcome::Refused;
        }
        self.graph.set_anchor(child, q);
        AnchorOutcome::Moved
    }

    /// Whether `node` lies in `ancestor`'s subtree of the anchor tree
    /// (conservatively `true` if the walk cannot be completed).
    fn is_descendant(&self, node: u32, ancestor: u32) -> bool {
        let mut current = node;
        for _ in 0..1_000_000 {
            if current == ancestor {
                return true;
            }
            match self.graph.anchor(current) {
                ROOT => return false,
                UNANCHORED => return true,
                parent => current = parent,
            }
        }
        true
    }
}

/// What `try_anchor_at` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnchorOutcome {
    Moved,
    Unchanged,
    Refused,
}
