#!/usr/bin/env bash
# Sets up .venv in the repository and installs sparse_attention into it.
#
#   bash scripts/bootstrap.sh          # the library and its command line
#   bash scripts/bootstrap.sh --test   # also what the test suite needs
#
# The venv sees packages installed system-wide, so a torch you already have is kept; only
# when no torch can be imported is the CPU build (torch 2.13.0) installed. The extension is
# compiled against that torch, so pip must not build it in an isolated environment.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
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

if ! "$venv_python" -c "import torch" 2>/dev/null; then
  "$venv_python" -m pip install "torch==2.13.0"
fi
"$venv_python" -m pip install --upgrade "setuptools>=64" wheel ninja
"$venv_python" -m pip install --no-build-isolation -e ".${extras}"
"$venv_python" -c "import sparse_attention as sa; print('sparse_attention', sa.__version__, 'ready: CPU kernels', sa.cpu_capability() + (', CUDA kernels' if sa.built_with_cuda() else ''))"
