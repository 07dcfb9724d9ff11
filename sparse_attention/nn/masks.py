"""Reading the attention masks of torch.nn.MultiheadAttention and DeepSpeed into what the
kernels take: a bool key padding mask (True = ignore) and a causal flag.

Three conventions name the kept positions:
- "bool": True = ignore (torch.nn.MultiheadAttention's bool masks);
- "add": added to the scores, 0 = keep, -inf (or any value <= -1e4) = ignore (torch's float
  masks; DeepSpeed's key_padding_mask_mode / attn_mask_mode 'add');
- "mul": multiplies the scores' visibility, 1 = keep, 0 = ignore (DeepSpeed's 'mul').

Only masks that say "keep" or "ignore" can be run by the kernels; a float mask with other
values (a bias) raises ValueError. An attention mask must be the causal mask; anything else
raises ValueError (use a pattern, e.g. sa.Custom, for other structures). The values are
checked eagerly; under torch.compile pass is_causal=True instead of a causal attn_mask.
"""

from __future__ import annotations

import torch

MODES = ("bool", "add", "mul")
# An additive mask value at or below this hides its key (torch uses -inf, HF finfo.min, BERT -1e4).
IGNORE_AT_OR_BELOW = -1e4


def keep_from_mask(name: str, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Bool tensor of mask's shape, True where the position is kept."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mode not in MODES:
        raise ValueError(f"{name} mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "bool" and mask.dtype == torch.bool:
        return ~mask
    if mode == "bool" and not mask.is_floating_point():
        raise TypeError(f"{name}: expected a bool or float tensor, got {mask.dtype}")
    mask = mask.float()
    if mode == "mul":
        keep, ignore = mask == 1, mask == 0
        what = "1 (keep) or 0 (ignore)"
    else:
        keep, ignore = mask == 0, mask <= IGNORE_AT_OR_BELOW
        what = f"0 (keep) or -inf / <= {IGNORE_AT_OR_BELOW:g} (ignore)"
    if not torch.compiler.is_compiling() and not bool((keep | ignore).all()):
        raise ValueError(
            f"{name}: the sparse kernels take masks that keep or ignore positions: expected "
            f"values {what}; arbitrary additive biases are not supported"
        )
    return keep


def padding_from_mask(name: str, mask: torch.Tensor, mode: str, batch: int, k_len: int) -> torch.Tensor:
    """Bool key padding mask [batch, k_len], True = ignore. Size-1 middle dimensions (DeepSpeed's
    and BERT's [B, 1, 1, Nk]) are squeezed."""
    keep = keep_from_mask(name, mask, mode)
    if keep.dim() > 2 and all(size == 1 for size in keep.shape[1:-1]):
        keep = keep.reshape(keep.shape[0], keep.shape[-1])
    if tuple(keep.shape) != (batch, k_len):
        raise ValueError(f"{name}: expected shape ({batch}, {k_len}), got {tuple(mask.shape)}")
    return ~keep


def check_causal_mask(name: str, mask: torch.Tensor, mode: str, q_len: int, k_len: int) -> None:
    """Raises ValueError unless mask [q_len, k_len] is the causal mask (query i keeps keys
    j <= i + k_len - q_len)."""
    keep = keep_from_mask(name, mask, mode)
    if tuple(keep.shape) != (q_len, k_len):
        raise ValueError(
            f"{name}: expected a [{q_len}, {k_len}] causal mask, got shape {tuple(mask.shape)}"
        )
    if torch.compiler.is_compiling():
        raise ValueError(f"{name}: under torch.compile pass is_causal=True instead of a causal mask")
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=keep.device).tril(k_len - q_len)
    if not torch.equal(keep, causal):
        raise ValueError(
            f"{name}: only the causal mask is supported (query i sees keys j <= i); express other "
            f"structures as a pattern (e.g. sa.Custom) or as a key padding mask"
        )


__all__ = ["IGNORE_AT_OR_BELOW", "MODES", "check_causal_mask", "keep_from_mask", "padding_from_mask"]
