//! Every kernel in `kernels/` compiles to PTX for the GPU machine's
//! architecture (compute_90, H200) with NVRTC, without a GPU: the CI check
//! of the CUDA backend.
//!
//! Without NVRTC (libnvrtc not loadable) the tests print a note and pass,
//! unless `NANN_REQUIRE_NVRTC=1` (CI sets it, after
//! `scripts/nvrtc-setup.sh`), where they fail: CI must not skip them.
//!
//! `NANN_PTX_OUT=DIR` also writes the PTX files (stamped with their source
//! hash) for a GPU machine without NVRTC (`NANN_CUDA_PTX_DIR=DIR`).

#![cfg(feature = "cuda")]

use nann::cuda::{self, CudaError, CI_ARCH, KERNELS};

/// Whether the test must run (NVRTC present), or may skip.
fn nvrtc_or_skip(test: &str) -> bool {
    if cuda::nvrtc_available() {
        return true;
    }
    let required = std::env::var("NANN_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: NANN_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded; run \
         `export LD_LIBRARY_PATH=$(bash scripts/nvrtc-setup.sh):$LD_LIBRARY_PATH`"
    );
    eprintln!(
        "{test}: SKIPPED: libnvrtc cannot be loaded (set NANN_REQUIRE_NVRTC=1 to make this a \
         failure; scripts/nvrtc-setup.sh installs it)"
    );
    false
}

#[test]
fn every_kernel_compiles_to_ptx_for_sm90() {
    if !nvrtc_or_skip("every_kernel_compiles_to_ptx_for_sm90") {
        return;
    }
    // Every .cu file in kernels/ is embedded (none forgotten in KERNELS).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = KERNELS.iter().map(|k| k.file.to_string()).collect();
    embedded.sort();
    assert_eq!(on_disk, embedded, "kernels/*.cu vs nann::cuda::KERNELS");
    for k in KERNELS {
        let on_disk = std::fs::read_to_string(dir.join(k.file)).unwrap();
        assert_eq!(on_disk, k.source, "{} embedded text is stale", k.file);
    }

    let mut failures = Vec::new();
    for kernel in KERNELS {
        match cuda::compile_ptx(kernel, CI_ARCH) {
            Ok(ptx) => {
                let text = cuda::kernels::ptx_text(&ptx);
                assert!(
                    text.contains(".target sm_90"),
                    "{}: {text:.200}",
                    kernel.file
                );
                for f in kernel.functions {
                    assert!(
                        text.contains(&format!(".entry {f}(")),
                        "{}: no entry point {f} in the PTX",
                        kernel.file
                    );
                }
                eprintln!(
                    "{:<16} {:>7} bytes of PTX, {} kernels",
                    kernel.file,
                    text.len(),
                    kernel.functions.len()
                );
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    if let Some(out) = std::env::var_os("NANN_PTX_OUT") {
        let written = cuda::write_ptx_dir(std::path::Path::new(&out), CI_ARCH).unwrap();
        eprintln!(
            "wrote {} PTX files to {}",
            written.len(),
            out.to_string_lossy()
        );
    }
}

#[test]
fn compile_errors_name_the_kernel_file_and_line() {
    if !nvrtc_or_skip("compile_errors_name_the_kernel_file_and_line") {
        return;
    }
    let broken = cuda::KernelSource {
        file: "broken.cu",
        source:
            "extern \"C\" __global__ void nann_broken(float* x) {\n  x[0] = undefined_name;\n}\n",
        functions: &["nann_broken"],
    };
    match cuda::compile_ptx(&broken, CI_ARCH) {
        Err(CudaError::Compile { kernel, log }) => {
            assert_eq!(kernel, "broken.cu");
            assert!(log.contains("broken.cu(2)"), "{log}");
            assert!(log.contains("undefined_name"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    // A bad architecture name never reaches the compiler.
    assert!(matches!(
        cuda::compile_ptx(&KERNELS[0], "compute_90 --bogus"),
        Err(CudaError::Invalid(_))
    ));
}

#[test]
fn without_a_device_entry_points_error_instead_of_panicking() {
    // On a machine without libcuda (CI), asking for a device is a typed
    // error; with one, it succeeds or reports its own failure. Never a
    // panic either way.
    if cuda::driver_available() {
        eprintln!("libcuda present: device path exercised by tests/cuda_parity.rs");
        return;
    }
    assert!(matches!(cuda::device_count(), Err(CudaError::NoDevice(_))));
    assert!(matches!(
        cuda::GpuDevice::get(0),
        Err(CudaError::NoDevice(_))
    ));
}
