"""`sparse-attention show NAME`: a pattern's block layout as a picture, with its cost.

Builds the pattern through `sparse_attention.from_name` (length-aware defaults), prints its
density, the blocks the kernels compute and the forward FLOPs next to dense attention, and
writes the picture to --out (any image suffix matplotlib knows) or prints it as text.

  sparse-attention show fixed --seq-len 4096 --block 64 --out fixed.png
  sparse-attention show bigbird --seq-len 8192 --causal
  sparse-attention show strided --param stride=1024

With --checkpoint, what a trained model attends to instead: the run's model reads the first
--seq-len tokens of a text file once, and --out gets the block attention mass of its layers
(rows) and heads (columns), each query block's row as shares of its attention (blocks the
layout does not compute in grey); one line per layer summarises it.

  sparse-attention show --checkpoint runs/notes --text notes.txt --out mass.png
  sparse-attention show --checkpoint runs/notes --text notes.txt --layer 0,3 --head 1 --out m.png
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import torch

import sparse_attention as sa
from sparse_attention.show import resolve
from sparse_attention.training.config import DEVICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", choices=sa.PATTERN_NAMES,
                        help="the pattern (not with --checkpoint)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens (default 4096; with --checkpoint the model's max_seq_len)")
    parser.add_argument("--block", type=int, default=None, help="block size (default 64)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 1)")
    parser.add_argument("--head-dim", type=int, default=None, help="for the FLOP count (default 64)")
    parser.add_argument("--causal", action="store_true", help="causal attention")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a keyword argument of the pattern (Python literal), repeatable")
    parser.add_argument("--out", help="write the picture to this file (needs matplotlib)")
    parser.add_argument("--text", nargs="?", const=True, default=False, metavar="FILE",
                        help="print the picture as text too; with --checkpoint: the text file "
                             "the model reads")
    parser.add_argument("--ascii", action="store_true", help="text in plain ASCII")
    trained = parser.add_argument_group("a trained model's block attention mass")
    trained.add_argument("--checkpoint", metavar="DIR",
                         help="a run folder (its latest checkpoint) or one checkpoint folder "
                              "written by `sparse-attention train`")
    trained.add_argument("--layer", action="append", default=None, metavar="I[,J...]",
                         help="draw these layers only (repeatable; default all)")
    trained.add_argument("--head", action="append", default=None, metavar="I[,J...]",
                         help="draw these heads only (repeatable; default all)")
    trained.add_argument("--log", action="store_true", help="colour the shares on a log scale")
    trained.add_argument("--device", choices=DEVICES, default=None, help="(default: auto)")


# Flags of each mode that the other one does not take, with the value that means "not given".
PATTERN_FLAGS = {"block": None, "heads": None, "head_dim": None, "causal": False, "param": [],
                 "ascii": False}
CHECKPOINT_FLAGS = {"layer": None, "head": None, "log": False, "device": None}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--param: expected KEY=VALUE, got {item!r}")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value  # a bare word, e.g. attention=unidirectional
    return params


def cost(layout: sa.BlockLayout, seq_len: int, heads: int, head_dim: int, causal: bool) -> dict:
    """Blocks the kernels compute (blocks hidden by the causal rule dropped) and forward FLOPs,
    for this layout and for dense attention."""
    window = (None, 0) if causal else None
    lists = layout.block_lists(seq_len, seq_len, window, "cpu")
    per_head = heads // layout.num_heads
    computed = int(lists.row_offsets[-1]) * per_head
    n = layout.mask.shape[-1]
    dense = (n * (n + 1) // 2 if causal else n * n) * heads
    flops_per_block = 4 * layout.block_size**2 * head_dim
    return {"computed_blocks": computed, "dense_blocks": dense,
            "flops": computed * flops_per_block, "dense_flops": dense * flops_per_block}


def run(args: argparse.Namespace) -> dict:
    if args.checkpoint is not None:
        return run_checkpoint(args)
    for name, unset in CHECKPOINT_FLAGS.items():
        if getattr(args, name) != unset:
            raise ValueError(f"{_flag(name)}: only with --checkpoint")
    if isinstance(args.text, str):
        if args.name is None and args.text in sa.PATTERN_NAMES:
            args.name, args.text = args.text, True  # `show --text NAME`: the flag, then the name
        else:
            raise ValueError(f"--text: a file ({args.text}) only with --checkpoint; without it "
                             f"--text is a flag")
    if args.name is None:
        raise ValueError("NAME: expected a pattern name (one of " + ", ".join(sa.PATTERN_NAMES)
                         + "), or --checkpoint RUN for a trained model's attention")
    seq_len = 4096 if args.seq_len is None else args.seq_len
    block = 64 if args.block is None else args.block
    heads = 1 if args.heads is None else args.heads
    head_dim = 64 if args.head_dim is None else args.head_dim
    pattern = sa.from_name(args.name, seq_len=seq_len, block_size=block,
                           num_heads=heads, **parse_params(args.param))
    causal = args.causal or pattern.causal
    layout = resolve(pattern, seq_len, heads, causal)
    numbers = cost(layout, seq_len, heads, head_dim, causal)
    print(f"{pattern!r}")
    print(f"N={seq_len}, block {block}, {heads} head(s), head_dim {head_dim}"
          f"{', causal' if causal else ''}")
    print(f"density: {layout.density:.2%} of the {layout.mask.shape[-2]} x {layout.mask.shape[-1]} blocks")
    print(f"computed blocks: {numbers['computed_blocks']:,} (dense: {numbers['dense_blocks']:,}, "
          f"{numbers['computed_blocks'] / numbers['dense_blocks']:.1%})")
    print(f"forward FLOPs: {numbers['flops'] / 1e9:.3f} GFLOP (dense: "
          f"{numbers['dense_flops'] / 1e9:.3f} GFLOP, {numbers['dense_flops'] / numbers['flops']:.1f}x more)")
    if args.out:
        sa.show(pattern, seq_len, heads, args.out, causal=causal)
        print(f"wrote {args.out}")
    if args.text or not args.out:
        print(sa.show_text(pattern, seq_len, heads, causal=causal, ascii=args.ascii))
    return numbers


def _indices(flag: str, values: list[str] | None, count: int, what: str) -> list[int] | None:
    """The indices a repeatable comma-separated flag names, each checked against count."""
    if values is None:
        return None
    picked = []
    for value in values:
        for item in value.split(","):
            try:
                index = int(item)
            except ValueError:
                raise ValueError(f"{flag}: expected integers, got {item!r}") from None
            if not 0 <= index < count:
                raise ValueError(f"{flag}: {index} is out of range (the model has {count} {what})")
            picked.append(index)
    return picked


def read_tokens(tokenizer, path: Path, seq_len: int) -> list[int]:
    """The first seq_len tokens of a text file (fewer for a shorter text): a prefix of the
    text is encoded when it gives enough tokens, so a large file is not encoded whole."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"--text: {path} holds no text")
    prefix = 16 * seq_len + 64
    # The margin leaves the prefix's last tokens, which the cut may change, out.
    ids = tokenizer.encode(text[:prefix]) if len(text) > prefix else []
    if len(ids) < seq_len + 16:
        ids = tokenizer.encode(text)
    return ids[:seq_len]


