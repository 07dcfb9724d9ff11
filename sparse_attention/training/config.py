"""The settings of a training run: defaults, a YAML or JSON file, then flags (flags win).

The resolved settings are saved as config.yaml in the run folder and in every checkpoint, so
a run can be resumed, evaluated and reproduced from its folder alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

import torch

import sparse_attention as sa
from sparse_attention.models.config import ALTERNATING, POSITIONS
from sparse_attention.nn.dispatch import SDPA_MAX_LEN, check_dropout
from sparse_attention.optional import require
from sparse_attention.patterns.arguments import check_bool, check_int
from sparse_attention.training.data.prepare import PACKINGS, TASKS
from sparse_attention.patterns import PATTERN_NAMES
from sparse_attention.support import block_sizes

CONFIG_FILE = "config.yaml"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")
COMPARISONS = ("none", "dense")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of `sparse-attention train`, with its default (see `--help`)."""

    # The run
    out: str = "runs/latest"
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    compare: str = "none"  # "dense": train the same model with dense attention afterwards
    # Data
    task: str = "lm"  # "lm" (language modelling) or "classify"
    data: str | None = None  # None: the Python standard library's source files
    glob: str = "**/*"
    text_field: str = "text"
    label_field: str = "label"
    max_data_bytes: int | None = None
    tokenizer: str = "bytes"  # "bytes", "bpe" (trained on the training data) or a folder
    vocab_size: int = 4096  # of a trained BPE
    validation_fraction: float = 0.05
    packing: str = "none"  # "documents": every document attended alone (see data.prepare)
    # The model
    seq_len: int = 1024
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int | None = None
    block_size: int = 64
    pattern: str = "fixed"
    pattern_params: dict = dataclasses.field(default_factory=dict)
    positions: str = "learned"
    dropout: float = 0.0
    sdpa_max_len: int = SDPA_MAX_LEN
    pooling: str = "mean"  # classify
    # Optimisation
    steps: int = 1000
    batch_size: int = 8  # sequences per process and micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # length of the cosine decay; None: steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 on a GPU that has it (else fp16); on the CPU bf16 where
    # the CPU computes it natively, else fp32
    gradient_checkpointing: bool = False
    compile: bool = False
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    context_parallel: int = 1  # under torchrun: ranks per sequence (each holds a shard of it)
    # Evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    save_every_minutes: float = 5.0  # also checkpoint after this much wall time; 0: never
    keep_checkpoints: int = 3
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        try:
            self.check()
        except TypeError as error:  # a value of the wrong kind is a bad setting like any other
            raise ValueError(str(error)) from None

    def check(self) -> None:
        """Raises ValueError (TypeError for a value of the wrong kind) naming the first setting
        that is out of range."""
        _one_of("task", self.task, TASKS)
        _one_of("packing", self.packing, PACKINGS)
        _one_of("device", self.device, DEVICES)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("distributed", self.distributed, STRATEGIES)
        _one_of("positions", self.positions, POSITIONS)
        _one_of("compare", self.compare, COMPARISONS)
        _one_of("pattern", self.pattern, PATTERN_NAMES + (ALTERNATING,))
        for name in ("seq_len", "d_model", "num_layers", "num_heads", "block_size", "steps",
                     "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "keep_checkpoints", "vocab_size", "context_parallel"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("seed", "warmup_steps", "sdpa_max_len"):
            check_int(name, getattr(self, name), minimum=0)
        for name in ("max_data_bytes", "lr_decay_steps", "d_ff"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        for name in ("lr", "grad_clip"):
            _number(name, getattr(self, name), low=0, low_open=True)
        for name in ("min_lr_ratio", "beta1", "beta2", "weight_decay"):
            _number(name, getattr(self, name), low=0, high=1)
        _number("validation_fraction", self.validation_fraction, low=0, high=0.5, low_open=True)
        _number("save_every_minutes", self.save_every_minutes, low=0)
        self._check_block_size()
        check_dropout("dropout", self.dropout)
        for name in ("gradient_checkpointing", "compile", "tensorboard", "progress"):
            check_bool(name, getattr(self, name))
        if self.packing == "documents" and self.context_parallel > 1:
            raise ValueError("packing: 'documents' does not combine with context_parallel > 1 "
                             "(shards hold pieces of documents); use packing 'none'")
        if not isinstance(self.pattern_params, dict):
            raise ValueError(f"pattern_params: expected a mapping, got {self.pattern_params!r}")

    def _check_block_size(self) -> None:
        """block_size among the kernels' sizes: of the device when it is named, else of any."""
        if self.device == "auto" or self.pattern == "dense":  # dense attention runs on SDPA
            sizes = tuple(sorted(set(block_sizes("cpu")) | set(block_sizes("cuda"))))
        else:
            sizes = block_sizes(self.device)
        if self.block_size not in sizes:
            where = {"cpu": " on the CPU", "cuda": " on CUDA"}.get(self.device, "")
            raise ValueError(f"block_size: the kernels{where} take {_or_list(sizes)}, got {self.block_size!r}"
                             + ("" if where else f" ({block_sizes_help()})"))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def schedule_steps(self) -> int:
        return self.steps if self.lr_decay_steps is None else self.lr_decay_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        yaml = require("yaml", purpose="config files")
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Settings that decide the model, the tokens or the order of the data: a resumed run must
# keep them (everything else, e.g. steps or eval_every, may change).
FIXED_ON_RESUME = ("seed", "task", "data", "glob", "text_field", "label_field", "max_data_bytes",
                   "tokenizer", "vocab_size", "validation_fraction", "seq_len", "d_model",
                   "num_layers", "num_heads", "d_ff", "block_size", "pattern", "pattern_params",
                   "positions", "batch_size", "grad_accum", "context_parallel", "packing")
FIELD_NAMES = tuple(field.name for field in dataclasses.fields(TrainConfig))


def read_config_file(path: str | Path) -> dict:
    """The settings in a YAML or JSON file (a mapping of TrainConfig field names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file: {path}")
    text = path.read_text()
    yaml = require("yaml", purpose="config files")
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"config: {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config: {path} must hold a mapping of settings, got {type(values).__name__}")
    check_known(values, f"config: {path}")
    return values


def check_known(values: dict, where: str) -> None:
    for name in values:
        if name not in FIELD_NAMES:
            close = difflib.get_close_matches(str(name), FIELD_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown setting {name!r}{hint}")


def resolve(*layers: dict) -> TrainConfig:
    """TrainConfig from layers of settings, later layers winning (defaults are the base)."""
    values: dict = {}
    for layer in layers:
        check_known(layer, "config")
        values.update(layer)
    try:
        return TrainConfig(**values)
    except TypeError as error:  # a value of the wrong kind (e.g. a list for an int)
        raise ValueError(f"config: {error}") from None


def check_resumable(saved: TrainConfig, wanted: TrainConfig) -> None:
    """Raises ValueError when wanted changes a setting that a resumed run must keep."""
    changed = [name for name in FIXED_ON_RESUME if getattr(saved, name) != getattr(wanted, name)]
    if changed:
        details = ", ".join(f"{name}: {getattr(saved, name)!r} -> {getattr(wanted, name)!r}" for name in changed)
        raise ValueError(f"--resume: the run in {saved.out} was made with other settings ({details}); "
                         "resume with the run's own settings or start a new --out")


ATTENTION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTING_OF_REASON = {"block_size": "--block-size", "head_dim": "--d-model / --num-heads",
                     "dtype": "--precision", "cuda": "--device", "device": "--device", "GPU": "--device"}


def check_supported(config: TrainConfig, device_type: str, precision: str) -> None:
    """Raises ValueError, naming the settings, when the sparse kernels of device_type cannot
    run config's model in precision (fp32, bf16 or fp16), as sa.supported() says."""
    if config.pattern == "dense" or config.seq_len <= config.sdpa_max_len:
        return  # attention runs on SDPA only
    reasons = sa.supported(device_type, ATTENTION_DTYPES[precision], config.head_dim, config.block_size)
    if reasons:
        named = [f"{reason} (set by {SETTING_OF_REASON.get(reason.split()[0].rstrip(':'), 'the settings')})"
                 for reason in reasons]
        raise ValueError(f"the {device_type.upper() if device_type == 'cuda' else device_type} kernels cannot run "
                         f"this model (block_size {config.block_size}, head_dim {config.head_dim} = "
                         f"d_model {config.d_model} / num_heads {config.num_heads}, precision {precision}): "
                         + "; ".join(named))


def block_sizes_help() -> str:
    """The block sizes of each device's kernels, for --help and errors."""
    return f"{_or_list(block_sizes('cpu'))} on the CPU; {_or_list(block_sizes('cuda'))} on CUDA"


def _or_list(values) -> str:
    values = [str(value) for value in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def _one_of(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def _number(name: str, value, *, low: float, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        bounds = f"in {left}{low}, {high}{right}" if high is not None else f"{'>' if low_open else '>='} {low}"
        raise ValueError(f"{name}: expected a number {bounds}, got {value!r}")
