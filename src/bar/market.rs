//! An open synthetic ad market: users, ads with bid features, a ranking
//! stage's "truth", and the paper's sessions (Appendix A.1).
//!
//! No public dataset carries bid features (the paper's footnote 3), so this
//! module generates one. Everything is deterministic in
//! [`MarketConfig::seed`]: each entity (category, item, brand, ad, user,
//! session, perturbation) draws from its own counter-based stream keyed by
//! `(seed, kind, index)`, so, for example, ad `i` does not change when the
//! number of users does, and session `i` does not depend on which sessions
//! were generated before it or on how many threads generated them.
//!
//! ```
//! use nann::bar::market::{Market, MarketConfig};
//!
//! let market = Market::generate(&MarketConfig::tiny())?;
//! let config = market.model_config(); // vocabularies that fit the market
//! let session = market.session(0);
//! assert_eq!(session.impressions.len(), 5);
//! assert_eq!(session.ranking.len(), 15);
//! for labeled in session.impressions.iter().chain(&session.ranking) {
//!     market.ads()[labeled.ad].features.tokens(&config)?;
//! }
//! # Ok::<(), nann::bar::ModelError>(())
//! ```
//!
//! # The generative story
//!
//! Notation: `d` = [`latent_dim`](MarketConfig::latent_dim), `N(0, I)` a
//! standard normal vector in R^d, `U(a, b)` uniform, `LN(m, s)` =
//! `m · exp(s · N(0, 1))` (lognormal with median `m`).
//!
//! **Catalogue.** Category `k ∈ 1..=cates` has a latent `c_k ~ N(0, I)`. Item
//! `i ∈ 1..=items` has a category (items `1..=cates` take category `i`, so
//! every category has an item when `items ≥ cates`; the rest are uniform)
//! and a latent `x_i = c_{cate(i)} + 0.5 · N(0, I)`. Brand `b ∈ 0..brands`
//! has a quality `q_b ~ 0.3 · N(0, 1)`. Ids 0 of items and categories are
//! the model's padding and never generated.
//!
//! **Ads.** Ad `a` (key `a`) advertises a uniform item (about 25 ads per item
//! at the default size), takes its category, a uniform brand, and the latent
//! `v_a = x_{item(a)} + 0.2 · N(0, I)`. Its bid features
//! ([`BidFeatures`]):
//! * `bid_type` ∈ {0 OCPC, 1 max return, 2 multi-constrained} with
//!   probabilities 0.5 / 0.3 / 0.2;
//! * `bid_constraint ~ LN(5, 0.8)`, clamped to `[0.05, e^6 − 1]`;
//! * `budget_left_ratio = Φ(−ρ · h_a + √(1 − ρ²) · Φ⁻¹(U(0, 1)))`, where
//!   `h_a ~ N(0, 1)` is the ad's hidden *appeal* (below) and `ρ` =
//!   [`spend_correlation`](MarketConfig::spend_correlation) (0.8): uniform
//!   on `[0, 1]`, but appealing ads have spent more of their budget when the
//!   logs are drawn (they win more auctions);
//! * `time_left_ratio ~ U(0, 1)`;
//! * `default_bid_value` (aBid, the ad's usual bid level)
//!   `= 5 · (bid_constraint / 5)^0.5 · exp(0.3 · N(0, 1))`, clamped to
//!   `[0.01, e^6 − 1]`: correlated with, but not determined by, the
//!   constraint.
//!
//! **Users.** A user has five fields `[segment, age, gender, hour, device]`
//! with vocabularies `[segments, 8, 3, 24, 4]` (segment and hour uniform;
//! age, gender and device from fixed skewed distributions; the hour is the
//! user's usual request hour, a context feature). Segment `s` prefers 3
//! categories (uniform draws). A user picks 2 to 4 interest categories, each
//! from its segment's preferences with probability 0.8 and uniform
//! otherwise, with weights `w ~ U(0.5, 1.5)` normalised to sum 1 (a repeated
//! category adds up its weights). The user latent is
//!
//! ```text
//! u = Σ_k w_k · c_k + 0.3 · N(0, I) + s_age + s_gender + s_hour + s_device
//! ```
//!
//! where each field value has a fixed shift `s ~ 0.1 · N(0, I)`, so the
//! profile fields carry some signal beyond the behaviour sequence.
//!
//! **Behaviour sequence** (oldest first): length uniform in
//! `[min(5, max_seq_len), max_seq_len]`; each entry is, with probability
//! 0.1, a uniform item (exploration), otherwise an item of an interest
//! category `k` (drawn by weight) chosen among 8 uniform items of `k` by
//! `softmax_j(u · x_j / √d)`. Entries are `(item, category)` pairs.
//!
//! **Truth** (the ranking stage's predictions, which the retrieval model
//! distils):
//!
//! ```text
//! affinity(u, a) = u · v_a / √d
//! interest(u, a) = w_u(cate(a))        (the user's weight on the ad's
//!                                       category, 0 if not an interest)
//! pCTR(u, a)     = sigmoid(−5.5 + affinity(u, a) + 2.5 · interest(u, a)
//!                          + q_brand(a) + σ_h · h_a)
//! pBid(a)        = default_bid_value · g(bid)
//! g(bid)         = (0.2 + 1.2 · budget_left_ratio^0.7)
//!                · (bid_constraint / 5)^0.6
//!                · type_factor[bid_type]            (1.0, 1.15, 0.85)
//!                · (1.1 − 0.2 · time_left_ratio)
//! eCPM(u, a)     = pCTR · pBid · 1000
//! ```
//!
//! `σ_h` = [`appeal_sigma`](MarketConfig::appeal_sigma) (0.5): the appeal is
//! the ad's creative quality, which no feature shows.
//!
//! `g` (= pBid / aBid, the paper's normalised bid target, eq. 13) is strictly
//! increasing in `budget_left_ratio` and in `bid_constraint` (the monotone
//! features of the paper's Table 2), so every positive operation raises the
//! true eCPM and every negative one lowers it. Ratios and the constraint are
//! read with out-of-range values clamped (ratios to `[0, 1]`, the
//! constraint to `≥ 0`).
//!
//! The explicit category term exists because 63 random category latents in
//! 16 dimensions are far from orthogonal: with the affinity alone, about
//! half of a user's top ads fall outside its interest categories and
//! interest hardly matters next to the bids. With it, at the default size,
//! the mean pCTR over random (user, ad) pairs is about 1% and over
//! impressions about 25%; about 95% of impressions are in the user's
//! interest categories; and the two halves of eCPM matter about equally:
//! the true top 100 of a request shares about 10% of its ads with the top
//! 100 by pCTR alone (every ad's bids replaced by the corpus means) and
//! about 6% with the top 100 by pBid alone, and an oracle ranking by pCTR
//! alone recalls about 56% of the impressions in its top 500, by pBid
//! alone about 50% (the true eCPM: all of them, up to the ranking noise).
//! Impressions have a mean `budget_left_ratio` of about 0.57 in the logs
//! and 0.71 after [`with_operated_budgets`](Market::with_operated_budgets)
//! (the corpus mean is 0.5). Figures from the ignored test
//! `default_market_statistics` in `tests/bar_market.rs`.
//!
//! **Sessions** (Appendix A.1). Session `i` picks a uniform user and scores
//! the *whole* corpus with the ranking stage's eCPM, the truth with the
//! ranking model's error: `eCPM(u, a) · exp(rank_noise · ε)`, `ε` a standard
//! normal quantised to 4096 levels (its inverse CDF at `(j + 1/2) / 4096`,
//! so `|ε| ≤ 3.4`), independent per (session, ad). The top 5 are the
//! impressions (exposed ads, `I_u`); the next
//! [`ranking_depth`](MarketConfig::ranking_depth) ads entered the ranking
//! stage without being exposed (the non-exposed list, in rank order). The
//! ranking set `R_u` samples 5 ads from its ranks 1-10, 5 from 11-100 and 5
//! from 101-`ranking_depth`. Hard pairs are (impression, ranking ad); easy
//! pairs take a positive from `I_u ∪ R_u` and a negative uniform over the
//! rest of the corpus.
//!
//! **Bid dynamics.** [`Market::perturb`] draws the paper's Table 2
//! perturbations (the BAO objective), [`Market::bid_event`] draws a live
//! bid change for the near-line updater, and [`Market::set_bid`] applies
//! one; the truth follows the current bids.
//!
//! **Logs and interventions.** Through the appeal, the logs confound the
//! budget: ads with little budget left are, on average, the appealing ones,
//! so in logged sessions a low `budget_left_ratio` goes with *more*
//! exposure, against the auction's monotone effect (with the defaults the
//! two nearly cancel in the logs). A model fitted to the logs alone can
//! learn the correlation instead of the effect.
//! [`Market::with_operated_budgets`] is the market after every advertiser
//! has set its budget (an intervention, independent of appeal): the market
//! a retrieval model serves when budgets change, and where the
//! evaluation (`bar_eval`) measures it, as the paper's bidding-aware
//! objective is meant for (§3.3).

