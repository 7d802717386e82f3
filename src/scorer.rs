//! The neural similarity hook: a [`Scorer`] ranks graph candidates for one
//! query, many at a time.
//!
//! NANN (Chen et al., CIKM 2022) and BAR serve a learned similarity s(u, v)
//! from an HNSW graph built on the items' embeddings with a plain metric.
//! The graph only proposes candidates; the model decides. Scoring happens
//! in batches (every expansion round's new candidates at once) because a
//! model, on a CPU with SIMD or on a GPU, is only efficient on batches.
//!
//! ```text
//!   Index::search_with(scorer, query, params)        (nann_search.rs)
//!     │ per round: unvisited neighbours of the frontier
//!     ▼
//!   CandidateBatch { keys, vectors (n x dim, row-major) }
//!     │
//!     ▼
//!   Scorer::score_batch(query, batch, out)  ──►  out[i] = score of candidate i
//!                                                (higher is better)
//! ```
//!
//! The query type is the scorer's own: a plain vector for [`MetricScorer`],
//! a request's precomputed user-side tensors for a model.

use crate::distance::{Distance, Metric};
use crate::error::Result;

/// Scores candidates for one query, in batches; higher is better.
///
/// Implementations must write exactly `batch.len()` scores into `out`
/// (which has that length) and must not panic on any candidate: a failure
/// (a device error, a bad query state) is returned as
/// [`Error::Scorer`](crate::Error::Scorer) and ends the search with it. A
/// NaN score ranks below every other score.
///
/// ```
/// use nann::{CandidateBatch, Scorer};
/// /// Scores by the first component: a stand-in for a model.
/// struct FirstComponent;
/// impl Scorer for FirstComponent {
///     type Query = ();
///     fn score_batch(&self, _: &(), batch: &CandidateBatch<'_>, out: &mut [f32]) -> nann::Result<()> {
///         for (i, score) in out.iter_mut().enumerate() {
///             *score = batch.vector(i)[0];
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Scorer {
    /// What the scorer needs per query (the user side of a request).
    type Query: ?Sized;

    /// Writes the score of every candidate of `batch` into `out`
    /// (`out.len() == batch.len()`).
    fn score_batch(
        &self,
        query: &Self::Query,
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> Result<()>;
}

/// One batch of candidates: their keys and stored vectors, row-major.
///
/// Built by the search from one consistent read of each entry (key and
/// vector of the same version, even while the entry is being updated).
#[derive(Debug, Clone, Copy)]
pub struct CandidateBatch<'a> {
    keys: &'a [u64],
    vectors: &'a [f32],
    dim: usize,
    payloads: &'a [u8],
    payload_len: usize,
}

impl<'a> CandidateBatch<'a> {
    /// A batch over `keys` and their `vectors` (`keys.len() * dim` floats,
    /// row-major), for calling a scorer outside a search (tests, benches).
    ///
    /// ```
    /// let batch = nann::CandidateBatch::new(&[7, 9], &[1.0, 2.0, 3.0, 4.0], 2).unwrap();
    /// assert_eq!(batch.vector(1), &[3.0, 4.0]);
    /// assert!(nann::CandidateBatch::new(&[7], &[1.0], 2).is_err());
    /// ```
    pub fn new(keys: &'a [u64], vectors: &'a [f32], dim: usize) -> Result<Self> {
        if keys.len().checked_mul(dim) != Some(vectors.len()) {
            return Err(crate::Error::InvalidParameter {
                name: "vectors",
                reason: format!(
                    "{} floats for {} keys of dimension {dim}",
                    vectors.len(),
                    keys.len()
                ),
            });
        }
        Ok(Self {
            keys,
            vectors,
            dim,
            payloads: &[],
            payload_len: 0,
        })
    }

    /// The same batch with each candidate's payload: `payloads` holds
    /// `len() * payload_len` bytes, candidate `i`'s at
    /// `i * payload_len..(i + 1) * payload_len`.
    ///
    /// ```
    /// let batch = nann::CandidateBatch::new(&[7, 9], &[1.0, 2.0], 1)?
    ///     .with_payloads(&[1, 2, 3, 4], 2)?;
    /// assert_eq!(batch.payload(1), &[3, 4]);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn with_payloads(self, payloads: &'a [u8], payload_len: usize) -> Result<Self> {
        if self.keys.len().checked_mul(payload_len) != Some(payloads.len()) {
            return Err(crate::Error::InvalidParameter {
                name: "payloads",
                reason: format!(
                    "{} bytes for {} keys of payload length {payload_len}",
                    payloads.len(),
                    self.keys.len()
                ),
            });
        }
        Ok(Self {
            payloads,
            payload_len,
            ..self
        })
    }

    /// Candidates in the batch.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The candidates' keys.
    pub fn keys(&self) -> &'a [u64] {
        self.keys
    }

    /// All vectors, row-major (`len() * dim()` floats): the layout a
    /// matrix multiply or a device copy wants.
    pub fn vectors(&self) -> &'a [f32] {
        self.vectors
    }

    /// Candidate `i`'s vector.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn vector(&self, i: usize) -> &'a [f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// Bytes of payload per candidate (the index's
    /// [`payload_len`](crate::IndexParams::payload_len); 0 without payloads).
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// All payloads, concatenated (`len() * payload_len()` bytes).
    pub fn payloads(&self) -> &'a [u8] {
        self.payloads
    }

    /// Candidate `i`'s payload, read in the same consistent snapshot as its
    /// vector (empty when the index stores no payloads).
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn payload(&self, i: usize) -> &'a [u8] {
        assert!(i < self.keys.len(), "candidate {i} of {}", self.keys.len());
        &self.payloads[i * self.payload_len..(i + 1) * self.payload_len]
    }
}

/// The plain metric as a scorer: score = -distance. With it,
/// [`Index::search_with`](crate::Index::search_with) ranks exactly as the
/// metric does, which is how the beam retrieval is checked against the
/// ordinary search.
///
/// The query is compared as given: with [`Metric::Cosine`] pass a unit
/// vector (the index stores unit vectors).
#[derive(Debug, Clone, Copy)]
pub struct MetricScorer {
    distance: Distance,
}

impl MetricScorer {
    /// A scorer for `metric`, with the fastest kernel this CPU supports.
    pub fn new(metric: Metric) -> Self {
        Self {
            distance: Distance::new(metric),
        }
    }
}

impl Scorer for MetricScorer {
    type Query = [f32];

    fn score_batch(
        &self,
        query: &[f32],
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        if query.len() != batch.dim() {
            return Err(crate::Error::DimensionMismatch {
                expected: batch.dim(),
                actual: query.len(),
            });
        }
        for (i, score) in out.iter_mut().enumerate().take(batch.len()) {
            *score = -self.distance.eval(query, batch.vector(i));
        }
        Ok(())
    }
}
