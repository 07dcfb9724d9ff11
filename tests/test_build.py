"""The built library: code outside the AVX2/AVX-512 kernels uses no AVX instructions, and
no private copy of the standard library is exported.

The kernels are compiled three times (portable, AVX2, AVX-512) into one library. An inline
function from c10 or the standard library that several of those objects emit is kept once by
the linker; if the kept copy were an AVX one, portable code calling it would crash on a
processor without AVX. This reads the disassembly of every shared (global or weak) function
outside the ISA namespaces and checks that none holds an AVX, AVX-512 or BMI instruction.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from sparse_attention import _C

ISA_NAMESPACE = re.compile(r"(AVX2|AVX512)::|Sleef")
ISA_INSTRUCTION = re.compile(
    r"^\s*([0-9a-f]+):\s+(v[a-z0-9]+|shlx|shrx|sarx|rorx|andn|bextr|pdep|pext|bzhi|k[a-z]+[bwdq])\s"
)


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("objdump") or not shutil.which("nm"),
                    reason="needs x86-64 and binutils")
def test_shared_functions_outside_isa_kernels_use_no_avx():
    library = _C.__file__
    symbols = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True,
                             text=True, check=True).stdout
    # Global (T) and weak (W) functions can be shared between objects; local ones cannot.
    shared = {int(addr, 16) for addr, kind, *_ in (line.split(" ", 2) for line in symbols.splitlines()
                                                   if line.count(" ") >= 2) if kind in ("T", "W")}
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library],
                             capture_output=True, text=True, check=True).stdout
    offenders, current, checked = {}, None, 0
    for line in listing.splitlines():
        header = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if header:
            address, name = int(header.group(1), 16), header.group(2)
            current = name if address in shared and not ISA_NAMESPACE.search(name) else None
            checked += current is not None
        elif current and ISA_INSTRUCTION.match(line):
            offenders.setdefault(current, line.strip())
    assert checked > 100, "too few functions found: is the library stripped?"
    assert not offenders, "\n".join(f"{name}: {insn}" for name, insn in list(offenders.items())[:10])


STANDARD_LIBRARY_INTERNALS = re.compile(r"std::(locale|ios_base|codecvt|basic_ostream<char, std::char_traits<char> >::_M_insert)")


@pytest.mark.skipif(platform.system() != "Linux" or not shutil.which("nm"), reason="needs Linux and binutils")
def test_exports_no_copy_of_the_standard_library():
    """A toolchain that links libstdc++ statically must not leave its copy exported: with
    Python's -Bsymbolic-functions the copy's functions would mix with the process's library
    data (formatting a number in an error message crashed that way)."""
    symbols = subprocess.run(["nm", "-D", "-C", "--defined-only", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
    exported = [line for line in symbols.splitlines() if STANDARD_LIBRARY_INTERNALS.search(line)]
    assert not exported, "\n".join(exported[:10])
