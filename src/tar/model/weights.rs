//! The TAR model's weights arranged for inference (transposed linear
//! layers, grouped by block), the deterministic random initialisation, and
//! the checks every loaded tensor goes through.

use super::config::TarConfig;
use super::error::TarError;
use super::nn::{add_gated, gelu_in_place, layer_norm, up, AttnBuffers, AttnWeights, Linear, Norm};
use crate::tar::data::SplitMix;

/// The tensors of [`TarConfig::tensor_shapes`], in that order and layout.
pub(super) type Raw = Vec<Vec<f32>>;

/// Looks tensors up by name among the raw ones.
struct Lookup<'a> {
    specs: &'a [(String, Vec<usize>)],
    raw: &'a Raw,
}

impl<'a> Lookup<'a> {
    fn get(&self, name: &str) -> Result<&'a [f32], TarError> {
        self.specs
            .iter()
            .position(|(n, _)| n == name)
            .and_then(|i| self.raw.get(i))
            .map(Vec::as_slice)
            .ok_or_else(|| TarError::MissingTensor { name: name.into() })
    }

    fn linear(&self, name: &str) -> Result<Linear, TarError> {
        Ok(Linear::new(
            self.get(&format!("{name}.weight"))?,
            self.get(&format!("{name}.bias"))?,
        ))
    }

    fn norm(&self, name: &str) -> Result<Norm, TarError> {
        Ok(Norm {
            w: self.get(&format!("{name}.weight"))?.to_vec(),
            b: self.get(&format!("{name}.bias"))?.to_vec(),
        })
    }

    fn attn(&self, name: &str) -> Result<AttnWeights, TarError> {
        Ok(AttnWeights {
            q: self.linear(&format!("{name}.q"))?,
            k: self.linear(&format!("{name}.k"))?,
            v: self.linear(&format!("{name}.v"))?,
            o: self.linear(&format!("{name}.o"))?,
        })
    }
}

/// The encoder or the decoder of the VQ-VAE: input projection, positions,
/// one plain pre-LN block, final LayerNorm and output projection.
#[derive(Clone)]
pub(super) struct Coder {
    inp: Linear,
    /// `[T, E]`.
    pos: Vec<f32>,
    ln1: Norm,
    attn: AttnWeights,
    ln2: Norm,
    fc1: Linear,
    fc2: Linear,
    ln: Norm,
    out: Linear,
}

impl Coder {
    fn new(l: &Lookup<'_>, side: &str) -> Result<Self, TarError> {
        Ok(Self {
            inp: l.linear(&format!("{side}.in"))?,
            pos: l.get(&format!("{side}.pos"))?.to_vec(),
            ln1: l.norm(&format!("{side}.block.ln1"))?,
            attn: l.attn(&format!("{side}.block.attn"))?,
            ln2: l.norm(&format!("{side}.block.ln2"))?,
            fc1: l.linear(&format!("{side}.block.mlp.fc1"))?,
            fc2: l.linear(&format!("{side}.block.mlp.fc2"))?,
            ln: l.norm(&format!("{side}.ln"))?,
            out: l.linear(&format!("{side}.out"))?,
        })
    }

    /// `x` (`t x in`) to `t x out`: `u = in(x) + pos`; the plain block;
    /// `out(LN(u))`.
    pub(super) fn forward(&self, x: &[f32], t: usize, heads: usize) -> Vec<f32> {
        let e = self.inp.out();
        let mut u = vec![0.0; t * e];
        self.inp.forward(x, t, &mut u);
        add_gated(&mut u, &self.pos[..t * e], None);
        let mut a = vec![0.0; t * e];
        let mut r = vec![0.0; t * e];
        let mut buf = AttnBuffers::default();
        layer_norm(&u, t, e, Some(&self.ln1), &mut a);
        self.attn.self_attention(&a, t, heads, &mut r, &mut buf);
        add_gated(&mut u, &r, None);
        layer_norm(&u, t, e, Some(&self.ln2), &mut a);
        let mut hidden = vec![0.0; t * self.fc1.out()];
        self.fc1.forward(&a, t, &mut hidden);
        gelu_in_place(&mut hidden);
        self.fc2.forward(&hidden, t, &mut r);
        add_gated(&mut u, &r, None);
        layer_norm(&u, t, e, Some(&self.ln), &mut a);
        let mut out = vec![0.0; t * self.out.out()];
        self.out.forward(&a, t, &mut out);
        out
    }
}

