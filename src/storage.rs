//! Growable arrays that never move, and the vector arena.
//!
//! All raw-memory `unsafe` of the index lives in this module; the algorithm
//! modules (`graph`, `search`, `insert`, `update`) are safe code over the
//! accessors here.
//!
//! # Growing without moving (`Chunked`)
//!
//! Readers hold plain references into these arrays while writers insert, so
//! growth can never reallocate. Storage is a list of chunks: the first holds
//! exactly the initial capacity `C`, the next ones double from `B`, the power
//! of two at or above `C`:
//!
//! ```text
//!  chunk:    0           1              2                  3
//!  records:  [0, C)      [C, C+B)       [C+B, C+3B)        [C+3B, C+7B)  ...
//!            └─ C ─┘     └─── B ───┘    └───── 2B ─────┘   └──────── 4B ────────┘
//! ```
//!
//! So an index that never grows past its capacity is one flat chunk of exactly
//! that size (hnswlib-style, and no memory lost to rounding), and finding a
//! record in it costs one comparison. A new chunk is fully initialised,
//! then published with a `Release` store of its pointer; readers load it with
//! `Acquire`. Chunks are freed only when the array is dropped, which takes
//! `&mut self`, so no reader can still hold a reference.
//!
//! # Vectors (`VectorArena`)
//!
//! Vectors live in *cells*: fixed-stride runs of `dim` f32s, plus the key of
//! the entry that owns the cell. A cell is written only while it is private
//! (just allocated, never yet published) and is immutable once published.
//! Replacing an entry's vector writes a *new* cell, publishes it, and retires
//! the old one through crossbeam-epoch; the old cell returns to the free list
//! only after every thread pinned at the time of the swap has unpinned. So a
//! search that loaded a cell id while pinned reads that cell with ordinary
//! (SIMD) loads, with no data race and no lock: this is the
//! "epoch-protected snapshot" option of the design, applied to vectors.
//!
//! # Huge pages
//!
//! A search touches a few hundred random vectors and link records; over an
//! index of tens of megabytes nearly every one is a TLB miss with 4 KiB
//! pages, and the page walk stalls the very prefetches meant to hide the
//! memory latency. So chunks of 2 MiB or more are advised `MADV_HUGEPAGE`
//! on Linux (vector chunks are also allocated 2 MiB-aligned, so all of them
//! is eligible), *before* they are first written
//! (the kernel backs a region with huge pages when it is faulted in; advice
//! given after the fault only helps once `khugepaged` gets around to it).
//! This is a hint: where transparent huge pages are off, or on other systems,
//! nothing changes but speed.

use std::alloc::{self, Layout};
use std::sync::Arc;

use crossbeam_epoch::Guard;

use crate::error::{Error, Result};
use crate::sync::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Mutex, Ordering};

/// Enough chunks to address 2^32 records from any base >= 1.
const MAX_CHUNKS: usize = 34;

/// Where records live: chunk 0 holds `first` records, chunk k >= 1 holds
/// `2^(k-1) << shift` (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    first: usize,
    shift: u32,
}

impl Geometry {
    fn new(initial: usize) -> Self {
        Self::with_growth(initial, initial)
    }

    /// Chunk 0 of `initial` records, then chunks doubling from `growth`
    /// (rounded up to a power of two, at least 64). A borrowed chunk 0 (a
    /// mapped file) grows from a fraction of its size, so the first insert
    /// after an open does not allocate a second copy of the whole file.
    fn with_growth(initial: usize, growth: usize) -> Self {
        let first = initial.clamp(1, 1 << 31);
        Self {
            first,
            shift: growth
                .clamp(64, 1 << 31)
                .next_power_of_two()
                .trailing_zeros(),
        }
    }

    /// Records in chunk `k`.
    fn chunk_len(&self, k: usize) -> usize {
        if k == 0 {
            self.first
        } else {
            (1usize << (k - 1)) << self.shift
        }
    }

    /// (chunk, offset in chunk) of record `i`.
    #[inline]
    fn locate(&self, i: usize) -> (usize, usize) {
        if i < self.first {
            return (0, i);
        }
        let j = i - self.first;
        let h = (j >> self.shift) + 1;
        let k = (usize::BITS - h.leading_zeros()) as usize; // floor(log2(h)) + 1
        (k, j - (((1usize << (k - 1)) - 1) << self.shift))
    }
}

