"""Shared helpers: random layouts and inputs, the FlashAttention accuracy rule, and what a test
that cannot run does: outside CI it skips with its reason; under CI=true (CI installs every
test dependency and builds what it tests) a missing module, or a GPU visible to a build
without CUDA kernels, fails instead, so a suite cannot pass there without running."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import pytest
import torch

import sparse_attention as sa
from sparse_attention import reference

def in_ci() -> bool:
    """Whether this is a CI run (CI=true, as CI services and .ci/run's caller set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def skip_or_fail(reason: str) -> None:
    """Skips the calling test (or test file, at module level) with `reason`; under CI=true
    fails it instead: CI installs and builds everything the suite needs, so a skip there
    hides a test that did not run."""
    if in_ci():
        pytest.fail(f"{reason} [CI=true: this would be a skip outside CI]", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, minversion: str | None = None):
    """The module `name`, imported. Missing, or older than `minversion`: outside CI like
    pytest.importorskip (skips the test, or the whole file at module level); under CI=true a
    failure (at module level, a collection error), since CI installs the [test] extra."""
    try:
        return pytest.importorskip(name, minversion=minversion)
    except pytest.skip.Exception as skipped:
        if not in_ci():
            raise
        reason = skipped.msg
    pytest.fail(f"{reason} [CI=true: CI installs the test dependencies, "
                "`pip install --no-build-isolation -e .[test]`]", pytrace=False)


def cuda_missing() -> str | None:
    """Why the CUDA tests cannot run here (None when they can): no GPU visible, or a GPU
    visible but a build of the extension without CUDA kernels."""
    if not torch.cuda.is_available():
        return "needs a GPU (torch.cuda.is_available() is False)"
    if not sa.built_with_cuda():
        return ("a GPU is visible but this build of sparse_attention has no CUDA kernels "
                "(setup.py fell back to the CPU build: a CPU build of torch, or nvcc not found); "
                "reinstall with SPARSE_ATTENTION_CUDA=1 to require them")
    return None


def require_cuda() -> None:
    """Skips the calling test without a GPU. With a GPU but no CUDA kernels in the build it
    skips outside CI and fails under CI=true: there the GPU suites must run."""
    reason = cuda_missing()
    if reason is None:
        return
    if not torch.cuda.is_available():
        pytest.skip(reason)
    skip_or_fail(reason)


# The marker of tests that need the GPU kernels (test_cuda.py, test_cuda_models.py, the cuda
# cases of test_fuzz.py): `pytestmark = requires_cuda`, or pytest.param(..., marks=requires_cuda).
requires_cuda = pytest.mark.requires_cuda


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cuda: needs a GPU and the CUDA build of the "
                                       "extension (skipped without; see conftest.require_cuda)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_cuda") is not None:
        require_cuda()


# Absolute floor added to the accuracy rule, per dtype.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclasses.dataclass
class Case:
    batch: int = 1
    heads: int = 2
    kv_heads: int = 2
    q_len: int = 100
    k_len: int = 100
    head_dim: int = 32
    block_size: int = 16
    density: float = 0.5
    per_head: bool = False
    causal: bool = False
    padding: bool = False
    window: tuple | None = None
    dtype: torch.dtype = torch.float32
    seed: int = 0
    device: str = "cpu"

    def __str__(self):
        parts = [f"B{self.batch}H{self.heads}/{self.kv_heads}", f"N{self.q_len}x{self.k_len}",
                 f"D{self.head_dim}", f"bs{self.block_size}", f"d{self.density}",
                 str(self.dtype).replace("torch.", "")]
        parts += [name for name in ("per_head", "causal", "padding") if getattr(self, name)]
        if self.window:
            parts.append(f"win{self.window}")
        if self.device != "cpu":
            parts.append(self.device)
        return "-".join(parts)


def random_layout(case: Case, generator: torch.Generator) -> sa.BlockLayout:
    q_blocks = math.ceil(case.q_len / case.block_size)
    k_blocks = math.ceil(case.k_len / case.block_size)
    heads = case.heads if case.per_head else 1
    mask = torch.rand(heads, q_blocks, k_blocks, generator=generator) < case.density
    return sa.BlockLayout(mask, case.block_size)