/// One generator block.
#[derive(Clone)]
pub(super) struct GenBlock {
    /// `silu(c) -> [g1 g2 s1 s2 b1 b2]`.
    pub(super) ada: Linear,
    pub(super) attn: AttnWeights,
    pub(super) cross_ln: Norm,
    pub(super) cross: AttnWeights,
    pub(super) fc1: Linear,
    pub(super) fc2: Linear,
}

/// Every weight, arranged for inference.
#[derive(Clone)]
pub(super) struct Weights {
    pub(super) x_mean: Vec<f32>,
    pub(super) x_std: Vec<f32>,
    pub(super) attr_mean: Vec<f32>,
    pub(super) attr_std: Vec<f32>,
    pub(super) enc: Coder,
    pub(super) dec: Coder,
    /// `[V, C]`; empty without quantisation.
    pub(super) codebook: Vec<f32>,
    pub(super) phi: AttnWeights,
    pub(super) cond1: Linear,
    pub(super) cond2: Linear,
    pub(super) attr: Linear,
    pub(super) hist: Linear,
    /// `[T, D]`.
    pub(super) hist_pos: Vec<f32>,
    /// `[D]`.
    pub(super) start: Vec<f32>,
    pub(super) word: Linear,
    /// `[L, D]`.
    pub(super) pos: Vec<f32>,
    /// `[K, D]`.
    pub(super) level: Vec<f32>,
    pub(super) blocks: Vec<GenBlock>,
    pub(super) head_ada: Linear,
    pub(super) head: Linear,
}

