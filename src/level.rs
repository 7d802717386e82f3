//! The random level of each new node: `floor(-ln(u) / ln(M))`, the HNSW
//! paper's exponentially decaying distribution with `mL = 1 / ln M`.
//!
//! Draw `i` is `splitmix64(seed + i * golden)`, a counter-based generator, so
//! draws need only one `fetch_add` (no lock) and a single-threaded build with
//! a given seed and insertion order always produces the same graph.

use crate::graph::MAX_LEVEL;
use crate::sync::{AtomicU64, Ordering};

#[derive(Debug)]
pub(crate) struct LevelGenerator {
    seed: u64,
    counter: AtomicU64,
    inv_ln_m: f64,
}

pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl LevelGenerator {
    pub(crate) fn new(seed: u64, m: usize) -> Self {
        Self {
            seed,
            counter: AtomicU64::new(0),
            inv_ln_m: 1.0 / (m.max(2) as f64).ln(),
        }
    }

    #[cfg(not(loom))]
    /// Draws made so far (saved with an index, so a reopened index keeps
    /// drawing the same sequence).
    pub(crate) fn position(&self) -> u64 {
        // Relaxed: read while the index is quiescent (saving).
        self.counter.load(Ordering::Relaxed)
    }

    #[cfg(not(loom))]
    /// Continues the sequence from draw `position`.
    pub(crate) fn set_position(&self, position: u64) {
        // Relaxed: the index is not shared yet (opening).
        self.counter.store(position, Ordering::Relaxed);
    }

    pub(crate) fn next(&self) -> usize {
        // Relaxed: only uniqueness of the counter value matters.
        let i = self.counter.fetch_add(1, Ordering::Relaxed);
        let bits = splitmix64(
            self.seed
                .wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        );
        // u in (0, 1]: never 0, so ln(u) is finite.
        let u = ((bits >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        ((-u.ln() * self.inv_ln_m) as usize).min(MAX_LEVEL)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn level_frequencies_follow_the_hnsw_distribution() {
        let generator = LevelGenerator::new(1, 16);
        let n = 200_000;
        let mut counts = [0usize; MAX_LEVEL + 1];
        for _ in 0..n {
            counts[generator.next()] += 1;
        }
        // P(level >= 1) = 1/M = 1/16; P(level >= 2) = 1/256.
        let at_least_1 = (n - counts[0]) as f64 / n as f64;
        let at_least_2 = (n - counts[0] - counts[1]) as f64 / n as f64;
        assert!((at_least_1 - 1.0 / 16.0).abs() < 0.004, "{at_least_1}");
        assert!((at_least_2 - 1.0 / 256.0).abs() < 0.001, "{at_least_2}");
    }

    #[test]
    fn equal_seeds_give_equal_sequences() {
        let a = LevelGenerator::new(42, 16);
        let b = LevelGenerator::new(42, 16);
        let c = LevelGenerator::new(43, 16);
        let sa: Vec<_> = (0..1000).map(|_| a.next()).collect();
        let sb: Vec<_> = (0..1000).map(|_| b.next()).collect();
        let sc: Vec<_> = (0..1000).map(|_| c.next()).collect();
        assert_eq!(sa, sb);
        assert_ne!(sa, sc);
    }
}
