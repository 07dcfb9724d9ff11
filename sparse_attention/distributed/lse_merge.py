"""Merging attention results computed over disjoint sets of keys by their log-sum-exp."""

from __future__ import annotations

import torch


def merge_by_lse(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """The attention output over the union of the keys of each part: out_i [B, H, N, D] with
    lse_i [B, H, N] (-inf, with out 0, where a row saw no key of that part), weighted by
    exp(lse_i - lse). A row that sees no key in any part stays 0, and gets no NaN gradient."""
    lse = torch.stack(lses)
    # The maximum only keeps exp in range: no gradient through it, and 0 for rows without keys.
    top = lse.detach().amax(0)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(lse - top)
    total = weights.sum(0)
    total = torch.where(total == 0, torch.ones_like(total), total)
    merged = sum(w.unsqueeze(-1) * out.to(w.dtype) for w, out in zip(weights / total, outs))
    return merged.to(outs[0].dtype)
