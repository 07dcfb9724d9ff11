"""Builds sparse_attention._C with torch.utils.cpp_extension.

A CUDAExtension when the installed torch was built with CUDA and nvcc is found (a GPU is not
needed to build), a CppExtension otherwise. Environment switches:
  SPARSE_ATTENTION_CUDA=0   build the CPU kernels only
  SPARSE_ATTENTION_CUDA=1   require the CUDA build (fail if torch or nvcc lack CUDA)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0+PTX;9.0"); 9.0 is built as 9.0a (sm_90a:
                            wgmma, setmaxnreg) when the Hopper kernels are built, which needs the
                            CuTe/CUTLASS headers of the pip package nvidia-cutlass (CUTLASS_PIN)
  MAX_JOBS                  parallel compile jobs (default: from cores and memory)
  SPARSE_ATTENTION_SANITIZE=1  build with AddressSanitizer and UndefinedBehaviorSanitizer
                            (for scripts/sanitize.sh; load with LD_PRELOAD of libasan)
  SPARSE_ATTENTION_BUILD_DIR   keep the object files and ninja's state in this folder, so that
                            a rebuild compiles only the sources that changed (pip's editable
                            and wheel builds otherwise use a new temporary folder each time;
                            scripts/bootstrap.sh sets it)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root (the folder whose lib64 holds libcudart), or None.

    torch guesses CUDA_HOME from nvcc's location, which on some installs is a bin folder
    of symlinks without the libraries; walk up from the real nvcc instead."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates += [os.path.dirname(os.path.dirname(real)), os.path.dirname(os.path.dirname(nvcc))]
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        has_nvcc = os.path.exists(os.path.join(root, "bin", "nvcc"))
        has_runtime = glob.glob(os.path.join(root, "lib*", "libcudart.so*")) or glob.glob(
            os.path.join(root, "targets", "*", "lib", "libcudart.so*")
        )
        if has_nvcc and has_runtime:
            return root
    return None


def want_cuda() -> bool:
    switch = os.environ.get("SPARSE_ATTENTION_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return False
    available = torch.version.cuda is not None and find_cuda_home() is not None
    if switch in ("1", "true", "yes", "on") and not available:
        raise RuntimeError(
            "SPARSE_ATTENTION_CUDA=1 but CUDA cannot be built: torch.version.cuda="
            f"{torch.version.cuda}, CUDA toolkit (nvcc + libcudart) found: {find_cuda_home()}"
        )
    return available


CUTLASS_PIN = "4.2.0.0"  # nvidia-cutlass, the headers the Hopper kernels are written against


def cutlass_include() -> str | None:
    """The include folder of the installed nvidia-cutlass (CuTe and CUTLASS headers), or None
    with a warning when it is missing or not the pinned version: the CUDA build then leaves
    out the Hopper kernels (csrc/cuda/hopper), which are opt-in at run time anyway."""
    from importlib import metadata

    try:
        version = metadata.version("nvidia-cutlass")
        import cutlass_library
    except (metadata.PackageNotFoundError, ImportError):
        version = None
    if version != CUTLASS_PIN:
        found = f"version {version}" if version else "not installed"
        print(f"sparse_attention: nvidia-cutlass=={CUTLASS_PIN} is needed for the Hopper kernels "
              f"({found}); building without them", file=sys.stderr)
        return None
    include = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return include if os.path.exists(os.path.join(include, "cute", "tensor.hpp")) else None


DEFAULT_CUDA_ARCHS = "8.0+PTX;9.0"


def hopper_arch_list(archs: str) -> str:
    """TORCH_CUDA_ARCH_LIST with 9.0 as 9.0a: the same GPUs (sm_90a code runs on compute
    capability 9.0 only, as sm_90 code does in practice), and wgmma/setmaxnreg assemble."""
    return ";".join("9.0a" if a == "9.0" else a for a in archs.replace(" ", ";").split(";") if a)


def default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return max(1, min(cores, int(mem_gb // 3)))  # nvcc needs up to ~3 GB a job


PORTABLE_KERNELS = "csrc/cpu/kernels_default.cpp"
ISA_KERNELS = ["csrc/cpu/kernels_x86_avx2.cpp", "csrc/cpu/kernels_x86_avx512.cpp"]


def sources(with_cuda: bool, with_hopper: bool = False) -> list[str]:
    files = [PORTABLE_KERNELS, "csrc/cpu/kernels_dispatch.cpp", "csrc/cpu/parallel.cpp",
             "csrc/cpu/attention_cpu.cpp", "csrc/block_lists.cpp", "csrc/input_checks.cpp",
             "csrc/packed_sequences.cpp", "csrc/score_terms.cpp",
             "csrc/ops.cpp",
             "csrc/module.cpp", *ISA_KERNELS]
    # setuptools compiles and links sources in sorted order. The portable kernels must link
    # before the AVX2/AVX-512 ones: an inline function (from c10 or the standard library)
    # that both emit then resolves to its portable copy, never to one with AVX instructions
    # that a portable caller could run on an older processor. tests/test_build.py checks it.
    ordered = sorted(files)
    assert all(ordered.index(PORTABLE_KERNELS) < ordered.index(isa) for isa in ISA_KERNELS)
    if with_cuda:
        for pattern in ("csrc/cuda/**/*.cu", "csrc/cuda/**/*.cpp"):
            files += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))
        if not with_hopper:
            files = [f for f in files if not (f.startswith(os.path.join("csrc", "cuda", "hopper")) and f.endswith(".cu"))]
    return files


def sanitizer_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags of the SPARSE_ATTENTION_SANITIZE=1 build: ASan + UBSan, -O1 so
    reports point at the right lines; the last -O on the command line wins."""
    if os.environ.get("SPARSE_ATTENTION_SANITIZE", "0") != "1":
        return [], []
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    return flags, ["-fsanitize=address,undefined"]


