//! Graph search: greedy descent through the upper layers, then a beam search
//! of width `ef` on layer 0; plus the filtered and exact-scan paths.
//!
//! ```text
//!   layer L  ep ──► greedy (ef = 1) ──┐
//!   ...                               ▼
//!   layer 1              greedy ──► nearest on layer 1
//!   layer 0                          beam search, width max(ef, k) ──► top k
//! ```
//!
//! The search holds no lock and writes no shared memory: each neighbour list
//! is copied optimistically (`Graph::read_links`) and each vector is an
//! immutable cell read under the query's epoch pin. Removed entries
//! (tombstones) are traversed, so they keep the graph navigable, but never
//! returned.
//!
//! The beam loop batches each expansion: it first collects the unvisited
//! neighbours and prefetches their vectors, then computes the distances, so
//! the memory loads of one expansion overlap instead of queueing one by one.

use crossbeam_epoch::Guard;

use crate::distance::DistanceVisitor;
use crate::error::Result;
use crate::graph::{LinksView, SearchView, VectorRef, NO_CELL};
use crate::index::{Hit, Index};
use crate::scratch::{Scored, Scratch, Visited};
use crate::sync::Ordering;

/// What one search cost (see [`Index::search_with_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SearchStats {
    /// Distances computed: the entry point, the greedy descent through the
    /// upper layers, the layer-0 beam (and, after a fallback, one per live
    /// entry; a seed rescored because its slot changed mid-search is not
    /// counted).
    pub distances: usize,
    /// Whether the graph search came up short and an exact scan answered.
    pub exact_scan: bool,
}

/// A cap on distance computations for one layer search.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) limit: usize,
    pub(crate) spent: usize,
}

impl Budget {
    pub(crate) fn unlimited() -> Self {
        Self {
            limit: usize::MAX,
            spent: 0,
        }
    }
    pub(crate) fn exhausted(&self) -> bool {
        self.spent > self.limit
    }
}

impl Index {
    /// Distance from the query to `v`.
    #[inline]
    pub(crate) fn dist(&self, query: &[f32], v: &[f32]) -> f32 {
        self.distance.eval(query, v)
    }

    /// Scores `slot` against `query`, if the slot holds a vector.
    #[inline]
    pub(crate) fn score(&self, query: &[f32], slot: u32, guard: &Guard) -> Option<Scored> {
        let v = self.graph.vector(slot, guard)?;
        Some(Scored {
            dist: self.dist(query, v.vector),
            slot,
            cell: v.cell,
        })
    }

    /// Greedy descent from `start` through layers `from` down to `to + 1`.
    pub(crate) fn greedy_descent(
        &self,
        query: &[f32],
        current: Scored,
        from: usize,
        to: usize,
        scratch: &mut Scratch,
        guard: &Guard,
    ) -> Scored {
        scratch
            .visited
            .reset(self.next_slot.load(Ordering::Acquire));
        self.distance.dispatch(GreedyDescent {
            index: self,
            query,
            current,
            layers: (to + 1, from),
            scratch,
            guard,
        })
    }

    /// [`Index::greedy_descent`]'s loop, with the distance inlined. Like the
    /// beam loop it reads each list optimistically, collecting the cell
    /// words and prefetching the vectors before scoring them.
    ///
    /// Nodes scored once are skipped afterwards, on every layer: a scored
    /// node either became `current` or lost to it, and `current` only gets
    /// nearer, so scoring it again could never move the descent. Skipping
    /// leaves the result exactly as without the visited set, and saves the
    /// many repeats between neighbouring lists (hnswlib rescores them).
    #[inline(always)]
    fn greedy_descent_with(
        &self,
        query: &[f32],
        mut current: Scored,
        (lowest, highest): (usize, usize),
        scratch: &mut Scratch,
        guard: &Guard,
        distance: impl Fn(&[f32], &[f32]) -> f32,
    ) -> Scored {
        let Scratch {
            visited,
            fresh,
            descent_distances,
            ..
        } = scratch;
        *descent_distances = 0;
        let view = self.graph.search_view(guard);
        visited.insert(current.slot);
        for layer in (lowest..=highest).rev() {
            while let Some(list) = self.graph.links_view(current.slot, layer) {
                let _degree = collect_unvisited(list, &view, visited, fresh);
                // Model L5 (loom builds) checks that no search expands a node
                // whose layer-0 list is not written yet.
                #[cfg(loom)]
                if layer == 0 && _degree == 0 {
                    crate::model_hooks::note_empty_expansion();
                }
                let mut improved = false;
                for &(n, word) in fresh.iter() {
                    let Some(v) = view.vector_of_word(word) else {
                        continue;
                    };
                    let dist = distance(query, v.vector);
                    *descent_distances += 1;
                    if dist < current.dist {
                        current = Scored {
                            dist,
                            slot: n,
                            cell: v.cell,
                        };
                        improved = true;
                    }
                }
                if !improved {
                    break;
                }
            }
        }
        current
    }

