//! Small dense f32 kernels for the BAR model on a CPU: a matrix product with
//! register blocking, row-wise softmax with a vectorisable `exp`, and the
//! element-wise pieces around them.
//!
//! Layout: every matrix is row-major. A layer's weight is passed
//! *transposed*, `wt: [in, out]`, so the inner loop of the product runs over
//! contiguous output columns (`out[i, j..j+NR] += x[i, k] * wt[k, j..j+NR]`):
//! it vectorises without horizontal sums and keeps an `MR x NR` tile of
//! outputs in registers for the whole `k` loop (the classic GEMM
//! micro-kernel). The model keeps its weights as `[out, in]` (the file
//! layout) and a transposed copy for these kernels.
//!
//! The hot kernels are written once, generic over [`Arith`] and the tile
//! size, and instantiated twice on x86-64: plain (`a * b + c`, any CPU) and
//! inside a `#[target_feature(enable = "avx2,fma")]` (or `avx512f`) function
//! where `mul_add` becomes one FMA instruction and the tiles use 256-bit
//! (512-bit) registers. Which one runs is decided once per process
//! ([`Isa::get`]); the only `unsafe` is that call, after detection.
//!
//! Masking: the model never scores padded sequence positions at all (it
//! drops them when it builds the user state), which is exactly a masked
//! softmax with the masked terms removed, so only an unmasked
//! [`softmax_rows`] is needed here. Rows of length zero are left alone (the
//! caller treats "every position masked" as the zero vector).

// With only `tar` enabled the TAR model uses a subset of these kernels.
#![cfg_attr(not(feature = "bar"), allow(dead_code))]

use std::sync::OnceLock;

/// How `a * b + c` is evaluated in the generic kernels.
pub(crate) trait Arith {
    /// `a * b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// Multiply then add: any CPU.
pub(crate) struct Plain;

impl Arith for Plain {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// One fused multiply-add. Only ever instantiated inside a function compiled
/// with the `fma` target feature (elsewhere `f32::mul_add` is a library call).
#[cfg(target_arch = "x86_64")]
pub(crate) struct Fused;

#[cfg(target_arch = "x86_64")]
impl Arith for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// The instruction set the kernels run with, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Baseline code (SSE2 on x86-64, NEON on aarch64 by default).
    Portable,
    /// AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F (with AVX2 and FMA).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The best level this CPU supports (cached).
    pub(crate) fn get() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(Self::detect)
    }

    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Portable
    }
}

