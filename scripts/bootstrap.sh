#!/usr/bin/env bash
# Sets up .venv in the repository and installs sparse_attention into it.
#
#   bash scripts/bootstrap.sh          # the library, its command line, training and plots
#   bash scripts/bootstrap.sh --test   # also what the test suite needs
#
# The venv sees packages installed system-wide, so a torch you already have (2.7 or newer)
# is kept; only when none can be imported is the CPU build (torch 2.13.0) installed. The
# extension is compiled against that torch, so pip must not build it in an isolated
# environment.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[train]"
case "${1:-}" in
  "") ;;
  --test) extras="[test]" ;;
  *) echo "usage: bash scripts/bootstrap.sh [--test]" >&2; exit 2 ;;
esac

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv --system-site-packages .venv
fi
venv_python=.venv/bin/python

# An importable torch of 2.7 or newer is kept; otherwise the CPU build goes into the venv.
if ! "$venv_python" -c "import sys, torch; v = torch.__version__.split('+')[0].split('.'); sys.exit(tuple(map(int, v[:2])) < (2, 7))" 2>/dev/null; then
  "$venv_python" -m pip install "torch==2.13.0"
fi
"$venv_python" -m pip install --upgrade "setuptools>=64" wheel ninja
"$venv_python" -m pip install --no-build-isolation -e ".${extras}"
"$venv_python" -c "import sparse_attention as sa; print('sparse_attention', sa.__version__, 'ready: CPU kernels', sa.cpu_capability() + (' (CUDA build)' if sa.built_with_cuda() else ''))"
