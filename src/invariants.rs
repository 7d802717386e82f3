//! `check_invariants`: the structural checks every test (and a cautious
//! service) can run, in release builds too. It is not a `debug_assert!`:
//! hnswlib's `checkIntegrity` vanishes under `NDEBUG`.
//!
//! | id | invariant |
//! |----|-----------|
//! | I1 | every neighbour id is an allocated slot |
//! | I2 | no node links to itself |
//! | I3 | no list holds an id twice |
//! | I4 | degree <= M on layers >= 1, <= M0 = 2M on layer 0 |
//! | I5 | a node appears in layer-l lists only if its level >= l |
//! | I6 | the entry point exists when any node does, and sits at the max level |
//! | I7 | the key map is a bijection onto the live slots (each key's slot holds that key) |
//! | I8 | removed slots are not in the key map (part of I7's check) |
//! | I9 | every live node is reachable from the entry point on layer 0 |
//! | I12 | the entry point is the anchor tree's root; every other node's anchor links it on layer 0 |
//!
//! (I10, "in-degree >= 1", is implied by I9 for every node but the entry.)
//!
//! I11, "every stored vector is finite", is a check of its own,
//! [`Index::check_vectors`]: it is about the data, not the graph. `insert`
//! and `update` reject non-finite values, so an index built in memory always
//! passes it; for a file it is a content check like the section checksums,
//! and it is the one invariant that reads every vector, most of a file's
//! bytes, so [`Index::open`] leaves it (and the checksums) to the caller
//! while `open_untrusted` / `from_bytes` run both. A non-finite stored
//! vector cannot make a search unsafe, panic or loop (each node is scored at
//! most once per search, every index stays in bounds, and results are
//! sorted with `total_cmp`): its distances are NaN, so it only ranks that
//! entry wrongly and may come back with a NaN distance.
//!
//! I9 is proved through I12 rather than searched for: if every node's
//! anchor links it and anchors lead from every node to the entry point
//! without a cycle, every node is reachable. That reads one list per node
//! instead of every list in BFS order, which matters when the check runs on
//! a freshly mapped file (`Index::open`). A breadth-first search runs only
//! when an anchor is broken, to report an unreachable node as such.

use crate::error::InvariantViolation;
use crate::graph::{NO_CELL, ROOT, TOMBSTONE, UNANCHORED};
use crate::index::Index;
use crate::sync::Ordering;

/// Whether [`Index::check_invariants_with`] looks every key up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(loom, allow(dead_code))]
pub(crate) enum KeyLookups {
    Verify,
    /// The key map was just filled from exactly the live slots, a key seen
    /// twice rejected (see `persist::load`): the mapped slots are the live
    /// ones and each key looks up to its slot by construction, so only the
    /// counts are compared.
    TrustFreshMap,
}

/// Per-slot facts the invariant passes need, over a slot range (a piece)
/// or a whole index: pass 1 gathers them from the graph; a validated open
/// gathers them from the file's arrays in its structure pass (see
/// `persist::check_structure`), checking each layer-0 list there too while
/// its record is in cache, so the invariant check need not read every
/// record again.
pub(crate) struct SlotSummary {
    /// Bit `i` for slot `start + i` (pieces start at multiples of 64, so
    /// they join by concatenation).
    allocated: Vec<u64>,
    levels: Vec<u8>,
    /// Bit `i` for a live slot `start + i`.
    live: Vec<u64>,
    live_count: usize,
    max_level: Option<usize>,
    /// Bit `i`: slot `start + i`'s layer-0 list passed [`sorted_list_ok`]
    /// (I1-I3 hold for it once every slot is known to be allocated). All
    /// zero when the lists were not looked at.
    layer0_checked: Vec<u64>,
    /// Every upper-layer list passed [`sorted_upper_list_ok`] (so I1-I5
    /// hold for all of them once every slot is known to be allocated).
    upper_checked: bool,
}

impl SlotSummary {
    /// Nothing recorded yet, for `len` slots.
    pub(crate) fn new(len: usize) -> Self {
        let words = len.div_ceil(64);
        Self {
            allocated: vec![0; words],
            levels: vec![0; len],
            live: vec![0; words],
            live_count: 0,
            max_level: None,
            layer0_checked: vec![0; words],
            upper_checked: false,
        }
    }

