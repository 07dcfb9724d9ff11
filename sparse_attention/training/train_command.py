"""`sparse-attention train`: train a Sparse Transformer on text, with checkpoints and a report.

Settings come from the defaults, then a YAML or JSON file (--config), then flags: flags win.
The resolved settings are saved as OUT/config.yaml. Without --data, the model reads the Python
standard library's own source files. Under `torchrun --nproc_per_node=K` the same command
trains with DistributedDataParallel (or --distributed fsdp).

  sparse-attention train --data notes/ --glob '*.md' --out runs/notes --steps 2000
  sparse-attention train --out runs/notes --resume --steps 4000     # continue a run
  sparse-attention train --task classify --data reviews.jsonl --pattern bigbird --seq-len 4096

The run folder holds config.yaml, metrics.jsonl (+ train.csv, eval.csv), checkpoints/
(the last --keep-checkpoints, written atomically), and report/ (report.md and plots).
Ctrl-C, SIGTERM and SIGHUP finish the current step, save a checkpoint and stop (a second one
stops at once); a checkpoint is also saved every --save-every-minutes of wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

from sparse_attention.models.config import ALTERNATING, POOLINGS, POSITIONS
from sparse_attention.patterns import PATTERN_NAMES
from sparse_attention.training.config import (
    COMPARISONS, CONFIG_FILE, DEVICES, PACKINGS, PRECISIONS, STRATEGIES, TASKS, TrainConfig,
    block_sizes_help, check_resumable, read_config_file, resolve,
)
from sparse_attention.training.session import run_session

HELP = {
    "out": "run folder: config, metrics, checkpoints, report",
    "seed": "seed of the weights, the data split and order, and random layouts",
    "device": "where to train (auto: cuda when available)",
    "compare": "then train the same model with dense attention (same data, steps, seed) and compare",
    "task": "lm: language modelling; classify: one label per document",
    "data": "a text file, a folder, a JSON Lines file or a saved Hugging Face dataset "
            "(default: the Python standard library's source files)",
    "glob": "files to read in a --data folder",
    "text_field": "JSON field holding the text",
    "label_field": "JSON field holding the label (classify)",
    "max_data_bytes": "read at most about this many bytes of text",
    "tokenizer": "bytes, bpe (trained on the training data and saved with the run) or a tokenizer folder",
    "vocab_size": "vocabulary of a trained BPE",
    "validation_fraction": "share of the documents held out for evaluation",
    "packing": "documents: every document attended alone (lm: none across a separator; classify: "
               "a batch's documents in one row, no padding); none: lm windows attend across "
               "separators, classify pads a row per document",
    "seq_len": "context length in tokens",
    "d_model": "model width",
    "num_layers": "transformer blocks",
    "num_heads": "attention heads",
    "d_ff": "feed-forward width (default 4 * d-model)",
    "block_size": f"attention block size: {block_sizes_help()}",
    "pattern": "attention pattern (see `sparse-attention show`)",
    "pattern_params": "the pattern's keyword arguments as JSON, e.g. '{\"window\": 512}'",
    "positions": "position encoding",
    "dropout": "dropout of embeddings and residual branches",
    "sdpa_max_len": "run attention over at most this many keys with SDPA and the pattern's mask "
                    "(faster for short sequences)",
    "pooling": "classifier pooling: mean or first",
    "steps": "optimizer steps in all (a resumed run goes on to this count)",
    "batch_size": "sequences per process and micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "warmup_steps": "steps of linear warm-up",
    "lr_decay_steps": "length of the cosine decay (default: --steps); set it to resume into a longer run exactly",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this",
    "precision": "autocast precision (auto: bf16, else fp16, on a GPU; on the CPU bf16 where the CPU "
                 "computes it natively, else fp32); fp16 uses a GradScaler",
    "gradient_checkpointing": "recompute activations in backward to save memory",
    "compile": "torch.compile the model",
    "distributed": "under torchrun: DistributedDataParallel or FSDP",
    "context_parallel": "under torchrun: shard each sequence over this many ranks (context "
                        "parallelism; the processes must be a multiple of it, DDP over the groups)",
    "eval_every": "evaluate every this many steps (and at the end)",
    "eval_batches": "validation batches per evaluation",
    "save_every": "checkpoint every this many steps (and at the end, and on Ctrl-C, SIGTERM or SIGHUP)",
    "save_every_minutes": "also checkpoint when this many minutes of wall time passed since the last "
                          "checkpoint (0: never)",
    "keep_checkpoints": "keep this many latest checkpoints",
    "tensorboard": "also log to TensorBoard when it is installed",
    "progress": "show a progress bar",
}
CHOICES = {"device": DEVICES, "task": TASKS, "precision": PRECISIONS, "distributed": STRATEGIES,
           "compare": COMPARISONS, "pattern": PATTERN_NAMES + (ALTERNATING,), "positions": POSITIONS,
           "pooling": POOLINGS, "packing": PACKINGS}


def add_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """A flag per setting (--seq-len for seq_len); `defaults` overrides the shown defaults."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (flags win)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint, exactly")
    shown = {**{f.name: _default(f) for f in dataclasses.fields(TrainConfig)}, **(defaults or {})}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{HELP[field.name]} (default: {shown[field.name]})"
        kind = _base_type(hints[field.name])
        # SUPPRESS: only flags given on the command line reach the settings, so that they
        # win over --config without the defaults hiding the file's values.
        common = dict(dest=field.name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind is dict:
            parser.add_argument(flag, type=_json_mapping(flag), metavar="JSON", **common)
        else:
            parser.add_argument(flag, type=kind, choices=CHOICES.get(field.name), **common)


def run(args: argparse.Namespace, defaults: dict | None = None):
    """Trains (and compares) as the flags, --config and `defaults` say; returns the results."""
    return run_session(settings_from(args, defaults), resume=args.resume)


def settings_from(args: argparse.Namespace, defaults: dict | None = None) -> TrainConfig:
    given = {name: value for name, value in vars(args).items() if name in TrainConfig.__dataclass_fields__}
    from_file = read_config_file(args.config) if args.config else {}
    layers = [defaults or {}, from_file, given]
    if not args.resume:
        return resolve(*layers)
    out = Path(resolve(*layers).out)
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file():
        raise FileNotFoundError(f"--resume: {out} holds no run ({CONFIG_FILE} is missing); "
                                "start it without --resume")
    saved = resolve(read_config_file(saved_file))
    # The run's own settings are the base; the file and flags may change what a resumed run
    # may change (steps, evaluation, logging), and nothing else.
    wanted = resolve(saved.to_dict(), from_file, given)
    check_resumable(saved, wanted)
    return wanted


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _base_type(hint) -> type:
    """int for `int | None`, and so on."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return typing.get_origin(hint) or hint


def _json_mapping(flag: str):
    def parse(text: str) -> dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"{flag}: expected a JSON object, got {text!r} ({error})")
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag}: expected a JSON object, got {text!r}")
        return value

    return parse
