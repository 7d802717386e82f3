//! The generator run scale by scale with a key/value cache: the one path
//! both [`TarModel::generate`](super::TarModel::generate) and
//! [`TarModel::teacher_forced`](super::TarModel::teacher_forced) take.
//!
//! Scale `k`'s tokens are computed once, in one pass over the blocks; their
//! self-attention keys and values are appended to each block's cache, and
//! the queries of scale `k` attend to the cached prefix (scales `0..=k`):
//! exactly the block-causal mask, since no later token exists yet. The
//! cross-attention keys and values of the memory (attribute and history
//! tokens) are computed once per session.

use super::config::TarConfig;
use super::nn::{add_gated, attend, down, gelu_in_place, layer_norm, modulate, silu, AttnScratch};
use super::weights::Weights;

/// One generation (or teacher-forced pass): the conditioning, the caches,
/// the running `fhat`, and the work buffers.
pub(super) struct Session<'m> {
    w: &'m Weights,
    config: &'m TarConfig,
    offsets: Vec<usize>,
    /// Per block: `Linear_ada(silu(c))` = `[g1 g2 s1 s2 b1 b2]` (`6 D`).
    ada: Vec<Vec<f32>>,
    /// `[s b]` of the head (`2 D`).
    head_ada: Vec<f32>,
    /// `c + gen.start`: every token of scale 0.
    c_start: Vec<f32>,
    /// Memory tokens.
    n_mem: usize,
    /// Per block: the memory's cross-attention keys and values, `[M, D]`.
    mem_k: Vec<Vec<f32>>,
    mem_v: Vec<Vec<f32>>,
    /// Per block: self-attention keys and values of every token so far,
    /// `[L, D]`.
    cache_k: Vec<Vec<f32>>,
    cache_v: Vec<Vec<f32>>,
    /// `fhat_{<k}`, `T x C`.
    fhat: Vec<f32>,
    // Work buffers, sized for the longest scale.
    u: Vec<f32>,
    a: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    r: Vec<f32>,
    hidden: Vec<f32>,
    z: Vec<f32>,
    out: Vec<f32>,
    scratch: AttnScratch,
}

impl<'m> Session<'m> {
    /// Conditions on `y` (`attr_dim`) and the `n_hist` normalised steps of
    /// `history`; the caller has checked their lengths and values.
    pub(super) fn new(w: &'m Weights, config: &'m TarConfig, y: &[f32], history: &[f32]) -> Self {
        let d = config.d_model;
        let f = config.step_features;
        let n_hist = history.len() / f;
        let l = config.tokens();
        let max_l = config.scales.iter().copied().max().unwrap_or(0);
        let c = w.cond2.apply(&silu(&w.cond1.apply(y)));
        let silu_c = silu(&c);
        let ada = w.blocks.iter().map(|b| b.ada.apply(&silu_c)).collect();
        let head_ada = w.head_ada.apply(&silu_c);
        let c_start = c.iter().zip(&w.start).map(|(c, s)| c + s).collect();
        // Memory: attribute tokens, then history tokens with their positions.
        let n_mem = config.attr_tokens + n_hist;
        let mut mem = vec![0.0; n_mem * d];
        w.attr.forward(y, 1, &mut mem[..config.attr_tokens * d]);
        let hist = &mut mem[config.attr_tokens * d..];
        w.hist.forward(history, n_hist, hist);
        add_gated(hist, &w.hist_pos[..n_hist * d], None);
        let mut mem_k = Vec::with_capacity(w.blocks.len());
        let mut mem_v = Vec::with_capacity(w.blocks.len());
        for b in &w.blocks {
            let mut k = vec![0.0; n_mem * d];
            let mut v = vec![0.0; n_mem * d];
            b.cross.k.forward(&mem, n_mem, &mut k);
            b.cross.v.forward(&mem, n_mem, &mut v);
            mem_k.push(k);
            mem_v.push(v);
        }
        let blocks = w.blocks.len();
        Self {
            w,
            config,
            offsets: config.scale_offsets(),
            ada,
            head_ada,
            c_start,
            n_mem,
            mem_k,
            mem_v,
            cache_k: vec![vec![0.0; l * d]; blocks],
            cache_v: vec![vec![0.0; l * d]; blocks],
            fhat: vec![0.0; config.steps * config.code_dim],
            u: vec![0.0; max_l * d],
            a: vec![0.0; max_l * d],
            q: vec![0.0; max_l * d],
            att: vec![0.0; max_l * d],
            r: vec![0.0; max_l * d],
            hidden: vec![0.0; max_l * 4 * d],
            z: vec![0.0; max_l * config.code_dim],
            out: vec![0.0; max_l * config.head_outputs()],
            scratch: AttnScratch::default(),
        }
    }