    /// Records slot `start + i`, published with cell word `word` (not
    /// `NO_CELL`) at `level`.
    #[inline]
    pub(crate) fn note(&mut self, i: usize, word: u32, level: usize) {
        self.allocated[i / 64] |= 1 << (i % 64);
        self.levels[i] = level as u8;
        self.max_level = Some(self.max_level.map_or(level, |m| m.max(level)));
        if word & TOMBSTONE == 0 {
            self.live[i / 64] |= 1 << (i % 64);
            self.live_count += 1;
        }
    }

    /// Records that slot `start + i`'s layer-0 list passed [`sorted_list_ok`].
    #[inline]
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn note_layer0_checked(&mut self, i: usize) {
        self.layer0_checked[i / 64] |= 1 << (i % 64);
    }

    /// Records that every upper-layer list passed [`sorted_upper_list_ok`].
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn note_upper_checked(&mut self) {
        self.upper_checked = true;
    }

    /// The level recorded for slot `start + i` (0 if none was).
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn level(&self, i: usize) -> usize {
        self.levels.get(i).map_or(0, |&l| l as usize)
    }

    /// Live slots recorded.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn live_count(&self) -> usize {
        self.live_count
    }

    /// Whether any slot was recorded.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn any_allocated(&self) -> bool {
        self.allocated.iter().any(|&w| w != 0)
    }

    /// The pieces of consecutive ranges, in slot order, as one summary.
    pub(crate) fn join(pieces: impl IntoIterator<Item = Self>, n: usize) -> Self {
        let mut all = Self {
            allocated: Vec::with_capacity(n.div_ceil(64)),
            levels: Vec::with_capacity(n),
            live: Vec::with_capacity(n.div_ceil(64)),
            live_count: 0,
            max_level: None,
            layer0_checked: Vec::with_capacity(n.div_ceil(64)),
            upper_checked: false,
        };
        for piece in pieces {
            all.allocated.extend_from_slice(&piece.allocated);
            all.levels.extend_from_slice(&piece.levels);
            all.live.extend_from_slice(&piece.live);
            all.live_count += piece.live_count;
            all.max_level = all.max_level.max(piece.max_level);
            all.layer0_checked.extend_from_slice(&piece.layer0_checked);
        }
        all
    }
}

/// The fast test of `slot`'s list `ids` on upper layer `layer`, for an index
/// whose `slots` slots are all allocated, at `level_of` each: as
/// [`sorted_list_ok`], and every id at a level of at least `layer` (I5).
#[inline]
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn sorted_upper_list_ok(
    ids: &[u32],
    slot: u32,
    slots: u32,
    layer: usize,
    level_of: impl Fn(u32) -> usize,
) -> bool {
    sorted_list_ok(ids, slot, slots) && ids.iter().all(|&n| level_of(n) >= layer)
}

/// The fast test of a layer-0 list `ids` of `slot`, for an index whose
/// `slots` slots are all allocated: every id in range and not `slot`, and
/// the ids strictly ascending (so no duplicate). `save` writes every list
/// sorted, so an opened file's lists pass with one comparison per id; the
/// folds have no early exit so they vectorise. A list that fails takes the
/// exact path of pass 2, which names the fault.
#[inline]
pub(crate) fn sorted_list_ok(ids: &[u32], slot: u32, slots: u32) -> bool {
    let in_range = ids
        .iter()
        .fold(true, |ok, &n| ok & (n < slots) & (n != slot));
    let tail = ids.get(1..).unwrap_or(&[]);
    let ascending = ids.iter().zip(tail).fold(true, |ok, (a, b)| ok & (a < b));
    in_range && ascending
}

/// Slots below which the check runs on the caller's thread alone: starting
/// threads costs more than a small index's whole check. Unit tests lower
/// it so their 300-node indexes take the parallel path.
#[cfg(not(test))]
const PARALLEL_FROM: usize = 1 << 17;
#[cfg(test)]
const PARALLEL_FROM: usize = 128;

