//! The Decision Transformer's dimensions and the names and shapes of its
//! tensors: the contract between the trainer (candle, feature `train`) and
//! the CPU inference, written once.

use std::collections::HashMap;

use crate::tar::model::{TarError, STEP_FEATURES};

/// Key prefix of the configuration in a safetensors file's metadata.
const METADATA_PREFIX: &str = "nann.dt.";

/// State features per step: the 16 of `models.md` §4.4, i.e. the first 16
/// of [`step_features`](crate::tar::data::step_features) (the 17th, the
/// previous action, is the previous step's action token instead).
pub const STATE_FEATURES: usize = STEP_FEATURES - 1;

/// Dimensions of a Decision Transformer.
///
/// Defaults: AuctionNet's DT (`models.md` §5): width 64, 3 blocks, 1 head,
/// a context of the last 10 steps (30 tokens); the MLP is GPT-2's `4 x
/// d_model` (256; AuctionNet's is 512) and the timestep table covers a
/// 288-tick day (AuctionNet's covers 96).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtConfig {
    /// State features per step; [`STATE_FEATURES`].
    pub state_features: usize,
    /// Steps of context `K` (each step is three tokens).
    pub context: usize,
    /// Width of the transformer.
    pub d_model: usize,
    /// Transformer blocks.
    pub blocks: usize,
    /// Attention heads (`d_model` must be a multiple).
    pub heads: usize,
    /// Hidden width of each block's MLP.
    pub mlp: usize,
    /// Rows of the timestep embedding table: ticks `0..max_steps` can be
    /// embedded.
    pub max_steps: usize,
}

impl Default for DtConfig {
    fn default() -> Self {
        Self {
            state_features: STATE_FEATURES,
            context: 10,
            d_model: 64,
            blocks: 3,
            heads: 1,
            mlp: 256,
            max_steps: 288,
        }
    }
}

impl DtConfig {
    /// Tokens of a full context, `3 K`.
    pub fn tokens(&self) -> usize {
        3 * self.context
    }

    /// Checks that the dimensions make a model of at most
    /// [`MAX_MODEL_PARAMETERS`](crate::MAX_MODEL_PARAMETERS) weights (and
    /// stay small enough that no size computation overflows).
    pub fn validate(&self) -> Result<(), TarError> {
        let bad = |field: &'static str, message: String| Err(TarError::Config { field, message });
        if self.state_features != STATE_FEATURES {
            return bad(
                "state_features",
                format!(
                    "{} (this build reads {STATE_FEATURES})",
                    self.state_features
                ),
            );
        }
        if self.context == 0 || self.context > 1024 {
            return bad("context", format!("{} is not in 1..=1024", self.context));
        }
        if self.d_model == 0
            || self.heads == 0
            || !self.d_model.is_multiple_of(self.heads)
            || self.d_model > 4096
        {
            return bad(
                "d_model",
                format!(
                    "{} must be positive, at most 4096 and divisible by {} heads",
                    self.d_model, self.heads
                ),
            );
        }
        if self.blocks == 0 || self.blocks > 64 {
            return bad("blocks", format!("{} is not in 1..=64", self.blocks));
        }
        if self.mlp == 0 || self.mlp > 16_384 {
            return bad("mlp", format!("{} is not in 1..=16384", self.mlp));
        }
        if self.max_steps == 0 || self.max_steps > 100_000 {
            return bad(
                "max_steps",
                format!("{} is not in 1..=100000", self.max_steps),
            );
        }
        if let Err(message) = crate::model_size::check_model_size(&self.tensor_shapes()) {
            return bad("d_model", message);
        }
        Ok(())
    }