    /// Beam search of width `ef` on `layer` from `entries`. Accepted nodes end
    /// in `scratch.beam` (nearest first); every reachable node, accepted
    /// or not, is traversed. Returns `false` if the budget ran out first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn search_layer(
        &self,
        query: &[f32],
        entries: &[Scored],
        layer: usize,
        ef: usize,
        scratch: &mut Scratch,
        guard: &Guard,
        accept: impl FnMut(u32, &VectorRef<'_>) -> bool,
        budget: &mut Budget,
    ) -> bool {
        self.distance.dispatch(LayerSearch {
            index: self,
            query,
            entries,
            layer,
            ef,
            scratch,
            guard,
            accept,
            budget,
        })
    }

    /// [`Index::search_layer`]'s loop, with the distance inlined.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn search_layer_with(
        &self,
        query: &[f32],
        entries: &[Scored],
        layer: usize,
        ef: usize,
        scratch: &mut Scratch,
        guard: &Guard,
        mut accept: impl FnMut(u32, &VectorRef<'_>) -> bool,
        budget: &mut Budget,
        distance: impl Fn(&[f32], &[f32]) -> f32,
    ) -> bool {
        let slots = self.next_slot.load(Ordering::Acquire);
        let Scratch {
            visited,
            beam,
            fresh,
            ..
        } = scratch;
        visited.reset(slots);
        // No beam wider than the slots the search can meet: a wider one
        // never fills, so the results are the same, and a caller's
        // `usize::MAX` ("everything") neither overflows nor allocates.
        beam.reset(ef.min(slots.max(1)));
        let view = self.graph.search_view(guard);

        for &entry in entries {
            if !visited.insert(entry.slot) {
                continue;
            }
            let Some(v) = self.graph.vector(entry.slot, guard) else {
                continue;
            };
            // The entry was scored earlier (greedy descent, entry point);
            // if the slot has been updated or reused since, score what it
            // holds now, so the distance, the cell (hence the key) and the
            // removal check all describe one and the same vector. The seeded
            // mutant `seed_not_rescored` (loom builds) keeps the old score:
            // model L7 must catch the removed key it then returns.
            let entry = if v.cell == entry.cell || crate::sync::mutant("seed_not_rescored") {
                entry
            } else {
                Scored {
                    dist: self.dist(query, v.vector),
                    slot: entry.slot,
                    cell: v.cell,
                }
            };
            beam.push(entry, accept(entry.slot, &v));
        }

        while let Some(current) = beam.pop_nearest() {
            // Collect unvisited neighbours and start fetching their
            // vectors, then score them: the loads overlap.
            let Some(list) = self.graph.links_view(current.slot, layer) else {
                continue;
            };
            let _degree = collect_unvisited(list, &view, visited, fresh);
            // Model L5 (loom builds) checks that no search expands a node
            // whose layer-0 list is not written yet.
            #[cfg(loom)]
            if layer == 0 && _degree == 0 {
                crate::model_hooks::note_empty_expansion();
            }
            for &(n, word) in fresh.iter() {
                let Some(v) = view.vector_of_word(word) else {
                    continue;
                };
                budget.spent += 1;
                let dist = distance(query, v.vector);
                if beam.admits(dist) {
                    let scored = Scored {
                        dist,
                        slot: n,
                        cell: v.cell,
                    };
                    beam.push(scored, accept(n, &v));
                }
            }
            if layer == 0 {
                // The next expansion reads the best candidate's list: start
                // fetching it now (hnswlib does the same).
                if let Some(next) = beam.peek_nearest() {
                    self.graph.prefetch_links(next.slot);
                }
            }
            if budget.exhausted() {
                return false;
            }
        }
        true
    }

