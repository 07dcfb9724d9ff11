"""`python benchmarks/bench_packing.py`: packed documents (cu_seqlens), each attended alone
with its own fixed pattern, against what a user of torch has for the same rule.

A row of T tokens is cut into documents of random lengths (--doc-lens, fixed --seed, summing
to T). Every document gets `patterns.Fixed(chunk=--chunk, block_size=--block)` (the default
chunk 512 is `patterns.from_name("fixed", seq_len=4096, block_size=64)`'s, the middle of the
512 to 8k documents), causal. Two tables (markdown on stdout; results.md and results.json in
--out):

1. ours against SDPA, forward and forward + backward: sa.sparse_attention(..., cu_seqlens=cu)
   with the lists cached (the same pattern object every call, as every layer of a model) and
   with them built (a new pattern object per call: its layout per document length and the
   packed lists, what the first call for new lengths pays); SDPA with the equivalent dense
   block-diagonal causal boolean mask [T, T] (O(T^2) time and memory).
2. compiled FlexAttention (forward only on the CPU, where Flex has no backward) with two
   mask_mods: the document mask and causal (dense within documents), and the document mask,
   causal and the same per-document fixed pattern (the same computed elements as ours). Each
   with create_block_mask per call (compiled, as Flex's docs advise) and with the BlockMask
   built once. The mask_mods read per-token document ids and starts from tensors, so new
   lengths would not recompile.

Times are medians of benchmark.timing.median_time; a call predicted (from the previous T, as
T^2) to take more than --max-call-s, or not to fit in memory, is skipped and its cell says why.
Rates are GFLOP/s per computed block of our layouts (flops.PER_BLOCK).
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

import sparse_attention as sa
from sparse_attention.benchmark import flops, machine
from sparse_attention.benchmark.command import csv_of
from sparse_attention.benchmark.flex import compiled_flex
from sparse_attention.benchmark.layouts import (Skipped, Timer, _create_block_mask, _free,
                                                _ms, _num, _progress, _sub, _times, _too_big,
                                                add_timing_arguments, publish)

PASSES = ("fwd", "fwd+bwd")
OURS_FIELDS = ("ours_s", "ours_new_s", "sdpa_s")
FLEX_FIELDS = ("create_s", "flex_per_call_s", "flex_prebuilt_s")
FLEX_MASKS = ("document", "document+fixed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-lens", type=csv_of(int), default=(8192, 32768),
                        help="row lengths T, comma-separated (default 8192,32768; SDPA's T^2 "
                             "cost is predicted from the shorter ones)")
    parser.add_argument("--doc-lens", type=csv_of(int), default=(512, 8192),
                        help="shortest,longest document (default 512,8192)")
    parser.add_argument("--heads", type=int, default=4, help="H (default 4)")
    parser.add_argument("--kv-heads", type=int, default=2, help="Hkv (default 2)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64, help="block size (default 64)")
    parser.add_argument("--chunk", type=int, default=512,
                        help="the fixed pattern's chunk in tokens (default 512)")
    parser.add_argument("--dtypes", type=csv_of(str), default=("float32", "bfloat16"),
                        help="comma-separated (default float32,bfloat16)")
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=True,
                        help="table 2, FlexAttention (default on; compiles per mask and shape)")
    parser.add_argument("--flex-seq-lens", type=csv_of(int),
                        help="table 2's T (default: the longest of --seq-lens)")
    add_timing_arguments(parser, repeats=3, budget=20.0, max_call_s=30.0)


def _settle(args: argparse.Namespace) -> argparse.Namespace:
    shortest, longest = args.doc_lens
    if not 1 <= shortest <= longest:
        raise SystemExit(f"--doc-lens: expected 1 <= shortest <= longest, got {args.doc_lens}")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--kv-heads: {args.kv_heads} does not divide --heads {args.heads}")
    for name in args.dtypes:
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise SystemExit(f"--dtypes: unknown {name}")
        reasons = sa.supported("cpu", name, args.head_dim, args.block)
        if reasons:
            raise SystemExit("the kernels cannot run this: " + "; ".join(reasons))
    sa.Fixed(args.chunk, block_size=args.block)  # a bad --chunk fails here, named
    if args.flex_seq_lens is None:
        args.flex_seq_lens = (max(args.seq_lens),)
    return args


def document_lengths(total: int, shortest: int, longest: int, seed: int) -> list[int]:
    """Random lengths in [shortest, longest] summing to total (a row shorter than `shortest`
    is one document): drawn until the rest could not hold another one; the rest is the last
    document (two halves where it is longer than `longest`)."""
    rng, lengths, left = random.Random(seed), [], total
    while left - (length := rng.randint(shortest, longest)) >= shortest:
        lengths.append(length)
        left -= length
    return lengths + ([left // 2, left - left // 2] if left > longest else [left])


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)


def element_mask(lengths: list[int], chunk: int | None, block: int, rows: int = 2048):
    """bool [T, T] of flex_mask_mod's rule (query i sees key j): block-diagonal causal, and
    with a chunk the fixed pattern in every document, built `rows` query rows at a time."""
    total = sum(lengths)
    rule = flex_mask_mod(lengths, chunk, block)
    keys = torch.arange(total)
    mask = torch.empty(total, total, dtype=torch.bool)
    for first in range(0, total, rows):
        queries = torch.arange(first, min(first + rows, total))
        mask[first:first + rows] = rule(0, 0, queries[:, None], keys[None, :])
    return mask


def flex_mask_mod(lengths: list[int], chunk: int | None, block: int, device="cpu"):
    """Flex's mask_mod of the documents and causal, and with a chunk the fixed pattern of
    each document in its own positions (its chunk, and the last block of every chunk: the
    same elements as sa.Fixed(chunk, block_size=block), summary = block)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))
    start = cu_seqlens(lengths).to(device)[:-1].long()[doc]

    def documents(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    if chunk is None:
        return documents

    def fixed(b, h, q_idx, kv_idx):
        p, j = q_idx - start[q_idx], kv_idx - start[kv_idx]
        summary = (j % chunk) >= chunk - block
        return documents(b, h, q_idx, kv_idx) & ((p // chunk == j // chunk) | summary)
    return fixed


def _flops(pattern, lengths, args) -> int:
    """Computed-block FLOPs of the packed row: every document's layout, as ours computes."""
    return sum(int(pattern.layout(n, causal=True, num_heads=args.heads).flops(
        args.head_dim, args.heads, 1)) for n in lengths)


def _inputs(t: int, dtype, args, grad: bool):
    q = torch.randn(1, args.heads, t, args.head_dim, dtype=dtype)
    k, v = (torch.randn(1, args.kv_heads, t, args.head_dim, dtype=dtype) for _ in range(2))
    return tuple(x.requires_grad_(grad) for x in (q, k, v))


def measure_ours_sdpa(args, timer: Timer, t: int, dtype_name: str, lengths) -> list[dict]:
    dtype = getattr(torch, dtype_name)
    cu = cu_seqlens(lengths)
    pattern = sa.Fixed(args.chunk, block_size=args.block)
    work = _flops(pattern, lengths, args)
    base = {"seq_len": t, "dtype": dtype_name, "documents": len(lengths), "flops": work}
    torch.manual_seed(args.seed)
    q, k, v = _inputs(t, dtype, args, grad=True)
    grad_out = torch.randn_like(q)
    gqa = args.kv_heads < args.heads
    element = torch.finfo(dtype).bits // 8
    # The bool mask and a float copy (CPU SDPA's flash path keeps no T^2 scores).
    too_big = _too_big((1 + element) * t * t, "cpu")
    mask = None if too_big else element_mask(lengths, args.chunk, args.block)

    def ours(new_lengths: bool):
        def call():
            layout = sa.Fixed(args.chunk, block_size=args.block) if new_lengths else pattern
            return sa.sparse_attention(q, k, v, layout, causal=True, cu_seqlens=cu)
        return call

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    rows = []
    for p in PASSES:
        row = {**base, "pass": p}
        rows.append(row)
        calls = {"ours_s": ours(False), "ours_new_s": ours(True), "sdpa_s": sdpa}
        for field, call in calls.items():
            if field == "sdpa_s" and too_big:
                row[field] = too_big
                continue
            if p == "fwd":
                with torch.no_grad():
                    row[field] = timer((field, p, dtype_name), t, call)
            else:
                row[field] = timer((field, p, dtype_name), t,
                                   lambda call=call: torch.autograd.grad(call(), (q, k, v),
                                                                         grad_out))
        if p == "fwd" and mask is not None and _num(row["sdpa_s"]) is not None:
            with torch.no_grad():
                row["max_error"] = float((sdpa().float() - ours(False)().float()).abs().max())
    return rows


def measure_flex(args, timer: Timer, t: int, dtype_name: str, lengths, ours: dict) -> list[dict]:
    flex = compiled_flex()  # first: it raises dynamo's recompile limits for create_block_mask
    create = _create_block_mask("compiled")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(args.seed)
    q, k, v = _inputs(t, dtype, args, grad=False)
    gqa = args.kv_heads < args.heads
    warm = max(2, args.warmup)
    pattern = sa.Fixed(args.chunk, block_size=args.block)
    rows = []
    for name in FLEX_MASKS:
        _progress(f"flex: T={t} {dtype_name} {name} (compiles on first use)")
        row = {"seq_len": t, "dtype": dtype_name, "mask": name, "pass": "fwd",
               "ours_s": ours.get((t, dtype_name))}
        rows.append(row)
        mask_mod = flex_mask_mod(lengths, args.chunk if "fixed" in name else None, args.block)

        def block_mask():
            return create(mask_mod, 1, args.heads, t, t, device="cpu", BLOCK_SIZE=args.block)

        try:
            prebuilt = block_mask()
        except Exception as error:  # a failure is a result: report it, run the rest
            row.update(dict.fromkeys(FLEX_FIELDS, Skipped(
                f"create_block_mask failed: {type(error).__name__}: "
                f"{str(error).splitlines()[0][:100]}")))
            continue
        row["flex_blocks"] = int(prebuilt.kv_num_blocks.sum() + (
            prebuilt.full_kv_num_blocks.sum() if prebuilt.full_kv_num_blocks is not None else 0))
        with torch.no_grad():
            row["create_s"] = timer(("create", name, dtype_name), t, block_mask, warmup=warm)
            row["flex_per_call_s"] = timer(
                ("flex per call", name, dtype_name), t,
                lambda: flex(q, k, v, block_mask=block_mask(), enable_gqa=gqa), warmup=warm)
            row["flex_prebuilt_s"] = timer(
                ("flex prebuilt", name, dtype_name), t,
                lambda: flex(q, k, v, block_mask=prebuilt, enable_gqa=gqa), warmup=warm)
            if "fixed" in name and _num(row["flex_prebuilt_s"]) is not None:
                expected = sa.sparse_attention(q, k, v, pattern, causal=True,
                                               cu_seqlens=cu_seqlens(lengths))
                out = flex(q, k, v, block_mask=prebuilt, enable_gqa=gqa)
                row["max_error"] = float((out.float() - expected.float()).abs().max())
    return rows


# --- formatting ----------------------------------------------------------------------------

def _rate(work, seconds) -> str:
    per_second = flops.rate(work, _num(seconds))
    return "-" if per_second is None else f"{per_second / 1e9:.1f}"


def ours_table(rows: list[dict]) -> str:
    head = ("| T | docs | dtype | pass | ours ms (cached) | ours ms (new lengths) "
            "| lists build ms | SDPA masked ms | SDPA / ours | ours GF/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        work = r["flops"] if r["pass"] == "fwd" else r["flops"] * (1 + flops.BACKWARD_FACTOR)
        lines.append("| " + " | ".join([
            str(r["seq_len"]), str(r["documents"]), r["dtype"], r["pass"], _ms(r["ours_s"]),
            _ms(r["ours_new_s"]), _ms(_sub(r["ours_new_s"], r["ours_s"])), _ms(r["sdpa_s"]),
            _times(r["sdpa_s"], r["ours_s"]), _rate(work, r["ours_s"])]) + " |")
    return "\n".join(lines)


def flex_table(rows: list[dict]) -> str:
    head = ("| T | dtype | Flex mask_mod | ours ms | create_block_mask ms "
            "| create_block_mask + Flex ms | Flex prebuilt ms | per call: Flex / ours "
            "| prebuilt: Flex / ours |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["seq_len"]), r["dtype"], r["mask"], _ms(r["ours_s"]), _ms(r["create_s"]),
            _ms(r["flex_per_call_s"]), _ms(r["flex_prebuilt_s"]),
            _times(r["flex_per_call_s"], r["ours_s"]),
            _times(r["flex_prebuilt_s"], r["ours_s"])]) + " |")
    return "\n".join(lines)


def notes(args, results: dict) -> list[str]:
    docs = "; ".join(f"T={t}: {', '.join(map(str, lengths))}"
                     for t, lengths in results["documents"].items())
    lines = [f"Causal, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, block "
             f"{args.block}; documents of {args.doc_lens[0]} to {args.doc_lens[1]} tokens "
             f"(seed {args.seed}): {docs}.",
             f"Pattern per document: sa.Fixed(chunk={args.chunk}, block_size={args.block}) "
             "(its chunk causal, and the last block of every earlier chunk).",
             f"Times: medians of {args.repeats} calls after {args.warmup} warm-up (fewer past "
             f"--budget {args.budget:g} s); x: the other's time / ours cached (> 1: ours "
             f"faster); GF/s: GFLOP/s {flops.PER_BLOCK}.",
             "ours cached: the same pattern object every call (lists cached per lengths); new "
             "lengths: a new pattern object per call, so every call builds each document's "
             "layout and the packed lists (the first call for new lengths); lists build: the "
             "difference.",
             "SDPA: scaled_dot_product_attention(attn_mask=bool [T, T], enable_gqa): the "
             "block-diagonal causal mask with the same fixed pattern in each document (the "
             "elements ours computes), built beforehand; dense O(T^2) work all the same."]
    errors = [r["max_error"] for r in results["ours"] if "max_error" in r]
    if errors:
        lines.append(f"Largest |SDPA - ours| (forward): {max(errors):.2g}.")
    if results.get("flex"):
        errors = [r["max_error"] for r in results["flex"] if "max_error" in r]
        lines.append("Flex: torch.compile(flex_attention) on a BlockMask of block "
                     f"{args.block} from torch.compile(create_block_mask); mask_mod "
                     "document: same document and causal; document+fixed: also the fixed "
                     "pattern in document positions. Forward only: Flex has no CPU backward."
                     + (f" Largest |Flex document+fixed - ours|: {max(errors):.2g}."
                        if errors else ""))
    return lines


def report(args, header: dict, results: dict) -> str:
    parts = ["# Packed documents (cu_seqlens) with a per-document fixed pattern", "",
             machine.one_line(header), "", "## 1. Ours against SDPA with the block-diagonal "
             "mask", "", ours_table(results["ours"]), ""]
    if results.get("flex"):
        parts += ["## 2. FlexAttention with a document mask_mod", "",
                  flex_table(results["flex"]), ""]
    parts += [f"- {line}" for line in notes(args, results)]
    return "\n".join(parts) + "\n"


def run(args: argparse.Namespace) -> dict:
    """Measures both tables, prints the report, writes --out; returns the results."""
    args = _settle(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = machine.describe()
    _progress(machine.one_line(header))
    args.device = "cpu"  # what Timer reads
    timer = Timer(args)
    results = {"documents": {}, "ours": [], "flex": []}
    for t in sorted(args.seq_lens):
        lengths = document_lengths(t, *args.doc_lens, args.seed)
        results["documents"][t] = lengths
        for dtype_name in args.dtypes:
            _progress(f"ours and SDPA: T={t} {dtype_name}, {len(lengths)} documents")
            results["ours"] += measure_ours_sdpa(args, timer, t, dtype_name, lengths)
            _free("cpu")
    if args.flex:
        ours = {(r["seq_len"], r["dtype"]): r["ours_s"] for r in results["ours"]
                if r["pass"] == "fwd"}
        for t in sorted(args.flex_seq_lens):
            lengths = results["documents"].get(t) or document_lengths(t, *args.doc_lens,
                                                                      args.seed)
            results["documents"][t] = lengths
            for dtype_name in args.dtypes:
                try:
                    results["flex"] += measure_flex(args, timer, t, dtype_name, lengths, ours)
                except ImportError as error:
                    _progress(f"FlexAttention unavailable: {error}")
    return publish(args, header, report(args, header, results), results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_packing.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
