//! The model's raw inputs and the ad's tokens (the index payload).
//!
//! Numerical bid features are bucketised before embedding (the paper, §3.1):
//! ratios in `[0, 1]` uniformly into `buckets` buckets, positive amounts by
//! `log1p` uniformly over `[0, *_log_max]`; values beyond the range fall in
//! the end buckets.

use super::config::BarConfig;
use super::error::ModelError;

/// The user side of a request: profile and context fields and the
/// behaviour sequence (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserFeatures {
    /// One categorical id per user field (`config.user_field_vocab`).
    pub fields: Vec<u32>,
    /// Items of the behaviour sequence, `>= 1` (0 is padding).
    pub seq_items: Vec<u32>,
    /// Their categories, same length as `seq_items`.
    pub seq_cates: Vec<u32>,
}

/// The five bid features of the paper's Table 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BidFeatures {
    /// OCPC = 0, max return = 1, multi-constrained = 2.
    pub bid_type: u32,
    /// The KPI constraint (target cost per click or conversion, 1/ROI);
    /// higher is looser. Monotone: the score must not fall when it rises.
    pub bid_constraint: f32,
    /// Remaining budget share of the day in `[0, 1]`. Monotone.
    pub budget_left_ratio: f32,
    /// Remaining time share of the day in `[0, 1]`.
    pub time_left_ratio: f32,
    /// The ad's historical mean pBid (`aBid`, which pBid is normalised by).
    pub default_bid_value: f32,
}

/// The ad side: profile ids and bid features.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdFeatures {
    /// Item id, `>= 1`.
    pub item: u32,
    /// Category id, `>= 1`.
    pub cate: u32,
    /// Brand id.
    pub brand: u32,
    /// The bid features (ignored by a model without them).
    pub bid: BidFeatures,
}

/// An ad's token ids: `[item, cate, brand, bid_type, bid_constraint bucket,
/// budget_left bucket, time_left bucket, default_bid bucket]`, the first
/// `config.ad_tokens()` of them in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdTokens {
    ids: [u32; 8],
    len: u8,
}

impl AdTokens {
    /// The ids in use.
    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.len as usize]
    }

    /// The payload stored in the index: each id as 4 little-endian bytes.
    pub fn to_payload(&self) -> Vec<u8> {
        self.ids().iter().flat_map(|id| id.to_le_bytes()).collect()
    }

    /// Reads a payload written by [`to_payload`](Self::to_payload) and
    /// checks every id against `config`'s vocabularies.
    pub fn from_payload(config: &BarConfig, payload: &[u8]) -> Result<Self, ModelError> {
        let len = config.ad_tokens();
        if payload.len() != len * 4 {
            return Err(ModelError::Feature {
                feature: "payload",
                message: format!("{} bytes; the model needs {}", payload.len(), len * 4),
            });
        }
        let mut ids = [0u32; 8];
        for (id, bytes) in ids.iter_mut().zip(payload.chunks_exact(4)) {
            *id = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        let tokens = Self {
            ids,
            len: len as u8,
        };
        tokens.check(config)?;
        Ok(tokens)
    }

    /// Builds tokens from ids, checked against `config`.
    pub fn from_ids(config: &BarConfig, ids: &[u32]) -> Result<Self, ModelError> {
        if ids.len() != config.ad_tokens() {
            return Err(ModelError::Feature {
                feature: "tokens",
                message: format!("{} ids; the model needs {}", ids.len(), config.ad_tokens()),
            });
        }
        let mut all = [0u32; 8];
        all[..ids.len()].copy_from_slice(ids);
        let tokens = Self {
            ids: all,
            len: ids.len() as u8,
        };
        tokens.check(config)?;
        Ok(tokens)
    }

    fn check(&self, config: &BarConfig) -> Result<(), ModelError> {
        let vocab = token_vocab(config);
        for (i, (&id, &(name, size))) in self.ids().iter().zip(vocab.iter()).enumerate() {
            if id as usize >= size || (i < 2 && id == 0) {
                return Err(ModelError::Feature {
                    feature: name,
                    message: format!("id {id} is not in 1..{size}"),
                });
            }
        }
        Ok(())
    }
}

