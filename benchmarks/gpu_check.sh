#!/usr/bin/env bash
# GPU check for a machine with one NVIDIA GPU (written for an H100; torch with CUDA, Triton,
# nvcc, ninja and pytest installed; no network needed). Stages, each with a time limit, in a
# budget of 8 minutes:
#   1. build the CUDA extension in place for this GPU's architecture only, with all cores;
#   2. on an sm_90 GPU first tests/test_cuda_hopper.py (the opt-in Hopper kernels: that they
#      run when asked, single tiles forward then backward, then against the fp64 reference and
#      the mma.sync kernels; -x stops at the first failure); then tests/test_cuda.py (the CPU
#      suite's cases on the GPU, against the fp64 reference), tests/test_cuda_models.py (the
#      modules, models and transformers integration on the GPU) and tests/test_cuda_packing.py
#      (packed documents, both CUDA paths); then tests/test_cuda.py again on the Hopper kernels
#      (SPARSE_ATTENTION_HOPPER_KERNELS=1) and on the FA2 tiling of the mma.sync forward
#      (SPARSE_ATTENTION_CUDA_FA2_TILING=1). Every test stage runs under its own time limit with
#      -v, so a hang is reported as a time-out and the log's last line names the case;
#   3. compute-sanitizer memcheck, racecheck and synccheck on a small forward and backward,
#      and memcheck and racecheck on the Hopper kernels;
#   4. benchmarks/bench_layouts.py --quick: per-input layouts (lists, select_blocks + ours
#      against SDPA), benchmarks/bench_decode.py: a decode step split across thread blocks or
#      not against SDPA and FlexDecoding, bench_cuda.py at head dim 96 and at blocks 16 and 64
#      against Flex, then benchmarks/bench_cuda.py: forward and backward
#      against SDPA (flash, dense causal) and compiled FlexAttention on the same block masks,
#      as the budget allows.
# A failing stage is reported and the later stages still run, except that nothing runs after
# a failed build or import; the exit status is non-zero if any stage failed. Logs and the
# full benchmark results go to gpu_check_results/<time>/.
#
#   bash benchmarks/gpu_check.sh [python]      (default: python3 on PATH)
#
# GPU_CHECK_BUDGET_S sets the budget in seconds; GPU_CHECK_BENCH_ARGS passes arguments to
# bench_cuda.py (e.g. "--seq-lens 16384 --head-dims 128 --layouts dense fixed"). The build
# keeps its objects in build/gpu_check, so a second run recompiles only what changed; with
# GPU_CHECK_PREBUILT=1 it uses the library already in sparse_attention/ (built elsewhere for
# this GPU and torch, and carried over) and skips the build.
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

if [[ "${GPU_CHECK_PREBUILT:-0}" == "1" ]]; then
  SUMMARY+=("build: SKIPPED (GPU_CHECK_PREBUILT=1: $(ls sparse_attention/_C*.so 2>/dev/null || echo 'no library'))")
else
  stage build 240 "$OUT/build.log" env SPARSE_ATTENTION_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
    SPARSE_ATTENTION_BUILD_DIR="$PWD/build/gpu_check" MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
fi
stage import 30 "$OUT/import.log" "$PY" -c \
  "import sparse_attention as sa; assert sa.built_with_cuda(), 'not a CUDA build'; print('CUDA build imported')"
if (( FAILED )); then  # nothing later can run without the extension
  SUMMARY+=("later stages: SKIPPED (no CUDA build to run)")
  finish
fi
# -v names each case as it starts; a case running past 60 s dumps every thread's stack.
PYTEST=("$PY" -m pytest -v -p no:cacheprovider -o faulthandler_timeout=60)
HOPPER_OK=0
# The opt-in Hopper kernels first (sm_90 only; they need nvidia-cutlass at build time, else the
# build leaves them out and these tests fail). -x: the first failure stops it.
if [[ "$ARCH" == "9.0" ]]; then
  "$PY" -c "import cutlass_library" 2>/dev/null || echo "gpu_check: nvidia-cutlass missing: the build has no Hopper kernels"
  stage hopper 150 "$OUT/hopper.log" "${PYTEST[@]}" -x tests/test_cuda_hopper.py
  # The later Hopper stages only after this one passed: a kernel that fails a single tile
  # may hang on the rest.
  [[ "${SUMMARY[-1]}" == "hopper: ok"* ]] && HOPPER_OK=1
