#!/usr/bin/env bash
# Runs the #[ignore]d GPU parity tests (tests/cuda_parity.rs) on the CPU
# stand-in for libcuda / libcublas (tools/cuda-emu), with the pinned NVRTC
# compiling every kernel first. No GPU needed; see tools/cuda-emu/README.md
# for what this does and does not check.
#
#   bash scripts/cuda-emu-check.sh [TEST_NAME_FILTER ...]   (default: all of them, ~8 min
#                                                           on 2 cores; CI runs a subset)
set -euo pipefail
cd "$(dirname "$0")/.."
EMU=$(bash tools/cuda-emu/build.sh)
NVRTC=$(bash scripts/nvrtc-setup.sh)
export LD_LIBRARY_PATH="$EMU:$NVRTC:${LD_LIBRARY_PATH:-}"
export NANN_REQUIRE_NVRTC=1
cargo test --release --features cuda --test cuda_parity -- --ignored --test-threads 1 "$@"
