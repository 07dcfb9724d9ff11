"""`python benchmarks/bench_layouts.py`: what a layout made per call and per input costs, and
what content-based selection plus block-sparse attention buys, on causal attention.

Three tables (markdown on stdout; results.md and results.json in --out):

1. lists: TensorLayout.block_lists (the kernels' lists, built per call with tensor ops)
   against sa.sparse_attention's forward on the same per-input layout (whose time includes
   building them), and the lists' share of the forward (the target is 5% at most); the peak
   memory of building them.
2. selection: sa.select_blocks (top_k = --density of the key blocks, heads="kv") plus our
   attention against dense causal SDPA, forward and forward + backward, the selection's time
   shown apart.
3. flex: on the same selected block mask, compiled FlexAttention with create_block_mask per
   call (its mask_mod looks the block mask up: block_mask[b, h, q // bs, kv // bs] & causal)
   and with the BlockMask built once. The mask_mod is made once per shape and reads a buffer
   that each call overwrites with its new block mask, as a user keeping Flex free of
   recompiles would write it (a new closure per call costs Flex much more). create_block_mask
   is compiled (torch.compile(create_block_mask), as Flex's docs advise; --flex-create eager
   materialises the B * H * N^2 mask). Forward only on the CPU, where Flex has no backward.

Rates are GFLOP/s per computed block (flops.PER_BLOCK: 4 * bs^2 * D FLOPs per block pair,
times B * H; backward 2.5x, timed as forward + backward minus forward). Times are medians of
benchmark.timing.median_time; a call predicted (from the previous length, as N^2) to take more
than --max-call-s, or not to fit in memory, is skipped and its cell says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention import measure
from sparse_attention.benchmark import flops, machine
from sparse_attention.benchmark.command import csv_of
from sparse_attention.benchmark.contenders import memory_shortfall
from sparse_attention.benchmark.timing import median_time

PARTS = ("lists", "selection", "flex")
# Table 2's measurements (seconds), in the order they are made.
SELECTION_FIELDS = ("select_s", "ours_fwd_s", "select_ours_fwd_s", "sdpa_fwd_s",
                    "ours_fwd_bwd_s", "select_ours_fwd_bwd_s", "sdpa_fwd_bwd_s")

# Defaults of the full run and of --quick (explicit flags win over both).
FULL = {"lists_batch": 4, "lists_heads": 16, "lists_seq_len": 32768,
        "seq_lens": (4096, 8192, 16384, 32768)}
QUICK = {"lists_batch": 1, "lists_heads": 4, "lists_seq_len": 4096,
         "seq_lens": (1024, 2048), "flex_seq_lens": (1024,)}


@dataclasses.dataclass
class Skipped:
    """A measurement not made, and why."""
    reason: str

    def __str__(self) -> str:
        return f"skipped: {self.reason}"



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: lists B=1 H=4 N=4096, seq-lens 1024,2048, Flex at "
                             "1024 (explicit flags still win)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="auto: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--parts", type=csv_of(str), default=PARTS,
                        help=f"tables to make, comma-separated (default {','.join(PARTS)})")
    parser.add_argument("--block", type=int, default=64, help="block size (default 64)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.1,
                        help="top_k as a fraction of the key blocks (default 0.1)")
    parser.add_argument("--lists-batch", type=int,
                        help=f"table 1's B (default {FULL['lists_batch']})")
    parser.add_argument("--lists-heads", type=int,
                        help="table 1's H, also the layout's heads "
                             f"(default {FULL['lists_heads']})")
    parser.add_argument("--lists-seq-len", type=int,
                        help=f"table 1's N (default {FULL['lists_seq_len']})")
    parser.add_argument("--lists-mask", choices=["select", "random"], default="select",
                        help="table 1's layout: select_blocks' (default) or top_k random "
                             "causal key blocks per row (plus the first and the diagonal)")
    parser.add_argument("--seq-lens", type=csv_of(int),
                        help=f"tables 2 and 3 (default {','.join(map(str, FULL['seq_lens']))})")
    parser.add_argument("--batch", type=int, default=1, help="tables 2 and 3's B (default 1)")
    parser.add_argument("--heads", type=int, default=8, help="tables 2 and 3's H (default 8)")
    parser.add_argument("--kv-heads", type=csv_of(int), default=(8, 2),
                        help="tables 2 and 3's Hkv values (default 8,2)")
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=True,
                        help="table 3, FlexAttention (default on; compiling it on the CPU takes "
                             "tens of seconds per shape)")
    parser.add_argument("--flex-seq-lens", type=csv_of(int),
                        help="table 3's lengths (default: the shortest of --seq-lens on the CPU, "
                             "all of them on CUDA)")
    parser.add_argument("--flex-create", choices=["compiled", "eager"], default="compiled",
                        help="create_block_mask compiled (default) or eager")
    add_timing_arguments(parser, repeats=5, budget=30.0, max_call_s=120.0)


def add_timing_arguments(parser: argparse.ArgumentParser, *, repeats: int, budget: float,
                         max_call_s: float) -> None:
    """The timing, seed, thread and output options of the contender benchmarks."""
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed calls, median reported (default {repeats})")
    parser.add_argument("--warmup", type=int, default=1,
                        help="warm-up calls (default 1; Flex gets 2 at least, its first compiles)")
    parser.add_argument("--budget", type=float, default=budget,
                        help=f"seconds of timed calls per measurement at most (default {budget:g})")
    parser.add_argument("--max-call-s", type=float, default=max_call_s,
                        help=f"skip a call predicted to take longer (default {max_call_s:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="folder for results.md and results.json")


def _settle(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults (--quick's or the full run's) and checks the arguments."""
    base = {**FULL, **QUICK} if args.quick else FULL
    for name in ("lists_batch", "lists_heads", "lists_seq_len", "seq_lens"):
        if getattr(args, name) is None:
            setattr(args, name, base[name])
    if args.flex_seq_lens is None:
        args.flex_seq_lens = (base.get("flex_seq_lens") or
                              (args.seq_lens if args.device.startswith("cuda") else
                               (min(args.seq_lens),)))
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(PARTS)}")
    if not 0 < args.density <= 1:
        raise SystemExit(f"--density: expected a fraction in (0, 1], got {args.density}")
    for hkv in args.kv_heads:
        if hkv < 1 or args.heads % hkv:
            raise SystemExit(f"--kv-heads: {hkv} does not divide --heads {args.heads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    reasons = sa.supported(torch.device(args.device).type, args.dtype, args.head_dim, args.block)
    if reasons:
        raise SystemExit("the kernels cannot run this: " + "; ".join(reasons))
    return args


# --- measuring ---------------------------------------------------------------------------

class Timer:
    """median_time with the run's settings, a prediction of slow calls (from the last length
    measured for the same key, as N^2) and failures turned into Skipped cells."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.measured: dict = {}  # key -> (N, seconds) of the longest measured length

    def __call__(self, key, n: int, fn: Callable[[], object], warmup: int | None = None):
        previous = self.measured.get(key)
        if previous is not None:
            predicted = previous[1] * (n / previous[0]) ** 2
            if predicted > self.args.max_call_s:
                return Skipped(f"predicted ~{predicted:.0f} s a call > --max-call-s "
                               f"{self.args.max_call_s:g}")
        warmup = self.args.warmup if warmup is None else warmup
        try:
            seconds = median_time(fn, self.args.repeats, max(1, warmup), device=self.device,
                                  budget=self.args.budget)
        except torch.OutOfMemoryError:
            _free(self.device)
            return Skipped("out of memory")
        except Exception as error:  # a failure is a result: report it, run the rest
            _free(self.device)
            return Skipped(f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
        self.measured[key] = (n, seconds)
        return seconds


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _too_big(needed: int, device: str) -> Skipped | None:
    reason = memory_shortfall(needed, device)
    return None if reason is None else Skipped(reason)


def _num(value) -> float | None:
    return value if isinstance(value, (int, float)) else None


def _sub(a, b):
    a, b = _num(a), _num(b)
    return None if a is None or b is None else max(a - b, 0.0)


@functools.cache
def _select_blocks():
    """sa.select_blocks, or None where this version has none."""
    try:
        from sparse_attention.selection import select_blocks
    except ImportError:
        return None
    return select_blocks


def random_causal_mask(batch: int, heads: int, q_blocks: int, top_k: int, device,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """select_blocks' shape of mask with random scores: per row the first key block, the
    diagonal one and top_k other random causal ones, bool [batch, heads, q_blocks, q_blocks]."""
    rows = torch.arange(q_blocks, device=device).unsqueeze(1)
    cols = torch.arange(q_blocks, device=device).unsqueeze(0)
    candidate = cols <= rows
    forced = candidate & ((cols == 0) | (cols == rows))
    key = torch.rand(batch, heads, q_blocks, q_blocks, device=device, generator=generator)
    key = torch.where(candidate & ~forced, key, -1.0)
    mask = forced.expand(batch, heads, q_blocks, q_blocks).clone()
    if top_k > 0:
        values, chosen = key.topk(min(top_k, q_blocks), dim=-1)
        mask |= torch.zeros_like(mask).scatter(-1, chosen, values >= 0)
    return mask


def _selector(q, k, block: int, top_k: int, random_mask: bool, seed: int):
    """A function of (q, k) that makes the call's TensorLayout: select_blocks (causal,
    heads="kv"), or where that is missing or not wanted the random mask of the same shape."""
    select = None if random_mask else _select_blocks()
    if select is not None:
        return lambda q, k: select(q, k, block, top_k=top_k, causal=True, heads="kv")
    generator = torch.Generator(device=q.device).manual_seed(seed)
    q_blocks = -(-q.shape[2] // block)
    return lambda q, k: sa.TensorLayout.from_mask(
        random_causal_mask(q.shape[0], k.shape[1], q_blocks, top_k, q.device, generator), block)


def _top_k(n: int, args) -> int:
    return max(1, round(args.density * -(-n // args.block)))


def _kept(layout: sa.TensorLayout, n: int, block: int) -> float:
    """Set blocks as a share of the causal blocks (a host sync: outside the timing)."""
    q_blocks = -(-n // block)
    b, h = layout.shape[:2]
    return float(layout.nnz()) / (b * h * q_blocks * (q_blocks + 1) / 2)


def _inputs(batch, heads, kv_heads, n, args, grad: bool = False):
    dtype, device = getattr(torch, args.dtype), args.device
    q = torch.randn(batch, heads, n, args.head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(batch, kv_heads, n, args.head_dim, dtype=dtype, device=device)
            for _ in range(2))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def _element_size(args) -> int:
    return torch.finfo(getattr(torch, args.dtype)).bits // 8


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- 1. the lists ------------------------------------------------------------------------

def measure_lists(args, timer: Timer) -> list[dict]:
    batch, heads, n, bs = args.lists_batch, args.lists_heads, args.lists_seq_len, args.block
    row = {"batch": batch, "heads": heads, "seq_len": n, "block": bs, "head_dim": args.head_dim}
    _progress(f"lists: B={batch} H={heads} N={n} block {bs}")
    need = (_element_size(args) * 4 * batch * heads * n * args.head_dim
            + 40 * batch * heads * (n // bs) ** 2)
    skipped = _too_big(need, args.device)
    if skipped:
        return [{**row, "mask": args.lists_mask, "lists_s": skipped, "forward_s": skipped}]
    torch.manual_seed(args.seed)
    with torch.no_grad():
        q, k, v = _inputs(batch, heads, heads, n, args)
        random_mask = args.lists_mask == "random" or _select_blocks() is None
        layout = _selector(q, k, bs, _top_k(n, args), random_mask, args.seed)(q, k)
        window = (None, 0)
        row.update(mask="random" if random_mask else "select_blocks", layout_heads=layout.num_heads,
                   kept=_kept(layout, n, bs), density=float(layout.density()),
                   flops=int(layout.flops(args.head_dim, heads, batch)))
        row["lists_s"] = timer(("lists", "lists"), n, lambda: layout.block_lists(n, n, window))
        row["forward_s"] = timer(("lists", "forward"), n,
                                 lambda: sa.sparse_attention(q, k, v, layout, causal=True))
        row["lists_peak_bytes"] = measure.peak_memory(lambda: layout.block_lists(n, n, window),
                                                      args.device)
    del q, k, v, layout
    _free(args.device)
    return [row]


def lists_table(rows: list[dict]) -> str:
    head = ("| B | H | N | block | mask | density all / causal | lists ms | forward ms "
            "| lists / forward | lists peak | forward GF/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        share = _ratio(r.get("lists_s"), r.get("forward_s"))
        lines.append("| " + " | ".join([
            str(r["batch"]), str(r["heads"]), str(r["seq_len"]), str(r["block"]), r["mask"],
            _density(r), _ms(r["lists_s"]), _ms(r["forward_s"]),
            "-" if share is None else f"{share:.2%}",
            measure.format_bytes(r.get("lists_peak_bytes")) if "lists_peak_bytes" in r else "-",
            _rate(r.get("flops"), r["forward_s"])]) + " |")
    return "\n".join(lines)


# --- 2. selection + attention against dense SDPA -------------------------------------------

def measure_selection(args, timer: Timer, cache: dict) -> list[dict]:
    rows = []
    batch, heads, bs = args.batch, args.heads, args.block
    for n in args.seq_lens:
        for kv_heads in args.kv_heads:
            _progress(f"selection: N={n} Hkv={kv_heads}")
            row = {"seq_len": n, "kv_heads": kv_heads, "batch": batch, "heads": heads,
                   "block": bs, "head_dim": args.head_dim, "top_k": _top_k(n, args)}
            rows.append(row)
            need = (_element_size(args) * n * args.head_dim * batch * (6 * heads + 6 * kv_heads)
                    + 24 * batch * heads * (n // bs) ** 2)
            skipped = _too_big(need, args.device)
            if skipped:
                row.update(dict.fromkeys(SELECTION_FIELDS, skipped))
                continue
            torch.manual_seed(args.seed)
            q, k, v = _inputs(batch, heads, kv_heads, n, args, grad=True)
            grad_out = torch.randn_like(q)
            select = _selector(q, k, bs, row["top_k"], False, args.seed)
            selected = _select_blocks() is not None
            layout = select(q, k)
            row.update(selection="select_blocks" if selected else "random (no select_blocks)",
                       kept=_kept(layout, n, bs), density=float(layout.density()),
                       flops=int(layout.flops(args.head_dim, heads, batch)))
            gqa = kv_heads < heads
            qd, kd, vd = (t.detach() for t in (q, k, v))

            def sdpa(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

            def fwd_bwd(forward):
                return lambda: torch.autograd.grad(forward(), (q, k, v), grad_out)

            # field -> (the call, whether it needs select_blocks)
            calls = {
                "select_s": (lambda: select(qd, kd), True),
                "ours_fwd_s": (lambda: sa.sparse_attention(qd, kd, vd, layout, causal=True), False),
                "select_ours_fwd_s": (lambda: sa.sparse_attention(qd, kd, vd, select(qd, kd),
                                                                  causal=True), True),
                "sdpa_fwd_s": (lambda: sdpa(qd, kd, vd), False),
                "ours_fwd_bwd_s": (fwd_bwd(lambda: sa.sparse_attention(q, k, v, layout,
                                                                       causal=True)), False),
                "select_ours_fwd_bwd_s": (fwd_bwd(lambda: sa.sparse_attention(
                    q, k, v, select(q, k), causal=True)), True),
                "sdpa_fwd_bwd_s": (fwd_bwd(lambda: sdpa(q, k, v)), False),
            }
            for field, (call, needs_select) in calls.items():
                if needs_select and not selected:
                    row[field] = Skipped("no sa.select_blocks")
                    continue
                with torch.enable_grad() if "bwd" in field else torch.no_grad():
                    row[field] = timer((field, kv_heads), n, call)
            cache[n, kv_heads] = {"layout_mask": layout.mask, "ours_fwd_s": row["ours_fwd_s"],
                          "ours_fwd_bwd_s": row["ours_fwd_bwd_s"]}
            del q, k, v, qd, kd, vd, grad_out, layout, calls
            _free(args.device)
    return rows


def selection_tables(rows: list[dict]) -> str:
    fwd_head = ("| N | Hkv | top_k | density all / causal | select ms | ours fwd ms "
                "| select + ours fwd ms | SDPA fwd ms | SDPA / (select + ours) | ours fwd GF/s |")
    lines = ["Forward:", "", fwd_head, "|" + "---|" * (fwd_head.count("|") - 1)]
    for r in rows:
        per_call = r["select_ours_fwd_s"] if _num(r["select_ours_fwd_s"]) else r["ours_fwd_s"]
        lines.append("| " + " | ".join([
            str(r["seq_len"]), str(r["kv_heads"]), str(r["top_k"]), _density(r),
            _ms(r["select_s"]), _ms(r["ours_fwd_s"]), _ms(r["select_ours_fwd_s"]),
            _ms(r["sdpa_fwd_s"]), _times(r["sdpa_fwd_s"], per_call),
            _rate(r.get("flops"), r["ours_fwd_s"])]) + " |")
    bwd_head = ("| N | Hkv | ours fwd+bwd ms | select + ours fwd+bwd ms | SDPA fwd+bwd ms "
                "| SDPA / (select + ours) | ours bwd GF/s |")
    lines += ["", "Forward + backward:", "", bwd_head, "|" + "---|" * (bwd_head.count("|") - 1)]
    for r in rows:
        per_call = (r["select_ours_fwd_bwd_s"] if _num(r["select_ours_fwd_bwd_s"])
                    else r["ours_fwd_bwd_s"])
        backward = _sub(r["ours_fwd_bwd_s"], r["ours_fwd_s"])
        work = None if r.get("flops") is None else flops.backward_flops(r["flops"])
        lines.append("| " + " | ".join([
            str(r["seq_len"]), str(r["kv_heads"]), _ms(r["ours_fwd_bwd_s"]),
            _ms(r["select_ours_fwd_bwd_s"]), _ms(r["sdpa_fwd_bwd_s"]),
            _times(r["sdpa_fwd_bwd_s"], per_call), _rate(work, backward)]) + " |")
    return "\n".join(lines)


# --- 3. FlexAttention with create_block_mask per call --------------------------------------

@functools.cache
def _create_block_mask(kind: str):
    from torch.nn.attention.flex_attention import create_block_mask
    # One graph per shape, as compiled_flex (dynamic shapes would recompile for a second one).
    if kind == "eager":
        return create_block_mask
    return torch.compile(create_block_mask, dynamic=False)


def measure_flex(args, timer: Timer, cache: dict) -> list[dict]:
    from sparse_attention.benchmark.flex import compiled_flex

    flex = compiled_flex()  # first: it raises dynamo's recompile limits for create_block_mask too
    create = _create_block_mask(args.flex_create)
    backward = args.device != "cpu"
    rows = []
    batch, heads, bs = args.batch, args.heads, args.block
    warm = max(2, args.warmup)
    for n in args.flex_seq_lens:
        for kv_heads in args.kv_heads:
            passes = ("fwd", "fwd+bwd") if backward else ("fwd",)
            _progress(f"flex: N={n} Hkv={kv_heads} ({', '.join(passes)}; compiles on first use)")
            base = {"seq_len": n, "kv_heads": kv_heads, "batch": batch, "heads": heads,
                    "block": bs, "head_dim": args.head_dim}
            need = _element_size(args) * n * args.head_dim * batch * (6 * heads + 6 * kv_heads)
            if args.flex_create == "eager":
                need += 10 * batch * heads * n * n
            skipped = _too_big(need, args.device)
            if skipped:
                rows += [{**base, "pass": p, **dict.fromkeys(
                    ("ours_s", "create_s", "flex_per_call_s", "flex_prebuilt_s"), skipped)}
                    for p in passes]
                continue
            torch.manual_seed(args.seed)
            q, k, v = _inputs(batch, heads, kv_heads, n, args, grad=backward)
            grad_out = torch.randn_like(q)
            known = cache.get((n, kv_heads))
            if known is not None:
                mask = known["layout_mask"]
            else:
                with torch.no_grad():
                    mask = _selector(q, k, bs, _top_k(n, args), False, args.seed)(
                        q.detach(), k.detach()).mask
            layout = sa.TensorLayout.from_mask(mask, bs)
            # One mask_mod per shape over a buffer each call overwrites: no recompiles.
            buffer = mask.clone()
            group = heads // buffer.shape[1]
            shared_batch = buffer.shape[0] == 1

            def mask_mod(b, h, q_idx, kv_idx):
                listed = buffer[0 if shared_batch else b, h // group, q_idx // bs, kv_idx // bs]
                return listed & (q_idx >= kv_idx)

            def block_mask():
                buffer.copy_(layout.mask)
                return create(mask_mod, batch, heads, n, n, device=args.device, BLOCK_SIZE=bs)

            gqa = kv_heads < heads
            try:
                prebuilt = block_mask()
            except Exception as error:
                prebuilt = Skipped(f"create_block_mask failed: {type(error).__name__}: "
                                   f"{str(error).splitlines()[0][:100]}")
            for p in passes:
                row = {**base, "pass": p, "kept": _kept(layout, n, bs),
                       "flops": int(layout.flops(args.head_dim, heads, batch))}
                rows.append(row)
                key = f"ours_{p.replace('+', '_')}_s"
                if isinstance(prebuilt, Skipped):
                    row.update(dict.fromkeys(("create_s", "flex_per_call_s", "flex_prebuilt_s"),
                                             prebuilt))
                if p == "fwd":
                    inputs = tuple(t.detach() for t in (q, k, v))

                    def ours():
                        return sa.sparse_attention(*inputs, layout, causal=True)

                    def flex_call(make_mask):
                        return lambda: flex(*inputs, block_mask=make_mask(), enable_gqa=gqa)
                    context = torch.no_grad
                else:
                    inputs = (q, k, v)

                    def ours():
                        out = sa.sparse_attention(*inputs, layout, causal=True)
                        return torch.autograd.grad(out, inputs, grad_out)

                    def flex_call(make_mask):
                        return lambda: torch.autograd.grad(flex(
                            *inputs, block_mask=make_mask(), enable_gqa=gqa), inputs, grad_out)
                    context = torch.enable_grad
                with context():
                    cached = known.get(key) if known else None
                    row["ours_s"] = (cached if _num(cached) is not None
                                     else timer(("ours " + p, kv_heads), n, ours))
                    if isinstance(prebuilt, Skipped):
                        continue
                    if p == "fwd":
                        row["create_s"] = timer(("create_block_mask", kv_heads), n, block_mask,
                                                warmup=warm)
                        try:
                            with torch.no_grad():
                                out = flex(*inputs, block_mask=prebuilt, enable_gqa=gqa)
                                error = (out.float() - ours().float()).abs().max()
                            row["max_error"] = float(error)
                        except Exception as error:  # the timings below say what failed
                            _progress(f"flex: no output to compare: {type(error).__name__}")
                    row["flex_per_call_s"] = timer(("flex per call " + p, kv_heads), n,
                                                   flex_call(block_mask), warmup=warm)
                    row["flex_prebuilt_s"] = timer(("flex prebuilt " + p, kv_heads), n,
                                                   flex_call(lambda: prebuilt), warmup=warm)
            del q, k, v, grad_out, layout, buffer, prebuilt
            _free(args.device)
    return rows


def flex_table(rows: list[dict]) -> str:
    head = ("| N | Hkv | pass | ours ms | create_block_mask ms | create_block_mask + Flex ms "
            "| Flex prebuilt ms | per call: Flex / ours | prebuilt: Flex / ours |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [_ms(r["ours_s"]), _ms(r.get("create_s")), _ms(r["flex_per_call_s"]),
                 _ms(r["flex_prebuilt_s"]), _times(r["flex_per_call_s"], r["ours_s"]),
                 _times(r["flex_prebuilt_s"], r["ours_s"])]
        lines.append("| " + " | ".join([str(r["seq_len"]), str(r["kv_heads"]), r["pass"], *cells])
                     + " |")
    return "\n".join(lines)


# --- formatting ----------------------------------------------------------------------------

def _ms(value) -> str:
    if isinstance(value, Skipped):
        return str(value)
    if _num(value) is None:
        return "-" if value is None else str(value)
    ms = value * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def _density(row: dict) -> str:
    """Set blocks as a share of all blocks / of the causal blocks."""
    if row.get("density") is None:
        return "-"
    return f"{row['density']:.1%} / {row['kept']:.1%}"


def _ratio(a, b) -> float | None:
    a, b = _num(a), _num(b)
    return None if a is None or b is None or b <= 0 else a / b


def _times(a, b) -> str:
    ratio = _ratio(a, b)
    return "-" if ratio is None else f"{ratio:.2f}x"


def _rate(count, seconds) -> str:
    per_second = flops.rate(count, _num(seconds)) if count is not None else None
    return "-" if per_second is None else f"{per_second / 1e9:.1f}"


def _json_default(value):
    if isinstance(value, Skipped):
        return {"skipped": value.reason}
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def notes(args, results: dict) -> list[str]:
    lines = [f"Causal, {args.dtype}, D={args.head_dim}, block {args.block}; top_k = "
             f"{args.density:g} of the key blocks per query-block row (plus the first and the "
             "diagonal one); density: set blocks as a share of all blocks / of the causal ones.",
             f"Times: medians of {args.repeats} calls after {args.warmup} warm-up "
             f"(fewer past --budget {args.budget:g} s); GF/s: GFLOP/s {flops.PER_BLOCK}; "
             "x: the other's time / ours (> 1: ours faster)."]
    if "lists" in results:
        lines.append("Table 1: lists = layout.block_lists(N, N, (None, 0)); forward = "
                     "sa.sparse_attention(q, k, v, layout, causal=True), which builds them too; "
                     "the target for lists / forward is 5% at most.")
    if "selection" in results:
        lines.append("Table 2: ours = sa.sparse_attention on the layout made beforehand; "
                     "select + ours = sa.select_blocks then sa.sparse_attention, per call; "
                     "SDPA = scaled_dot_product_attention(is_causal=True, enable_gqa=Hkv < H).")
    if "flex" in results:
        errors = [r["max_error"] for r in results["flex"] if "max_error" in r]
        lines.append(f"Table 3: create_block_mask {args.flex_create}, mask_mod reading the "
                     "selected block mask, then compiled flex_attention; ours = "
                     "sa.sparse_attention on the same layout."
                     + ("" if args.device != "cpu" else " Forward only: Flex has no CPU backward.")
                     + (f" Largest |Flex - ours|: {max(errors):.2g}." if errors else ""))
    return lines


def report(args, header: dict, results: dict) -> str:
    parts = ["# Per-input layouts: block lists, selection, Flex", "",
             machine.one_line(header), ""]
    if "lists" in results:
        parts += ["## 1. Block lists against the forward", "", lists_table(results["lists"]), ""]
    if "selection" in results:
        parts += ["## 2. select_blocks + ours against dense causal SDPA", "",
                  selection_tables(results["selection"]), ""]
    if "flex" in results:
        parts += ["## 3. FlexAttention, create_block_mask per call", "",
                  flex_table(results["flex"]), ""]
    parts += [f"- {line}" for line in notes(args, results)]
    return "\n".join(parts) + "\n"


def run(args: argparse.Namespace) -> dict:
    """Measures the tables of args.parts, prints the report, writes --out; returns the
    results ({"machine": ..., "settings": ..., "report": markdown, and a list of rows per
    table})."""
    args = _settle(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = machine.describe()
    _progress(machine.one_line(header))
    timer, cache, results = Timer(args), {}, {}
    if "lists" in args.parts:
        results["lists"] = measure_lists(args, timer)
    if "selection" in args.parts:
        results["selection"] = measure_selection(args, timer, cache)
    if "flex" in args.parts and args.flex:
        try:
            results["flex"] = measure_flex(args, timer, cache)
        except ImportError as error:
            _progress(f"FlexAttention unavailable: {error}")
    return publish(args, header, report(args, header, results), results)


def publish(args: argparse.Namespace, header: dict, text: str, results: dict) -> dict:
    """Prints the report; with args.out writes it there as results.md, and results.json (the
    machine, the settings but --out, the results); returns them with the report."""
    print(text, end="")
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(text)
        settings = {key: value for key, value in vars(args).items() if key != "out"}
        (out / "results.json").write_text(json.dumps(
            {"machine": header, "settings": settings, **results}, indent=1,
            default=_json_default) + "\n")
        _progress(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return {"machine": header, "settings": vars(args), "report": text, **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_layouts.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