fi
stage tests 150 "$OUT/tests.log" "${PYTEST[@]}" tests/test_cuda.py tests/test_cuda_models.py tests/test_cuda_packing.py
# The opt-in FA2 tiling of the mma.sync forward, on the same cases.
stage tests-fa2-tiling 100 "$OUT/tests_fa2.log" env SPARSE_ATTENTION_CUDA_FA2_TILING=1 \
  "${PYTEST[@]}" -x tests/test_cuda.py
if (( HOPPER_OK )); then
  stage tests-on-hopper-kernels 120 "$OUT/tests_hopper.log" env SPARSE_ATTENTION_HOPPER_KERNELS=1 \
    "${PYTEST[@]}" tests/test_cuda.py
fi

SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
# No caching allocator under memcheck, so that reads past a tensor's end are caught.
stage memcheck 90 "$OUT/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all "$PY" benchmarks/sanitizer_case.py
if (( HOPPER_OK )); then  # the Hopper kernels, forward and backward: single tiles, padding, packing
  HOPPER_CASES="test_one_tile or (test_against_reference and padding) or test_packed_documents"
  stage hopper-memcheck 90 "$OUT/hopper_memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all "$PY" -m pytest -q -x \
    -p no:cacheprovider tests/test_cuda_hopper.py -k "$HOPPER_CASES"
  stage hopper-racecheck 90 "$OUT/hopper_racecheck.log" \
    "$SANITIZER" --tool racecheck --error-exitcode 1 --target-processes all "$PY" -m pytest -q -x \
    -p no:cacheprovider tests/test_cuda_hopper.py -k "test_one_tile"
fi
for tool in racecheck synccheck; do
  stage "$tool" 90 "$OUT/$tool.log" \
    "$SANITIZER" --tool "$tool" --error-exitcode 1 --target-processes all "$PY" benchmarks/sanitizer_case.py
done

# Per-input layouts on the device: lists built with tensor ops, select_blocks + attention
# against SDPA (small sizes: the budget belongs to the main benchmark).
stage layouts 60 "$OUT/layouts.log" "$PY" benchmarks/bench_layouts.py --device cuda --quick \
  --no-flex --out "$OUT/layouts"

# One decode step over 8k to 128k keys (H=32, Hkv=8, D=128, bf16): ours with the opt-in split
# of long rows across thread blocks and without it, SDPA, and FlexDecoding.
stage decode 90 "$OUT/decode.log" "$PY" benchmarks/bench_decode.py --device cuda \
  --dtypes bfloat16 --repeats 20 --budget 3 --out "$OUT/decode"

# Reach: head dim 96 (run zero-padded at 128) and block-16 and block-64 layouts of the fixed
# pattern (block 16 runs on the gathered path), against Flex on the same masks.
stage reach-d96 60 "$OUT/reach_d96.txt" "$PY" benchmarks/bench_cuda.py --out "$OUT/reach_d96.jsonl" \
  --budget-s 20 --head-dims 96 --seq-lens 16384 --layouts fixed
for block in 16 64; do
  stage "reach-block$block" 60 "$OUT/reach_block$block.txt" "$PY" benchmarks/bench_cuda.py \
    --out "$OUT/reach_block$block.jsonl" --budget-s 20 --head-dims 64 --seq-lens 8192 \
    --layouts fixed --block "$block"
done

# The benchmark stops starting configurations 25 s before its stage limit.
BENCH_LIMIT=$(( BUDGET_S - $(elapsed) - 5 ))
BENCH_VARIANTS=(--fa2); (( HOPPER_OK )) && BENCH_VARIANTS+=(--hopper)  # the opt-in kernels beside the default
stage benchmark "$BENCH_LIMIT" "$OUT/bench_table.txt" "$PY" benchmarks/bench_cuda.py \
  --out "$OUT/bench_results.jsonl" --budget-s $(( BENCH_LIMIT > 60 ? BENCH_LIMIT - 45 : 15 )) \
  "${BENCH_VARIANTS[@]}" ${GPU_CHECK_BENCH_ARGS:-}

finish
