//! CUDA backend (feature `cuda`): the BAR model's heads and the TAR
//! model's generation as the crate's own kernels (`kernels/*.cu`), compiled
//! at run time by NVRTC and driven through cudarc: [`GpuBarScorer`], a
//! [`Scorer`](crate::Scorer) for
//! [`Index::search_with`](crate::Index::search_with), and [`GpuTarModel`],
//! the auto-bidding decision (`TarModel::generate`) at batch 1.
//!
//! ```text
//!  kernels/*.cu (include_str!) ──► kernels.rs: NVRTC ──► PTX (once per process and arch)
//!                                   │  no device needed: CI compiles every
//!                                   │  kernel for compute_90 (tests/cuda_compile.rs)
//!                                   ▼
//!  context.rs  GpuDevice::get(0) ── CUDA context, modules, functions (once per process)
//!                                   ▼
//!  ops.rs      Exec: one stream (+ cuBLAS handle): linear, attention, softmax,
//!              layer norm, gather, top-k, ... (building blocks, shape-checked)
//!                                   ▼
//!  scorer.rs   GpuBarScorer: weights uploaded once; GpuUserState once per
//!              request; each NANN round (CandidateBatch) = upload z_a + tokens,
//!              ~20 launches, download scores; GpuAdTable: ads resident on the
//!              device, scored by id or all at once with top-k on the device
//!  tar.rs      GpuTarModel: weights uploaded once; one generation = 3 uploads,
//!              ~110 launches (fused linear layers, KV-cached attention, top-p
//!              on the device from host-drawn uniforms), 1 download
//! ```
//!
//! Builds and links without CUDA: cudarc loads `libcuda`, `libnvrtc` and
//! `libcublas` when first used, and every entry point checks the library
//! is loadable first ([`CudaError::NoDevice`], [`CudaError::NoNvrtc`])
//! because cudarc panics when it is not. cuBLAS is optional (the matmul
//! kernel replaces it).
//!
//! Precision: fp32 throughout (cuBLAS in `CUBLAS_DEFAULT_MATH`, no TF32;
//! NVRTC with exact division and square root), held to a relative error of
//! 1e-4 against the CPU reference. [`MatmulBackend::CublasTf32`] trades
//! that for speed and has its own, looser tolerance.

mod context;
mod error;
pub mod kernels;
pub mod memory;
pub mod ops;
mod scorer;
mod tar;

pub use context::{
    cublas_available, device_count, driver_available, driver_version, write_ptx_dir, GpuDevice,
    MIN_DRIVER_CUDA_VERSION, PTX_DIR_ENV,
};
pub use error::CudaError;
pub use kernels::{compile_all_ptx, compile_ptx, nvrtc_available, KernelSource, CI_ARCH, KERNELS};
pub use memory::{DevBuf, Mat};
pub use ops::{Act, Exec, MatmulBackend};
pub use scorer::{GpuAdTable, GpuBarScorer, GpuOptions, GpuUserState, StepProfile};
pub use tar::{GpuTarModel, GpuTarOptions};
