//! Typed errors of the TAR and DT models: loading weights, checking inputs.

/// Everything loading or running a trajectory model can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TarError {
    /// The weights file could not be read or written.
    #[error("could not access the weights file {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's description.
        message: String,
    },
    /// The bytes are not a safetensors file.
    #[error("not a safetensors file: {0}")]
    Format(String),
    /// A configuration entry is missing from the file's metadata or invalid.
    #[error("configuration `{field}`: {message}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A tensor the configuration needs is not in the file.
    #[error("tensor `{name}` is missing from the weights file")]
    MissingTensor {
        /// The tensor's name.
        name: String,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("tensor `{name}` has shape {found:?}; the configuration needs {expected:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is not f32.
    #[error("tensor `{name}` has dtype {dtype}; only F32 is supported")]
    DType {
        /// The tensor's name.
        name: String,
        /// The dtype in the file.
        dtype: String,
    },
    /// A tensor holds NaN or an infinity.
    #[error("tensor `{name}` holds a non-finite value at element {position}")]
    NonFinite {
        /// The tensor's name.
        name: String,
        /// The first offending element.
        position: usize,
    },
    /// An input has the wrong length or holds a non-finite value.
    #[error("input `{input}`: {message}")]
    Input {
        /// The argument.
        input: &'static str,
        /// What is wrong and what is accepted.
        message: String,
    },
    /// A [`PlanGenerator`](super::PlanGenerator) other than the CPU model
    /// failed (e.g. a CUDA driver error of `nann::cuda::GpuTarModel`), or
    /// does not fit the model it stands in for (built from a model of
    /// another configuration). The message says which and what to do;
    /// the CPU model ([`TarModel`](super::TarModel)) generates the same
    /// plans.
    #[error("{backend} plan generator: {message}")]
    Backend {
        /// Where the generator runs (`"cuda"`).
        backend: &'static str,
        /// What failed, and what to do about it.
        message: String,
    },
}
