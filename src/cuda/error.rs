//! Typed errors of the CUDA backend.
//!
//! Every failure the GPU path can meet is a variant here, never a panic:
//! a machine without a GPU or without NVRTC is a [`CudaError::NoDevice`] /
//! [`CudaError::NoNvrtc`] the caller can act on (fall back to the CPU
//! scorer), checked *before* cudarc is asked to load the library (cudarc
//! panics when a library is absent). Inside a search, a `CudaError` reaches
//! the caller as [`Error::Scorer`](crate::Error::Scorer) with this message.

use crate::bar::ModelError;

/// Everything the CUDA backend can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No CUDA driver library (`libcuda`) could be loaded, or it reports no
    /// device with this ordinal.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// NVRTC (`libnvrtc`), the run-time compiler of `kernels/*.cu`, could
    /// not be loaded, and no precompiled PTX was given
    /// (`NANN_CUDA_PTX_DIR`). `scripts/nvrtc-setup.sh` installs it.
    #[error(
        "NVRTC (libnvrtc) is not available: install it (scripts/nvrtc-setup.sh, then \
         LD_LIBRARY_PATH) or set NANN_CUDA_PTX_DIR to precompiled PTX"
    )]
    NoNvrtc,
    /// A kernel file failed to compile; `log` is NVRTC's log, whose lines
    /// name the file (`attention.cu(12): error ...`).
    #[error("kernel {kernel} failed to compile:\n{log}")]
    Compile {
        /// The kernel file, e.g. `attention.cu`.
        kernel: String,
        /// The compiler log.
        log: String,
    },
    /// Precompiled PTX could not be read (`NANN_CUDA_PTX_DIR`).
    #[error("reading PTX {path}: {message}")]
    Ptx {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A CUDA driver call failed (out of memory, a launch error, an
    /// illegal address reported by a later call, ...).
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(String),
    /// A kernel the backend needs is missing from the loaded modules.
    #[error("kernel function `{0}` is not in the loaded modules")]
    MissingFunction(String),
    /// Operand shapes do not fit a kernel (or exceed its limits).
    #[error("shape: {op}: {message}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What does not fit.
        message: String,
    },
    /// A model input is invalid (an id outside its vocabulary, a
    /// dimension that does not match the model).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A user state from another scorer, an output of the wrong length, or
    /// another misuse of the API.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl CudaError {
    /// A [`CudaError::Shape`].
    pub(crate) fn shape(op: &'static str, message: impl Into<String>) -> Self {
        Self::Shape {
            op,
            message: message.into(),
        }
    }
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(format!("{e:?}"))
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        Self::Blas(format!("{e:?}"))
    }
}

/// In a search ([`Scorer`](crate::Scorer)), a device failure is the
/// scorer's failure: [`Error::Scorer`](crate::Error::Scorer) with this
/// message. Model input errors keep the model's message.
impl From<CudaError> for crate::Error {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Model(m) => m.into(),
            other => crate::Error::Scorer {
                message: other.to_string(),
            },
        }
    }
}
