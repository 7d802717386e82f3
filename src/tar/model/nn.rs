//! The layers of the TAR model on a CPU: linear maps on the crate's GEMM
//! kernels, LayerNorm, multi-head attention, the activations, and the
//! resampling between scales (`down`, `up`). Everything here works on
//! row-major `f32` matrices whose dimensions the caller has already checked
//! (see [`super::TarModel`]); the slices passed in are always large enough.

use crate::linalg::{self, gemm_acc, sigmoid, softmax_rows};

/// LayerNorm epsilon (PyTorch's and candle's default).
pub(super) const LN_EPS: f32 = 1e-5;

/// A linear layer `y = x W^T + b`: the file's `[out, in]` weight kept as
/// its transpose `[in, out]` for [`linalg::linear`].
#[derive(Clone)]
pub(super) struct Linear {
    /// `[in, out]`.
    wt: Vec<f32>,
    /// `[out]`.
    b: Vec<f32>,
    inp: usize,
    out: usize,
}

impl Linear {
    /// From the file layout: `w` is `[out, in]`, `b` is `[out]`.
    pub(super) fn new(w: &[f32], b: &[f32]) -> Self {
        let out = b.len();
        let inp = w.len().checked_div(out).unwrap_or(0);
        Self {
            wt: linalg::transpose(w, out, inp),
            b: b.to_vec(),
            inp,
            out,
        }
    }

    /// Output width.
    pub(super) fn out(&self) -> usize {
        self.out
    }

    /// `out[..n * out] = x[..n * in] W^T + b`.
    pub(super) fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        linalg::linear(
            &x[..n * self.inp],
            n,
            &self.wt,
            &self.b,
            &mut out[..n * self.out],
        );
    }

    /// One row: `x W^T + b` as a new vector.
    pub(super) fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; self.out];
        self.forward(x, 1, &mut out);
        out
    }
}

/// LayerNorm's affine parameters.
#[derive(Clone)]
pub(super) struct Norm {
    pub(super) w: Vec<f32>,
    pub(super) b: Vec<f32>,
}

/// `out = LN(x)` row by row over `n` rows of width `d` (biased variance,
/// eps [`LN_EPS`]), with the affine `w`, `b` when given.
pub(super) fn layer_norm(x: &[f32], n: usize, d: usize, affine: Option<&Norm>, out: &mut [f32]) {
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).take(n) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + LN_EPS).sqrt();
        match affine {
            Some(p) => {
                for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(&p.w).zip(&p.b) {
                    *o = (v - mean) * inv * w + b;
                }
            }
            None => {
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - mean) * inv;
                }
            }
        }
    }
}

/// AdaLN modulation: `out = LN0(x) (1 + s) + b` over `n` rows of width
/// `d = s.len()`.
pub(super) fn modulate(x: &[f32], n: usize, s: &[f32], b: &[f32], out: &mut [f32]) {
    let d = s.len();
    layer_norm(x, n, d, None, out);
    for o in out.chunks_exact_mut(d).take(n) {
        for ((o, &s), &b) in o.iter_mut().zip(s).zip(b) {
            *o = *o * (1.0 + s) + b;
        }
    }
}

/// `gelu`, tanh approximation, in place.
pub(super) fn gelu_in_place(x: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    for v in x {
        let u = *v;
        *v = 0.5 * u * (1.0 + (C * (u + 0.044_715 * u * u * u)).tanh());
    }
}

/// `silu(x) = x sigmoid(x)`.
pub(super) fn silu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| v * sigmoid(v)).collect()
}

/// `u[i] += g[i mod d] * r[i]` over rows of width `d = g.len()` (a gated
/// residual); `g = None` adds `r` as is.
pub(super) fn add_gated(u: &mut [f32], r: &[f32], g: Option<&[f32]>) {
    match g {
        Some(g) => {
            for (u, r) in u.chunks_exact_mut(g.len()).zip(r.chunks_exact(g.len())) {
                for ((u, &r), &g) in u.iter_mut().zip(r).zip(g) {
                    *u += g * r;
                }
            }
        }
        None => {
            for (u, &r) in u.iter_mut().zip(r) {
                *u += r;
            }
        }
    }
}

/// The projections of one attention layer.
#[derive(Clone)]
pub(super) struct AttnWeights {
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) o: Linear,
}

/// Reusable buffers of [`attend`].
#[derive(Default)]
pub(super) struct AttnScratch {
    /// One head's keys, transposed and scaled: `[h, nk]`.
    kt: Vec<f32>,
    /// One head's values: `[nk, h]`.
    vh: Vec<f32>,
    /// Scores / weights: `[nq, nk]`.
    p: Vec<f32>,
}

