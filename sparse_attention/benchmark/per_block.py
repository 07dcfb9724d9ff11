"""`sparse-attention bench --per-block`: the CPU kernels' work rate against PyTorch's own.

GFLOP/s per computed block (flops.py) of our forward and backward against torch SDPA's dense
flash kernel on the same inputs (credited N^2, halved when causal), and of our forward against
compiled FlexAttention on the same block mask, for the AVX2 and the AVX-512 build on one
machine. The command re-runs itself once per instruction set in a subprocess: with
ATEN_CPU_CAPABILITY=avx2 (our kernels dispatch on ATen's capability) with ONEDNN_MAX_CPU_ISA=AVX2
and MKL_ENABLE_INSTRUCTIONS=AVX2 (which limit the GEMMs under SDPA the same way), and with the
defaults. In each, the contenders are called in turn, round after round, so that a change of
load on the machine hits them alike; medians are reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention.benchmark import flops, machine
from sparse_attention.benchmark.cases import Case
from sparse_attention.benchmark.flex import compiled_flex, flex_block_mask

# Instruction set -> environment of its subprocess (on top of this process's).
BUILDS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
          "avx512": {}}
DEFAULTS = {"patterns": ("dense", "fixed"), "seq_lens": (8192,), "head_dims": (64, 128),
            "dtypes": ("float32", "bfloat16")}
# The targets: ours / SDPA forward and backward, ours / Flex forward.
TARGETS = {"forward": 1.2, "backward": 1.1, "flex": 3.0}


@dataclasses.dataclass
class Cell:
    build: str
    case: Case
    capability: str   # the instruction set our kernels ran with
    gflops: dict      # contender -> GFLOP/s per computed block ("ours fwd", "sdpa bwd", ...)

    def ratio(self, ours: str, other: str) -> float | None:
        a, b = self.gflops.get(ours), self.gflops.get(other)
        return None if not a or not b else a / b


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _backward_seconds(forward) -> float:
    """Seconds of one backward pass alone: the forward runs first, untimed. (A difference of
    two medians, forward + backward minus forward, can come out negative on a busy machine.)"""
    out, inputs, grad = forward()
    start = time.perf_counter()
    torch.autograd.grad(out, inputs, grad)
    return time.perf_counter() - start


def _interleaved_medians(timers: dict, repeats: int) -> dict:
    """Median seconds of each timer (a callable that returns the seconds it measured) over
    `repeats` rounds, all of them called in each round (after one warm-up round)."""
    for timer in timers.values():
        timer()
    times = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: statistics.median(t) for name, t in times.items()}


def measure(case: Case, repeats: int, flex: bool = True) -> dict:
    """GFLOP/s per computed block of ours, SDPA and Flex on one case."""
    torch.manual_seed(0)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    q, k, v = (torch.randn(shape, dtype=case.torch_dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=case.torch_dtype)
    layout, causal = case.layout(), case.causal

    def ours():
        return sa.sparse_attention(q, k, v, layout, causal=causal)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def forward(fn):
        def call():
            with torch.no_grad():
                return fn()
        return lambda: _seconds(call)

    def backward(fn):
        return lambda: _backward_seconds(lambda: (fn(), (q, k, v), grad))

    timers = {"ours fwd": forward(ours), "ours bwd": backward(ours),
              "sdpa fwd": forward(sdpa), "sdpa bwd": backward(sdpa)}
    if flex:
        block_mask = flex_block_mask(layout, case.seq_len, case.seq_len, causal, "cpu")
        compiled = compiled_flex()
        fq, fk, fv = (t.detach() for t in (q, k, v))
        timers["flex fwd"] = lambda: _seconds(lambda: compiled(fq, fk, fv, block_mask=block_mask))
    t = _interleaved_medians(timers, repeats)
    ours_work = layout.flops(case.head_dim, case.batch, case.heads)
    dense_work = flops.dense_flops(case.seq_len, case.head_dim, case.batch, case.heads, causal)

    def gf(work, seconds):
        rate = flops.rate(work, seconds)
        return None if rate is None else rate / 1e9

    rates = {
        "ours fwd": gf(ours_work, t["ours fwd"]),
        "ours bwd": gf(flops.backward_flops(ours_work), t["ours bwd"]),
        "sdpa fwd": gf(dense_work, t["sdpa fwd"]),
        "sdpa bwd": gf(flops.backward_flops(dense_work), t["sdpa bwd"]),
    }
    if flex:
        rates["flex fwd"] = gf(ours_work, t["flex fwd"])
    return rates


def _cases(args) -> list[Case]:
    return [Case(pattern, n, d, dtype, args.batch_size, args.heads, args.block)
            for dtype in args.dtypes for d in args.head_dims for n in args.seq_lens
            for pattern in args.patterns]


def worker(args) -> None:
    """One instruction set: measures every case and writes JSON to args.worker_out."""
    if args.threads:
        torch.set_num_threads(args.threads)
    header = machine.describe()
    print(f"[{args.build}] {machine.one_line(header)}", flush=True)
    cells = []
    for case in _cases(args):
        rates = measure(case, args.repeats, flex=not args.no_flex)
        cells.append({"case": dataclasses.asdict(case), "gflops": rates})
        print(f"[{args.build}] {case.pattern} N={case.seq_len} D={case.head_dim} {case.dtype}: "
              + ", ".join(f"{k} {v:.0f}" for k, v in rates.items() if v), flush=True)
    Path(args.worker_out).write_text(json.dumps({"machine": header, "cells": cells}))


def _ratio_cell(value: float | None, target: float) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" + ("" if value >= target else " (below)")


def _gf(value) -> str:
    return "-" if not value else f"{value:.0f}"


def markdown_table(cells: list[Cell]) -> str:
    head = ("| build | pattern | N | dtype | D | ours fwd | SDPA fwd | fwd ratio | ours bwd "
            "| SDPA bwd | bwd ratio | Flex fwd | vs Flex |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        case = c.case
        lines.append("| " + " | ".join([
            c.capability, case.pattern, str(case.seq_len), case.dtype, str(case.head_dim),
            _gf(c.gflops.get("ours fwd")), _gf(c.gflops.get("sdpa fwd")),
            _ratio_cell(c.ratio("ours fwd", "sdpa fwd"), TARGETS["forward"]),
            _gf(c.gflops.get("ours bwd")), _gf(c.gflops.get("sdpa bwd")),
            _ratio_cell(c.ratio("ours bwd", "sdpa bwd"), TARGETS["backward"]),
            _gf(c.gflops.get("flex fwd")),
            _ratio_cell(c.ratio("ours fwd", "flex fwd"), TARGETS["flex"]),
        ]) + " |")
    return "\n".join(lines)


def _load() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def run(args) -> list[Cell]:
    """Runs the worker once per instruction set in args.builds and writes per_block.md and
    per_block.json to args.out."""
    args.out.mkdir(parents=True, exist_ok=True)
    forwarded = ["--patterns", ",".join(args.patterns), "--seq-lens", ",".join(map(str, args.seq_lens)),
                 "--head-dims", ",".join(map(str, args.head_dims)), "--dtypes", ",".join(args.dtypes),
                 "--batch-size", str(args.batch_size), "--heads", str(args.heads),
                 "--block", str(args.block), "--repeats", str(args.repeats)]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    if args.no_flex:
        forwarded.append("--no-flex")
    cells, machines, loads = [], {}, [_load()]
    for build in args.builds:
        path = args.out / f"per_block_{build}.json"
        # Each build compiles Flex into an Inductor cache of its own: the cache's keys leave out
        # ATEN_CPU_CAPABILITY, and kernels compiled under one instruction set, loaded by a later
        # process under the other, returned wrong values or aborted.
        with tempfile.TemporaryDirectory(prefix=f"sparse-attention-inductor-{build}-") as cache:
            env = {**os.environ, **BUILDS[build], "TORCHINDUCTOR_CACHE_DIR": cache}
            subprocess.run([sys.executable, "-m", "sparse_attention.benchmark.per_block", *forwarded,
                            "--build", build, "--worker-out", str(path)], env=env, check=True)
        data = json.loads(path.read_text())
        path.unlink()
        machines[build] = data["machine"]
        loads.append(_load())
        for item in data["cells"]:
            cells.append(Cell(build, Case(**item["case"]), data["machine"]["cpu capability"],
                              item["gflops"]))
    header = next(iter(machines.values()))
    shared = {k: v for k, v in header.items() if k != "cpu capability"}
    text = "\n".join([
        f"Machine: {', '.join(f'{k} {v}' for k, v in shared.items())}",
        f"Command: `{args.command}`",
        f"Load average (1, 5, 15 min) before and after each build: {' | '.join(loads)}", "",
        f"B={args.batch_size}, H={args.heads}, block {args.block}; GFLOP/s {flops.PER_BLOCK}; "
        "SDPA is dense (causal where the pattern is) and credited N^2, halved when causal; "
        f"medians of {args.repeats} interleaved rounds. Targets: forward >= "
        f"{TARGETS['forward']}x and backward >= {TARGETS['backward']}x SDPA's rate, forward >= "
        f"{TARGETS['flex']}x compiled Flex's on the same block mask.", "",
        markdown_table(cells)])
    (args.out / "per_block.md").write_text(text + "\n")
    (args.out / "per_block.json").write_text(json.dumps({
        "machines": machines, "load": loads,
        "cells": [{"build": c.build, "capability": c.capability, "case": dataclasses.asdict(c.case),
                   "gflops": c.gflops} for c in cells]}, indent=1))
    print(text)
    print(f"\nwrote {args.out / 'per_block.md'}, per_block.json")
    return cells


def _worker_arguments(parser) -> None:
    from sparse_attention.benchmark.command import csv_of

    for name, kind in (("patterns", str), ("seq_lens", int), ("head_dims", int), ("dtypes", str)):
        parser.add_argument("--" + name.replace("_", "-"), type=csv_of(kind), default=DEFAULTS[name])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-flex", action="store_true")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    _worker_arguments(parser)
    parser.add_argument("--build", required=True)
    parser.add_argument("--worker-out", required=True)
    worker(parser.parse_args())
