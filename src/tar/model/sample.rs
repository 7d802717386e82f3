//! Top-p (nucleus) sampling of one token from its logits.

use crate::linalg::softmax_rows;

/// Reusable buffers of [`top_p`].
#[derive(Default)]
pub(super) struct SampleScratch {
    /// Probabilities.
    probs: Vec<f32>,
    /// Sort keys: descending scaled logit in the high 32 bits, index low.
    keys: Vec<u64>,
}

/// A key whose ascending order is the descending order of `x` (a total
/// order on the bits; NaNs sort to one end instead of panicking).
fn descending_key(x: f32) -> u32 {
    let b = x.to_bits();
    let ascending = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    !ascending
}

/// Samples an index from `logits` by top-p: probabilities
/// `softmax(logits / temperature)`, sorted descending (ties: lower index
/// first); the most probable entries are kept until their mass reaches
/// `top_p` (the first always); the kept ones are renormalised and `u` (a
/// uniform draw in `[0, 1)`) picks one. The caller has checked `temperature
/// > 0`, `top_p` in `(0, 1]` and `logits` non-empty.
pub(super) fn top_p(
    logits: &[f32],
    top_p: f32,
    temperature: f32,
    u: f64,
    s: &mut SampleScratch,
) -> usize {
    let v = logits.len();
    s.probs.clear();
    s.probs.extend(logits.iter().map(|&l| l / temperature));
    s.keys.clear();
    s.keys.extend(
        s.probs
            .iter()
            .enumerate()
            .map(|(j, &l)| (u64::from(descending_key(l)) << 32) | j as u64),
    );
    // The keys are distinct (they hold the index), so the unstable sort is
    // deterministic.
    s.keys.sort_unstable();
    softmax_rows(&mut s.probs, v, 1, v);
    let index = |key: u64| (key & 0xffff_ffff) as usize;
    let mut kept = 0;
    let mut mass = 0.0f64;
    for &key in &s.keys {
        mass += f64::from(s.probs[index(key)]);
        kept += 1;
        if mass >= f64::from(top_p) {
            break;
        }
    }
    let target = u * mass;
    let mut acc = 0.0f64;
    for &key in &s.keys[..kept] {
        acc += f64::from(s.probs[index(key)]);
        if acc > target {
            return index(key);
        }
    }
    // Rounding (or non-finite logits): the last kept entry.
    index(s.keys[kept.max(1) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::data::SplitMix;

    fn frequencies(logits: &[f32], p: f32, temperature: f32, draws: usize) -> Vec<f64> {
        let mut rng = SplitMix::new(42);
        let mut s = SampleScratch::default();
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[top_p(logits, p, temperature, rng.uniform(), &mut s)] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    fn assert_near(found: &[f64], expected: &[f64], tol: f64) {
        for (f, e) in found.iter().zip(expected) {
            assert!((f - e).abs() < tol, "{found:?} vs {expected:?}");
        }
    }

    #[test]
    fn tiny_top_p_is_argmax_with_ties_to_the_lowest_index() {
        let mut s = SampleScratch::default();
        let logits = [0.1, 2.0, -1.0, 1.9, 2.0];
        for u in [0.0, 0.3, 0.999_999] {
            assert_eq!(top_p(&logits, 1e-6, 1.0, u, &mut s), 1);
            assert_eq!(top_p(&logits, 1e-6, 0.01, u, &mut s), 1);
            assert_eq!(top_p(&logits, 1e-6, 100.0, u, &mut s), 1);
        }
        assert_eq!(top_p(&[5.0], 0.5, 1.0, 0.7, &mut s), 0);
    }

    #[test]
    fn frequencies_follow_the_truncated_renormalised_distribution() {
        // p = (0.2, 0.5, 0.3) in index order.
        let logits = [0.2f32.ln(), 0.5f32.ln(), 0.3f32.ln()];
        let n = 200_000;
        let tol = 0.006;
        assert_near(&frequencies(&logits, 1.0, 1.0, n), &[0.2, 0.5, 0.3], tol);
        // Mass 0.5 + 0.3 = 0.8 >= 0.7: keep two, renormalise.
        assert_near(
            &frequencies(&logits, 0.7, 1.0, n),
            &[0.0, 0.625, 0.375],
            tol,
        );
        // 0.5 < 0.75 (two kept) and 0.4 <= 0.5 (one kept).
        assert_near(
            &frequencies(&logits, 0.75, 1.0, n),
            &[0.0, 0.625, 0.375],
            tol,
        );
        assert_near(&frequencies(&logits, 0.4, 1.0, n), &[0.0, 1.0, 0.0], 1e-12);
        // Temperature 2: p ∝ sqrt(p).
        let r = [0.2f64.sqrt(), 0.5f64.sqrt(), 0.3f64.sqrt()];
        let z: f64 = r.iter().sum();
        let expected: Vec<f64> = r.iter().map(|x| x / z).collect();
        assert_near(&frequencies(&logits, 1.0, 2.0, n), &expected, tol);
    }

    #[test]
    fn non_finite_logits_do_not_panic() {
        let mut s = SampleScratch::default();
        for logits in [
            [f32::NAN, 0.0, 1.0],
            [f32::INFINITY, f32::INFINITY, 0.0],
            [f32::NEG_INFINITY; 3],
        ] {
            assert!(top_p(&logits, 0.9, 1.0, 0.5, &mut s) < 3);
        }
    }
}
