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
#
# A second run does not compile again: when csrc/, setup.py, pyproject.toml, torch and the
# build switches (SPARSE_ATTENTION_CUDA, TORCH_CUDA_ARCH_LIST, CXX, nvcc, ...) are those of
# the last build, recorded in .venv/sparse_attention-build.stamp, and that build still
# imports from this checkout, only the Python dependencies of the chosen extra that are
# missing get installed. Otherwise pip builds the extension, keeping the object files in
# .venv/sparse_attention-build so that ninja recompiles only the sources that changed; pip's
# full output goes to .venv/sparse_attention-build.log.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

extra="train"
case "${1:-}" in
  "") ;;
  --test) extra="test" ;;
  *) echo "usage: bash scripts/bootstrap.sh [--test]" >&2; exit 2 ;;
esac

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv --system-site-packages .venv
fi
venv_python=$repo/.venv/bin/python
build_dir=$repo/.venv/sparse_attention-build
stamp=$repo/.venv/sparse_attention-build.stamp
log=$repo/.venv/sparse_attention-build.log

# An importable torch of 2.7 or newer is kept; otherwise the CPU build goes into the venv.
if ! "$venv_python" -c "import sys, torch; v = torch.__version__.split('+')[0].split('.'); sys.exit(tuple(map(int, v[:2])) < (2, 7))" 2>/dev/null; then
  "$venv_python" -m pip install "torch==2.13.0"
fi

# What the build depends on: "<digest> <torch version> <cpu|cuda>" (cuda: setup.py will
# also compile the CUDA kernels, as it decides by default).
build_inputs() {
  "$venv_python" - <<'PY'
import hashlib, os, shutil, sys, sysconfig
import torch

digest = hashlib.sha256()
def add(name, data: bytes):
    digest.update(name.encode() + b"\0" + data + b"\0")

files = ["setup.py", "pyproject.toml"]
for root, dirs, names in os.walk("csrc"):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    files += [os.path.join(root, name) for name in sorted(names)]
for path in files:
    with open(path, "rb") as f:
        add(path, f.read())
add("torch", f"{torch.__version__} cuda={torch.version.cuda} {torch.__file__}".encode())
add("python", f"{sys.version} {sysconfig.get_config_var('EXT_SUFFIX')}".encode())
for var in ("SPARSE_ATTENTION_CUDA", "SPARSE_ATTENTION_SANITIZE", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME",
            "CUDA_PATH", "CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS"):
    add(var, os.environ.get(var, "\0unset").encode())
nvcc = shutil.which("nvcc") or ""
if not nvcc and os.path.exists("/usr/local/cuda/bin/nvcc"):
    nvcc = "/usr/local/cuda/bin/nvcc"
add("nvcc", nvcc.encode())
switch = os.environ.get("SPARSE_ATTENTION_CUDA", "auto").lower()
cuda = torch.version.cuda is not None and bool(nvcc) and switch not in ("0", "false", "no", "off")
print(digest.hexdigest(), torch.__version__, "cuda" if cuda else "cpu")
PY
}

# "<sha256> <path>" of the extension that the venv imports, checked to be this checkout's
# (an editable install of it); fails otherwise.
installed_library() {
  (cd / && "$venv_python" - "$repo" <<'PY'
import hashlib, os, sys
import sparse_attention as sa

here = os.path.realpath(os.path.join(sys.argv[1], "sparse_attention"))
if os.path.realpath(os.path.dirname(sa.__file__)) != here:
    sys.exit(f"sparse_attention imports from {sa.__file__}, not from {here}")
with open(sa._C.__file__, "rb") as f:
    print(hashlib.sha256(f.read()).hexdigest(), sa._C.__file__)
PY
  )
}

# The requirements of sparse_attention[extra], from the installed metadata, that are missing
# or of a version outside their range; one a line.
missing_requirements() {
  "$venv_python" - "$extra" <<'PY'
import importlib.metadata as metadata, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

for line in metadata.requires("sparse_attention") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": sys.argv[1]}):
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        version = None
    if version is None or not req.specifier.contains(version, prereleases=True):
        req.marker = None
        print(req)
PY
}