/// A growable array of fixed-length records of `T` that never moves.
pub(crate) struct Chunked<T> {
    geometry: Geometry,
    /// Elements of `T` per record.
    stride: usize,
    /// Records addressable through published chunks.
    capacity: AtomicUsize,
    chunks: [AtomicPtr<T>; MAX_CHUNKS],
    /// Makes each element of a new chunk.
    init: fn() -> T,
    grow_lock: Mutex<()>,
    /// Owner of a borrowed chunk 0 (see [`Chunked::from_borrowed`]); `None`
    /// when every chunk is owned.
    borrowed: Option<Keepalive>,
}

/// Keeps memory that a [`Chunked`] or [`VectorArena`] borrows alive (a
/// private mapping of an index file); dropped after the arrays stop using it.
pub(crate) type Keepalive = Arc<dyn std::any::Any + Send + Sync>;

impl<T> std::fmt::Debug for Chunked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunked")
            .field("stride", &self.stride)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl<T> Chunked<T> {
    /// An array whose first chunk holds `initial` records, each of `stride`
    /// elements made by `init`.
    pub(crate) fn new(initial: usize, stride: usize, init: fn() -> T) -> Result<Self> {
        let array = Self {
            geometry: Geometry::new(initial),
            stride: stride.max(1),
            capacity: AtomicUsize::new(0),
            chunks: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            init,
            grow_lock: Mutex::new(()),
            borrowed: None,
        };
        array.reserve(1)?;
        Ok(array)
    }

    /// An array whose chunk 0 is `records` records that already exist at
    /// `first` (a mapped file), growing in chunks doubling from `growth`.
    ///
    /// # Safety
    /// `first` must point to `records * stride` initialised, properly aligned
    /// `T`s that stay valid for reads and writes for as long as `keepalive`
    /// lives, and nothing else may access that memory while the array exists
    /// (the array hands out shared references to it, and `T`'s interior
    /// mutability is the only way it is written). `records >= 1`.
    #[cfg(not(loom))]
    pub(crate) unsafe fn from_borrowed(
        first: std::ptr::NonNull<T>,
        records: usize,
        stride: usize,
        growth: usize,
        init: fn() -> T,
        keepalive: Keepalive,
    ) -> Self {
        let geometry = Geometry::with_growth(records, growth);
        let array = Self {
            geometry,
            stride: stride.max(1),
            capacity: AtomicUsize::new(geometry.first),
            chunks: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            init,
            grow_lock: Mutex::new(()),
            borrowed: Some(keepalive),
        };
        // Relaxed: the array is not shared yet; it reaches other threads only
        // through a hand-off that synchronises (moving or Arc-sharing it).
        array.chunks[0].store(first.as_ptr(), Ordering::Relaxed);
        array
    }

    /// Records addressable now.
    pub(crate) fn capacity(&self) -> usize {
        // Acquire: pairs with the Release in `reserve`, so every chunk counted
        // here is visible.
        self.capacity.load(Ordering::Acquire)
    }

    /// Record `i`, or `None` if it is beyond the published chunks.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&[T]> {
        let (k, offset) = self.geometry.locate(i);
        // Acquire: pairs with the Release publication in `reserve`, so the
        // chunk's initialised contents are visible.
        let ptr = self.chunks.get(k)?.load(Ordering::Acquire);
        if ptr.is_null() {
            return None;
        }
        // SAFETY: a non-null chunk pointer came from a leaked boxed slice of
        // exactly `chunk_records(k) * stride` initialised elements, published
        // once and freed only in `Drop` (which needs `&mut self`, so it cannot
        // overlap this borrow). `offset < chunk_records(k)` by construction of
        // `locate`, so the record lies inside the chunk.
        unsafe {
            Some(std::slice::from_raw_parts(
                ptr.add(offset * self.stride),
                self.stride,
            ))
        }
    }

    /// The first chunk as one slice of single-element records (`stride` 1),
    /// for hot loops: indexing it needs no chunk lookup.
    pub(crate) fn first_chunk(&self) -> &[T] {
        // Acquire: pairs with the Release publication in `reserve`.
        let ptr = self.chunks[0].load(Ordering::Acquire);
        if ptr.is_null() {
            return &[];
        }
        // SAFETY: as in `get`: chunk 0 holds `chunk_len(0) * stride`
        // initialised elements and lives until `Drop` (`&mut self`).
        unsafe { std::slice::from_raw_parts(ptr, self.geometry.chunk_len(0) * self.stride) }
    }

    /// Makes sure records `0..len` exist, allocating chunks as needed. Never
    /// moves existing records; readers are not blocked (they never take
    /// `grow_lock`).
    pub(crate) fn reserve(&self, len: usize) -> Result<()> {
        if len <= self.capacity() {
            return Ok(());
        }
        let _grow = self.grow_lock.lock();
        let mut capacity = self.capacity.load(Ordering::Relaxed);
        while capacity < len {
            let k = self.geometry.locate(capacity).0;
            if k >= MAX_CHUNKS {
                return Err(Error::CapacityExceeded { limit: capacity });
            }
            let elements = self.geometry.chunk_len(k) * self.stride;
            let bytes = elements.saturating_mul(std::mem::size_of::<T>());
            let mut chunk: Vec<T> = Vec::new();
            chunk
                .try_reserve_exact(elements)
                .map_err(|_| Error::OutOfMemory { bytes })?;
            advise_huge_pages(chunk.as_ptr() as *const u8, bytes);
            chunk.extend((0..elements).map(|_| (self.init)()));
            let ptr = Box::into_raw(chunk.into_boxed_slice()) as *mut T;
            // Release: publish the initialised chunk to `get`'s Acquire load.
            self.chunks[k].store(ptr, Ordering::Release);
            capacity += self.geometry.chunk_len(k);
            // Release: readers that see the new capacity see the chunk.
            self.capacity.store(capacity, Ordering::Release);
        }
        Ok(())
    }

    /// Bytes allocated on the heap (for memory accounting; a borrowed
    /// chunk 0 is not counted).
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.owned_len() * self.stride * std::mem::size_of::<T>()
    }

    /// Elements in allocated chunks (the borrowed first chunk, if any, is
    /// the caller's memory, not ours).
    pub(crate) fn owned_len(&self) -> usize {
        let borrowed = if self.borrowed.is_some() {
            self.geometry.first
        } else {
            0
        };
        self.capacity().saturating_sub(borrowed)
    }
}

