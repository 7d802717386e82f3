//! The TAR model's dimensions and the names and shapes of its tensors: the
//! contract between the trainer (candle, feature `train`) and the CPU
//! inference, written once.

use std::collections::HashMap;

use super::error::TarError;

/// Key prefix of the configuration in a safetensors file's metadata.
const METADATA_PREFIX: &str = "nann.tar.";

/// Features of one augmented step `x_t = [s_t ; a_{t-1}]`: the 16 state
/// features of `models.md` §4.4 and the previous action.
pub const STEP_FEATURES: usize = 17;

/// Index of the previous action `a_{t-1}` inside `x_t`.
pub const ACTION_SLOT: usize = 16;

/// Trajectory attributes the generator is conditioned on, before the
/// "present" flag: see [`TarConfig::attr_dim`].
pub const ATTRIBUTES: usize = 4;

/// Dimensions of a TAR model.
///
/// Defaults: a 48-step day, scales (1, 4, 12, 48) (day / 6 h / 2 h / 30 min,
/// 65 tokens), a 2-block generator of width 64: small enough for a
/// millisecond decision on one core and a weight file under 1 MB.
#[derive(Debug, Clone, PartialEq)]
pub struct TarConfig {
    /// Features per step (`x_t`); [`STEP_FEATURES`].
    pub step_features: usize,
    /// Steps per trajectory, `T` (the finest scale).
    pub steps: usize,
    /// Lengths of the scales, coarse to fine, strictly increasing, the last
    /// equal to `steps`. `[steps]` alone is the "no coarse-to-fine" ablation
    /// (`tar_k1`).
    pub scales: Vec<usize>,
    /// Width of the VQ-VAE encoder and decoder.
    pub vae_dim: usize,
    /// Attention heads in the VQ-VAE blocks.
    pub vae_heads: usize,
    /// Channels of the latent sequence (and of each codebook entry).
    pub code_dim: usize,
    /// Codebook entries `V`.
    pub codebook_size: usize,
    /// `false`: the "no VQ" ablation (`tar_no_vq`): each scale keeps the
    /// interpolated residual itself and the generator regresses it.
    pub quantize: bool,
    /// Width of the generator.
    pub d_model: usize,
    /// Attention heads in the generator.
    pub heads: usize,
    /// Generator blocks.
    pub blocks: usize,
    /// Cross-attention tokens made from the attributes.
    pub attr_tokens: usize,
}

impl Default for TarConfig {
    fn default() -> Self {
        Self {
            step_features: STEP_FEATURES,
            steps: 48,
            scales: vec![1, 4, 12, 48],
            vae_dim: 32,
            vae_heads: 2,
            code_dim: 8,
            codebook_size: 256,
            quantize: true,
            d_model: 64,
            heads: 4,
            blocks: 2,
            attr_tokens: 2,
        }
    }
}

impl TarConfig {
    /// Inputs of the attribute MLPs: the [`ATTRIBUTES`] normalised
    /// attributes and a "present" flag (1 with a condition, all 0 when the
    /// condition is dropped).
    pub fn attr_dim(&self) -> usize {
        ATTRIBUTES + 1
    }

    /// Total tokens over all scales, `L`.
    pub fn tokens(&self) -> usize {
        self.scales.iter().sum()
    }

    /// Index of the first token of each scale (and `L` last).
    pub fn scale_offsets(&self) -> Vec<usize> {
        let mut offsets = Vec::with_capacity(self.scales.len() + 1);
        let mut at = 0;
        offsets.push(0);
        for &l in &self.scales {
            at += l;
            offsets.push(at);
        }
        offsets
    }

    /// Outputs of the generator's head per token: codebook logits, or the
    /// regressed latent for the no-VQ ablation.
    pub fn head_outputs(&self) -> usize {
        if self.quantize {
            self.codebook_size
        } else {
            self.code_dim
        }
    }

