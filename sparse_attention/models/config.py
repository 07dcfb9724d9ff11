"""Configs of the Sparse Transformer models, as dataclasses saved next to the weights.

A config names its attention pattern (sparse_attention.from_name names, built for max_seq_len
tokens with pattern_params), so it round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sparse_attention.layout import check_block_size
from sparse_attention.nn.dispatch import SDPA_MAX_LEN, check_dropout
from sparse_attention.patterns import PATTERN_NAMES, Dilated, Local, Pattern, from_name, stride_for
from sparse_attention.patterns.arguments import check_bool, check_int

# The paper's strided attention split over layers: the local part (A1) in even layers, the
# strided part (A2) in odd ones; together each token still reaches every earlier one in two.
ALTERNATING = "strided_alternating"
POSITIONS = ("learned", "rotary")
POOLINGS = ("mean", "first")


@dataclasses.dataclass
class SparseTransformerConfig:
    """A decoder-only Sparse Transformer (SparseTransformerLM).

    pattern: a name from sparse_attention.PATTERN_NAMES or "strided_alternating" for every
        layer, or a list of names, one per layer. pattern_params: keyword arguments of the
        pattern(s) (a dict, or a list of dicts with the list of names); defaults follow
        max_seq_len (see sparse_attention.from_name). For "strided_alternating", `stride`.
    """

    vocab_size: int = 256
    max_seq_len: int = 1024
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int | None = None  # default 4 * d_model
    block_size: int = 64
    pattern: str | list[str] = "fixed"
    pattern_params: dict | list[dict] = dataclasses.field(default_factory=dict)
    positions: str = "learned"
    dropout: float = 0.0  # embeddings and residual branches
    attention_dropout: float = 0.0  # on the probabilities, SDPA and sparse paths alike
    bias: bool = True
    tie_embeddings: bool = True
    gradient_checkpointing: bool = False
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    sdpa_max_len: int = SDPA_MAX_LEN
    sdpa_min_coverage: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "d_model", "num_layers", "num_heads"):
            check_int(name, getattr(self, name), minimum=1)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model: expected a multiple of num_heads ({self.num_heads}), got {self.d_model}")
        if self.d_ff is not None:
            check_int("d_ff", self.d_ff, minimum=1)
        check_block_size(self.block_size)
        if self.positions not in POSITIONS:
            raise ValueError(f"positions: expected one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"positions: rotary needs an even head dim, got {self.head_dim}")
        check_dropout("dropout", self.dropout)
        check_dropout("attention_dropout", self.attention_dropout)
        for name in ("bias", "tie_embeddings", "gradient_checkpointing"):
            check_bool(name, getattr(self, name))
        check_int("sdpa_max_len", self.sdpa_max_len, minimum=0)
        self.layer_patterns()  # reports a bad pattern now, not at the first forward

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def ff_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def layer_patterns(self) -> list[Pattern]:
        """One Pattern per layer (the same object where layers share a name and params)."""
        names = self.pattern if isinstance(self.pattern, (list, tuple)) else [self.pattern] * self.num_layers
        if len(names) != self.num_layers:
            raise ValueError(f"pattern: expected one name per layer ({self.num_layers}), got {len(names)}")
        params = self.pattern_params
        if isinstance(params, (list, tuple)):
            if len(params) != len(names):
                raise ValueError(f"pattern_params: expected one dict per layer ({len(names)}), got {len(params)}")
        elif isinstance(params, dict):
            params = [params] * len(names)
        else:
            raise TypeError(f"pattern_params: expected a dict or a list of dicts, got {type(params).__name__}")
        built: dict[str, Pattern | list[Pattern]] = {}
        patterns = []
        for layer, (name, kwargs) in enumerate(zip(names, params)):
            key = json.dumps([name, kwargs], sort_keys=True, default=str)
            if key not in built:
                built[key] = self._build(name, dict(kwargs))
            shared = built[key]
            patterns.append(shared[layer % 2] if isinstance(shared, list) else shared)
        return patterns

    def _build(self, name: str, params: dict) -> Pattern | list[Pattern]:
        if name == ALTERNATING:
            stride = params.pop("stride", stride_for(self.max_seq_len, self.block_size))
            if params:
                raise TypeError(f"pattern_params: {ALTERNATING} takes only stride, got {sorted(params)}")
            return [Local(stride, block_size=self.block_size),
                    Dilated(stride, block_size=self.block_size)]
        if name not in PATTERN_NAMES:
            raise ValueError(
                f"pattern: expected one of {', '.join(PATTERN_NAMES + (ALTERNATING,))}, got {name!r}"
            )
        pattern = from_name(name, seq_len=self.max_seq_len, block_size=self.block_size,
                            num_heads=self.num_heads, **params)
        pattern.check_num_heads(self.num_heads)
        return pattern

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown fields for {cls.__name__}: {', '.join(unknown)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclasses.dataclass
class SparseClassifierConfig(SparseTransformerConfig):
    """An encoder for classifying long sequences (SparseTransformerClassifier).

    causal: whether tokens see only earlier ones (default False: bidirectional).
    pooling: "mean" over the tokens that are not padding, or "first" (a leading [CLS]-like token).
    """

    num_classes: int = 2
    pooling: str = "mean"
    causal: bool = False
    tie_embeddings: bool = False
    pattern: str | list[str] = "bigbird"

    def __post_init__(self):
        super().__post_init__()
        check_int("num_classes", self.num_classes, minimum=1)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        check_bool("causal", self.causal)
        if self.tie_embeddings:
            raise ValueError("tie_embeddings: a classifier's output layer is not the embedding; set False")
