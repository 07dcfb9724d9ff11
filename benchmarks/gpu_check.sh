#!/usr/bin/env bash
# GPU check for a machine with one NVIDIA GPU (written for an H100; torch with CUDA, Triton,
# nvcc, ninja and pytest installed; no network needed). Stages, each with a time limit, in a
# budget of 8 minutes:
#   1. build the CUDA extension in place for this GPU's architecture only, with all cores;
#   2. tests/test_cuda.py (the CPU suite's cases on the GPU, against the fp64 reference) and
#      tests/test_cuda_models.py (the modules, models and transformers integration on the GPU)
#      and tests/test_cuda_packing.py (packed documents, both CUDA paths);
#      tests/test_cuda_hopper.py first on an sm_90 GPU (the opt-in Hopper forward);
#   3. compute-sanitizer memcheck, racecheck and synccheck on a small forward and backward;
#   4. benchmarks/bench_layouts.py --quick: per-input layouts (lists, select_blocks + ours
#      against SDPA), then benchmarks/bench_cuda.py: forward and backward against SDPA (flash,
#      dense causal) and compiled FlexAttention on the same block masks, as the budget allows.
# A failing stage is reported and the later stages still run, except that nothing runs after
# a failed build or import; the exit status is non-zero if any stage failed. Logs and the
# full benchmark results go to gpu_check_results/<time>/.
#
#   bash benchmarks/gpu_check.sh [python]      (default: python3 on PATH)
#
# GPU_CHECK_BUDGET_S sets the budget in seconds; GPU_CHECK_BENCH_ARGS passes arguments to
# bench_cuda.py (e.g. "--seq-lens 16384 --head-dims 128 --layouts dense fixed").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for benchmarks/*.py
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}   # leaves a margin inside 8 minutes
START=$(date +%s)
OUT=gpu_check_results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
SUMMARY=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

# stage NAME LIMIT_S LOG COMMAND...: runs COMMAND under `timeout`, logs to LOG and the screen.
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local left=$(( BUDGET_S - $(elapsed) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    SUMMARY+=("$name: SKIPPED (out of time)"); FAILED=1; return
  fi
  echo "=== $name (limit ${limit}s, log $log)"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    SUMMARY+=("$name: ok (${took}s)")
  else
    (( rc == 124 )) && SUMMARY+=("$name: TIMED OUT after ${took}s") || SUMMARY+=("$name: FAILED rc=$rc (${took}s)")
    FAILED=1
  fi
}

finish() {
  echo "=== summary ($(elapsed)s, results in $OUT)"
  printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
  exit $FAILED
}

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
if [[ -z "$ARCH" ]]; then
  echo "gpu_check: torch sees no GPU ($PY)"; exit 1
fi
echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1); arch $ARCH"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
nvcc --version | tail -1

stage build 240 "$OUT/build.log" env SPARSE_ATTENTION_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
  MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
stage import 30 "$OUT/import.log" "$PY" -c \
  "import sparse_attention as sa; assert sa.built_with_cuda(), 'not a CUDA build'; print('CUDA build imported')"
if (( FAILED )); then  # nothing later can run without the extension
  SUMMARY+=("later stages: SKIPPED (no CUDA build to run)")
  finish
fi
# The opt-in Hopper forward first (sm_90 only; it needs nvidia-cutlass at build time, else the
# build leaves it out and these tests fail): that it runs when asked, then against the fp64
# reference and the mma.sync kernels. -x: the first failure stops it, a hang hits the limit.
if [[ "$ARCH" == "9.0" ]]; then
  "$PY" -c "import cutlass_library" 2>/dev/null || echo "gpu_check: nvidia-cutlass missing: the build has no Hopper kernels"
  stage hopper 90 "$OUT/hopper.log" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_hopper.py
fi
stage tests 150 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_models.py tests/test_cuda_packing.py

SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
# No caching allocator under memcheck, so that reads past a tensor's end are caught.
stage memcheck 90 "$OUT/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all "$PY" benchmarks/sanitizer_case.py
if [[ "$ARCH" == "9.0" ]]; then  # the Hopper forward on a padded and a packed case
  stage hopper-memcheck 90 "$OUT/hopper_memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all "$PY" -m pytest -q -x \
    -p no:cacheprovider tests/test_cuda_hopper.py -k "test_against_reference and padding or test_packed_documents"
fi
for tool in racecheck synccheck; do
  stage "$tool" 90 "$OUT/$tool.log" \
    "$SANITIZER" --tool "$tool" --error-exitcode 1 --target-processes all "$PY" benchmarks/sanitizer_case.py
done

# Per-input layouts on the device: lists built with tensor ops, select_blocks + attention
# against SDPA (small sizes: the budget belongs to the main benchmark).
stage layouts 60 "$OUT/layouts.log" "$PY" benchmarks/bench_layouts.py --device cuda --quick \
  --no-flex --out "$OUT/layouts"

# The benchmark stops starting configurations 25 s before its stage limit.
BENCH_LIMIT=$(( BUDGET_S - $(elapsed) - 5 ))
stage benchmark "$BENCH_LIMIT" "$OUT/bench_table.txt" "$PY" benchmarks/bench_cuda.py \
  --out "$OUT/bench_results.jsonl" --budget-s $(( BENCH_LIMIT > 60 ? BENCH_LIMIT - 45 : 15 )) \
  ${GPU_CHECK_BENCH_ARGS:-}

finish
