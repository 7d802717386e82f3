//! Counter-based random streams keyed by `(seed, kind, index)`.
//!
//! Every random quantity of the simulator draws from its own stream, so a
//! draw never depends on how many draws happened before it elsewhere: the
//! conversion of PV `j` at tick `t` is the same whatever the bids were, and
//! re-running a tick's auction (the over-spend rule) reuses the same
//! exposure and conversion noise.

/// The splitmix64 finaliser.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Stream kinds (the `kind` of the key).
pub(crate) mod kind {
    pub const ADVERTISER: u64 = 1;
    pub const TRAFFIC: u64 = 2;
    pub const CATEGORY_CURVE: u64 = 3;
    pub const AGENT_CURVE: u64 = 4;
    pub const PVALUE: u64 = 5;
    pub const SIGMA: u64 = 6;
    pub const OUTCOME: u64 = 7;
    pub const DELAY: u64 = 8;
    pub const OVERSPEND: u64 = 9;
    pub const POPULATION: u64 = 10;
    pub const JITTER: u64 = 11;
    /// Offline replay (`run_replay`): a won PV's conversion draw, keyed by
    /// the replay's seed.
    pub const REPLAY_OUTCOME: u64 = 12;
    /// Offline replay: a conversion's delay, keyed by the replay's seed.
    pub const REPLAY_DELAY: u64 = 13;
    /// Offline replay: the over-spend rule's withdrawals, keyed by the
    /// logged day's seed (part of the market, not of the outcome noise).
    pub const REPLAY_OVERSPEND: u64 = 14;
    /// Recurring market: a level's day-to-day noise, keyed by the day's
    /// seed (the level's shape is keyed by the population seed).
    pub const DAY_NOISE: u64 = 15;
}

/// A splitmix64 stream keyed by `(seed, kind, index)`.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    pub(crate) fn new(seed: u64, kind: u64, index: u64) -> Self {
        Self {
            state: mix(mix(mix(seed) ^ kind) ^ index),
            spare: None,
        }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in `0..n` (`n >= 1`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box-Muller, both values used).
    pub(crate) fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }

    /// Exponential with the given mean.
    pub(crate) fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform()).ln()
    }
}
