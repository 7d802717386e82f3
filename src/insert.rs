//! Insertion: linking a node into the graph, and the neighbour heuristic.
//!
//! ```text
//!  insert(key, v)
//!   ├─ write v into a private cell, take a slot (a removed one if any)
//!   ├─ publish the cell in the slot           (node still unreachable)
//!   ├─ search each layer for candidates       (no locks)
//!   ├─ phase 1: write ALL forward lists       (own entry lock)
//!   ├─ phase 2: reverse links, one neighbour at a time (its entry lock)
//!   │            ├─ shrink by the heuristic if the neighbour is full,
//!   │            │  never dropping a node the neighbour anchors
//!   │            └─ the first accepting neighbour (anchored, below the cap)
//!   │               becomes the new node's anchor; else `force_anchor`
//!   └─ promote entry point if the level is new (promotion mutex held throughout;
//!      the new top node adopts the old root of the anchor tree)
//! ```
//!
//! Phase 1 completes before phase 2 starts: a node becomes reachable (through
//! a reverse link) only when every one of its forward lists exists, on every
//! layer. usearch #735 is the failure this ordering prevents: a node reachable
//! through its layer-1 reverse links while its layer-0 list was still empty.
//!
//! Only one entry lock is ever held at a time, so two inserters that pick
//! each other as neighbours cannot deadlock.

use crossbeam_epoch::Guard;

use crate::error::{Error, Result};
use crate::graph::{NO_CELL, ROOT, TOMBSTONE, UNANCHORED};
use crate::index::Index;
use crate::scratch::{Scored, Scratch};
use crate::search::Budget;
use crate::storage::CellId;
use crate::sync::Ordering;

/// Progress of a bulk build, passed to its callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Entries inserted so far.
    pub done: usize,
    /// Entries in the batch.
    pub total: usize,
}

/// A candidate neighbour with its vector, for the heuristic.
#[derive(Clone, Copy)]
struct Candidate<'g> {
    dist: f32,
    slot: u32,
    vector: &'g [f32],
}

/// What [`Index::select_neighbours`] does with room the heuristic leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pruned {
    /// Leave it: a list grows back through later reverse links (inserts).
    Drop,
    /// Fill it with the nearest pruned candidates: for the repair of an
    /// updated node's old neighbourhood, which no later insert refills (a
    /// bare heuristic there shrank lists at every update and cost churned
    /// indexes ~0.02 of recall).
    Refill,
}

impl Index {
    /// Inserts a new entry.
    ///
    /// Fails with [`Error::DuplicateKey`] if `key` is present (use
    /// [`update`](Self::update)), and with the dimension / finiteness errors
    /// for a bad vector. Reuses a removed entry's slot when there is one.
    ///
    /// ```
    /// use nann::{Error, Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(2, Metric::L2))?;
    /// index.insert(1, &[0.5, 0.5])?;
    /// assert_eq!(index.insert(1, &[0.0, 0.0]), Err(Error::DuplicateKey(1)));
    /// assert!(matches!(index.insert(2, &[0.0]), Err(Error::DimensionMismatch { .. })));
    /// assert!(matches!(index.insert(3, &[f32::NAN, 0.0]), Err(Error::NonFiniteValue { .. })));
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn insert(&self, key: u64, vector: &[f32]) -> Result<()> {
        self.insert_inner(key, vector, &[])
    }

    /// Inserts `key` with its vector and its payload (exactly
    /// [`payload_len`](crate::IndexParams::payload_len) bytes), which
    /// searches then see together: a [`Scorer`](crate::Scorer) gets both
    /// from the same version of the entry.
    ///
    /// ```
    /// use nann::{Error, Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(2, Metric::L2).payload_len(3))?;
    /// index.insert_with_payload(1, &[0.0, 1.0], b"abc")?;
    /// assert_eq!(index.get_payload(1)?, b"abc");
    /// assert_eq!(
    ///     index.insert_with_payload(2, &[0.0, 1.0], b"ab"),
    ///     Err(Error::PayloadLength { expected: 3, actual: 2 })
    /// );
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn insert_with_payload(&self, key: u64, vector: &[f32], payload: &[u8]) -> Result<()> {
        self.check_payload(payload)?;
        self.insert_inner(key, vector, payload)
    }

