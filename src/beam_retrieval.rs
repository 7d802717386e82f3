//! NANN beam retrieval: searching the graph with a [`Scorer`] instead of
//! the metric it was built with (Chen et al., CIKM 2022, Algorithms 1-2;
//! the retrieval stage of BAR).
//!
//! HNSW's search walks each layer until no candidate improves, with a beam
//! of one above layer 0. A model-scored search instead carries a beam of
//! `ef_l` nodes on every layer and runs a fixed number of expansion rounds
//! per layer, so the number of scored candidates, hence the latency, is
//! bounded and every round is one batch for the model:
//!
//! ```text
//!  layer S (top listed)  all nodes of layer S, by a walk from the entry point
//!                        ──► one batch ──► R = best ef_S
//!  layer l < S           frontier = R, visited = R
//!                        repeat rounds_l times:
//!                          N = unvisited neighbours of the frontier on l
//!                          score N (one batch)
//!                          R = best ef_l of R ∪ N
//!                          frontier = members of N that made it into R
//!  result                the best `top` live entries of R, best first
//! ```
//!
//! Defaults: ef = {100, 200, 400}, rounds = {1, 1, 3}, top 200 (the paper's).
//! The top listed layer is scored exhaustively (its round count is unused);
//! on a graph with fewer layers, the lowest entries of the lists apply.
//! Removed entries are scored and walked through (they keep the graph
//! connected) but never returned.

use crate::error::{Error, Result};
use crate::index::Index;
use crate::scorer::{CandidateBatch, Scorer};
use crate::sync::Ordering;

/// Beam widths and rounds per layer for [`Index::search_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeamParams {
    /// (ef, rounds) per layer, top layer first.
    layers: Vec<(usize, usize)>,
    top: usize,
}

impl Default for BeamParams {
    /// The NANN paper's settings: ef {100, 200, 400}, rounds {1, 1, 3}, top 200.
    fn default() -> Self {
        Self {
            layers: vec![(100, 1), (200, 1), (400, 3)],
            top: 200,
        }
    }
}

impl BeamParams {
    /// Per-layer (ef, rounds), top layer first; the last pair is layer 0.
    /// Rounds stop early once a round adds nothing to the beam, so
    /// `usize::MAX` means "until the beam stops improving" (HNSW's own
    /// stopping rule, unbounded cost); a fixed count bounds the candidates
    /// scored, which is what a model-scored search needs for its latency.
    ///
    /// ```
    /// let params = nann::BeamParams::default().layers(&[(50, 1), (100, 2)]).top(20);
    /// assert!(params.validate().is_ok());
    /// assert!(nann::BeamParams::default().layers(&[]).validate().is_err());
    /// ```
    pub fn layers(mut self, layers: &[(usize, usize)]) -> Self {
        self.layers = layers.to_vec();
        self
    }

    /// How many entries to return.
    pub fn top(mut self, top: usize) -> Self {
        self.top = top;
        self
    }

    /// Checks the parameters (also done by every search).
    pub fn validate(&self) -> Result<()> {
        let invalid = |name, reason: &str| Error::InvalidParameter {
            name,
            reason: reason.into(),
        };
        if self.layers.is_empty() {
            return Err(invalid("layers", "list at least layer 0's (ef, rounds)"));
        }
        if self.layers.iter().any(|&(ef, _)| ef == 0) {
            return Err(invalid("layers", "every ef must be at least 1"));
        }
        if self.top == 0 {
            return Err(invalid("top", "must be at least 1"));
        }
        Ok(())
    }

    /// (ef, rounds) of `layer`, counted from the bottom.
    fn of_layer(&self, layer: usize) -> (usize, usize) {
        self.layers[self.layers.len() - 1 - layer]
    }
}

/// A retrieved entry and its score (higher is better).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredHit {
    /// The entry's key.
    pub key: u64,
    /// The scorer's score for it.
    pub score: f32,
}

/// A scored candidate of the beam.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    slot: u32,
    key: u64,
    removed: bool,
}

/// Reusable buffers of one retrieval.
#[derive(Default)]
struct Batch {
    slots: Vec<u32>,
    removed: Vec<bool>,
    keys: Vec<u64>,
    vectors: Vec<f32>,
    payloads: Vec<u8>,
    scores: Vec<f32>,
}

