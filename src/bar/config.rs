//! The BAR model's dimensions and feature ranges, stored in the weights
//! file's metadata so a file describes itself.

use std::collections::HashMap;

use super::error::ModelError;

/// Prefix of every configuration key in the safetensors metadata.
pub const METADATA_PREFIX: &str = "nann.bar.";

/// Dimensions of a BAR model and the ranges its numerical features are
/// bucketised over. See the [module docs](super) for what each dimension
/// sizes.
///
/// ```
/// let config = nann::bar::BarConfig::default();
/// assert_eq!(config.ad_tokens(), 8);
/// let back = nann::bar::BarConfig::from_metadata(&config.to_metadata()).unwrap();
/// assert_eq!(back, config);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BarConfig {
    /// `E`: width of every embedding table.
    pub emb_dim: usize,
    /// Vocabulary size of each user profile / context field (`F` fields).
    pub user_field_vocab: Vec<usize>,
    /// Item ids, 0 reserved for sequence padding.
    pub item_vocab: usize,
    /// Category ids, 0 reserved for sequence padding.
    pub cate_vocab: usize,
    /// Brand ids.
    pub brand_vocab: usize,
    /// `L`: the longest behaviour sequence; longer ones keep their last `L`.
    pub max_seq_len: usize,
    /// Whether the five bid features of the paper's Table 1 are inputs
    /// (false: the "w/o BF" ablation).
    pub bid_features: bool,
    /// Number of bid types (OCPC, max return, multi-constrained).
    pub bid_type_vocab: usize,
    /// Buckets per numerical bid feature.
    pub buckets: usize,
    /// `log1p(bid_constraint)` is bucketised uniformly over `[0, this]`.
    pub bid_constraint_log_max: f32,
    /// `log1p(default_bid_value)` is bucketised uniformly over `[0, this]`.
    pub default_bid_log_max: f32,
    /// Hidden width of the user network.
    pub user_hidden: usize,
    /// Hidden width of the ad network.
    pub ad_hidden: usize,
    /// `D`: width of `z_u`, `z_seq` and `z_a` (the index dimension).
    pub d_model: usize,
    /// `A`: width of attention queries and keys (and the heads' values).
    pub d_attn: usize,
    /// `H`: hidden width of the three task heads.
    pub head_hidden: usize,
}

impl Default for BarConfig {
    /// Small dimensions for a CPU: about 170k parameters (0.7 MB).
    fn default() -> Self {
        Self {
            emb_dim: 16,
            user_field_vocab: vec![32, 8, 3, 24, 4],
            item_vocab: 4096,
            cate_vocab: 64,
            brand_vocab: 512,
            max_seq_len: 50,
            bid_features: true,
            bid_type_vocab: 3,
            buckets: 20,
            bid_constraint_log_max: 6.0,
            default_bid_log_max: 6.0,
            user_hidden: 128,
            ad_hidden: 128,
            d_model: 64,
            d_attn: 32,
            head_hidden: 64,
        }
    }
}

impl BarConfig {
    /// `T`: tokens per ad (the payload length in ids).
    pub fn ad_tokens(&self) -> usize {
        if self.bid_features {
            8
        } else {
            3
        }
    }

    /// Payload bytes per ad: `T` little-endian u32 ids.
    pub fn payload_bytes(&self) -> usize {
        self.ad_tokens() * 4
    }

