#!/usr/bin/env bash
# Builds the CPU stand-in for the CUDA driver and cuBLAS: a fake
# libcuda.so with every kernel of kernels/*.cu compiled as C++ (threads of a
# block run as ucontext fibers), and a fake libcublas.so (double-accumulated
# reference sgemm). Prints the directory to put first on LD_LIBRARY_PATH.
#
#   bash tools/cuda-emu/build.sh [OUT_DIR]      (default target/cuda-emu)
#
# SAN="-fsanitize=address,undefined" adds the sanitizers to the kernels.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
K=$ROOT/kernels
OUT=$(mkdir -p "${1:-$ROOT/target/cuda-emu}" && cd "${1:-$ROOT/target/cuda-emu}" && pwd)
SAN=${SAN:-}
mkdir -p "$OUT/gen" "$OUT/lib"
for f in "$K"/*.cu; do
  b=$(basename "$f" .cu)
  g=$OUT/gen/$b.cpp
  {
    echo "#include \"$HERE/cuda_emu.h\""
    cat "$K/common.cuh"
    echo "#line 1 \"$b.cu\""
    sed 's/extern __shared__ float smem\[\];/float* smem = (float*)emu::dyn_smem();/' "$f"
    # Register every extern "C" entry point under its PTX name.
    for fn in $(grep -oE 'nann_[a-z0-9_]+\(' "$f" | sed 's/($//' | sort -u); do
      if grep -B2 -E "^\s*$fn\(|void $fn\(" "$f" | grep -q 'extern "C"'; then
        echo "static emu::Reg reg_$fn(\"$fn\", emu::make($fn));"
      fi
    done
  } > "$g"
done
g++ -std=c++17 -O1 -g $SAN -fPIC -shared -Wno-unknown-pragmas -I"$HERE" -o "$OUT/lib/libcuda.so" \
  "$HERE/emu_runtime.cpp" "$HERE/fake_driver.cpp" "$OUT"/gen/*.cpp
g++ -std=c++17 -O1 -g $SAN -fPIC -shared -o "$OUT/lib/libcublas.so" "$HERE/fake_cublas.cpp"
echo "$OUT/lib"