def run_checkpoint(args: argparse.Namespace) -> dict:
    """--checkpoint: a trained model's block attention mass on --text, drawn to --out."""
    from sparse_attention import block_mass_view
    from sparse_attention.optional import require
    from sparse_attention.training import runtime
    from sparse_attention.training.trained_model import load_trained

    if args.name is not None:
        raise ValueError(f"NAME: not with --checkpoint (got {args.name!r}; the run's model "
                         f"has its own patterns)")
    for name, unset in PATTERN_FLAGS.items():
        if getattr(args, name) != unset:
            raise ValueError(f"{_flag(name)}: not with --checkpoint (the run's model sets it)")
    if not isinstance(args.text, str):
        raise ValueError("--text: expected the text FILE the model reads, with --checkpoint")
    if not args.out:
        raise ValueError("--out: expected the image file to write (e.g. mass.png), with --checkpoint")
    require("matplotlib", extra="plot", purpose="sparse-attention show --checkpoint")
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint: no run or checkpoint folder at {args.checkpoint}")
    text = Path(args.text)
    if not text.is_file():
        raise FileNotFoundError(f"--text: no file at {text}")

    device = runtime.pick_device(args.device or "auto")
    trained = load_trained(args.checkpoint, device)
    model = trained.model
    max_len = model.config.max_seq_len
    seq_len = max_len if args.seq_len is None else args.seq_len
    if not 1 <= seq_len <= max_len:
        raise ValueError(f"--seq-len: expected 1 to the model's max_seq_len {max_len}, got {seq_len}")
    layers = block_mass_view.attention_layers(model)
    picked_layers = _indices("--layer", args.layer, len(layers), "layers")
    picked_heads = _indices("--head", args.head, layers[0].num_heads, "heads")
    ids = read_tokens(trained.tokenizer, text, seq_len)
    if not ids:
        raise ValueError(f"--text: {text} encodes to no tokens")
    masses = block_mass_view.layer_masses(model, torch.tensor([ids], device=device))
    kind = "language model" if trained.config.task == "lm" else "classifier"
    title = (f"{Path(args.checkpoint).resolve().name} (step {trained.step}, "
             f"{kind}) on {text.name}: {len(ids)} tokens, blocks of {masses[0].block_size}")
    block_mass_view.draw(masses, args.out, layers=picked_layers, heads=picked_heads, title=title,
                         log=args.log)
    lines = block_mass_view.summary_lines(masses)
    print(f"{trained.folder} (step {trained.step}, {kind}): {len(ids)} tokens of {text}, "
          f"{len(layers)} layers x {layers[0].num_heads} heads")
    print("per layer, mean over heads and query blocks after the first: share of the diagonal "
          "block, of the first block, entropy of the shares")
    for line in lines:
        print("  " + line)
    print(f"wrote {args.out}")
    return {"masses": masses, "summary": lines, "tokens": len(ids), "out": args.out}
