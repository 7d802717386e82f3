//! The public [`Index`] type: state, construction and the small accessors.
//! The algorithms live beside it: `search.rs`, `insert.rs`, `update.rs`,
//! `invariants.rs`.
//!
//! # Locks of the index and their order
//!
//! ```text
//!  op_locks[hash(key) % 4096]   held for a whole insert/update/remove of `key`
//!   └─ writer_gate (shared)     held by every write; check_invariants takes it
//!       │                       exclusively to see a quiescent graph
//!       ├─ promotion            held for a whole insert whose level exceeds the
//!       │                       max level (hnswlib's `global`), so promotions
//!       │                       are serial and the new top node is fully linked
//!       ├─ anchor_lock          re-anchoring and root changes (see graph.rs)
//!       └─ one EntryLock at a time (never two: no lock cycles between writers;
//!                               anchor_lock is taken before, never inside, one)
//!  key map RwLock, free-slot Mutex, scratch pool Mutex: leaf locks, held briefly
//! ```
//!
//! Searches take none of these (only the scratch pool's leaf mutex, twice per
//! query). Writers on different keys share only `writer_gate` (a shared read
//! hold) and the entry locks of the nodes whose lists they edit.

use crossbeam_epoch::{self as epoch, Guard};

use crate::distance::{normalize, Distance, Metric};
use crate::error::{Error, Result};
use crate::graph::{Graph, NO_CELL, TOMBSTONE};
use crate::keymap::KeyMap;
use crate::level::LevelGenerator;
use crate::params::IndexParams;
use crate::scratch::{PooledScratch, ScratchPool};
use crate::sync::{AtomicU64, AtomicUsize, Mutex, Ordering, RwLock};

const OP_LOCK_STRIPES: usize = 4096;

/// One search result: the entry's key and its distance to the query
/// (smaller is closer; see [`Metric`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// The entry's external key.
    pub key: u64,
    /// Distance to the query under the index metric.
    pub distance: f32,
}

/// Memory held by an index, by purpose (bytes allocated, including spare
/// capacity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Vector data: `dim * 4` bytes per cell.
    pub vectors: usize,
    /// Neighbour lists: degree words and ids on every layer.
    pub links: usize,
    /// Everything else per entry: the entry lock, cell word, anchor, the key
    /// stored with the vector, the key map, and the upper-layer block table.
    pub fixed: usize,
    /// Entries currently live.
    pub live: usize,
}

impl MemoryUsage {
    /// Sum of all parts.
    pub fn total(&self) -> usize {
        self.vectors + self.links + self.fixed
    }
}

/// Counters describing an index, from [`Index::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Live entries.
    pub live: usize,
    /// Removed entries whose slots await reuse by an insert.
    pub removed: usize,
    /// Of those, the ones still linked in the graph as tombstones (searches
    /// walk through them); [`Index::compact`] unlinks them.
    pub tombstones: usize,
    /// Bytes of vectors replaced or removed but not yet recycled: some
    /// thread pinned when they were retired may still read them (epoch
    /// grace period). Bounded by the writes made while the longest reader
    /// was pinned; [`Index::collect_garbage`] recycles what it can.
    pub pending_garbage_bytes: usize,
    /// Slots ever handed out (live + removed + never-published).
    pub slots: usize,
    /// Searches answered by an exact scan instead of the graph: unfiltered
    /// searches whose graph pass found fewer than `k` live entries, and
    /// filtered searches whose filter was too selective.
    pub exact_scans: u64,
}

/// A concurrent HNSW index over `f32` vectors.
///
/// Every method takes `&self`, and `Index` is `Send + Sync`: share it with an
/// `Arc` and search from many threads while others insert, update and remove.
///
/// ```
/// use nann::{Index, IndexParams, Metric};
///
/// let index = Index::new(IndexParams::new(2, Metric::L2))?;
/// index.insert(1, &[0.0, 0.0])?;
/// index.insert(2, &[1.0, 1.0])?;
/// index.insert(3, &[5.0, 5.0])?;
///
/// let hits = index.search(&[0.9, 0.8], 2, 16)?;
/// assert_eq!(hits[0].key, 2);
/// assert_eq!(hits[1].key, 1);
///
/// index.update(3, &[1.0, 0.9])?;   // in place: vector and links
/// index.remove(2)?;
/// assert_eq!(index.search(&[0.9, 0.8], 1, 16)?[0].key, 3);
/// # Ok::<(), nann::Error>(())
/// ```
pub struct Index {
    pub(crate) params: IndexParams,
    pub(crate) distance: Distance,
    pub(crate) graph: Graph,
    pub(crate) keys: KeyMap,
    pub(crate) levels: LevelGenerator,
    /// Slots handed out so far (high-water mark).
    pub(crate) next_slot: AtomicUsize,
    /// Removed slots, reused by later inserts.
    pub(crate) free_slots: Mutex<Vec<u32>>,
    pub(crate) live: AtomicUsize,
    pub(crate) op_locks: Box<[Mutex<()>]>,
    pub(crate) promotion: Mutex<()>,
    /// Serialises re-anchoring and root changes (anchor-tree edits that could
    /// otherwise race into a cycle).
    pub(crate) anchor_lock: Mutex<()>,
    pub(crate) writer_gate: RwLock<()>,
    pub(crate) scratch: ScratchPool,
    /// See [`Stats::exact_scans`].
    pub(crate) exact_scans: AtomicU64,
    /// A read-only view of the file the index was mapped from, for
    /// [`Index::verify_checksums`] (declared last: dropped after the graph,
    /// though the graph's own mapping is kept alive separately).
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) origin: Option<memmap2::Mmap>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("params", &self.params)
            .field("isa", &self.distance.isa())
            .field("len", &self.len())
            .finish()
    }
}