/// Multi-head attention without the projections: `out[nq, width]` is, for
/// each head (a consecutive column block of width `h = width / heads`),
/// `softmax(q_h k_h^T / sqrt(h)) v_h`. `q` is `[nq, width]`, `k` and `v`
/// are `[nk, width]`; every query sees every key (the caller passes only
/// the keys a query may see).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    q: &[f32],
    nq: usize,
    k: &[f32],
    v: &[f32],
    nk: usize,
    width: usize,
    heads: usize,
    out: &mut [f32],
    s: &mut AttnScratch,
) {
    let out = &mut out[..nq * width];
    out.fill(0.0);
    if nq == 0 || nk == 0 || heads == 0 {
        return;
    }
    let h = width / heads;
    let scale = 1.0 / (h as f32).sqrt();
    s.kt.resize(h * nk, 0.0);
    s.vh.resize(nk * h, 0.0);
    s.p.resize(nq * nk, 0.0);
    for head in 0..heads {
        let col = head * h;
        for (j, (krow, vrow)) in k
            .chunks_exact(width)
            .zip(v.chunks_exact(width))
            .take(nk)
            .enumerate()
        {
            for c in 0..h {
                s.kt[c * nk + j] = krow[col + c] * scale;
            }
            s.vh[j * h..(j + 1) * h].copy_from_slice(&vrow[col..col + h]);
        }
        s.p.fill(0.0);
        gemm_acc(&q[col..], width, nq, h, &s.kt, nk, &mut s.p, nk);
        softmax_rows(&mut s.p, nk, nq, nk);
        gemm_acc(&s.p, nk, nq, nk, &s.vh, h, &mut out[col..], width);
    }
}

/// Buffers of a full attention layer (projections and [`attend`]).
#[derive(Default)]
pub(super) struct AttnBuffers {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    a: Vec<f32>,
    pub(super) scratch: AttnScratch,
}

impl AttnWeights {
    /// `out = Attn(x, x)` over `n` rows, no mask (the VQ-VAE blocks and
    /// `phi`); `out` is `[n, width]`.
    pub(super) fn self_attention(
        &self,
        x: &[f32],
        n: usize,
        heads: usize,
        out: &mut [f32],
        buf: &mut AttnBuffers,
    ) {
        let w = self.q.out();
        for b in [&mut buf.q, &mut buf.k, &mut buf.v, &mut buf.a] {
            b.resize(n * w, 0.0);
        }
        self.q.forward(x, n, &mut buf.q);
        self.k.forward(x, n, &mut buf.k);
        self.v.forward(x, n, &mut buf.v);
        attend(
            &buf.q,
            n,
            &buf.k,
            &buf.v,
            n,
            w,
            heads,
            &mut buf.a,
            &mut buf.scratch,
        );
        self.o.forward(&buf.a, n, out);
    }
}

/// `down(u, n)`: adaptive average pooling of the `t` rows (width `c`) of
/// `u` to `n` rows: bin `i` is the mean of rows `floor(i t / n) ..
/// ceil((i + 1) t / n)`. `out` is `[n, c]`.
pub(super) fn down(u: &[f32], t: usize, c: usize, n: usize, out: &mut [f32]) {
    for (i, o) in out.chunks_exact_mut(c).take(n).enumerate() {
        let start = i * t / n;
        let end = ((i + 1) * t).div_ceil(n);
        o.fill(0.0);
        for row in u[start * c..end * c].chunks_exact(c) {
            for (o, &v) in o.iter_mut().zip(row) {
                *o += v;
            }
        }
        let inv = 1.0 / (end - start) as f32;
        for o in o.iter_mut() {
            *o *= inv;
        }
    }
}