    /// Checks that the dimensions make a model of at most
    /// [`MAX_MODEL_PARAMETERS`](crate::MAX_MODEL_PARAMETERS) weights.
    pub fn validate(&self) -> Result<(), TarError> {
        let bad = |field: &'static str, message: String| Err(TarError::Config { field, message });
        if self.step_features != STEP_FEATURES {
            return bad(
                "step_features",
                format!("{} (this build reads {STEP_FEATURES})", self.step_features),
            );
        }
        if self.steps == 0 || self.steps > 4096 {
            return bad("steps", format!("{} is not in 1..=4096", self.steps));
        }
        if self.scales.is_empty()
            || self.scales.windows(2).any(|w| w[0] >= w[1])
            || self.scales[0] == 0
            || self.scales.last() != Some(&self.steps)
        {
            return bad(
                "scales",
                format!(
                    "{:?} must be strictly increasing, positive, and end at steps = {}",
                    self.scales, self.steps
                ),
            );
        }
        for (field, dim, heads) in [
            ("vae_dim", self.vae_dim, self.vae_heads),
            ("d_model", self.d_model, self.heads),
        ] {
            if dim == 0 || heads == 0 || dim % heads != 0 || dim > 4096 {
                return bad(
                    field,
                    format!("{dim} must be positive, at most 4096 and divisible by {heads} heads"),
                );
            }
        }
        if self.code_dim == 0 || self.code_dim > 1024 {
            return bad("code_dim", format!("{} is not in 1..=1024", self.code_dim));
        }
        if self.quantize && (self.codebook_size == 0 || self.codebook_size > 65_536) {
            return bad(
                "codebook_size",
                format!("{} is not in 1..=65536", self.codebook_size),
            );
        }
        if self.blocks == 0 || self.blocks > 64 {
            return bad("blocks", format!("{} is not in 1..=64", self.blocks));
        }
        if self.attr_tokens == 0 || self.attr_tokens > 64 {
            return bad(
                "attr_tokens",
                format!("{} is not in 1..=64", self.attr_tokens),
            );
        }
        if let Err(message) = crate::model_size::check_model_size(&self.tensor_shapes()) {
            return bad("d_model", message);
        }
        Ok(())
    }