impl<T> Drop for Chunked<T> {
    fn drop(&mut self) {
        let first_owned = usize::from(self.borrowed.is_some());
        for k in first_owned..MAX_CHUNKS {
            let ptr = self.chunks[k].load(Ordering::Relaxed);
            if !ptr.is_null() {
                let elements = self.geometry.chunk_len(k) * self.stride;
                // SAFETY: `ptr` came from `Box::into_raw` of a boxed slice of
                // exactly `elements` elements in `reserve`, and is dropped once
                // (we have `&mut self`).
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, elements)) });
            }
        }
    }
}

/// Identifies a vector cell.
pub(crate) type CellId = u32;

/// A raw, 64-byte aligned chunk of f32s, owned by the arena.
struct RawChunk {
    ptr: *mut f32,
    layout: Layout,
}

/// The vector cells. See the module docs for the cell lifecycle.
pub(crate) struct VectorArena {
    dim: usize,
    geometry: Geometry,
    chunks: [AtomicPtr<f32>; MAX_CHUNKS],
    /// Keys of the entries owning each cell, parallel to the cells.
    keys: Chunked<AtomicU64>,
    /// Each cell's payload (`payload_len` bytes as little-endian u32
    /// words, the last one zero-padded), parallel to the cells; `None`
    /// when the index stores no payloads. Same protocol as `keys`: written
    /// while the cell is private, immutable while it is published.
    payloads: Option<Chunked<AtomicU32>>,
    /// Bytes of payload per cell.
    payload_len: usize,
    /// Owned allocations, for `Drop`.
    owned: Mutex<Vec<RawChunk>>,
    /// Next never-used cell.
    next: AtomicUsize,
    /// Cells whose grace period has passed.
    free: Arc<Mutex<Vec<CellId>>>,
    /// Cells retired but maybe still read (for accounting only).
    retired_pending: Arc<AtomicUsize>,
    /// Owner of a borrowed chunk 0 (see [`VectorArena::from_borrowed`]).
    _borrowed: Option<Keepalive>,
}

// SAFETY: the raw chunk pointers are owned by the arena (never aliased by
// another owner) and only dereferenced under the cell protocol in the module
// docs: a cell is written while private to one thread and read only after
// publication, so sharing the arena between threads is sound.
unsafe impl Send for VectorArena {}
// SAFETY: as above; all mutable shared state other than cell contents is
// behind atomics or mutexes.
unsafe impl Sync for VectorArena {}

