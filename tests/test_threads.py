"""Thread safety, the thread pool size, and determinism across runs and thread counts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import sparse_attention as sa
from sparse_attention.window import Window
from conftest import Case, make_inputs


def run_forward_backward(q, k, v, layout, grad, **kwargs):
    out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True, **kwargs)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), grad))


def in_threads(count: int, work) -> list:
    """Runs work(i) on `count` Python threads released at once; returns the results in order."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def target(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_calls_on_a_shared_layout_match_serial_results():
    # Several Python threads call the op at once on one layout, first use included (so they
    # also race to build its block lists), each with its own inputs and rules; every result
    # must equal the one of the same call made alone.
    case = Case(batch=2, heads=4, kv_heads=2, q_len=150, k_len=150, head_dim=32, density=0.4,
                per_head=True, padding=True)
    _, _, _, layout, _ = make_inputs(case)
    calls = []
    for i in range(6):
        q, k, v, _, pad = make_inputs(Case(**{**case.__dict__, "seed": 100 + i}))
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(i))
        kwargs = dict(causal=i % 2 == 0, key_padding_mask=pad if i % 3 else None,
                      window=(40, None) if i == 5 else None)
        calls.append((q, k, v, grad, kwargs))
    concurrent = in_threads(len(calls), lambda i: run_forward_backward(*calls[i][:3], layout, calls[i][3], **calls[i][4]))
    for (q, k, v, grad, kwargs), got in zip(calls, concurrent):
        fresh = sa.BlockLayout(layout.mask, layout.block_size)
        alone = run_forward_backward(q, k, v, fresh, grad, **kwargs)
        for a, b in zip(got, alone):
            assert torch.equal(a, b)


def test_block_list_cache_first_use_from_many_threads():
    # Many threads ask for the same lists, and for other (length, window) keys, at the same
    # moment: each key is built once and every thread gets that one object.
    layout = sa.BlockLayout(torch.rand(3, 12, 12) < 0.5, 16)
    keys = [(190, 190, Window(None, 0)), (190, 180, Window()), (185, 190, Window(8, 0))]
    got = in_threads(12, lambda i: (keys[i % 3], layout.block_lists(*keys[i % 3], torch.device("cpu"))))
    for key in keys:
        objects = {id(lists) for k, lists in got if k == key}
        assert len(objects) == 1
    assert len(layout._lists) == len(keys)
    for key, lists in got:  # and they are the right lists
        expected = torch.ops.sparse_attention.build_block_lists(layout.mask, key[0], key[1], 16,
                                                                *key[2].kernel_bounds())
        assert all(torch.equal(a, b) for a, b in zip(lists, expected))


def determinism_case():
    case = Case(batch=2, heads=4, kv_heads=2, q_len=333, k_len=290, head_dim=40, density=0.4,
                per_head=True, causal=True, padding=True, seed=31)
    q, k, v, layout, pad = make_inputs(case)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(32))
    return q, k, v, layout, grad, dict(causal=True, key_padding_mask=pad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bit_identical_across_runs_and_thread_counts(dtype):
    q, k, v, layout, grad, kwargs = determinism_case()
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    grad = grad.to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 1, 3):
            torch.set_num_threads(n)
            results.append(run_forward_backward(q, k, v, layout, grad, **kwargs))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_set_num_threads_sets_the_threads_the_kernels_use():
    # In a fresh process: with one thread the op starts no pool thread; after
    # torch.set_num_threads(n) it runs on n threads (n - 1 pool threads besides the caller).
    script = textwrap.dedent(
        """
        import os, torch, sparse_attention as sa
        def threads():
            return len(os.listdir("/proc/self/task"))
        q = torch.randn(1, 4, 512, 32)
        layout = sa.BlockLayout(torch.ones(1, 32, 32, dtype=torch.bool), 16)
        torch.set_num_threads(1)
        sa.sparse_attention(q, q, q, layout)
        before = threads()
        sa.sparse_attention(q, q, q, layout)
        one = threads()
        torch.set_num_threads(3)
        sa.sparse_attention(q, q, q, layout)
        print(before, one, threads())
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(sa.__file__)), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    before, one, three = map(int, out.split())
    assert one == before  # one thread: everything ran on the caller
    assert three == before + 2  # three threads: two pool threads joined
