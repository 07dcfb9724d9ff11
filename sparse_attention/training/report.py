"""The report of one or two training runs (sparse against dense): report.md with the settings,
the results and their ratios, and PNG plots of loss, throughput, memory and the attention
pattern.

matplotlib is optional and imported only here, when the plots are drawn; without it report.md
is still written and says how to get the plots.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from sparse_attention.layout import BlockLayout
from sparse_attention.measure import format_bytes

REPORT_FILE = "report.md"
# Train steps left out of the medians: the first ones warm caches up (and compile).
UNTIMED_STEPS = 2
# The final eval values shown, in this order, with their column titles.
FINAL_COLUMNS = {"bits_per_byte": "bits/byte", "accuracy": "accuracy", "loss": "eval loss"}
# What the attention saw of the documents, by (task, packing).
PACKING_NOTES = {
    ("lm", "none"): "Documents: sequences are windows of the token stream, whose documents "
                    "attend to each other across the separator (packing none).",
    ("lm", "documents"): "Documents: every document in a sequence is attended alone, no token "
                         "sees another document's (packing documents).",
    ("classify", "none"): "Documents: each one is classified in a padded row of its own "
                          "(packing none).",
    ("classify", "documents"): "Documents: a batch's documents share one row without padding, "
                               "each attended alone (packing documents).",
}


@dataclasses.dataclass
class RunSummary:
    """One run as the report shows it. records are read_metrics() rows: "train" rows have step,
    loss, lr, tokens_per_s, step_time_s, elapsed_s, memory_bytes; "eval" rows have step,
    elapsed_s, loss and bits_per_byte (language modelling) or accuracy (classification)."""

    name: str                       # "sparse" or "dense"
    settings: dict
    records: list[dict]
    final: dict                     # the final eval values
    step_time_s: float              # median
    tokens_per_s: float
    peak_memory_bytes: int | None   # None where not measured
    density: float                  # fraction of the attention's blocks computed
    layout: BlockLayout | None      # drawn in pattern.png
    eval_sequences: int | None = None        # validation sequences the final scores are from
    validation_sequences: int | None = None  # of so many

    @classmethod
    def from_records(cls, name: str, settings: dict, records: list[dict], *, density: float,
                     layout: BlockLayout | None = None, eval_sequences: int | None = None,
                     validation_sequences: int | None = None) -> RunSummary:
        """Summarises a run's metrics: medians of step time and tokens/s over its train
        records (after the first UNTIMED_STEPS, which warm caches up and compile), the largest
        memory_bytes, and the last eval record as the final values."""
        train = [r for r in records if r.get("kind") == "train"]
        if not train:
            raise ValueError(f"records: run {name!r} has no 'train' records to summarise")
        timed = train[UNTIMED_STEPS:] or train
        evals = [r for r in records if r.get("kind") == "eval"]
        final = {k: v for k, v in evals[-1].items() if k != "kind"} if evals else {}
        memory = [r["memory_bytes"] for r in train if r.get("memory_bytes") is not None]
        return cls(
            name=name, settings=settings, records=records, final=final,
            step_time_s=statistics.median(r["step_time_s"] for r in timed),
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
            peak_memory_bytes=int(max(memory)) if memory else None,
            density=density, layout=layout, eval_sequences=eval_sequences,
            validation_sequences=validation_sequences,
        )

    @property
    def scored_on(self) -> str | None:
        """'8 of 56 validation sequences' (or '56 validation sequences'), when known."""
        if self.eval_sequences is None:
            return None
        if self.validation_sequences is None or self.validation_sequences == self.eval_sequences:
            return f"{self.eval_sequences} validation sequences"
        return f"{self.eval_sequences} of {self.validation_sequences} validation sequences"


def write_report(folder: Path, runs: list[RunSummary], *, title: str, machine: str = "") -> Path:
    """Writes folder/report.md (and its PNG plots when matplotlib is installed); returns the
    report's path. machine: where the runs ran, shown under the title."""
    if not isinstance(runs, (list, tuple)) or not runs or \
            not all(isinstance(run, RunSummary) for run in runs):
        raise TypeError("runs: expected a non-empty list of RunSummary")
    if not isinstance(title, str) or not title:
        raise TypeError(f"title: expected a non-empty str, got {title!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", *([machine, ""] if machine else []), "## Settings", "", *_settings_table(runs), "",
             "## Results", "", *_results_table(runs), "", *_scored_on(runs), *_packing(runs)]
    if len(runs) == 2:
        lines += ["## Ratios", "", *_ratios(runs), ""]
    images = _draw_plots(folder, runs)
    lines += ["## Plots", ""]
    if images is None:
        lines += ["The plots need matplotlib: `pip install matplotlib`, then run again.", ""]
    else:
        lines += [line for file, caption in images for line in (f"![{caption}]({file})", "")]
    path = folder / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# -- markdown ----------------------------------------------------------------------------------


def _row(cells) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return [_row(head), "|" + "---|" * len(head), *(_row(row) for row in rows)]