/// Name and vocabulary size of each ad token position.
pub(crate) fn token_vocab(config: &BarConfig) -> [(&'static str, usize); 8] {
    [
        ("item", config.item_vocab),
        ("cate", config.cate_vocab),
        ("brand", config.brand_vocab),
        ("bid_type", config.bid_type_vocab),
        ("bid_constraint", config.buckets),
        ("budget_left_ratio", config.buckets),
        ("time_left_ratio", config.buckets),
        ("default_bid_value", config.buckets),
    ]
}

/// `x` in `[0, 1]` to one of `buckets` equal buckets (ends clamp; no
/// buckets is one bucket, 0).
pub fn ratio_bucket(x: f32, buckets: usize) -> u32 {
    let b = (x.clamp(0.0, 1.0) * buckets as f32) as usize;
    b.min(buckets.saturating_sub(1)) as u32
}

/// A non-negative amount, by `log1p`, to one of `buckets` equal buckets over
/// `[0, log_max]` (ends clamp).
pub fn log_bucket(x: f32, log_max: f32, buckets: usize) -> u32 {
    ratio_bucket(x.max(0.0).ln_1p() / log_max, buckets)
}

impl AdFeatures {
    /// The ad's tokens under `config`; rejects ids outside the vocabularies
    /// and non-finite or out-of-domain bid features.
    pub fn tokens(&self, config: &BarConfig) -> Result<AdTokens, ModelError> {
        let b = &self.bid;
        for (feature, value) in [
            ("bid_constraint", b.bid_constraint),
            ("budget_left_ratio", b.budget_left_ratio),
            ("time_left_ratio", b.time_left_ratio),
            ("default_bid_value", b.default_bid_value),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(ModelError::Feature {
                    feature,
                    message: format!("{value} is not finite and non-negative"),
                });
            }
        }
        let nb = config.buckets;
        let all = [
            self.item,
            self.cate,
            self.brand,
            b.bid_type,
            log_bucket(b.bid_constraint, config.bid_constraint_log_max, nb),
            ratio_bucket(b.budget_left_ratio, nb),
            ratio_bucket(b.time_left_ratio, nb),
            log_bucket(b.default_bid_value, config.default_bid_log_max, nb),
        ];
        AdTokens::from_ids(config, &all[..config.ad_tokens()])
    }
}

impl UserFeatures {
    /// Checks every id against `config` (the sequence may be empty and is
    /// truncated to its last `max_seq_len` entries by the model).
    pub fn check(&self, config: &BarConfig) -> Result<(), ModelError> {
        if self.fields.len() != config.user_field_vocab.len() {
            return Err(ModelError::Feature {
                feature: "user fields",
                message: format!(
                    "{} fields; the model has {}",
                    self.fields.len(),
                    config.user_field_vocab.len()
                ),
            });
        }
        for (&id, &size) in self.fields.iter().zip(&config.user_field_vocab) {
            if id as usize >= size {
                return Err(ModelError::Feature {
                    feature: "user fields",
                    message: format!("id {id} is not in 0..{size}"),
                });
            }
        }
        if self.seq_items.len() != self.seq_cates.len() {
            return Err(ModelError::Feature {
                feature: "behaviour sequence",
                message: format!(
                    "{} items but {} categories",
                    self.seq_items.len(),
                    self.seq_cates.len()
                ),
            });
        }
        for (&item, &cate) in self.seq_items.iter().zip(&self.seq_cates) {
            if item as usize >= config.item_vocab || cate as usize >= config.cate_vocab {
                return Err(ModelError::Feature {
                    feature: "behaviour sequence",
                    message: format!(
                        "(item {item}, category {cate}) outside 0..{} x 0..{}",
                        config.item_vocab, config.cate_vocab
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_clamp_and_order() {
        assert_eq!(ratio_bucket(0.0, 20), 0);
        assert_eq!(ratio_bucket(1.0, 20), 19);
        assert_eq!(ratio_bucket(0.5, 20), 10);
        assert_eq!(ratio_bucket(-3.0, 20), 0);
        assert!(log_bucket(10.0, 6.0, 20) < log_bucket(100.0, 6.0, 20));
        assert_eq!(log_bucket(1e9, 6.0, 20), 19);
    }

    #[test]
    fn payload_round_trips_and_is_checked() {
        let config = BarConfig::default();
        let ad = AdFeatures {
            item: 7,
            cate: 3,
            brand: 9,
            bid: BidFeatures {
                bid_type: 1,
                bid_constraint: 20.0,
                budget_left_ratio: 0.42,
                time_left_ratio: 0.9,
                default_bid_value: 3.0,
            },
        };
        let tokens = ad.tokens(&config).unwrap();
        assert_eq!(tokens.ids().len(), 8);
        assert_eq!(tokens.ids()[5], 8); // 0.42 * 20 = 8.4
        let back = AdTokens::from_payload(&config, &tokens.to_payload()).unwrap();
        assert_eq!(back, tokens);
        let mut bad = tokens.to_payload();
        bad[0..4].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(
            AdTokens::from_payload(&config, &bad),
            Err(ModelError::Feature {
                feature: "item",
                ..
            })
        ));
        let nan = AdFeatures {
            bid: BidFeatures {
                budget_left_ratio: f32::NAN,
                ..ad.bid
            },
            ..ad
        };
        assert!(nan.tokens(&config).is_err());
    }
}
