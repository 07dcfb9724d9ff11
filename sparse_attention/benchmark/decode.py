"""`python benchmarks/bench_decode.py`: one decode step (a few queries over a long cache) with a
local + global layout, ours against what a user of torch has for the same rule.

q [1, --heads, --queries, D] over k, v [1, --kv-heads, Nk, D] (GQA), the layout
`sa.Longformer(--window, block_size=--block)` (a causal window plus global token 0), causal
(bottom-right). Contenders, in the same run:
- ours on all threads and on one thread (calls of at most 64 queries split each row's key
  blocks into pieces walked in parallel, so even one head's row uses every thread); on CUDA
  (--device cuda) ours with the opt-in split of long rows across thread blocks (split-KV,
  sparse_attention.split_rows) and without it;
- SDPA with the boolean element mask of the same layout [queries, Nk], and SDPA without a mask
  over the whole cache (dense decoding);
- compiled FlexAttention with the same blocks as a prebuilt BlockMask (forward only, as every
  decode step; on CUDA, with one query, that is FlexDecoding).
Times are medians of benchmark.timing.median_time; markdown on stdout, results.md and
results.json in --out.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention import reference, split_rows
from sparse_attention.benchmark import environment, machine
from sparse_attention.benchmark.command import csv_of
from sparse_attention.benchmark.flex import compiled_flex, flex_block_mask
from sparse_attention.benchmark.layouts import Skipped, _ms, _progress, add_timing_arguments, publish
from sparse_attention.benchmark.timing import median_time

CONTENDERS = ("ours", "ours_1_thread", "sdpa_masked", "sdpa_dense", "flex")
# On CUDA "ours" splits long rows (opt-in there) and the second contender does not.
SECOND = {"cpu": ("ours_1_thread", "ours on 1 thread"), "cuda": ("ours_unsplit", "ours unsplit")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-lens", type=csv_of(int), default=(8192, 32768, 131072),
                        help="cache lengths Nk (default 8192,32768,131072)")
    parser.add_argument("--queries", type=int, default=1, help="queries per step (default 1)")
    parser.add_argument("--heads", type=int, default=32, help="H (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="Hkv (default 8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtypes", type=csv_of(str), default=("float32", "bfloat16"))
    parser.add_argument("--window", type=int, default=4096, help="local window in tokens (default 4096)")
    parser.add_argument("--block", type=int, default=64, help="block size (default 64)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    add_timing_arguments(parser, repeats=10, budget=20.0, max_call_s=60.0)


def _time(fn, args):
    try:
        return median_time(fn, args.repeats, max(1, args.warmup), device=args.device,
                           budget=args.budget)
    except Exception as error:  # a failure is a result: report it, run the rest
        return Skipped(f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")


def measure(args) -> list[dict]:
    pattern = sa.Longformer(args.window, block_size=args.block)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.seq_lens:
            _progress(f"{dtype_name} Nk={n}")
            g = torch.Generator().manual_seed(args.seed)
            q = torch.randn(1, args.heads, args.queries, args.head_dim, generator=g).to(args.device, dtype)
            k, v = (torch.randn(1, args.kv_heads, n, args.head_dim, generator=g).to(args.device, dtype)
                    for _ in range(2))
            layout = pattern.layout(args.queries, n, num_heads=args.heads, causal=True)
            mask = reference.element_mask(layout, args.queries, n, causal=True)[0].to(args.device)
            row = {"dtype": dtype_name, "keys": n, "computed": layout.density}
            with _split_kv(True):
                row["ours"] = _time(lambda: sa.sparse_attention(q, k, v, pattern, causal=True), args)
            second = SECOND[torch.device(args.device).type][0]
            with _one_thread(args.device), _split_kv(False):
                row[second] = _time(lambda: sa.sparse_attention(q, k, v, pattern, causal=True), args)
            row["sdpa_masked"] = _time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                                       args)
            row["sdpa_dense"] = _time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args)
            if not args.no_flex:
                block_mask = flex_block_mask(layout, args.queries, n, True, q.device)
                flex = compiled_flex()
                row["flex"] = _time(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True), args)
            rows.append(row)
    return rows


def _split_kv(on: bool):
    """CUDA calls with (or without) the opt-in split of long rows; the CPU splits its own."""
    return environment.variable(split_rows.CUDA_SPLIT_ENV, "1" if on else "0")


@contextlib.contextmanager
def _one_thread(device: str):
    """The CPU kernels on one thread (CUDA calls as they are)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else ""


def table(rows: list[dict], device: str = "cpu") -> str:
    second, title = SECOND[torch.device(device).type]
    lines = [f"| dtype | Nk | computed | ours ms | {title} ms | SDPA masked ms | "
             "SDPA dense ms | Flex ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        flex = r.get("flex")
        lines.append(
            f"| {r['dtype']} | {r['keys']} | {100 * r['computed']:.1f}% | {_ms(r['ours'])} | "
            f"{_ms(r[second])} ({_ratio(r[second], r['ours'])}) | "
            f"{_ms(r['sdpa_masked'])} ({_ratio(r['sdpa_masked'], r['ours'])}) | "
            f"{_ms(r['sdpa_dense'])} ({_ratio(r['sdpa_dense'], r['ours'])}) | "
            f"{'n/a' if flex is None else _ms(flex)} ({_ratio(flex, r['ours'])}) |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    header = machine.describe()
    rows = measure(args)
    text = (f"# Decode step: {args.queries} query, local + global layout\n\n{machine.one_line(header)}\n\n"
            f"H = {args.heads}, Hkv = {args.kv_heads}, D = {args.head_dim}, Longformer window "
            f"{args.window}, block {args.block}, causal; median of {args.repeats} calls. In parentheses: "
            "the contender's time over ours.\n\n" + table(rows, args.device))
    return publish(args, header, text, {"rows": [{k: str(v) if isinstance(v, Skipped) else v
                                                  for k, v in r.items()} for r in rows]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_decode.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