    /// Every tensor of the model with its shape, in file order. Linear
    /// layers are stored `[out, in]` with a separate bias (PyTorch's and
    /// candle's layout); `S` state features, `D` width, `M` MLP width:
    ///
    /// ```text
    /// norm.s_mean, norm.s_std              [S]       state normalisation
    /// norm.rtg_scale                       [1]       return-to-go divisor
    /// embed.rtg.{weight,bias}              [D, 1]    return token
    /// embed.state.{weight,bias}            [D, S]    state token
    /// embed.action.{weight,bias}           [D, 1]    action token
    /// embed.time                           [max_steps, D]
    /// embed.ln.{weight,bias}               [D]
    /// blocks.{b}.ln1.{weight,bias}         [D]
    /// blocks.{b}.attn.{q,k,v,o}.{weight,bias}  [D, D]
    /// blocks.{b}.ln2.{weight,bias}         [D]
    /// blocks.{b}.mlp.fc1.{weight,bias}     [M, D]
    /// blocks.{b}.mlp.fc2.{weight,bias}     [D, M]
    /// ln_f.{weight,bias}                   [D]
    /// head.{weight,bias}                   [1, D]
    /// ```
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (s, d, m) = (self.state_features, self.d_model, self.mlp);
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let linear = |out: &mut Vec<(String, Vec<usize>)>, name: &str, o: usize, i: usize| {
            out.push((format!("{name}.weight"), vec![o, i]));
            out.push((format!("{name}.bias"), vec![o]));
        };
        let ln = |out: &mut Vec<(String, Vec<usize>)>, name: &str| {
            out.push((format!("{name}.weight"), vec![d]));
            out.push((format!("{name}.bias"), vec![d]));
        };
        out.push(("norm.s_mean".into(), vec![s]));
        out.push(("norm.s_std".into(), vec![s]));
        out.push(("norm.rtg_scale".into(), vec![1]));
        linear(&mut out, "embed.rtg", d, 1);
        linear(&mut out, "embed.state", d, s);
        linear(&mut out, "embed.action", d, 1);
        out.push(("embed.time".into(), vec![self.max_steps, d]));
        ln(&mut out, "embed.ln");
        for b in 0..self.blocks {
            let p = format!("blocks.{b}");
            ln(&mut out, &format!("{p}.ln1"));
            for q in ["q", "k", "v", "o"] {
                linear(&mut out, &format!("{p}.attn.{q}"), d, d);
            }
            ln(&mut out, &format!("{p}.ln2"));
            linear(&mut out, &format!("{p}.mlp.fc1"), m, d);
            linear(&mut out, &format!("{p}.mlp.fc2"), d, m);
        }
        ln(&mut out, "ln_f");
        linear(&mut out, "head", 1, d);
        out
    }

    /// The configuration as safetensors metadata (keys `nann.dt.*`).
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(format!("{METADATA_PREFIX}{k}"), v);
        };
        put("version", "1".into());
        put("state_features", self.state_features.to_string());
        put("context", self.context.to_string());
        put("d_model", self.d_model.to_string());
        put("blocks", self.blocks.to_string());
        put("heads", self.heads.to_string());
        put("mlp", self.mlp.to_string());
        put("max_steps", self.max_steps.to_string());
        m
    }

    /// Reads and validates a configuration written by
    /// [`to_metadata`](Self::to_metadata).
    pub fn from_metadata(m: &HashMap<String, String>) -> Result<Self, TarError> {
        let get = |k: &'static str| -> Result<&str, TarError> {
            m.get(&format!("{METADATA_PREFIX}{k}"))
                .map(String::as_str)
                .ok_or(TarError::Config {
                    field: k,
                    message: "missing from the file's metadata".into(),
                })
        };
        let int = |k: &'static str| -> Result<usize, TarError> {
            let s = get(k)?;
            s.trim().parse::<usize>().map_err(|e| TarError::Config {
                field: k,
                message: format!("`{s}` is not an integer: {e}"),
            })
        };
        let version = get("version")?;
        if version != "1" {
            return Err(TarError::Config {
                field: "version",
                message: format!("format version {version}; this build reads version 1"),
            });
        }
        let config = Self {
            state_features: int("state_features")?,
            context: int("context")?,
            d_model: int("d_model")?,
            blocks: int("blocks")?,
            heads: int("heads")?,
            mlp: int("mlp")?,
            max_steps: int("max_steps")?,
        };
        config.validate()?;
        Ok(config)
    }
}