def openmp_flags() -> list[str]:
    """at::parallel_for is inline OpenMP code in ATen's headers when torch uses the OpenMP
    backend: compiled without -fopenmp it runs every task on the calling thread."""
    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


def private_static_libraries() -> list[str]:
    """Keeps code that the linker takes from static archives out of the extension's exported
    symbols. Some toolchains link libstdc++ statically; Python links extensions with
    -Bsymbolic-functions, so the extension's functions then bind to its own copy while its
    data references bind to the process's libstdc++, and formatting a number in an error
    message crashed. Hidden, the copy is whole and private."""
    return ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []


def extension():
    with_cuda = want_cuda()
    sanitize_compile, sanitize_link = sanitizer_flags()
    link = openmp_flags() + private_static_libraries() + sanitize_link
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    # The vector headers of ATen use CUDA-style unroll pragmas and AVX types GCC warns about.
    cxx = ["-O3", "-fno-math-errno", "-Wno-unknown-pragmas", "-Wno-psabi", "-Wno-maybe-uninitialized"]
    cxx += openmp_flags() + sanitize_compile
    if not with_cuda:
        return cpp_extension.CppExtension("sparse_attention._C", sources(False), extra_compile_args={"cxx": cxx},
                                          extra_link_args=link)
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    # sm_80 cubins run on 8.0, 8.6, 8.7 and 8.9 GPUs, sm_90a ones on 9.0; the sm_80 PTX is
    # compiled by the driver for newer GPUs (10.0, 12.0), which have no cubin of their own.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc = ["-O3", "--use_fast_math", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    macros = [("SPARSE_ATTENTION_WITH_CUDA", None)]
    include_dirs = []
    cutlass = cutlass_include()
    if cutlass:
        os.environ["TORCH_CUDA_ARCH_LIST"] = hopper_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
        include_dirs.append(cutlass)
    with_hopper = cutlass is not None and "9.0a" in os.environ["TORCH_CUDA_ARCH_LIST"].split(";")
    if with_hopper:
        macros.append(("SPARSE_ATTENTION_SM90A", None))
    return cpp_extension.CUDAExtension(
        "sparse_attention._C",
        sources(True, with_hopper),
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext (ninja), its temporary folder replaced by SPARSE_ATTENTION_BUILD_DIR
    when that is set: ninja then recompiles only what changed since the last build there."""

    def finalize_options(self):
        super().finalize_options()
        build_dir = os.environ.get("SPARSE_ATTENTION_BUILD_DIR")
        if build_dir:
            self.build_temp = os.path.abspath(build_dir)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
