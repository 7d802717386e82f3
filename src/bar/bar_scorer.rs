//! The BAR model as a [`Scorer`]: what
//! [`Index::search_with`](crate::Index::search_with) calls for every batch of
//! candidates during a beam retrieval.

use std::sync::Arc;

use super::features::AdTokens;
use super::model::{BarModel, UserState};
use crate::scorer::{CandidateBatch, Scorer};

/// Scores index candidates with a BAR model: each candidate's vector is
/// its `z_a` and its payload its [`AdTokens`]; the query is the request's
/// [`UserState`].
///
/// The index must store `d_model`-dimensional vectors and payloads written
/// by [`AdTokens::to_payload`] for the same configuration; anything else
/// ends the search with [`Error::Scorer`](crate::Error::Scorer).
///
/// ```
/// use std::sync::Arc;
/// use nann::bar::model::BarModel;
/// use nann::bar::{AdTokens, BarConfig, UserFeatures};
/// use nann::{CandidateBatch, Scorer};
///
/// let model = Arc::new(BarModel::random(BarConfig::default(), 5)?);
/// let scorer = nann::bar::BarScorer::new(Arc::clone(&model));
/// let user = model.user_side(&UserFeatures { fields: vec![0; 5], ..Default::default() })?;
/// let tokens = AdTokens::from_ids(model.config(), &[3, 2, 1, 0, 4, 5, 6, 7])?;
/// let z_a = model.ad_vector(&tokens)?;
/// let payload = tokens.to_payload();
/// let batch = CandidateBatch::new(&[42], &z_a, 64)?.with_payloads(&payload, 32)?;
/// let mut score = [0.0];
/// scorer.score_batch(&user, &batch, &mut score)?;
/// assert_eq!(score[0], model.heads(&user, &z_a, &[tokens])?[0].score);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct BarScorer {
    model: Arc<BarModel>,
}

impl BarScorer {
    /// A scorer sharing `model` (which the caller also uses to compute
    /// each request's [`UserState`] with [`BarModel::user_side`]).
    pub fn new(model: Arc<BarModel>) -> Self {
        Self { model }
    }

    /// The model.
    pub fn model(&self) -> &Arc<BarModel> {
        &self.model
    }
}

impl Scorer for BarScorer {
    type Query = UserState;

    fn score_batch(
        &self,
        query: &UserState,
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> crate::Result<()> {
        let config = self.model.config();
        if batch.dim() != config.d_model {
            return Err(crate::Error::DimensionMismatch {
                expected: config.d_model,
                actual: batch.dim(),
            });
        }
        if batch.payload_len() != config.payload_bytes() {
            return Err(crate::Error::Scorer {
                message: format!(
                    "candidates carry {}-byte payloads; the BAR model needs {} (its ad tokens)",
                    batch.payload_len(),
                    config.payload_bytes()
                ),
            });
        }
        let tokens = batch
            .payloads()
            .chunks_exact(config.payload_bytes())
            .map(|p| AdTokens::from_payload(config, p))
            .collect::<Result<Vec<_>, _>>()?;
        self.model
            .score_into(query, batch.vectors(), &tokens, out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bar::{BarConfig, UserFeatures};

    fn setup() -> (BarScorer, UserState, Vec<AdTokens>, Vec<f32>) {
        let model = Arc::new(BarModel::random(BarConfig::default(), 11).unwrap());
        let user = model
            .user_side(&UserFeatures {
                fields: vec![1, 2, 0, 3, 1],
                seq_items: vec![5, 0, 9, 17],
                seq_cates: vec![1, 0, 2, 3],
            })
            .unwrap();
        let tokens: Vec<AdTokens> = (1..=70)
            .map(|i| AdTokens::from_ids(model.config(), &[i, 1 + i % 7, i, i % 3, 1, 2, 3, 4]))
            .collect::<Result<_, _>>()
            .unwrap();
        let z_a = model.ad_vectors(&tokens).unwrap();
        (BarScorer::new(model), user, tokens, z_a)
    }

    #[test]
    fn scores_match_the_model_and_bad_batches_are_errors() {
        let (scorer, user, tokens, z_a) = setup();
        let keys: Vec<u64> = (0..tokens.len() as u64).collect();
        let payloads: Vec<u8> = tokens.iter().flat_map(|t| t.to_payload()).collect();
        let batch = CandidateBatch::new(&keys, &z_a, 64)
            .unwrap()
            .with_payloads(&payloads, 32)
            .unwrap();
        let mut got = vec![0.0; keys.len()];
        scorer.score_batch(&user, &batch, &mut got).unwrap();
        let mut expected = vec![0.0; keys.len()];
        scorer
            .model()
            .score_into(&user, &z_a, &tokens, &mut expected)
            .unwrap();
        assert_eq!(got, expected);

        // No payloads, a wrong dimension, an id outside the vocabulary.
        let bare = CandidateBatch::new(&keys, &z_a, 64).unwrap();
        assert!(matches!(
            scorer.score_batch(&user, &bare, &mut got),
            Err(crate::Error::Scorer { .. })
        ));
        let narrow = CandidateBatch::new(&keys[..1], &z_a[..32], 32).unwrap();
        assert!(scorer.score_batch(&user, &narrow, &mut got[..1]).is_err());
        let mut bad = payloads.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let batch = CandidateBatch::new(&keys, &z_a, 64)
            .unwrap()
            .with_payloads(&bad, 32)
            .unwrap();
        let err = scorer.score_batch(&user, &batch, &mut got).unwrap_err();
        assert!(err.to_string().contains("item"), "{err}");
        // A wrong output length.
        let batch = CandidateBatch::new(&keys, &z_a, 64)
            .unwrap()
            .with_payloads(&payloads, 32)
            .unwrap();
        assert!(scorer.score_batch(&user, &batch, &mut got[..3]).is_err());
    }
}
