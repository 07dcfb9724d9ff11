"""Checks that a built sparse_attention._C holds the CUDA kernels: every kernel instantiation
(by its host launch stub, read with nm) and device code (cubins in the .nv_fatbin section, read
with readelf) for each architecture asked for. Works without a GPU and without cuobjdump.

    python scripts/check_cuda_library.py LIBRARY 9.0 [8.0 ...]
"""

from __future__ import annotations

import pathlib
import re
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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
