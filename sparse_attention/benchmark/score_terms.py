"""`python benchmarks/bench_score_terms.py`: what each score term (sinks, ALiBi, softcap, T5
position bias, dropout; sparse_attention.score_terms) costs on top of the plain kernels.

For each dtype and head dim, one causal call of the "fixed" pattern (from_name("fixed",
seq_len=N, block_size=--block)) over [1, --heads, N, D] is timed with each term alone and with
all of them, forward and forward + backward, each against the plain call timed in alternation
with it (plain, term, plain, term, ...: a drift of the machine's speed hits both alike). Beside
it, compiled FlexAttention's forward over the same blocks, plain and with the same term as a
score_mod where Flex has one (softcap, ALiBi, the position bias as a table lookup; Flex has no
sinks or dropout), timed the same way: what the same term costs a user of torch. The table
gives medians and the overhead (markdown on stdout; results.md and results.json in --out).
"""

from __future__ import annotations

import argparse

import torch

import sparse_attention as sa
from sparse_attention import score_terms
from sparse_attention.benchmark import machine
from sparse_attention.benchmark.command import csv_of
from sparse_attention.benchmark.flex import compiled_flex, flex_block_mask
from sparse_attention.benchmark.layouts import Skipped, _ms, _progress, add_timing_arguments, publish
from sparse_attention.benchmark.timing import median_time

TERMS = ("plain", "sinks", "alibi_slopes", "softcap", "position_bias", "dropout", "all")
FLEX_TERMS = ("alibi_slopes", "softcap", "position_bias")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=4096, help="N (default 4096)")
    parser.add_argument("--head-dims", type=csv_of(int), default=(64, 128), help="default 64,128")
    parser.add_argument("--dtypes", type=csv_of(str), default=("float32", "bfloat16"),
                        help="default float32,bfloat16")
    parser.add_argument("--heads", type=int, default=8, help="H (default 8)")
    parser.add_argument("--block", type=int, default=64, help="block size (default 64)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    add_timing_arguments(parser, repeats=5, budget=20.0, max_call_s=120.0)


def term_values(heads: int, num_buckets: int = 32, generator=None) -> dict:
    """The value of each term a benchmark call passes (Gemma 2's softcap of 50, T5's 32 buckets,
    BERT's dropout of 0.1)."""
    g = generator or torch.Generator().manual_seed(0)
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)  # ALiBi's geometric slopes
    return {"sinks": dict(sinks=torch.randn(heads, generator=g)),
            "alibi_slopes": dict(alibi_slopes=slopes),
            "softcap": dict(softcap=50.0),
            "position_bias": dict(position_bias=torch.randn(heads, num_buckets, generator=g)),
            "dropout": dict(dropout_p=0.1, seed=1)}


def _call_args(values: dict, term: str, device) -> dict:
    if term == "plain":
        return {}
    chosen = values if term == "all" else {term: values[term]}
    args = {}
    for part in chosen.values():
        args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in part.items()})
    return args


def _flex_score_mod(term: str, values: dict, n: int, device):
    """The term as a FlexAttention score_mod (queries and keys of equal length: offset 0)."""
    if term == "plain":
        return None
    if term == "softcap":
        cap = values["softcap"]["softcap"]
        return lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap)
    if term == "alibi_slopes":
        slopes = values["alibi_slopes"]["alibi_slopes"].to(device)
        return lambda score, b, h, q_idx, kv_idx: score - slopes[h] * (kv_idx - q_idx).abs()
    table = values["position_bias"]["position_bias"].to(device)
    buckets = score_terms.distance_buckets(score_terms.PositionBias(table, bidirectional=False), n, n).to(device)
    return lambda score, b, h, q_idx, kv_idx: score + table[h, buckets[kv_idx - q_idx + n - 1]]


