//! The graph: per-slot records, neighbour lists, vectors and the entry point.
//!
//! # Layout
//!
//! ```text
//!  level0 (Chunked<AtomicU32>, one record per slot, stride 2 + M0 words)
//!  ┌──────────┬─────────────────┬──────────────────────────┐
//!  │ lock u32 │ upper:23 deg:9  │ neighbour ids (M0 slots)  │   slot 0
//!  ├──────────┼─────────────────┼──────────────────────────┤
//!  │ lock u32 │ upper:23 deg:9  │ ...                       │   slot 1
//!  └──────────┴────────┬────────┴──────────────────────────┘
//!                      └─ 0 for a level-0 node, else 1 + i: upper_nodes[i]
//!                         ─► [deg][M ids] for each layer 1..=level (~1/M of nodes)
//!
//!  anchors (Chunked<AtomicU32>, 4 B per slot): the in-edge that is never pruned
//!  cells (Chunked<AtomicU32>, 4 B per slot)
//!  ┌──────────────────────────┐
//!  │ T │ cell id (31 bits)     │ ──┐
//!  └──────────────────────────┘   │
//!     T = tombstone               │
//!                                 ▼
//!  VectorArena: cells of dim f32 + key, immutable once published (storage.rs)
//! ```
//!
//! hnswlib's idea kept: one flat, fixed-stride level-0 block, so expanding a
//! node touches one record, and the lock sits in the same cache line as the
//! degree. Vectors are a separate arena reached through the small, dense
//! `cells` array (400 KB per 100k entries, L2-resident on the benchmark
//! machine), because in-place updates must swap a vector atomically.
//!
//! # Concurrency scheme
//!
//! * **Neighbour lists** are arrays of `AtomicU32` guarded by the entry's
//!   [`EntryLock`]. Writers hold it exclusively; searches copy a list
//!   optimistically and retry if the version moved (`read_links`). Searches
//!   write no shared memory.
//! * **Vectors** are immutable cells; an update publishes a new cell id in
//!   `cells` (under the entry lock, `Release`) and retires the old cell through
//!   crossbeam-epoch. Searches pin once per query and read cells with plain SIMD
//!   loads.
//! * **Tombstones** are bit 31 of the cell word, so the one `Acquire` load a
//!   search makes per node yields both the vector and its liveness.
//! * **Entry point and max level** are one `AtomicU64` (`level << 32 | slot`),
//!   read with `Acquire`, written with `Release` under the index's promotion
//!   mutex: a reader can never pair a new entry point with an old level.
//! * **Anchors keep every node reachable.** Each slot's anchor is one
//!   layer-0 in-edge that pruning never removes; the anchors form a tree
//!   rooted at the entry point (`anchor.rs`), which `check_invariants`
//!   verifies.
//! * **Publication order** (usearch #735): a new node's lists are written
//!   (forward links) before any other node links to it (reverse links), and
//!   its cell is published before either; see `insert.rs`.

use std::ptr::NonNull;

use crossbeam_epoch::Guard;

use crate::error::{Error, Result};
use crate::slot_lock::{ReadTicket, SlotLock, SlotLocks, SlotWriteGuard};
#[cfg(not(loom))]
use crate::storage::Keepalive;
use crate::storage::{CellId, CellReader, Chunked, VectorArena};
use crate::sync::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// Bit 31 of a cell word: the entry was removed (kept for navigation).
pub(crate) const TOMBSTONE: u32 = 1 << 31;
/// Cell word of a slot that has never been published.
pub(crate) const NO_CELL: u32 = u32::MAX;
/// Anchor of a node not yet linked into the graph.
pub(crate) const UNANCHORED: u32 = u32::MAX;
/// Anchor of the root of the anchor tree (the entry point).
pub(crate) const ROOT: u32 = u32::MAX - 1;
/// Entry word of an empty graph.
const NO_ENTRY: u64 = u64::MAX;
/// Bits of a list's degree word that hold the degree; on layer 0 the other
/// 23 bits hold the node's upper-layer index (so M0 <= 511, i.e. M <= 255,
/// and at most 2^23 - 1 nodes can have upper layers: ~134M entries at M 16).
pub(crate) const DEGREE_BITS: u32 = 9;
const DEGREE_MASK: u32 = (1 << DEGREE_BITS) - 1;
/// Highest level a node can get (levels are drawn with mean 1/ln M, so level
/// 16 is reached with probability ~M^-16: never, in practice).
pub(crate) const MAX_LEVEL: usize = 16;

/// A graph's raw arrays, as saved (see [`Graph::export`]).
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct GraphExport {
    pub(crate) level0: Vec<u32>,
    pub(crate) cells: Vec<u32>,
    pub(crate) anchors: Vec<u32>,
    /// Per block: level, then `level x (1 + M)` words.
    pub(crate) upper: Vec<u32>,
    pub(crate) upper_count: usize,
    pub(crate) entry: Option<(u32, usize)>,
}