    /// `insert`, with `payload` already checked (empty: zeros).
    fn insert_inner(&self, key: u64, vector: &[f32], payload: &[u8]) -> Result<()> {
        let vector = self.prepare(vector)?;
        let _op = self.op_lock(key).lock();
        let _gate = self.writer_gate.read();
        if self.slot_of(key).is_some() {
            return Err(Error::DuplicateKey(key));
        }
        self.insert_locked(key, &vector, payload)
    }

    /// Inserts the absent `key` with its prepared `vector` and checked
    /// `payload`. The caller holds `key`'s op lock and the writer gate
    /// (shared), and has seen `key` absent under them.
    pub(crate) fn insert_locked(&self, key: u64, vector: &[f32], payload: &[u8]) -> Result<()> {
        let cell = self
            .graph
            .vectors
            .allocate_with_payload(key, vector, payload)?;
        let guard = self.pin();
        let reused = self.free_slots.lock().pop();
        match reused {
            Some(slot) => {
                self.keys_insert_after_publish(slot, key, cell, &guard);
                self.relink(slot, &guard);
            }
            None => {
                let slot = match self.allocate_fresh_slot() {
                    Ok(slot) => slot,
                    Err(e) => {
                        self.graph.vectors.release_unpublished(cell);
                        return Err(e);
                    }
                };
                let level = self.levels.next();
                let initialised = match self.graph.lock_node(slot) {
                    Some(node) => self
                        .graph
                        .init_node(&node, level)
                        .map(|()| self.graph.publish_cell(&node, cell)),
                    None => Err(Error::OutOfMemory { bytes: 0 }),
                };
                // On failure the cell was never published: give it back
                // (after the node's lock is released).
                if let Err(e) = initialised {
                    self.graph.vectors.release_unpublished(cell);
                    return Err(e);
                }
                self.key_map().insert(key, slot, |s| self.key_at(s));
                self.live.fetch_add(1, Ordering::Relaxed);
                self.connect(slot, level, false, &guard);
            }
        }
        Ok(())
    }