impl Index {
    /// An empty index.
    ///
    /// ```
    /// let index = nann::Index::new(nann::IndexParams::new(8, nann::Metric::Cosine))?;
    /// assert!(index.is_empty());
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn new(params: IndexParams) -> Result<Self> {
        params.validate()?;
        let graph = Graph::new(params.dim, params.m, params.capacity, params.payload_len)?;
        Self::from_graph(params, graph, KeyMap::default())
    }

    /// An index around an existing graph and key map (a new one, or one
    /// over a mapped file); `params` must already be validated.
    pub(crate) fn from_graph(params: IndexParams, graph: Graph, keys: KeyMap) -> Result<Self> {
        let distance = match params.isa {
            Some(isa) => Distance::with_isa(params.metric, isa)?,
            None => Distance::new(params.metric),
        };
        Ok(Self {
            distance,
            graph,
            keys,
            levels: LevelGenerator::new(params.seed, params.m),
            next_slot: AtomicUsize::new(0),
            free_slots: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            op_locks: (0..OP_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            promotion: Mutex::new(()),
            anchor_lock: Mutex::new(()),
            writer_gate: RwLock::new(()),
            scratch: ScratchPool::default(),
            exact_scans: AtomicU64::new(0),
            origin: None,
            params,
        })
    }

    /// The parameters the index was built with.
    pub fn params(&self) -> &IndexParams {
        &self.params
    }

    /// The vector dimension.
    pub fn dim(&self) -> usize {
        self.params.dim
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        self.params.metric
    }

    /// The distance function in use (metric and SIMD level).
    pub fn distance(&self) -> &Distance {
        &self.distance
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        // Relaxed: a statistic; exactness under concurrent writes is not promised.
        self.live.load(Ordering::Relaxed)
    }

    /// Whether the index has no live entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` is live.
    ///
    /// ```
    /// let index = nann::Index::new(nann::IndexParams::new(1, nann::Metric::L2))?;
    /// index.insert(9, &[1.0])?;
    /// assert!(index.contains(9) && !index.contains(10));
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn contains(&self, key: u64) -> bool {
        self.slot_of(key).is_some()
    }

    /// The keys of the live entries, in slot order (not sorted), e.g. to
    /// export the index or reconcile it with a source of truth.
    ///
    /// With writers running, this is a scan, not a snapshot: a key present
    /// for the whole call is listed exactly once (an in-place update keeps
    /// its slot), a key absent for the whole call is not listed, and a key
    /// inserted or removed during the call may or may not be (one removed
    /// and inserted again may be listed twice).
    ///
    /// ```
    /// let index = nann::Index::new(nann::IndexParams::new(1, nann::Metric::L2))?;
    /// for key in [30, 10, 20] {
    ///     index.insert(key, &[key as f32])?;
    /// }
    /// index.remove(10)?;
    /// let mut keys = index.keys();
    /// keys.sort_unstable();
    /// assert_eq!(keys, [20, 30]);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn keys(&self) -> Vec<u64> {
        // Pinned: a cell retired and recycled while its key is read would
        // name another entry's key.
        let _guard = self.pin();
        // Relaxed: `next_slot` only bounds the scan (a slot handed out but
        // not yet published has no cell and is skipped); each slot's cell
        // word is loaded with Acquire before its key is read (`live_key`).
        let slots = self
            .next_slot
            .load(Ordering::Relaxed)
            .min(u32::MAX as usize) as u32;
        let mut keys = Vec::with_capacity(self.len());
        keys.extend((0..slots).filter_map(|slot| self.live_key(slot)));
        keys
    }

