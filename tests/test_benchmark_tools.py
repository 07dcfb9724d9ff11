"""The pieces every benchmark shares: the timer, the machine description and the FLOP count.
(Speed itself is never asserted.)"""

import pytest
import torch

import sparse_attention as sa
from sparse_attention.benchmark import flops, machine
from sparse_attention.benchmark.timing import median_time


def test_median_time_runs_warmup_then_repeats():
    calls = []
    seconds = median_time(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and seconds >= 0


def test_budget_cuts_the_repeats_of_a_slow_call():
    calls = []

    def slow():
        calls.append(1)
        sum(range(200_000))

    median_time(slow, repeats=50, warmup=1, budget=1e-9)
    assert len(calls) == 2  # the warm-up and one timed call
    with pytest.raises(ValueError, match="warmup"):
        median_time(slow, warmup=0, budget=1.0)


def test_dense_flops_halve_under_causal_masking():
    full = flops.dense_flops(1024, 64, batch=2, heads=8, causal=False)
    assert full == 4 * 2 * 8 * 1024**2 * 64
    assert flops.dense_flops(1024, 64, batch=2, heads=8, causal=True) == full // 2


def test_a_dense_layout_is_credited_like_dense_attention():
    # All blocks of a bidirectional dense layout: BlockLayout.flops equals the N^2 count.
    layout = sa.BlockLayout(torch.ones(4, 4, dtype=torch.bool), 32)
    assert layout.flops(64, 2, 8) == flops.dense_flops(128, 64, 2, 8, causal=False)
    assert flops.backward_flops(layout.flops(64, 2, 8)) == 2.5 * layout.flops(64, 2, 8)


def test_rate_needs_a_positive_time():
    assert flops.rate(2e9, 0.5) == 4e9
    assert flops.rate(2e9, None) is None and flops.rate(2e9, 0.0) is None


def test_machine_description():
    header = machine.describe()
    for key in ("cpu", "cores", "threads", "cpu features", "cpu capability", "torch"):
        assert key in header
    assert header["torch"] == torch.__version__
    assert ("gpu" in header) == torch.cuda.is_available()
    line = machine.one_line(header)
    assert line.startswith(f"cpu {header['cpu']} | ") and f"torch {torch.__version__}" in line
    features = header["cpu features"]
    assert features == "none" or set(features.split(", ")) <= {"AVX2", "AVX-512", "native bf16"}
