//! Device buffers and bounds-checked matrix views of them: what makes each
//! kernel launch's `unsafe` arguable.
//!
//! ```text
//!  DevBuf<T>  one allocation (cudarc CudaSlice) + its raw device address
//!    │ .mat(offset, rows, cols, ld)  checks offset + (rows-1) ld + cols <= len
//!    ▼
//!  Mat<'a>    (address, rows, cols, ld) borrowed from the DevBuf: it cannot
//!             outlive the allocation, and every element it names is inside it
//! ```
//!
//! Stream discipline (cudarc's own event tracking is off, see context.rs):
//! a buffer is written only on the stream of its owner (a workspace, or
//! the upload of weights / a user state, which synchronises before the
//! buffer is shared), so no two streams ever race on one; and every scoring
//! call synchronises its stream before returning, so nothing a call
//! launched still runs when a buffer it read may be freed.
//!
//! Device memory is not Rust memory: a kernel writing through a `Mat`
//! borrowed immutably creates no Rust reference to it, so shared borrows
//! here only tie lifetimes; exclusivity comes from the discipline above.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use super::error::CudaError;

/// One device allocation of `len` elements of `T`.
#[derive(Debug)]
pub struct DevBuf<T> {
    slice: CudaSlice<T>,
    ptr: u64,
}

impl<T: DeviceRepr + ValidAsZeroBits> DevBuf<T> {
    /// `len` zeroed elements on `stream` (at least one: a zero-length
    /// allocation has no address to hand a kernel).
    pub fn zeros(stream: &Arc<CudaStream>, len: usize) -> Result<Self, CudaError> {
        let slice = stream.alloc_zeros::<T>(len.max(1))?;
        let ptr = {
            let (ptr, _record) = slice.device_ptr(stream);
            ptr
        };
        Ok(Self { slice, ptr })
    }

    /// A copy of `data` on `stream` (not yet synchronised).
    pub fn from_host(stream: &Arc<CudaStream>, data: &[T]) -> Result<Self, CudaError> {
        let buf = Self::zeros(stream, data.len())?;
        buf.upload(stream, 0, data)?;
        Ok(buf)
    }
}

impl<T> DevBuf<T> {
    /// Elements in the allocation.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// Whether the allocation holds no element (never: at least one is
    /// allocated, see [`zeros`](Self::zeros)).
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    /// The device address of element `offset` (checked `<= len`).
    pub fn addr(&self, offset: usize) -> Result<u64, CudaError> {
        if offset > self.len() {
            return Err(CudaError::shape(
                "address",
                format!("offset {offset} past {} elements", self.len()),
            ));
        }
        Ok(self.ptr + (offset * std::mem::size_of::<T>()) as u64)
    }

