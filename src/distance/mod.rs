//! Distance metrics and their SIMD kernels, chosen once at run time.
//!
//! ```text
//!   Metric ──► Distance { metric, kernel: fn ptr } ──► distance(a, b) -> f32
//!                               ▲
//!   Isa::detect() ──────────────┘  AVX-512F > AVX2+FMA > NEON > scalar
//! ```
//!
//! Every metric is a *distance*: smaller is closer, and the index orders
//! results ascending.
//!
//! | metric | stored vector | distance |
//! |---|---|---|
//! | [`Metric::L2`] | as given | squared Euclidean, `Σ (a_i - b_i)²` |
//! | [`Metric::InnerProduct`] | as given | `1 - a·b` (hnswlib's convention) |
//! | [`Metric::Cosine`] | normalised to unit length on insert | `1 - a·b` over unit vectors |
//!
//! The kernel is a function pointer picked by [`Isa::detect`] when the index is
//! built, as hnswlib does with its `fstdistfunc_`. That is what
//! [`Distance::eval`] calls, and what every cold path uses.
//!
//! The two hot loops (the layer beam search and the greedy descent) instead
//! go through [`Distance::dispatch`]: it calls a [`DistanceVisitor`] once,
//! from inside a `#[target_feature]` function, with the kernel as a closure.
//! The visitor's loop is `#[inline(always)]`, so it is compiled again inside
//! that function with the same features, and the kernel inlines into it: no
//! indirect call, no spilled registers and no horizontal-sum latency
//! serialised behind a call per neighbour. On siftsmall at ef 10-16 this
//! measured +2-5% QPS (2026-11-24, this machine; BENCHMARKS.md).
//!
//! ```text
//!   search_layer ──► Distance::dispatch(visitor)
//!                        │ match (isa, metric), once per layer search
//!                        ▼
//!                    #[target_feature(avx512f)] fn ──► visitor.visit(|a, b| l2_avx512(a, b))
//!                                                        (loop + kernel, one body)
//! ```
//!
//! The scalar kernels are the reference: `tests` below checks every SIMD
//! kernel this CPU supports against them on odd and even dimensions, through
//! both [`Distance::eval`] and [`Distance::dispatch`].

mod scalar;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::error::{Error, Result};

/// How closeness is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Squared Euclidean distance.
    L2,
    /// `1 - dot(a, b)`: maximum inner product search.
    InnerProduct,
    /// `1 - cos(a, b)`; vectors are normalised on the way in.
    Cosine,
}

impl Metric {
    /// Parses the names used by `ann_bench`: `l2`, `ip`, `cos`.
    ///
    /// ```
    /// assert_eq!(nann::Metric::parse("cos"), Some(nann::Metric::Cosine));
    /// ```
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "l2" | "L2" | "euclidean" => Some(Self::L2),
            "ip" | "IP" | "dot" | "inner_product" => Some(Self::InnerProduct),
            "cos" | "cosine" => Some(Self::Cosine),
            _ => None,
        }
    }
}

/// An instruction-set level for the distance kernels.
///
/// An index picks [`Isa::detect`] unless [`IndexParams::isa`](crate::IndexParams::isa)
/// names one, e.g. to compare kernels or to pin results across machines.
/// Asking for a level the CPU lacks is an error, not a crash.
///
/// ```
/// use nann::{Distance, Index, IndexParams, Isa, Metric};
/// let best = Isa::detect();
/// assert!(best.is_supported() && Isa::Scalar.is_supported());
/// assert!(Isa::all_supported().contains(&best));
/// let mut params = IndexParams::new(4, Metric::L2);
/// params.isa = Some(Isa::Scalar);
/// let portable = Index::new(params)?;
/// portable.insert(1, &[1.0, 2.0, 3.0, 4.0])?;
/// let d = Distance::with_isa(Metric::L2, best)?;
/// assert_eq!(d.isa(), best);
/// # Ok::<(), nann::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, no explicit SIMD.
    Scalar,
    /// x86-64 AVX2 + FMA, 256-bit.
    Avx2,
    /// x86-64 AVX-512F, 512-bit.
    Avx512,
    /// aarch64 Advanced SIMD, 128-bit.
    Neon,
}

impl Isa {
    /// The best level this CPU supports.
    pub fn detect() -> Self {
        Self::all_supported()
            .into_iter()
            .max()
            .unwrap_or(Isa::Scalar)
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every level this CPU supports, lowest first.
    pub fn all_supported() -> Vec<Self> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }
}

/// A kernel: `unsafe` because a SIMD kernel may only run on a CPU with its
/// features; [`Distance`] installs one only after checking.
type Kernel = unsafe fn(&[f32], &[f32]) -> f32;

