//! Index parameters, validated once at construction.

use crate::distance::{Isa, Metric};
use crate::error::{Error, Result};

/// The largest payload an entry can carry, in bytes.
pub(crate) const MAX_PAYLOAD_LEN: usize = 1 << 16;

/// Construction parameters of an [`Index`](crate::Index).
///
/// `M0` (the layer-0 degree) is always `2 * m`, as in the HNSW paper and
/// hnswlib. The search beam width `ef` is *not* here: it is an argument of
/// every search, so concurrent callers can use different values without
/// racing on shared state (hnswlib #64, knowhere #405).
///
/// ```
/// use nann::{IndexParams, Metric};
/// let params = IndexParams::new(128, Metric::L2).m(16).ef_construction(200).seed(7).capacity(10_000);
/// assert_eq!(params.m0(), 32);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct IndexParams {
    /// Vector dimension.
    pub dim: usize,
    /// Distance metric.
    pub metric: Metric,
    /// Maximum degree on layers >= 1; layer 0 allows `2 * m`.
    pub m: usize,
    /// Beam width while linking a new or updated entry.
    pub ef_construction: usize,
    /// Seed of the level generator; equal seeds and insertion orders give
    /// equal graphs on one thread.
    pub seed: u64,
    /// Entries to allocate up front. The index grows past it without moving
    /// memory, so this is a performance hint, not a limit.
    pub capacity: usize,
    /// Force a kernel level (benchmarks); `None` picks the best available.
    pub isa: Option<Isa>,
    /// Bytes of payload stored with every entry (0: none). A payload is
    /// fixed-size data that travels with the vector: written with it by
    /// [`Index::insert_with_payload`](crate::Index::insert_with_payload) and
    /// [`Index::update_with_payload`](crate::Index::update_with_payload),
    /// replaced atomically with it, and handed to a
    /// [`Scorer`](crate::Scorer) with it (BAR stores an ad's raw feature
    /// tokens here for the pBid head).
    pub payload_len: usize,
}

impl IndexParams {
    /// Parameters with hnswlib's defaults: M 16, ef_construction 200.
    pub fn new(dim: usize, metric: Metric) -> Self {
        Self {
            dim,
            metric,
            m: 16,
            ef_construction: 200,
            seed: 0x6e61_6e6e,
            capacity: 1024,
            isa: None,
            payload_len: 0,
        }
    }

    /// Sets `m`.
    pub fn m(mut self, m: usize) -> Self {
        self.m = m;
        self
    }

    /// Sets `ef_construction`.
    pub fn ef_construction(mut self, ef: usize) -> Self {
        self.ef_construction = ef;
        self
    }

    /// Sets the level-generator seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the initial capacity.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets the payload length in bytes.
    pub fn payload_len(mut self, bytes: usize) -> Self {
        self.payload_len = bytes;
        self
    }

    /// Forces a kernel level.
    pub fn isa(mut self, isa: Isa) -> Self {
        self.isa = Some(isa);
        self
    }

    /// The layer-0 degree, `2 * m`.
    pub fn m0(&self) -> usize {
        2 * self.m
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |name, reason: &str| {
            Err(Error::InvalidParameter {
                name,
                reason: reason.to_string(),
            })
        };
        if self.dim == 0 || self.dim > 65_536 {
            return invalid("dim", "must be between 1 and 65536");
        }
        if !(2..=255).contains(&self.m) {
            return invalid(
                "m",
                "must be between 2 and 255 (hnswlib's useful range is 4..=64)",
            );
        }
        if self.ef_construction == 0 || self.ef_construction > 100_000 {
            return invalid("ef_construction", "must be between 1 and 100000");
        }
        if self.payload_len > MAX_PAYLOAD_LEN {
            return invalid("payload_len", "must be at most 65536 bytes");
        }
        if self.capacity > (1 << 31) {
            return invalid("capacity", "must be at most 2^31 entries");
        }
        Ok(())
    }
}
