#!/usr/bin/env bash
# The GPU check of the CUDA backend (feature `cuda`, issue 6), for a machine
# with an NVIDIA GPU: builds, runs the #[ignore]d GPU tests (parity with the
# CPU reference: tests/cuda_parity.rs, BAR and TAR; plus
# tests/cuda_compile.rs), then the GPU benchmark (examples/gpu_bench.rs: BAR
# scoring and search, then `--tar`, the TAR model's decision latency at
# batch 1 beside the CPU: one generation, then the TarPolicy's decision with
# the shipped weights in weights/), and prints a short table last.
#
#   bash scripts/gpu-check.sh [--tests-only | --bench-only] [-- BENCH ARGS]
#       e.g. -- --ads 1000000 --queries 200     (the bench's defaults)
#            -- --quick                         (seconds; smoke only)
#
# For a GPU machine without cargo / crates.io / NVRTC (no network), build on
# a CPU machine first and carry the result:
#
#   bash scripts/gpu-check.sh --package DIR     (CPU machine: binaries + PTX into DIR)
#   bash scripts/gpu-check.sh --prebuilt DIR    (GPU machine: runs them)
#
# Kernels: NVRTC compiles them at run time. This script looks for it in this
# order: the pinned PyPI wheel (scripts/nvrtc-setup.sh; needs network the
# first time, then cached in target/nvrtc), a CUDA toolkit under
# /usr/local/cuda, and otherwise precompiled PTX (NANN_CUDA_PTX_DIR, or
# target/ptx, or DIR/ptx with --prebuilt). cuBLAS is optional: without it
# the crate's own matmul kernel serves (the bench says which).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=all
PREBUILT=""
PACKAGE=""
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tests-only) MODE=tests ;;
    --bench-only) MODE=bench ;;
    --prebuilt) PREBUILT=$(cd "$2" && pwd); shift ;;
    --package) PACKAGE=$2; shift ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

# ---- NVRTC (and cuBLAS) for the dynamic loader, or precompiled PTX.
setup_nvrtc() {
  if [ -n "${NANN_CUDA_PTX_DIR:-}" ]; then
    echo "gpu-check: kernels from precompiled PTX in $NANN_CUDA_PTX_DIR"
    return
  fi
  local lib
  if lib=$(NANN_WITH_CUBLAS=${NANN_WITH_CUBLAS:-1} bash scripts/nvrtc-setup.sh 2>"$LOG/nvrtc-setup.err"); then
    export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
    echo "gpu-check: NVRTC (pinned wheel) in $lib"
    return
  fi
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then
      export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
      echo "gpu-check: NVRTC from the CUDA toolkit in $d (not the pinned 13.0.88: a newer"
      echo "           NVRTC may emit PTX the driver refuses; the compile test will say)"
      return
    fi
  done
  for d in "${PREBUILT:+$PREBUILT/ptx}" "$ROOT/target/ptx"; do
    if [ -n "$d" ] && [ -f "$d/attention.ptx" ]; then
      export NANN_CUDA_PTX_DIR="$d"
      echo "gpu-check: no NVRTC; kernels from precompiled PTX in $d"
      return
    fi
  done
  echo "gpu-check: WARNING: no NVRTC and no precompiled PTX: the GPU tests will fail with NoNvrtc" >&2
  cat "$LOG/nvrtc-setup.err" >&2 || true
}

# ---- --package: build everything here (CPU machine) for a GPU machine.
if [ -n "$PACKAGE" ]; then
  set -e
  mkdir -p "$PACKAGE"
  lib=$(bash scripts/nvrtc-setup.sh)
  export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
  cargo build --release --features cuda --example gpu_bench
  cargo test --release --features cuda --test cuda_parity --test cuda_compile --no-run \
    --message-format=json > "$LOG/build.json"
  python3 - "$LOG/build.json" "$PACKAGE" <<'PY'
import json, shutil, sys
out = sys.argv[2]
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], f"{out}/{m['target']['name']}")
        print("packaged", m["target"]["name"])