/// Runs `f` over `0..n` split into contiguous ranges (bounds multiples of
/// 64), one per core, on scoped threads joined before returning; results
/// in range order. The check is a read-only pass over the whole index, and
/// on a freshly opened file it is most of `Index::open`'s time, so it uses
/// every core.
pub(crate) fn split_slots<R: Send>(
    n: usize,
    f: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    let workers = crate::parallel::pass_workers(n, PARALLEL_FROM);
    let per = n.div_ceil(workers.max(1)).next_multiple_of(64).max(64);
    let ranges: Vec<std::ops::Range<usize>> = (0..n.max(1))
        .step_by(per)
        .map(|start| start..(start + per).min(n))
        .collect();
    crate::parallel::run_workers(ranges.len(), |w| f(ranges[w].clone()))
}

impl Index {
    /// Checks the graph's structural invariants (see the table in the module
    /// docs), returning the first violation found.
    ///
    /// It waits for in-flight writes to finish and blocks new ones while it
    /// runs (searches continue), so it sees a quiescent graph even when
    /// called under concurrent writes. Cost: O(n * M), spread over every
    /// core for indexes of 2^17 slots or more (scoped threads, joined
    /// before it returns); a breadth-first search only to diagnose a broken
    /// anchor.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(3, Metric::L2))?;
    /// for key in 0..500u64 {
    ///     index.insert(key, &[key as f32, (key % 11) as f32, (key % 5) as f32])?;
    /// }
    /// for key in (0..500u64).step_by(3) {
    ///     index.remove(key)?;
    /// }
    /// index.check_invariants().expect("a fresh index is consistent");
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        self.check_invariants_with(KeyLookups::Verify, None)
    }

    /// I11: every stored vector is finite (see the module docs for why this
    /// is not part of [`Index::check_invariants`]). Returns the first
    /// offending slot. It reads every vector once, on every core for
    /// indexes of 2^17 slots or more; writers keep running (each vector is
    /// read whole, old or new, under the epoch guard).
    ///
    /// An index built in memory always passes (`insert` and `update` reject
    /// non-finite values); run it on an index opened with
    /// [`Index::open`] from a file you did not write, beside
    /// [`Index::verify_checksums`].
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(2, Metric::L2))?;
    /// index.insert(1, &[0.5, -2.0])?;
    /// index.check_vectors().expect("insert only takes finite values");
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn check_vectors(&self) -> Result<(), InvariantViolation> {
        let n = self.next_slot.load(Ordering::Acquire);
        split_slots(n, |range| {
            let guard = self.pin();
            for slot in range.start as u32..range.end as u32 {
                if let Some(v) = self.graph.vector(slot, &guard) {
                    // A fold without early exit vectorises.
                    if !v.vector.iter().fold(true, |ok, x| ok & x.is_finite()) {
                        return Err(InvariantViolation::NonFiniteVector { slot });
                    }
                }
            }
            Ok(())
        })
        .into_iter()
        .collect()
    }

    /// [`Index::check_invariants`], optionally trusting that every key in
    /// the key map looks up to its slot: true by construction for a map
    /// that `persist::load` has just filled from the slots (rejecting
    /// duplicates), and those n hash lookups would be most of an open's time.
    /// The set of mapped slots is checked either way.
    pub(crate) fn check_invariants_with(
        &self,
        lookups: KeyLookups,
        known: Option<SlotSummary>,
    ) -> Result<(), InvariantViolation> {
        let _quiescent = self.writer_gate.write();
        let slots = self.next_slot.load(Ordering::Acquire) as u32;
        let n = slots as usize;

        // Pass 1, per slot: allocated (a bitset: it stays cache-resident for
        // the random lookups of pass 2), level, live slots. Each worker
        // fills its own piece (ranges are multiples of 64 slots, so pieces
        // are whole bitset words); the pieces are joined in slot order.
        // Skipped when the caller gathered them already (a validated open).
        let summary = match known {
            Some(known) if known.levels.len() == n => known,
            _ => {
                let pieces = split_slots(n, |range| {
                    let mut piece = SlotSummary::new(range.len());
                    for slot in range.start as u32..range.end as u32 {
                        let word = self.graph.cell_word(slot);
                        if word == NO_CELL {
                            continue; // never published (e.g. an allocation that failed)
                        }
                        piece.note(slot as usize - range.start, word, self.graph.level(slot));
                    }
                    piece
                });
                SlotSummary::join(pieces, n)
            }
        };
        let SlotSummary {
            allocated,
            levels,
            live,
            live_count,
            max_level,
            layer0_checked,
            upper_checked,
        } = summary;
        let is_live = |s: u32| {
            live.get(s as usize / 64)
                .is_some_and(|w| w & (1 << (s % 64)) != 0)
        };
        let is_allocated = |s: u32| s < slots && allocated[s as usize / 64] & (1 << (s % 64)) != 0;

        // Pass 2, per list: I1-I5. Lists are read in place: the exclusive
        // writer gate keeps every writer out (and a search never writes), so
        // no entry lock is taken; taking one would write every lock word,
        // and on a mapped index that copies every page of the file.
        // I3: a strictly ascending list has no duplicate, and `save` writes
        // every list sorted, so an opened file pays one comparison per id.
        // Other lists (a live index's) mark their ids in a bitset and clear
        // them after: two cache-resident bit operations per id instead of a
        // sort per list. Workers take disjoint slot ranges, each with its
        // own marks.
        let all_allocated = allocated
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>()
            == n;
        let is_neighbour = |s: u32| {
            if all_allocated {
                s < slots
            } else {
                is_allocated(s)
            }
        };
        for outcome in split_slots(n, |range| {
            let mut marks = vec![0u64; n.div_ceil(64)];
            for slot in range.start as u32..range.end as u32 {
                if !is_allocated(slot) {
                    continue;
                }
                // A layer-0 list the caller checked already (a validated
                // open's structure pass), valid once every slot is allocated.
                let layer0_done = all_allocated
                    && layer0_checked
                        .get(slot as usize / 64)
                        .is_some_and(|w| w & (1 << (slot % 64)) != 0);
                let level = levels[slot as usize] as usize;
                // Upper lists the caller checked already, likewise.
                let top = if all_allocated && upper_checked {
                    0
                } else {
                    level
                };
                if layer0_done && top == 0 {
                    continue;
                }
                for layer in usize::from(layer0_done)..=top {
                    let Some((degree, ids)) = self.graph.list_quiescent(slot, layer) else {
                        continue;
                    };
                    let max = self.graph.max_degree(layer);
                    if degree > max {
                        return Err(InvariantViolation::DegreeTooHigh {
                            slot,
                            layer,
                            degree,
                            max,
                        });
                    }
                    let ids = &ids[..degree];
                    // Fast path for a sorted layer-0 list (I1-I3; I5 is
                    // moot on layer 0), over the ids read as plain integers:
                    // atomic loads do not vectorise. Anything else takes
                    // the exact loop below, which also names the fault.
                    if layer == 0 && all_allocated {
                        // SAFETY: `_quiescent` holds the writer gate
                        // exclusively, and every list write happens under it
                        // (shared), so nothing writes these ids while the
                        // view lives; searches only read them.
                        if let Some(plain) = unsafe { crate::sync::as_plain(ids) } {
                            if sorted_list_ok(plain, slot, slots) {
                                continue;
                            }
                        }
                    }
                    // Set once the list turns out not to be ascending: from
                    // then on every id is marked (the prefix, distinct since
                    // it ascended, first).
                    let mut marking = false;
                    let mut previous = None;
                    for (i, id) in ids.iter().enumerate() {
                        // Relaxed: ordered after every write by the writer gate.
                        let n = id.load(Ordering::Relaxed);
                        if !is_neighbour(n) {
                            return Err(InvariantViolation::NeighbourOutOfRange {
                                slot,
                                layer,
                                neighbour: n,
                                slots,
                            });
                        }
                        if n == slot {
                            return Err(InvariantViolation::SelfLoop { slot, layer });
                        }
                        // Layer 0 needs no level check: every level is >= 0.
                        if layer > 0 && (levels[n as usize] as usize) < layer {
                            return Err(InvariantViolation::AboveLevel {
                                slot: n,
                                level: levels[n as usize] as usize,
                                from: slot,
                                layer,
                            });
                        }
                        if !marking && previous.is_some_and(|p| p >= n) {
                            marking = true;
                            for earlier in &ids[..i] {
                                // Relaxed: as above (writers are out).
                                let e = earlier.load(Ordering::Relaxed);
                                marks[e as usize / 64] |= 1 << (e % 64);
                            }
                        }
                        if marking {
                            let (word, bit) = (n as usize / 64, 1u64 << (n % 64));
                            if marks[word] & bit != 0 {
                                // `marks` is dropped with the error, uncleared.
                                return Err(InvariantViolation::DuplicateNeighbour {
                                    slot,
                                    layer,
                                    neighbour: n,
                                });
                            }
                            marks[word] |= bit;
                        }
                        previous = Some(n);
                    }
                    if marking {
                        for id in ids {
                            // Relaxed: as above.
                            let n = id.load(Ordering::Relaxed);
                            marks[n as usize / 64] &= !(1u64 << (n % 64));
                        }
                    }
                }
            }
            Ok(())
        }) {
            outcome?;
        }

        // I6.
        let entry = self.graph.entry();
        match (entry, max_level) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(InvariantViolation::EntryPoint {
                    reason: "nodes exist but there is no entry point".into(),
                })
            }
            (Some((slot, level)), max) => {
                if !is_allocated(slot) {
                    return Err(InvariantViolation::EntryPoint {
                        reason: format!("entry slot {slot} is not an allocated node"),
                    });
                }
                let actual = levels[slot as usize] as usize;
                if actual != level || Some(level) != max {
                    return Err(InvariantViolation::EntryPoint {
                        reason: format!(
                            "entry slot {slot} recorded at level {level}, node level {actual}, max level {max:?}"
                        ),
                    });
                }
            }
        }

        // I7 / I8: the mapped slots are exactly the live ones, each once
        // (bitsets, no sort, no list of slots), and each key looks up to
        // its slot. A map filled from the live slots just now holds them by
        // construction (`KeyLookups::TrustFreshMap`): the counts suffice.
        if lookups == KeyLookups::TrustFreshMap {
            let mapped = self.key_map().len();
            if mapped != live_count || self.len() != live_count {
                return Err(InvariantViolation::KeyMap {
                    reason: format!(
                        "{mapped} mapped keys, len() {}, {live_count} live slots",
                        self.len()
                    ),
                });
            }
        } else {
            self.check_key_map(live_count, slots, &is_live)?;
        }

        // I12, which proves I9: every allocated node but the entry point has
        // an anchor whose layer-0 list holds it, and following anchors from
        // any node ends at the entry point (no cycle), so every node is
        // reachable from the entry point on layer 0. One read of one parent
        // list per node, instead of a BFS over every list.
        let entry_slot = entry.map(|(e, _)| e);
        let anchor_fault = |slot: u32| -> Option<String> {
            let anchor = self.graph.anchor(slot);
            let is_entry = entry_slot == Some(slot);
            match anchor {
                ROOT if is_entry => None,
                ROOT => Some("a root that is not the entry point".to_string()),
                UNANCHORED => Some("no anchor".to_string()),
                _ if is_entry => Some(format!("the entry point has anchor {anchor}")),
                parent if !is_allocated(parent) => {
                    Some(format!("anchor {parent} is not an allocated node"))
                }
                parent => {
                    let (degree, ids) = self.graph.list_quiescent(parent, 0)?;
                    // Relaxed: ordered by the writer gate.
                    (!ids[..degree.min(ids.len())]
                        .iter()
                        .any(|id| id.load(Ordering::Relaxed) == slot))
                    .then(|| format!("anchor {parent} does not link it on layer 0"))
                }
            }
        };
        // Each anchor edge first, with the parent's record prefetched a few
        // slots ahead: those reads are random, and one at a time they would
        // wait out a cache miss each. Workers take disjoint slot ranges; the
        // first fault in slot order is kept.
        const AHEAD: u32 = 16;
        let mut broken = split_slots(n, |range| {
            let (start, end) = (range.start as u32, range.end as u32);
            for slot in start..end {
                if let Some(parent) = (slot + AHEAD < end).then(|| self.graph.anchor(slot + AHEAD))
                {
                    self.graph.prefetch_links(parent);
                }
                if !is_allocated(slot) {
                    continue;
                }
                if let Some(reason) = anchor_fault(slot) {
                    return Some((slot, reason));
                }
            }
            None
        })
        .into_iter()
        .flatten()
        .next();
        // Then the paths, over the anchors alone. State per slot: 0 unseen,
        // 1 on the current anchor path, 2 reaches the root.
        let mut state = vec![0u8; n];
        let mut path = Vec::new();
        for start in 0..slots {
            if broken.is_some() {
                break;
            }
            if !is_allocated(start) || state[start as usize] == 2 {
                continue;
            }
            let mut at = start;
            let fault = loop {
                // Every anchor was checked above, so `at` is in range; a
                // miss is reported rather than trusted.
                match state.get(at as usize) {
                    None => break Some((at, format!("anchor {at} is out of range"))),
                    Some(2) => break None,
                    Some(1) => break Some((at, format!("anchor cycle through slot {at}"))),
                    _ => {}
                }
                state[at as usize] = 1;
                path.push(at);
                if entry_slot == Some(at) {
                    break None;
                }
                at = self.graph.anchor(at);
            };
            if fault.is_some() {
                broken = fault;
                break;
            }
            for s in path.drain(..) {
                state[s as usize] = 2;
            }
        }
        if let Some((slot, reason)) = broken {
            // Say "unreachable" when that is what the broken anchor means (a
            // BFS, only on this failure path).
            if let Some(violation) = self.unreachable_live_slot(&is_live, slots) {
                return Err(violation);
            }
            return Err(InvariantViolation::Anchor { slot, reason });
        }
        Ok(())
    }

    /// I7 / I8 in full: walks the key map (every mapped slot live, none
    /// twice, as many as the live slots) and looks every key up.
    fn check_key_map(
        &self,
        live_count: usize,
        slots: u32,
        is_live: &dyn Fn(u32) -> bool,
    ) -> Result<(), InvariantViolation> {
        let n = slots as usize;
        let mut marks = vec![0u64; n.div_ceil(64)];
        let mut mapped = 0usize;
        let mut fault = None;
        let mut to_look_up = Vec::new();
        self.key_map().for_each_slot(|slot| {
            if fault.is_some() {
                return;
            }
            mapped += 1;
            if !is_live(slot) {
                fault = Some(format!(
                    "slot {slot} is mapped but not live ({live_count} live slots)"
                ));
                return;
            }
            let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
            if marks[word] & bit != 0 {
                fault = Some(format!("slot {slot} is mapped by two keys"));
                return;
            }
            marks[word] |= bit;
            to_look_up.push(slot);
        });
        if let Some(reason) = fault {
            return Err(InvariantViolation::KeyMap { reason });
        }
        // After the walk: a lookup takes a shard's lock, which the walk
        // holds.
        for slot in to_look_up {
            let key = self.key_at(slot);
            if self.slot_of(key) != Some(slot) {
                return Err(InvariantViolation::KeyMap {
                    reason: format!("key {key} stored at slot {slot} does not look up to it"),
                });
            }
        }
        if mapped != live_count {
            let missing =
                (0..slots).find(|&s| is_live(s) && marks[s as usize / 64] & (1 << (s % 64)) == 0);
            return Err(InvariantViolation::KeyMap {
                reason: format!(
                    "{mapped} mapped slots vs {live_count} live slots (live but unmapped: {missing:?})"
                ),
            });
        }
        if self.len() != live_count {
            return Err(InvariantViolation::KeyMap {
                reason: format!("len() is {} but {live_count} slots are live", self.len()),
            });
        }
        Ok(())
    }

    /// I9 by breadth-first search from the entry point on layer 0: the
    /// diagnosis behind a broken anchor tree.
    fn unreachable_live_slot(
        &self,
        is_live: &dyn Fn(u32) -> bool,
        slots: u32,
    ) -> Option<InvariantViolation> {
        let (entry_slot, _) = self.graph.entry()?;
        let mut reached = vec![false; slots as usize];
        let mut queue = std::collections::VecDeque::from([entry_slot]);
        *reached.get_mut(entry_slot as usize)? = true;
        while let Some(s) = queue.pop_front() {
            let Some((degree, ids)) = self.graph.list_quiescent(s, 0) else {
                continue;
            };
            for id in &ids[..degree.min(ids.len())] {
                // Relaxed: ordered by the caller's writer gate.
                let n = id.load(Ordering::Relaxed);
                if let Some(flag) = reached.get_mut(n as usize) {
                    if !*flag {
                        *flag = true;
                        queue.push_back(n);
                    }
                }
            }
        }
        let unreachable: Vec<u32> = (0..slots)
            .filter(|&s| is_live(s) && !reached[s as usize])
            .collect();
        let example = *unreachable.first()?;
        Some(InvariantViolation::Unreachable {
            unreachable: unreachable.len(),
            example,
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::{Index, IndexParams, InvariantViolation, Metric};

    fn small_index() -> Index {
        let index = Index::new(IndexParams::new(4, Metric::L2).m(4).seed(3)).unwrap();
        for key in 0..300u64 {
            let x = key as f32;
            index
                .insert(key, &[x.sin(), x.cos(), (x * 0.37).sin(), (x * 0.11).cos()])
                .unwrap();
        }
        index.check_invariants().expect("valid before corruption");
        index
    }

    fn node_at_level(index: &Index, level: usize) -> u32 {
        (0..300)
            .find(|&s| index.graph.level(s) == level)
            .expect("a node at that level")
    }

    #[test]
    fn i1_out_of_range_neighbour_is_caught() {
        let index = small_index();
        index.graph.corrupt_links(5, 0, &[100_000]);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::NeighbourOutOfRange { .. })
        ));
    }

    #[test]
    fn a_neighbour_id_no_slot_owns_is_skipped_by_search_not_allocated_for() {
        // A list word naming no slot (what a damaged file's list tail, read
        // by a search racing a writer, could hold) must cost a skip: the
        // search still finds the nearest entries, and its visited marks do
        // not grow to the bad id (4 billion of them).
        let index = small_index();
        let bad = u32::MAX - 2;
        for slot in 0..300 {
            let mut kept = Vec::new();
            index.graph.read_links(slot, 0, &mut kept);
            kept.truncate(3);
            kept.insert(0, bad);
            index.graph.corrupt_links(slot, 0, &kept);
        }
        let x = 17.0f32;
        let q = [x.sin(), x.cos(), (x * 0.37).sin(), (x * 0.11).cos()];
        let hits = index.search(&q, 1, 32).unwrap();
        assert_eq!(hits[0].key, 17);
        let scratch = index.take_scratch();
        assert!(
            !scratch.visited.covers(bad) && !scratch.visited.covers(1 << 20),
            "visited marks grew to a bad id"
        );
    }

    #[test]
    fn i2_self_loop_is_caught() {
        let index = small_index();
        index.graph.corrupt_links(5, 0, &[5]);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::SelfLoop { .. })
        ));
    }

    #[test]
    fn i3_duplicate_neighbour_is_caught() {
        let index = small_index();
        index.graph.corrupt_links(5, 0, &[6, 6]);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::DuplicateNeighbour { .. })
        ));
    }

    #[test]
    fn i4_degree_above_m0_is_caught() {
        let index = small_index();
        index.graph.corrupt_degree(5, 0, 9); // M0 = 8
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::DegreeTooHigh { .. })
        ));
    }

    #[test]
    fn i5_node_linked_above_its_level_is_caught() {
        let index = small_index();
        let upper = node_at_level(&index, 1);
        let ground = node_at_level(&index, 0);
        index.graph.corrupt_links(upper, 1, &[ground]);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::AboveLevel { .. })
        ));
    }

    #[test]
    fn i6_entry_point_off_the_max_level_is_caught() {
        let index = small_index();
        let ground = node_at_level(&index, 0);
        index.graph.corrupt_entry(ground, 0);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::EntryPoint { .. })
        ));
    }

    #[test]
    fn i7_key_map_with_a_stray_key_is_caught() {
        let index = small_index();
        index.keys.force_insert(999_999, 7, |s| index.key_at(s));
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::KeyMap { .. })
        ));
    }

    #[test]
    fn i8_removed_slot_left_in_the_key_map_is_caught() {
        let index = small_index();
        let slot = index.slot_of(9).unwrap();
        let node = index.graph.lock_node(slot).unwrap();
        index.graph.set_tombstone(&node); // tombstone without unmapping the key
        drop(node);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::KeyMap { .. })
        ));
    }

    #[test]
    fn i9_unreachable_node_is_caught() {
        let index = small_index();
        let victim = index.slot_of(42).unwrap();
        let (entry, _) = index.graph.entry().unwrap();
        assert_ne!(entry, victim);
        // Cut every layer-0 edge into the victim.
        for slot in 0..300u32 {
            let (_, ids) = index.graph.raw_list(slot, 0).unwrap();
            if ids.contains(&victim) {
                let kept: Vec<u32> = ids.into_iter().filter(|&n| n != victim).collect();
                index.graph.corrupt_links(slot, 0, &kept);
            }
        }
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::Unreachable { .. })
        ));
    }

    #[test]
    fn i12_anchor_cycle_is_caught_even_when_every_anchor_links_its_child() {
        let index = small_index();
        let (entry, _) = index.graph.entry().unwrap();
        // Two nodes that link each other on layer 0, neither the entry point:
        // anchoring each on the other passes the per-node check but cuts
        // both off the root.
        let (a, b) = (0..300u32)
            .filter(|&a| a != entry)
            .find_map(|a| {
                let (_, ids) = index.graph.raw_list(a, 0).unwrap();
                ids.into_iter()
                    .find(|&b| b != entry && index.graph.raw_list(b, 0).unwrap().1.contains(&a))
                    .map(|b| (a, b))
            })
            .unwrap();
        index.graph.set_anchor(a, b);
        index.graph.set_anchor(b, a);
        let err = index.check_invariants().unwrap_err();
        assert!(
            matches!(&err, InvariantViolation::Anchor { reason, .. } if reason.contains("cycle")),
            "{err:?}"
        );
    }

    #[test]
    fn i12_anchor_that_does_not_link_its_child_is_caught() {
        let index = small_index();
        let child = index.slot_of(17).unwrap();
        let (entry, _) = index.graph.entry().unwrap();
        let stranger = (0..300u32)
            .find(|&s| {
                s != child && s != entry && !index.graph.raw_list(s, 0).unwrap().1.contains(&child)
            })
            .unwrap();
        index.graph.set_anchor(child, stranger);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::Anchor { .. })
        ));
    }

    #[test]
    fn i11_non_finite_vector_is_caught() {
        let index = small_index();
        let slot = index.slot_of(11).unwrap();
        let cell = index
            .graph
            .vectors
            .allocate(11, &[f32::NAN, 0.0, 0.0, 0.0])
            .unwrap();
        let node = index.graph.lock_node(slot).unwrap();
        index.graph.publish_cell(&node, cell);
        drop(node);
        // Not a graph invariant: `check_invariants` passes, `check_vectors`
        // names the slot.
        index.check_invariants().unwrap();
        assert!(matches!(
            index.check_vectors(),
            Err(InvariantViolation::NonFiniteVector { slot: s }) if s == slot
        ));
    }

    /// With the check split over workers (unit tests lower the threshold
    /// to 128 slots; ranges are 64-slot multiples), a fault in any range is
    /// found, and the one reported is the first in slot order.
    #[test]
    fn faults_in_every_worker_range_are_found_first_in_slot_order() {
        for slot in [5u32, 150, 290] {
            let index = small_index();
            index.graph.corrupt_links(slot, 0, &[100_000]);
            assert!(
                matches!(
                    index.check_invariants(),
                    Err(InvariantViolation::NeighbourOutOfRange { slot: s, .. }) if s == slot
                ),
                "slot {slot}"
            );

            let index = small_index();
            let key = index.key_at(slot);
            let cell = index
                .graph
                .vectors
                .allocate(key, &[0.0, f32::INFINITY, 0.0, 0.0])
                .unwrap();
            let node = index.graph.lock_node(slot).unwrap();
            index.graph.publish_cell(&node, cell);
            drop(node);
            assert!(
                matches!(
                    index.check_vectors(),
                    Err(InvariantViolation::NonFiniteVector { slot: s }) if s == slot
                ),
                "slot {slot}"
            );

            let index = small_index();
            index.graph.set_anchor(slot, crate::graph::UNANCHORED);
            assert!(
                matches!(
                    index.check_invariants(),
                    Err(InvariantViolation::Anchor { slot: s, .. }) if s == slot
                ),
                "slot {slot}"
            );
        }
        let index = small_index();
        index.graph.corrupt_links(290, 0, &[100_000]);
        index.graph.corrupt_links(150, 0, &[150]);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::SelfLoop { slot: 150, .. })
        ));
    }
}
