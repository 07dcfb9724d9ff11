"""What a trained Sparse Transformer attends to: the block attention mass of its layers and
heads on one sequence, as numbers, one-line summaries and a picture.

`layer_masses(model, input_ids)` runs the model once, records the q, k, v every attention
layer hands to its AttentionDispatch (after the rotary positions: exactly what the layer
attends with), and computes per layer `sa.block_attention_mass` with the lse of
`sa.sparse_attention(q, k, v, pattern, return_lse=True)`, both with the layer's own pattern and
causality. Each block row is divided by its number of queries, so a row is the mean over the
block's queries of their attention weights per key block: it sums to 1 when they all see a key.

`summary_lines` gives one line per layer (mean share of the diagonal block and of the first
block, entropy against that of a uniform spread over the computed blocks), `draw` a grid of
panels, layers as rows and heads as columns, with the blocks the layout does not compute in
light grey. matplotlib is optional (`pip install sparse_attention[plot]`), imported by `draw`.
This is `sparse-attention show --checkpoint RUN --text FILE --out mass.png`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import nn

from sparse_attention.attention import sparse_attention
from sparse_attention.block_mass import block_attention_mass
from sparse_attention.layout import num_blocks
from sparse_attention.models.layers import Attention
from sparse_attention.patterns.base import Pattern

# Colour of the blocks the layout does not compute.
UNCOMPUTED = "#d4d4d4"


@dataclasses.dataclass
class LayerMass:
    """One attention layer's block mass on one sequence.

    share: float32 [H, q_blocks, k_blocks], the block mass divided by the queries of its row
        block: the mean over the block's queries of the weight they give the key block's keys
        (a row sums to the fraction of its queries that see a key, 1 for every row of a
        causal or unpadded sequence).
    computed: bool [H, q_blocks, k_blocks], the blocks the layer's layout computes.
    """

    layer: int
    pattern: Pattern
    causal: bool
    block_size: int
    share: torch.Tensor
    computed: torch.Tensor

    @property
    def num_heads(self) -> int:
        return self.share.shape[0]


class _Recorder:
    """Stands in for an Attention module's dispatch for one forward: records the call's
    inputs and hands it on unchanged."""

    def __init__(self, dispatch):
        self.dispatch = dispatch
        self.calls = []

    def __call__(self, q, k, v, **kwargs):
        self.calls.append((q, k, v, kwargs))
        return self.dispatch(q, k, v, **kwargs)


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's attention modules (sparse_attention.models), first layer first."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no sparse_attention attention layers")
    return layers


@torch.no_grad()
def layer_masses(model: nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> list[LayerMass]:
    """Runs model(input_ids, **forward_kwargs) once (in eval mode, restored afterwards) on one
    sequence (int [N] or [1, N]) and returns every attention layer's block mass."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected one non-empty sequence [N] or [1, N], got shape "
                         f"{tuple(input_ids.shape)}")
    layers = attention_layers(model)
    recorders = [_Recorder(layer.dispatch) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        for layer, recorder in zip(layers, recorders):
            layer.dispatch = recorder
        model(input_ids, **forward_kwargs)
    finally:
        for layer, recorder in zip(layers, recorders):
            layer.dispatch = recorder.dispatch
        model.train(was_training)
    return [_layer_mass(i, layer.dispatch.pattern, recorder.calls)
            for i, (layer, recorder) in enumerate(zip(layers, recorders))]


def _layer_mass(index: int, pattern: Pattern, calls: list) -> LayerMass:
    if len(calls) != 1:
        raise RuntimeError(f"layer {index}: expected one attention call in the forward, got {len(calls)}")
    q, k, v, kwargs = calls[0]
    if kwargs.get("layout") is not None:
        raise ValueError(f"layer {index}: ran with a per-call layout; block masses are drawn "
                         f"for the layers' own patterns")
    causal = bool(kwargs.get("causal", False)) or pattern.causal
    padding = kwargs.get("key_padding_mask")
    scale = kwargs.get("scale")
    q, k, v = q.float(), k.float(), v.float()
    _, lse = sparse_attention(q, k, v, pattern, causal=causal, scale=scale,
                              key_padding_mask=padding, return_lse=True)
    mass = block_attention_mass(q, k, pattern, lse, causal=causal, scale=scale,
                                key_padding_mask=padding)[0]
    heads, n = q.shape[1], q.shape[2]
    bs = pattern.block_size
    queries = torch.full((num_blocks(n, bs),), float(bs), device=mass.device)
    queries[-1] = n - (queries.numel() - 1) * bs
    computed = pattern.layout(n, k.shape[2], num_heads=heads, causal=causal).mask
    computed = computed.expand(heads, *computed.shape[1:])
    return LayerMass(index, pattern, causal, bs, (mass / queries[:, None]).cpu(), computed.cpu())


def row_statistics(mass: LayerMass) -> dict[str, float]:
    """Means over the heads and the query blocks after the first (the first block row of a
    causal layer sees only itself) whose queries see a key: the share of the diagonal block,
    of the first (sink) block, and the entropy in bits of the row's shares next to that of a
    uniform spread over the row's computed blocks."""
    share, computed = mass.share.double(), mass.computed
    rows = share.shape[1]
    first = 1 if rows > 1 else 0
    share, computed = share[:, first:], computed[:, first:]
    total = share.sum(-1)
    seen = total > 0
    p = share / total.clamp(min=1e-30).unsqueeze(-1)
    diagonal = torch.diagonal(p, offset=first, dim1=-2, dim2=-1) if p.shape[-1] > first else \
        torch.zeros(p.shape[:2], dtype=p.dtype)
    entropy = -(p * torch.log2(torch.where(p > 0, p, 1.0))).sum(-1)
    uniform = torch.log2(computed.sum(-1).clamp(min=1).double())
    count = max(int(seen.sum()), 1)
    return {name: float((value * seen).sum()) / count for name, value in
            (("diagonal", diagonal), ("first", p[..., 0]), ("entropy", entropy),
             ("uniform_entropy", uniform))}


def summary_lines(masses: list[LayerMass]) -> list[str]:
    """One line per layer: its pattern, layout density and row_statistics."""
    lines = []
    for mass in masses:
        stats = row_statistics(mass)
        density = float(mass.computed.float().mean())
        lines.append(f"layer {mass.layer} ({type(mass.pattern).__name__}, {density:.0%} of blocks): "
                     f"diagonal block {stats['diagonal']:.2f}, first block {stats['first']:.2f}, "
                     f"entropy {stats['entropy']:.2f} bits (uniform over its blocks: "
                     f"{stats['uniform_entropy']:.2f})")
    return lines


def draw(masses: list[LayerMass], out: str | os.PathLike | None = None, *,
         layers: list[int] | None = None, heads: list[int] | None = None,
         title: str | None = None, log: bool = False):
    """A figure of panels, layers as rows and heads as columns (all, or those listed), each the
    [q_blocks, k_blocks] shares with uncomputed blocks in light grey, one colorbar; log=True
    colours on a log scale (down to 1e-3). Writes `out` if given; returns the Figure."""
    try:
        from matplotlib import colormaps
        from matplotlib.colors import LogNorm, Normalize
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError("drawing block masses needs matplotlib: pip install sparse_attention[plot]") \
            from error
    layers = list(range(len(masses))) if layers is None else list(layers)
    heads = list(range(masses[0].num_heads)) if heads is None else list(heads)
    if not layers or not heads:
        raise ValueError("layers, heads: expected at least one of each to draw")
    rows, cols = len(layers), len(heads)
    size = 2.3 if rows * cols > 1 else 3.6
    fig = Figure(figsize=(size * cols + 1.2, (size + 0.3) * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = colormaps["viridis"].with_extremes(bad=UNCOMPUTED)
    norm = LogNorm(vmin=1e-3, vmax=1.0, clip=True) if log else Normalize(vmin=0.0, vmax=1.0)
    image = None
    for r, layer in enumerate(layers):
        mass = masses[layer]
        for c, head in enumerate(heads):
            ax = axes[r][c]
            share = mass.share[head].clamp(min=1e-3) if log else mass.share[head]
            share = share.masked_fill(~mass.computed[head], math.nan)
            image = ax.imshow(share.numpy(), cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            ax.tick_params(labelsize=7)
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(MaxNLocator(integer=True))
            if r == rows - 1:
                ax.set_xlabel("key block", fontsize=8)
            if c == 0:
                ax.set_ylabel("query block", fontsize=8)
    bar = fig.colorbar(image, ax=axes, shrink=min(1.0, 0.6 + 0.2 * rows), pad=0.02)
    bar.set_label("share of the query block's attention" + (" (log)" if log else ""), fontsize=8)
    bar.ax.tick_params(labelsize=7)
    suffix = "grey: blocks the layout does not compute"
    fig.suptitle(f"{title}\n{suffix}" if title else suffix, fontsize=9)
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig
