"""Checks that a built sparse_attention._C holds the CUDA kernels: every kernel instantiation
(by its host launch stub, read with nm) and device code (cubins in the .nv_fatbin section, read
with readelf) for each architecture asked for.

With cuobjdump and nvdisasm (the pip packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm,
or the toolkit), also:
  - registers and stack frame (spills) of every kernel on every architecture, as a table: a
    stack frame fails the check, except the few of KNOWN_STACK, which may not grow;
  - with 9.0 asked for, the Hopper kernels (csrc/cuda/hopper): their instantiations, and in
    their SASS the instructions their design rests on: HGMMA (wgmma), UTMALDG (TMA loads),
    SYNCS (mbarrier waits and arrivals), USETMAXREG (setmaxnreg), and for the backward STSM
    (dS to shared memory by stmatrix) and UTMAREDG (dQ added by TMA reduce-add); no LDL/STL;
    and wgmmas issued in groups (ptxas serializes them, each waited alone, when it cannot
    prove the registers safe).

    python scripts/check_cuda_library.py LIBRARY 9.0 [8.0+PTX ...]

An architecture written with +PTX must also have PTX in the library (what runs, compiled by
the driver, on GPUs newer than the cubins: 10.0, 12.0).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys

KERNELS = ("forward_kernel", "forward_kernel_fa2", "grad_kv_kernel", "grad_q_kernel", "delta_kernel")
FATBIN_MAGIC = 0xBA55ED50
PTX_KIND, ELF_KIND = 1, 2


def expected_kernels() -> int:
    """Per (dtype, head dim) of the kernel table: forward (both tilings), dK/dV and
    deterministic dQ for each block size, and delta."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cuda"))
    from generate_instantiations import load_table

    table = load_table()
    return len(table.CUDA_DTYPES) * len(table.CUDA_HEAD_DIMS) * (4 * len(table.CUDA_BLOCK_SIZES) + 1)


# The Hopper kernels and the SASS instructions each must hold.
HOPPER_SASS = {
    "forward_sm90_kernel": ("HGMMA", "UTMALDG", "SYNCS", "USETMAXREG"),
    "backward_sm90_kernel": ("HGMMA", "UTMALDG", "SYNCS", "USETMAXREG", "STSM", "UTMAREDG"),
}
HOPPER_INSTANTIATIONS = 4  # of each: (fp16, bf16) x head dims (64, 128)

# Stack frames in bytes (register spills) of the mma.sync backward as it passed the GPU tests
# (its sm_90a code, on an H200; its sm_80 code has not run on an A100): (kernel, head dim,
# block size, sm) -> the larger of fp16 and bf16. Removing them means retuning kernels that
# have passed, which waits for a GPU run; until then they may not grow, and no other kernel
# may spill.
KNOWN_STACK = {
    ("grad_kv_kernel", 128, 128, "sm_90a"): 8,
    ("grad_kv_kernel", 128, 64, "sm_90a"): 8,
    ("grad_q_kernel", 128, 64, "sm_90a"): 48,
    ("grad_kv_kernel", 128, 128, "sm_80"): 96,
    ("grad_kv_kernel", 128, 64, "sm_80"): 96,
    ("grad_q_kernel", 128, 64, "sm_80"): 8,
    ("grad_q_kernel", 32, 128, "sm_80"): 24,
    ("grad_q_kernel", 32, 64, "sm_80"): 16,
}


def hopper_kernel_names(library: str, kernel: str) -> set[str]:
    symbols = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True,
                             text=True, check=True).stdout
    qualified = f"sparse_attention::cuda::hopper::{kernel}<"
    return {line.split(" ", 2)[-1] for line in symbols.splitlines()
            if qualified in line and "[clone" not in line}


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