impl std::fmt::Debug for VectorArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorArena")
            .field("dim", &self.dim)
            .field("cells", &self.next.load(Ordering::Relaxed))
            .finish()
    }
}

impl VectorArena {
    /// An arena of `initial_cells` cells that grows by chunks doubling from
    /// `growth` cells.
    pub(crate) fn new(dim: usize, initial_cells: usize, growth: usize) -> Result<Self> {
        let geometry = Geometry::with_growth(initial_cells, growth);
        let arena = Self {
            dim,
            geometry,
            chunks: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            keys: Chunked::new(geometry.first, 1, || AtomicU64::new(0))?,
            payloads: None,
            payload_len: 0,
            owned: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            free: Arc::new(Mutex::new(Vec::new())),
            retired_pending: Arc::new(AtomicUsize::new(0)),
            _borrowed: None,
        };
        arena.ensure_chunk(0)?;
        Ok(arena)
    }

    /// The same (still empty) arena with `payload_len` bytes of payload
    /// per cell.
    pub(crate) fn with_payloads(mut self, payload_len: usize) -> Result<Self> {
        if payload_len > 0 {
            let words = payload_len.div_ceil(4);
            let payloads = Chunked::new(self.geometry.first, words, || AtomicU32::new(0))?;
            // Cover every chunk already allocated (chunk 0).
            payloads.reserve(self.keys.capacity())?;
            self.payloads = Some(payloads);
            self.payload_len = payload_len;
        }
        Ok(self)
    }

    /// An arena whose chunk 0 is `cells` cells that already exist (a mapped
    /// file): vectors at `vectors` (`cells * dim` f32s), their keys at
    /// `keys` (`cells` u64s) and, if given, their payloads (`payload_len`
    /// bytes each) at `payloads` (`cells * payload_len.div_ceil(4)` u32
    /// words, as in [`with_payloads`](Self::with_payloads)). All of them
    /// count as handed out; new cells come from chunks doubling from
    /// `growth`.
    ///
    /// # Safety
    /// Every pointer must address initialised, aligned memory of those
    /// lengths that stays valid for reads and writes while `keepalive` lives
    /// and that nothing else accesses while the arena exists. Cells are then
    /// under the arena's protocol (module docs): a cell is written only while
    /// private (recycled after its grace period). `cells >= 1`, and
    /// `payload_len >= 1` if `payloads` is given.
    #[cfg(not(loom))]
    pub(crate) unsafe fn from_borrowed(
        dim: usize,
        vectors: std::ptr::NonNull<f32>,
        keys: std::ptr::NonNull<AtomicU64>,
        payloads: Option<(std::ptr::NonNull<AtomicU32>, usize)>,
        cells: usize,
        growth: usize,
        keepalive: Keepalive,
    ) -> Self {
        let geometry = Geometry::with_growth(cells, growth);
        let payload_len = payloads.map_or(0, |(_, len)| len);
        // SAFETY: forwarded from this function's contract for `payloads`:
        // `cells` records of `payload_len.div_ceil(4)` words each. Same
        // geometry as `keys` below, so both grow in step (`ensure_chunk`).
        let payloads = payloads.map(|(first, len)| unsafe {
            Chunked::from_borrowed(
                first,
                cells,
                len.div_ceil(4),
                growth,
                || AtomicU32::new(0),
                Arc::clone(&keepalive),
            )
        });
        let arena = Self {
            dim,
            geometry,
            chunks: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            // SAFETY: forwarded from this function's contract for `keys`.
            keys: unsafe {
                Chunked::from_borrowed(
                    keys,
                    cells,
                    1,
                    growth,
                    || AtomicU64::new(0),
                    Arc::clone(&keepalive),
                )
            },
            payloads,
            payload_len,
            owned: Mutex::new(Vec::new()),
            next: AtomicUsize::new(cells),
            free: Arc::new(Mutex::new(Vec::new())),
            retired_pending: Arc::new(AtomicUsize::new(0)),
            _borrowed: Some(keepalive),
        };
        // Relaxed: not shared yet (as in `Chunked::from_borrowed`).
        arena.chunks[0].store(vectors.as_ptr(), Ordering::Relaxed);
        arena
    }