/// `up(u, t)`: linear interpolation (align_corners false) of the `n` rows
/// (width `c`) of `u` to `t` rows: row `i` is `(1 - w) u[i0] + w u[i1]`
/// with `src = max((i + 0.5) n / t - 0.5, 0)`, `i0 = floor(src)`,
/// `i1 = min(i0 + 1, n - 1)`, `w = src - i0`. `out` is `[t, c]`.
pub(super) fn up(u: &[f32], n: usize, c: usize, t: usize, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    for (i, o) in out.chunks_exact_mut(c).take(t).enumerate() {
        let src = ((i as f64 + 0.5) * n as f64 / t as f64 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n - 1);
        let i1 = (i0 + 1).min(n - 1);
        let w = (src - i0 as f64) as f32;
        let (a, b) = (&u[i0 * c..(i0 + 1) * c], &u[i1 * c..(i1 + 1) * c]);
        if w == 0.0 {
            o.copy_from_slice(a);
        } else {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = (1.0 - w) * a + w * b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn down_is_adaptive_average_pooling() {
        // T = 4 -> 2: pairs.
        let u = [1.0, 10.0, 3.0, 30.0, 5.0, 50.0, 7.0, 70.0]; // 4 x 2
        let mut out = [0.0; 4];
        down(&u, 4, 2, 2, &mut out);
        assert!(close(&out, &[2.0, 20.0, 6.0, 60.0]));
        // n = 1: the mean of everything.
        let mut out = [0.0; 2];
        down(&u, 4, 2, 1, &mut out);
        assert!(close(&out, &[4.0, 40.0]));
        // n = T: the identity.
        let mut out = [0.0; 8];
        down(&u, 4, 2, 4, &mut out);
        assert_eq!(out, u);
        // T = 5, n = 2: bins [0, 3) and [2, 5) overlap at row 2.
        let u = [1.0, 2.0, 4.0, 8.0, 16.0];
        let mut out = [0.0; 2];
        down(&u, 5, 1, 2, &mut out);
        assert!(close(&out, &[7.0 / 3.0, 28.0 / 3.0]));
        // T = 5, n = 3: [0, 2), [1, 4), [3, 5).
        let mut out = [0.0; 3];
        down(&u, 5, 1, 3, &mut out);
        assert!(close(&out, &[1.5, 14.0 / 3.0, 12.0]));
    }

    #[test]
    fn up_is_linear_interpolation_without_aligned_corners() {
        // 2 -> 4: src = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (i1 clamped).
        let u = [0.0, 100.0, 4.0, 200.0]; // 2 x 2
        let mut out = [0.0; 8];
        up(&u, 2, 2, 4, &mut out);
        assert!(close(
            &out,
            &[0.0, 100.0, 1.0, 125.0, 3.0, 175.0, 4.0, 200.0]
        ));
        // n = 1 broadcasts.
        let mut out = [0.0; 6];
        up(&[3.0, -1.0], 1, 2, 3, &mut out);
        assert_eq!(out, [3.0, -1.0, 3.0, -1.0, 3.0, -1.0]);
        // n = T is the identity, bit for bit.
        let u: Vec<f32> = (0..48).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut out = vec![0.0; 48];
        up(&u, 48, 1, 48, &mut out);
        assert_eq!(out, u);
        // 2 -> 5: src = max((i + 0.5) 0.4 - 0.5, 0) = 0, 0.1, 0.5, 0.9, 1.3.
        let mut out = [0.0; 5];
        up(&[0.0, 10.0], 2, 1, 5, &mut out);
        assert!(close(&out, &[0.0, 1.0, 5.0, 9.0, 10.0]));
        // 4 -> 2 -> 4 on a linear ramp recovers the interior exactly.
        let ramp = [0.0, 1.0, 2.0, 3.0];
        let mut half = [0.0; 2];
        down(&ramp, 4, 1, 2, &mut half);
        assert!(close(&half, &[0.5, 2.5]));
        let mut back = [0.0; 4];
        up(&half, 2, 1, 4, &mut back);
        assert!(close(&back, &[0.5, 1.0, 2.0, 2.5]));
    }

    #[test]
    fn attention_matches_a_naive_loop() {
        let (nq, nk, width, heads) = (3, 5, 8, 2);
        let val = |i: usize, s: f32| ((i as f32 + 1.0) * s).sin();
        let q: Vec<f32> = (0..nq * width).map(|i| val(i, 0.7)).collect();
        let k: Vec<f32> = (0..nk * width).map(|i| val(i, 1.3)).collect();
        let v: Vec<f32> = (0..nk * width).map(|i| val(i, 0.4)).collect();
        let mut out = vec![7.0; nq * width];
        attend(
            &q,
            nq,
            &k,
            &v,
            nk,
            width,
            heads,
            &mut out,
            &mut AttnScratch::default(),
        );
        let h = width / heads;
        for i in 0..nq {
            for hd in 0..heads {
                let s: Vec<f64> = (0..nk)
                    .map(|j| {
                        (0..h)
                            .map(|c| {
                                q[i * width + hd * h + c] as f64 * k[j * width + hd * h + c] as f64
                            })
                            .sum::<f64>()
                            / (h as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..h {
                    let e: f64 = (0..nk)
                        .map(|j| (s[j] - m).exp() / z * v[j * width + hd * h + c] as f64)
                        .sum();
                    assert!((out[i * width + hd * h + c] as f64 - e).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn layer_norm_gelu_and_modulate() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        layer_norm(&x, 1, 4, None, &mut out);
        let inv = 1.0 / (1.25f32 + LN_EPS).sqrt();
        assert!(close(&out, &[-1.5 * inv, -0.5 * inv, 0.5 * inv, 1.5 * inv]));
        let mut m = [0.0; 4];
        modulate(&x, 1, &[1.0, 0.0, 0.0, -1.0], &[0.0, 1.0, 0.0, 0.0], &mut m);
        assert!(close(&m, &[-3.0 * inv, -0.5 * inv + 1.0, 0.5 * inv, 0.0]));
        let mut g = [0.0, 1.0, -3.0];
        gelu_in_place(&mut g);
        assert!(close(&g, &[0.0, 0.841_192, -0.003_637_4]));
        assert!((silu(&[1.0])[0] - 0.731_058_6).abs() < 1e-6);
    }
}