    /// Publishes `cell` in a removed slot, retires the slot's old cell, and
    /// maps `key` to it.
    fn keys_insert_after_publish(&self, slot: u32, key: u64, cell: CellId, guard: &Guard) {
        let old = match self.graph.lock_node(slot) {
            Some(node) => self.graph.publish_cell(&node, cell),
            None => NO_CELL,
        };
        if old != NO_CELL {
            self.graph.vectors.retire(old & !TOMBSTONE, guard);
        }
        self.key_map().insert(key, slot, |s| self.key_at(s));
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    fn allocate_fresh_slot(&self) -> Result<u32> {
        // Relaxed: uniqueness is all the counter provides; the slot's contents
        // are published through its cell word and entry lock.
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        if slot >= TOMBSTONE as usize {
            return Err(Error::CapacityExceeded {
                limit: TOMBSTONE as usize,
            });
        }
        self.graph.reserve_slots(slot + 1)?;
        Ok(slot as u32)
    }

    /// Inserts many entries on `threads` threads (0 = all cores), calling
    /// `progress` from the workers about every 1% of the batch.
    ///
    /// Every vector is validated before anything is inserted. If an insert
    /// fails (e.g. a duplicate key), the workers stop and the first error is
    /// returned; entries inserted before it stay in the index.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(2, Metric::L2))?;
    /// let keys: Vec<u64> = (0..1000).collect();
    /// let vectors: Vec<[f32; 2]> = (0..1000).map(|i| [i as f32, (i % 7) as f32]).collect();
    /// index.insert_many(&keys, &vectors, 2, |p| assert!(p.done <= p.total))?;
    /// assert_eq!(index.len(), 1000);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn insert_many<V, P>(
        &self,
        keys: &[u64],
        vectors: &[V],
        threads: usize,
        progress: P,
    ) -> Result<()>
    where
        V: AsRef<[f32]> + Sync,
        P: Fn(Progress) + Sync,
    {
        if keys.len() != vectors.len() {
            return Err(Error::InvalidParameter {
                name: "keys",
                reason: format!("{} keys for {} vectors", keys.len(), vectors.len()),
            });
        }
        let mut check = Vec::new();
        for v in vectors {
            self.prepare_into(v.as_ref(), &mut check)?;
        }
        let total = keys.len();
        self.graph
            .reserve_slots(self.next_slot.load(Ordering::Relaxed) + total)?;
        let done = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let step = (total / 100).max(1);
        let results = crate::parallel::map_indexed(total, threads, |i| {
            // Relaxed: a best-effort early stop; the error itself travels
            // through the returned results.
            if failed.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(());
            }
            let outcome = self.insert(keys[i], vectors[i].as_ref());
            if outcome.is_err() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let finished = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if finished.is_multiple_of(step) || finished == total {
                progress(Progress {
                    done: finished,
                    total,
                });
            }
            outcome
        });
        results.into_iter().collect()
    }

    /// Links `slot` (whose cell is published) into every layer up to `level`.
    /// `relinking` is set for a node that was linked before (update, or a
    /// reused slot): it keeps its anchored children and may move its anchor.
    pub(crate) fn connect(&self, slot: u32, level: usize, relinking: bool, guard: &Guard) {
        let mut scratch = self.take_scratch();
        let Some(own) = self.graph.vector(slot, guard) else {
            return;
        };
        let query = own.vector;

        // A node that raises the max level holds the promotion mutex for its
        // whole insertion, so promotions are serial and the new top node is
        // linked before it becomes the entry point (hnswlib's `global`).
        let mut entry = self.graph.entry();
        let _promotion = if entry.is_none_or(|(_, max)| level > max) {
            let held = self.promotion.lock();
            entry = self.graph.entry();
            Some(held)
        } else {
            None
        };
        let Some((entry_slot, max_level)) = entry else {
            let _anchors = self.anchor_lock.lock();
            self.graph.set_anchor(slot, ROOT);
            self.graph.set_entry(slot, level);
            return;
        };
        let promoting = level > max_level;
        // The seeded mutant `early_promotion` (loom builds) publishes the new
        // top node as the entry point before it has any links; model L4
        // must catch searches that start from it.
        if promoting && crate::sync::mutant("early_promotion") {
            self.graph.set_entry(slot, level);
        }

        // A relinked node (update, reused slot) selects up to M0 forward
        // links on layer 0, not M: it gets no reverse links from the inserts
        // that follow a fresh node, so M would leave it (and, through the
        // repair, its old neighbourhood) sparser than a fresh build; churn
        // measured R@10 0.04 below a fresh build that way
        // (`examples/churn.rs`, BENCHMARKS.md).
        let layer0_max = if relinking {
            self.graph.max_degree(0)
        } else {
            self.params.m
        };
        let mut plan = self.plan_links(
            slot,
            query,
            entry_slot,
            (max_level, level),
            layer0_max,
            relinking,
            &mut scratch,
            guard,
        );

        // Phase 1: every forward list, before anyone can reach the node.
        // The seeded mutant `reverse_links_first` (loom builds) writes them
        // after phase 2 instead, which model L5 must catch: a search could
        // then reach the node through a reverse link and find no list.
        let reverse_first = crate::sync::mutant("reverse_links_first");
        if !reverse_first {
            self.write_forward_lists(slot, &mut plan, promoting, entry_slot, &mut scratch.links);
        }
        if promoting {
            // The new node becomes the root of the anchor tree: the old root
            // hangs below it through the edge written above.
            let _anchors = self.anchor_lock.lock();
            self.graph.set_anchor(entry_slot, slot);
            self.graph.set_anchor(slot, ROOT);
        }

        // Phase 2: reverse links, one neighbour lock at a time. The first
        // layer-0 neighbour that accepts a fresh node becomes its anchor.
        let mut needs_anchor = self.graph.anchor(slot) == UNANCHORED;
        for (layer, neighbours) in plan.iter().enumerate() {
            for &n in neighbours {
                let claim = layer == 0 && needs_anchor;
                if self.add_reverse_link(n, slot, layer, claim, &mut scratch.links, guard) && claim
                {
                    needs_anchor = false;
                }
            }
        }
        if reverse_first {
            self.write_forward_lists(slot, &mut plan, promoting, entry_slot, &mut scratch.links);
        }
        if needs_anchor {
            self.force_anchor(slot, &plan[0], guard);
        }
        if relinking {
            self.reanchor(slot, &plan[0]);
        }
        if promoting {
            self.graph.set_entry(slot, level);
        }
    }

    /// Phase 1 of [`Index::connect`]: writes `slot`'s forward list on every
    /// layer of `plan` (layer 0 keeps the children it anchors and, when
    /// `promoting`, links the old entry point).
    fn write_forward_lists(
        &self,
        slot: u32,
        plan: &mut [Vec<u32>],
        promoting: bool,
        entry_slot: u32,
        links: &mut Vec<u32>,
    ) {
        if let Some(node) = self.graph.lock_node(slot) {
            for (layer, neighbours) in plan.iter_mut().enumerate() {
                if layer == 0 {
                    // Children anchored here must stay; a promoted node also
                    // links the old entry point, which it adopts below.
                    let mut list = self.anchored_children(&node, links);
                    if promoting && !list.contains(&entry_slot) {
                        list.push(entry_slot);
                    }
                    let room = self.graph.max_degree(0).saturating_sub(list.len());
                    list.extend(
                        neighbours
                            .iter()
                            .copied()
                            .filter(|n| !list.contains(n))
                            .take(room)
                            .collect::<Vec<_>>(),
                    );
                    *neighbours = list;
                }
                self.graph.write_links(&node, layer, neighbours);
            }
        }
    }

    /// Searches every layer the node shares with the graph and selects its
    /// neighbours, at most `layer0_max` on layer 0 and M above; `plan[layer]`
    /// is the forward list for `layer`.
    ///
    /// A `relinking` node (an update) also searches layer 1 with a full beam
    /// even when its own level is 0, and offers what it finds there to the
    /// layer-0 heuristic beside the layer-0 candidates. Why: the layer-0
    /// beam of `ef_construction` around a node's new position finds only its
    /// own neighbourhood once the graph is dense, so a moved node would get
    /// no long links; a fresh build gets them from its early inserts, made
    /// while the graph was sparse, and keeps them because the heuristic
    /// favours diverse directions. Layer 1 is that sparse graph. Without
    /// this, updates that move entries between clusters eroded the layer-0
    /// links between clusters: on 100k x 128 clustered data (256 clusters),
    /// 0.8-1.0% of entries were no longer found by their own vector after
    /// 100k updates (fresh build: 0.1%), almost all because the layer-0 beam
    /// could not leave the wrong cluster the descent had ended in; with the
    /// layer-1 candidates, 0.19% (BENCHMARKS.md, seventh session).
    #[allow(clippy::too_many_arguments)]
    fn plan_links(
        &self,
        slot: u32,
        query: &[f32],
        entry_slot: u32,
        (max_level, level): (usize, usize),
        layer0_max: usize,
        relinking: bool,
        scratch: &mut Scratch,
        guard: &Guard,
    ) -> Vec<Vec<u32>> {
        let top = level.min(max_level);
        let mut plan = vec![Vec::new(); level + 1];
        let Some(start) = self.score(query, entry_slot, guard) else {
            return plan;
        };
        let long_range = relinking && max_level >= 1;
        // The layer searched first: `top`, or layer 1 for a relinked
        // level-0 node (see above).
        let first = if long_range { top.max(1) } else { top };
        let start = self.greedy_descent(query, start, max_level, first, scratch, guard);
        let mut entries = vec![start];
        let mut layer1_found: Vec<Scored> = Vec::new();
        for layer in (0..=first).rev() {
            self.search_layer(
                query,
                &entries,
                layer,
                self.params.ef_construction,
                scratch,
                guard,
                // Removed nodes may be linked: they keep their vectors and
                // bridge the graph until their slot is reused (relinked).
                |s, _: &_| s != slot,
                &mut Budget::unlimited(),
            );
            let mut found: Vec<Scored> = scratch.beam.results().collect();
            if layer == 1 && long_range {
                layer1_found = found.clone();
            }
            if layer == 0 && !layer1_found.is_empty() {
                found.extend(layer1_found.iter().copied());
                // Ties broken by slot, so a slot found on both layers (same
                // cell, same distance) ends up adjacent and is kept once.
                found.sort_unstable_by(|a, b| a.cmp(b).then(a.slot.cmp(&b.slot)));
                found.dedup_by_key(|s| s.slot);
            }
            // Layers above `top` are searched for their candidates only.
            if layer <= top {
                let candidates = self.with_vectors(&found, guard);
                // hnswlib selects M forward links on every layer (M0 = 2M is
                // room for reverse links on layer 0).
                let max = if layer == 0 {
                    layer0_max
                } else {
                    self.params.m
                };
                plan[layer] = self.select_neighbours(Vec::new(), &candidates, max, Pruned::Drop);
            }
            if !found.is_empty() {
                entries = found;
            }
        }
        plan
    }

    fn with_vectors<'g>(&'g self, scored: &[Scored], guard: &'g Guard) -> Vec<Candidate<'g>> {
        scored
            .iter()
            .filter_map(|s| {
                let v = self.graph.vector(s.slot, guard)?;
                Some(Candidate {
                    dist: s.dist,
                    slot: s.slot,
                    vector: v.vector,
                })
            })
            .collect()
    }

    /// The HNSW heuristic (Malkov & Yashunin, Alg. 4; hnswlib's
    /// `getNeighborsByHeuristic2`): walk candidates nearest first and keep one
    /// only if it is closer to the base than to every neighbour kept so far.
    /// This spreads links over directions instead of one dense cluster.
    /// `kept` starts with the entries that must stay (anchored children);
    /// `candidates` must be sorted by distance to the base. With
    /// [`Pruned::Refill`], room the heuristic leaves is filled with the
    /// nearest candidates it pruned (the paper's `keepPrunedConnections`).
    fn select_neighbours<'g>(
        &self,
        mut kept: Vec<Candidate<'g>>,
        candidates: &[Candidate<'g>],
        max: usize,
        pruned: Pruned,
    ) -> Vec<u32> {
        if kept.len() + candidates.len() <= max {
            return kept.iter().chain(candidates).map(|c| c.slot).collect();
        }
        let mut dropped = Vec::new();
        for candidate in candidates {
            if kept.len() >= max {
                break;
            }
            let diverse = kept
                .iter()
                .all(|k| self.dist(candidate.vector, k.vector) >= candidate.dist);
            if diverse {
                kept.push(Candidate { ..*candidate });
            } else if pruned == Pruned::Refill {
                dropped.push(candidate.slot);
            }
        }
        let room = max.saturating_sub(kept.len());
        kept.iter()
            .map(|c| c.slot)
            .chain(dropped.into_iter().take(room))
            .collect()
    }

    /// Adds `new` to `neighbour`'s list on `layer`, shrinking the list by the
    /// heuristic if it is full. With `claim`, `neighbour` also becomes `new`'s
    /// anchor if `new` made it into the list and `neighbour` anchors fewer
    /// than [`Self::max_anchored`] nodes; the anchor is set while the lock is
    /// held, so no pruner of that list can miss the protection. Returns
    /// whether the claim succeeded.
    pub(crate) fn add_reverse_link(
        &self,
        neighbour: u32,
        new: u32,
        layer: usize,
        claim: bool,
        list: &mut Vec<u32>,
        guard: &Guard,
    ) -> bool {
        let Some(node) = self.graph.lock_node(neighbour) else {
            return false;
        };
        self.graph.read_links_locked(&node, layer, list);
        let linked = if list.contains(&new) {
            true
        } else if list.len() < self.graph.max_degree(layer) {
            list.push(new);
            self.graph.write_links(&node, layer, list);
            true
        } else {
            list.push(new);
            let selected = self.reselect(
                neighbour,
                list,
                self.graph.max_degree(layer),
                layer,
                Pruned::Drop,
                guard,
            );
            self.graph.write_links(&node, layer, &selected);
            *list = selected;
            list.contains(&new)
        };
        // Only a node that is itself anchored (or the root) may anchor: a
        // reachable-but-unanchored fresh node could otherwise end up anchored
        // below its own child, a cycle cut off from the root.
        let claimed = linked
            && claim
            && self.graph.anchor(neighbour) != UNANCHORED
            && self.anchored_count(neighbour, list) < self.max_anchored();
        if claimed {
            self.graph.set_anchor(new, neighbour);
        }
        claimed
    }

    /// Re-selects `base`'s neighbours from `ids` by the heuristic, keeping
    /// every node `base` anchors (on layer 0).
    pub(crate) fn reselect(
        &self,
        base: u32,
        ids: &[u32],
        max: usize,
        layer: usize,
        pruned: Pruned,
        guard: &Guard,
    ) -> Vec<u32> {
        let Some(base_vector) = self.graph.vector(base, guard) else {
            return ids.iter().copied().take(max).collect();
        };
        let mut unique = ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let mut scored: Vec<Scored> = unique
            .into_iter()
            .filter(|&id| id != base)
            .filter_map(|id| self.score(base_vector.vector, id, guard))
            .collect();
        scored.sort_unstable();
        let (protected, free): (Vec<Scored>, Vec<Scored>) = scored
            .into_iter()
            .partition(|s| layer == 0 && self.graph.anchor(s.slot) == base);
        let kept = self.with_vectors(&protected, guard);
        let candidates = self.with_vectors(&free, guard);
        self.select_neighbours(kept, &candidates, max, pruned)
    }
}
