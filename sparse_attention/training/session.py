"""A training session: the run, the dense comparison when asked for, and the report."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

import sparse_attention as sa
from sparse_attention import measure
from sparse_attention.training import distributed, runtime
from sparse_attention.training.config import TrainConfig
from sparse_attention.training.metrics_log import read_metrics
from sparse_attention.training.report import RunSummary, packing_note, write_report
from sparse_attention.training.checkpoint import CHECKPOINTS_FOLDER
from sparse_attention.training.trainer import RunResult, train
from sparse_attention.benchmark.machine import cpu_features, cpu_name

DENSE_FOLDER = "dense"
REPORT_FOLDER = "report"
SCORES = ("bits_per_byte", "accuracy", "loss")


@dataclasses.dataclass
class SessionResult:
    runs: list[RunSummary]
    report: Path | None


def run_session(config: TrainConfig, *, resume: bool = False) -> SessionResult:
    """Trains config's run, then (compare="dense") the same model with dense attention in
    OUT/dense, and writes OUT/report. A resumed session resumes whichever runs have
    checkpoints."""
    results = [train(config, resume=resume, name=config.pattern)]
    if config.compare == "dense" and not results[0].interrupted:
        dense = dataclasses.replace(config, out=str(Path(config.out) / DENSE_FOLDER), compare="none",
                                    pattern="dense", pattern_params={})
        dense_started = (Path(dense.out) / CHECKPOINTS_FOLDER).is_dir()
        results.append(train(dense, resume=resume and dense_started, name="dense", data=results[0].data))
    if not distributed.processes_from_environment().is_main:
        distributed.stop()
        return SessionResult([], None)
    summaries = [summarize(result) for result in results]
    report = write_report(Path(config.out) / REPORT_FOLDER, summaries,
                          title=f"{config.pattern} attention, {config.seq_len} tokens", machine=machine(config))
    print_headline(summaries, report)
    distributed.stop()
    return SessionResult(summaries, report)


def summarize(result: RunResult) -> RunSummary:
    """The run's summary, from its whole log (so a resumed run counts its earlier steps); its
    precision setting is shown as what ran, and why."""
    settings = result.config.to_dict()
    if result.precision is not None:
        settings["precision"] = str(result.precision)
    return RunSummary.from_records(result.name, settings, read_metrics(result.out),
                                   density=result.density, layout=result.layout,
                                   eval_sequences=result.eval_sequences,
                                   validation_sequences=result.data.stats.get("validation_sequences"))


def machine(config: TrainConfig) -> str:
    """The machine the runs ran on, in one line."""
    processes = distributed.processes_from_environment()
    device = runtime.pick_device(config.device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = (f"{cpu_name()} ({cpu_features()}; {sa.cpu_capability()} kernels), "
                 f"{torch.get_num_threads()} threads")
    return (f"Machine: {where}; {processes.world_size} process(es); torch {torch.__version__}; "
            f"sparse_attention {sa.__version__}.")



def print_headline(runs: list[RunSummary], report: Path) -> None:
    for run in runs:
        score = ", ".join(f"{name} {run.final[name]:.4f}" for name in SCORES if name in run.final)
        if score and run.scored_on:
            score += f" (on {run.scored_on})"
        score = score or "not evaluated"
        print(f"{run.name:>8s}: {score}; step {run.step_time_s:.3f} s, {run.tokens_per_s:,.0f} tokens/s, "
              f"peak memory {measure.format_bytes(run.peak_memory_bytes)}, "
              f"computed blocks {run.density:.1%}")
    if len(runs) == 2:
        sparse, dense = runs
        ratios = f"dense/sparse step time {dense.step_time_s / sparse.step_time_s:.2f}x"
        if sparse.peak_memory_bytes and dense.peak_memory_bytes:
            ratios += f", memory {dense.peak_memory_bytes / sparse.peak_memory_bytes:.2f}x"
        print(ratios)
    precisions = list(dict.fromkeys(run.settings.get("precision") for run in runs))
    print("precision " + "; ".join(f"{run.name} {run.settings.get('precision')}" for run in runs)
          if len(precisions) > 1 else f"precision {precisions[0]}")
    note = packing_note(runs[0].settings)  # the same data settings for every run
    if note:
        print(note)
    print(f"report: {report}", file=sys.stdout)
