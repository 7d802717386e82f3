//! # nann: a concurrent HNSW index for real-time retrieval
//!
//! nann is an embeddable approximate-nearest-neighbour index (HNSW, Malkov &
//! Yashunin 2018) built for workloads that search and write at the same time:
//! millions of reads and thousands of in-place writes per second, as in
//! real-time ad retrieval where an ad's embedding changes whenever its bids do.
//!
//! ```
//! use std::sync::Arc;
//! use nann::{Index, IndexParams, Metric};
//!
//! let index = Arc::new(Index::new(IndexParams::new(4, Metric::Cosine).m(16))?);
//! index.insert(1, &[1.0, 0.0, 0.0, 0.0])?;
//! index.insert(2, &[0.0, 1.0, 0.0, 0.0])?;
//!
//! // Searches run while another thread updates an entry in place.
//! let writer = {
//!     let index = Arc::clone(&index);
//!     std::thread::spawn(move || index.update(2, &[0.0, 0.9, 0.1, 0.0]))
//! };
//! let hits = index.search(&[1.0, 0.1, 0.0, 0.0], 1, 32)?;
//! assert_eq!(hits[0].key, 1);
//! writer.join().unwrap()?;
//! # Ok::<(), nann::Error>(())
//! ```
//!
//! ## What it offers
//!
//! * [`Index::insert`], [`Index::search`] (top-k, `ef` per call),
//!   [`Index::search_filtered`] (predicate on the key, with an exact-scan
//!   fallback for selective filters), [`Index::search_batch`],
//!   [`Index::search_with_stats`] (the distances one search computed),
//!   [`Index::update`] (in place: vector and links), [`Index::remove`]
//!   (immediate; the slot is reused), [`Index::insert_many`] (parallel bulk
//!   build with progress), [`Index::check_invariants`], [`Index::stats`],
//!   [`Index::memory_usage`].
//! * Metrics L2 (squared), inner product and cosine; SIMD kernels chosen at run
//!   time (AVX-512F, AVX2+FMA, NEON, scalar).
//! * Typed errors ([`Error`]); no panics on caller input; no printing.
//!
//! ## How it is built
//!
//! ```text
//!   Index ─┬─ KeyMap        key -> slot (hashbrown table of u32 slots)
//!          ├─ Graph ─┬─ level0   flat records [lock | degree | M0 ids] per slot
//!          │         ├─ upper    per-node lists for layers >= 1
//!          │         ├─ cells    slot -> vector cell id | tombstone bit
//!          │         └─ entry    (slot, max level) in one atomic word
//!          ├─ VectorArena  immutable vector cells, recycled through crossbeam-epoch
//!          └─ ScratchPool  visited sets and heaps, reused across searches
//! ```
//!
//! Each entry has a readers-writer spinlock ([`EntryLock`]) that writers hold
//! exclusively while they change the entry's lists or swap its vector.
//! Searches never write shared memory: they copy neighbour lists under an
//! optimistic version check and read vectors from immutable, epoch-protected
//! cells. The module docs of `lock`, `graph`, `storage`, `insert` and `update`
//! argue every memory ordering; all atomics come from one `sync` module that
//! switches to loom under `--cfg loom`.
//!
//! Memory never moves: the per-slot arrays grow by adding chunks, so readers
//! are not blocked and no reference is invalidated when the index grows past
//! its initial capacity.

#![deny(missing_docs)]
#![warn(missing_debug_implementations, unsafe_op_in_unsafe_fn)]

mod anchor;
#[cfg(all(feature = "bar", not(loom)))]
pub mod bar;
mod beam;
mod beam_retrieval;
mod compact;
#[cfg(all(feature = "cuda", not(loom)))]
pub mod cuda;
mod distance;
#[cfg(not(loom))]
mod durable;
mod error;
mod graph;
mod index;
mod insert;
mod invariants;
mod keymap;
mod level;
#[cfg(all(any(feature = "bar", feature = "tar"), not(loom)))]
mod linalg;
mod lock;
#[cfg(loom)]
#[doc(hidden)]
pub mod model_hooks;
#[cfg(all(any(feature = "bar", feature = "tar"), not(loom)))]
mod model_size;
mod parallel;
mod params;
#[cfg(not(loom))]
pub mod persist;
mod scorer;
mod scratch;
mod search;
mod slot_lock;
mod storage;
mod sync;
#[cfg(all(feature = "tar", not(loom)))]
pub mod tar;
mod update;

pub use beam_retrieval::{BeamParams, ScoredHit};
pub use compact::Compaction;
pub use distance::{Distance, Isa, Metric};
#[cfg(not(loom))]
pub use durable::{DurableIndex, DurableOptions, ReplayReport, SNAPSHOT_FILE};
pub use error::{Error, InvariantViolation, Result};
pub use index::{Hit, Index, MemoryUsage, Stats};
pub use insert::Progress;
pub use lock::{EntryLock, ReadVersion};
#[cfg(all(any(feature = "bar", feature = "tar"), not(loom)))]
pub use model_size::MAX_MODEL_PARAMETERS;
pub use params::IndexParams;
#[cfg(not(loom))]
pub use persist::{Durability, FileInfo, FormatError};
pub use scorer::{CandidateBatch, MetricScorer, Scorer};
pub use search::SearchStats;
pub use update::Upserted;