    /// Descends to layer 0 and returns its seeds: the greedy descent's result,
    /// plus the entry point itself. The graph is directed, so only the entry
    /// point is known to reach every node (the anchor tree guarantees it);
    /// seeding it too makes a search with `ef >= len()` exact. With a small
    /// `ef` the entry point is usually far and never expanded, so it costs one
    /// distance computation.
    pub(crate) fn layer0_seeds(
        &self,
        query: &[f32],
        scratch: &mut Scratch,
        guard: &Guard,
    ) -> Option<[Scored; 2]> {
        let (entry, max_level) = self.graph.entry()?;
        let start = self.score(query, entry, guard)?;
        Some([
            self.greedy_descent(query, start, max_level, 0, scratch, guard),
            start,
        ])
    }

    /// Turns `scratch.beam`'s results into the `k` best hits, nearest first.
    fn take_hits(&self, scratch: &mut Scratch, k: usize) -> Vec<Hit> {
        let best: Vec<Scored> = scratch.beam.results().take(k).collect();
        self.to_hits(&best)
    }

    fn to_hits(&self, best: &[Scored]) -> Vec<Hit> {
        best.iter()
            .map(|s| Hit {
                key: self.graph.vectors.key(s.cell),
                distance: s.dist,
            })
            .collect()
    }

