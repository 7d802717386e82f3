//! The kernel sources (`kernels/*.cu`, embedded in the crate) and their
//! compilation to PTX by NVRTC.
//!
//! ```text
//!  kernels/common.cuh ─┐ prepended, then `#line 1 "<file>"`
//!  kernels/<file>.cu  ─┴─► source ──► NVRTC (--gpu-architecture=compute_XY)
//!                                        │ no device needed: CI runs this
//!                                        ▼ (tests/cuda_compile.rs)
//!                                       PTX ──► context.rs: loaded once per
//!                                               process and device, the
//!                                               driver JITs it to SASS
//! ```
//!
//! NVRTC is loaded dynamically (cudarc): [`nvrtc_available`] checks that the
//! library can be loaded before anything asks cudarc to use it (cudarc
//! panics when it cannot). Compile errors come back as
//! [`CudaError::Compile`] naming the file; the log's line numbers are the
//! `.cu` file's own.

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::error::CudaError;

/// One kernel file: its name, source and the `extern "C"` functions it
/// defines (looked up by name after loading).
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The file name under `kernels/`, e.g. `attention.cu`.
    pub file: &'static str,
    /// Its text (without the common header).
    pub source: &'static str,
    /// The kernels it defines.
    pub functions: &'static [&'static str],
}

/// `kernels/common.cuh`: helpers prepended to every kernel file.
pub const COMMON: &str = include_str!("../../kernels/common.cuh");

/// Every kernel file, in build order.
pub const KERNELS: &[KernelSource] = &[
    KernelSource {
        file: "elementwise.cu",
        source: include_str!("../../kernels/elementwise.cu"),
        functions: &[
            "nann_fill_rows",
            "nann_bias_act",
            "nann_fill_f32",
            "nann_copy_f32x4",
        ],
    },
    KernelSource {
        file: "matmul.cu",
        source: include_str!("../../kernels/matmul.cu"),
        functions: &["nann_linear_f32"],
    },
    KernelSource {
        file: "softmax.cu",
        source: include_str!("../../kernels/softmax.cu"),
        functions: &["nann_softmax_rows"],
    },
    KernelSource {
        file: "layernorm.cu",
        source: include_str!("../../kernels/layernorm.cu"),
        functions: &["nann_layer_norm_rows"],
    },
    KernelSource {
        file: "attention.cu",
        source: include_str!("../../kernels/attention.cu"),
        functions: &["nann_attend_shared_kv", "nann_attend_rows"],
    },
    KernelSource {
        file: "gather.cu",
        source: include_str!("../../kernels/gather.cu"),
        functions: &[
            "nann_gather_tokens",
            "nann_gather_rows_f32",
            "nann_gather_rows_u32",
            "nann_iota_u32",
        ],
    },
    KernelSource {
        file: "bar.cu",
        source: include_str!("../../kernels/bar.cu"),
        functions: &["nann_bar_outputs"],
    },
    KernelSource {
        file: "topk.cu",
        source: include_str!("../../kernels/topk.cu"),
        functions: &["nann_topk_block"],
    },
    KernelSource {
        file: "tar.cu",
        source: include_str!("../../kernels/tar.cu"),
        functions: &[
            "nann_tar_linear",
            "nann_tar_attend",
            "nann_tar_add3",
            "nann_tar_guide",
            "nann_tar_down",
            "nann_tar_up",
            "nann_tar_top_p",
            "nann_tar_nearest",
        ],
    },
];

/// The architecture the CI compile check targets: the GPU machine's H200
/// (compute capability 9.0).
pub const CI_ARCH: &str = "compute_90";

impl KernelSource {
    /// The text NVRTC compiles: the common header, then the file, with a
    /// `#line` directive so messages give the file's own line numbers.
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.file, self.source)
    }

    /// The file name without `.cu` (the PTX file stem).
    pub fn stem(&self) -> &'static str {
        self.file.strip_suffix(".cu").unwrap_or(self.file)
    }
}

/// Whether NVRTC can be loaded (checked without letting cudarc panic).
pub fn nvrtc_available() -> bool {
    // SAFETY: loading libnvrtc runs its initialisers only; it is NVIDIA's
    // compiler library, which is what this backend is meant to load, and
    // the probe does not call into it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Checks an NVRTC architecture name: `compute_XY` (PTX for a virtual
/// architecture, JIT-compiled by the driver) or `sm_XY`, digits only after
/// the prefix (the name becomes a compiler option).
fn check_arch(arch: &str) -> Result<(), CudaError> {
    let digits = arch
        .strip_prefix("compute_")
        .or_else(|| arch.strip_prefix("sm_"))
        .map(|d| d.strip_suffix('a').unwrap_or(d));
    match digits {
        Some(d) if !d.is_empty() && d.len() <= 4 && d.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(CudaError::Invalid(format!(
            "architecture `{arch}`: expected compute_XY or sm_XY"
        ))),
    }
}

/// Compiles one kernel file to PTX for `arch` (e.g. [`CI_ARCH`]). Needs
/// NVRTC, not a device.
pub fn compile_ptx(kernel: &KernelSource, arch: &str) -> Result<Ptx, CudaError> {
    check_arch(arch)?;
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let source = kernel.full_source();
    if source.contains('\0') {
        // cudarc would panic building the C string.
        return Err(CudaError::Invalid(format!(
            "{} holds a NUL byte",
            kernel.file
        )));
    }
    let options = CompileOptions {
        name: Some(kernel.file.to_string()),
        options: vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            // Exact division and square root, no flush-to-zero: the fp32
            // path is checked against the CPU at 1e-4.
            "--prec-div=true".into(),
            "--prec-sqrt=true".into(),
            "--ftz=false".into(),
            "--fmad=true".into(),
            "-lineinfo".into(),
        ],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| match e {
        CompileError::CompileError { log, .. } => CudaError::Compile {
            kernel: kernel.file.to_string(),
            log: log.to_string_lossy().into_owned(),
        },
        other => CudaError::Compile {
            kernel: kernel.file.to_string(),
            log: format!("{other:?}"),
        },
    })
}

/// Every kernel file compiled to PTX for `arch`, `(file, ptx)` in
/// [`KERNELS`] order; the first failure is returned.
///
/// Usable without a device: this is what CI checks for `compute_90`.
pub fn compile_all_ptx(arch: &str) -> Result<Vec<(&'static str, Ptx)>, CudaError> {
    KERNELS
        .iter()
        .map(|k| compile_ptx(k, arch).map(|p| (k.file, p)))
        .collect()
}

/// A compiled PTX's text (e.g. to write it to a file for a machine without
/// NVRTC: `NANN_CUDA_PTX_DIR`).
pub fn ptx_text(ptx: &Ptx) -> String {
    match ptx.as_bytes() {
        Some(bytes) => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        }
        // Not an NVRTC image (never the case for compile_ptx's output).
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_are_checked() {
        for ok in ["compute_90", "sm_90", "sm_90a", "compute_120"] {
            assert!(check_arch(ok).is_ok(), "{ok}");
        }
        for bad in ["", "90", "compute_", "sm_9x", "compute_90 -G", "sm_12345"] {
            assert!(check_arch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_function_is_defined_in_its_file() {
        for k in KERNELS {
            for f in k.functions {
                assert!(
                    k.source.contains(&format!("void {f}("))
                        || k.source.contains(&format!("\n{f}(")),
                    "{f} not in {}",
                    k.file
                );
            }
            assert!(k.full_source().contains(&format!("#line 1 \"{}\"", k.file)));
        }
    }
}
