//! Per-search working memory, pooled so searches allocate nothing.
//!
//! A search needs a visited set over all slots and two heaps. The visited set
//! is a `u16` tag per slot compared against a per-search generation, so
//! clearing it is one increment (hnswlib's `VisitedList`); the array is reset
//! only when the generation wraps, every 65,535 searches. Scratches live in a
//! pool owned by the index (regex-automata's `Pool` idea, without thread
//! locals, so an index dropped on one thread leaves nothing behind on others).

use std::cmp::Ordering as CmpOrdering;

use crate::beam::Beam;

use crate::sync::Mutex;

/// A node with its distance to the query, ordered by distance alone (ties
/// are rare and their order immaterial; the slot tie-break cost ~2% QPS).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scored {
    pub(crate) dist: f32,
    pub(crate) slot: u32,
    /// The vector cell the distance was computed on (keys come from it).
    pub(crate) cell: u32,
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        // total_cmp: never panics, even on NaN from overflowing inputs.
        self.dist.total_cmp(&other.dist)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Visited {
    tags: Vec<u16>,
    generation: u16,
}

impl Visited {
    /// Starts a new search over `slots` slots.
    pub(crate) fn reset(&mut self, slots: usize) {
        if self.tags.len() < slots {
            self.tags.resize(slots, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.tags.fill(0);
            self.generation = 1;
        }
    }

    /// Forgets that `slot` was visited (after a torn list read was discarded).
    #[inline]
    pub(crate) fn unmark(&mut self, slot: u32) {
        if let Some(tag) = self.tags.get_mut(slot as usize) {
            // Generation 0 is never current (see `reset`).
            *tag = 0;
        }
    }

    /// Whether `slot` is within the slots sized for (an `insert` of it does
    /// not grow the marks).
    #[inline]
    pub(crate) fn covers(&self, slot: u32) -> bool {
        (slot as usize) < self.tags.len()
    }

    /// Marks `slot`; returns `true` if it was not yet visited.
    #[inline]
    pub(crate) fn insert(&mut self, slot: u32) -> bool {
        let i = slot as usize;
        if i >= self.tags.len() {
            // A slot allocated after this search began; grow (rare).
            self.tags.resize(i + 1, 0);
        }
        let tag = &mut self.tags[i];
        if *tag == self.generation {
            false
        } else {
            *tag = self.generation;
            true
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Scratch {
    pub(crate) visited: Visited,
    /// The beam of the current layer search (frontier and results).
    pub(crate) beam: Beam,
    /// A copied neighbour list.
    pub(crate) links: Vec<u32>,
    /// Unvisited neighbours of the node being expanded, with their cell words.
    pub(crate) fresh: Vec<(u32, u32)>,
    /// The prepared (normalised) query.
    pub(crate) query: Vec<f32>,
    /// Distances computed by the last greedy descent (for
    /// [`SearchStats`](crate::SearchStats)).
    pub(crate) descent_distances: usize,
}

/// The pool; at most `MAX_POOLED` scratches are kept.
#[derive(Debug, Default)]
pub(crate) struct ScratchPool {
    free: Mutex<Vec<Scratch>>,
}

const MAX_POOLED: usize = 256;

impl ScratchPool {
    pub(crate) fn take(&self) -> PooledScratch<'_> {
        let scratch = self.free.lock().pop().unwrap_or_default();
        PooledScratch {
            pool: self,
            scratch: Some(scratch),
        }
    }
}

/// A scratch on loan; returned to the pool on drop (also when unwinding).
#[derive(Debug)]
pub(crate) struct PooledScratch<'a> {
    pool: &'a ScratchPool,
    scratch: Option<Scratch>,
}

impl std::ops::Deref for PooledScratch<'_> {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        self.scratch.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for PooledScratch<'_> {
    fn deref_mut(&mut self) -> &mut Scratch {
        self.scratch.as_mut().expect("present until drop")
    }
}

impl Drop for PooledScratch<'_> {
    fn drop(&mut self) {
        if let Some(scratch) = self.scratch.take() {
            let mut free = self.pool.free.lock();
            if free.len() < MAX_POOLED {
                free.push(scratch);
            }
        }
    }
}
