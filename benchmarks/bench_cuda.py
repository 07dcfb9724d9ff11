"""GPU benchmark: block-sparse attention forward and backward against SDPA (flash backend,
dense causal) and compiled FlexAttention on the same block masks.

Rates are TFLOP/s per computed block (sparse_attention/benchmark/flops.py, on top of
BlockLayout.flops): a computed block pair costs 4 * bs * bs * D FLOPs forward (partial blocks
count as full), backward 2.5x that, times B * H. Every implementation is credited with the
same FLOPs for the same mask, so rates compare time directly. Times are medians of 10 calls
after 3 warm-up calls, timed with CUDA events (sparse_attention/benchmark/timing.py). Prints a
short table and writes every measurement to --out (JSON lines).

    python benchmarks/bench_cuda.py --out bench_results.jsonl [--budget-s 200] [--hopper]
    python benchmarks/bench_cuda.py --head-dims 96 --block 16 ...   (padded D, gathered blocks)

--hopper also times our opt-in Hopper kernels (cuda_kernels="hopper": forward and backward) as
"ours_sm90", and --fa2 the opt-in FlashAttention-2 tiling of the mma.sync forward
(SPARSE_ATTENTION_CUDA_FA2_TILING=1) as "ours_fa2", each printed under the row against the
default kernels and Flex.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention.benchmark import environment, flops, machine
from sparse_attention.benchmark.cases import CAUSAL_BY_PATTERN, Case
from sparse_attention.benchmark.flex import compiled_flex, flex_block_mask
from sparse_attention.benchmark.timing import median_time

BLOCK = 128
FA2_TILING = "SPARSE_ATTENTION_CUDA_FA2_TILING"
# The suite's patterns (with their sqrt(N) defaults and causality: benchmark/cases.py).
LAYOUTS = ("dense", "local", "fixed", "bigbird")


def cuda_time_ms(fn) -> float:
    return median_time(fn, repeats=10, warmup=3, device="cuda") * 1e3


def tflops(count: float, ms: float) -> float:
    return flops.rate(count, ms / 1e3) / 1e12


def fwd_bwd_ms(forward, q, k, v) -> tuple[float, float]:
    """(forward ms, backward ms); backward timed alone on a retained graph."""
    with torch.no_grad():
        fwd = cuda_time_ms(lambda: forward(q, k, v))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = forward(qg, kg, vg)
    grad = torch.randn_like(out)
    bwd = cuda_time_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), grad, retain_graph=True))
    return fwd, bwd


# --- the three implementations on one mask -----------------------------------------------

def fa2_tiling():
    """The FA2-tiled mma.sync forward for the calls inside (the op reads the variable per call)."""
    return environment.variable(FA2_TILING, "1")


def run_config(head_dim: int, n: int, layout_name: str, flex, results: list,
               hopper: bool = False, fa2: bool = False, block: int = BLOCK) -> None:
    heads = max(1, 2048 // head_dim)
    batch = max(1, 16384 // n)
    case = Case(layout_name, n, head_dim, "bfloat16", batch, heads, block)
    causal = case.causal
    layout = case.layout()
    flops_fwd = layout.flops(head_dim, batch, heads)
    q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=case.torch_dtype)
               for _ in range(3))
    row = {"head_dim": head_dim, "n": n, "batch": batch, "heads": heads, "layout": layout_name,
           "block": block, "causal": causal, "density": layout.density, "blocks": layout.nnz,
           "gflop_fwd": flops_fwd / 1e9}

    def ours(q, k, v, cuda_kernels="mma", **kwargs):
        return sa.sparse_attention(q, k, v, layout, causal=causal, cuda_kernels=cuda_kernels, **kwargs)

    def ours_det(q, k, v):
        return ours(q, k, v, deterministic=True)

    impls = {"ours": ours}
    if hopper:
        impls["ours_sm90"] = lambda q, k, v: ours(q, k, v, cuda_kernels="hopper")
    if fa2:
        def ours_fa2(q, k, v):
            with fa2_tiling():
                return ours(q, k, v)

        impls["ours_fa2"] = ours_fa2

    if head_dim == 128 and n == 16384:
        impls["ours_deterministic"] = ours_det
    if flex is not None:
        block_mask = flex_block_mask(layout, n, n, causal, "cuda")
        impls["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    if layout_name == "dense":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        impls["sdpa_flash"] = sdpa
    for name, fn in impls.items():
        try:
            fwd, bwd = fwd_bwd_ms(fn, q, k, v)
            row[name] = {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_tflops": tflops(flops_fwd, fwd),
                         "bwd_tflops": tflops(flops.backward_flops(flops_fwd), bwd)}
        except Exception as error:  # a failing implementation must not hide the others
            row[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(f"  {name} failed: {row[name]['error']}", file=sys.stderr)
    results.append(row)
    del q, k, v
    torch.cuda.empty_cache()


def fmt(row: dict, impl: str, key: str) -> str:
    value = row.get(impl, {}).get(key)
    return "-" if value is None else f"{value:.1f}" if "tflops" in key else f"{value:.2f}"


HEADER = (f"{'D':>4} {'N':>6} {'layout':>8} {'dens':>5} | {'ours fwd':>8} {'TF/s':>6} {'flex':>6} "
          f"{'x':>5} {'sdpa':>6} | {'ours bwd':>8} {'TF/s':>6} {'flex':>6} {'x':>5} {'sdpa':>6} | {'%dense':>6}")
LEGEND = (f"ms: ours; TF/s: TFLOP/s {flops.PER_BLOCK} of ours, flex and sdpa; x: "
          "FlexAttention time / ours (>1 = ours faster); %dense: our forward rate as a share of "
          "our dense-causal rate at the same D and N.")


def table_row(r: dict, results: list) -> str:
    o, f = r.get("ours", {}), r.get("flex", {})
    sp_f = o.get("fwd_ms") and f.get("fwd_ms") and f["fwd_ms"] / o["fwd_ms"]
    sp_b = o.get("bwd_ms") and f.get("bwd_ms") and f["bwd_ms"] / o["bwd_ms"]
    dense = next((d.get("ours", {}).get("fwd_tflops") for d in results if d["layout"] == "dense"
                  and (d["head_dim"], d["n"]) == (r["head_dim"], r["n"])), None)
    rel = o.get("fwd_tflops") / dense * 100 if dense and o.get("fwd_tflops") else None
    return (f"{r['head_dim']:>4} {r['n']:>6} {r['layout']:>8} {r['density']:>5.2f} | "
            f"{fmt(r, 'ours', 'fwd_ms'):>8} {fmt(r, 'ours', 'fwd_tflops'):>6} "
            f"{fmt(r, 'flex', 'fwd_tflops'):>6} {('%.2f' % sp_f) if sp_f else '-':>5} "
            f"{fmt(r, 'sdpa_flash', 'fwd_tflops'):>6} | "
            f"{fmt(r, 'ours', 'bwd_ms'):>8} {fmt(r, 'ours', 'bwd_tflops'):>6} "
            f"{fmt(r, 'flex', 'bwd_tflops'):>6} {('%.2f' % sp_b) if sp_b else '-':>5} "
            f"{fmt(r, 'sdpa_flash', 'bwd_tflops'):>6} | {('%.0f' % rel) if rel else '-':>6}")


def variant_row(r: dict, impl: str, label: str) -> str:
    """An opt-in kernel's times under its row: x = other's time / its time (>1 = it is faster)."""
    o, h, f = r.get("ours", {}), r.get(impl, {}), r.get("flex", {})
    if "fwd_ms" not in h:
        return f"{'':>27}   {label}: {h.get('error', '-')}"

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}" if a.get(key) and b.get(key) else "-"

    return (f"{'':>27}   {label} fwd {fmt(r, impl, 'fwd_ms')} ms {fmt(r, impl, 'fwd_tflops')} "
            f"TF/s ({ratio(o, h, 'fwd_ms')}x mma.sync, {ratio(f, h, 'fwd_ms')}x flex), "
            f"bwd {fmt(r, impl, 'bwd_ms')} ms {fmt(r, impl, 'bwd_tflops')} TF/s "
            f"({ratio(o, h, 'bwd_ms')}x mma.sync, {ratio(f, h, 'bwd_ms')}x flex)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_cuda_results.jsonl")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="stop starting new configurations after this many seconds")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 4096, 8192, 32768])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS),
                        choices=sorted(CAUSAL_BY_PATTERN))
    parser.add_argument("--block", type=int, default=BLOCK,
                        help=f"layout block size (default {BLOCK}); 16 and 32 run on the gathered path")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--hopper", action="store_true",
                        help="also time the opt-in Hopper kernels (ours_sm90)")
    parser.add_argument("--fa2", action="store_true",
                        help="also time the opt-in FA2-tiled mma.sync forward (ours_fa2)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not sa.built_with_cuda():
        print("bench_cuda: needs a GPU and the CUDA build", file=sys.stderr)
        return 1
    flex = None
    if not args.no_flex:
        try:
            flex = compiled_flex()
        except Exception as error:
            print(f"FlexAttention unavailable: {error}", file=sys.stderr)
    print(machine.one_line(machine.describe()))
    print(f"block {args.block}, bf16")
    print(HEADER, flush=True)
    start = time.monotonic()
    results, skipped = [], []
    # Most wanted first: the target configuration (D 128, N 16k) for every layout.
    for head_dim in args.head_dims:
        for n in args.seq_lens:
            for layout_name in args.layouts:
                if time.monotonic() - start > args.budget_s:
                    skipped.append((head_dim, n, layout_name))
                    continue
                t0 = time.monotonic()
                run_config(head_dim, n, layout_name, flex, results, args.hopper, args.fa2, args.block)
                print(table_row(results[-1], results), flush=True)  # a row at a time: a timeout keeps them
                for impl, label, wanted in (("ours_sm90", "sm90", args.hopper), ("ours_fa2", "fa2", args.fa2)):
                    if wanted:
                        print(variant_row(results[-1], impl, label), flush=True)
                print(f"  D{head_dim} N{n} {layout_name}: {time.monotonic() - t0:.1f}s", file=sys.stderr)
                with open(args.out, "w") as f:
                    for r in results:
                        f.write(json.dumps(r) + "\n")
    print(LEGEND)
    if skipped:
        print(f"skipped for time ({len(skipped)}): " + ", ".join(f"D{d} N{n} {l}" for d, n, l in skipped))
    print(f"full results: {args.out}")
    return 0 if all("error" not in r.get("ours", {}) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
