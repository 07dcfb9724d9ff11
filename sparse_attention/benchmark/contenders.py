"""Time and peak memory of one benchmark case for each contender, on the same inputs:
ours, torch SDPA dense, SDPA with the equivalent boolean mask, and compiled FlexAttention
with the equivalent BlockMask (forward only on the CPU, where Flex has no backward)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention import measure
from sparse_attention.benchmark.cases import Case
from sparse_attention.benchmark.flex import compiled_flex, flex_block_mask
from sparse_attention.benchmark.timing import median_time
from sparse_attention.element_rules import element_mask

CONTENDERS = ("ours", "sdpa_dense", "sdpa_masked", "flex")


@dataclasses.dataclass
class Settings:
    repeats: int = 3          # timed calls; the median is reported
    budget: float = 20.0      # seconds of timed calls per measurement at most
    device: str = "cpu"
    memory_fraction: float = 0.8  # skip a contender predicted to need more of the free memory
    skip: frozenset = frozenset()  # contenders left out (names from CONTENDERS)


@dataclasses.dataclass
class Result:
    forward: float | None = None           # seconds
    forward_backward: float | None = None  # seconds
    peak_memory: int | None = None         # bytes above the inputs during one measured call
    max_error: float | None = None         # largest |output - ours| (equivalence check)
    skipped: str | None = None

    @property
    def backward(self) -> float | None:
        if self.forward is None or self.forward_backward is None:
            return None
        return max(self.forward_backward - self.forward, 0.0)


def _median_time(fn: Callable[[], object], settings: Settings) -> float:
    """Median of up to settings.repeats calls after one warm-up call; slow calls get fewer
    repeats so that one measurement stays within the time budget."""
    return median_time(fn, settings.repeats, warmup=1, device=settings.device,
                       budget=settings.budget)


def _measure(forward: Callable[[], torch.Tensor], inputs, grad_out, settings: Settings,
             backward: bool = True, expected: torch.Tensor | None = None) -> Result:
    with torch.no_grad():
        out = forward()
        error = None if expected is None else float((out.float() - expected.float()).abs().max())
        del out
        fwd = _median_time(forward, settings)
    if not backward:
        with torch.no_grad():
            peak = measure.peak_memory(forward, settings.device)
        return Result(forward=fwd, peak_memory=peak, max_error=error)

    def step():
        return torch.autograd.grad(forward(), inputs, grad_out)

    fwd_bwd = _median_time(step, settings)
    return Result(fwd, fwd_bwd, measure.peak_memory(step, settings.device), error)


def available_memory(device: str) -> int | None:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_shortfall(needed: int, device: str, fraction: float = 0.8) -> str | None:
    """Why a measurement needing `needed` bytes is skipped (more than `fraction` of the free
    memory), or None when it fits."""
    free = available_memory(device)
    if free is not None and needed > fraction * free:
        return (f"needs ~{measure.format_bytes(needed)}, {measure.format_bytes(free)} free")
    return None


def _too_big(needed: int, settings: Settings) -> str | None:
    return memory_shortfall(needed, settings.device, settings.memory_fraction)


def measure_case(case: Case, settings: Settings, dense_cache: dict) -> tuple[sa.BlockLayout, dict]:
    """Results per contender for one case. dense_cache holds the dense SDPA result per
    (dtype, head dim, N, causal), which all patterns of that shape share."""
    torch.manual_seed(0)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    q, k, v = (torch.randn(shape, dtype=case.torch_dtype, device=settings.device, requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn(shape, dtype=case.torch_dtype, device=settings.device)
    inputs = (q, k, v)
    layout = case.layout()
    causal = case.causal

    def ours():
        return sa.sparse_attention(q, k, v, layout, causal=causal)

    results = {"ours": _measure(ours, inputs, grad_out, settings)}
    with torch.no_grad():
        expected = ours()

    dense_key = (case.dtype, case.head_dim, case.seq_len, causal, case.batch, case.heads)
    if dense_key not in dense_cache:
        dense_cache[dense_key] = _measure(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            inputs, grad_out, settings)
    results["sdpa_dense"] = dense_cache[dense_key]

    results["sdpa_masked"] = _sdpa_masked(case, layout, inputs, grad_out, expected, settings)
    results["flex"] = _flex(case, layout, inputs, grad_out, expected, settings)
    return layout, results


def _sdpa_masked(case, layout, inputs, grad_out, expected, settings: Settings) -> Result:
    if "sdpa_masked" in settings.skip:
        return Result(skipped="left out (--skip)")
    # On the CPU, SDPA with a mask materialises O(N^2) scores (math path); on CUDA its
    # efficient kernel needs only the mask. Skip it where that cannot fit.
    mask_bytes = layout.num_heads * case.seq_len**2
    scores = 0 if settings.device.startswith("cuda") else 3 * case.batch * case.heads * case.seq_len**2 * 4
    skip = _too_big(scores + mask_bytes, settings)
    if skip:
        return Result(skipped=skip)
    q, k, v = inputs
    mask = element_mask(layout, case.seq_len, case.seq_len, causal=case.causal,
                        device=settings.device)[0]
    return _measure(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                    inputs, grad_out, settings, expected=expected)


def _flex(case, layout, inputs, grad_out, expected, settings: Settings) -> Result:
    if "flex" in settings.skip:
        return Result(skipped="left out (--skip)")
    try:
        block_mask = flex_block_mask(layout, case.seq_len, case.seq_len, case.causal, settings.device)
        flex = compiled_flex()
        backward = settings.device != "cpu"  # Flex refuses inputs that need grad on the CPU
        fq, fk, fv = inputs if backward else (t.detach() for t in inputs)
        return _measure(lambda: flex(fq, fk, fv, block_mask=block_mask), inputs, grad_out,
                        settings, backward=backward, expected=expected)
    except Exception as error:  # report, do not hide: a Flex failure is a result too
        return Result(skipped=f"failed: {type(error).__name__}: {str(error)[:120]}")
