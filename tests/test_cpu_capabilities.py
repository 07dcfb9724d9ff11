"""Every compiled instruction set gives the right answer, not only the one this CPU picks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import sparse_attention as sa

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import sparse_attention as sa
from conftest import Case, run_case
print(sa.cpu_capability())
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    run_case(Case(batch=2, heads=4, kv_heads=2, q_len=150, k_len=170, head_dim=40, block_size=32,
                  density=0.5, per_head=True, causal=True, padding=True, dtype=dtype, seed=31))
    # Whole and partial register groups of the column walks and the tile transposes: query
    # blocks of 64 and 128 with tails, head dims off the vector width.
    run_case(Case(batch=1, heads=2, kv_heads=1, q_len=230, k_len=300, head_dim=72, block_size=64,
                  density=0.6, causal=True, dtype=dtype, seed=32))
    run_case(Case(batch=1, heads=2, kv_heads=2, q_len=300, k_len=300, head_dim=13, block_size=128,
                  density=0.7, padding=True, dtype=dtype, seed=33))
"""

ORDER = ["DEFAULT", "AVX2", "AVX512"]


@pytest.mark.parametrize("capability", ORDER)
def test_capability(capability):
    best = sa.cpu_capability()
    if ORDER.index(capability) > ORDER.index(best):
        pytest.skip(f"this processor runs {best}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == capability
