//! The weights file of the trajectory models (TAR and DT): a safetensors
//! file of named F32 tensors with the model's configuration in its
//! metadata, read with every check a hostile file needs and written
//! atomically. One implementation for both models.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Writes `bytes` to `path` atomically: into a temporary file in the same
/// directory, flushed to disk, then renamed over `path`, so a reader (or a
/// crash) sees the old file or the new one, never a torn one.
pub(crate) fn save_atomic(path: &Path, bytes: &[u8]) -> Result<(), TarError> {
    // Only uniqueness matters (no other memory is published through it).
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .ok_or_else(|| TarError::Io {
            path: path.display().to_string(),
            message: "not a file path".into(),
        })?
        .to_string_lossy();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = dir.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, path)?;
        // Make the rename itself durable (best effort: not every platform
        // can open a directory).
        #[cfg(unix)]
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io_error(path, &e)
    })
}