build_info=$(build_inputs)
read -r inputs torch_version build_kind <<<"$build_info"
reuse=""
if [ -f "$stamp" ] && [ "$(sed -n 's/^inputs //p' "$stamp")" = "$inputs" ]; then
  if library=$(installed_library 2>/dev/null) && [ "$(sed -n 's/^library //p' "$stamp")" = "${library%% *}" ]; then
    reuse=1
  fi
fi

if [ -n "$reuse" ]; then
  echo "sparse_attention: extension up to date (csrc/, setup.py, pyproject.toml, torch $torch_version" \
       "and the build switches unchanged since it was built): not recompiled"
  missing_list=$(missing_requirements)
  if [ -n "$missing_list" ]; then
    mapfile -t missing <<<"$missing_list"
    echo "sparse_attention: installing what [$extra] needs: ${missing[*]}"
    "$venv_python" -m pip install "${missing[@]}"
  else
    echo "sparse_attention: the dependencies of [$extra] are installed"
  fi
else
  "$venv_python" -m pip install -q "setuptools>=64" wheel ninja
  # Object files built against another torch are not reused.
  if [ -f "$stamp" ] && [ "$(sed -n 's/^torch //p' "$stamp")" != "$torch_version" ]; then
    rm -rf "$build_dir"
  fi
  rm -f "$stamp"
  what="CPU kernels, each compiled three times: portable, AVX2 and AVX-512"
  estimate="about 1-3 minutes on 2 cores for a first build, seconds when little changed"
  if [ "$build_kind" = cuda ]; then
    what="$what; and the CUDA kernels with nvcc for sm_${TORCH_CUDA_ARCH_LIST:-8.0+PTX;9.0}"
    estimate="the CUDA kernels take much longer than the CPU ones: tens of minutes on few cores"
  fi
  echo "sparse_attention: building the C++ extension against torch $torch_version ($what;" \
       "$estimate; MAX_JOBS sets the parallel jobs). pip's output: $log"
  start=$(date +%s)
  # A line every 30 s while pip builds and installs (sleep holds no pipe that could outlive us).
  (while sleep 30 </dev/null >/dev/null 2>&1; do
     echo "  ... still building, $(( $(date +%s) - start ))s so far"
   done) &
  ticker=$!
  trap 'kill "$ticker" 2>/dev/null || true' EXIT
  # ninja prints "[n/total] <compiler command>" as each source is done; show the source.
  progress() {
    local line file
    while IFS= read -r line; do
      line=${line#"${line%%[![:space:]]*}"}  # pip -v indents the backend's output
      case $line in
        "["[0-9]*/[0-9]*"] "*" -c "*)
          file=${line##* -c }; file=${file%% *}; file=${file#"$repo/"}
          echo "  ${line%%]*}] $file ($(( $(date +%s) - start ))s)" ;;
        *" -shared "*) echo "  linking sparse_attention/_C ($(( $(date +%s) - start ))s)" ;;
        "Successfully installed"*|ERROR*|FAILED*) echo "  $line" ;;
      esac
    done
  }
  if ! SPARSE_ATTENTION_BUILD_DIR="$build_dir" "$venv_python" -m pip install -v --no-build-isolation \
       -e ".[$extra]" 2>&1 | tee "$log" | progress; then
    kill "$ticker" 2>/dev/null || true
    echo "sparse_attention: the build failed after $(( $(date +%s) - start ))s; the end of $log:" >&2
    tail -n 80 "$log" >&2
    exit 1
  fi
  kill "$ticker" 2>/dev/null || true
  echo "sparse_attention: built and installed in $(( $(date +%s) - start ))s"
  library=$(installed_library)
  printf 'inputs %s\nlibrary %s\ntorch %s\n' "$inputs" "${library%% *}" "$torch_version" >"$stamp"
fi

"$venv_python" - <<'PY'
import sys
import torch
import sparse_attention as sa

print("sparse_attention", sa.__version__, "ready: CPU kernels", sa.cpu_capability()
      + (" (CUDA build)" if sa.built_with_cuda() else ""))
if torch.cuda.is_available() and not sa.built_with_cuda():
    print("sparse_attention: a GPU is visible but this build has no CUDA kernels (a CPU build of "
          "torch, or nvcc not found); SPARSE_ATTENTION_CUDA=1 makes the build require them",
          file=sys.stderr)
PY
