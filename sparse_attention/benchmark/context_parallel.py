"""`python benchmarks/bench_context_parallel.py`: context parallelism's time and traffic.

Two tables (markdown on stdout; results.md and results.json in --out):

1. measured: `sparse_attention.distributed.context_parallel_attention`, forward + backward,
   on --worlds gloo processes of this machine (one thread each), causal, zigzag sharding,
   for local, fixed and BigBird patterns against a dense ring: the same code with a dense
   layout, which sends every rank's whole shard to every other rank (as ring attention
   does) and computes every block. The time is the slowest rank's median; the bytes are
   those one rank sends (the most over the ranks, forward and backward), as counted by
   sparse_attention.distributed.traffic. torch's own context_parallel with SDPA is tried
   too; the table says why where it does not run.
2. on paper: from the layout alone (sparse_attention.distributed.on_paper, no attention
   run), K/V bytes a rank receives per forward and messages per rank, for N = 128k to 1M
   tokens over 8 to 64 ranks, against the dense ring's world - 1 steps of a whole shard.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention.benchmark import machine
from sparse_attention.benchmark.command import csv_of
from sparse_attention.benchmark.timing import median_time
from sparse_attention.distributed import context_parallel_attention, group_sharding, traffic
from sparse_attention.distributed.local_processes import run_on_gloo
from sparse_attention.distributed.on_paper import kv_bytes_per_token, traffic_on_paper

MIB = 2**20


def patterns(block_size: int) -> dict:
    """The patterns both tables compare, by name; "dense" is the dense ring."""
    return {"local": sa.Local(8 * block_size, block_size=block_size),
            "fixed": sa.Fixed(8 * block_size, block_size=block_size),
            "bigbird": sa.BigBird(block_size=block_size),
            "dense": sa.Dense(block_size=block_size)}


def _measure_rank(rank: int, world: int, args) -> dict:
    """This rank's seconds and bytes sent per pattern (and torch's context_parallel's)."""
    seq, _ = group_sharding(None, "zigzag", args.seq_len // world)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (seq.shard(torch.randn(args.batch, args.heads, args.seq_len, args.head_dim,
                                     generator=generator), rank, 2).requires_grad_()
               for _ in range(3))
    results = {}
    for name, pattern in patterns(args.block).items():
        def step():
            out = context_parallel_attention(q, k, v, pattern, causal=True, sharding="zigzag")
            out.sum().backward()

        step()  # plans and layouts are built once
        traffic.reset()
        step()
        sent = dict(traffic.sent_bytes)
        seconds = median_time(step, repeats=args.repeats, warmup=0)
        results[name] = {"seconds": seconds, "forward_bytes": sent.get("forward", 0),
                         "backward_bytes": sent.get("backward", 0)}
    results["torch context_parallel (SDPA)"] = _torch_context_parallel(world, args)
    return results


