//! Offline evaluation metrics of the paper (§4.2.1): impression Recall@M
//! (eq. 15), pairwise monotonicity accuracy PairAcc (eq. 16-17), and the
//! coverage of an exact top-k by an approximate one.
//!
//! Every function scores one request (or one perturbed pair); the paper's
//! figures are their means over requests, which callers compute.
//!
//! ```
//! use nann::bar::metrics::{pair_acc, recall_at_m};
//!
//! // Two of the four impressions are among the retrieved ads.
//! assert_eq!(recall_at_m(&[1, 2, 3, 9], &[2, 3, 4, 5]), 0.5);
//! // A positive perturbation (I = +1) that raised the score is correct.
//! assert_eq!(pair_acc(1.0, 0.3, 0.4), 1.0);
//! assert_eq!(pair_acc(-1.0, 0.3, 0.4), 0.0);
//! ```

use std::collections::HashSet;

/// Impression recall of one request (eq. 15 without the expectation):
/// `|P ∩ G| / |G|`, where `P` is the set of `retrieved` keys (the caller
/// passes the top `M`) and `G` the set of `truth` keys (the request's
/// impression ads).
///
/// Both slices are treated as sets: repeated keys count once. An empty
/// `truth` has nothing to recall and gives 1.0.
pub fn recall_at_m(retrieved: &[u64], truth: &[u64]) -> f64 {
    overlap_fraction(retrieved, truth)
}

/// The monotonicity indicator `mono(I, u, a, ã)` of eq. 17: 1.0 when the
/// score moved strictly in the direction of the perturbation's indicator
/// (`indicator > 0` and `score_perturbed > score_orig`, or `indicator < 0`
/// and `score_perturbed < score_orig`), otherwise 0.0 (including an unchanged
/// score, a zero indicator and NaN scores). PairAcc (eq. 16) is its mean over
/// the perturbed samples.
pub fn pair_acc(indicator: f32, score_orig: f32, score_perturbed: f32) -> f64 {
    let correct = (indicator > 0.0 && score_perturbed > score_orig)
        || (indicator < 0.0 && score_perturbed < score_orig);
    if correct {
        1.0
    } else {
        0.0
    }
}

/// [`pair_acc`] with an unchanged score counted as half correct (a coin
/// flip): 1.0 for a strict move in the indicator's direction, 0.5 for
/// `score_perturbed == score_orig` (with a non-zero indicator), otherwise
/// 0.0.
///
/// Eq. 17 read literally gives a model that ignores the bid features (whose
/// score cannot move) a PairAcc of 0%; the paper's Table 4 reports 50.0% for
/// that ablation ("w/o BF"), which is this convention.
pub fn pair_acc_tie_half(indicator: f32, score_orig: f32, score_perturbed: f32) -> f64 {
    if indicator != 0.0 && !indicator.is_nan() && score_perturbed == score_orig {
        0.5
    } else {
        pair_acc(indicator, score_orig, score_perturbed)
    }
}

/// The share of an exact top-k that an approximate result reproduces:
/// `|retrieved ∩ exact_top| / |exact_top|` (e.g. an HNSW search against a
/// brute-force scan under the same scorer).
///
/// Both slices are treated as sets: repeated keys count once. An empty
/// `exact_top` gives 1.0.
pub fn coverage(retrieved: &[u64], exact_top: &[u64]) -> f64 {
    overlap_fraction(retrieved, exact_top)
}

/// `|set(found) ∩ set(wanted)| / |set(wanted)|`, 1.0 when `wanted` is empty.
fn overlap_fraction(found: &[u64], wanted: &[u64]) -> f64 {
    let wanted: HashSet<u64> = wanted.iter().copied().collect();
    if wanted.is_empty() {
        return 1.0;
    }
    let found: HashSet<u64> = found.iter().copied().collect();
    let hits = wanted.iter().filter(|k| found.contains(k)).count();
    hits as f64 / wanted.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_hand_computed() {
        // G = {10, 11, 12, 13, 14}; P hits 10, 12 and 14: 3/5.
        let truth = [10, 11, 12, 13, 14];
        let retrieved = [14, 1, 2, 10, 3, 12, 4];
        assert_eq!(recall_at_m(&retrieved, &truth), 0.6);
        assert_eq!(recall_at_m(&[], &truth), 0.0);
        assert_eq!(recall_at_m(&truth, &truth), 1.0);
        // Sets: a repeated hit counts once, a repeated truth key once.
        assert_eq!(recall_at_m(&[10, 10, 10], &[10, 11, 11]), 0.5);
        // Nothing to recall.
        assert_eq!(recall_at_m(&[1, 2], &[]), 1.0);
        // One of three.
        assert!((recall_at_m(&[7], &[7, 8, 9]) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn pair_acc_follows_eq_17() {
        assert_eq!(pair_acc(1.0, 0.5, 0.6), 1.0);
        assert_eq!(pair_acc(1.0, 0.5, 0.4), 0.0);
        assert_eq!(pair_acc(-1.0, 0.5, 0.4), 1.0);
        assert_eq!(pair_acc(-1.0, 0.5, 0.6), 0.0);
        // Unchanged scores are never correct under eq. 17.
        assert_eq!(pair_acc(1.0, 0.5, 0.5), 0.0);
        assert_eq!(pair_acc(-1.0, 0.5, 0.5), 0.0);
        assert_eq!(pair_acc(0.0, 0.5, 0.9), 0.0);
        assert_eq!(pair_acc(1.0, f32::NAN, 0.9), 0.0);
        // Negative scores work the same way.
        assert_eq!(pair_acc(1.0, -2.0, -1.5), 1.0);
        assert_eq!(pair_acc(-1.0, -2.0, -2.5), 1.0);
    }

    #[test]
    fn pair_acc_tie_half_counts_ties_as_half() {
        assert_eq!(pair_acc_tie_half(1.0, 0.5, 0.5), 0.5);
        assert_eq!(pair_acc_tie_half(-1.0, 0.5, 0.5), 0.5);
        assert_eq!(pair_acc_tie_half(0.0, 0.5, 0.5), 0.0);
        assert_eq!(pair_acc_tie_half(1.0, 0.5, 0.6), 1.0);
        assert_eq!(pair_acc_tie_half(1.0, 0.5, 0.4), 0.0);
        assert_eq!(pair_acc_tie_half(-1.0, 0.5, 0.4), 1.0);
        assert_eq!(pair_acc_tie_half(1.0, f32::NAN, f32::NAN), 0.0);
    }

    #[test]
    fn coverage_hand_computed() {
        let exact = [1, 2, 3, 4];
        assert_eq!(coverage(&[4, 3, 9, 8], &exact), 0.5);
        assert_eq!(coverage(&[1, 2, 3, 4, 5], &exact), 1.0);
        assert_eq!(coverage(&[], &exact), 0.0);
        assert_eq!(coverage(&[1], &[]), 1.0);
        assert_eq!(coverage(&[2, 2, 2], &[1, 2, 3, 4]), 0.25);
    }
}
