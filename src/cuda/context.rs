//! The device: its CUDA context, the compiled kernels, and the per-process
//! caches that make both happen once.
//!
//! ```text
//!  GpuDevice::get(ordinal)            (OnceLock<Mutex<map>>: once per process and ordinal)
//!    ├─ libcuda present? ── no ──► CudaError::NoDevice     (cudarc would panic)
//!    ├─ CudaContext (primary context; cudarc's event tracking off: every
//!    │               buffer is used on one stream, see memory.rs)
//!    ├─ PTX for compute_XY (OnceLock<Mutex<map>>: once per process and arch)
//!    │    NANN_CUDA_PTX_DIR set ──► <dir>/<file>.ptx (source hash checked)
//!    │    else NVRTC present?  ── no ──► CudaError::NoNvrtc
//!    │                         └─ yes ─► kernels::compile_all_ptx
//!    ├─ modules loaded (the driver JITs PTX to SASS), functions by name
//!    └─ cuBLAS present? (optional: the matmul kernel is the fallback)
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;

use super::error::CudaError;
use super::kernels::{self, KERNELS};

/// Environment variable naming a directory of precompiled PTX
/// (`<stem>.ptx` per kernel file, written by `write_ptx_dir`), used
/// instead of NVRTC: for a GPU machine without the NVRTC library.
pub const PTX_DIR_ENV: &str = "NANN_CUDA_PTX_DIR";