use std::fmt;

use super::config::BarConfig;
use super::error::ModelError;
use super::features::{log_bucket, ratio_bucket, AdFeatures, BidFeatures, UserFeatures};

/// Exposed ads per session (`|I_u|`).
pub const IMPRESSIONS: usize = 5;
/// Ads sampled from each of the three rank strata of the non-exposed list.
pub const PER_STRATUM: usize = 5;
/// Vocabularies of the user fields after the segment: age bucket, gender,
/// hour of day, device.
pub const PROFILE_FIELD_VOCAB: [usize; 4] = [8, 3, 24, 4];

const MIN_SEQ_LEN: usize = 5;
const PREFS_PER_SEGMENT: usize = 3;
const SEQ_CANDIDATES: usize = 8;
const SEQ_EXPLORE: f64 = 0.1;
const SEGMENT_INTEREST: f64 = 0.8;
const FIELD_SHIFT: f64 = 0.1;

const CTR_BIAS: f32 = -5.5;
const CTR_SCALE: f32 = 1.0;
const INTEREST_BONUS: f32 = 2.5;
const BRAND_SIGMA: f64 = 0.3;

const BID_TYPE_PROBS: [f64; 3] = [0.5, 0.3, 0.2];
const BID_TYPE_FACTOR: [f32; 3] = [1.0, 1.15, 0.85];
const BC_MEDIAN: f32 = 5.0;
const BC_SIGMA: f64 = 0.8;
const BC_MIN: f32 = 0.05;
/// `log1p` range of both bucketised amounts in [`Market::model_config`].
const LOG_MAX: f32 = 6.0;
const DBV_SCALE: f32 = 5.0;
const DBV_EXPONENT: f32 = 0.5;
const DBV_SIGMA: f64 = 0.3;
const DBV_MIN: f32 = 0.01;

const RATIO_STEP: (f64, f64) = (0.1, 0.4);
const CONSTRAINT_FACTOR: (f64, f64) = (1.3, 2.5);

const NOISE_LEVELS: usize = 4096;

// Stream tags: one independent generator per (tag, index).
const S_CATE: u64 = 1;
const S_ITEM: u64 = 2;
const S_BRAND: u64 = 3;
const S_AD: u64 = 4;
const S_SEGMENT: u64 = 5;
const S_SHIFT: u64 = 6;
const S_USER: u64 = 7;
const S_SESSION: u64 = 8;
const S_NOISE: u64 = 9;
const S_STRATA: u64 = 10;
const S_EASY: u64 = 11;
const S_PERTURB: u64 = 12;
const S_EVENT: u64 = 13;
const S_APPEAL: u64 = 14;
const S_OPERATE: u64 = 15;

fn bc_max() -> f32 {
    LOG_MAX.exp_m1()
}

/// Sizes and seed of a synthetic market. Start from [`MarketConfig::default`]
/// (evaluation size) or [`MarketConfig::tiny`] (tests) and change fields or
/// use the `with_*` setters.
#[derive(Debug, Clone, PartialEq)]
pub struct MarketConfig {
    /// Seed of every random draw.
    pub seed: u64,
    /// Number of ads (the corpus); keys are `0..ads`.
    pub ads: usize,
    /// Number of users.
    pub users: usize,
    /// Number of items; ids `1..=items`.
    pub items: usize,
    /// Number of categories; ids `1..=cates`.
    pub cates: usize,
    /// Number of brands; ids `0..brands`.
    pub brands: usize,
    /// Number of user segments (the first user field's vocabulary).
    pub segments: usize,
    /// Dimension `d` of the latent vectors.
    pub latent_dim: usize,
    /// Longest behaviour sequence (and the model's `max_seq_len`).
    pub max_seq_len: usize,
    /// Ads that enter the ranking stage without exposure per session (the
    /// non-exposed list); the third stratum samples its ranks
    /// `101..=ranking_depth`. At least 105.
    pub ranking_depth: usize,
    /// Standard deviation of the ranking stage's log-eCPM error (0: the
    /// ranking stage is the truth).
    pub rank_noise: f32,
    /// Standard deviation `σ_h` of an ad's hidden creative appeal in the
    /// pCTR logit: what makes users click an ad beyond its item, category
    /// and brand. No feature shows it (0: no hidden appeal).
    pub appeal_sigma: f32,
    /// Correlation `ρ ∈ [0, 1)` between an ad's hidden appeal and how much
    /// of its budget it has *spent* when the logs are drawn: appealing ads
    /// win more auctions and spend faster, so in the logs a low
    /// `budget_left_ratio` goes with high appeal (0: budgets independent of
    /// appeal). [`Market::with_operated_budgets`] removes the correlation.
    pub spend_correlation: f32,
}

impl Default for MarketConfig {
    /// Evaluation size: 100k ads, 20k users, 4095 items, 63 categories, 512
    /// brands (vocabularies of [`BarConfig::default`]).
    fn default() -> Self {
        Self {
            seed: 0x5eed_ba12,
            ads: 100_000,
            users: 20_000,
            items: 4095,
            cates: 63,
            brands: 512,
            segments: 32,
            latent_dim: 16,
            max_seq_len: 50,
            ranking_depth: 1000,
            rank_noise: 0.3,
            appeal_sigma: 0.5,
            spend_correlation: 0.8,
        }
    }
}

impl MarketConfig {
    /// A small market for tests: 2000 ads, 500 users, 255 items, 15
    /// categories, 64 brands; generates in milliseconds.
    pub fn tiny() -> Self {
        Self {
            ads: 2000,
            users: 500,
            items: 255,
            cates: 15,
            brands: 64,
            segments: 8,
            max_seq_len: 20,
            ranking_depth: 200,
            ..Self::default()
        }
    }

    /// The same configuration with another seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The same configuration with `ads` ads.
    pub fn with_ads(mut self, ads: usize) -> Self {
        self.ads = ads;
        self
    }

    /// The same configuration with `users` users.
    pub fn with_users(mut self, users: usize) -> Self {
        self.users = users;
        self
    }

