"""AttentionDispatch: the one place that chooses between the sparse kernels and SDPA.

Every module and model block attends through it. For each (Nq, Nk, heads, causal) it builds
the pattern's layout once and picks:

- "sdpa" when the layout covers every block dense attention would compute and SDPA needs no
  mask for it (plain SDPA, causal or not: the same function);
- "sdpa" with the pattern's exact element mask when the keys are few (at most
  `sdpa_max_len`, where dense attention costs no more) or, if `sdpa_min_coverage` is set, when
  the layout covers at least that fraction of the blocks, so both paths compute the same
  function;
- "sparse" otherwise: `sparse_attention` with the pattern (a complete layout too when SDPA
  would need an O(Nq * Nk) mask for it: causal with key padding, or Nq != Nk);
- "sdpa" with the exact element mask, and a one-time warning naming the reason, when the
  kernels cannot run the case on this device (`sa.supported()`: a dtype, head dim or block
  size the device's kernels are not compiled for), instead of failing at the first long call.

Packed documents (cu_seqlens) always run on the kernels, every document attended alone: SDPA
would need a block-diagonal O(N^2) mask for them.

The choice is made outside any compiled graph (it becomes a constant of the graph), logged
once per path at DEBUG level on the "sparse_attention.nn" logger, and readable afterwards as
`last_path`.

Attention dropout applies on both paths: SDPA's own on the SDPA path, the kernels' (Philox
bits drawn from torch's default generator, so torch.manual_seed repeats a run) on the sparse
path. The two draw different bits: only their distribution is the same.
"""

from __future__ import annotations

import logging
import operator
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparse_attention.attention import call_pieces, sparse_attention
from sparse_attention.compile_constants import KnownById, eager_constant
from sparse_attention.documents import attention_over_rows
from sparse_attention.patterns.arguments import check_int
from sparse_attention.bounded_cache import BoundedCache
from sparse_attention.patterns.base import Pattern
from sparse_attention.patterns.local import Dense
from sparse_attention.element_rules import element_mask
from sparse_attention.support import supported
from sparse_attention.window import Window

logger = logging.getLogger("sparse_attention.nn")

# Keys at or below this count run on SDPA by default: measured on CPU (B4 H8 D64, local
# causal pattern, forward + backward) SDPA and the kernels take the same time up to 256 keys,
# and the kernels win from 512 on.
SDPA_MAX_LEN = 256


class Choice(NamedTuple):
    """The path for one call shape. `mask`: bool [1, layout heads, Nq, Nk] element mask for
    SDPA (None: plain SDPA, causal when `is_causal`)."""

    path: str
    reason: str
    mask: torch.Tensor | None
    is_causal: bool


def check_pattern(pattern, num_heads: int | None = None) -> Pattern:
    """A Pattern (or DeepSpeed config) that serves num_heads heads."""
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern: expected a sparse_attention Pattern (e.g. sa.Fixed(...), sa.from_name(...), "
            f"or a DeepSpeed-style sparsity config), got {type(pattern).__name__}"
        )
    if num_heads is not None:
        pattern.check_num_heads(num_heads)
    return pattern