/// Validated raw arrays to restore (see [`Graph::import`]).
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct GraphImport<'a> {
    pub(crate) level0: &'a [u32],
    pub(crate) cells: &'a [u32],
    pub(crate) anchors: &'a [u32],
    /// (level, words) per upper block, in table order.
    pub(crate) upper_blocks: Vec<(usize, &'a [u32])>,
    pub(crate) entry: Option<(u32, usize)>,
}

/// The per-slot arrays of a mapped index file (see [`Graph::from_borrowed`]).
#[cfg(not(loom))]
pub(crate) struct BorrowedArrays {
    pub(crate) slots: usize,
    pub(crate) level0: std::ptr::NonNull<AtomicU32>,
    pub(crate) cells: std::ptr::NonNull<AtomicU32>,
    pub(crate) anchors: std::ptr::NonNull<AtomicU32>,
    pub(crate) vectors: std::ptr::NonNull<f32>,
    pub(crate) keys: std::ptr::NonNull<AtomicU64>,
    /// Payload words (`payload_len.div_ceil(4)` per slot) and the payload
    /// length in bytes; `None` when the index stores no payloads.
    pub(crate) payloads: Option<(std::ptr::NonNull<AtomicU32>, usize)>,
    pub(crate) keepalive: Keepalive,
}

/// The upper-layer lists of one node (levels 1..=level).
struct UpperLinks {
    level: usize,
    /// Per layer `1 + M` words: degree, then ids. Either owned (a leaked
    /// `Box<[AtomicU32]>`, freed when the block is dropped) or borrowed from
    /// an opened file's words, which the graph's keepalive holds for as long
    /// as the graph (and so the block) lives.
    words: NonNull<[AtomicU32]>,
    owned: bool,
}

// SAFETY: the words are atomics, shared only through `&[AtomicU32]`; owned
// words are freed once, by the block's `Drop`, and borrowed ones outlive
// every block (see `words`). Nothing else in the block is shared mutably.
unsafe impl Send for UpperLinks {}
// SAFETY: as above; `&UpperLinks` only hands out `&[AtomicU32]`.
unsafe impl Sync for UpperLinks {}

impl UpperLinks {
    fn owned(level: usize, words: Box<[AtomicU32]>) -> Self {
        Self {
            level,
            words: NonNull::from(Box::leak(words)),
            owned: true,
        }
    }

    #[inline]
    fn words(&self) -> &[AtomicU32] {
        // SAFETY: owned words live until this block's `Drop`; borrowed words
        // live in the backing the graph keeps alive until after it has
        // dropped every block (`Graph::drop` runs before its fields drop).
        // Either way they are valid, aligned `AtomicU32`s for `&self`.
        unsafe { self.words.as_ref() }
    }
}

impl Drop for UpperLinks {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: produced by `Box::leak` in `UpperLinks::owned` and
            // freed only here, once.
            drop(unsafe { Box::from_raw(self.words.as_ptr()) });
        }
    }
}

/// Upper-layer blocks built from a file's words while the file's sections
/// are still borrowed (or pointing into it), then handed to
/// [`Graph::import_upper`] once the graph exists.
#[cfg(not(loom))]
// Boxed: each block's address is published in `upper_nodes` and must not
// move when the vector does.
#[allow(clippy::vec_box)]
pub(crate) struct PreparedUpper(Vec<Box<UpperLinks>>);

#[cfg(not(loom))]
impl PreparedUpper {
    /// One block per `(level, words)`, in table order, copying the words.
    pub(crate) fn new(blocks: &[(usize, &[u32])]) -> Self {
        Self(
            blocks
                .iter()
                .map(|&(level, words)| {
                    Box::new(UpperLinks::owned(
                        level,
                        words.iter().map(|&w| AtomicU32::new(w)).collect(),
                    ))
                })
                .collect(),
        )
    }

    /// One block per `(level, words)`, in table order, using the words in
    /// place (an opened file's, zero-copy).
    ///
    /// # Safety
    ///
    /// Every `words` must be valid for reads and atomic writes of its
    /// `AtomicU32`s, aligned, not accessed other than through this graph,
    /// and must outlive the graph these blocks are imported into: they lie
    /// in the backing passed to that graph's `Graph::from_borrowed` as its
    /// keepalive.
    pub(crate) unsafe fn borrowed(blocks: Vec<(usize, NonNull<[AtomicU32]>)>) -> Self {
        Self(
            blocks
                .into_iter()
                .map(|(level, words)| {
                    Box::new(UpperLinks {
                        level,
                        words,
                        owned: false,
                    })
                })
                .collect(),
        )
    }
}

/// Exclusive hold on one node, proof that its lists may be written.
#[must_use]
#[derive(Debug)]
pub(crate) struct NodeGuard<'a> {
    slot: u32,
    _lock: SlotWriteGuard<'a>,
}

impl NodeGuard<'_> {
    /// The locked slot.
    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }
}