/// Whether the CUDA driver library can be loaded (checked without letting
/// cudarc panic).
pub fn driver_available() -> bool {
    // SAFETY: loading libcuda runs its initialisers only; it is the NVIDIA
    // driver library this backend exists to use, and the probe calls
    // nothing in it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLAS can be loaded.
pub fn cublas_available() -> bool {
    // SAFETY: as for `driver_available`, for NVIDIA's cuBLAS library.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// The CUDA version this build's bindings are for (cudarc feature
/// `cuda-13000`): an older driver lacks entry points they may call, and
/// cudarc panics on a missing one, so such a driver is refused up front.
pub const MIN_DRIVER_CUDA_VERSION: i32 = 13000;

/// The driver's CUDA version (e.g. 13000 for 13.0), [`CudaError::NoDevice`]
/// without a driver.
pub fn driver_version() -> Result<i32, CudaError> {
    if !driver_available() {
        return Err(CudaError::NoDevice(
            "the CUDA driver library (libcuda) could not be loaded".into(),
        ));
    }
    let mut version = 0;
    // SAFETY: libcuda is loadable (checked above) and cuDriverGetVersion
    // only writes one int through the valid pointer it is given; it needs
    // no prior cuInit.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }.result()?;
    Ok(version)
}

/// Number of CUDA devices; [`CudaError::NoDevice`] without a driver, or
/// with one older than [`MIN_DRIVER_CUDA_VERSION`].
pub fn device_count() -> Result<usize, CudaError> {
    let version = driver_version()?;
    if version < MIN_DRIVER_CUDA_VERSION {
        return Err(CudaError::NoDevice(format!(
            "the driver supports CUDA {}.{}; this build needs {}.{} (driver 580 or newer)",
            version / 1000,
            version % 1000 / 10,
            MIN_DRIVER_CUDA_VERSION / 1000,
            MIN_DRIVER_CUDA_VERSION % 1000 / 10
        )));
    }
    let n = CudaContext::device_count()?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// A 64-bit FNV-1a hash: stamps PTX files with the source they came from.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The first line of a PTX file written by [`write_ptx_dir`]: ties it to
/// the exact source (common header included) and architecture.
fn ptx_stamp(kernel: &kernels::KernelSource, arch: &str) -> String {
    format!(
        "// nann kernel {} arch {arch} source {:016x}",
        kernel.file,
        fnv1a(&kernel.full_source())
    )
}

/// Compiles every kernel for `arch` and writes `<dir>/<stem>.ptx`, each
/// stamped with its source hash: the files `NANN_CUDA_PTX_DIR` reads on a
/// machine without NVRTC. Returns the paths written.
pub fn write_ptx_dir(dir: &Path, arch: &str) -> Result<Vec<PathBuf>, CudaError> {
    let io = |path: &Path, e: std::io::Error| CudaError::Ptx {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut written = Vec::new();
    for (kernel, (_, ptx)) in KERNELS.iter().zip(kernels::compile_all_ptx(arch)?) {
        let path = dir.join(format!("{}.ptx", kernel.stem()));
        let text = format!("{}\n{}", ptx_stamp(kernel, arch), kernels::ptx_text(&ptx));
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// Reads the PTX of every kernel from `dir`, checking each file's stamp
/// against the embedded source (a stale file is an error, not a silent
/// mismatch).
fn read_ptx_dir(dir: &Path, arch: &str) -> Result<Vec<(&'static str, Ptx)>, CudaError> {
    KERNELS
        .iter()
        .map(|kernel| {
            let path = dir.join(format!("{}.ptx", kernel.stem()));
            let err = |message: String| CudaError::Ptx {
                path: path.display().to_string(),
                message,
            };
            let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
            let stamp = ptx_stamp(kernel, arch);
            if text.lines().next() != Some(stamp.as_str()) {
                return Err(err(format!(
                    "stale or foreign PTX: expected the first line `{stamp}` (rebuild it from \
                     this source and for this architecture)"
                )));
            }
            if text.contains('\0') {
                return Err(err("holds a NUL byte".into()));
            }
            Ok((kernel.file, Ptx::from_src(text)))
        })
        .collect()
}

type PtxSet = Arc<Vec<(&'static str, Ptx)>>;

/// Every kernel's PTX for `arch`, compiled (or read) once per process.
fn ptx_for(arch: &str) -> Result<PtxSet, CudaError> {
    static CACHE: OnceLock<Mutex<HashMap<String, PtxSet>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(set) = cache.get(arch) {
        return Ok(Arc::clone(set));
    }
    let set = match std::env::var_os(PTX_DIR_ENV) {
        Some(dir) if !dir.is_empty() => read_ptx_dir(Path::new(&dir), arch)?,
        _ => kernels::compile_all_ptx(arch)?,
    };
    let set = Arc::new(set);
    cache.insert(arch.to_string(), Arc::clone(&set));
    Ok(set)
}

/// One CUDA device with every kernel of `kernels/` loaded. Obtained with
/// [`GpuDevice::get`], shared (`Arc`) by every scorer on that device.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    arch: String,
    functions: HashMap<&'static str, CudaFunction>,
    cublas: bool,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .field("cublas", &self.cublas)
            .finish_non_exhaustive()
    }
}

impl GpuDevice {
    /// Device `ordinal`, initialised once per process: context, kernels
    /// compiled for its compute capability and loaded. Errors rather than
    /// panics without a driver ([`CudaError::NoDevice`]) or without NVRTC
    /// and precompiled PTX ([`CudaError::NoNvrtc`]).
    pub fn get(ordinal: usize) -> Result<Arc<GpuDevice>, CudaError> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<GpuDevice>>>> = OnceLock::new();
        let mut devices = DEVICES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(d) = devices.get(&ordinal) {
            return Ok(Arc::clone(d));
        }
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        let device = Arc::new(Self::init(ordinal)?);
        devices.insert(ordinal, Arc::clone(&device));
        Ok(device)
    }

    fn init(ordinal: usize) -> Result<Self, CudaError> {
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: with event tracking off cudarc no longer orders uses of a
        // buffer across streams; this backend does not need it to: every
        // buffer is written on exactly one stream (its owner's), and
        // buffers read from other streams (weights, a request's user
        // state) are complete before any reader starts (uploaded, then
        // that stream synchronised). See memory.rs.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name()?;
        let compute_capability = ctx.compute_capability()?;
        let (major, minor) = compute_capability;
        let arch = format!("compute_{major}{minor}");
        let ptx = ptx_for(&arch)?;
        let mut functions = HashMap::new();
        for (kernel, (file, ptx)) in KERNELS.iter().zip(ptx.iter()) {
            debug_assert_eq!(kernel.file, *file);
            let module = ctx.load_module(ptx.clone())?;
            for &f in kernel.functions {
                let func = module
                    .load_function(f)
                    .map_err(|_| CudaError::MissingFunction(f.to_string()))?;
                functions.insert(f, func);
            }
        }
        Ok(Self {
            ctx,
            ordinal,
            name,
            compute_capability,
            arch,
            functions,
            cublas: cublas_available(),
        })
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name (e.g. "NVIDIA H200").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The NVRTC architecture the kernels were compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether cuBLAS could be loaded (otherwise the matmul kernel serves
    /// every linear layer).
    pub fn has_cublas(&self) -> bool {
        self.cublas
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A new stream on this device.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>, CudaError> {
        Ok(self.ctx.new_stream()?)
    }

    /// A loaded kernel by name.
    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(name)
            .ok_or_else(|| CudaError::MissingFunction(name.to_string()))
    }
}
