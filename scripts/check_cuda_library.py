"""Checks that a built sparse_attention._C holds the CUDA kernels: every kernel instantiation
(by its host launch stub, read with nm) and device code (cubins in the .nv_fatbin section, read
with readelf) for each architecture asked for. Works without a GPU and without cuobjdump.

With 9.0 asked for, also the Hopper forward (csrc/cuda/hopper): its instantiations, and in its
SASS (cuobjdump and nvdisasm, from the pip packages nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm or the toolkit) the instructions its design rests on: HGMMA (wgmma),
UTMALDG (TMA loads), SYNCS (mbarrier waits and arrivals), USETMAXREG (setmaxnreg), and no
local-memory traffic (LDL/STL: spills).

    python scripts/check_cuda_library.py LIBRARY 9.0 [8.0 ...]
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys

KERNELS = ("forward_kernel", "grad_kv_kernel", "grad_q_kernel", "delta_kernel")
FATBIN_MAGIC = 0xBA55ED50
ELF_KIND = 2


def expected_kernels() -> int:
    """Per (dtype, head dim) of the kernel table: forward, dK/dV and deterministic dQ for each
    block size, and delta."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cuda"))
    from generate_instantiations import load_table

    table = load_table()
    return len(table.CUDA_DTYPES) * len(table.CUDA_HEAD_DIMS) * (3 * len(table.CUDA_BLOCK_SIZES) + 1)


HOPPER_KERNEL = "sparse_attention::cuda::hopper::forward_sm90_kernel"
HOPPER_KERNELS = 4  # (fp16, bf16) x head dims (64, 128)
HOPPER_SASS = ("HGMMA", "UTMALDG", "SYNCS", "USETMAXREG")


def hopper_kernel_names(library: str) -> set[str]:
    symbols = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True,
                             text=True, check=True).stdout
    return {line.split(" ", 2)[-1] for line in symbols.splitlines()
            if HOPPER_KERNEL + "<" in line and "[clone" not in line}


def find_tool(name: str) -> str | None:
    """A CUDA binary tool from PATH, the toolkit, or a pip nvidia-cuda-* package."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/cuda/bin")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for candidate in sorted(pathlib.Path(root).glob(f"*/bin/{name}")):
            return str(candidate)
    return None


def hopper_sass_counts(library: str) -> dict[str, dict[str, int]] | str:
    """{Hopper kernel (mangled): {instruction: count}} from cuobjdump -sass, or why not."""
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if not cuobjdump or not nvdisasm:
        return "cuobjdump and nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
    env = {**os.environ, "PATH": os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", "")}
    sass = subprocess.run([cuobjdump, "-sass", library], capture_output=True, text=True, check=True,
                          env=env).stdout
    counts: dict[str, dict[str, int]] = {}
    current = None
    for line in sass.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            current = header.group(1) if "forward_sm90_kernel" in header.group(1) else None
            if current:
                counts[current] = dict.fromkeys(HOPPER_SASS + ("LDL", "STL"), 0)
        elif current:
            for op in counts[current]:
                if re.search(rf"\b{op}\b", line):
                    counts[current][op] += 1
    return counts


def check_hopper(library: str) -> bool:
    names = hopper_kernel_names(library)
    ok = len(names) == HOPPER_KERNELS
    print(f"Hopper forward: {len(names)} instantiations (expected {HOPPER_KERNELS})")
    counts = hopper_sass_counts(library)
    if isinstance(counts, str):
        print(f"Hopper forward SASS: not checked: {counts}", file=sys.stderr)
        return False
    # One sm_90a cubin per instantiation; the sm_80 pass holds empty bodies.
    full = {name: c for name, c in counts.items() if c["HGMMA"]}
    for name, c in sorted(full.items()):
        print(f"  {name}: " + ", ".join(f"{op} {n}" for op, n in c.items()))
        if not all(c[op] for op in HOPPER_SASS) or c["LDL"] or c["STL"]:
            print(f"  expected {', '.join(HOPPER_SASS)} and no LDL/STL in {name}", file=sys.stderr)
            ok = False
    if len(full) != HOPPER_KERNELS:
        print(f"expected {HOPPER_KERNELS} Hopper kernels with HGMMA, found {len(full)}", file=sys.stderr)
        ok = False
    return ok


def kernel_names(library: str) -> set[str]:
    symbols = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True,
                             text=True, check=True).stdout
    pattern = re.compile(r"sparse_attention::cuda::(%s)<[^(]*>\(" % "|".join(KERNELS))
    return {m.group(0) for line in symbols.splitlines() if "[clone" not in line
            for m in [pattern.search(line)] if m}


def cubin_architectures(library: str) -> dict[int, int]:
    """{sm version: number of cubins} from the fat binary headers."""
    sections = subprocess.run(["readelf", "-SW", library], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"\.nv_fatbin\s+PROGBITS\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)", sections)
    if not found:
        return {}
    offset, size = int(found.group(1), 16), int(found.group(2), 16)
    with open(library, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    archs: dict[int, int] = {}
    pos = 0
    while pos + 16 <= len(data):
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned in the section
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHII", data, entry)
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            if kind == ELF_KIND:
                archs[sm] = archs.get(sm, 0) + 1
            entry += entry_header + payload
        pos = end
    return archs


def main() -> int:
    library, wanted = sys.argv[1], [int(a.replace(".", "")) for a in sys.argv[2:]]
    names = kernel_names(library)
    archs = cubin_architectures(library)
    print(f"{library}: {len(names)} kernels, cubins per architecture {archs}")
    expected = expected_kernels()
    ok = len(names) == expected and all(archs.get(sm) for sm in wanted)
    if not ok:
        print(f"expected {expected} kernels and cubins for sm {wanted}", file=sys.stderr)
    if 90 in wanted:
        ok = check_hopper(library) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
