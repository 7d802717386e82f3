//! Typed errors of the BAR model: loading weights, checking inputs.

/// Everything loading or running a BAR model can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The weights file could not be read.
    #[error("could not read the weights file {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's description.
        message: String,
    },
    /// The bytes are not a safetensors file.
    #[error("not a safetensors file: {0}")]
    Format(String),
    /// A configuration entry is missing from the file's metadata or is invalid.
    #[error("configuration `{key}`: {message}")]
    Config {
        /// The `nann.bar.<field>` key.
        key: String,
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
    /// An input feature is out of range for the configuration.
    #[error("feature `{feature}`: {message}")]
    Feature {
        /// The feature's name.
        feature: &'static str,
        /// What is wrong and what range is accepted.
        message: String,
    },
}

impl From<ModelError> for crate::Error {
    fn from(e: ModelError) -> Self {
        crate::Error::Scorer {
            message: e.to_string(),
        }
    }
}
