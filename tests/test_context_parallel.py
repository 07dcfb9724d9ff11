"""Context parallelism (sparse_attention.distributed) on 2 and 4 gloo processes on the CPU:
forward and gradients equal the single-process op on the whole sequence, the argument
checks, and the bytes sent for a local pattern. Each launch runs many cases (a launch costs
seconds); every launch is bounded by a timeout."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_attention as sa
from sparse_attention.distributed import (
    Sharding, context_parallel_attention, group_sharding, traffic,
)
from sparse_attention import cli
from sparse_attention.distributed.local_processes import free_port, run_on_gloo
from sparse_attention.distributed.on_paper import kv_bytes_per_token, traffic_on_paper
from test_training import weights, write_corpus

BLOCK = 16
TIMEOUT_S = 150


def _random_tensor_layout(seq_len: int, heads: int) -> sa.TensorLayout:
    blocks = seq_len // BLOCK
    generator = torch.Generator().manual_seed(7)
    mask = torch.rand(2, heads, blocks, blocks, generator=generator) < 0.3
    return sa.TensorLayout.from_mask(mask, BLOCK)


def _layout(name: str, seq_len: int, heads: int):
    return {
        "local": lambda: sa.Local(2 * BLOCK, block_size=BLOCK),
        "fixed": lambda: sa.Fixed(4 * BLOCK, block_size=BLOCK),
        "strided": lambda: sa.Strided(4 * BLOCK, block_size=BLOCK),
        "bigbird": lambda: sa.BigBird(num_window_blocks=3, num_global_blocks=1,
                                      num_random_blocks=2, block_size=BLOCK),
        "dense": lambda: sa.Dense(block_size=BLOCK),
        "tensor": lambda: _random_tensor_layout(seq_len, heads),
        "first_half_rows": lambda: _first_half_rows(seq_len),
    }[name]()


def _first_half_rows(seq_len: int) -> sa.BlockLayout:
    """Only the first half of the queries see keys (all of them): under contiguous sharding
    some ranks compute nothing, yet send their keys and get dK/dV back."""
    blocks = seq_len // BLOCK
    mask = torch.zeros(blocks, blocks, dtype=torch.bool)
    mask[:blocks // 2] = True
    return sa.BlockLayout(mask, BLOCK)


# (layout, causal, sharding, dtype, kv heads); 4 query heads, batch 2, head dim 16.
CASES = [
    (name, causal, sharding, dtype, kv_heads)
    for name in ("local", "fixed", "strided", "bigbird", "dense", "tensor")
    for causal in (False, True)
    for sharding, dtype, kv_heads in (("contiguous", torch.float64, 4), ("zigzag", torch.float32, 2))
] + [("first_half_rows", causal, "contiguous", torch.float64, 2) for causal in (False, True)]


def _inputs(seq_len: int, kv_heads: int, dtype):
    generator = torch.Generator().manual_seed(seq_len + kv_heads)
    q, k, v, grad = (torch.randn(2, heads, seq_len, 16, generator=generator, dtype=dtype)
                     for heads in (4, kv_heads, kv_heads, 4))
    return q, k, v, grad


def _check_cases(rank: int, world: int, seq_len: int, cases) -> list[str]:
    """The cases whose output or gradients on this rank differ from the whole sequence's."""
    failures = []
    for name, causal, sharding, dtype, kv_heads in cases:
        layout = _layout(name, seq_len, 4)
        q, k, v, grad = _inputs(seq_len, kv_heads, dtype)
        whole = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = sa.sparse_attention(*whole, layout, causal=causal)
        expected.backward(grad)
        seq, _ = group_sharding(None, sharding, seq_len // world)
        mine = [seq.shard(t, rank, 2).requires_grad_() for t in (q, k, v)]
        out = context_parallel_attention(*mine, layout, causal=causal, sharding=sharding)
        out.backward(seq.shard(grad, rank, 2))
        tolerance = 1e-10 if dtype == torch.float64 else 2e-5
        checks = [("out", out, seq.shard(expected, rank, 2))] + [
            (f"grad {n}", t.grad, seq.shard(w.grad, rank, 2)) for n, t, w in zip("qkv", mine, whole)]
        for what, got, want in checks:
            error = (got - want).abs().max().item()
            if not error <= tolerance:
                failures.append(f"{name} causal={causal} {sharding} {dtype} kv_heads={kv_heads}: "
                                f"{what} differs by {error}")
    return failures


@pytest.mark.parametrize("world, seq_len", [(2, 256), (4, 256)])
def test_equal_to_the_whole_sequence(world, seq_len):
    per_rank = run_on_gloo(_check_cases, world, seq_len, CASES, timeout_s=TIMEOUT_S)
    failures = [f"rank {rank}: {line}" for rank, lines in enumerate(per_rank) for line in lines]
    assert not failures, "\n".join(failures)


def _bytes_rows_need(layout, seq: Sharding, rank: int, causal: bool, bytes_per_token: int) -> int:
    """What the other ranks' rows need of rank's keys, from the whole layout's block mask."""
    mask = layout.mask.any(0)
    if causal:
        mask = mask & torch.ones_like(mask).tril()
    mine = seq.block_ids(rank, BLOCK)
    blocks = sum(int(mask[seq.block_ids(other, BLOCK)][:, mine].any(0).sum())
                 for other in range(seq.world) if other != rank)
    return blocks * BLOCK * bytes_per_token


def _traffic(rank: int, world: int, seq_len: int) -> dict:
    """Bytes this rank sends (forward, backward) and what the other ranks' rows need of its
    keys, for a local pattern and for a dense one, causal and not."""
    sent = {}
    for name, pattern in (("local", sa.Local(2 * BLOCK, block_size=BLOCK)),
                          ("dense", sa.Dense(block_size=BLOCK))):
        for causal in (False, True):
            q, k, v, grad = _inputs(seq_len, 2, torch.float32)
            seq, _ = group_sharding(None, "contiguous", seq_len // world)
            mine = [seq.shard(t, rank, 2).requires_grad_() for t in (q, k, v)]
            traffic.reset()
            out = context_parallel_attention(*mine, pattern, causal=causal)
            out.backward(seq.shard(grad, rank, 2))
            need = _bytes_rows_need(pattern.layout(seq_len, seq_len, num_heads=4, causal=causal),
                                    seq, rank, causal, bytes_per_token=2 * 2 * 2 * 16 * 4)
            sent[name, causal] = (traffic.sent_bytes.get("forward", 0),
                                  traffic.sent_bytes.get("backward", 0), need)
    return sent


def test_a_local_pattern_sends_what_its_rows_need_only():
    world, seq_len = 4, 1024
    per_rank = run_on_gloo(_traffic, world, seq_len, timeout_s=TIMEOUT_S)
    # A ring passes every rank's whole shard to every other rank.
    ring_bytes = (world - 1) * seq_len // world * 2 * 2 * 2 * 16 * 4
    for causal in (False, True):
        for rank, sent in enumerate(per_rank):
            forward, _, need = sent["local", causal]
            assert forward <= need and forward < ring_bytes / 10, (rank, causal, forward, need)
        # What a rank received goes back as dK/dV: the totals over the ranks agree.
        forward, backward = (sum(sent["local", causal][i] for sent in per_rank) for i in (0, 1))
        assert 0 < forward == backward
    # The plan on paper counts the same bytes.
    for causal in (False, True):
        layout = sa.Local(2 * BLOCK, block_size=BLOCK).layout(seq_len, seq_len, causal=causal)
        paper = traffic_on_paper(layout, world, causal=causal,
                                 bytes_per_token=kv_bytes_per_token(2, 16, 4, batch=2))
        total = sum(sent["local", causal][0] for sent in per_rank)
        assert paper.mean_tokens_received * world * paper.bytes_per_token == total
    # So does a dense pattern here, and under causal half of that over the ranks.
    assert all(sent["dense", False][0] == ring_bytes for sent in per_rank)
    assert sum(sent["dense", True][0] for sent in per_rank) == world * ring_bytes // 2


def _refusals(rank: int, world: int) -> list[str]:
    """The error of each call that context_parallel_attention must refuse."""
    def error_of(shard_len, layout, **kwargs) -> str:
        q = torch.randn(1, 4, shard_len, 16)
        try:
            context_parallel_attention(q, q, q, layout, **kwargs)
        except (ValueError, TypeError) as error:
            return f"{type(error).__name__}: {error}"
        return "no error"

    local = sa.Local(2 * BLOCK, block_size=BLOCK)
    return [
        error_of(24, local),
        error_of(16, local, sharding="zigzag"),
        error_of(32, local, sharding="spiral"),
        error_of(32, sa.Local(2 * BLOCK, block_size=BLOCK, exact=True)),
        error_of(32, local, window=(8, 8)),
        error_of(32, local, key_padding_mask=torch.zeros(1, 32, dtype=torch.bool)),
        error_of(32, sa.BlockLayout(torch.ones(3, 3, dtype=torch.bool), BLOCK)),
        error_of(32, "local"),
    ]


def test_refusals_name_the_argument_and_what_is_required():
    errors = run_on_gloo(_refusals, 2, timeout_s=TIMEOUT_S)[0]
    expected = [
        ("ValueError: q:", "divisible by 32"),
        ("ValueError: q:", "divisible by 64"),
        ("ValueError: sharding:", "'zigzag'"),
        ("ValueError: window:", "exact=False"),
        ("ValueError: window:", "(8, 8)"),
        ("ValueError: key_padding_mask:", "not supported"),
        ("ValueError: layout:", "4 x 4"),
        ("TypeError: layout:", "Pattern"),
    ]
    for error, (start, part) in zip(errors, expected):
        assert error.startswith(start) and part in error, error


def test_without_a_process_group_the_error_names_group():
    q = torch.randn(1, 4, 32, 16)
    with pytest.raises(RuntimeError, match="group: .*init_process_group"):
        context_parallel_attention(q, q, q, sa.Local(2 * BLOCK, block_size=BLOCK))


def test_sharding_round_trips_and_zigzag_balances_chunks():
    seq = Sharding("zigzag", 4, 64)
    assert seq.positions(1).tolist() == list(range(8, 16)) + list(range(48, 56))
    x = torch.arange(64).view(1, 64)
    assert torch.equal(seq.unshard([seq.shard(x, r, 1) for r in range(4)], 1), x)


# ---- sparse-attention train --context-parallel, under torchrun ----

TINY_RUN = ["--seq-len", "128", "--block-size", "32", "--d-model", "32", "--num-layers", "2",
            "--num-heads", "2", "--sdpa-max-len", "0", "--no-progress", "--no-tensorboard",
            "--device", "cpu", "--warmup-steps", "2", "--lr", "3e-3", "--precision", "fp32",
            "--pattern", "bigbird"]


def _torchrun(processes: int, *argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
         f"--master_port={free_port()}", "-m", "sparse_attention", "train", *argv],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_close_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_train_with_two_ranks_per_sequence_and_ddp_equals_one_process(corpus, tmp_path):
    """4 processes: 2 sequences of 2 shards each per step train the weights one process
    trains on batches of 4 whole sequences (learned positions)."""
    common = [*TINY_RUN, "--data", str(corpus), "--steps", "3"]
    _torchrun(4, *common, "--batch-size", "2", "--context-parallel", "2", "--out", str(tmp_path / "cp"))
    cli.run(["train", *common, "--batch-size", "4", "--out", str(tmp_path / "single")])
    _assert_close_weights(tmp_path / "cp", tmp_path / "single")


def test_a_context_parallel_run_resumes(corpus, tmp_path):
    """2 ranks per sequence, rotary positions: 2 steps, then resumed to 3, train the weights
    one process trains in 3 steps."""
    common = [*TINY_RUN, "--data", str(corpus), "--positions", "rotary", "--batch-size", "2"]
    parallel = [*common, "--context-parallel", "2", "--out", str(tmp_path / "cp")]
    _torchrun(2, *parallel, "--steps", "2")
    _torchrun(2, *parallel, "--steps", "3", "--resume")
    cli.run(["train", *common, "--steps", "3", "--out", str(tmp_path / "single")])
    _assert_close_weights(tmp_path / "cp", tmp_path / "single")


def test_context_parallel_settings_are_checked():
    from sparse_attention.training.context_parallel import split_world

    with pytest.raises(ValueError, match="context_parallel: 3 ranks per sequence do not divide the 4"):
        split_world(0, 4, 3)
    place = split_world(5, 8, 2)
    assert (place.rank, place.data_rank, place.data_world) == (1, 2, 4)


def test_the_benchmark_writes_its_tables_on_paper(tmp_path):
    from sparse_attention.benchmark import context_parallel as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    text = bench.run(parser.parse_args(["--no-measured", "--paper-seq-lens", "8192",
                                        "--paper-worlds", "4", "--out", str(tmp_path)]))
    rows = json.loads((tmp_path / "results.json").read_text())["on_paper"]
    assert [row["layout"] for row in rows] == ["local", "fixed", "bigbird"]
    assert all(0 < row["received_bytes"] < row["ring_bytes"] for row in rows)
    assert "| local | 8k | 4 |" in text and (tmp_path / "results.md").is_file()