    /// Every dimension positive, every range finite and positive, and the
    /// weights they ask for at most [`MAX_MODEL_PARAMETERS`](crate::MAX_MODEL_PARAMETERS).
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("emb_dim", self.emb_dim),
            ("item_vocab", self.item_vocab),
            ("cate_vocab", self.cate_vocab),
            ("brand_vocab", self.brand_vocab),
            ("max_seq_len", self.max_seq_len),
            ("bid_type_vocab", self.bid_type_vocab),
            ("buckets", self.buckets),
            ("user_hidden", self.user_hidden),
            ("ad_hidden", self.ad_hidden),
            ("d_model", self.d_model),
            ("d_attn", self.d_attn),
            ("head_hidden", self.head_hidden),
        ];
        for (key, value) in positive {
            // Bounded so that products of dimensions cannot overflow.
            if value == 0 || value > 1 << 24 {
                return Err(config_error(key, format!("{value} is not in 1..=2^24")));
            }
        }
        if self.user_field_vocab.is_empty() || self.user_field_vocab.len() > 256 {
            return Err(config_error(
                "user_field_vocab",
                format!("{} fields; 1..=256 accepted", self.user_field_vocab.len()),
            ));
        }
        if let Some(v) = self
            .user_field_vocab
            .iter()
            .find(|&&v| v == 0 || v > 1 << 24)
        {
            return Err(config_error(
                "user_field_vocab",
                format!("vocabulary size {v} is not in 1..=2^24"),
            ));
        }
        if self.item_vocab < 2 || self.cate_vocab < 2 {
            return Err(config_error(
                "item_vocab",
                "item and category vocabularies need id 0 (padding) and at least one id".into(),
            ));
        }
        for (key, value) in [
            ("bid_constraint_log_max", self.bid_constraint_log_max),
            ("default_bid_log_max", self.default_bid_log_max),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(config_error(
                    key,
                    format!("{value} is not finite and positive"),
                ));
            }
        }
        crate::model_size::check_model_size(&super::model::tensor_shapes(self)?)
            .map_err(|message| config_error("dimensions", message))?;
        Ok(())
    }

    /// The configuration as safetensors metadata entries.
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(format!("{METADATA_PREFIX}{k}"), v);
        };
        put("version", "1".into());
        put("emb_dim", self.emb_dim.to_string());
        put(
            "user_field_vocab",
            self.user_field_vocab
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        put("item_vocab", self.item_vocab.to_string());
        put("cate_vocab", self.cate_vocab.to_string());
        put("brand_vocab", self.brand_vocab.to_string());
        put("max_seq_len", self.max_seq_len.to_string());
        put("bid_features", self.bid_features.to_string());
        put("bid_type_vocab", self.bid_type_vocab.to_string());
        put("buckets", self.buckets.to_string());
        // Display of an f32 round-trips exactly through `parse`.
        put(
            "bid_constraint_log_max",
            self.bid_constraint_log_max.to_string(),
        );
        put("default_bid_log_max", self.default_bid_log_max.to_string());
        put("user_hidden", self.user_hidden.to_string());
        put("ad_hidden", self.ad_hidden.to_string());
        put("d_model", self.d_model.to_string());
        put("d_attn", self.d_attn.to_string());
        put("head_hidden", self.head_hidden.to_string());
        m
    }

    /// Reads and validates a configuration written by [`to_metadata`](Self::to_metadata).
    pub fn from_metadata(m: &HashMap<String, String>) -> Result<Self, ModelError> {
        let get = |k: &str| -> Result<&str, ModelError> {
            m.get(&format!("{METADATA_PREFIX}{k}"))
                .map(String::as_str)
                .ok_or_else(|| config_error(k, "missing from the file's metadata".into()))
        };
        let int = |k: &str| -> Result<usize, ModelError> {
            let s = get(k)?;
            s.trim()
                .parse::<usize>()
                .map_err(|e| config_error(k, format!("`{s}` is not an integer: {e}")))
        };
        let float = |k: &str| -> Result<f32, ModelError> {
            let s = get(k)?;
            s.trim()
                .parse::<f32>()
                .map_err(|e| config_error(k, format!("`{s}` is not a number: {e}")))
        };
        let version = get("version")?;
        if version != "1" {
            return Err(config_error(
                "version",
                format!("format version {version}; this build reads version 1"),
            ));
        }
        let fields = get("user_field_vocab")?;
        let user_field_vocab = fields
            .split(',')
            .map(|s| {
                s.trim().parse::<usize>().map_err(|e| {
                    config_error("user_field_vocab", format!("`{s}` is not an integer: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bid_features = match get("bid_features")? {
            "true" => true,
            "false" => false,
            other => {
                return Err(config_error(
                    "bid_features",
                    format!("`{other}` is not true or false"),
                ))
            }
        };
        let config = Self {
            emb_dim: int("emb_dim")?,
            user_field_vocab,
            item_vocab: int("item_vocab")?,
            cate_vocab: int("cate_vocab")?,
            brand_vocab: int("brand_vocab")?,
            max_seq_len: int("max_seq_len")?,
            bid_features,
            bid_type_vocab: int("bid_type_vocab")?,
            buckets: int("buckets")?,
            bid_constraint_log_max: float("bid_constraint_log_max")?,
            default_bid_log_max: float("default_bid_log_max")?,
            user_hidden: int("user_hidden")?,
            ad_hidden: int("ad_hidden")?,
            d_model: int("d_model")?,
            d_attn: int("d_attn")?,
            head_hidden: int("head_hidden")?,
        };
        config.validate()?;
        Ok(config)
    }
}

fn config_error(key: &str, message: String) -> ModelError {
    ModelError::Config {
        key: format!("{METADATA_PREFIX}{key}"),
        message,
    }
}