impl Index {
    /// The best `top` entries for `query` under `scorer`, best first, by
    /// NANN beam retrieval over the graph (see the module docs of
    /// `beam_retrieval.rs`). The graph is the one built with the index's
    /// metric; only the ranking is the scorer's.
    ///
    /// ```
    /// use nann::{BeamParams, Index, IndexParams, Metric, MetricScorer};
    /// let index = Index::new(IndexParams::new(1, Metric::L2))?;
    /// for key in 0..1000u64 {
    ///     index.insert(key, &[key as f32])?;
    /// }
    /// let scorer = MetricScorer::new(Metric::L2);
    /// // A line of points is the worst case for a fixed number of rounds
    /// // (each round moves a few steps along it), so layer 0 here runs
    /// // until its beam stops improving.
    /// let params = BeamParams::default()
    ///     .layers(&[(100, 1), (200, 1), (400, usize::MAX)])
    ///     .top(3);
    /// let hits = index.search_with(&scorer, &[500.2][..], &params)?;
    /// let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
    /// assert_eq!(keys, vec![500, 501, 499]);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn search_with<S: Scorer + ?Sized>(
        &self,
        scorer: &S,
        query: &S::Query,
        params: &BeamParams,
    ) -> Result<Vec<ScoredHit>> {
        params.validate()?;
        let guard = self.pin();
        let Some((entry, max_level)) = self.graph.entry() else {
            return Ok(Vec::new());
        };
        let start = max_level.min(params.layers.len() - 1);
        let mut scratch = self.take_scratch();
        let visited = &mut scratch.visited;
        let mut links = Vec::new();
        let mut batch = Batch::default();

        // The top layer, exhaustively: every node a walk from the entry
        // point reaches on it.
        visited.reset(self.next_slot.load(Ordering::Acquire));
        visited.insert(entry);
        let mut walk = vec![entry];
        let mut next = 0;
        while next < walk.len() {
            self.graph.read_links(walk[next], start, &mut links);
            next += 1;
            walk.extend(links.iter().copied().filter(|&n| visited.insert(n)));
        }
        let mut beam = Vec::new();
        self.score_slots(scorer, query, &walk, &mut batch, &guard, &mut beam)?;
        keep_best(&mut beam, params.of_layer(start).0);

        let mut fresh = Vec::new();
        let mut candidates = Vec::new();
        let mut frontier: Vec<u32> = Vec::new();
        for layer in (0..start).rev() {
            let (ef, rounds) = params.of_layer(layer);
            visited.reset(self.next_slot.load(Ordering::Acquire));
            frontier.clear();
            for c in &beam {
                visited.insert(c.slot);
                frontier.push(c.slot);
            }
            for _ in 0..rounds {
                candidates.clear();
                for &slot in &frontier {
                    self.graph.read_links(slot, layer, &mut links);
                    candidates.extend(links.iter().copied().filter(|&n| visited.insert(n)));
                }
                if candidates.is_empty() {
                    break;
                }
                fresh.clear();
                self.score_slots(scorer, query, &candidates, &mut batch, &guard, &mut fresh)?;
                beam.extend_from_slice(&fresh);
                keep_best(&mut beam, ef);
                // The next frontier: this round's candidates that made it
                // into the beam.
                let worst = beam.last().map_or(f32::NEG_INFINITY, |c| c.score);
                let full = beam.len() >= ef;
                frontier.clear();
                frontier.extend(
                    fresh
                        .iter()
                        .filter(|c| !full || c.score >= worst)
                        .map(|c| c.slot),
                );
            }
        }
        Ok(beam
            .iter()
            .filter(|c| !c.removed)
            .take(params.top)
            .map(|c| ScoredHit {
                key: c.key,
                score: c.score,
            })
            .collect())
    }

    /// Scores `slots` (one batch) and appends them to `out`. Slots without
    /// a published vector are skipped.
    fn score_slots<S: Scorer + ?Sized>(
        &self,
        scorer: &S,
        query: &S::Query,
        slots: &[u32],
        batch: &mut Batch,
        guard: &crossbeam_epoch::Guard,
        out: &mut Vec<Candidate>,
    ) -> Result<()> {
        batch.slots.clear();
        batch.removed.clear();
        batch.keys.clear();
        batch.vectors.clear();
        batch.payloads.clear();
        for &slot in slots {
            // Key and vector from the one cell loaded here: one version.
            let Some(v) = self.graph.vector(slot, guard) else {
                continue;
            };
            batch.slots.push(slot);
            batch.removed.push(v.tombstoned);
            batch.keys.push(self.graph.vectors.key(v.cell));
            batch.vectors.extend_from_slice(v.vector);
            self.graph
                .vectors
                .payload_into(v.cell, guard, &mut batch.payloads);
        }
        if batch.slots.is_empty() {
            return Ok(());
        }
        batch.scores.clear();
        // NaN until written: a scorer that skips a candidate ranks it last.
        batch.scores.resize(batch.slots.len(), f32::NAN);
        let candidates = CandidateBatch::new(&batch.keys, &batch.vectors, self.params.dim)?
            .with_payloads(&batch.payloads, self.params.payload_len)?;
        scorer.score_batch(query, &candidates, &mut batch.scores)?;
        out.extend(
            batch
                .slots
                .iter()
                .zip(&batch.removed)
                .zip(&batch.keys)
                .zip(&batch.scores)
                .map(|(((&slot, &removed), &key), &score)| Candidate {
                    score: if score.is_nan() {
                        f32::NEG_INFINITY
                    } else {
                        score
                    },
                    slot,
                    key,
                    removed,
                }),
        );
        Ok(())
    }
}

/// Sorts best first (ties by slot, so results are deterministic) and keeps
/// the best `ef`.
fn keep_best(beam: &mut Vec<Candidate>, ef: usize) {
    beam.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.slot.cmp(&b.slot)));
    beam.truncate(ef);
}