    /// The `k` nearest live entries to `query`, nearest first, searching
    /// layer 0 with a beam of `max(ef, k)`.
    ///
    /// `ef` trades speed for recall per call; it is never stored on the index.
    /// If the graph yields fewer than `k` live entries while the index holds
    /// at least `k` (possible after heavy removal), the search falls back to an
    /// exact scan, so a query always returns `min(k, len)` hits.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(1, Metric::L2))?;
    /// for key in 0..100u64 {
    ///     index.insert(key, &[key as f32])?;
    /// }
    /// let hits = index.search(&[41.6], 3, 32)?;
    /// let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
    /// assert_eq!(keys, vec![42, 41, 43]);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Result<Vec<Hit>> {
        self.search_with_stats(query, k, ef).map(|(hits, _)| hits)
    }

    /// [`search`](Self::search), also reporting what the search cost: the
    /// distances it computed (a machine-independent measure, for comparing
    /// recall at equal work, e.g. between two graphs over the same vectors)
    /// and whether it fell back to an exact scan. Nothing is shared between
    /// searches: the counts are the caller's alone.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(1, Metric::L2))?;
    /// for key in 0..1000u64 {
    ///     index.insert(key, &[key as f32])?;
    /// }
    /// let (hits, stats) = index.search_with_stats(&[500.2], 5, 32)?;
    /// assert_eq!(hits[0].key, 500);
    /// assert!(stats.distances >= 32 && stats.distances < 1000);
    /// assert!(!stats.exact_scan);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn search_with_stats(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Result<(Vec<Hit>, SearchStats)> {
        let mut scratch = self.take_scratch();
        let mut buffer = std::mem::take(&mut scratch.query);
        let mut stats = SearchStats::default();
        let outcome = self.prepare_query(query, &mut buffer).map(|prepared| {
            if k == 0 {
                return Vec::new();
            }
            let guard = self.pin();
            let Some(seeds) = self.layer0_seeds(prepared, &mut scratch, &guard) else {
                return Vec::new();
            };
            let mut budget = Budget::unlimited();
            self.search_layer(
                prepared,
                &seeds,
                0,
                ef.max(k),
                &mut scratch,
                &guard,
                |_, v: &VectorRef<'_>| !v.tombstoned,
                &mut budget,
            );
            // The entry point, the descent, the layer-0 beam.
            stats.distances = 1 + scratch.descent_distances + budget.spent;
            let hits = self.take_hits(&mut scratch, k);
            if hits.len() < k && hits.len() < self.len() {
                stats.exact_scan = true;
                stats.distances += self.len();
                return self.exact_scan(prepared, k, &|_| true, &guard);
            }
            hits
        });
        scratch.query = buffer;
        outcome.map(|hits| (hits, stats))
    }

    /// The `k` nearest live entries whose key passes `filter`.
    ///
    /// The filter runs during graph traversal (rejected entries are still
    /// traversed). When it is so selective that the graph search would return
    /// fewer than `k` hits or cost more than scanning, the search switches to
    /// an exact scan: it samples the filter on a few entries to estimate its
    /// selectivity up front, and it caps the graph search at the cost of a
    /// scan, finishing with a scan if the cap or a short result is hit.
    ///
    /// The filter is called without any index lock held, so a panicking
    /// filter leaves the index consistent.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(1, Metric::L2))?;
    /// for key in 0..1000u64 {
    ///     index.insert(key, &[key as f32])?;
    /// }
    /// let hits = index.search_filtered(&[500.2], 2, 32, |key| key % 100 == 7)?;
    /// let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
    /// assert_eq!(keys, vec![507, 407]);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn search_filtered<F>(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: F,
    ) -> Result<Vec<Hit>>
    where
        F: Fn(u64) -> bool,
    {
        let prepared = self.prepare(query)?;
        let live = self.len();
        if k == 0 || live == 0 {
            return Ok(Vec::new());
        }
        let guard = self.pin();
        let slots = self.next_slot.load(Ordering::Acquire);
        let ef = ef.max(k);

        // Cost model, in distance computations: a filtered beam search needs
        // roughly (distances per unfiltered search) / selectivity; an exact
        // scan needs one per live entry. ~16 distances per unit of ef is what
        // layer-0 searches with M0 = 32 measure on the benchmark sets.
        let selectivity = self.sample_selectivity(&filter, slots, &guard);
        let graph_cost = 16.0 * ef as f64 / selectivity.max(1e-6);
        if graph_cost >= live as f64 || selectivity * (live as f64) < k as f64 {
            return Ok(self.exact_scan(&prepared, k, &filter, &guard));
        }

        let mut scratch = self.take_scratch();
        let Some(seeds) = self.layer0_seeds(&prepared, &mut scratch, &guard) else {
            return Ok(Vec::new());
        };
        let mut budget = Budget {
            limit: live,
            spent: 0,
        };
        let completed = self.search_layer(
            &prepared,
            &seeds,
            0,
            ef,
            &mut scratch,
            &guard,
            |_, v: &VectorRef<'_>| !v.tombstoned && filter(self.graph.vectors.key(v.cell)),
            &mut budget,
        );
        let hits = self.take_hits(&mut scratch, k);
        if !completed || hits.len() < k {
            return Ok(self.exact_scan(&prepared, k, &filter, &guard));
        }
        Ok(hits)
    }

    /// Fraction of live sampled entries that pass `filter` (64 evenly spaced slots).
    fn sample_selectivity(&self, filter: &dyn Fn(u64) -> bool, slots: usize, guard: &Guard) -> f64 {
        const SAMPLES: usize = 64;
        if slots == 0 {
            return 0.0;
        }
        let step = (slots / SAMPLES).max(1);
        let (mut live, mut passed) = (0usize, 0usize);
        for slot in (0..slots).step_by(step).take(SAMPLES) {
            if let Some(v) = self.graph.vector(slot as u32, guard) {
                if !v.tombstoned {
                    live += 1;
                    passed += usize::from(filter(self.graph.vectors.key(v.cell)));
                }
            }
        }
        if live == 0 {
            return 1.0;
        }
        // Half a pass for an all-miss sample: "rarer than 1 in 64", not "never".
        (passed as f64).max(0.5) / live as f64
    }

    /// Exact top-k over every live entry passing `filter`, counted as a
    /// fallback in [`Stats::exact_scans`](crate::Stats::exact_scans).
    pub(crate) fn exact_scan(
        &self,
        query: &[f32],
        k: usize,
        filter: &dyn Fn(u64) -> bool,
        guard: &Guard,
    ) -> Vec<Hit> {
        // Relaxed: a statistic. Written only on this (rare, O(n)) fallback
        // path, so the graph search path stays free of shared writes.
        self.exact_scans.fetch_add(1, Ordering::Relaxed);
        self.scan(query, k, filter, guard)
    }

    /// Exact top-k over every live entry passing `filter` (no accounting).
    fn scan(
        &self,
        query: &[f32],
        k: usize,
        filter: &dyn Fn(u64) -> bool,
        guard: &Guard,
    ) -> Vec<Hit> {
        let slots = self.next_slot.load(Ordering::Acquire);
        // At most one entry per slot is kept (plus the one pushed before the
        // farthest is popped), whatever `k` the caller asks.
        let mut best = std::collections::BinaryHeap::<Scored>::with_capacity(k.min(slots) + 1);
        for slot in 0..slots as u32 {
            let Some(v) = self.graph.vector(slot, guard) else {
                continue;
            };
            if v.tombstoned {
                continue;
            }
            let dist = self.dist(query, v.vector);
            if best.len() >= k && best.peek().is_some_and(|worst| dist >= worst.dist) {
                continue;
            }
            if !filter(self.graph.vectors.key(v.cell)) {
                continue;
            }
            best.push(Scored {
                dist,
                slot,
                cell: v.cell,
            });
            if best.len() > k {
                best.pop();
            }
        }
        self.to_hits(&best.into_sorted_vec())
    }

    /// Exact top-k by brute force over all live entries (a reference for
    /// recall measurements; O(n) per query).
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(1, Metric::L2))?;
    /// for key in 0..10u64 {
    ///     index.insert(key, &[key as f32])?;
    /// }
    /// assert_eq!(index.search_exact(&[3.2], 1)?[0].key, 3);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn search_exact(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let prepared = self.prepare(query)?;
        let guard = self.pin();
        Ok(self.scan(&prepared, k, &|_| true, &guard))
    }

    /// Runs [`search`](Self::search) for every query on `threads` threads
    /// (0 = all cores). Results are in query order.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(1, Metric::L2))?;
    /// for key in 0..100u64 {
    ///     index.insert(key, &[key as f32])?;
    /// }
    /// let queries = vec![vec![1.1f32], vec![50.9]];
    /// let results = index.search_batch(&queries, 1, 16, 2);
    /// assert_eq!(results[0].as_ref().unwrap()[0].key, 1);
    /// assert_eq!(results[1].as_ref().unwrap()[0].key, 51);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn search_batch<Q>(
        &self,
        queries: &[Q],
        k: usize,
        ef: usize,
        threads: usize,
    ) -> Vec<Result<Vec<Hit>>>
    where
        Q: AsRef<[f32]> + Sync,
    {
        crate::parallel::map_indexed(queries.len(), threads, |i| {
            self.search(queries[i].as_ref(), k, ef)
        })
    }
}