/// A metric bound to the kernel that computes it on this CPU.
#[derive(Clone, Copy)]
pub struct Distance {
    metric: Metric,
    isa: Isa,
    kernel: Kernel,
}

impl std::fmt::Debug for Distance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distance")
            .field("metric", &self.metric)
            .field("isa", &self.isa)
            .finish()
    }
}

impl Distance {
    /// The metric with the best kernel for this CPU.
    ///
    /// ```
    /// use nann::{Distance, Metric};
    /// let d = Distance::new(Metric::L2);
    /// assert_eq!(d.eval(&[0.0, 3.0], &[4.0, 0.0]), 25.0);
    /// ```
    pub fn new(metric: Metric) -> Self {
        // `detect` returns only supported levels, so this cannot fail.
        Self::with_isa(metric, Isa::detect()).unwrap_or(Self {
            metric,
            isa: Isa::Scalar,
            kernel: scalar_kernel(metric),
        })
    }

    /// The metric with the kernel of a given level, or an error if this CPU
    /// cannot run it (benchmarks use this to compare levels).
    pub fn with_isa(metric: Metric, isa: Isa) -> Result<Self> {
        if !isa.is_supported() {
            return Err(Error::InvalidParameter {
                name: "isa",
                reason: format!("this CPU does not support {isa:?}"),
            });
        }
        let wants_l2 = metric == Metric::L2;
        let kernel: Kernel = match isa {
            Isa::Scalar => scalar_kernel(metric),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if wants_l2 => x86::l2_squared_avx2,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::dot_avx2,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if wants_l2 => x86::l2_squared_avx512,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::dot_avx512,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon if wants_l2 => aarch64::l2_squared_neon,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => aarch64::dot_neon,
            #[allow(unreachable_patterns)]
            _ => scalar_kernel(metric),
        };
        Ok(Self {
            metric,
            isa,
            kernel,
        })
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The kernel level in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Distance between two vectors of equal length (smaller is closer).
    /// Extra components of the longer one, if any, are ignored.
    #[inline]
    pub fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `kernel` was installed by `with_isa` only after
        // `isa.is_supported()` confirmed this CPU has the kernel's features
        // (scalar kernels need none). Kernels bound their reads by the shorter
        // slice, so any pair of slices is in bounds.
        let raw = unsafe { (self.kernel)(a, b) };
        match self.metric {
            Metric::L2 => raw,
            Metric::InnerProduct | Metric::Cosine => 1.0 - raw,
        }
    }

    /// Runs `visitor` with this distance as a closure the compiler can inline
    /// (see the module docs). The closure computes exactly [`Distance::eval`].
    #[inline]
    pub(crate) fn dispatch<V: DistanceVisitor>(&self, visitor: V) -> V::Output {
        let l2 = self.metric == Metric::L2;
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `with_isa` installs the Avx512 level only after
            // `is_supported` confirmed AVX-512F on this CPU.
            Isa::Avx512 => unsafe { dispatch_avx512(visitor, l2) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2 and FMA.
            Isa::Avx2 => unsafe { dispatch_avx2(visitor, l2) },
            _ => visitor.visit(|a, b| self.eval(a, b)),
        }
    }
}

