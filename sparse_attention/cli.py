"""The `sparse-attention` command line (also `python -m sparse_attention`)."""

from __future__ import annotations

import argparse

from sparse_attention import show_command
from sparse_attention.benchmark import command as bench
from sparse_attention.benchmark import speed
from sparse_attention.optional import require
from sparse_attention.training import demo_command, eval_command, generate_command, train_command
from sparse_attention.training.checkpoint import CheckpointError

# Subcommand name -> (module with add_arguments/run and a docstring, one-line help).
SUBCOMMANDS = {
    "train": (train_command, "train a Sparse Transformer on text, with checkpoints and a report"),
    "eval": (eval_command, "score a trained checkpoint (bits per byte or accuracy)"),
    "generate": (generate_command, "continue a prompt with a trained language model"),
    "demo": (demo_command,
             "train sparse against dense attention at 8192 tokens and compare (a few minutes)"),
    "speed": (speed, "time and memory of sparse against dense attention on one long sequence"),
    "bench": (bench, "benchmark against torch SDPA and compiled FlexAttention"),
    "show": (show_command,
             "picture, density and FLOPs of an attention pattern, or a trained model's attention"),
}


# What the training commands import on the way (the `train` extra), checked before they start.
TRAINING_MODULES = ("yaml", "tqdm", "safetensors.torch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attention", description="Block-sparse attention for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def run(argv: list[str] | None = None):
    """Runs a command; returns what it measured (for scripts and tests)."""
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval", "generate", "demo"):
        for module in TRAINING_MODULES:
            require(module, purpose=f"sparse-attention {args.command}")
    return args.run(args)


def main(argv: list[str] | None = None) -> None:
    """The console script: its return value becomes the exit status, so it returns None.
    Errors in the settings or the data are reported in one line, without a traceback."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, ImportError) as error:
        raise SystemExit(f"sparse-attention: error: {error}") from None