/// A consistent copy of a cell word plus the vector it names.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VectorRef<'g> {
    pub(crate) cell: CellId,
    pub(crate) tombstoned: bool,
    pub(crate) vector: &'g [f32],
}

/// An optimistic view of one neighbour list: read ids between `begin` and a
/// successful `validate`, and discard what was read if validation fails.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinksView<'a> {
    lock: SlotLock<'a>,
    degree: &'a AtomicU32,
    ids: &'a [AtomicU32],
}

impl<'a> LinksView<'a> {
    /// Starts a read (waits while a writer holds the entry).
    #[inline]
    pub(crate) fn begin(&self) -> ReadTicket<'a> {
        self.lock.read_begin()
    }

    /// The degree, bounded by the list's room (a torn value stays in bounds).
    #[inline]
    pub(crate) fn len(&self) -> usize {
        // Acquire, though `validate` (lock.rs) checks the snapshot: the ids
        // are *used* before validation (to mark them visited), so an id
        // below a degree seen here must be one the writer stored before it
        // (pairs with the Release store in `write_links`), never a stale
        // word past the old degree. Free on x86; on weaker targets it
        // orders this load before the id loads.
        ((self.degree.load(Ordering::Acquire) & DEGREE_MASK) as usize).min(self.ids.len())
    }

    /// Id `i` (`i < len()`).
    #[inline]
    pub(crate) fn id(&self, i: usize) -> u32 {
        // Relaxed: validated by `validate` (lock.rs).
        self.ids[i].load(Ordering::Relaxed)
    }

    /// Whether everything read since `begin` is a consistent snapshot.
    #[inline]
    pub(crate) fn validate(&self, version: ReadTicket<'a>) -> bool {
        self.lock.read_validate(version)
    }
}

/// (cell id, tombstoned) of a cell word, or `None` for a never-published slot.
#[inline]
fn decode_cell_word(word: u32) -> Option<(CellId, bool)> {
    (word != NO_CELL).then_some((word & !TOMBSTONE, word & TOMBSTONE != 0))
}

/// See [`Graph::search_view`].
pub(crate) struct SearchView<'g> {
    cells: &'g [AtomicU32],
    vectors: CellReader<'g>,
    graph: &'g Graph,
}

impl<'g> SearchView<'g> {
    /// As [`Graph::cell_word`].
    #[inline]
    pub(crate) fn cell_word(&self, slot: u32) -> u32 {
        match self.cells.get(slot as usize) {
            // Acquire: as in `Graph::cell_word`.
            Some(word) => word.load(Ordering::Acquire),
            None => self.graph.cell_word(slot),
        }
    }

    /// As [`Graph::vector`], for a cell word loaded under this view's guard.
    #[inline]
    pub(crate) fn vector_of_word(&self, word: u32) -> Option<VectorRef<'g>> {
        let (cell, tombstoned) = decode_cell_word(word)?;
        Some(VectorRef {
            cell,
            tombstoned,
            vector: self.vectors.read(cell)?,
        })
    }

    /// Hints the CPU to fetch the vector a cell word names.
    #[inline]
    pub(crate) fn prefetch(&self, word: u32) {
        if word != NO_CELL {
            self.vectors.prefetch(word & !TOMBSTONE);
        }
    }
}

pub(crate) struct Graph {
    m: usize,
    m0: usize,
    level0: Chunked<AtomicU32>,
    /// The upper-layer blocks of the ~1/M nodes that have levels >= 1.
    upper_nodes: Chunked<AtomicPtr<UpperLinks>>,
    upper_count: AtomicU32,
    cells: Chunked<AtomicU32>,
    /// Layer-0 anchor of each slot (see the module docs).
    anchors: Chunked<AtomicU32>,
    entry: AtomicU64,
    pub(crate) vectors: VectorArena,
    /// Word 0 of each level-0 record is the slot's lock; loom builds keep a
    /// stand-in beside it (`slot_lock.rs`).
    slot_locks: SlotLocks,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("m", &self.m)
            .field("m0", &self.m0)
            .field("slots", &self.slot_capacity())
            .field("entry", &self.entry())
            .finish()
    }
}

impl Graph {
    pub(crate) fn new(dim: usize, m: usize, capacity: usize, payload_len: usize) -> Result<Self> {
        let m0 = 2 * m;
        Ok(Self {
            m,
            m0,
            level0: Chunked::new(capacity, 2 + m0, || AtomicU32::new(0))?,
            // n/M upper nodes are expected; 4 standard deviations of room.
            upper_nodes: Chunked::new(
                capacity / m + 4 * ((capacity / m) as f64).sqrt() as usize + 16,
                1,
                || AtomicPtr::new(std::ptr::null_mut()),
            )?,
            upper_count: AtomicU32::new(0),
            cells: Chunked::new(capacity, 1, || AtomicU32::new(NO_CELL))?,
            anchors: Chunked::new(capacity, 1, || AtomicU32::new(UNANCHORED))?,
            entry: AtomicU64::new(NO_ENTRY),
            slot_locks: SlotLocks::new(capacity)?,
            // Spare cells beyond the capacity: an update writes a new cell
            // before the old one's grace period ends, so a few hundred cells
            // are in flight under steady churn; without the spare, the first
            // update would allocate a whole second chunk.
            // Growth past that comes in chunks doubling from 1/32 of the
            // capacity, not from the capacity: a burst of garbage (a reader
            // pinned for a while) should cost a few percent, not 2x.
            vectors: VectorArena::new(
                dim,
                capacity + capacity / 64 + 256,
                (capacity / 32).max(256),
            )?
            .with_payloads(payload_len)?,
        })
    }