/// A loop that wants the distance inlined: [`Distance::dispatch`] calls
/// `visit` once with the kernel as `distance`.
///
/// Implementations mark `visit` `#[inline(always)]`: that is what makes
/// their body part of the `#[target_feature]` function that calls it.
pub(crate) trait DistanceVisitor {
    type Output;
    fn visit<D: Fn(&[f32], &[f32]) -> f32>(self, distance: D) -> Self::Output;
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dispatch_avx512<V: DistanceVisitor>(visitor: V, l2: bool) -> V::Output {
    // SAFETY (both closures): this function runs only on a CPU with AVX-512F
    // (its own contract), and the closures are called only from inside it.
    if l2 {
        visitor.visit(|a, b| unsafe { x86::l2_squared_avx512(a, b) })
    } else {
        visitor.visit(|a, b| 1.0 - unsafe { x86::dot_avx512(a, b) })
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dispatch_avx2<V: DistanceVisitor>(visitor: V, l2: bool) -> V::Output {
    // SAFETY (both closures): as in `dispatch_avx512`, for AVX2 and FMA.
    if l2 {
        visitor.visit(|a, b| unsafe { x86::l2_squared_avx2(a, b) })
    } else {
        visitor.visit(|a, b| 1.0 - unsafe { x86::dot_avx2(a, b) })
    }
}

fn scalar_kernel(metric: Metric) -> Kernel {
    match metric {
        Metric::L2 => scalar_l2,
        Metric::InnerProduct | Metric::Cosine => scalar_dot,
    }
}

// `unsafe fn` wrappers so the scalar kernels fit the `Kernel` pointer type.
unsafe fn scalar_l2(a: &[f32], b: &[f32]) -> f32 {
    scalar::l2_squared(a, b)
}
unsafe fn scalar_dot(a: &[f32], b: &[f32]) -> f32 {
    scalar::dot(a, b)
}

/// Normalises `v` in place to unit length; fails on the zero vector.
pub(crate) fn normalize(v: &mut [f32]) -> Result<()> {
    let norm_sq = scalar::dot(v, v);
    if norm_sq <= f32::MIN_POSITIVE || !norm_sq.is_finite() {
        return Err(Error::ZeroVector);
    }
    let inv = 1.0 / norm_sq.sqrt();
    v.iter_mut().for_each(|x| *x *= inv);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift so the test needs no RNG crate; values in [-1, 1).
    fn random_vec(state: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                (*state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_supported_simd_kernel_matches_scalar_on_odd_and_even_dims() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let dims = [
            1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 768, 1001,
        ];
        for isa in Isa::all_supported() {
            for metric in [Metric::L2, Metric::InnerProduct] {
                let fast = Distance::with_isa(metric, isa).unwrap();
                let reference = Distance::with_isa(metric, Isa::Scalar).unwrap();
                for &dim in &dims {
                    for _ in 0..20 {
                        let a = random_vec(&mut state, dim);
                        let b = random_vec(&mut state, dim);
                        let (x, y) = (fast.eval(&a, &b), reference.eval(&a, &b));
                        // Summation order differs between kernels; bound the
                        // error by the magnitude of the terms, not the result.
                        let scale: f32 = a
                            .iter()
                            .zip(&b)
                            .map(|(p, q)| (p * q).abs() + (p - q) * (p - q))
                            .sum();
                        assert!(
                            (x - y).abs() <= 1e-5 * (scale + 1.0),
                            "{isa:?} {metric:?} dim {dim}: simd {x} vs scalar {y}"
                        );
                    }
                }
            }
        }
    }

    /// Evaluates every pair through [`Distance::dispatch`].
    struct Pairs<'a>(&'a [(Vec<f32>, Vec<f32>)]);

    impl DistanceVisitor for Pairs<'_> {
        type Output = Vec<f32>;
        #[inline(always)]
        fn visit<D: Fn(&[f32], &[f32]) -> f32>(self, distance: D) -> Vec<f32> {
            self.0.iter().map(|(a, b)| distance(a, b)).collect()
        }
    }

    #[test]
    fn dispatch_computes_exactly_what_eval_computes_for_every_metric_and_isa() {
        let mut state = 0x2545_f491_4f6c_dd1d;
        let pairs: Vec<(Vec<f32>, Vec<f32>)> = [1, 7, 16, 33, 128, 129]
            .iter()
            .flat_map(|&dim| (0..5).map(move |_| dim))
            .map(|dim| (random_vec(&mut state, dim), random_vec(&mut state, dim)))
            .collect();
        for isa in Isa::all_supported() {
            for metric in [Metric::L2, Metric::InnerProduct, Metric::Cosine] {
                let distance = Distance::with_isa(metric, isa).unwrap();
                let dispatched = distance.dispatch(Pairs(&pairs));
                for ((a, b), got) in pairs.iter().zip(dispatched) {
                    // The same kernel, so the same summation order: bit-equal.
                    assert_eq!(
                        got.to_bits(),
                        distance.eval(a, b).to_bits(),
                        "{isa:?} {metric:?} dim {}",
                        a.len()
                    );
                }
            }
        }
    }

    #[test]
    fn scalar_kernels_compute_the_textbook_formulas() {
        let a = [1.0, 2.0, 3.0];
        let b = [4.0, 0.0, -1.0];
        assert_eq!(
            Distance::with_isa(Metric::L2, Isa::Scalar)
                .unwrap()
                .eval(&a, &b),
            9.0 + 4.0 + 16.0
        );
        assert_eq!(
            Distance::with_isa(Metric::InnerProduct, Isa::Scalar)
                .unwrap()
                .eval(&a, &b),
            1.0 - (4.0 - 3.0)
        );
    }

    #[test]
    fn normalize_rejects_zero_and_makes_unit_vectors() {
        assert_eq!(normalize(&mut [0.0, 0.0]), Err(Error::ZeroVector));
        let mut v = [3.0, 4.0];
        normalize(&mut v).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn unsupported_isa_is_an_error_not_a_crash() {
        for isa in [Isa::Avx2, Isa::Avx512, Isa::Neon] {
            if !isa.is_supported() {
                assert!(Distance::with_isa(Metric::L2, isa).is_err());
            }
        }
    }
}
