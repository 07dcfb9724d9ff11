"""What models put inside attention besides the scaled dot product: the op's score terms.

    score = softcap * tanh(scale * q.k / softcap)      softcap (Gemma 2)
            - slope[b, h] * |d|                        alibi_slopes (BLOOM, MPT)
            + table[h, bucket(d)]                      position_bias (T5)
    with d = key - query - (Nk - Nq), the distance from the bottom-right aligned diagonal;
    then the element rules, then softmax with a per-head sink logit in every row's
    denominator (gpt-oss, StreamingLLM; lse includes it), then dropout of the probabilities.

This module checks the Python arguments, builds what the kernels take (the bucket of every
distance, the seed) and computes the Philox bits of dropout in torch for the reference
(csrc/philox.h is the kernels' copy). All terms combine with every layout and element rule.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sparse_attention.kernel_table import SCORE_TERMS as SCORE_TERM_NAMES


@dataclasses.dataclass(frozen=True)
class PositionBias:
    """A T5-style bucketed relative position bias: a learnable `table` [heads, num_buckets],
    looked up by the bucket of each key - query distance (T5's rule: exact buckets for small
    distances, logarithmic ones up to `max_distance`, the last bucket beyond; with
    `bidirectional`, half of the buckets for keys after the query)."""

    table: torch.Tensor
    bidirectional: bool = True
    max_distance: int = 128

    def __post_init__(self):
        if not isinstance(self.table, torch.Tensor) or not self.table.is_floating_point() or self.table.dim() != 2:
            raise TypeError("position_bias: expected a floating tensor [heads, num_buckets]")
        if self.table.shape[1] < 2:
            raise ValueError(f"position_bias: expected at least 2 buckets, got table shape {tuple(self.table.shape)}")
        if isinstance(self.max_distance, bool) or not isinstance(self.max_distance, int) or self.max_distance < 1:
            raise ValueError(f"position_bias: max_distance must be an int >= 1, got {self.max_distance!r}")

    @property
    def num_buckets(self) -> int:
        return self.table.shape[1]


def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query), as transformers' T5Attention
    computes it."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(relative_position.dtype) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(relative_position.dtype)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, large)


def distance_buckets(bias: PositionBias, q_len: int, k_len: int) -> torch.Tensor:
    """int32 [q_len + k_len - 1]: the bucket of every distance d = key - query - (k_len - q_len)
    from -(k_len - 1) to q_len - 1 (the kernels' position_buckets)."""
    d = torch.arange(-(k_len - 1), q_len, dtype=torch.long)
    return relative_position_bucket(d, bidirectional=bias.bidirectional, num_buckets=bias.num_buckets,
                                    max_distance=bias.max_distance).to(torch.int32)


@dataclasses.dataclass(frozen=True)
class Terms:
    """A call's score terms, checked: tensors or None, softcap 0 for none, the dropout seed."""

    sinks: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    position_bias: PositionBias | None = None
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed: int = 0

    def names(self) -> tuple[str, ...]:
        """The terms given, by SCORE_TERM_NAMES."""
        given = (self.sinks is not None, self.alibi_slopes is not None, self.softcap > 0,
                 self.position_bias is not None, self.dropout_p > 0)
        return tuple(name for name, on in zip(SCORE_TERM_NAMES, given) if on)

    def op_args(self, q_len: int, k_len: int, device: torch.device) -> dict:
        """The kernels' arguments for a call of these lengths."""
        bias = self.position_bias
        return dict(sinks=self.sinks, alibi_slopes=self.alibi_slopes,
                    position_bias=None if bias is None else bias.table,
                    position_buckets=None if bias is None else distance_buckets(bias, q_len, k_len).to(device),
                    softcap=self.softcap, dropout_p=self.dropout_p, seed=self.seed)


NO_TERMS = Terms()


def _check_vector(name: str, t, shapes: tuple[tuple[int, ...], ...], text: str, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor {text}, got {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name}: expected shape {text}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {t.device}")
    return t


def _seed(seed, dropout_p: float) -> int:
    """The kernels' int64 seed: from an int, a torch.Generator, or torch's default generator
    when None (so torch.manual_seed makes training runs repeatable)."""
    if dropout_p == 0:
        return 0
    if seed is None or isinstance(seed, torch.Generator):  # in range: no checks to trace
        return torch.randint(0, 2**62, (), generator=seed).item()
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise TypeError(f"seed: expected an int in [-2^63, 2^64), a torch.Generator or None, got {seed!r}")
    return seed - 2**64 if seed >= 2**63 else seed


def resolve(q: torch.Tensor, *, sinks=None, alibi_slopes=None, softcap=None, position_bias=None,
            dropout_p: float = 0.0, seed=None, causal: bool = False) -> Terms:
    """The checked Terms of a call on q [B, H, Nq, D]; a plain table as position_bias takes
    T5's rule with bidirectional = not causal and max_distance 128."""
    batch, heads = q.shape[0], q.shape[1]
    if sinks is not None:
        _check_vector("sinks", sinks, ((heads,),), f"[heads] = [{heads}]", q.device)
    if alibi_slopes is not None:
        _check_vector("alibi_slopes", alibi_slopes, ((heads,), (batch, heads)),
                      f"[heads] = [{heads}] or [batch, heads] = [{batch}, {heads}]", q.device)
    if softcap is None:
        softcap = 0.0
    elif isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected a finite number > 0 or None, got {softcap!r}")
    if position_bias is not None:
        if isinstance(position_bias, torch.Tensor):
            position_bias = PositionBias(position_bias, bidirectional=not causal)
        if not isinstance(position_bias, PositionBias):
            raise TypeError("position_bias: expected a table [heads, num_buckets] or an "
                            f"sa.PositionBias, got {type(position_bias).__name__}")
        _check_vector("position_bias", position_bias.table, ((heads, position_bias.num_buckets),),
                      f"[heads, num_buckets] = [{heads}, num_buckets]", q.device)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    return Terms(sinks, alibi_slopes, position_bias, float(softcap), float(dropout_p), _seed(seed, dropout_p))


# --- Philox4x32-10 in torch (csrc/philox.h), for the reference's dropout mask.

_MASK32 = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_KEY_STEP = (0x9E3779B9, 0xBB67AE85)


def philox(c0, c1, c2, c3, seed: int) -> tuple[torch.Tensor, ...]:
    """The four words of Philox4x32-10 at counters (c0, c1, c2, c3) (int64 tensors holding
    uint32 values) under the 64-bit seed's two words."""
    seed &= 2**64 - 1
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(10):
        p0, p1 = c0 * _MUL[0], c2 * _MUL[1]  # < 2^64: the high word survives int64 wrap-around
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_STEP[0]) & _MASK32, (k1 + _KEY_STEP[1]) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """16-bit values below this are dropped: p rounded to a multiple of 2^-16."""
    t = p * 65536.0 + 0.5
    return 65535 if t >= 65535.0 else int(t)


def dropout_keep(seed: int, p: float, batch: int, heads: int, q_rows: torch.Tensor,
                 k_rows: torch.Tensor) -> torch.Tensor:
    """bool [batch, heads, len(q_rows), len(k_rows)]: which probabilities dropout keeps, for
    query rows q_rows of q and key rows k_rows of k (the tensors' rows: packed documents count
    from the row's start). Element (query i, key j) takes 16 bits: with o = i % 64, half
    (o // 8) % 2 of word o // 16 of Philox at counter (8 (i // 64) + i % 8, j, head, batch)."""
    b = torch.arange(batch, dtype=torch.long).view(-1, 1, 1, 1)
    h = torch.arange(heads, dtype=torch.long).view(1, -1, 1, 1)
    i = q_rows.to(torch.long).view(1, 1, -1, 1)
    j = k_rows.to(torch.long).view(1, 1, 1, -1)
    return dropout_keep_at(seed, p, b, h, i, j)


def dropout_keep_at(seed: int, p: float, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor,
                    j: torch.Tensor) -> torch.Tensor:
    """dropout_keep's bits at broadcastable index tensors (batch entry, head, query row, key
    row), of their broadcast shape and device."""
    seed &= 2**64 - 1
    b, h, i, j = torch.broadcast_tensors(*(x.to(torch.long) for x in (b, h, i, j)))
    o = i % 64
    words = philox(8 * (i // 64) + i % 8, j, h, b, seed)
    word = torch.stack(words, dim=-1).gather(-1, (o // 16).unsqueeze(-1)).squeeze(-1)
    bits = (word >> (16 * ((o // 8) % 2))) & 0xFFFF
    return bits >= dropout_threshold(p)