def _settings_table(runs: list[RunSummary]) -> list[str]:
    names = list(dict.fromkeys(name for run in runs for name in run.settings))
    return _table(["setting", *(run.name for run in runs)],
                  [[name, *(run.settings.get(name, "-") for run in runs)] for name in names])


def _results_table(runs: list[RunSummary]) -> list[str]:
    finals = [key for key in FINAL_COLUMNS if any(key in run.final for run in runs)]
    head = ["run", *(FINAL_COLUMNS[key] for key in finals), "median step time", "tokens/s",
            "peak memory", "attention density"]
    rows = [[run.name, *(_number(run.final.get(key)) for key in finals),
             _seconds(run.step_time_s), f"{run.tokens_per_s:,.0f}",
             format_bytes(run.peak_memory_bytes), f"{run.density:.1%}"] for run in runs]
    return _table(head, rows)


def _scored_on(runs: list[RunSummary]) -> list[str]:
    """A line saying what the final scores were computed on (a subset, by --eval-batches)."""
    where = list(dict.fromkeys(run.scored_on for run in runs if run.scored_on))
    if not where or not any(run.final for run in runs):
        return []
    if len(where) == 1:
        return [f"Final scores on {where[0]}.", ""]
    return [f"Final scores of {run.name} on {run.scored_on}." for run in runs if run.scored_on] + [""]


def packing_note(settings: dict) -> str | None:
    """How a run's attention saw the documents, from its settings (None when not known)."""
    return PACKING_NOTES.get((settings.get("task"), settings.get("packing", "none")))


def _packing(runs: list[RunSummary]) -> list[str]:
    notes = list(dict.fromkeys(packing_note(run.settings) for run in runs))
    return [note for note in notes if note] + ([""] if any(notes) else [])


def _ratios(runs: list[RunSummary]) -> list[str]:
    """dense / sparse when the runs are so named, else second / first."""
    by_name = {run.name: run for run in runs}
    if set(by_name) == {"sparse", "dense"}:
        base, other = by_name["sparse"], by_name["dense"]
    else:
        base, other = runs
    label = f"{other.name} / {base.name}"
    memory = "-"
    if base.peak_memory_bytes and other.peak_memory_bytes is not None:
        memory = f"{other.peak_memory_bytes / base.peak_memory_bytes:.2f}x"
    return _table(["", label], [["median step time", _ratio(other.step_time_s, base.step_time_s)],
                                ["peak memory", memory]])


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# -- plots -------------------------------------------------------------------------------------


def _draw_plots(folder: Path, runs: list[RunSummary]) -> list[tuple[str, str]] | None:
    """Writes the PNGs; returns (file name, caption) of each, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None

    def save(name: str, caption: str, draw) -> tuple[str, str]:
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        FigureCanvasAgg(fig)  # renders without a display
        draw(fig.subplots())
        fig.savefig(folder / name, dpi=100)
        return name, caption

    images = [
        save("loss_vs_step.png", "Loss against step",
             lambda ax: _loss_plot(ax, runs, "step", "step")),
        save("loss_vs_time.png", "Loss against time",
             lambda ax: _loss_plot(ax, runs, "elapsed_s", "elapsed time (s)")),
        save("throughput.png", "Throughput", lambda ax: _throughput_plot(ax, runs)),
        save("memory.png", "Peak memory", lambda ax: _memory_plot(ax, runs)),
    ]
    layout = runs[0].layout
    if layout is not None:
        from sparse_attention.show import show

        show(layout, layout.shape[1] * layout.block_size, out=folder / "pattern.png",
             title=f"{runs[0].name} attention: {layout.density:.1%} of blocks computed")
        images.append(("pattern.png", f"Attention pattern of the {runs[0].name} run"))
    return images


def _series(run: RunSummary, kind: str, x: str, y: str) -> tuple[list, list]:
    rows = [r for r in run.records if r.get("kind") == kind and r.get(x) is not None
            and r.get(y) is not None]
    return [r[x] for r in rows], [r[y] for r in rows]


def _loss_plot(ax, runs: list[RunSummary], x: str, x_label: str) -> None:
    """Train loss as a line per run; eval loss as markers of the same colour."""
    for run in runs:
        (line,) = ax.plot(*_series(run, "train", x, "loss"), label=f"{run.name} train")
        xs, ys = _series(run, "eval", x, "loss")
        if xs:
            ax.plot(xs, ys, "o", color=line.get_color(), label=f"{run.name} eval")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    ax.legend()


def _throughput_plot(ax, runs: list[RunSummary]) -> None:
    for run in runs:
        ax.plot(*_series(run, "train", "step", "tokens_per_s"), label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.legend()


def _memory_plot(ax, runs: list[RunSummary]) -> None:
    heights = [(run.peak_memory_bytes or 0) / 2**20 for run in runs]
    bars = ax.bar([run.name for run in runs], heights)
    ax.bar_label(bars, labels=[format_bytes(run.peak_memory_bytes) for run in runs])
    ax.set_ylabel("peak memory (MiB)")
