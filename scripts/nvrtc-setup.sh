#!/usr/bin/env bash
# Installs NVIDIA's NVRTC (the CUDA run-time compiler, no GPU needed) from
# PyPI into a cache directory and prints the directory holding libnvrtc, for
#
#   export LD_LIBRARY_PATH=$(bash scripts/nvrtc-setup.sh):${LD_LIBRARY_PATH:-}
#
# so that cudarc (feature `cuda`) can compile kernels/*.cu to PTX on a
# machine without CUDA (CI: tests/cuda_compile.rs).
#
# Pinned: the GPU machine's driver 580 speaks CUDA 13.0; a newer NVRTC emits
# PTX (a newer ISA version) that driver may refuse to load.
#
# Idempotent: nothing is downloaded when the pinned version is already there.
# Everything but the printed directory goes to stderr.
#
# Options (environment):
#   NANN_NVRTC_DIR     cache directory (default: <repo>/target/nvrtc)
#   NANN_WITH_CUBLAS=1 also install cuBLAS (pinned to CUDA 13.0) into the same
#                      directory, for a GPU machine without the toolkit; the
#                      GPU scorer falls back to its own matmul kernel without it.
set -euo pipefail
NVRTC_VERSION=13.0.88
CUBLAS_VERSION=13.0.2.14
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${NANN_NVRTC_DIR:-$ROOT/target/nvrtc}"
LIB="$DIR/nvidia/cu13/lib"

install() { # package version marker
  local pkg=$1 version=$2 marker=$3
  if [ -f "$DIR/.$marker-$version" ] && [ -n "$(ls "$LIB"/lib"$marker"*.so* 2>/dev/null)" ]; then
    echo "nvrtc-setup: $pkg $version already in $DIR" >&2
    return
  fi
  echo "nvrtc-setup: installing $pkg==$version into $DIR" >&2
  mkdir -p "$DIR"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --retries 1 --timeout 20 --no-deps --upgrade \
    --target "$DIR" "$pkg==$version" >&2
  touch "$DIR/.$marker-$version"
}

install nvidia-cuda-nvrtc "$NVRTC_VERSION" nvrtc
if [ "${NANN_WITH_CUBLAS:-0}" = 1 ]; then
  install nvidia-cublas "$CUBLAS_VERSION" cublas
fi
if ! ls "$LIB"/libnvrtc.so* >/dev/null 2>&1; then
  echo "nvrtc-setup: no libnvrtc under $LIB after the install" >&2
  exit 1
fi
echo "$LIB"