    /// Maximum degree on `layer`.
    #[inline]
    pub(crate) fn max_degree(&self, layer: usize) -> usize {
        if layer == 0 {
            self.m0
        } else {
            self.m
        }
    }

    /// Slots addressable without growing.
    pub(crate) fn slot_capacity(&self) -> usize {
        self.level0
            .capacity()
            .min(self.cells.capacity())
            .min(self.anchors.capacity())
    }

    /// Grows every per-slot array to hold `slots` slots; never moves memory.
    pub(crate) fn reserve_slots(&self, slots: usize) -> Result<()> {
        if slots > TOMBSTONE as usize {
            return Err(Error::CapacityExceeded {
                limit: TOMBSTONE as usize,
            });
        }
        self.level0.reserve(slots)?;
        self.slot_locks.reserve(slots)?;
        self.cells.reserve(slots)?;
        self.anchors.reserve(slots)
    }

    /// The anchor of `slot`: the node whose layer-0 list holds the edge to
    /// `slot` that pruning must keep, or `ROOT` / `UNANCHORED`.
    #[inline]
    pub(crate) fn anchor(&self, slot: u32) -> u32 {
        // Acquire: pairs with `set_anchor`; a pruner that sees a new anchor
        // also sees the edge from it (written before, under its lock).
        self.anchors
            .get(slot as usize)
            .map_or(UNANCHORED, |a| a[0].load(Ordering::Acquire))
    }

    /// Sets `slot`'s anchor. Callers hold the new anchor's entry lock (or
    /// the index's anchor lock, for the root); see `insert.rs`.
    pub(crate) fn set_anchor(&self, slot: u32, anchor: u32) {
        if let Some(a) = self.anchors.get(slot as usize) {
            // Release: see `anchor`.
            a[0].store(anchor, Ordering::Release);
        }
    }

