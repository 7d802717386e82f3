#![allow(dead_code)]
//! BAR helpers shared by the `retrieval` and `bar_eval` examples: the ad
//! side of a whole market, the index over it, exact top-M by the model, and
//! a scorer wrapper that counts what it scores.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nann::bar::market::Market;
use nann::bar::{AdTokens, BarModel, BarScorer, UserState};
use nann::{CandidateBatch, Index, IndexParams, Metric, Scorer};

/// Every ad's tokens and `z_a` (row-major), computed with `threads` threads.
pub fn ad_sides(model: &BarModel, market: &Market, threads: usize) -> (Vec<AdTokens>, Vec<f32>) {
    let config = model.config();
    let tokens: Vec<AdTokens> = market
        .ads()
        .iter()
        .map(|ad| {
            ad.features
                .tokens(config)
                .expect("market features fit the model")
        })
        .collect();
    let d = config.d_model;
    let mut z = vec![0.0f32; tokens.len() * d];
    let per = tokens.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (t, out) in tokens.chunks(per).zip(z.chunks_mut(per * d)) {
            s.spawn(move || out.copy_from_slice(&model.ad_vectors(t).expect("valid tokens")));
        }
    });
    (tokens, z)
}

/// An L2 index over the ads' `z_a` with their tokens as payloads (keys =
/// ad indices), built with `threads` threads; calls `progress(done)`.
pub fn build_index(
    model: &BarModel,
    tokens: &[AdTokens],
    z: &[f32],
    m: usize,
    ef_construction: usize,
    threads: usize,
    progress: impl Fn(usize) + Sync,
) -> Index {
    let config = model.config();
    let d = config.d_model;
    let index = Index::new(
        IndexParams::new(d, Metric::L2)
            .m(m)
            .ef_construction(ef_construction)
            .capacity(tokens.len())
            .payload_len(config.payload_bytes()),
    )
    .expect("valid parameters");
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tokens.len() {
                    break;
                }
                index
                    .insert_with_payload(i as u64, &z[i * d..(i + 1) * d], &tokens[i].to_payload())
                    .expect("insert");
                if i.is_multiple_of(1000) {
                    progress(i);
                }
            });
        }
    });
    index
}

/// The model's exact top `m` ads (keys) for `user`, scoring all of them.
pub fn exact_top(
    model: &BarModel,
    user: &UserState,
    tokens: &[AdTokens],
    z: &[f32],
    m: usize,
    scores: &mut Vec<f32>,
) -> Vec<u64> {
    scores.resize(tokens.len(), 0.0);
    model
        .score_into(user, z, tokens, scores)
        .expect("valid inputs");
    top_keys(scores, m)
}

/// Keys (positions) of the `m` highest scores, best first.
pub fn top_keys(scores: &[f32], m: usize) -> Vec<u64> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    let m = m.min(order.len());
    let by_score = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]);
    if m < order.len() {
        order.select_nth_unstable_by(m, by_score);
        order.truncate(m);
    }
    order.sort_unstable_by(by_score);
    order.into_iter().map(u64::from).collect()
}

/// A [`BarScorer`] that counts the candidates it scores.
pub struct Counting {
    pub inner: BarScorer,
    pub scored: AtomicUsize,
}

impl Counting {
    pub fn new(model: Arc<BarModel>) -> Self {
        Self {
            inner: BarScorer::new(model),
            scored: AtomicUsize::new(0),
        }
    }
}

impl Scorer for Counting {
    type Query = UserState;
    fn score_batch(
        &self,
        q: &UserState,
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> nann::Result<()> {
        self.scored.fetch_add(batch.len(), Ordering::Relaxed);
        self.inner.score_batch(q, batch, out)
    }
}

/// `"100x1,200x1,400x3"` as beam layers `(ef, rounds)`, top layer first.
pub fn parse_layers(text: &str) -> Result<Vec<(usize, usize)>, String> {
    text.split(',')
        .map(|layer| {
            let (ef, rounds) = layer
                .split_once('x')
                .ok_or(format!("layer '{layer}' is not EFxROUNDS"))?;
            Ok((
                ef.trim()
                    .parse()
                    .map_err(|_| format!("bad ef in '{layer}'"))?,
                rounds
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad rounds in '{layer}'"))?,
            ))
        })
        .collect()
}

/// Percentile `p` (0..=100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
