"""Output and gradients against the fp64 reference, over shapes, layouts, rules and dtypes."""

from __future__ import annotations

import zlib

import pytest
import torch

from conftest import Case, run_case

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Each case is run in every dtype; seeds differ per case so inputs are fresh.
SHAPES = [
    Case(q_len=1, k_len=1, head_dim=16, block_size=16, density=1.0),
    Case(q_len=7, k_len=7, head_dim=16, block_size=16, density=1.0, causal=True),
    Case(batch=2, heads=4, kv_heads=2, q_len=100, k_len=130, head_dim=32, block_size=16,
         density=0.5, per_head=True, causal=True, padding=True),
    Case(heads=4, kv_heads=1, q_len=257, k_len=257, head_dim=64, block_size=32, density=0.3,
         causal=True),
    Case(batch=2, q_len=300, k_len=200, head_dim=100, block_size=64, density=0.7, padding=True),
    Case(q_len=200, k_len=333, head_dim=128, block_size=128, density=1.0, causal=True),
    Case(q_len=300, k_len=300, head_dim=256, block_size=256, density=1.0, causal=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", SHAPES, ids=str)
def test_small_shapes_every_dtype(case, dtype):
    case = Case(**{**case.__dict__, "dtype": dtype, "seed": zlib.crc32(f"{case}{dtype}".encode())})
    run_case(case)


# Long sequences, N not a multiple of the block, densities from 0.05 to 1.
LONG = [
    Case(q_len=1000, k_len=1000, head_dim=64, block_size=64, density=0.3, causal=True, seed=1),
    Case(heads=4, kv_heads=2, q_len=2000, k_len=2000, head_dim=32, block_size=128, density=0.05,
         per_head=True, seed=2),
    Case(heads=2, kv_heads=1, q_len=4097, k_len=4097, head_dim=16, block_size=64, density=0.05,
         causal=True, padding=True, seed=3),
    Case(q_len=1000, k_len=2000, head_dim=100, block_size=32, density=0.2, causal=True, seed=4),
    Case(q_len=2000, k_len=1000, head_dim=64, block_size=16, density=0.1, causal=True, seed=5),
    Case(batch=2, heads=2, q_len=1000, k_len=1000, head_dim=128, block_size=64, density=1.0,
         padding=True, seed=6),
]


@pytest.mark.parametrize("case", LONG, ids=str)
def test_long_sequences_fp32(case):
    run_case(case)


@pytest.mark.parametrize("case", LONG[:3], ids=str)
def test_long_sequences_bf16(case):
    run_case(Case(**{**case.__dict__, "dtype": torch.bfloat16}))


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("density", [0.05, 0.25, 1.0])
def test_block_sizes_and_densities(block_size, density):
    run_case(Case(heads=2, q_len=517, k_len=517, head_dim=32, block_size=block_size,
                  density=density, per_head=True, causal=density < 1, seed=block_size + int(100 * density)))


@pytest.mark.parametrize("window", [(64, 0), (10, 10), (None, 5), (0, None)], ids=str)
def test_token_window(window):
    run_case(Case(q_len=300, k_len=300, head_dim=32, block_size=32, density=0.8, window=window,
                  seed=7))


def test_window_with_causal_and_unequal_lengths():
    run_case(Case(q_len=150, k_len=400, head_dim=32, block_size=32, density=1.0, causal=True,
                  window=(100, None), seed=8))