    /// Allocates chunk `k` if it does not exist.
    fn ensure_chunk(&self, k: usize) -> Result<()> {
        if k >= self.chunks.len() {
            return Err(Error::CapacityExceeded {
                limit: u32::MAX as usize >> 1,
            });
        }
        let mut owned = self.owned.lock();
        // Relaxed: we hold `owned`, which serialises all chunk publication.
        if !self.chunks[k].load(Ordering::Relaxed).is_null() {
            return Ok(());
        }
        let cells = self.geometry.chunk_len(k);
        let bytes = cells
            .checked_mul(self.dim.max(1) * 4)
            .ok_or(Error::OutOfMemory { bytes: usize::MAX })?;
        let align = if bytes >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        let layout =
            Layout::from_size_align(bytes, align).map_err(|_| Error::OutOfMemory { bytes })?;
        // SAFETY: `layout` has non-zero size (chunk_len >= 1, dim >= 1).
        let ptr = unsafe { alloc::alloc(layout) } as *mut f32;
        if ptr.is_null() {
            return Err(Error::OutOfMemory { bytes });
        }
        // Advice first, then the first write (see the module docs).
        advise_huge_pages(ptr as *const u8, bytes);
        // SAFETY: `ptr` is a fresh allocation of `bytes` bytes, private to
        // this thread until published below; zeroing makes every cell a
        // valid (if meaningless) run of f32s.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        let end: usize = (0..=k).map(|c| self.geometry.chunk_len(c)).sum();
        self.keys.reserve(end)?;
        if let Some(payloads) = &self.payloads {
            payloads.reserve(end)?;
        }
        owned.push(RawChunk { ptr, layout });
        // Release: publish the zeroed chunk to readers' Acquire loads.
        self.chunks[k].store(ptr, Ordering::Release);
        Ok(())
    }

    /// Pointer to the first f32 of `cell`, or `None` if its chunk does not exist.
    #[inline]
    fn cell_ptr(&self, cell: CellId) -> Option<*mut f32> {
        let (k, index) = self.geometry.locate(cell as usize);
        // Acquire: pairs with the Release in `ensure_chunk`.
        let base = self.chunks.get(k)?.load(Ordering::Acquire);
        if base.is_null() {
            return None;
        }
        let offset = index * self.dim;
        // SAFETY: `index < chunk_len(k)` (from `locate`), so
        // `offset + dim <= chunk_len(k) * dim`, the chunk's length in f32s,
        // and the pointer stays inside the allocation.
        Some(unsafe { base.add(offset) })
    }

    /// Takes a private cell, writes `key` and `vector` into it, and returns it.
    /// The cell is not reachable by any reader until its id is published.
    #[cfg(any(test, loom))]
    pub(crate) fn allocate(&self, key: u64, vector: &[f32]) -> Result<CellId> {
        self.allocate_with_payload(key, vector, &[])
    }

    /// [`allocate`](Self::allocate), also writing the cell's payload
    /// (`payload` shorter than `payload_len` is zero-padded; longer is cut:
    /// callers check the length).
    pub(crate) fn allocate_with_payload(
        &self,
        key: u64,
        vector: &[f32],
        payload: &[u8],
    ) -> Result<CellId> {
        // Two statements: the free list's guard must be gone before
        // `reclaim_before_growth` runs deferred frees, which take it.
        let recycled = self.free.lock().pop();
        let recycled = recycled.or_else(|| self.reclaim_before_growth());
        let cell = match recycled {
            Some(cell) => cell,
            None => {
                let cell = self.next.fetch_add(1, Ordering::Relaxed);
                if cell >= u32::MAX as usize >> 1 {
                    self.next.fetch_sub(1, Ordering::Relaxed);
                    return Err(Error::CapacityExceeded { limit: cell });
                }
                self.ensure_chunk(self.geometry.locate(cell).0)?;
                cell as CellId
            }
        };
        let ptr = self.cell_ptr(cell).ok_or(Error::OutOfMemory { bytes: 0 })?;
        let n = vector.len().min(self.dim);
        // SAFETY: the cell is private to this thread: it is either fresh from
        // `next` (never handed out before) or came off the free list, which a
        // cell reaches only after the epoch grace period of its retirement, so
        // no reader holds it. `ptr` addresses `dim` f32s inside the chunk.
        unsafe { std::ptr::copy_nonoverlapping(vector.as_ptr(), ptr, n) };
        if let Some(slot) = self.keys.get(cell as usize) {
            // Relaxed: the key is published together with the cell id by the
            // caller's Release store of that id.
            slot[0].store(key, Ordering::Relaxed);
        }
        if let Some(words) = self.payloads.as_ref().and_then(|p| p.get(cell as usize)) {
            let payload = &payload[..payload.len().min(self.payload_len)];
            for (i, word) in words.iter().enumerate() {
                let mut bytes = [0u8; 4];
                let from = payload.get(i * 4..).unwrap_or(&[]);
                let n = from.len().min(4);
                bytes[..n].copy_from_slice(&from[..n]);
                // Relaxed: as the key above, published by the caller's
                // Release store of the cell id.
                word.store(u32::from_le_bytes(bytes), Ordering::Relaxed);
            }
        }
        Ok(cell)
    }