    #[inline]
    pub(crate) fn lock(&self, slot: u32) -> Option<SlotLock<'_>> {
        let record = self.level0.get(slot as usize)?;
        self.slot_locks.get(&record[0], slot)
    }

    /// See `model_hooks::block_on_slot_locks`.
    #[cfg(loom)]
    pub(crate) fn block_on_slot_locks(&self) {
        self.slot_locks.block();
    }

    /// Locks `slot` exclusively.
    pub(crate) fn lock_node(&self, slot: u32) -> Option<NodeGuard<'_>> {
        let lock = self.lock(slot)?;
        Some(NodeGuard {
            slot,
            _lock: lock.write(),
        })
    }

    /// The node's level (0 for nodes without upper layers).
    pub(crate) fn level(&self, slot: u32) -> usize {
        self.upper_links(slot).map_or(0, |u| u.level)
    }

    fn upper_links(&self, slot: u32) -> Option<&UpperLinks> {
        // Acquire (both loads): pair with the Release stores in `init_node`,
        // so the block and its contents are visible.
        let index = self.level0.get(slot as usize)?[1].load(Ordering::Acquire) >> DEGREE_BITS;
        if index == 0 {
            return None;
        }
        let ptr = self.upper_nodes.get(index as usize - 1)?[0].load(Ordering::Acquire);
        // SAFETY: a non-null pointer was produced by `Box::into_raw` in
        // `init_node`, is never replaced or freed while the graph lives (slot
        // reuse keeps the level), and is freed only in `Drop`, which needs
        // `&mut self`.
        unsafe { ptr.as_ref() }
    }

    /// The degree word and id array of `slot`'s list on `layer`.
    #[inline]
    fn list(&self, slot: u32, layer: usize) -> Option<(&AtomicU32, &[AtomicU32])> {
        if layer == 0 {
            let record = self.level0.get(slot as usize)?;
            Some((&record[1], &record[2..]))
        } else {
            let upper = self.upper_links(slot)?;
            if layer > upper.level {
                return None;
            }
            let start = (layer - 1) * (1 + self.m);
            let block = upper.words().get(start..start + 1 + self.m)?;
            Some((&block[0], &block[1..]))
        }
    }

    /// Copies the raw list without any version check.
    fn copy_list(&self, degree: &AtomicU32, ids: &[AtomicU32], out: &mut Vec<u32>) {
        out.clear();
        // Acquire: as in `LinksView::len`, every id below the degree read is
        // one stored before it; the caller validates (or holds the lock) for
        // the snapshot as a whole.
        let n = ((degree.load(Ordering::Acquire) & DEGREE_MASK) as usize).min(ids.len());
        out.extend(ids[..n].iter().map(|id| id.load(Ordering::Relaxed)));
    }

    /// Hints the CPU to fetch `slot`'s level-0 record (lock, degree, ids).
    #[inline]
    pub(crate) fn prefetch_links(&self, slot: u32) {
        if let Some(record) = self.level0.get(slot as usize) {
            crate::storage::prefetch_lines(record.as_ptr() as *const u8, record.len() * 4);
        }
    }

    /// Direct, optimistic access to one list, for loops that consume the ids
    /// as they read them instead of copying them first (the search loop).
    #[inline(always)]
    pub(crate) fn links_view(&self, slot: u32, layer: usize) -> Option<LinksView<'_>> {
        let lock = self.lock(slot)?;
        let (degree, ids) = self.list(slot, layer)?;
        Some(LinksView { lock, degree, ids })
    }

    /// A consistent snapshot of `slot`'s neighbours on `layer`, taken
    /// optimistically (no shared write). Returns `false` if the node has no
    /// list on that layer.
    #[inline]
    pub(crate) fn read_links(&self, slot: u32, layer: usize, out: &mut Vec<u32>) -> bool {
        let (Some(lock), Some((degree, ids))) = (self.lock(slot), self.list(slot, layer)) else {
            out.clear();
            return false;
        };
        loop {
            let version = lock.read_begin();
            self.copy_list(degree, ids, out);
            if lock.read_validate(version) {
                return true;
            }
        }
    }

    /// `slot`'s neighbours on `layer`, read under the caller's exclusive hold.
    pub(crate) fn read_links_locked(
        &self,
        guard: &NodeGuard<'_>,
        layer: usize,
        out: &mut Vec<u32>,
    ) {
        match self.list(guard.slot, layer) {
            Some((degree, ids)) => self.copy_list(degree, ids, out),
            None => out.clear(),
        }
    }

    /// Replaces `guard`'s node's list on `layer` (at most the layer's degree).
    pub(crate) fn write_links(&self, guard: &NodeGuard<'_>, layer: usize, new_ids: &[u32]) {
        let Some((degree, ids)) = self.list(guard.slot, layer) else {
            return;
        };
        let n = new_ids.len().min(ids.len());
        // Relaxed stores: the exclusive hold's Release fence and Release unlock
        // order them for optimistic and locking readers (lock.rs).
        for (dst, &id) in ids.iter().zip(&new_ids[..n]) {
            dst.store(id, Ordering::Relaxed);
        }
        // Release (not Relaxed): on layer 0 this word also carries the
        // upper-layer index, which `upper_links` reads with Acquire; Release
        // keeps "saw the index => sees its block" true through every rewrite.
        // Only the lock holder writes the word, so load-then-store is exact.
        let upper = degree.load(Ordering::Relaxed) & !DEGREE_MASK;
        degree.store(upper | n as u32, Ordering::Release);
    }

    /// The raw cell word of `slot` (cell id, tombstone bit, or `NO_CELL`).
    #[inline]
    pub(crate) fn cell_word(&self, slot: u32) -> u32 {
        // Acquire: pairs with the Release in `publish_cell`/`set_tombstone`, so
        // the cell's contents and key are visible.
        self.cells
            .get(slot as usize)
            .map_or(NO_CELL, |c| c[0].load(Ordering::Acquire))
    }

    /// The vector of `slot`, if it has one. The borrow is tied to `guard`,
    /// under which the cell word was loaded (see `VectorArena::read`).
    #[inline]
    pub(crate) fn vector<'g>(&'g self, slot: u32, guard: &'g Guard) -> Option<VectorRef<'g>> {
        let (cell, tombstoned) = decode_cell_word(self.cell_word(slot))?;
        Some(VectorRef {
            cell,
            tombstoned,
            vector: self.vectors.read(cell, guard)?,
        })
    }

    /// Accessors for the search loop, resolving slots and cells of the first
    /// chunks without chunk lookups.
    #[inline]
    pub(crate) fn search_view<'g>(&'g self, guard: &'g Guard) -> SearchView<'g> {
        SearchView {
            cells: self.cells.first_chunk(),
            vectors: self.vectors.reader(guard),
            graph: self,
        }
    }

    /// Publishes `cell` as `slot`'s vector (clearing any tombstone) and
    /// returns the previous cell word.
    pub(crate) fn publish_cell(&self, guard: &NodeGuard<'_>, cell: CellId) -> u32 {
        match self.cells.get(guard.slot as usize) {
            // AcqRel: Release publishes the cell contents (and the key
            // stored beside them) written before; the Acquire half orders
            // our later retirement of the old cell after every earlier
            // publication of it. (Found by loom: the entry lock's writer
            // fence, which every caller passed through after writing the
            // cell, already makes a Relaxed swap here publish the cell; the
            // Release is kept so the guarantee does not hang on the lock's
            // internals.)
            Some(word) => word[0].swap(cell, Ordering::AcqRel),
            None => NO_CELL,
        }
    }

    /// Marks `slot` removed; its vector and links stay for navigation.
    pub(crate) fn set_tombstone(&self, guard: &NodeGuard<'_>) {
        if let Some(word) = self.cells.get(guard.slot as usize) {
            // Release: a search that sees the bit also sees everything the
            // remover did before (pairs with `cell_word`'s Acquire).
            word[0].fetch_or(TOMBSTONE, Ordering::Release);
        }
    }

    /// Prepares a never-used slot: allocates its upper layers and empties its
    /// lists. Must run before the slot is published anywhere.
    pub(crate) fn init_node(&self, guard: &NodeGuard<'_>, level: usize) -> Result<()> {
        let level = level.min(MAX_LEVEL);
        let meta = &self
            .level0
            .get(guard.slot as usize)
            .ok_or(Error::CapacityExceeded {
                limit: self.slot_capacity(),
            })?[1];
        if level > 0 && meta.load(Ordering::Acquire) >> DEGREE_BITS == 0 {
            // An index is taken only once its room is checked and reserved:
            // a failure must leave no index without a block, which `export`
            // would write as a hole that `open` rejects. Relaxed (load and
            // CAS): the counter only hands out distinct indices; the block
            // is published below with Release.
            let mut index = self.upper_count.load(Ordering::Relaxed) as usize;
            loop {
                if index + 1 >= 1 << (32 - DEGREE_BITS) {
                    return Err(Error::CapacityExceeded {
                        limit: (1 << (32 - DEGREE_BITS)) * self.m,
                    });
                }
                self.upper_nodes.reserve(index + 1)?;
                match self.upper_count.compare_exchange_weak(
                    index as u32,
                    index as u32 + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => index = now as usize,
                }
            }
            let words = (0..level * (1 + self.m))
                .map(|_| AtomicU32::new(0))
                .collect();
            let block = Box::into_raw(Box::new(UpperLinks::owned(level, words)));
            let cell = self
                .upper_nodes
                .get(index)
                .ok_or(Error::OutOfMemory { bytes: 0 })?;
            // Release (both stores): publish the initialised block to
            // `upper_links`' Acquire loads.
            cell[0].store(block, Ordering::Release);
            meta.store(((index as u32) + 1) << DEGREE_BITS, Ordering::Release);
        }
        self.write_links(guard, 0, &[]);
        Ok(())
    }

    /// The entry point and max level, read as one consistent pair.
    #[inline]
    pub(crate) fn entry(&self) -> Option<(u32, usize)> {
        // Acquire: pairs with the Release in `set_entry`, so the entry node's
        // lists on every layer up to its level are visible.
        let word = self.entry.load(Ordering::Acquire);
        (word != NO_ENTRY).then_some((word as u32, (word >> 32) as usize))
    }

    /// Sets the entry point and max level together. Callers serialise through
    /// the index's promotion mutex.
    pub(crate) fn set_entry(&self, slot: u32, level: usize) {
        // Release: see `entry`.
        self.entry
            .store(((level as u64) << 32) | slot as u64, Ordering::Release);
    }

    /// Empties the entry word (compaction removed every node). Callers keep
    /// every writer out.
    pub(crate) fn clear_entry(&self) {
        // Release: as in `set_entry`.
        self.entry.store(NO_ENTRY, Ordering::Release);
    }

    /// Bytes held by neighbour lists: degree words and ids, level 0 and upper
    /// layers (the lock word of each level-0 record is counted as fixed state).
    pub(crate) fn link_bytes(&self) -> usize {
        let upper: usize = (0..self.upper_count.load(Ordering::Relaxed) as usize)
            .filter_map(|i| self.upper_nodes.get(i))
            .filter_map(|cell| {
                // SAFETY: see `upper_links`; blocks live until `Drop`.
                unsafe { cell[0].load(Ordering::Acquire).as_ref() }
            })
            .map(|u| {
                std::mem::size_of::<UpperLinks>() + if u.owned { u.words().len() * 4 } else { 0 }
            })
            .sum();
        // Each allocated level-0 record's lock word is fixed state; a
        // borrowed record (an opened file's) is not allocated at all.
        self.level0.allocated_bytes() - self.level0.owned_len() * 4 + upper
    }

    /// Bytes of per-slot state other than lists and vectors: the lock word,
    /// the cell word and the anchor, plus the table of upper-layer blocks.
    pub(crate) fn slot_state_bytes(&self) -> usize {
        self.level0.owned_len() * 4
            + self.cells.allocated_bytes()
            + self.upper_nodes.allocated_bytes()
            + self.anchors.allocated_bytes()
    }

    /// A list in place (its raw degree, unclamped, and its whole room), for
    /// callers that keep every writer out (`check_invariants` holds the
    /// writer gate exclusively): no lock is taken and nothing is copied.
    pub(crate) fn list_quiescent(&self, slot: u32, layer: usize) -> Option<(usize, &[AtomicU32])> {
        let (degree, ids) = self.list(slot, layer)?;
        // Relaxed: the caller's exclusive writer gate orders this load after
        // every write to the list.
        Some(((degree.load(Ordering::Relaxed) & DEGREE_MASK) as usize, ids))
    }

    #[cfg(all(test, not(loom)))]
    pub(crate) fn raw_list(&self, slot: u32, layer: usize) -> Option<(usize, Vec<u32>)> {
        let lock = self.lock(slot)?;
        let (degree, ids) = self.list(slot, layer)?;
        let _shared = lock.read();
        // Relaxed: the shared hold orders these reads after the last writer.
        let raw = (degree.load(Ordering::Relaxed) & DEGREE_MASK) as usize;
        let mut out = Vec::new();
        self.copy_list(degree, ids, &mut out);
        Some((raw, out))
    }

    /// The raw arrays of the first `slots` slots, for saving. The caller
    /// holds the index quiescent (no writer runs), so plain loads see a
    /// consistent graph. Lock words are written as 0 (unlocked, version 0);
    /// cell words are replaced by `cell_of(slot)` (saved files hold one vector
    /// per slot, so cell ids are renumbered to slot ids).
    #[cfg(not(loom))]
    pub(crate) fn export(&self, slots: usize) -> GraphExport {
        let stride = 2 + self.m0;
        let mut level0 = Vec::with_capacity(slots * stride);
        let mut cells = Vec::with_capacity(slots);
        let mut anchors = Vec::with_capacity(slots);
        for slot in 0..slots {
            match self.level0.get(slot) {
                Some(record) => {
                    level0.push(0);
                    // Relaxed (all loads here): the caller's exclusive
                    // writer_gate hold orders them after every write.
                    let meta = record[1].load(Ordering::Relaxed);
                    level0.push(meta);
                    let ids = level0.len();
                    level0.extend(record[2..].iter().map(|w| w.load(Ordering::Relaxed)));
                    // Neighbour order carries no meaning; sorted lists let
                    // the validator of an opened file rule out duplicates
                    // with one comparison per id (`persist::check_structure`).
                    let degree = ((meta & DEGREE_MASK) as usize).min(self.m0);
                    level0[ids..ids + degree].sort_unstable();
                }
                None => level0.extend(std::iter::repeat_n(0, stride)),
            }
            let word = self.cell_word(slot as u32);
            cells.push(if word == NO_CELL {
                NO_CELL
            } else {
                slot as u32 | (word & TOMBSTONE)
            });
            anchors.push(self.anchor(slot as u32));
        }
        let upper_count = self.upper_count.load(Ordering::Relaxed) as usize;
        let mut upper = Vec::new();
        for index in 0..upper_count {
            let block = self.upper_nodes.get(index).and_then(|cell| {
                // SAFETY: see `upper_links`; blocks live until `Drop`.
                unsafe { cell[0].load(Ordering::Acquire).as_ref() }
            });
            match block {
                Some(block) => {
                    upper.push(block.level as u32);
                    let start = upper.len();
                    upper.extend(block.words().iter().map(|w| w.load(Ordering::Relaxed)));
                    // Sorted, as on layer 0 (see above).
                    for list in upper[start..].chunks_exact_mut(1 + self.m) {
                        let degree = ((list[0] & DEGREE_MASK) as usize).min(self.m);
                        list[1..1 + degree].sort_unstable();
                    }
                }
                None => upper.push(0),
            }
        }
        GraphExport {
            level0,
            cells,
            anchors,
            upper,
            upper_count,
            entry: self.entry(),
        }
    }

    /// A graph over the per-slot arrays of a mapped file: level-0 records,
    /// cell words, anchors, vectors and keys are used in place (chunk 0 of
    /// each array); upper blocks and the entry point are then restored with
    /// [`Graph::import_upper`].
    ///
    /// # Safety
    /// Every pointer in `arrays` must satisfy [`Chunked::from_borrowed`]'s
    /// contract for `arrays.slots` records of its array (`2 + 2m` words for
    /// `level0`, one word for `cells` and `anchors`, `dim` f32s and one u64
    /// per slot for the vector arena, and `payload_len.div_ceil(4)` words
    /// per slot for `payloads` if present), kept alive by `arrays.keepalive`.
    #[cfg(not(loom))]
    pub(crate) unsafe fn from_borrowed(
        dim: usize,
        m: usize,
        arrays: BorrowedArrays,
    ) -> Result<Self> {
        let m0 = 2 * m;
        let slots = arrays.slots;
        // Growth after an open: a thirty-second of the file per new chunk,
        // so the first insert does not allocate a copy of the whole index.
        let growth = (slots / 32).max(256);
        let keep = &arrays.keepalive;
        // SAFETY (all four): forwarded from this function's contract.
        unsafe {
            Ok(Self {
                m,
                m0,
                level0: Chunked::from_borrowed(
                    arrays.level0,
                    slots,
                    2 + m0,
                    growth,
                    || AtomicU32::new(0),
                    std::sync::Arc::clone(keep),
                ),
                upper_nodes: Chunked::new(
                    slots / m + 4 * ((slots / m) as f64).sqrt() as usize + 16,
                    1,
                    || AtomicPtr::new(std::ptr::null_mut()),
                )?,
                upper_count: AtomicU32::new(0),
                cells: Chunked::from_borrowed(
                    arrays.cells,
                    slots,
                    1,
                    growth,
                    || AtomicU32::new(NO_CELL),
                    std::sync::Arc::clone(keep),
                ),
                anchors: Chunked::from_borrowed(
                    arrays.anchors,
                    slots,
                    1,
                    growth,
                    || AtomicU32::new(UNANCHORED),
                    std::sync::Arc::clone(keep),
                ),
                entry: AtomicU64::new(NO_ENTRY),
                slot_locks: SlotLocks::new(slots)?,
                vectors: VectorArena::from_borrowed(
                    dim,
                    arrays.vectors,
                    arrays.keys,
                    arrays.payloads,
                    slots,
                    growth,
                    std::sync::Arc::clone(keep),
                ),
            })
        }
    }

    /// Restores lists, cell words, anchors, upper blocks and the entry point
    /// from validated arrays (see `persist::restore`) into a fresh graph whose
    /// slot capacity is at least `cells.len()`. Cell ids must already name
    /// cells of `self.vectors`.
    #[cfg(not(loom))]
    pub(crate) fn import(&self, data: &GraphImport<'_>) -> Result<()> {
        let stride = 2 + self.m0;
        for (slot, record) in data.level0.chunks_exact(stride).enumerate() {
            let dst = self.level0.get(slot).ok_or(Error::CapacityExceeded {
                limit: self.slot_capacity(),
            })?;
            // Relaxed (all stores here): the graph is not shared yet; the
            // index reaches other threads only through a later hand-off that
            // synchronises (moving or Arc-sharing the Index).
            for (d, &w) in dst[1..].iter().zip(&record[1..]) {
                d.store(w, Ordering::Relaxed);
            }
        }
        for (slot, &word) in data.cells.iter().enumerate() {
            if let Some(c) = self.cells.get(slot) {
                c[0].store(word, Ordering::Relaxed);
            }
        }
        for (slot, &anchor) in data.anchors.iter().enumerate() {
            self.set_anchor(slot as u32, anchor);
        }
        self.import_upper(PreparedUpper::new(&data.upper_blocks), data.entry)
    }

    /// Installs upper-layer blocks (in table order) and the entry point.
    #[cfg(not(loom))]
    pub(crate) fn import_upper(
        &self,
        upper: PreparedUpper,
        entry: Option<(u32, usize)>,
    ) -> Result<()> {
        let count = upper.0.len();
        self.upper_nodes.reserve(count.max(1))?;
        for (index, block) in upper.0.into_iter().enumerate() {
            let cell = self
                .upper_nodes
                .get(index)
                .ok_or(Error::OutOfMemory { bytes: 0 })?;
            // Ownership moves to the graph, which frees the block in `Drop`.
            cell[0].store(Box::into_raw(block), Ordering::Release);
        }
        self.upper_count.store(count as u32, Ordering::Relaxed);
        if let Some((slot, level)) = entry {
            self.set_entry(slot, level);
        }
        Ok(())
    }

    /// Test hook: overwrite a degree word without any check.
    #[cfg(test)]
    pub(crate) fn corrupt_degree(&self, slot: u32, layer: usize, degree: u32) {
        let (word, _) = self.list(slot, layer).unwrap();
        let upper = word.load(Ordering::Relaxed) & !DEGREE_MASK;
        word.store(upper | degree, Ordering::Relaxed);
    }

    /// Test hook: overwrite a list without any check, to corrupt a graph.
    #[cfg(test)]
    pub(crate) fn corrupt_links(&self, slot: u32, layer: usize, ids: &[u32]) {
        let guard = self.lock_node(slot).unwrap();
        let (degree, list) = self.list(slot, layer).unwrap();
        for (dst, &id) in list.iter().zip(ids) {
            dst.store(id, Ordering::Relaxed);
        }
        let upper = degree.load(Ordering::Relaxed) & !DEGREE_MASK;
        degree.store(upper | ids.len() as u32, Ordering::Relaxed);
        drop(guard);
    }

    /// Test hook: overwrite the entry word.
    #[cfg(test)]
    pub(crate) fn corrupt_entry(&self, slot: u32, level: usize) {
        self.set_entry(slot, level);
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        for index in 0..self.upper_nodes.capacity() {
            if let Some(cell) = self.upper_nodes.get(index) {
                let ptr = cell[0].swap(std::ptr::null_mut(), Ordering::Relaxed);
                if !ptr.is_null() {
                    // SAFETY: produced by `Box::into_raw` in `init_node` and
                    // freed exactly once here (swapped out under `&mut self`).
                    drop(unsafe { Box::from_raw(ptr) });
                }
            }
        }
    }
}