/// `out[i*ldo + j] += sum_k x[i*ldx + k] * wt[k*m + j]` for `i < n`,
/// `j < m`: `out += X Wt` on row-strided views (`ldx`, `ldo` let the caller
/// read and write column blocks of wider matrices).
///
/// # Panics
/// If a slice is too short for the stated dimensions: an internal invariant
/// (the model checks every caller input before it reaches a kernel).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_acc(
    x: &[f32],
    ldx: usize,
    n: usize,
    k: usize,
    wt: &[f32],
    m: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if n == 0 || m == 0 || k == 0 {
        return;
    }
    assert!(ldx >= k && ldo >= m, "gemm strides");
    assert!(x.len() >= (n - 1) * ldx + k, "gemm x");
    assert!(wt.len() >= k * m, "gemm wt");
    assert!(out.len() >= (n - 1) * ldo + m, "gemm out");
    match Isa::get() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::get` returned Avx512 only after
        // `is_x86_feature_detected!` confirmed avx512f, avx2 and fma.
        Isa::Avx512 => unsafe { gemm_avx512(x, ldx, n, k, wt, m, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::get` returned Avx2 only after
        // `is_x86_feature_detected!` confirmed avx2 and fma.
        Isa::Avx2 => unsafe { gemm_avx2(x, ldx, n, k, wt, m, out, ldo) },
        Isa::Portable => gemm_generic::<Plain, 4, 16>(x, ldx, n, k, wt, m, out, ldo),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn gemm_avx2(
    x: &[f32],
    ldx: usize,
    n: usize,
    k: usize,
    wt: &[f32],
    m: usize,
    out: &mut [f32],
    ldo: usize,
) {
    gemm_generic::<Fused, 4, 16>(x, ldx, n, k, wt, m, out, ldo)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn gemm_avx512(
    x: &[f32],
    ldx: usize,
    n: usize,
    k: usize,
    wt: &[f32],
    m: usize,
    out: &mut [f32],
    ldo: usize,
) {
    gemm_generic::<Fused, 4, 32>(x, ldx, n, k, wt, m, out, ldo)
}

/// The product, tiled: column blocks of `NR` (then 8, then 1), rows in
/// blocks of `MR` (then 1).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_generic<A: Arith, const MR: usize, const NR: usize>(
    x: &[f32],
    ldx: usize,
    n: usize,
    k: usize,
    wt: &[f32],
    m: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let mut j = 0;
    while j + NR <= m {
        column_block::<A, MR, NR>(x, ldx, n, k, wt, m, j, out, ldo);
        j += NR;
    }
    while j + 8 <= m {
        column_block::<A, MR, 8>(x, ldx, n, k, wt, m, j, out, ldo);
        j += 8;
    }
    while j < m {
        column_block::<A, MR, 1>(x, ldx, n, k, wt, m, j, out, ldo);
        j += 1;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn column_block<A: Arith, const MR: usize, const NR: usize>(
    x: &[f32],
    ldx: usize,
    n: usize,
    k: usize,
    wt: &[f32],
    m: usize,
    j: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let mut i = 0;
    while i + MR <= n {
        tile::<A, MR, NR>(&x[i * ldx..], ldx, k, wt, m, j, &mut out[i * ldo..], ldo);
        i += MR;
    }
    while i < n {
        tile::<A, 1, NR>(&x[i * ldx..], ldx, k, wt, m, j, &mut out[i * ldo..], ldo);
        i += 1;
    }
}

/// One `R x C` tile of outputs, accumulated in registers over all of `k`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<A: Arith, const R: usize, const C: usize>(
    x: &[f32],
    ldx: usize,
    k: usize,
    wt: &[f32],
    m: usize,
    j: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * ldx..r * ldx + k]);
    let mut acc = [[0.0f32; C]; R];
    for (kk, wrow) in wt.chunks_exact(m).take(k).enumerate() {
        let w: &[f32; C] = match wrow[j..j + C].try_into() {
            Ok(w) => w,
            Err(_) => return, // unreachable: the slice has length C
        };
        for r in 0..R {
            let xv = rows[r][kk];
            for c in 0..C {
                acc[r][c] = A::mul_add(xv, w[c], acc[r][c]);
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        let o = &mut out[r * ldo + j..r * ldo + j + C];
        for c in 0..C {
            o[c] += acc_row[c];
        }
    }
}

/// Sets each of the `n` rows (stride `ldo`) of `out` to `b`.
pub(crate) fn fill_rows(out: &mut [f32], ldo: usize, n: usize, b: &[f32]) {
    for i in 0..n {
        out[i * ldo..i * ldo + b.len()].copy_from_slice(b);
    }
}

/// `out = X Wt + b` for `n` rows: `x` is `n x in`, `wt` is the weight
/// transposed (`[in, out]`, `in = wt.len() / b.len()`), `out` is
/// `n x out`; all contiguous.
pub(crate) fn linear(x: &[f32], n: usize, wt: &[f32], b: &[f32], out: &mut [f32]) {
    let m = b.len();
    if m == 0 {
        return;
    }
    let k = wt.len() / m;
    fill_rows(out, m, n, b);
    gemm_acc(x, k, n, k, wt, m, out, m);
}

/// The transpose of a `rows x cols` row-major matrix.
pub(crate) fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; rows * cols];
    for (r, row) in a.chunks_exact(cols).take(rows).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// `max(x, 0)` in place (NaN stays NaN).
pub(crate) fn relu_in_place(x: &mut [f32]) {
    for v in x {
        *v = if *v < 0.0 { 0.0 } else { *v };
    }
}