    /// Appends the payload of a published `cell` (`payload_len` bytes) to
    /// `out`: the protocol of [`read`](Self::read) (cell id loaded under
    /// `_guard`), so the bytes are the ones written with that cell's vector.
    #[inline]
    pub(crate) fn payload_into(&self, cell: CellId, _guard: &Guard, out: &mut Vec<u8>) {
        let Some(payloads) = &self.payloads else {
            return;
        };
        let start = out.len();
        if let Some(words) = payloads.get(cell as usize) {
            for word in words {
                // Relaxed: ordered after the cell's writes by the caller's
                // Acquire load of the cell id (see `key`).
                out.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
            }
        }
        out.resize(start + self.payload_len, 0);
    }

    /// A recycled cell, if retired cells are pending and the next fresh cell
    /// would open a new chunk: growing then would cost a whole chunk (memory
    /// that stays) for cells whose grace period is merely not over yet.
    /// Flushing this thread's deferred frees into the global queue and
    /// collecting usually ends it within a few rounds, since searches and
    /// writers unpin constantly. With a reader pinned for a long time it
    /// cannot, and the arena grows: garbage is then bounded only by the
    /// updates made during that pin (see [`VectorArena::pending_bytes`]).
    fn reclaim_before_growth(&self) -> Option<CellId> {
        // Growth is rare, so this may take its time: a pinned thread that
        // was descheduled (more threads than cores) holds the epoch back
        // until it runs again, hence the yields between rounds.
        const ROUNDS: usize = 16;
        // Relaxed (both loads): a heuristic; a stale value costs at most an
        // early chunk or a few wasted flushes.
        let next = self.next.load(Ordering::Relaxed);
        let (k, _) = self.geometry.locate(next);
        if self
            .chunks
            .get(k)
            .is_none_or(|c| !c.load(Ordering::Relaxed).is_null())
        {
            return None;
        }
        for _ in 0..ROUNDS {
            if self.retired_pending.load(Ordering::Relaxed) == 0 {
                return None;
            }
            crossbeam_epoch::pin().flush();
            if let Some(cell) = self.free.lock().pop() {
                return Some(cell);
            }
            #[cfg(not(loom))]
            std::thread::yield_now();
        }
        None
    }

    /// Bytes of cells retired but not yet recycled (their grace period is
    /// not over: some thread that was pinned when they were retired still
    /// is, or no thread has collected since).
    pub(crate) fn pending_bytes(&self) -> usize {
        // Relaxed: a statistic.
        self.retired_pending.load(Ordering::Relaxed) * (self.dim * 4 + 8)
    }

    /// Overwrites the key stored with a cell (seeded mutants only: a
    /// published cell's key never changes).
    pub(crate) fn set_key(&self, cell: CellId, key: u64) {
        if let Some(slot) = self.keys.get(cell as usize) {
            // Relaxed: this is the mutant's bug, a store after publication.
            slot[0].store(key, Ordering::Relaxed);
        }
    }

    /// Returns a cell that was never published (e.g. after a failed insert).
    pub(crate) fn release_unpublished(&self, cell: CellId) {
        self.free.lock().push(cell);
    }

