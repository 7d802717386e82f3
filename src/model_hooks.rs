//! Entry points for the loom models in `tests/loom.rs`, compiled into loom
//! builds only (`--cfg loom`) and hidden from the docs: L2 models the
//! vector arena's epoch-based reclamation on its own, which the public API
//! reaches only through whole updates, L4 and L7 read the entry point, and
//! L5 counts searches that expanded a node with an empty layer-0 list.

use crate::graph::Graph;
use crate::index::Index;
use crate::storage::VectorArena;

/// The vector arena of an index (see `storage.rs`), for model L2.
#[derive(Debug)]
pub struct Arena(VectorArena);

impl Arena {
    /// An arena of `cells` cells of `dim` f32s.
    pub fn new(dim: usize, cells: usize) -> Option<Self> {
        VectorArena::new(dim, cells, cells).ok().map(Self)
    }

    /// A private cell holding `key` and `vector` (published by the caller).
    pub fn allocate(&self, key: u64, vector: &[f32]) -> Option<u32> {
        self.0.allocate(key, vector).ok()
    }

    /// Retires a published cell, as an update does after swapping it out.
    pub fn retire(&self, cell: u32) {
        let guard = crossbeam_epoch::pin();
        self.0.retire(cell, &guard);
    }

    /// Runs `f` pinned, as a search does; `f` reads cells (key and vector)
    /// through the function it is given.
    pub fn pinned<R>(&self, f: impl FnOnce(&dyn Fn(u32) -> Option<(u64, Vec<f32>)>) -> R) -> R {
        let guard = crossbeam_epoch::pin();
        let read = |cell: u32| {
            let vector = self.0.read(cell, &guard)?.to_vec();
            Some((self.0.key(cell), vector))
        };
        f(&read)
    }
}

/// The entry point and max level of `index`'s graph, for model L4.
pub fn entry(index: &Index) -> Option<(u32, usize)> {
    Graph::entry(&index.graph)
}

/// The key stored with the entry point's vector, for model L7.
pub fn entry_key(index: &Index) -> Option<u64> {
    entry(index).map(|(slot, _)| index.key_at(slot))
}

std::thread_local! {
    /// Layer-0 expansions of a node with an empty list by searches on this
    /// thread (loom runs each test's model on its own test thread; a plain
    /// counter for the model's assertions, not part of the modelled state,
    /// and per thread so tests running side by side do not mix).
    static EMPTY_EXPANSIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

pub(crate) fn note_empty_expansion() {
    EMPTY_EXPANSIONS.with(|n| n.set(n.get() + 1));
}

/// See `EMPTY_EXPANSIONS`.
pub fn empty_expansions() -> usize {
    EMPTY_EXPANSIONS.with(|n| n.get())
}

/// Switches every slot of `index` from the spinning entry lock to a
/// blocking `loom::sync::RwLock` (see `slot_lock.rs`), so that an
/// algorithm-level model can run at preemption bound 2. Call before the
/// model's threads touch the index.
pub fn block_on_slot_locks(index: &Index) {
    index.graph.block_on_slot_locks();
}