    /// Copies `data` into elements `offset..offset + data.len()` (checked),
    /// ordered on `stream`. The host slice may be reused as soon as this
    /// returns (the driver stages pageable memory before returning).
    pub fn upload(
        &self,
        stream: &Arc<CudaStream>,
        offset: usize,
        data: &[T],
    ) -> Result<(), CudaError> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len())
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                CudaError::shape(
                    "upload",
                    format!("{} elements at {offset} into {}", data.len(), self.len()),
                )
            })?;
        debug_assert!(end <= self.len());
        let dst = self.addr(offset)?;
        // SAFETY: `dst .. dst + size_of_val(data)` lies inside this
        // allocation (checked above); the source is a live host slice the
        // driver reads (for pageable memory, stages) before this returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, data, stream.cu_stream()) }?;
        Ok(())
    }

    /// Copies elements `offset..offset + out.len()` (checked) into `out`
    /// and waits for the copy (`stream` synchronised).
    pub fn download(
        &self,
        stream: &Arc<CudaStream>,
        offset: usize,
        out: &mut [T],
    ) -> Result<(), CudaError> {
        if out.is_empty() {
            return Ok(());
        }
        offset
            .checked_add(out.len())
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                CudaError::shape(
                    "download",
                    format!("{} elements at {offset} from {}", out.len(), self.len()),
                )
            })?;
        let src = self.addr(offset)?;
        // SAFETY: the source range lies inside this allocation (checked);
        // `out` is exclusively borrowed until the stream is synchronised
        // below, so the asynchronous write into it completes before anyone
        // can read it or free it.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, src, stream.cu_stream()) }?;
        stream.synchronize()?;
        Ok(())
    }

    /// A `rows x cols` matrix view with leading dimension `ld` starting at
    /// element `offset`; every element it names is inside the allocation.
    pub fn mat(
        &self,
        offset: usize,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<Mat<'_, T>, CudaError> {
        let fits = cols <= ld
            && match rows.checked_sub(1) {
                None => offset <= self.len(),
                Some(last) => last
                    .checked_mul(ld)
                    .and_then(|v| v.checked_add(offset))
                    .and_then(|v| v.checked_add(cols))
                    .is_some_and(|end| end <= self.len()),
            };
        if !fits || i32::try_from(ld).is_err() || i32::try_from(rows).is_err() {
            return Err(CudaError::shape(
                "matrix view",
                format!(
                    "{rows} x {cols} (ld {ld}) at {offset} does not fit {} elements",
                    self.len()
                ),
            ));
        }
        Ok(Mat {
            ptr: self.addr(offset)?,
            rows,
            cols,
            ld,
            _buf: PhantomData,
        })
    }

    /// The whole buffer as one row.
    pub fn row(&self) -> Result<Mat<'_, T>, CudaError> {
        self.mat(0, 1, self.len(), self.len())
    }
}

/// A bounds-checked `rows x cols` row-major view (leading dimension `ld`,
/// in elements of `T`) into a [`DevBuf<T>`] it borrows.
#[derive(Debug)]
pub struct Mat<'a, T = f32> {
    ptr: u64,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) ld: usize,
    _buf: PhantomData<&'a [T]>,
}

impl<T> Clone for Mat<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Mat<'_, T> {}

impl<'a, T> Mat<'a, T> {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The leading dimension (elements between rows).
    pub fn ld(&self) -> usize {
        self.ld
    }

    /// Device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The sub-view of rows `..rows` and columns `col..col + cols`
    /// (checked against this view).
    pub fn sub(&self, rows: usize, col: usize, cols: usize) -> Result<Mat<'a, T>, CudaError> {
        if rows > self.rows || col.checked_add(cols).is_none_or(|e| e > self.cols) {
            return Err(CudaError::shape(
                "matrix sub-view",
                format!(
                    "{rows} x {col}..{col}+{cols} of a {} x {} view",
                    self.rows, self.cols
                ),
            ));
        }
        Ok(Mat {
            ptr: self.ptr + (col * std::mem::size_of::<T>()) as u64,
            rows,
            cols,
            ..*self
        })
    }

    /// The sub-view of rows `start..start + rows`, all columns (checked).
    pub fn rows(&self, start: usize, rows: usize) -> Result<Mat<'a, T>, CudaError> {
        if start.checked_add(rows).is_none_or(|e| e > self.rows) {
            return Err(CudaError::shape(
                "matrix row range",
                format!("rows {start}..{start}+{rows} of {}", self.rows),
            ));
        }
        Ok(Mat {
            ptr: self.ptr + (start * self.ld * std::mem::size_of::<T>()) as u64,
            rows,
            ..*self
        })
    }

    /// Whether the view is contiguous (`ld == cols`, or a single row).
    pub fn is_contiguous(&self) -> bool {
        self.ld == self.cols || self.rows <= 1
    }

    /// Requires exactly `rows x cols`.
    pub(crate) fn expect(
        &self,
        op: &'static str,
        what: &str,
        rows: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        if self.rows != rows || self.cols != cols {
            return Err(CudaError::shape(
                op,
                format!(
                    "{what} is {} x {}, expected {rows} x {cols}",
                    self.rows, self.cols
                ),
            ));
        }
        Ok(())
    }

    /// `ld` as a kernel `int` (fits: checked when the view was made).
    pub(crate) fn ld_i32(&self) -> i32 {
        self.ld as i32
    }
}