    /// Every size in range: counts positive and below `2^24` (ads and users
    /// below `2^30`), `latent_dim ≤ 4096`, `ranking_depth ≥ 105` and
    /// `ads ≥ 5 + ranking_depth`, `rank_noise` and `appeal_sigma` finite
    /// and non-negative, `spend_correlation` in `[0, 1)`.
    pub fn validate(&self) -> Result<(), ModelError> {
        let limits = [
            ("ads", self.ads, 1 << 30),
            ("users", self.users, 1 << 30),
            ("items", self.items, (1 << 24) - 1),
            ("cates", self.cates, (1 << 24) - 1),
            ("brands", self.brands, 1 << 24),
            ("segments", self.segments, 1 << 24),
            ("latent_dim", self.latent_dim, 4096),
            ("max_seq_len", self.max_seq_len, 1 << 24),
            ("ranking_depth", self.ranking_depth, 1 << 30),
        ];
        for (key, value, max) in limits {
            if value == 0 || value > max {
                return Err(market_error(key, format!("{value} is not in 1..={max}")));
            }
        }
        if self.ranking_depth < 100 + PER_STRATUM {
            return Err(market_error(
                "ranking_depth",
                format!(
                    "{}; the ranks-beyond-100 stratum needs at least {}",
                    self.ranking_depth,
                    100 + PER_STRATUM
                ),
            ));
        }
        if self.ads < IMPRESSIONS + self.ranking_depth {
            return Err(market_error(
                "ads",
                format!(
                    "{} ads cannot fill {IMPRESSIONS} impressions and a ranking depth of {}",
                    self.ads, self.ranking_depth
                ),
            ));
        }
        for (key, value) in [
            ("rank_noise", self.rank_noise),
            ("appeal_sigma", self.appeal_sigma),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(market_error(
                    key,
                    format!("{value} is not finite and non-negative"),
                ));
            }
        }
        if !(0.0..1.0).contains(&self.spend_correlation) {
            return Err(market_error(
                "spend_correlation",
                format!("{} is not in [0, 1)", self.spend_correlation),
            ));
        }
        // Each field is in range on its own, but their products can still
        // ask for terabytes, and an allocation that large aborts instead of
        // failing. Bound the 4-byte words `generate` allocates: the latent
        // tables of categories, items, ads and users, and the users'
        // behaviour sequences (item and category ids).
        let words = [
            (self.cates + 1, self.latent_dim),
            (self.items + 1, self.latent_dim),
            (self.ads, self.latent_dim),
            (self.users, self.latent_dim),
            (self.users, 2 * self.max_seq_len),
        ]
        .iter()
        .try_fold(0usize, |acc, &(n, width)| {
            acc.checked_add(n.checked_mul(width)?)
        });
        if words.is_none_or(|w| w > MAX_MARKET_WORDS) {
            return Err(market_error(
                "users",
                format!(
                    "the sizes ask for more than {MAX_MARKET_WORDS} words (16 GiB) of tables \
                     and sequences; shrink users, ads, items, latent_dim or max_seq_len"
                ),
            ));
        }
        Ok(())
    }
}

/// The most 4-byte words a market's tables and sequences may take: 2^32
/// (16 GiB) on 64-bit targets, `usize::MAX` on narrower ones.
pub const MAX_MARKET_WORDS: usize = (u32::MAX as usize).saturating_add(1);

fn market_error(key: &str, message: String) -> ModelError {
    ModelError::Config {
        key: format!("market.{key}"),
        message,
    }
}

/// An ad of the corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct Ad {
    /// Its key in an index: its position in [`Market::ads`].
    pub key: u64,
    /// Profile ids and the *current* bid features.
    pub features: AdFeatures,
}

/// A user of the market.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// The model's inputs: `[segment, age, gender, hour, device]` and the
    /// behaviour sequence.
    pub features: UserFeatures,
    /// Interest categories and their weights (sum 1), strongest first: the
    /// latent story, for analysis.
    pub interests: Vec<(u32, f32)>,
}

/// An ad of a session with the ranking stage's outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Labeled {
    /// Position of the ad in [`Market::ads`] (its key).
    pub ad: usize,
    /// The ranking stage's pCTR (the true pCTR): the distillation target.
    pub pctr: f32,
    /// The ranking stage's pBid, absolute (the true pBid under the ad's
    /// bids when the session was drawn); the trainer divides by
    /// `default_bid_value` for eq. 13.
    pub pbid: f32,
    /// The ranking stage's eCPM, which ordered the session:
    /// `pctr · pbid · 1000 · exp(rank_noise · ε)`.
    pub ecpm: f32,
    /// 1-based position in its list: impressions `1..=5` in exposure order;
    /// ranking ads their rank in the non-exposed list (`1..=10`,
    /// `11..=100`, `101..=ranking_depth`).
    pub rank: u32,
}

/// One user request (the paper's Appendix A.1): exposed ads and a
/// stratified sample of the ads that were ranked but not exposed.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// The session's index (what [`Market::session`] was called with).
    pub index: u64,
    /// The requesting user, a position in [`Market::users`].
    pub user: usize,
    /// `I_u`: the 5 exposed ads, best first.
    pub impressions: Vec<Labeled>,
    /// `R_u`: 5 ads from ranks 1-10, 5 from 11-100 and 5 from beyond 100 of
    /// the non-exposed list, by rank.
    pub ranking: Vec<Labeled>,
}

impl Session {
    /// Every ad of the session (`I_u ∪ R_u`), impressions first.
    pub fn ads(&self) -> impl Iterator<Item = usize> + '_ {
        self.impressions
            .iter()
            .chain(&self.ranking)
            .map(|labeled| labeled.ad)
    }
}

/// A live change of one ad's bids, for the near-line updater.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BidEvent {
    /// The ad, a position in [`Market::ads`].
    pub ad: usize,
    /// Its new bid features.
    pub bid: BidFeatures,
    /// Whether the change is a positive operation (budget added or
    /// constraint relaxed: the true eCPM rises) or a negative one (budget
    /// spent or constraint tightened: it falls).
    pub positive: bool,
}

/// A generated market: catalogue, ads with their current bids, users, and
/// the truth. See the [module docs](self) for the generative story.
#[derive(Clone)]
pub struct Market {
    config: MarketConfig,
    model: BarConfig,
    /// `item_cate[i]`: category of item `i` (`item_cate[0] = 0`).
    item_cate: Vec<u32>,
    ads: Vec<Ad>,
    /// `ads × d`, row-major.
    ad_latent: Vec<f32>,
    /// `−5.5 + q_brand(a) + σ_h · h_a` per ad.
    ad_offset: Vec<f32>,
    /// The true pBid under each ad's current bids.
    pbid: Vec<f32>,
    brand_quality: Vec<f32>,
    users: Vec<User>,
    /// `users × d`, row-major.
    user_latent: Vec<f32>,
    /// `exp(rank_noise · ε_j)` for the 4096 quantised normal levels.
    noise_table: Vec<f32>,
    /// `1 / √d`: the pCTR logit is `offset + ctr_scale · u · v_a + 2.5 · w`.
    ctr_scale: f32,
    /// Each ad's category (a compact copy for the scoring pass).
    ad_cate: Vec<u32>,
}