def _torch_context_parallel(world: int, args) -> dict:
    """torch.distributed.tensor.experimental.context_parallel with causal SDPA, forward +
    backward, or the error it raises here."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh("cpu", (world,))
        buffers = [torch.randn(args.batch, args.heads, args.seq_len, args.head_dim)
                   for _ in range(3)]

        def step():
            with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
                q, k, v = (t.detach().requires_grad_() for t in buffers)
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        return {"seconds": median_time(step, repeats=args.repeats, warmup=1)}
    except Exception as error:  # reported in the table, not raised: it is torch's limitation
        return {"error": f"{type(error).__name__}: {error}".splitlines()[0]}


def measured(args) -> list[dict]:
    rows = []
    for world in args.worlds:
        per_rank = run_on_gloo(_measure_rank, world, args, timeout_s=args.timeout_s)
        for name in per_rank[0]:
            cells = [ranks[name] for ranks in per_rank]
            row = {"world": world, "layout": name}
            if "error" in cells[0]:
                row["error"] = cells[0]["error"]
            else:
                row["seconds"] = max(c["seconds"] for c in cells)
                for field in ("forward_bytes", "backward_bytes"):
                    if field in cells[0]:
                        row[field] = max(c[field] for c in cells)
            rows.append(row)
    return rows


def on_paper(args) -> list[dict]:
    rows = []
    bytes_per_token = kv_bytes_per_token(args.paper_kv_heads, args.paper_head_dim, 2)
    for name, pattern in patterns(args.paper_block).items():
        if name == "dense":
            continue
        for seq_len in args.paper_seq_lens:
            layout = pattern.layout(seq_len, seq_len, causal=True)
            for world in args.paper_worlds:
                t = traffic_on_paper(layout, world, causal=True, sharding="zigzag",
                                     bytes_per_token=bytes_per_token)
                rows.append({"layout": name, "seq_len": seq_len, "world": world,
                             "received_bytes": t.bytes_received,
                             "mean_received_bytes": t.mean_tokens_received * bytes_per_token,
                             "messages": t.messages, "ring_bytes": t.ring_bytes,
                             "ring_steps": t.ring_steps})
    return rows


def _mib(value) -> str:
    return f"{value / MIB:.2f}"


def ring_bytes(world: int, args) -> int:
    """What a ring sends per rank in forward + backward: world - 1 steps of a whole K/V shard,
    and as many of dK/dV."""
    shard_tokens = args.seq_len // world
    return 2 * (world - 1) * shard_tokens * kv_bytes_per_token(args.heads, args.head_dim, 4,
                                                               args.batch)


def measured_table(rows: list[dict], args) -> str:
    lines = ["| ranks | layout | fwd+bwd ms | dense's time / this | sent MiB fwd / bwd | sent / ring |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['world']} | {row['layout']} | does not run: {row['error']} | | | |")
            continue
        dense = next(r for r in rows if r["world"] == row["world"] and r["layout"] == "dense")
        cells = [str(row["world"]), row["layout"], f"{row['seconds'] * 1e3:.0f}",
                 f"{dense['seconds'] / row['seconds']:.2f}"]
        if "forward_bytes" in row:
            sent = row["forward_bytes"] + row["backward_bytes"]
            cells += [f"{_mib(row['forward_bytes'])} / {_mib(row['backward_bytes'])}",
                      f"{sent / ring_bytes(row['world'], args):.3f}"]
        else:
            cells += ["(a ring)", "1"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table(rows: list[dict]) -> str:
    lines = ["| layout | N | ranks | MiB per rank (max / mean) | messages | ring MiB | ring steps "
             "| max / ring |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['layout']} | {row['seq_len'] // 1024}k | {row['world']} | "
                     f"{_mib(row['received_bytes'])} / {_mib(row['mean_received_bytes'])} | "
                     f"{row['messages']} | {_mib(row['ring_bytes'])} | {row['ring_steps']} | "
                     f"{row['received_bytes'] / row['ring_bytes']:.4f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worlds", type=csv_of(int), default=(2, 4))
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--paper-seq-lens", type=csv_of(int),
                        default=(131072, 262144, 524288, 1048576))
    parser.add_argument("--paper-worlds", type=csv_of(int), default=(8, 16, 32, 64))
    parser.add_argument("--paper-block", type=int, default=128)
    parser.add_argument("--paper-kv-heads", type=int, default=8)
    parser.add_argument("--paper-head-dim", type=int, default=128)
    parser.add_argument("--no-measured", action="store_true", help="the on-paper table only")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.md and results.json")


def report(header: dict, args, measured_rows: list[dict], paper_rows: list[dict]) -> str:
    """The markdown of both tables."""
    return "\n\n".join([
        "# Context parallelism", machine.one_line(header),
        f"## Measured: B={args.batch} H={args.heads} D={args.head_dim} N={args.seq_len} "
        f"block {args.block}, causal, zigzag, fp32, gloo on one machine, 1 thread per rank",
        measured_table(measured_rows, args) if measured_rows else "(not run)",
        f"## On paper: causal, zigzag, block {args.paper_block}, K/V of {args.paper_kv_heads} kv "
        f"heads x {args.paper_head_dim} dims in bf16 per token, per forward (the backward "
        "sends as much dK/dV back)",
        paper_table(paper_rows),
    ]) + "\n"


def run(args) -> str:
    header = machine.describe()
    measured_rows = [] if args.no_measured else measured(args)
    paper_rows = on_paper(args)
    text = report(header, args, measured_rows, paper_rows)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (args.out / "results.json").write_text(json.dumps(
            {"machine": header, "settings": settings, "measured": measured_rows,
             "on_paper": paper_rows}, indent=1) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_context_parallel.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
