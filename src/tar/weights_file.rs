//! The weights file of the trajectory models (TAR and DT): a safetensors
//! file of named F32 tensors with the model's configuration in its
//! metadata, read with every check a hostile file needs and written
//! atomically. One implementation for both models.

use std::collections::HashMap;
use std::path::Path;

use super::model::TarError;

/// The typed error of an I/O failure on `path`.
pub(crate) fn io_error(path: &Path, e: &std::io::Error) -> TarError {
    TarError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A parsed safetensors header over the file's bytes.
pub(crate) struct TensorFile<'a> {
    header: safetensors::tensor::Metadata,
    metadata: HashMap<String, String>,
    body: &'a [u8],
}

impl<'a> TensorFile<'a> {
    /// Parses the header of `bytes`; [`TarError::Format`] when they are not
    /// a well-formed safetensors file. Never panics.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, TarError> {
        let (header_len, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| TarError::Format(e.to_string()))?;
        let body = header_len
            .checked_add(8)
            .and_then(|start| bytes.get(start..))
            .ok_or_else(|| TarError::Format("the header runs past the end".into()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        Ok(Self {
            header,
            metadata,
            body,
        })
    }

    /// The file's metadata (the model's configuration).
    pub(crate) fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The data of every tensor of `specs`, in order: each must be present
    /// ([`TarError::MissingTensor`]), F32 ([`TarError::DType`]), of the
    /// stated shape ([`TarError::Shape`]) and backed by the file's bytes
    /// ([`TarError::Format`]). Allocates only for tensors the bytes back.
    pub(crate) fn read(&self, specs: &[(String, Vec<usize>)]) -> Result<Vec<Vec<f32>>, TarError> {
        let mut out = Vec::with_capacity(specs.len());
        for (name, expected) in specs {
            let info = self
                .header
                .info(name)
                .ok_or_else(|| TarError::MissingTensor { name: name.clone() })?;
            if info.dtype != safetensors::Dtype::F32 {
                return Err(TarError::DType {
                    name: name.clone(),
                    dtype: format!("{:?}", info.dtype),
                });
            }
            if &info.shape != expected {
                return Err(TarError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: info.shape.clone(),
                });
            }
            let (start, end) = info.data_offsets;
            let data = self.body.get(start..end).ok_or_else(|| {
                TarError::Format(format!("tensor `{name}`'s data lies outside the file"))
            })?;
            let len: usize = expected.iter().product();
            if Some(data.len()) != len.checked_mul(4) {
                return Err(TarError::Shape {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: vec![data.len() / 4],
                });
            }
            // Little-endian, possibly unaligned: decode element by element.
            out.push(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            );
        }
        Ok(out)
    }
}

/// Reads the file at `path`.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, TarError> {
    std::fs::read(path).map_err(|e| io_error(path, &e))
}

/// A safetensors file of `tensors` (F32, little-endian) with `metadata`.
pub(crate) fn to_bytes(
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, TarError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), data) in tensors.iter().zip(&bytes) {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map_err(|e| TarError::Format(e.to_string()))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize(views, Some(metadata)).map_err(|e| TarError::Format(e.to_string()))
}

/// Writes `bytes` to `path` atomically with the index's own atomic write
/// (temporary file, fsync, rename, fsync of the directory), so a reader (or
/// a crash) sees the old file or the new one, never a torn one.
pub(crate) fn save_atomic(path: &Path, bytes: &[u8]) -> Result<(), TarError> {
    crate::persist::io::write_atomically(&crate::persist::FsStorage, path, &[bytes]).map_err(|e| {
        TarError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    })
}