PY
  # One binary for both benchmarks (BAR, and --tar: random TAR weights made
  # in the binary for one generation; the policy's decision loads the
  # shipped TAR and inverse-dynamics weights, carried in DIR/weights).
  cp "$CARGO_TARGET_DIR/release/examples/gpu_bench" "$PACKAGE/gpu_bench"
  mkdir -p "$PACKAGE/weights"
  cp weights/tar-small.safetensors weights/tar-inverse-small.safetensors "$PACKAGE/weights/"
  # Without debug info the three binaries fit a small carry (the release
  # profile keeps line tables).
  for b in cuda_compile cuda_parity gpu_bench; do strip --strip-debug "$PACKAGE/$b" 2>/dev/null || true; done
  NANN_REQUIRE_NVRTC=1 NANN_PTX_OUT="$PACKAGE/ptx" "$PACKAGE/cuda_compile" --exact every_kernel_compiles_to_ptx_for_sm90
  cp scripts/gpu-check.sh "$PACKAGE/"
  echo "gpu-check: packaged into $PACKAGE (carry it; run: bash $PACKAGE/gpu-check.sh --prebuilt $PACKAGE)"
  exit 0
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
setup_nvrtc

STATUS=0
if [ "$MODE" != bench ]; then
  echo "== GPU tests (tests/cuda_compile.rs, tests/cuda_parity.rs --include-ignored)"
  if [ -n "$PREBUILT" ]; then
    for t in cuda_compile cuda_parity; do
      "$PREBUILT/$t" --include-ignored --show-output 2>&1 | tee -a "$LOG/tests.txt"
      [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
    done
  else
    cargo test --release --features cuda --test cuda_compile --test cuda_parity -- --include-ignored \
      --show-output 2>&1 | tee "$LOG/tests.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
  fi
fi
if [ "$MODE" != tests ]; then
  echo "== GPU benchmark (examples/gpu_bench.rs ${BENCH_ARGS[*]:-})"
  if [ -n "$PREBUILT" ]; then
    "$PREBUILT/gpu_bench" "${BENCH_ARGS[@]}" 2>&1 | tee "$LOG/bench.txt"
  else
    cargo run --release --features cuda --example gpu_bench -- "${BENCH_ARGS[@]}" 2>&1 | tee "$LOG/bench.txt"
  fi
  [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
  TAR_ARGS=(--tar)
  for a in "${BENCH_ARGS[@]}"; do [ "$a" = --quick ] && TAR_ARGS+=(--quick); done
  # The policy's decision reads the shipped weights (carried by --package).
  [ -n "$PREBUILT" ] && TAR_ARGS+=(--weights "$PREBUILT/weights")
  echo "== TAR decision latency (examples/gpu_bench.rs ${TAR_ARGS[*]})"
  if [ -n "$PREBUILT" ]; then
    "$PREBUILT/gpu_bench" "${TAR_ARGS[@]}" 2>&1 | tee "$LOG/tar.txt"
  else
    cargo run --release --features cuda --example gpu_bench -- "${TAR_ARGS[@]}" 2>&1 | tee "$LOG/tar.txt"
  fi
  [ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1
fi

echo
echo "================ gpu-check summary ================"
if [ -f "$LOG/tests.txt" ]; then
  printf '%-62s %s\n' "test" "result"
  grep -E '^test [a-z0-9_:]+ \.\.\. (ok|FAILED|ignored)' "$LOG/tests.txt" |
    awk '{ printf "%-62s %s\n", $2, $4 }'
  grep -E 'worst error|identical result lists|TF32:|SKIPPED|documented mismatch' "$LOG/tests.txt" | sed 's/^/  /'
fi
if [ -f "$LOG/bench.txt" ]; then
  sed -n '/^== summary/,$p' "$LOG/bench.txt"
fi
if [ -f "$LOG/tar.txt" ]; then
  # One generation, then the policy's decision (`"what":"policy"` lines)
  # and how far its GPU bids are from the CPU's.
  echo
  sed -n '/^== TAR summary/,$p' "$LOG/tar.txt"
fi
[ $STATUS -eq 0 ] && echo "gpu-check: OK" || echo "gpu-check: FAILED"
exit $STATUS