def alternated(plain, other, repeats: int, warmup: int, device) -> tuple:
    """Median seconds of plain() and other(), timed in alternation after warm-up calls; a
    failure is a result (its cells say why), the run goes on."""
    try:
        for _ in range(warmup):
            plain(), other()
        times = ([], [])
        for _ in range(repeats):
            for fn, out in zip((plain, other), times):
                out.append(median_time(fn, 1, 0, device=device))
    except Exception as error:
        failed = Skipped(f"{type(error).__name__}: {str(error).splitlines()[0][:160]}")
        return failed, failed
    return tuple(sorted(t)[len(t) // 2] for t in times)


def measure(args) -> list[dict]:
    n, device = args.seq_len, args.device
    pattern = sa.from_name("fixed", seq_len=n, block_size=args.block)
    values = term_values(args.heads)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for dim in args.head_dims:
            g = torch.Generator().manual_seed(args.seed)
            q, k, v = (torch.randn(1, args.heads, n, dim, generator=g).to(device, dtype) for _ in range(3))
            grad = torch.randn(q.shape, generator=g).to(device, dtype)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]

            def forward(call):
                return lambda: sa.sparse_attention(q, k, v, pattern, causal=True, **call)

            def training(call):
                return lambda: sa.sparse_attention(*leaves, pattern, causal=True, **call).backward(grad)

            flex_plain = None if args.no_flex else _flex(pattern, q, k, v, None)
            for term in TERMS[1:]:
                call = _call_args(values, term, device)
                _progress(f"{dtype_name} D={dim} {term}")
                row = {"dtype": dtype_name, "head_dim": dim, "term": term}
                row["plain_fwd"], row["fwd"] = alternated(forward({}), forward(call), args.repeats, args.warmup, device)
                row["plain_fwd+bwd"], row["fwd+bwd"] = alternated(training({}), training(call), args.repeats,
                                                                   args.warmup, device)
                if flex_plain is not None and term in FLEX_TERMS:
                    flex_term = _flex(pattern, q, k, v, _flex_score_mod(term, values, n, device))
                    row["flex_plain_fwd"], row["flex_fwd"] = alternated(flex_plain, flex_term, args.repeats,
                                                                        max(2, args.warmup), device)
                rows.append(row)
    return rows


def _flex(pattern, q, k, v, score_mod):
    n = q.shape[2]
    layout = pattern.layout(n, n, num_heads=q.shape[1], causal=True)
    block_mask = flex_block_mask(layout, n, n, True, q.device)
    flex = compiled_flex()
    return lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _overhead(value, plain) -> str:
    if not isinstance(value, float) or not isinstance(plain, float):
        return ""
    return f"{100 * (value / plain - 1):+.0f}%"


def table(rows: list[dict]) -> str:
    lines = ["| dtype | D | term | fwd ms (plain) | overhead | fwd+bwd ms (plain) | overhead | "
             "Flex fwd ms (plain) | Flex overhead |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    failures: list[str] = []
    for row in rows:
        cells = []
        for key in ("fwd", "fwd+bwd", "flex_fwd"):
            plain = row.get(("flex_plain_fwd" if key == "flex_fwd" else f"plain_{key}"))
            value = row.get(key)
            if isinstance(value, Skipped):
                if value.reason not in failures:
                    failures.append(value.reason)
                cells += [f"failed ({failures.index(value.reason) + 1})", ""]
            else:
                cells += ["n/a", ""] if value is None else [f"{_ms(value)} ({_ms(plain)})", _overhead(value, plain)]
        lines.append(f"| {row['dtype']} | {row['head_dim']} | {row['term']} | " + " | ".join(cells) + " |")
    notes = [f"({n}) {reason}" for n, reason in enumerate(failures, 1)]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    header = machine.describe()
    rows = measure(args)
    text = (f"# Score terms: cost over the plain kernels\n\n{machine.one_line(header)}\n\n"
            f"Causal fixed pattern, N = {args.seq_len}, H = {args.heads}, block {args.block}; median "
            f"of {args.repeats} calls, each term timed in alternation with the plain call. \"all\" is every term at once. Flex has no sinks or dropout "
            "(n/a).\n\n" + table(rows))
    return publish(args, header, text, {"rows": [{k: str(v) if isinstance(v, Skipped) else v
                                                  for k, v in row.items()} for row in rows]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_score_terms.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
