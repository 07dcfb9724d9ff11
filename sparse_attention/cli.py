"""The `sparse-attention` command line (also `python -m sparse_attention`)."""

from __future__ import annotations

import argparse

from sparse_attention import demo, show_command
from sparse_attention.benchmark import command as bench

# Subcommand name -> (module with add_arguments/run and a docstring, one-line help).
SUBCOMMANDS = {
    "demo": (demo, "time and memory of sparse against dense attention on a long sequence"),
    "bench": (bench, "benchmark against torch SDPA and compiled FlexAttention"),
    "show": (show_command, "picture, density and FLOPs of an attention pattern"),
}


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
    return args.run(args)


def main(argv: list[str] | None = None) -> None:
    """The console script: its return value becomes the exit status, so it returns None."""
    run(argv)