impl Weights {
    /// Arranges `raw` (in `specs` order, shapes already checked): checks
    /// finiteness and the normalisation scales.
    pub(super) fn new(
        config: &TarConfig,
        specs: &[(String, Vec<usize>)],
        raw: &Raw,
    ) -> Result<Self, TarError> {
        if specs.len() != raw.len() {
            return Err(TarError::Format("internal: tensor count".into()));
        }
        for ((name, shape), data) in specs.iter().zip(raw) {
            if data.len() != shape.iter().product::<usize>() {
                return Err(TarError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: vec![data.len()],
                });
            }
            if let Some(position) = data.iter().position(|v| !v.is_finite()) {
                return Err(TarError::NonFinite {
                    name: name.clone(),
                    position,
                });
            }
        }
        let l = Lookup { specs, raw };
        for (field, name) in [
            ("norm.x_std", "norm.x_std"),
            ("norm.attr_std", "norm.attr_std"),
        ] {
            if let Some((i, v)) = l.get(name)?.iter().enumerate().find(|(_, &v)| v <= 0.0) {
                return Err(TarError::Config {
                    field,
                    message: format!("element {i} is {v}; a scale must be positive"),
                });
            }
        }
        let blocks = (0..config.blocks)
            .map(|b| {
                let p = format!("gen.blocks.{b}");
                Ok(GenBlock {
                    ada: l.linear(&format!("{p}.ada"))?,
                    attn: l.attn(&format!("{p}.attn"))?,
                    cross_ln: l.norm(&format!("{p}.cross_ln"))?,
                    cross: l.attn(&format!("{p}.cross"))?,
                    fc1: l.linear(&format!("{p}.mlp.fc1"))?,
                    fc2: l.linear(&format!("{p}.mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>, TarError>>()?;
        Ok(Self {
            x_mean: l.get("norm.x_mean")?.to_vec(),
            x_std: l.get("norm.x_std")?.to_vec(),
            attr_mean: l.get("norm.attr_mean")?.to_vec(),
            attr_std: l.get("norm.attr_std")?.to_vec(),
            enc: Coder::new(&l, "enc")?,
            dec: Coder::new(&l, "dec")?,
            codebook: if config.quantize {
                l.get("quant.codebook")?.to_vec()
            } else {
                Vec::new()
            },
            phi: l.attn("quant.phi")?,
            cond1: l.linear("gen.cond.fc1")?,
            cond2: l.linear("gen.cond.fc2")?,
            attr: l.linear("gen.attr")?,
            hist: l.linear("gen.hist")?,
            hist_pos: l.get("gen.hist_pos")?.to_vec(),
            start: l.get("gen.start")?.to_vec(),
            word: l.linear("gen.word")?,
            pos: l.get("gen.pos")?.to_vec(),
            level: l.get("gen.level")?.to_vec(),
            blocks,
            head_ada: l.linear("gen.head_ada")?,
            head: l.linear("gen.head")?,
        })
    }

    /// `phi(up(h_k, T))` for the `n` rows of `h_k` (`n x C`): `T x C`.
    pub(super) fn refine(&self, config: &TarConfig, h_k: &[f32], n: usize) -> Vec<f32> {
        let (t, c) = (config.steps, config.code_dim);
        let mut u = vec![0.0; t * c];
        up(h_k, n, c, t, &mut u);
        let mut r = vec![0.0; t * c];
        self.phi
            .self_attention(&u, t, 1, &mut r, &mut AttnBuffers::default());
        for (r, &u) in r.iter_mut().zip(&u) {
            *r = 0.5 * u + 0.5 * *r;
        }
        r
    }
}

/// The name of a LayerNorm's parameter (`*.ln.*`, `*.ln1.*`, `*.ln2.*`,
/// `*.cross_ln.*`).
fn is_layer_norm(name: &str) -> bool {
    matches!(
        name.rsplit('.').nth(1),
        Some("ln" | "ln1" | "ln2" | "cross_ln")
    )
}

/// Deterministic random tensors for `specs` (see [`super::TarModel::random`]).
pub(super) fn random_tensors(specs: &[(String, Vec<usize>)], seed: u64) -> Raw {
    let mut rng = SplitMix::new(seed ^ 0x7a12_7a12_0000_0003);
    let mut fan_in = 1usize;
    let mut out = Vec::with_capacity(specs.len());
    for (name, shape) in specs {
        let len: usize = shape.iter().product();
        let data: Vec<f32> = match name.as_str() {
            "norm.x_mean" | "norm.attr_mean" => vec![0.0; len],
            "norm.x_std" | "norm.attr_std" => vec![1.0; len],
            "quant.codebook" => (0..len).map(|_| rng.normal() as f32).collect(),
            n if is_layer_norm(n) => {
                let base = if n.ends_with(".weight") { 1.0 } else { 0.0 };
                (0..len)
                    .map(|_| (base + 0.05 * rng.normal()) as f32)
                    .collect()
            }
            n if n.ends_with(".weight") && shape.len() == 2 => {
                fan_in = shape[1].max(1);
                uniform(&mut rng, len, 1.0 / (fan_in as f64).sqrt())
            }
            n if n.ends_with(".bias") => uniform(&mut rng, len, 1.0 / (fan_in as f64).sqrt()),
            // Position tables and the start token.
            _ => (0..len).map(|_| (0.05 * rng.normal()) as f32).collect(),
        };
        out.push(data);
    }
    out
}

/// `len` values uniform in `[-bound, bound)`.
fn uniform(rng: &mut SplitMix, len: usize, bound: f64) -> Vec<f32> {
    (0..len)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
        .collect()
}
