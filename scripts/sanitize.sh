#!/usr/bin/env bash
# Builds the C++ extension with AddressSanitizer and UndefinedBehaviorSanitizer in a temporary
# copy of the tracked tree (the in-place build stays untouched) and runs a reduced test
# selection under it. Any out-of-bounds access, use-after-free or undefined behaviour in the
# extension aborts the run with a report.
#
#   bash scripts/sanitize.sh                 # default selection
#   bash scripts/sanitize.sh tests/test_x.py # other pytest arguments
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3); it needs torch,
# pytest and hypothesis. GCC or Clang with the sanitizer runtimes is required.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=$PWD/.venv/bin/python; else python=python3; fi
fi
cxx=${CXX:-c++}

# SANITIZE_WORKDIR keeps the copy and its build there (later runs rebuild only what changed).
if [ -n "${SANITIZE_WORKDIR:-}" ]; then
  work=$(mkdir -p "$SANITIZE_WORKDIR" && cd "$SANITIZE_WORKDIR" && pwd)
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/sparse_attention_sanitize.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work"
cd "$work"

echo "== building with -fsanitize=address,undefined in $work"
SPARSE_ATTENTION_SANITIZE=1 SPARSE_ATTENTION_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
  "$python" setup.py build_ext --inplace >build.log 2>&1 || { tail -50 build.log; exit 1; }

# Python itself is not instrumented, so the ASan runtime must be loaded first, and the C++
# runtime with it: ASan wraps __cxa_throw and must find the real one when it starts, or the
# first C++ exception aborts. Python and torch keep memory alive until exit on purpose: leak
# reports would be noise.
libasan=$("$cxx" -print-file-name=libasan.so)
libstdcxx=$("$cxx" -print-file-name=libstdc++.so)
for lib in "$libasan" "$libstdcxx"; do
  [ -f "$lib" ] || { echo "$lib not found" >&2; exit 1; }
done
export LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:print_summary=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# The copy's package, not an installed one, must be the one under test.
"$python" -c "import sparse_attention, sys; sys.exit(not sparse_attention.__file__.startswith('$work'))" || {
  echo "the sanitized build is not the one imported" >&2; exit 1; }

if [ "$#" -eq 0 ]; then
  # The kernels' own tests; the build-inspection, CLI and torch.compile tests add only time.
  set -- tests/test_correctness.py tests/test_edge_cases.py tests/test_errors.py \
    tests/test_layout.py tests/test_numerics.py tests/test_threads.py tests/test_fuzz.py \
    tests/test_tensor_layout.py tests/test_block_mass.py tests/test_score_terms.py \
    tests/test_decode_split.py
fi
echo "== running pytest $* under ASan + UBSan"
"$python" -m pytest -q -p no:cacheprovider "$@"
