"""Benchmark results as a markdown table, a JSON file, growth exponents and a log-log plot."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict

from sparse_attention.benchmark import flops
from sparse_attention.benchmark.cases import Case
from sparse_attention.measure import format_bytes


@dataclasses.dataclass
class Row:
    case: Case
    density: float
    flops: int        # forward FLOPs per computed block of our layout
    results: dict     # contender name -> contenders.Result


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _rate(count, seconds) -> str:
    """GFLOP/s of `count` FLOPs done in `seconds`, as a table cell."""
    per_second = flops.rate(count, seconds)
    return "-" if per_second is None else f"{per_second / 1e9:.0f}"


def _ratio(baseline, ours) -> str:
    return "-" if baseline is None or ours is None or ours <= 0 else f"{baseline / ours:.2f}x"


def _cell(result, field) -> str:
    if result.skipped:
        return "skipped"
    return _ms(getattr(result, field))


def markdown_table(rows: list[Row]) -> str:
    """One line per case: our times and per-block rates, the baselines' times, speed-ups and
    peak memory (forward + backward; Flex on the CPU: forward)."""
    head = ("| pattern | N | D | dtype | density | ours fwd ms | ours bwd ms | ours fwd GF/s "
            "| ours bwd GF/s | SDPA fwd GF/s | SDPA bwd GF/s | SDPA dense fwd+bwd ms "
            "| SDPA masked fwd+bwd ms | Flex fwd ms | vs dense fwd+bwd | vs Flex fwd "
            "| ours peak | dense peak | masked peak |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        c, r = row.case, row.results
        ours, dense, masked, flex = r["ours"], r["sdpa_dense"], r["sdpa_masked"], r["flex"]
        dense_work = flops.dense_flops(c.seq_len, c.head_dim, c.batch, c.heads, c.causal)
        lines.append("| " + " | ".join([
            c.pattern, str(c.seq_len), str(c.head_dim), c.dtype, f"{row.density:.1%}",
            _ms(ours.forward), _ms(ours.backward),
            _rate(row.flops, ours.forward), _rate(flops.backward_flops(row.flops), ours.backward),
            _rate(dense_work, dense.forward),
            _rate(flops.backward_flops(dense_work), dense.backward),
            _cell(dense, "forward_backward"), _cell(masked, "forward_backward"),
            _cell(flex, "forward"),
            _ratio(dense.forward_backward, ours.forward_backward),
            _ratio(flex.forward, ours.forward),
            format_bytes(ours.peak_memory), format_bytes(dense.peak_memory),
            "-" if masked.skipped else format_bytes(masked.peak_memory),
        ]) + " |")
    return "\n".join(lines)


def notes(rows: list[Row]) -> list[str]:
    """What was skipped and why, and how far each baseline's output is from ours (the check
    that they computed the same attention)."""
    lines, errors, left_out = [], defaultdict(float), set()
    for row in rows:
        c = row.case
        for name, result in row.results.items():
            if result.skipped and result.skipped.startswith("left out"):
                left_out.add(name)
            elif result.skipped:
                lines.append(f"{name} at {c.pattern} N={c.seq_len} D={c.head_dim} {c.dtype}: "
                             f"skipped, {result.skipped}")
            elif result.max_error is not None:
                key = (name, c.dtype)
                errors[key] = max(errors[key], result.max_error)
    if left_out:
        lines.append(f"not measured in this run: {', '.join(sorted(left_out))}")
    for (name, dtype), error in sorted(errors.items()):
        lines.append(f"largest |{name} - ours| over the {dtype} cases: {error:.2g}")
    return lines


def _fit_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(N)."""
    points = [(n, t) for n, t in points if t]
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def _series(rows: list[Row]) -> dict:
    """(dtype, D) -> curve name -> [(N, forward+backward seconds)]."""
    curves = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        c = row.case
        key = (c.dtype, c.head_dim)
        curves[key][f"ours, {c.pattern}"][c.seq_len] = row.results["ours"].forward_backward
        dense = row.results["sdpa_dense"]
        name = "SDPA dense" + (" causal" if c.causal else "")
        curves[key][name][c.seq_len] = dense.forward_backward
    return {key: {name: sorted(points.items()) for name, points in named.items()}
            for key, named in curves.items()}


def growth_exponents(rows: list[Row], min_seq_len: int = 4096) -> list[str]:
    """Fitted exponent of forward+backward time against N, from min_seq_len up."""
    lines = []
    for (dtype, dim), named in _series(rows).items():
        for name, points in named.items():
            slope = _fit_exponent([(n, t) for n, t in points if n >= min_seq_len])
            if slope is not None:
                span = [n for n, t in points if n >= min_seq_len and t]
                lines.append(f"{name} ({dtype}, D={dim}), N {span[0]}..{span[-1]}: "
                             f"time ~ N^{slope:.2f}")
    return lines


def plot(rows: list[Row], path) -> bool:
    """Log-log forward+backward time against N, one panel per (dtype, D), with N^1.5 and N^2
    guides. Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series = _series(rows)
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
    for ax, ((dtype, dim), named) in zip(axes[0], sorted(series.items())):
        for name, points in sorted(named.items()):
            points = [(n, t) for n, t in points if t]
            if points:
                style = "--" if name.startswith("SDPA") else "-"
                ax.loglog(*zip(*points), style, marker="o", label=name)
        anchor = min((p for pts in named.values() for p in pts if p[1]), default=None)
        if anchor:
            ns = sorted({n for pts in named.values() for n, _ in pts})
            for power in (1.5, 2.0):
                ax.loglog(ns, [anchor[1] * (n / anchor[0]) ** power for n in ns], ":",
                          color="gray", linewidth=1)
                ax.annotate(f"N^{power:g}", (ns[-1], anchor[1] * (ns[-1] / anchor[0]) ** power),
                            color="gray", fontsize=8)
        ax.set_title(f"forward + backward, {dtype}, D={dim}")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def to_json(rows: list[Row], header: dict) -> str:
    return json.dumps({
        "machine": header,
        "rows": [{
            "case": dataclasses.asdict(row.case), "density": row.density, "flops": row.flops,
            "results": {name: dataclasses.asdict(r) for name, r in row.results.items()},
        } for row in rows],
    }, indent=1)