impl fmt::Debug for Market {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Market")
            .field("config", &self.config)
            .field("ads", &self.ads.len())
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl Market {
    /// Generates the market of `config` (deterministic in `config.seed`).
    /// About 0.15 s for the default 100k ads and 20k users in release.
    pub fn generate(config: &MarketConfig) -> Result<Self, ModelError> {
        config.validate()?;
        let d = config.latent_dim;
        let seed = config.seed;

        // Catalogue.
        let mut cate_latent = vec![0f32; (config.cates + 1) * d];
        for k in 1..=config.cates {
            let mut rng = Rng::new(seed, S_CATE, k as u64);
            for x in &mut cate_latent[k * d..(k + 1) * d] {
                *x = rng.normal() as f32;
            }
        }
        let mut item_cate = vec![0u32; config.items + 1];
        let mut item_latent = vec![0f32; (config.items + 1) * d];
        let mut items_by_cate: Vec<Vec<u32>> = vec![Vec::new(); config.cates + 1];
        for (i, cate) in item_cate.iter_mut().enumerate().skip(1) {
            let mut rng = Rng::new(seed, S_ITEM, i as u64);
            let k = if i <= config.cates {
                i
            } else {
                1 + rng.below(config.cates)
            };
            *cate = k as u32;
            items_by_cate[k].push(i as u32);
            let c = &cate_latent[k * d..(k + 1) * d];
            for (x, &ck) in item_latent[i * d..(i + 1) * d].iter_mut().zip(c) {
                *x = ck + 0.5 * rng.normal() as f32;
            }
        }
        let brand_quality: Vec<f32> = (0..config.brands)
            .map(|b| (BRAND_SIGMA * Rng::new(seed, S_BRAND, b as u64).normal()) as f32)
            .collect();

        // Ads.
        let mut ads = Vec::with_capacity(config.ads);
        let mut ad_latent = vec![0f32; config.ads * d];
        let mut ad_offset = Vec::with_capacity(config.ads);
        let mut pbid = Vec::with_capacity(config.ads);
        let mut ad_cate = Vec::with_capacity(config.ads);
        for (a, latent) in ad_latent.chunks_exact_mut(d).enumerate() {
            let mut rng = Rng::new(seed, S_AD, a as u64);
            let item = 1 + rng.below(config.items);
            let brand = rng.below(config.brands);
            let x = &item_latent[item * d..(item + 1) * d];
            for (v, &xi) in latent.iter_mut().zip(x) {
                *v = xi + 0.2 * rng.normal() as f32;
            }
            let bid_type = rng.categorical(&BID_TYPE_PROBS) as u32;
            let bid_constraint =
                (BC_MEDIAN * (BC_SIGMA * rng.normal()).exp() as f32).clamp(BC_MIN, bc_max());
            // The ad's own budget draw, coupled to its hidden appeal through
            // a Gaussian copula (the marginal stays U(0, 1)).
            let budget_draw = rng.uniform();
            let appeal = Rng::new(seed, S_APPEAL, a as u64).normal();
            let budget_left_ratio = spent_by_appeal(budget_draw, appeal, config.spend_correlation);
            let time_left_ratio = rng.uniform() as f32;
            let default_bid_value = (DBV_SCALE
                * (bid_constraint / BC_MEDIAN).powf(DBV_EXPONENT)
                * (DBV_SIGMA * rng.normal()).exp() as f32)
                .clamp(DBV_MIN, bc_max());
            let bid = BidFeatures {
                bid_type,
                bid_constraint,
                budget_left_ratio,
                time_left_ratio,
                default_bid_value,
            };
            pbid.push(pbid_of(&bid));
            ad_offset.push(CTR_BIAS + brand_quality[brand] + config.appeal_sigma * appeal as f32);
            ad_cate.push(item_cate[item]);
            ads.push(Ad {
                key: a as u64,
                features: AdFeatures {
                    item: item as u32,
                    cate: item_cate[item],
                    brand: brand as u32,
                    bid,
                },
            });
        }

        // Users.
        let prefs: Vec<[u32; PREFS_PER_SEGMENT]> = (0..config.segments)
            .map(|s| {
                let mut rng = Rng::new(seed, S_SEGMENT, s as u64);
                [(); PREFS_PER_SEGMENT].map(|()| 1 + rng.below(config.cates) as u32)
            })
            .collect();
        // shifts[field][value]: d floats, for the four profile fields.
        let shifts: Vec<Vec<f32>> = PROFILE_FIELD_VOCAB
            .iter()
            .enumerate()
            .map(|(field, &vocab)| {
                let mut rng = Rng::new(seed, S_SHIFT, field as u64);
                (0..vocab * d)
                    .map(|_| (FIELD_SHIFT * rng.normal()) as f32)
                    .collect()
            })
            .collect();
        const AGE: [f64; 8] = [0.05, 0.15, 0.2, 0.2, 0.15, 0.12, 0.08, 0.05];
        const GENDER: [f64; 3] = [0.1, 0.45, 0.45];
        const DEVICE: [f64; 4] = [0.55, 0.35, 0.07, 0.03];
        let mut users = Vec::with_capacity(config.users);
        let mut user_latent = vec![0f32; config.users * d];
        let inv_sqrt_d = 1.0 / (d as f32).sqrt();
        let min_len = MIN_SEQ_LEN.min(config.max_seq_len);
        let mut cand_items = Vec::with_capacity(SEQ_CANDIDATES);
        let mut cand_weights = Vec::with_capacity(SEQ_CANDIDATES);
        for (uidx, u) in user_latent.chunks_exact_mut(d).enumerate() {
            let mut rng = Rng::new(seed, S_USER, uidx as u64);
            let segment = rng.below(config.segments);
            let fields = [
                rng.categorical(&AGE),
                rng.categorical(&GENDER),
                rng.below(PROFILE_FIELD_VOCAB[2]),
                rng.categorical(&DEVICE),
            ];
            let count = 2 + rng.below(3);
            let mut interests: Vec<(u32, f32)> = Vec::with_capacity(count);
            for _ in 0..count {
                let cate = if rng.uniform() < SEGMENT_INTEREST {
                    prefs[segment][rng.below(PREFS_PER_SEGMENT)]
                } else {
                    1 + rng.below(config.cates) as u32
                };
                let w = rng.range(0.5, 1.5) as f32;
                match interests.iter_mut().find(|(c, _)| *c == cate) {
                    Some((_, weight)) => *weight += w,
                    None => interests.push((cate, w)),
                }
            }
            let total: f32 = interests.iter().map(|&(_, w)| w).sum();
            for (_, w) in &mut interests {
                *w /= total;
            }
            interests.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for &(cate, w) in &interests {
                let c = &cate_latent[cate as usize * d..(cate as usize + 1) * d];
                for (x, &ck) in u.iter_mut().zip(c) {
                    *x += w * ck;
                }
            }
            for x in u.iter_mut() {
                *x += 0.3 * rng.normal() as f32;
            }
            for (shift, &value) in shifts.iter().zip(&fields) {
                for (x, &s) in u.iter_mut().zip(&shift[value * d..(value + 1) * d]) {
                    *x += s;
                }
            }

            let len = min_len + rng.below(config.max_seq_len - min_len + 1);
            let mut seq_items = Vec::with_capacity(len);
            let mut seq_cates = Vec::with_capacity(len);
            let weights: Vec<f64> = interests.iter().map(|&(_, w)| w as f64).collect();
            for _ in 0..len {
                let pool = &items_by_cate[interests[rng.categorical(&weights)].0 as usize];
                let item = if pool.is_empty() || rng.uniform() < SEQ_EXPLORE {
                    1 + rng.below(config.items) as u32
                } else {
                    cand_items.clear();
                    cand_weights.clear();
                    for _ in 0..SEQ_CANDIDATES {
                        let item = pool[rng.below(pool.len())];
                        let x = &item_latent[item as usize * d..(item as usize + 1) * d];
                        cand_items.push(item);
                        cand_weights.push(dot(u, x) * inv_sqrt_d);
                    }
                    let max = cand_weights
                        .iter()
                        .fold(f32::NEG_INFINITY, |m, &w| m.max(w));
                    let probs: Vec<f64> = cand_weights
                        .iter()
                        .map(|&w| ((w - max) as f64).exp())
                        .collect();
                    cand_items[rng.categorical(&probs)]
                };
                seq_items.push(item);
                seq_cates.push(item_cate[item as usize]);
            }
            users.push(User {
                features: UserFeatures {
                    fields: [segment, fields[0], fields[1], fields[2], fields[3]]
                        .map(|v| v as u32)
                        .to_vec(),
                    seq_items,
                    seq_cates,
                },
                interests,
            });
        }

        let noise_table = (0..NOISE_LEVELS)
            .map(|j| {
                let p = (j as f64 + 0.5) / NOISE_LEVELS as f64;
                (config.rank_noise as f64 * inverse_normal_cdf(p)).exp() as f32
            })
            .collect();

        let model = BarConfig {
            user_field_vocab: [config.segments]
                .into_iter()
                .chain(PROFILE_FIELD_VOCAB)
                .collect(),
            item_vocab: config.items + 1,
            cate_vocab: config.cates + 1,
            brand_vocab: config.brands,
            max_seq_len: config.max_seq_len,
            bid_features: true,
            bid_type_vocab: BID_TYPE_FACTOR.len(),
            bid_constraint_log_max: LOG_MAX,
            default_bid_log_max: LOG_MAX,
            ..BarConfig::default()
        };
        Ok(Self {
            config: config.clone(),
            model,
            item_cate,
            ads,
            ad_latent,
            ad_offset,
            pbid,
            brand_quality,
            users,
            user_latent,
            noise_table,
            ctr_scale: CTR_SCALE / (d as f32).sqrt(),
            ad_cate,
        })
    }

    /// The configuration the market was generated from.
    pub fn config(&self) -> &MarketConfig {
        &self.config
    }

    /// A model configuration whose vocabularies and bucket ranges fit the
    /// market: [`BarConfig::default`] with `item_vocab = items + 1`,
    /// `cate_vocab = cates + 1`, `brand_vocab = brands`, `user_field_vocab
    /// = [segments, 8, 3, 24, 4]`, the market's `max_seq_len`, and both
    /// `log1p` bucket ranges `[0, 6]` (the generated amounts are clamped to
    /// `e^6 − 1`). Switch `bid_features` off for the "w/o BF" ablation.
    pub fn model_config(&self) -> BarConfig {
        self.model.clone()
    }

    /// The corpus, indexed by ad (= key), with the current bids.
    pub fn ads(&self) -> &[Ad] {
        &self.ads
    }

    /// The users.
    pub fn users(&self) -> &[User] {
        &self.users
    }

    /// The category of item `item` (0 for the padding id 0).
    ///
    /// # Panics
    /// If `item > items`.
    pub fn item_cate(&self, item: u32) -> u32 {
        self.item_cate[item as usize]
    }

    /// The user's latent vector `u` (length `latent_dim`).
    ///
    /// # Panics
    /// If `user >= users().len()`.
    pub fn user_latent(&self, user: usize) -> &[f32] {
        let d = self.config.latent_dim;
        &self.user_latent[user * d..(user + 1) * d]
    }

    /// The ad's latent vector `v_a` (length `latent_dim`).
    ///
    /// # Panics
    /// If `ad >= ads().len()`.
    pub fn ad_latent(&self, ad: usize) -> &[f32] {
        let d = self.config.latent_dim;
        &self.ad_latent[ad * d..(ad + 1) * d]
    }

    /// The brand's quality `q_b` (its pCTR logit offset).
    ///
    /// # Panics
    /// If `brand >= brands`.
    pub fn brand_quality(&self, brand: u32) -> f32 {
        self.brand_quality[brand as usize]
    }

    /// `u · v_a / √d`.
    ///
    /// # Panics
    /// If `user` or `ad` is out of range.
    pub fn affinity(&self, user: usize, ad: usize) -> f32 {
        dot(self.user_latent(user), self.ad_latent(ad)) / (self.config.latent_dim as f32).sqrt()
    }

    /// The true pCTR `sigmoid(−5.5 + affinity + 2.5 · interest + q_brand)`
    /// (see the [module docs](self)).
    ///
    /// # Panics
    /// If `user` or `ad` is out of range.
    pub fn true_pctr(&self, user: usize, ad: usize) -> f32 {
        let interest = self.interest(user, self.ad_cate[ad]);
        self.pctr_of(self.user_latent(user), interest, ad)
    }

    /// The true pBid of `ad` under the bid features `bid` (its current ones
    /// are `ads()[ad].features.bid`): `default_bid_value · g(bid)`, see the
    /// [module docs](self). Strictly increasing in `budget_left_ratio` on
    /// `[0, 1]` and in `bid_constraint` on `(0, ∞)`; NaN features give NaN.
    ///
    /// # Panics
    /// If `ad >= ads().len()`.
    pub fn true_pbid(&self, ad: usize, bid: &BidFeatures) -> f32 {
        assert!(ad < self.ads.len(), "ad {ad} out of range");
        pbid_of(bid)
    }

    /// The true eCPM `pCTR · pBid · 1000` of `ad` for `user` under `bid`.
    ///
    /// # Panics
    /// If `user` or `ad` is out of range.
    pub fn true_ecpm(&self, user: usize, ad: usize, bid: &BidFeatures) -> f32 {
        self.true_pctr(user, ad) * self.true_pbid(ad, bid) * 1000.0
    }

    /// The `k` ads of highest true eCPM for `user` under the current bids,
    /// best first (ties by lower index): the exact answer a retrieval of
    /// `k` ads approximates.
    ///
    /// # Panics
    /// If `user` is out of range.
    pub fn top_ads(&self, user: usize, k: usize) -> Vec<usize> {
        let u = self.user_latent(user);
        let mut weights = Vec::new();
        self.interest_weights(user, &mut weights);
        let mut keys: Vec<u64> = (0..self.ads.len())
            .map(|a| {
                let interest = weights[self.ad_cate[a] as usize];
                let ecpm = self.pctr_of(u, interest, a) * self.pbid[a] * 1000.0;
                order_key(ecpm, a)
            })
            .collect();
        top_sorted(&mut keys, k)
            .iter()
            .map(|&key| key_ad(key))
            .collect()
    }

    /// Corpus means of the current bid features: arithmetic means of the
    /// four amounts and the most frequent `bid_type` (a bid-blind baseline
    /// scores every ad with these).
    pub fn mean_bid(&self) -> BidFeatures {
        let n = self.ads.len() as f64;
        let mut sums = [0f64; 4];
        let mut types = [0usize; 3];
        for ad in &self.ads {
            let b = &ad.features.bid;
            sums[0] += b.bid_constraint as f64;
            sums[1] += b.budget_left_ratio as f64;
            sums[2] += b.time_left_ratio as f64;
            sums[3] += b.default_bid_value as f64;
            types[(b.bid_type as usize).min(2)] += 1;
        }
        let bid_type = (0..3).max_by_key(|&t| (types[t], 3 - t)).unwrap_or(0) as u32;
        BidFeatures {
            bid_type,
            bid_constraint: (sums[0] / n) as f32,
            budget_left_ratio: (sums[1] / n) as f32,
            time_left_ratio: (sums[2] / n) as f32,
            default_bid_value: (sums[3] / n) as f32,
        }
    }

    /// Session `index` (Appendix A.1), deterministic in `(seed, index)` and
    /// the current bids. Sessions of different indices are independent
    /// draws; use disjoint index ranges for training and evaluation. Costs
    /// one scoring pass over the corpus (about a millisecond per 100k ads).
    pub fn session(&self, index: u64) -> Session {
        self.session_with(index, &mut Scratch::default())
    }

    /// Sessions `start..start + count`, generated on up to
    /// `available_parallelism` threads; identical to calling
    /// [`session`](Self::session) for each index.
    pub fn sessions(&self, start: u64, count: usize) -> Vec<Session> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(count);
        if threads <= 1 {
            let mut scratch = Scratch::default();
            return (0..count as u64)
                .map(|i| self.session_with(start + i, &mut scratch))
                .collect();
        }
        let per = count.div_ceil(threads);
        let run = |lo: usize, hi: usize| {
            let mut scratch = Scratch::default();
            (lo..hi)
                .map(|i| self.session_with(start.wrapping_add(i as u64), &mut scratch))
                .collect::<Vec<_>>()
        };
        std::thread::scope(|scope| {
            let mut handles = Vec::with_capacity(threads);
            let mut chunks: Vec<(usize, Vec<Session>)> = Vec::with_capacity(threads);
            for t in 0..threads {
                let (lo, hi) = (t * per, ((t + 1) * per).min(count));
                if lo >= hi {
                    continue;
                }
                match std::thread::Builder::new().spawn_scoped(scope, move || run(lo, hi)) {
                    Ok(handle) => handles.push((lo, handle)),
                    // No thread to be had: generate this chunk here.
                    Err(_) => chunks.push((lo, run(lo, hi))),
                }
            }
            for (lo, handle) in handles {
                match handle.join() {
                    Ok(chunk) => chunks.push((lo, chunk)),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            chunks.sort_by_key(|&(lo, _)| lo);
            chunks.into_iter().flat_map(|(_, chunk)| chunk).collect()
        })
    }

    /// The ranking stage's eCPM of every ad in session `index` (what
    /// [`session`](Self::session) ranks by; `Labeled::ecpm` holds the same
    /// values), indexed by ad. For checks and analysis.
    pub fn ranking_stage_ecpm(&self, index: u64) -> Vec<f32> {
        let mut scratch = Scratch::default();
        let user = self.session_user(index);
        self.score_corpus(user, index, &mut scratch);
        scratch.scores
    }

    /// Easy pairs (Appendix A.1): for each positive of `I_u ∪ R_u` (in
    /// [`Session::ads`] order), `per_positive` negatives drawn uniformly,
    /// independently and with replacement from the ads not in the session.
    /// Deterministic in `(seed, session.index, salt)`. Returns (positive,
    /// negative) ad pairs.
    pub fn easy_negatives(
        &self,
        session: &Session,
        per_positive: usize,
        salt: u64,
    ) -> Vec<(usize, usize)> {
        let n = self.ads.len();
        let mut excluded: Vec<usize> = session.ads().filter(|&a| a < n).collect();
        excluded.sort_unstable();
        excluded.dedup();
        if excluded.len() >= n {
            return Vec::new();
        }
        let free = n - excluded.len();
        let mut rng = Rng::new(self.config.seed, S_EASY, mix(session.index) ^ salt);
        // Saturating and bounded: a caller's huge `per_positive` is a long
        // loop, not an allocation failure up front.
        let mut pairs = Vec::with_capacity(
            per_positive
                .saturating_mul(IMPRESSIONS + 3 * PER_STRATUM)
                .min(1 << 20),
        );
        for positive in session.ads() {
            for _ in 0..per_positive {
                // The r-th ad not excluded: skip past the excluded ads below it.
                let mut r = rng.below(free);
                for &e in &excluded {
                    if e <= r {
                        r += 1;
                    } else {
                        break;
                    }
                }
                pairs.push((positive, r));
            }
        }
        pairs
    }

    /// Hard pairs (eq. 7): every (impression, ranking ad) pair of the
    /// session, 5 × 15.
    pub fn hard_pairs(&self, session: &Session) -> Vec<(usize, usize)> {
        session
            .impressions
            .iter()
            .flat_map(|p| session.ranking.iter().map(move |n| (p.ad, n.ad)))
            .collect()
    }

    /// A perturbation of the paper's Table 2 for the bidding-aware objective:
    /// `budget_left_ratio` or `bid_constraint` (equally likely) moved up
    /// (indicator `+1`: budget added, constraint relaxed) or down (`−1`),
    /// equally likely. Ratios move by `±U(0.1, 0.4)` (clamped to `[0, 1]`),
    /// the constraint by a factor `U(1.3, 2.5)` (clamped to
    /// `[0.05, e^6 − 1]`). The moved feature always lands in another bucket
    /// of [`model_config`](Self::model_config)'s bucketisation, so the
    /// model's input changes: a move that stays in its bucket goes on to
    /// the middle of the next one, and where the end of the range leaves no
    /// room the direction flips. The true eCPM moves strictly in the
    /// indicator's direction. Deterministic in `(seed, salt)`; the indicator
    /// is 0.0 (and the bid unchanged) only if no move is possible, which
    /// cannot happen for finite features.
    pub fn perturb(&self, bid: &BidFeatures, salt: u64) -> (BidFeatures, f32) {
        let mut rng = Rng::new(self.config.seed, S_PERTURB, salt);
        self.perturb_with(bid, &mut rng)
    }

    /// A live bid change: a uniform ad and a [`perturb`](Self::perturb)-style
    /// move of its *current* bids (positive: budget added or constraint
    /// relaxed; negative: budget spent or constraint tightened).
    /// Deterministic in `(seed, salt)` and the current bids; apply it with
    /// [`apply`](Self::apply).
    pub fn bid_event(&self, salt: u64) -> BidEvent {
        let mut rng = Rng::new(self.config.seed, S_EVENT, salt);
        let ad = rng.below(self.ads.len());
        let (bid, indicator) = self.perturb_with(&self.ads[ad].features.bid, &mut rng);
        BidEvent {
            ad,
            bid,
            positive: indicator > 0.0,
        }
    }

    /// Applies a bid event: [`set_bid`](Self::set_bid)`(event.ad, event.bid)`.
    pub fn apply(&mut self, event: &BidEvent) -> Result<(), ModelError> {
        self.set_bid(event.ad, event.bid)
    }

    /// Replaces the current bid features of `ad`; the truth and later
    /// sessions follow them. Rejects an unknown ad and features the model
    /// cannot take (see [`AdFeatures::tokens`]).
    pub fn set_bid(&mut self, ad: usize, bid: BidFeatures) -> Result<(), ModelError> {
        let Some(entry) = self.ads.get_mut(ad) else {
            return Err(ModelError::Feature {
                feature: "ad",
                message: format!("ad {ad} is not in 0..{}", self.ads.len()),
            });
        };
        let features = AdFeatures {
            bid,
            ..entry.features
        };
        features.tokens(&self.model)?;
        entry.features = features;
        self.pbid[ad] = pbid_of(&bid);
        Ok(())
    }

    /// The same market after every advertiser has set its budget: each ad's
    /// `budget_left_ratio` drawn afresh from `U(0, 1)`, independent of its
    /// hidden appeal (as an intervention is), everything else unchanged.
    /// Deterministic in `(seed, salt)`.
    ///
    /// This is the market retrieval has to serve: the logs a model learns
    /// from confound the budget with appeal
    /// ([`spend_correlation`](MarketConfig::spend_correlation)), but when
    /// an advertiser adds budget the ad's appeal does not change, and the
    /// ranking stage (the truth) ranks it higher. A model that learned the
    /// logs' correlation instead of the auction's monotone effect retrieves
    /// the wrong ads here (the paper's case for the bidding-aware
    /// objective, §3.3).
    pub fn with_operated_budgets(&self, salt: u64) -> Market {
        let mut operated = self.clone();
        for (a, ad) in operated.ads.iter_mut().enumerate() {
            let mut rng = Rng::new(self.config.seed, S_OPERATE, mix(salt) ^ a as u64);
            ad.features.bid.budget_left_ratio = rng.uniform() as f32;
            operated.pbid[a] = pbid_of(&ad.features.bid);
        }
        operated
    }

    fn perturb_with(&self, bid: &BidFeatures, rng: &mut Rng) -> (BidFeatures, f32) {
        let budget_first = rng.uniform() < 0.5;
        let up_first = rng.uniform() < 0.5;
        let step = rng.range(RATIO_STEP.0, RATIO_STEP.1) as f32;
        let factor = rng.range(CONSTRAINT_FACTOR.0, CONSTRAINT_FACTOR.1) as f32;
        for budget in [budget_first, !budget_first] {
            for up in [up_first, !up_first] {
                let moved = if budget {
                    self.move_ratio(bid.budget_left_ratio, up, step)
                        .map(|v| BidFeatures {
                            budget_left_ratio: v,
                            ..*bid
                        })
                } else {
                    self.move_constraint(bid.bid_constraint, up, factor)
                        .map(|v| BidFeatures {
                            bid_constraint: v,
                            ..*bid
                        })
                };
                if let Some(moved) = moved {
                    return (moved, if up { 1.0 } else { -1.0 });
                }
            }
        }
        (*bid, 0.0)
    }

    /// `x` moved by `step` in direction `up` into another ratio bucket.
    fn move_ratio(&self, x: f32, up: bool, step: f32) -> Option<f32> {
        let nb = self.model.buckets;
        let bucket = |v: f32| ratio_bucket(v, nb);
        let ok =
            |v: f32| v.is_finite() && (if up { v > x } else { v < x }) && bucket(v) != bucket(x);
        let v = (if up { x + step } else { x - step }).clamp(0.0, 1.0);
        if ok(v) {
            return Some(v);
        }
        let b = bucket(x) as f32;
        let mid = (if up { b + 1.5 } else { b - 0.5 }) / nb as f32;
        ok(mid).then_some(mid)
    }

    /// `x` scaled by `factor` in direction `up` into another log1p bucket.
    fn move_constraint(&self, x: f32, up: bool, factor: f32) -> Option<f32> {
        let nb = self.model.buckets;
        let log_max = self.model.bid_constraint_log_max;
        let bucket = |v: f32| log_bucket(v, log_max, nb);
        let ok =
            |v: f32| v.is_finite() && (if up { v > x } else { v < x }) && bucket(v) != bucket(x);
        let v = (if up { x * factor } else { x / factor }).clamp(BC_MIN, bc_max());
        if ok(v) {
            return Some(v);
        }
        let b = bucket(x) as f32;
        let mid = ((if up { b + 1.5 } else { b - 0.5 }) * log_max / nb as f32)
            .exp_m1()
            .min(bc_max());
        ok(mid).then_some(mid)
    }

    fn session_user(&self, index: u64) -> usize {
        Rng::new(self.config.seed, S_SESSION, index).below(self.users.len())
    }

    /// The true pCTR of `ad` for the user latent `u`: every pCTR of the
    /// market goes through here, so they agree to the bit.
    fn pctr_of(&self, u: &[f32], interest: f32, ad: usize) -> f32 {
        let logit = self.ad_offset[ad]
            + self.ctr_scale * dot(u, self.ad_latent(ad))
            + INTEREST_BONUS * interest;
        1.0 / (1.0 + (-logit).exp())
    }

    /// The user's weight on category `cate` (0 if not an interest).
    fn interest(&self, user: usize, cate: u32) -> f32 {
        self.users[user]
            .interests
            .iter()
            .find(|&&(c, _)| c == cate)
            .map_or(0.0, |&(_, w)| w)
    }

    /// [`interest`](Self::interest) of every category, indexed by id.
    fn interest_weights(&self, user: usize, out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.config.cates + 1, 0.0);
        for &(cate, w) in &self.users[user].interests {
            out[cate as usize] = w;
        }
    }

    /// Ranking-stage eCPM of every ad into `scratch.scores`.
    fn score_corpus(&self, user: usize, index: u64, scratch: &mut Scratch) {
        let u = self.user_latent(user);
        self.interest_weights(user, &mut scratch.weights);
        let mut noise = Rng::new(self.config.seed, S_NOISE, index);
        let n = self.ads.len();
        scratch.scores.clear();
        scratch.scores.reserve(n);
        let mut bits = 0u64;
        for a in 0..n {
            if a % 4 == 0 {
                bits = noise.next_u64();
            }
            let level = ((bits >> (16 * (a % 4) + 4)) as usize) & (NOISE_LEVELS - 1);
            let interest = scratch.weights[self.ad_cate[a] as usize];
            let ecpm = self.pctr_of(u, interest, a) * self.pbid[a] * 1000.0;
            scratch.scores.push(ecpm * self.noise_table[level]);
        }
    }

    fn session_with(&self, index: u64, scratch: &mut Scratch) -> Session {
        let user = self.session_user(index);
        self.score_corpus(user, index, scratch);
        let Scratch {
            scores,
            keys,
            weights,
        } = scratch;
        let u = self.user_latent(user);
        keys.clear();
        keys.extend(scores.iter().enumerate().map(|(a, &s)| order_key(s, a)));
        let depth = IMPRESSIONS + self.config.ranking_depth;
        let top = top_sorted(keys, depth);
        let label = |position: usize, rank: usize| {
            let ad = key_ad(top[position]);
            Labeled {
                ad,
                pctr: self.pctr_of(u, weights[self.ad_cate[ad] as usize], ad),
                pbid: self.pbid[ad],
                ecpm: scores[ad],
                rank: rank as u32,
            }
        };
        let impressions = (0..IMPRESSIONS).map(|p| label(p, p + 1)).collect();
        // Strata of the non-exposed list (ranks 1-10, 11-100, 101-depth) as
        // positions of `top`, which starts with the impressions.
        let mut rng = Rng::new(self.config.seed, S_STRATA, index);
        let mut ranking = Vec::with_capacity(3 * PER_STRATUM);
        for (lo, hi) in [(0, 10), (10, 100), (100, self.config.ranking_depth)] {
            let mut picked = sample_distinct(&mut rng, hi - lo, PER_STRATUM);
            picked.sort_unstable();
            for offset in picked {
                let rank = lo + offset + 1;
                ranking.push(label(IMPRESSIONS + rank - 1, rank));
            }
        }
        Session {
            index,
            user,
            impressions,
            ranking,
        }
    }
}

/// `g(bid) · default_bid_value`, see the module docs.
fn pbid_of(bid: &BidFeatures) -> f32 {
    let blr = bid.budget_left_ratio.clamp(0.0, 1.0);
    let tlr = bid.time_left_ratio.clamp(0.0, 1.0);
    let bc = bid.bid_constraint.max(0.0);
    let type_factor = BID_TYPE_FACTOR[(bid.bid_type as usize).min(BID_TYPE_FACTOR.len() - 1)];
    let g =
        (0.2 + 1.2 * blr.powf(0.7)) * (bc / BC_MEDIAN).powf(0.6) * type_factor * (1.1 - 0.2 * tlr);
    bid.default_bid_value * g
}

/// Per-thread buffers of session generation.
#[derive(Default)]
struct Scratch {
    weights: Vec<f32>,
    scores: Vec<f32>,
    keys: Vec<u64>,
}

/// Sorts ascending by `(−score, ad)`: a non-negative f32's bits order like
/// its value.
fn order_key(score: f32, ad: usize) -> u64 {
    let bits = if score.is_nan() {
        0
    } else {
        score.max(0.0).to_bits()
    };
    ((!bits as u64) << 32) | ad as u64
}

fn key_ad(key: u64) -> usize {
    (key & 0xffff_ffff) as usize
}

/// The `k` smallest keys, sorted (all of them if fewer).
fn top_sorted(keys: &mut [u64], k: usize) -> &[u64] {
    let k = k.min(keys.len());
    if k == 0 {
        return &[];
    }
    if k < keys.len() {
        keys.select_nth_unstable(k - 1);
    }
    let top = &mut keys[..k];
    top.sort_unstable();
    top
}

/// `k` distinct values of `0..n` (Floyd's algorithm); all of them if
/// `k >= n`.
fn sample_distinct(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n);
    let mut out = Vec::with_capacity(k);
    for j in n - k..n {
        let t = rng.below(j + 1);
        out.push(if out.contains(&t) { j } else { t });
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..4 {
            acc[j] += x[j] * y[j];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// The splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A splitmix64 stream keyed by `(seed, stream, index)`.
struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    fn new(seed: u64, stream: u64, index: u64) -> Self {
        Self {
            state: mix(mix(mix(seed) ^ stream) ^ index),
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in `0..n` (`n ≥ 1`; multiply-shift, bias below 2^-32 for the
    /// sizes used here).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box-Muller, both values used).
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }

    /// An index drawn with probability proportional to `weights` (positive
    /// sum).
    fn categorical(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.uniform() * total;
        for (i, &w) in weights.iter().enumerate() {
            if x < w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

/// The logged `budget_left_ratio` of an ad: its uniform draw `u` mapped
/// through the normal quantile, mixed with minus its appeal `h` at
/// correlation `rho`, and mapped back through the normal CDF:
/// `Φ(−ρ·h + √(1 − ρ²)·Φ⁻¹(u))`. The result is again `U(0, 1)` (for
/// `h ~ N(0, 1)`) and equals `u` (to rounding) when `rho = 0`.
fn spent_by_appeal(u: f64, appeal: f64, rho: f32) -> f32 {
    let rho = f64::from(rho);
    let z = inverse_normal_cdf(u.clamp(1e-12, 1.0 - 1e-12));
    normal_cdf(-rho * appeal + (1.0 - rho * rho).sqrt() * z) as f32
}

/// The standard normal CDF through `erfc` (Numerical Recipes' Chebyshev
/// fit, fractional error below 1.2e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - 0.5 * erfc
    } else {
        0.5 * erfc
    }
}

/// The standard normal quantile (Acklam's rational approximation, relative
/// error below 1.2e-9), for `p` in `(0, 1)`.
fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.02425;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_matches_known_values_and_inverts_the_quantile() {
        // Φ(x) from tables (Abramowitz & Stegun 26.2).
        for (x, p) in [
            (0.0, 0.5),
            (1.0, 0.841_344_746),
            (-1.959_963_985, 0.025),
            (2.326_347_874, 0.99),
            (-3.0, 0.001_349_898),
        ] {
            assert!(
                (normal_cdf(x) - p).abs() < 2e-7,
                "Φ({x}) = {}",
                normal_cdf(x)
            );
        }
        for j in 1..200 {
            let p = j as f64 / 200.0;
            assert!((normal_cdf(inverse_normal_cdf(p)) - p).abs() < 2e-7);
        }
    }

    #[test]
    fn spending_couples_the_budget_to_appeal_and_keeps_it_uniform() {
        // ρ = 0: the ad's own draw, unchanged.
        for j in 0..100 {
            let u = (j as f64 + 0.5) / 100.0;
            assert!((spent_by_appeal(u, 1.7, 0.0) as f64 - u).abs() < 1e-6);
        }
        // ρ = 0.8: uniform margin, strongly negative correlation with appeal.
        let mut rng = Rng::new(3, 99, 0);
        let n = 20_000;
        let (mut sum, mut below_tenth, mut cov) = (0.0, 0usize, 0.0);
        for _ in 0..n {
            let h = rng.normal();
            let b = spent_by_appeal(rng.uniform(), h, 0.8) as f64;
            assert!((0.0..=1.0).contains(&b));
            sum += b;
            below_tenth += usize::from(b < 0.1);
            cov += h * (b - 0.5);
        }
        assert!((sum / n as f64 - 0.5).abs() < 0.01);
        assert!((below_tenth as f64 / n as f64 - 0.1).abs() < 0.01);
        // corr(h, Φ(−ρh + …)) = −ρ · √(3/π) for a uniform margin: ≈ −0.78.
        let corr = cov / n as f64 / (1.0f64 / 12.0).sqrt();
        assert!(
            (corr + 0.8 * (3.0 / std::f64::consts::PI).sqrt()).abs() < 0.03,
            "{corr}"
        );
    }

    #[test]
    fn inverse_cdf_matches_known_quantiles() {
        assert!(inverse_normal_cdf(0.5).abs() < 1e-9);
        assert!((inverse_normal_cdf(0.975) - 1.959_963_985).abs() < 1e-6);
        assert!((inverse_normal_cdf(0.01) + 2.326_347_874).abs() < 1e-6);
    }

    #[test]
    fn noise_table_is_quantised_normal() {
        let market = Market::generate(&MarketConfig::tiny()).unwrap();
        let logs: Vec<f64> = market
            .noise_table
            .iter()
            .map(|&x| (x as f64).ln() / 0.3)
            .collect();
        let mean = logs.iter().sum::<f64>() / logs.len() as f64;
        let var = logs.iter().map(|x| x * x).sum::<f64>() / logs.len() as f64;
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((var - 1.0).abs() < 0.01, "{var}");
        assert!(logs.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn sample_distinct_is_distinct_and_in_range() {
        let mut rng = Rng::new(1, 2, 3);
        for n in [5, 6, 10, 90, 1000] {
            let mut s = sample_distinct(&mut rng, n, 5);
            assert_eq!(s.len(), 5);
            assert!(s.iter().all(|&x| x < n));
            s.sort_unstable();
            s.dedup();
            assert_eq!(s.len(), 5);
        }
    }

    #[test]
    fn rejects_invalid_configs() {
        for config in [
            MarketConfig::tiny().with_ads(0),
            MarketConfig::tiny().with_users(0),
            MarketConfig::tiny().with_ads(100),
            MarketConfig {
                ranking_depth: 50,
                ..MarketConfig::tiny()
            },
            MarketConfig {
                rank_noise: f32::NAN,
                ..MarketConfig::tiny()
            },
            MarketConfig {
                latent_dim: 0,
                ..MarketConfig::tiny()
            },
        ] {
            assert!(matches!(
                Market::generate(&config),
                Err(ModelError::Config { .. })
            ));
        }
    }
}