    /// A copy of `key`'s vector (normalised, for the cosine metric).
    ///
    /// ```
    /// let index = nann::Index::new(nann::IndexParams::new(2, nann::Metric::L2))?;
    /// index.insert(9, &[1.0, 2.0])?;
    /// assert_eq!(index.get(9)?, vec![1.0, 2.0]);
    /// assert!(index.get(10).is_err());
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn get(&self, key: u64) -> Result<Vec<f32>> {
        let guard = epoch::pin();
        // A concurrent remove + reuse can give the slot to another key between
        // the lookup and the read; the cell's own key tells, so retry.
        for _ in 0..64 {
            let slot = self.slot_of(key).ok_or(Error::KeyNotFound(key))?;
            if let Some(v) = self.graph.vector(slot, &guard) {
                if !v.tombstoned && self.graph.vectors.key(v.cell) == key {
                    return Ok(v.vector.to_vec());
                }
            }
        }
        Err(Error::KeyNotFound(key))
    }

    /// A copy of `key`'s payload (empty when the index stores none).
    ///
    /// ```
    /// let index = nann::Index::new(nann::IndexParams::new(1, nann::Metric::L2).payload_len(1))?;
    /// index.insert(9, &[1.0])?; // no payload given: zeros
    /// assert_eq!(index.get_payload(9)?, vec![0]);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn get_payload(&self, key: u64) -> Result<Vec<u8>> {
        self.get_with_payload(key).map(|(_, payload)| payload)
    }

    /// `key`'s vector and payload, from one version of the entry.
    pub fn get_with_payload(&self, key: u64) -> Result<(Vec<f32>, Vec<u8>)> {
        let guard = epoch::pin();
        // As in `get`: retry if the slot was reused by another key.
        for _ in 0..64 {
            let slot = self.slot_of(key).ok_or(Error::KeyNotFound(key))?;
            if let Some(v) = self.graph.vector(slot, &guard) {
                if !v.tombstoned && self.graph.vectors.key(v.cell) == key {
                    let mut payload = Vec::with_capacity(self.params.payload_len);
                    self.graph
                        .vectors
                        .payload_into(v.cell, &guard, &mut payload);
                    return Ok((v.vector.to_vec(), payload));
                }
            }
        }
        Err(Error::KeyNotFound(key))
    }

    pub(crate) fn check_payload(&self, payload: &[u8]) -> Result<()> {
        if payload.len() != self.params.payload_len {
            return Err(Error::PayloadLength {
                expected: self.params.payload_len,
                actual: payload.len(),
            });
        }
        Ok(())
    }

    /// Counters: live and removed entries, slots, exact-scan fallbacks.
    ///
    /// ```
    /// let index = nann::Index::new(nann::IndexParams::new(1, nann::Metric::L2))?;
    /// index.insert(1, &[1.0])?;
    /// index.insert(2, &[2.0])?;
    /// index.remove(1)?;
    /// let stats = index.stats();
    /// assert_eq!((stats.live, stats.removed, stats.slots), (1, 1, 2));
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn stats(&self) -> Stats {
        let (removed, tombstones) = {
            let free = self.free_slots.lock();
            let linked = free
                .iter()
                .filter(|&&s| self.graph.cell_word(s) != NO_CELL)
                .count();
            (free.len(), linked)
        };
        // Relaxed: statistics, not synchronisation.
        Stats {
            live: self.len(),
            removed,
            tombstones,
            pending_garbage_bytes: self.graph.vectors.pending_bytes(),
            slots: self.next_slot.load(Ordering::Relaxed),
            exact_scans: self.exact_scans.load(Ordering::Relaxed),
        }
    }

    /// Recycles the vectors whose grace period is over and returns the
    /// bytes still pending (see [`Stats::pending_garbage_bytes`]).
    ///
    /// Writers recycle as they go; this is for a service gone idle after a
    /// burst of updates, or a test. It makes a few rounds of flushing this
    /// thread's deferred frees and advancing the epoch; garbage retired
    /// while some thread is still pinned stays until that thread unpins.
    /// Deferred frees sitting in *another* thread's local buffer (at most a
    /// few dozen per writer thread) move on when that thread next writes.
    ///
    /// ```
    /// let index = nann::Index::new(nann::IndexParams::new(4, nann::Metric::L2))?;
    /// index.insert(1, &[1.0; 4])?;
    /// for round in 0..100 {
    ///     index.update(1, &[round as f32; 4])?;
    /// }
    /// assert_eq!(index.collect_garbage(), 0);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn collect_garbage(&self) -> usize {
        // Each round advances the epoch at most once and frees a few
        // batches; a burst of thousands of updates fills dozens of batches.
        const ROUNDS: usize = 256;
        for _ in 0..ROUNDS {
            if self.graph.vectors.pending_bytes() == 0 {
                break;
            }
            self.pin().flush();
        }
        self.graph.vectors.pending_bytes()
    }

    /// Memory held by the index.
    ///
    /// ```
    /// let index = nann::Index::new(nann::IndexParams::new(16, nann::Metric::L2).capacity(1000))?;
    /// for key in 0..1000u64 {
    ///     index.insert(key, &[key as f32; 16])?;
    /// }
    /// let usage = index.memory_usage();
    /// assert!(usage.vectors >= 1000 * 16 * 4);
    /// assert!(usage.fixed / usage.live <= 40);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage {
            vectors: self.graph.vectors.vector_bytes(),
            links: self.graph.link_bytes(),
            fixed: self.graph.slot_state_bytes()
                + self.graph.vectors.key_bytes()
                + self.key_map().allocated_bytes(),
            live: self.len(),
        }
    }

    // ---- internal helpers shared by the algorithm modules ----

    /// The slot of a live key.
    pub(crate) fn slot_of(&self, key: u64) -> Option<u32> {
        // Pinned: `key_at` reads the key of the cell a slot's word names, and
        // without a pin that cell could be retired by an update, reclaimed
        // and reused for another key between the two loads: a live key would
        // then be missed. Pins nest, so callers already pinned pay little.
        let _guard = self.pin();
        self.key_map().get(key, |slot| self.key_at(slot))
    }

    /// The key map, filled first if the index was opened with its filling
    /// deferred (`open_unchecked`).
    #[inline]
    pub(crate) fn key_map(&self) -> &KeyMap {
        if self.keys.is_pending() {
            self.keys.fill(
                // Acquire is more than needed: `next_slot` is handed out with a
                // Relaxed `fetch_add` and only bounds the scan; each slot's
                // cell word is loaded with Acquire (pairing with its Release
                // publication) before its key is read.
                || self.next_slot.load(Ordering::Acquire) as u32,
                |s| self.live_key(s),
                |s| self.key_at(s),
            );
        }
        &self.keys
    }

    /// The key of `slot` if it is live (published, not removed).
    pub(crate) fn live_key(&self, slot: u32) -> Option<u64> {
        let word = self.graph.cell_word(slot);
        (word != NO_CELL && word & TOMBSTONE == 0).then(|| self.graph.vectors.key(word))
    }

    /// The key stored in `slot`'s current cell.
    pub(crate) fn key_at(&self, slot: u32) -> u64 {
        let word = self.graph.cell_word(slot);
        if word == NO_CELL {
            return u64::MAX;
        }
        self.graph.vectors.key(word & !TOMBSTONE)
    }

    /// Checks a caller's vector: the dimension, and every value finite.
    fn check_vector(&self, vector: &[f32]) -> Result<()> {
        if vector.len() != self.params.dim {
            return Err(Error::DimensionMismatch {
                expected: self.params.dim,
                actual: vector.len(),
            });
        }
        // A fold without early exit vectorises; the position is looked up
        // only on the error path.
        if !vector.iter().fold(true, |ok, x| ok & x.is_finite()) {
            if let Some((position, &value)) =
                vector.iter().enumerate().find(|(_, x)| !x.is_finite())
            {
                return Err(Error::NonFiniteValue { position, value });
            }
        }
        Ok(())
    }

    /// Checks a caller's vector and returns it ready to store or search
    /// (normalised for the cosine metric).
    pub(crate) fn prepare_into(&self, vector: &[f32], out: &mut Vec<f32>) -> Result<()> {
        self.check_vector(vector)?;
        out.clear();
        out.extend_from_slice(vector);
        if self.params.metric == Metric::Cosine {
            normalize(out)?;
        }
        Ok(())
    }

    /// As [`Index::prepare_into`], without the copy when the metric leaves
    /// the vector as it is (L2, inner product): a query is then searched
    /// straight from the caller's slice.
    pub(crate) fn prepare_query<'a>(
        &self,
        vector: &'a [f32],
        buffer: &'a mut Vec<f32>,
    ) -> Result<&'a [f32]> {
        if self.params.metric == Metric::Cosine {
            self.prepare_into(vector, buffer)?;
            Ok(buffer)
        } else {
            self.check_vector(vector)?;
            Ok(vector)
        }
    }

    pub(crate) fn prepare(&self, vector: &[f32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(vector.len());
        self.prepare_into(vector, &mut out)?;
        Ok(out)
    }

    pub(crate) fn op_lock(&self, key: u64) -> &Mutex<()> {
        let stripe = crate::level::splitmix64(key) as usize % OP_LOCK_STRIPES;
        &self.op_locks[stripe]
    }

    pub(crate) fn take_scratch(&self) -> PooledScratch<'_> {
        self.scratch.take()
    }

    pub(crate) fn pin(&self) -> Guard {
        epoch::pin()
    }
}