    /// Runs scale `k`'s tokens through the generator (scales `0..k` must
    /// have been run and accumulated): their head outputs, `l_k x
    /// head_outputs`.
    pub(super) fn run_scale(&mut self, k: usize) -> &[f32] {
        let (w, config) = (self.w, self.config);
        let d = config.d_model;
        let (t, c) = (config.steps, config.code_dim);
        let n = config.scales[k];
        let off = self.offsets[k];
        let seen = off + n;
        let u = &mut self.u[..n * d];
        if k == 0 {
            for row in u.chunks_exact_mut(d) {
                row.copy_from_slice(&self.c_start);
            }
        } else {
            down(&self.fhat, t, c, n, &mut self.z);
            w.word.forward(&self.z, n, u);
        }
        add_gated(u, &w.pos[off * d..seen * d], None);
        let level = &w.level[k * d..(k + 1) * d];
        for row in u.chunks_exact_mut(d) {
            add_gated(row, level, None);
        }
        let a = &mut self.a[..n * d];
        let r = &mut self.r[..n * d];
        for (b, blk) in w.blocks.iter().enumerate() {
            let ada = &self.ada[b];
            let chunk = |i: usize| &ada[i * d..(i + 1) * d];
            let (g1, g2, s1, s2, b1, b2) =
                (chunk(0), chunk(1), chunk(2), chunk(3), chunk(4), chunk(5));
            // Block-causal self-attention over the cached prefix.
            modulate(u, n, s1, b1, a);
            blk.attn.q.forward(a, n, &mut self.q);
            blk.attn
                .k
                .forward(a, n, &mut self.cache_k[b][off * d..seen * d]);
            blk.attn
                .v
                .forward(a, n, &mut self.cache_v[b][off * d..seen * d]);
            attend(
                &self.q,
                n,
                &self.cache_k[b][..seen * d],
                &self.cache_v[b][..seen * d],
                seen,
                d,
                config.heads,
                &mut self.att,
                &mut self.scratch,
            );
            blk.attn.o.forward(&self.att, n, r);
            add_gated(u, r, Some(g1));
            // Cross-attention to the memory.
            layer_norm(u, n, d, Some(&blk.cross_ln), a);
            blk.cross.q.forward(a, n, &mut self.q);
            attend(
                &self.q,
                n,
                &self.mem_k[b],
                &self.mem_v[b],
                self.n_mem,
                d,
                config.heads,
                &mut self.att,
                &mut self.scratch,
            );
            blk.cross.o.forward(&self.att, n, r);
            add_gated(u, r, None);
            // Gated MLP.
            modulate(u, n, s2, b2, a);
            let hidden = &mut self.hidden[..n * blk.fc1.out()];
            blk.fc1.forward(a, n, hidden);
            gelu_in_place(hidden);
            blk.fc2.forward(hidden, n, r);
            add_gated(u, r, Some(g2));
        }
        modulate(u, n, &self.head_ada[..d], &self.head_ada[d..2 * d], a);
        let out = &mut self.out[..n * w.head.out()];
        w.head.forward(a, n, out);
        out
    }

    /// `fhat += phi(up(h_k, T))` with scale `k`'s `h_k` (`l_k x C`).
    pub(super) fn accumulate(&mut self, k: usize, h_k: &[f32]) {
        let r = self.w.refine(self.config, h_k, self.config.scales[k]);
        add_gated(&mut self.fhat, &r, None);
    }

    /// The accumulated `fhat` (`T x C`).
    pub(super) fn into_fhat(self) -> Vec<f32> {
        self.fhat
    }
}