def check_dropout(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {p!r}")
    return float(p)


class AttentionDispatch(KnownById):
    """Runs attention for one module with its pattern, on the sparse kernels or SDPA.

    Args:
        pattern: a Pattern (or DeepSpeed config).
        sdpa_max_len: calls with at most this many keys run on SDPA with the pattern's
            element mask (0: never for length alone).
        sdpa_min_coverage: if set, calls whose layout covers at least this fraction of the
            blocks dense attention computes run on SDPA with the element mask too. The mask
            costs Nq * Nk bytes per layout head (and batch entry with key padding).
        owner: name used in errors and log lines.
    """

    def __init__(self, pattern: Pattern, *, sdpa_max_len: int = SDPA_MAX_LEN,
                 sdpa_min_coverage: float | None = None, owner: str = "attention"):
        self.pattern = check_pattern(pattern)
        self.sdpa_max_len = check_int("sdpa_max_len", sdpa_max_len, minimum=0)
        if sdpa_min_coverage is not None and (
                isinstance(sdpa_min_coverage, bool) or not isinstance(sdpa_min_coverage, (int, float))
                or not 0.0 < sdpa_min_coverage <= 1.0):
            raise ValueError(f"sdpa_min_coverage: expected None or a number in (0, 1], got {sdpa_min_coverage!r}")
        self.sdpa_min_coverage = sdpa_min_coverage
        self.owner = owner
        self._dense = Dense(block_size=pattern.block_size)
        self._choices = BoundedCache()
        self._logged: set[str] = set()
        self.last_path: str | None = None

    def choose(self, q_len: int, k_len: int, num_heads: int, causal: bool, padded: bool = False,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               head_dim: int = 64) -> Choice:
        """The path for these lengths, dtype and head dim (cached): see the module docstring."""
        key = (q_len, k_len, num_heads, causal, padded, str(device), dtype, head_dim)
        choice = self._choices.get(
            key, lambda: self._decide(q_len, k_len, num_heads, causal, padded, torch.device(device),
                                      dtype, head_dim))
        self.last_path = choice.path
        if choice.path not in self._logged:
            self._logged.add(choice.path)
            logger.debug("%s: %s attention for Nq=%d, Nk=%d (%s)", self.owner, choice.path,
                         q_len, k_len, choice.reason)
        return choice

    def _decide(self, q_len, k_len, num_heads, causal, padded, device, dtype, head_dim) -> Choice:
        pattern = self.pattern
        causal = causal or pattern.causal
        layout = pattern.layout(q_len, k_len, num_heads=num_heads, causal=causal)
        full = self._dense.layout(q_len, k_len, causal=causal)
        coverage = layout.nnz / (full.nnz * layout.num_heads)
        complete = coverage == 1.0 and pattern.token_window is None
        if complete and not (causal and (padded or q_len != k_len)):
            # Plain SDPA; causal SDPA aligns top-left, the same as bottom-right when Nq == Nk.
            return Choice("sdpa", "the layout is dense", None, causal)
        unsupported = supported(device.type, dtype, head_dim, pattern.block_size)
        if unsupported:
            reason = "the kernels cannot run this case: " + "; ".join(unsupported)
            if reason not in self._logged:
                self._logged.add(reason)
                warnings.warn(f"{self.owner}: dense SDPA with the pattern's element mask instead "
                              f"of the sparse kernels, because {reason}", stacklevel=2)
        elif k_len <= self.sdpa_max_len:
            reason = f"{k_len} keys <= sdpa_max_len={self.sdpa_max_len}"
        elif self.sdpa_min_coverage is not None and coverage >= self.sdpa_min_coverage:
            reason = f"coverage {coverage:.2f} >= sdpa_min_coverage={self.sdpa_min_coverage}"
        else:
            return Choice("sparse", f"{k_len} keys, coverage {coverage:.2f}", None, False)
        mask = _pattern_element_mask(pattern, q_len, k_len, num_heads, causal, device)
        return Choice("sdpa", reason, mask, False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                 key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                 scale: float | None = None, layout=None, cu_seqlens: torch.Tensor | None = None,
                 cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q [B, H, Nq, D] over k, v [B, Hkv, Nk, D]; key_padding_mask bool
        [B, Nk], True = ignore. dropout_p: attention dropout (pass 0 outside training).
        layout: a layout for this call (a TensorLayout made per input, e.g. by
        sa.select_blocks, or a BlockLayout) instead of the pattern's; it runs on the kernels.
        cu_seqlens (cu_seqlens_k): packed documents, the op's offsets over the B * Nq queries
        (B * Nk keys) taken row after row; each document is attended alone, on the kernels."""
        if cu_seqlens is not None or cu_seqlens_k is not None:
            self.last_path = "sparse"
            return attention_over_rows(q, k, v, self.pattern if layout is None else layout,
                                       cu_seqlens, cu_seqlens_k, causal=causal, scale=scale,
                                       key_padding_mask=key_padding_mask, dropout_p=dropout_p)
        if layout is not None:
            self.last_path = "sparse"
            return sparse_attention(q, k, v, layout, causal=causal, scale=scale,
                                    key_padding_mask=key_padding_mask, dropout_p=dropout_p)
        num_heads, q_len, k_len = (operator.index(n) for n in (q.shape[1], q.shape[2], k.shape[2]))
        choice = _choose(self, q_len, k_len, num_heads, bool(causal), key_padding_mask is not None,
                         q.device, q.dtype, operator.index(q.shape[3]))
        if choice.path == "sparse":
            # seed=None: the kernels' seed comes from torch's default generator.
            return sparse_attention(q, k, v, self.pattern, causal=causal, scale=scale,
                                    key_padding_mask=key_padding_mask, dropout_p=dropout_p)
        return _sdpa(q, k, v, choice, key_padding_mask, dropout_p, scale)


def _pattern_element_mask(pattern: Pattern, q_len: int, k_len: int, num_heads: int, causal: bool,
                          device: torch.device) -> torch.Tensor:
    """Bool [1, layout heads, Nq, Nk]: the keys each query sees through the pattern, exactly as
    sparse_attention computes it (a causal chunk that starts inside a block in two pieces)."""
    window = Window.resolve(None, causal=causal, pattern_window=pattern.token_window)
    pieces = call_pieces(pattern, q_len, k_len, causal)
    masks = []
    for first, end, keys in pieces:
        layout = pattern.layout(end - first, keys, num_heads=num_heads, causal=causal)
        mask = element_mask(layout, end - first, keys, causal=causal, window=window, device=device)
        masks.append(F.pad(mask, (0, k_len - keys)))
    return masks[0] if len(masks) == 1 else torch.cat(masks, dim=-2)


@eager_constant
def _choose(dispatch, q_len, k_len, num_heads, causal, padded, device, dtype, head_dim) -> Choice:
    # Runs eagerly even under torch.compile: the choice and its mask are graph constants.
    return dispatch.choose(q_len, k_len, num_heads, causal, padded, device, dtype, head_dim)


def _sdpa(q, k, v, choice: Choice, key_padding_mask, dropout_p, scale) -> torch.Tensor:
    mask = choice.mask
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        mask = keep if mask is None else mask & keep
    seen = None
    if mask is not None:
        # A query that sees no key gets 0, as from the kernels; letting it see every key
        # first keeps NaN out of SDPA's forward and backward.
        seen = mask.any(dim=-1, keepdim=True)
        mask = mask | ~seen
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=choice.is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out if seen is None else out.masked_fill(~seen, 0.0)


__all__ = ["AttentionDispatch", "Choice", "SDPA_MAX_LEN", "check_dropout", "check_pattern"]