    /// Every tensor of the model with its shape, in file order. Linear
    /// layers are stored `[out, in]` with a separate bias (PyTorch's and
    /// candle's layout). Names:
    ///
    /// ```text
    /// norm.x_mean, norm.x_std        [F]       step feature normalisation
    /// norm.attr_mean, norm.attr_std  [3]       attribute normalisation
    /// enc.in, dec.out, ...                     VQ-VAE (see the module docs)
    /// quant.codebook                 [V, C]    only when quantize
    /// quant.phi.{q,k,v,o}            [C, C]    the shared refinement
    /// gen.*                                    the scale-level transformer
    /// ```
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let f = self.step_features;
        let e = self.vae_dim;
        let c = self.code_dim;
        let d = self.d_model;
        let a = self.attr_dim();
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let linear = |out: &mut Vec<(String, Vec<usize>)>, name: &str, o: usize, i: usize| {
            out.push((format!("{name}.weight"), vec![o, i]));
            out.push((format!("{name}.bias"), vec![o]));
        };
        out.push(("norm.x_mean".into(), vec![f]));
        out.push(("norm.x_std".into(), vec![f]));
        out.push(("norm.attr_mean".into(), vec![ATTRIBUTES]));
        out.push(("norm.attr_std".into(), vec![ATTRIBUTES]));
        // VQ-VAE: encoder and decoder are one pre-LN transformer block each.
        for (side, first_in, last_out) in [("enc", f, c), ("dec", c, f)] {
            linear(&mut out, &format!("{side}.in"), e, first_in);
            out.push((format!("{side}.pos"), vec![self.steps, e]));
            for ln in ["ln1", "ln2"] {
                out.push((format!("{side}.block.{ln}.weight"), vec![e]));
                out.push((format!("{side}.block.{ln}.bias"), vec![e]));
            }
            for p in ["q", "k", "v", "o"] {
                linear(&mut out, &format!("{side}.block.attn.{p}"), e, e);
            }
            linear(&mut out, &format!("{side}.block.mlp.fc1"), 4 * e, e);
            linear(&mut out, &format!("{side}.block.mlp.fc2"), e, 4 * e);
            out.push((format!("{side}.ln.weight"), vec![e]));
            out.push((format!("{side}.ln.bias"), vec![e]));
            linear(&mut out, &format!("{side}.out"), last_out, e);
        }
        if self.quantize {
            out.push(("quant.codebook".into(), vec![self.codebook_size, c]));
        }
        for p in ["q", "k", "v", "o"] {
            linear(&mut out, &format!("quant.phi.{p}"), c, c);
        }
        // Generator.
        linear(&mut out, "gen.cond.fc1", d, a);
        linear(&mut out, "gen.cond.fc2", d, d);
        linear(&mut out, "gen.attr", self.attr_tokens * d, a);
        linear(&mut out, "gen.hist", d, f);
        out.push(("gen.hist_pos".into(), vec![self.steps, d]));
        out.push(("gen.start".into(), vec![d]));
        linear(&mut out, "gen.word", d, c);
        out.push(("gen.pos".into(), vec![self.tokens(), d]));
        out.push(("gen.level".into(), vec![self.scales.len(), d]));
        for b in 0..self.blocks {
            let p = format!("gen.blocks.{b}");
            linear(&mut out, &format!("{p}.ada"), 6 * d, d);
            for q in ["q", "k", "v", "o"] {
                linear(&mut out, &format!("{p}.attn.{q}"), d, d);
            }
            out.push((format!("{p}.cross_ln.weight"), vec![d]));
            out.push((format!("{p}.cross_ln.bias"), vec![d]));
            for q in ["q", "k", "v", "o"] {
                linear(&mut out, &format!("{p}.cross.{q}"), d, d);
            }
            linear(&mut out, &format!("{p}.mlp.fc1"), 4 * d, d);
            linear(&mut out, &format!("{p}.mlp.fc2"), d, 4 * d);
        }
        linear(&mut out, "gen.head_ada", 2 * d, d);
        linear(&mut out, "gen.head", self.head_outputs(), d);
        out
    }

    /// The configuration as safetensors metadata.
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(format!("{METADATA_PREFIX}{k}"), v);
        };
        put("version", "1".into());
        put("step_features", self.step_features.to_string());
        put("steps", self.steps.to_string());
        put(
            "scales",
            self.scales
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        put("vae_dim", self.vae_dim.to_string());
        put("vae_heads", self.vae_heads.to_string());
        put("code_dim", self.code_dim.to_string());
        put("codebook_size", self.codebook_size.to_string());
        put("quantize", self.quantize.to_string());
        put("d_model", self.d_model.to_string());
        put("heads", self.heads.to_string());
        put("blocks", self.blocks.to_string());
        put("attr_tokens", self.attr_tokens.to_string());
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
        let parse = |k: &'static str, s: &str| -> Result<usize, TarError> {
            s.trim().parse::<usize>().map_err(|e| TarError::Config {
                field: k,
                message: format!("`{s}` is not an integer: {e}"),
            })
        };
        let int = |k: &'static str| -> Result<usize, TarError> { parse(k, get(k)?) };
        let version = get("version")?;
        if version != "1" {
            return Err(TarError::Config {
                field: "version",
                message: format!("format version {version}; this build reads version 1"),
            });
        }
        let scales = get("scales")?
            .split(',')
            .map(|s| parse("scales", s))
            .collect::<Result<Vec<_>, _>>()?;
        let quantize = match get("quantize")? {
            "true" => true,
            "false" => false,
            other => {
                return Err(TarError::Config {
                    field: "quantize",
                    message: format!("`{other}` is not true or false"),
                })
            }
        };
        let config = Self {
            step_features: int("step_features")?,
            steps: int("steps")?,
            scales,
            vae_dim: int("vae_dim")?,
            vae_heads: int("vae_heads")?,
            code_dim: int("code_dim")?,
            codebook_size: int("codebook_size")?,
            quantize,
            d_model: int("d_model")?,
            heads: int("heads")?,
            blocks: int("blocks")?,
            attr_tokens: int("attr_tokens")?,
        };
        config.validate()?;
        Ok(config)
    }
}