def cuda_tools() -> tuple[str, dict] | str:
    """(cuobjdump, its environment with nvdisasm on PATH), or why not."""
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if not cuobjdump or not nvdisasm:
        return "cuobjdump and nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
    return cuobjdump, {**os.environ, "PATH": os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", "")}


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def hopper_sass_counts(library: str, tools) -> dict[str, dict[str, int]]:
    """{Hopper kernel (mangled): {instruction: count}} from cuobjdump -sass."""
    cuobjdump, env = tools
    sass = subprocess.run([cuobjdump, "-sass", library], capture_output=True, text=True, check=True,
                          env=env).stdout
    counts: dict[str, dict[str, int]] = {}
    current = None
    for line in sass.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            kernel = next((k for k in HOPPER_SASS if k in header.group(1)), None)
            current = header.group(1) if kernel else None
            if current:
                counts[current] = dict.fromkeys(HOPPER_SASS[kernel] + ("LDL", "STL", "HGMMA.gsb0"), 0)
        elif current:
            for op in counts[current]:
                if re.search(rf"\b{op}", line):
                    counts[current][op] += 1
            # A wgmma that ends its group (gsb0); when every one does, ptxas has serialized them.
            if re.search(r"\bHGMMA\S* .*gsb0", line):
                counts[current]["HGMMA.gsb0"] += 1
    return counts


def check_hopper(library: str, tools) -> bool:
    ok = True
    for kernel in HOPPER_SASS:
        found = len(hopper_kernel_names(library, kernel))
        print(f"Hopper {kernel}: {found} instantiations (expected {HOPPER_INSTANTIATIONS})")
        ok = ok and found == HOPPER_INSTANTIATIONS
    if isinstance(tools, str):
        print(f"Hopper SASS: not checked: {tools}", file=sys.stderr)
        return False
    # One sm_90a cubin per instantiation; other architectures hold empty bodies.
    full = {name: c for name, c in hopper_sass_counts(library, tools).items() if c["HGMMA"]}
    for name, c in sorted(full.items()):
        print(f"  {name}: " + ", ".join(f"{op} {n}" for op, n in c.items()))
        wanted = [op for op in c if op not in ("LDL", "STL", "HGMMA.gsb0")]
        if not all(c[op] for op in wanted) or c["LDL"] or c["STL"]:
            print(f"  expected {', '.join(wanted)} and no LDL/STL in {name}", file=sys.stderr)
            ok = False
        if c["HGMMA.gsb0"] == c["HGMMA"]:
            print(f"  every wgmma of {name} waits alone: ptxas serialized them", file=sys.stderr)
            ok = False
    if len(full) != HOPPER_INSTANTIATIONS * len(HOPPER_SASS):
        print(f"expected {HOPPER_INSTANTIATIONS * len(HOPPER_SASS)} Hopper kernels with HGMMA, "
              f"found {len(full)}", file=sys.stderr)
        ok = False
    return ok


def resource_usage(library: str, tools) -> list[tuple[str, str, int, int]]:
    """(sm, demangled kernel, registers, stack frame bytes) of every function with device code."""
    cuobjdump, env = tools
    text = subprocess.run([cuobjdump, "-res-usage", library], capture_output=True, text=True,
                          check=True, env=env).stdout
    rows, arch, name = [], None, None
    for line in text.splitlines():
        if m := re.match(r"arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif (m := re.search(r"REG:(\d+) STACK:(\d+)", line)) and name:
            rows.append((arch, name, int(m.group(1)), int(m.group(2))))
            name = None
    return [(sm, pretty, reg, stack) for (sm, _, reg, stack), pretty in
            zip(rows, demangle([r[1] for r in rows]))]


def known_stack(kernel: str, sm: str) -> int:
    """The stack frame a kernel may have (KNOWN_STACK), from its demangled name."""
    m = re.search(r"::(\w+)<[^<]*KernelTraits<[^,]+, (\d+), (\d+)>", kernel)
    return KNOWN_STACK.get((m.group(1), int(m.group(2)), int(m.group(3)), sm), 0) if m else 0


def short_name(kernel: str) -> str:
    return re.sub(r"sparse_attention::cuda::|cutlass::|\(.*\)$|void ", "", kernel)


def check_registers(library: str, tools) -> bool:
    if isinstance(tools, str):
        print(f"registers and spills: not checked: {tools}", file=sys.stderr)
        return False
    ok = True
    print(f"{'sm':8} {'regs':>4} {'stack':>5}  kernel")
    for sm, kernel, registers, stack in sorted(set(resource_usage(library, tools))):
        allowed = known_stack(kernel, sm)
        flag = "" if stack <= allowed else "  <- spills"
        if stack and stack <= allowed:
            flag = f"  (known: at most {allowed} B)"
        if "hopper::" in kernel and not sm.startswith("sm_90"):
            flag = "  (empty: sm_90a code only)"
        print(f"{sm:8} {registers:4d} {stack:5d}  {short_name(kernel)}{flag}")
        ok = ok and stack <= allowed
    if not ok:
        print("a kernel spills registers (stack frame above; KNOWN_STACK lists the validated ones)",
              file=sys.stderr)
    return ok


def kernel_names(library: str) -> set[str]:
    symbols = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True,
                             text=True, check=True).stdout
    pattern = re.compile(r"sparse_attention::cuda::(%s)<[^(]*>\(" % "|".join(KERNELS))
    return {m.group(0) for line in symbols.splitlines() if "[clone" not in line
            for m in [pattern.search(line)] if m}


def fatbin_entries(library: str) -> dict[tuple[int, int], int]:
    """{(kind, sm version): number of entries} from the fat binary headers (kind ELF_KIND: a
    cubin, PTX_KIND: PTX that the driver compiles for newer GPUs)."""
    sections = subprocess.run(["readelf", "-SW", library], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"\.nv_fatbin\s+PROGBITS\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)", sections)
    if not found:
        return {}
    offset, size = int(found.group(1), 16), int(found.group(2), 16)
    with open(library, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    entries: dict[tuple[int, int], int] = {}
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
            entries[kind, sm] = entries.get((kind, sm), 0) + 1
            entry += entry_header + payload
        pos = end
    return entries


def main() -> int:
    library, args = sys.argv[1], sys.argv[2:]
    wanted = [int(a.removesuffix("+PTX").replace(".", "")) for a in args]
    wanted_ptx = [int(a.removesuffix("+PTX").replace(".", "")) for a in args if a.endswith("+PTX")]
    names = kernel_names(library)
    entries = fatbin_entries(library)
    archs = {sm: n for (kind, sm), n in sorted(entries.items()) if kind == ELF_KIND}
    ptx = {sm: n for (kind, sm), n in sorted(entries.items()) if kind == PTX_KIND}
    print(f"{library}: {len(names)} kernels, cubins per architecture {archs}, PTX {ptx}")
    expected = expected_kernels()
    ok = (len(names) == expected and all(archs.get(sm) for sm in wanted)
          and all(ptx.get(sm) for sm in wanted_ptx))
    if not ok:
        print(f"expected {expected} kernels, cubins for sm {wanted} and PTX for {wanted_ptx}",
              file=sys.stderr)
    tools = cuda_tools()
    ok = check_registers(library, tools) and ok
    if 90 in wanted:
        ok = check_hopper(library, tools) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