    /// Retires a cell that readers may still hold: it is recycled only after
    /// every thread currently pinned has unpinned.
    pub(crate) fn retire(&self, cell: CellId, guard: &Guard) {
        // The seeded mutant `retire_frees_at_once` (loom builds,
        // `scripts/loom-mutants.sh`) skips the grace period; model L2 must
        // catch a reader that then sees the cell recycled under it.
        if crate::sync::mutant("retire_frees_at_once") {
            self.free.lock().push(cell);
            return;
        }
        let free = Arc::clone(&self.free);
        let pending = Arc::clone(&self.retired_pending);
        pending.fetch_add(1, Ordering::Relaxed);
        guard.defer(move || {
            free.lock().push(cell);
            pending.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// The vector in a published cell.
    ///
    /// The `_guard` lifetime bounds the borrow: the caller loaded `cell` from a
    /// slot while pinned by this guard, so the cell cannot be recycled before
    /// the borrow ends. That protocol is what makes this safe; it is upheld by
    /// [`crate::graph::Graph::vector`], the only caller.
    #[inline]
    pub(crate) fn read<'g>(&'g self, cell: CellId, _guard: &'g Guard) -> Option<&'g [f32]> {
        let ptr = self.cell_ptr(cell)?;
        // SAFETY: the cell was published (its id was read from a slot with
        // Acquire after the allocating thread's Release store), so its
        // contents are initialised and visible; it is immutable while
        // published and cannot be recycled while `_guard` pins this thread
        // (see `retire`). `ptr` addresses `dim` f32s inside a live chunk.
        Some(unsafe { std::slice::from_raw_parts(ptr, self.dim) })
    }

    /// A reader for the search loop: it resolves cells of the first chunk
    /// with one multiply (no chunk lookup) and borrows under `guard`.
    pub(crate) fn reader<'g>(&'g self, guard: &'g Guard) -> CellReader<'g> {
        // Acquire: pairs with the Release in `ensure_chunk`.
        let base = self.chunks[0].load(Ordering::Acquire);
        CellReader {
            base,
            first: if base.is_null() {
                0
            } else {
                self.geometry.chunk_len(0)
            },
            dim: self.dim,
            arena: self,
            guard,
        }
    }

    /// The key stored with a cell.
    #[inline]
    pub(crate) fn key(&self, cell: CellId) -> u64 {
        // Relaxed: see `allocate`; the caller's Acquire load of the cell id
        // orders this read after the key's store.
        self.keys
            .get(cell as usize)
            .map_or(u64::MAX, |k| k[0].load(Ordering::Relaxed))
    }

    /// Hints the CPU to fetch the first cache lines of a cell.
    #[inline]
    pub(crate) fn prefetch(&self, cell: CellId) {
        if let Some(ptr) = self.cell_ptr(cell) {
            prefetch_lines(ptr as *const u8, self.dim * 4);
        }
    }

    /// Cells handed out so far (high-water mark).
    #[cfg(test)]
    pub(crate) fn cells_used(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    /// Bytes allocated for vector data.
    pub(crate) fn vector_bytes(&self) -> usize {
        self.owned.lock().iter().map(|c| c.layout.size()).sum()
    }

    /// Bytes allocated for the keys stored beside the cells.
    pub(crate) fn key_bytes(&self) -> usize {
        self.keys.allocated_bytes() + self.payloads.as_ref().map_or(0, |p| p.allocated_bytes())
    }
}

/// See [`VectorArena::reader`].
pub(crate) struct CellReader<'g> {
    base: *const f32,
    first: usize,
    dim: usize,
    arena: &'g VectorArena,
    guard: &'g Guard,
}

impl<'g> CellReader<'g> {
    /// The vector in a published cell whose id was loaded under the guard
    /// this reader borrows (the protocol of [`VectorArena::read`]).
    #[inline]
    pub(crate) fn read(&self, cell: CellId) -> Option<&'g [f32]> {
        let index = cell as usize;
        if index < self.first {
            // SAFETY: chunk 0 (`base`, `first` cells of `dim` f32s) lives
            // until the arena drops, which the `'g` borrow excludes;
            // `index < first` keeps the slice inside it. The cell is
            // published and immutable under the guard, as in `VectorArena::read`.
            return Some(unsafe {
                std::slice::from_raw_parts(self.base.add(index * self.dim), self.dim)
            });
        }
        self.arena.read(cell, self.guard)
    }

    /// Hints the CPU to fetch a cell's vector.
    #[inline]
    pub(crate) fn prefetch(&self, cell: CellId) {
        let index = cell as usize;
        if index < self.first {
            prefetch_lines(
                self.base.wrapping_add(index * self.dim) as *const u8,
                self.dim * 4,
            );
        } else {
            self.arena.prefetch(cell);
        }
    }
}

impl Drop for VectorArena {
    fn drop(&mut self) {
        for chunk in self.owned.lock().drain(..) {
            // SAFETY: allocated in `ensure_chunk` with exactly this layout and
            // freed once; `&mut self` means no reader borrows it.
            unsafe { alloc::dealloc(chunk.ptr as *mut u8, chunk.layout) };
        }
    }
}

/// The transparent huge page size on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back `[ptr, ptr + bytes)` with transparent huge pages
/// (see the module docs). A no-op below 2 MiB, off Linux, and under loom.
#[inline]
fn advise_huge_pages(ptr: *const u8, bytes: usize) {
    #[cfg(all(target_os = "linux", not(loom)))]
    {
        if bytes < HUGE_PAGE {
            return;
        }
        // madvise wants a page-aligned start; round inwards to 4 KiB pages
        // (every page size Linux uses is a multiple of 4 KiB, and a partial
        // huge page at either end is simply not eligible).
        const PAGE: usize = 4096;
        let start = (ptr as usize).next_multiple_of(PAGE);
        let end = (ptr as usize + bytes) & !(PAGE - 1);
        if end > start {
            // SAFETY: the range lies inside one live allocation owned by the
            // caller; MADV_HUGEPAGE changes only how the kernel backs it, never
            // its contents or validity. Failure (THP disabled, old kernel) is
            // harmless and deliberately ignored.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", not(loom))))]
    {
        let _ = (ptr, bytes);
    }
}

/// Prefetches up to sixteen cache lines (1 KiB) starting at `ptr` into L1.
/// Fetching the whole vector rather than its first line measured +8% QPS on
/// siftsmall and +30% on the 100k clustered set (2026-11-24, this machine).
#[inline]
pub(crate) fn prefetch_lines(ptr: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let lines = bytes.div_ceil(64).min(16);
        for line in 0..lines {
            // SAFETY: SSE is part of the x86-64 baseline, so the instruction
            // exists on every CPU this code runs on; a prefetch is a hint that
            // never faults or reads into the program, whatever the address
            // (`wrapping_add` computes it without claiming it is in bounds).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(line * 64) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ptr, bytes);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn chunked_locates_every_record_once_across_growth() {
        let array: Chunked<AtomicU32> = Chunked::new(64, 3, || AtomicU32::new(0)).unwrap();
        array.reserve(5000).unwrap();
        assert!(array.capacity() >= 5000);
        for i in 0..5000 {
            let record = array.get(i).unwrap();
            assert_eq!(record.len(), 3);
            assert_eq!(
                record[0].swap(1, Ordering::Relaxed),
                0,
                "record {i} aliases another"
            );
        }
        assert!(array.get(1 << 40).is_none());
    }

    #[test]
    fn geometry_tiles_the_index_space_without_gaps_or_overlaps() {
        for initial in [1, 3, 64, 100, 1000, 4096] {
            let g = Geometry::new(initial);
            let mut expected = (0, 0);
            for i in 0..50_000 {
                let (k, offset) = g.locate(i);
                if (k, offset) != expected {
                    assert_eq!(
                        (k, offset),
                        (expected.0 + 1, 0),
                        "initial {initial}, record {i}"
                    );
                }
                assert!(offset < g.chunk_len(k));
                expected = (k, offset + 1);
            }
        }
    }

    #[test]
    fn growth_does_not_move_existing_records() {
        let array: Chunked<AtomicU32> = Chunked::new(64, 1, || AtomicU32::new(7)).unwrap();
        let before = array.get(10).unwrap().as_ptr();
        array.reserve(100_000).unwrap();
        assert_eq!(before, array.get(10).unwrap().as_ptr());
        assert_eq!(array.get(99_999).unwrap()[0].load(Ordering::Relaxed), 7);
    }

    #[test]
    fn arena_round_trips_cells_and_recycles_after_grace() {
        let arena = VectorArena::new(5, 64, 64).unwrap();
        let a = arena.allocate(11, &[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let b = arena.allocate(22, &[5.0; 5]).unwrap();
        assert_ne!(a, b);
        let guard = crossbeam_epoch::pin();
        assert_eq!(arena.read(a, &guard).unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(arena.key(b), 22);
        arena.release_unpublished(b);
        let c = arena.allocate(33, &[0.5; 5]).unwrap();
        assert_eq!(c, b, "an unpublished cell is reused at once");
        assert_eq!(arena.key(c), 33);
        let mut cells = Vec::new();
        for i in 0..10_000 {
            cells.push(arena.allocate(i, &[i as f32; 5]).unwrap());
        }
        assert!(arena.cells_used() >= 10_002);
        for (i, &cell) in cells.iter().enumerate() {
            assert_eq!(arena.read(cell, &guard).unwrap(), &[i as f32; 5]);
            assert_eq!(arena.key(cell), i as u64);
        }
    }
}