/// The logistic function, without overflow for large `|x|`.
pub(crate) fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `a . b` over the shorter length, with eight partial sums (vectorises).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// Softmax of each of the `n` rows of length `len` (stride `ld`), in place,
/// shifted by the row maximum so no `exp` overflows.
pub(crate) fn softmax_rows(x: &mut [f32], ld: usize, n: usize, len: usize) {
    if n == 0 || len == 0 {
        return;
    }
    assert!(ld >= len && x.len() >= (n - 1) * ld + len, "softmax");
    match Isa::get() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx512 / Avx2 are returned only after
        // `is_x86_feature_detected!` confirmed avx2 and fma.
        Isa::Avx512 | Isa::Avx2 => unsafe { softmax_avx2(x, ld, n, len) },
        Isa::Portable => softmax_generic::<Plain>(x, ld, n, len),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(x: &mut [f32], ld: usize, n: usize, len: usize) {
    softmax_generic::<Fused>(x, ld, n, len)
}

#[inline(always)]
fn softmax_generic<A: Arith>(x: &mut [f32], ld: usize, n: usize, len: usize) {
    for i in 0..n {
        softmax_row::<A>(&mut x[i * ld..i * ld + len]);
    }
}

/// Softmax of one row in place (see [`softmax_rows`]).
#[inline(always)]
pub(crate) fn softmax_row<A: Arith>(row: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            mx[l] = if c[l] > mx[l] { c[l] } else { mx[l] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in mx.iter().chain(chunks.remainder()) {
        max = if v > max { v } else { max };
    }
    if max == f32::NEG_INFINITY {
        // Every entry -inf (or NaN): let the NaN / uniform fall out below.
        max = 0.0;
    }
    let mut acc = [0.0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp_approx::<A>(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_approx::<A>(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `e^x` for `x <= 88`, within 2 ulp of `f32::exp` over the range a
/// softmax uses (`x <= 0`; below -87.3 the result is about 1e-38 instead
/// of smaller). Branch-free and built from adds, multiplies and bit
/// operations, so a loop over it vectorises (Cephes `expf`: `x = n ln 2 +
/// r`, a degree-7 polynomial in `r`, `2^n` through the exponent bits).
#[inline(always)]
pub(crate) fn exp_approx<A: Arith>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    // NaN compares false and passes through.
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.3 { 88.3 } else { x };
    let t = A::mul_add(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let n_int = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = A::mul_add(-n, LN2_HI, x);
    let r = A::mul_add(-n, LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    p = A::mul_add(p, r, 1.398_199_9e-3);
    p = A::mul_add(p, r, 8.333_452e-3);
    p = A::mul_add(p, r, 4.166_579_6e-2);
    p = A::mul_add(p, r, 1.666_666_5e-1);
    p = A::mul_add(p, r, 0.5);
    let y = A::mul_add(p, r * r, r) + 1.0;
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    y * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn random(n: usize, state: &mut u64) -> Vec<f32> {
        (0..n).map(|_| lcg(state)).collect()
    }

    #[test]
    fn gemm_matches_naive_on_odd_shapes_and_strides() {
        let mut s = 7;
        for &(n, k, m) in &[
            (1, 1, 1),
            (3, 5, 7),
            (4, 16, 16),
            (5, 17, 33),
            (9, 64, 50),
            (64, 64, 128),
            (13, 3, 70),
            (8, 128, 1),
        ] {
            let (ldx, ldo) = (k + 3, m + 2);
            let x = random(n * ldx, &mut s);
            let wt = random(k * m, &mut s);
            let init = random(n * ldo, &mut s);
            let mut out = init.clone();
            gemm_acc(&x, ldx, n, k, &wt, m, &mut out, ldo);
            for i in 0..n {
                for j in 0..ldo {
                    let expected = if j < m {
                        let mut acc = init[i * ldo + j] as f64;
                        for kk in 0..k {
                            acc += x[i * ldx + kk] as f64 * wt[kk * m + j] as f64;
                        }
                        acc
                    } else {
                        init[i * ldo + j] as f64 // outside the view: untouched
                    };
                    let got = out[i * ldo + j] as f64;
                    assert!(
                        (got - expected).abs() <= 1e-5 * (1.0 + expected.abs() + k as f64),
                        "n={n} k={k} m={m} ({i},{j}): {got} vs {expected}"
                    );
                }
            }
            // The portable instantiation agrees too.
            let mut portable = init.clone();
            gemm_generic::<Plain, 4, 16>(&x, ldx, n, k, &wt, m, &mut portable, ldo);
            for (a, b) in portable.iter().zip(&out) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + k as f32));
            }
        }
    }

    #[test]
    fn linear_is_x_w_transposed_plus_b() {
        let mut s = 3;
        let (n, inp, outd) = (6, 10, 12);
        let x = random(n * inp, &mut s);
        let w = random(outd * inp, &mut s); // [out, in]
        let b = random(outd, &mut s);
        let mut out = vec![0.0; n * outd];
        linear(&x, n, &transpose(&w, outd, inp), &b, &mut out);
        for i in 0..n {
            for o in 0..outd {
                let mut acc = b[o] as f64;
                for c in 0..inp {
                    acc += x[i * inp + c] as f64 * w[o * inp + c] as f64;
                }
                assert!((out[i * outd + o] as f64 - acc).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn exp_approx_is_close_to_exp() {
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (a, e) = (exp_approx::<Plain>(x), x.exp());
            assert!(((a - e) / e).abs() < 3e-7, "{x}: {a} vs {e}");
            x += 0.0137;
        }
        assert!(exp_approx::<Plain>(-1000.0) < 1e-37);
        assert!(exp_approx::<Plain>(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_matches_naive_and_is_stable() {
        let mut s = 11;
        for len in [1, 3, 8, 9, 50, 77] {
            let n = 3;
            let ld = len + 1;
            let mut x: Vec<f32> = random(n * ld, &mut s).iter().map(|v| v * 30.0).collect();
            x[0] = 1e4; // a huge logit: naive exp would overflow
            let orig = x.clone();
            softmax_rows(&mut x, ld, n, len);
            for i in 0..n {
                let row = &orig[i * ld..i * ld + len];
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                for t in 0..len {
                    let p = (row[t] as f64 - m).exp() / z;
                    assert!((x[i * ld + t] as f64 - p).abs() < 1e-6, "len {len}");
                }
                if len < ld {
                    assert_eq!(x[i * ld + len], orig[i * ld + len]);
                }
            }
        }
    }

    #[test]
    fn elementwise() {
        let mut v = vec![-1.0, 0.0, 2.0, f32::NAN];
        relu_in_place(&mut v);
        assert_eq!(&v[..3], &[0.0, 0.0, 2.0]);
        assert!(v[3].is_nan());
        assert_eq!(sigmoid(0.0), 0.5);
        assert!(sigmoid(-1000.0) >= 0.0 && sigmoid(-1000.0) < 1e-30);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert!((sigmoid(1.3) - 1.0 / (1.0 + (-1.3f32).exp())).abs() < 1e-7);
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..19).map(|i| (i as f32) * 0.5).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
    }
}
