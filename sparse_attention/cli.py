"""The `sparse-attention` command line (also `python -m sparse_attention`)."""

from __future__ import annotations

import argparse

from sparse_attention import demo, show_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attention", description="Block-sparse attention for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="time and memory of sparse against dense attention on a long sequence",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)
    show_parser = commands.add_parser(
        "show", help="picture, density and FLOPs of an attention pattern",
        description=show_command.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    show_command.add_arguments(show_parser)
    show_parser.set_defaults(run=show_command.run)
    return parser


def main(argv: list[str] | None = None):
    """Runs a command; returns what it measured (for scripts and tests)."""
    args = build_parser().parse_args(argv)
    return args.run(args)