/// Copies the ids of `list` not yet in `visited` into `fresh`, with their
/// cell words, marking them visited and starting to fetch their vectors.
/// The ids are read straight from the list under an optimistic read; a
/// torn read is rolled back (un-visited) and retried.
#[inline(always)]
/// Returns the list's length (as validated).
fn collect_unvisited(
    list: LinksView<'_>,
    view: &SearchView<'_>,
    visited: &mut Visited,
    fresh: &mut Vec<(u32, u32)>,
) -> usize {
    loop {
        let version = list.begin();
        fresh.clear();
        for i in 0..list.len() {
            let n = list.id(i);
            // An id past the slots `visited` was sized for is a node inserted
            // since the search began (rare), or a word no slot owns: only a
            // slot that exists may grow `visited`, so a bad id costs a skip,
            // not an allocation of its size.
            if !visited.covers(n) && view.cell_word(n) == NO_CELL {
                continue;
            }
            if visited.insert(n) {
                let word = view.cell_word(n);
                view.prefetch(word);
                fresh.push((n, word));
            }
        }
        if list.validate(version) {
            return list.len();
        }
        for &(n, _) in fresh.iter() {
            visited.unmark(n);
        }
    }
}

/// The arguments of one [`Index::search_layer`], carried into
/// [`Distance::dispatch`](crate::distance::Distance::dispatch).
struct LayerSearch<'a, 'g, A> {
    index: &'a Index,
    query: &'a [f32],
    entries: &'a [Scored],
    layer: usize,
    ef: usize,
    scratch: &'a mut Scratch,
    guard: &'g Guard,
    accept: A,
    budget: &'a mut Budget,
}

impl<A: FnMut(u32, &VectorRef<'_>) -> bool> DistanceVisitor for LayerSearch<'_, '_, A> {
    type Output = bool;
    #[inline(always)]
    fn visit<D: Fn(&[f32], &[f32]) -> f32>(self, distance: D) -> bool {
        self.index.search_layer_with(
            self.query,
            self.entries,
            self.layer,
            self.ef,
            self.scratch,
            self.guard,
            self.accept,
            self.budget,
            distance,
        )
    }
}

/// The arguments of one [`Index::greedy_descent`].
struct GreedyDescent<'a, 'g> {
    index: &'a Index,
    query: &'a [f32],
    current: Scored,
    /// (lowest, highest) layer to descend through.
    layers: (usize, usize),
    scratch: &'a mut Scratch,
    guard: &'g Guard,
}

impl DistanceVisitor for GreedyDescent<'_, '_> {
    type Output = Scored;
    #[inline(always)]
    fn visit<D: Fn(&[f32], &[f32]) -> f32>(self, distance: D) -> Scored {
        self.index.greedy_descent_with(
            self.query,
            self.current,
            self.layers,
            self.scratch,
            self.guard,
            distance,
        )
    }
}
