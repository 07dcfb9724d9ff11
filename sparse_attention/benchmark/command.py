"""`sparse-attention bench` (also `python benchmarks/bench_attention.py`): our block-sparse
attention against torch SDPA (dense, and with the equivalent boolean mask) and compiled
FlexAttention (the equivalent BlockMask), in one process on the same inputs.

For each pattern (with its sqrt(N) defaults), sequence length, head dim and dtype it reports
median times, GFLOP/s per computed block (4 * bs^2 * D per block pair; backward 2.5x: see
flops.py), peak memory and speed-ups, then writes results.md, results.json and time_vs_n.png to --out.
Contenders predicted not to fit in memory are skipped, and the table says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparse_attention.benchmark import flops, machine, per_block, report
from sparse_attention.benchmark.cases import FULL_GRID, QUICK_GRID, grid
from sparse_attention.benchmark.contenders import Settings, measure_case


def csv_of(kind):
    """argparse type: a comma-separated list of `kind` values."""
    def parse(text: str):
        return tuple(kind(item) for item in text.split(",") if item)
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"small grid: {QUICK_GRID} (explicit flags still win)")
    parser.add_argument("--patterns", type=csv_of(str), help=f"default {','.join(FULL_GRID['patterns'])}")
    parser.add_argument("--seq-lens", type=csv_of(int),
                        help=f"default {','.join(map(str, FULL_GRID['seq_lens']))}")
    parser.add_argument("--head-dims", type=csv_of(int), help="default 64,128")
    parser.add_argument("--dtypes", type=csv_of(str), help="default float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--block", type=int, default=64, help="block size (default 64)")
    parser.add_argument("--repeats", type=int, help="timed calls, median reported (default 3)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed calls per measurement at most (default 20)")
    parser.add_argument("--skip", type=csv_of(str), default=(),
                        help="contenders to leave out: sdpa_masked, flex (comma-separated)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="folder for results.md, results.json, time_vs_n.png")
    parser.add_argument("--per-block", action="store_true",
                        help="instead: the CPU kernels' GFLOP/s per computed block against SDPA "
                             "(forward, backward) and compiled Flex (forward), for each of "
                             "--builds in a subprocess; writes per_block.md and per_block.json. "
                             f"Defaults: {per_block.DEFAULTS}, 5 repeats")
    parser.add_argument("--builds", type=csv_of(str), default=tuple(per_block.BUILDS),
                        help="with --per-block: instruction sets, avx2 and/or avx512 (default both)")


def _command_line() -> str:
    words = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    return ("sparse-attention bench " + " ".join(words)).strip()


def run_per_block(args: argparse.Namespace) -> list[per_block.Cell]:
    unknown = set(args.builds) - set(per_block.BUILDS)
    if unknown:
        raise ValueError(f"--builds: expected {sorted(per_block.BUILDS)}, got {sorted(unknown)}")
    given = {name: getattr(args, name) for name in per_block.DEFAULTS}
    settings = argparse.Namespace(
        **{name: value or per_block.DEFAULTS[name] for name, value in given.items()},
        builds=args.builds, batch_size=args.batch_size, heads=args.heads, block=args.block,
        repeats=args.repeats or 5, threads=args.threads,
        no_flex="flex" in args.skip, out=args.out, command=_command_line())
    return per_block.run(settings)


def run(args: argparse.Namespace) -> list[report.Row]:
    if getattr(args, "per_block", False):
        return run_per_block(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = QUICK_GRID if args.quick else FULL_GRID
    cases = grid(args.patterns or base["patterns"], args.seq_lens or base["seq_lens"],
                 args.head_dims or base["head_dims"], args.dtypes or base["dtypes"],
                 args.batch_size, args.heads, args.block)
    unknown = set(args.skip) - {"sdpa_masked", "flex"}
    if unknown:
        raise ValueError(f"--skip: expected sdpa_masked and/or flex, got {sorted(unknown)}")
    settings = Settings(repeats=args.repeats or 3, budget=args.budget, device=args.device,
                        skip=frozenset(args.skip))
    header = machine.describe()
    print(machine.one_line(header))
    print(f"B={args.batch_size} H={args.heads} block={args.block}; {len(cases)} cases", flush=True)

    rows, dense_cache = [], {}
    for case in cases:
        layout, results = measure_case(case, settings, dense_cache)
        row = report.Row(case, layout.density, layout.flops(case.head_dim, case.batch, case.heads),
                         results)
        rows.append(row)
        ours, dense = results["ours"], results["sdpa_dense"]
        print(f"{case.pattern:8s} N={case.seq_len:6d} D={case.head_dim:3d} {case.dtype:8s} "
              f"density {row.density:6.1%}  ours fwd {ours.forward * 1e3:8.1f} ms "
              f"fwd+bwd {ours.forward_backward * 1e3:9.1f} ms  "
              f"SDPA dense fwd+bwd {dense.forward_backward * 1e3:9.1f} ms", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    table = report.markdown_table(rows)
    notes = report.notes(rows)
    # Growth is fitted from 4k up (shorter runs are dominated by fixed costs), or over the
    # two longest lengths of a smaller grid.
    longest = max(case.seq_len for case in cases)
    growth = report.growth_exponents(rows, min_seq_len=min(4096, longest // 2))
    command = _command_line()
    text = "\n".join([
        f"Machine: {', '.join(f'{k} {v}' for k, v in header.items())}",
        f"Command: `{command}`", "",
        f"B={args.batch_size}, H={args.heads}, block {args.block}. Times are medians in ms; "
        f"GF/s {flops.PER_BLOCK}, dense SDPA's on N^2 (halved when causal). Speed-ups are SDPA dense / ours (forward+backward) "
        "and Flex / ours (forward). Peak memory is forward+backward above the inputs.", "",
        table, "", *(f"- {line}" for line in growth + notes)])
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(report.to_json(rows, header))
    plotted = report.plot(rows, args.out / "time_vs_n.png")
    print()
    print(text)
    print(f"\nwrote {args.out / 'results.md'}, results.json"
          + (", time_vs_n.png" if plotted else " (no plot: pip install matplotlib)"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