def make_inputs(case: Case, requires_grad: bool = True):
    """Fresh random q, k, v, layout and padding mask for a case (drawn on the CPU, so every
    device gets the same inputs)."""
    g = torch.Generator().manual_seed(case.seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(case.device, case.dtype)
        return t.requires_grad_(requires_grad)

    q = rand(case.batch, case.heads, case.q_len, case.head_dim)
    k = rand(case.batch, case.kv_heads, case.k_len, case.head_dim)
    v = rand(case.batch, case.kv_heads, case.k_len, case.head_dim)
    layout = random_layout(case, g)
    pad = None
    if case.padding:
        pad = torch.rand(case.batch, case.k_len, generator=g) < 0.3
        pad[0, : case.k_len // 2] = True  # a long padded run: whole blocks padded
        pad = pad.to(case.device)
    return q, k, v, layout, pad


@contextlib.contextmanager
def fresh_memory_filled_with_nan():
    """While active, torch.empty fills fresh memory with NaN: an element a kernel forgets to
    write shows up as NaN."""
    saved = torch.utils.deterministic.fill_uninitialized_memory
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = saved


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def assert_rule(name: str, ours: torch.Tensor, same_precision: torch.Tensor, exact: torch.Tensor):
    """Our error against the fp64 result is at most twice that of a plain PyTorch
    implementation computed in the inputs' precision, plus a small floor."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ours_err = max_error(ours, exact)
    base_err = max_error(same_precision, exact)
    bound = 2 * base_err + FLOOR[ours.dtype]
    assert ours_err <= bound, f"{name}: error {ours_err:.3g} > bound {bound:.3g} (baseline {base_err:.3g})"


def run_case(case: Case, check_grads: bool = True, deterministic: bool = False):
    """Runs ours, the fp64 reference and the same-precision reference; checks the rule on
    out and lse (and dq, dk, dv)."""
    q, k, v, layout, pad = make_inputs(case)
    kwargs = dict(causal=case.causal, key_padding_mask=pad, window=case.window)
    check_against_reference(q, k, v, layout, kwargs, check_grads, deterministic=deterministic)


def check_against_reference(q, k, v, layout, kwargs: dict, check_grads: bool = True, grad=None,
                            deterministic: bool = False):
    """Checks out, lse (and dq, dk, dv for the upstream gradient `grad`, random by default)
    of sa.sparse_attention(q, k, v, layout, **kwargs) against the fp64 reference, under the
    rule of assert_rule. q, k, v must require grad when check_grads is set."""
    dtype = q.dtype
    out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True, deterministic=deterministic,
                                   **kwargs)
    exact, exact_lse = reference.attention(q, k, v, layout, return_lse=True, **kwargs)
    low = reference.attention(q, k, v, layout, compute_dtype=dtype, **kwargs)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[3])
    assert_rule("out", out, low, exact)
    # Rows that see no key have lse = -inf in both; the others agree closely.
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact_lse)), "lse: -inf rows differ"
    seen = torch.isfinite(exact_lse)
    assert not torch.isnan(lse).any()
    lse_tol = 1e-9 if dtype == torch.float64 else 1e-4 * (1 + exact_lse[seen].abs().max().item() if seen.any() else 1)
    if seen.any():
        assert max_error(lse[seen], exact_lse[seen]) <= lse_tol
    assert (out[~seen.unsqueeze(-1).expand_as(out)] == 0).all(), "rows with no key must be 0"
    if check_grads:
        assert_grads_rule(out, low, exact, (q, k, v), grad)


def check_rows_without_keys(q, k, v, layout, **kwargs):
    """Every row of the call sees no key: out 0, lse -inf, and zero, finite gradients (through
    lse too: its -inf rows pass no gradient)."""
    out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True, **kwargs)
    assert (out == 0).all() and torch.isneginf(lse).all()
    (out.sum() + lse.clamp(min=0).sum()).backward()
    assert all(torch.isfinite(t.grad).all() and (t.grad == 0).all() for t in (q, k, v))


def assert_grads_rule(out, low, exact, inputs, grad=None):
    """The rule on dq, dk, dv of our output against those of the same-precision and exact
    reference outputs, for the upstream gradient `grad` (random by default)."""
    grad = torch.randn_like(out) if grad is None else grad
    ours = torch.autograd.grad(out, inputs, grad)
    exact_grads = torch.autograd.grad(exact, inputs, grad)
    low_grads = torch.autograd.grad(low, inputs, grad)
    for name, a, b, c in zip(("dq", "dk", "dv"), ours, low_grads, exact_grads):
        assert a.dtype == out.dtype
        assert_rule(name, a, b, c)


def assert_matches_reference(out: torch.Tensor, q, k, v, layout: sa.BlockLayout, **kwargs):
    """The rule on out and on dq, dk, dv, for an output computed from q, k, v (which require
    grad) with this layout and these element rules (causal, window, ...)."""
    exact = reference.attention(q, k, v, layout, **kwargs)
    low = reference.attention(q, k, v, layout, compute_dtype=q.dtype, **kwargs)
    assert_rule("out", out, low, exact)
    assert_grads_rule(out, low, exact, (q, k, v))


# Hypothesis profiles (tests/test_fuzz.py): "quick", the default, is derandomized so CI runs
# the same examples every time; "long" explores: pytest tests/test_fuzz.py --hypothesis-profile=long
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # test_fuzz.py skips itself without hypothesis (fails under CI=true)
    pass
else:
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("quick", max_examples=200, derandomize=True, database=None,
                              deadline=None, suppress_health_check=_slow_ok, print_blob=True)
    settings.register_profile("long", max_examples=3000, deadline=None,
                              suppress_health_check=_slow_ok, print_blob=True)
    settings.load_profile("quick")


HOST_SYNC_METHODS = ("item", "tolist", "cpu", "nonzero", "__bool__")


@contextlib.contextmanager
def host_syncs(monkeypatch):
    """While active, records the calls of Tensor methods that copy data to the host (a device
    sync on a GPU): the list it yields must stay empty for sync-free code."""
    calls = []
    for name in HOST_SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    try:
        yield calls
    finally:
        monkeypatch.undo()


def signal_during_step(monkeypatch, number: int, step: int) -> None:
    """Makes the training loop send itself signal `number` while it runs step `step` (0-based),
    as a scheduler's SIGTERM or a Ctrl-C would arrive."""
    import os

    from sparse_attention.training import trainer

    train_step = trainer._Run._train_step

    def signalled(run):
        if run.step == step:
            os.kill(os.getpid(), number)
        return train_step(run)

    monkeypatch.setattr(trainer._Run, "_train_step", signalled)

