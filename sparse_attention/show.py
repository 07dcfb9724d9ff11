"""Pictures of a pattern's block layout: a matplotlib figure (or image file), or text.

matplotlib is optional (`pip install sparse_attention[plot]`) and imported only by `show`.
"""

from __future__ import annotations

import math
import os
import textwrap

import torch

from sparse_attention.layout import BlockLayout
from sparse_attention.patterns.arguments import check_int
from sparse_attention.patterns.base import Pattern

# Text shades by the fraction of blocks set in a character cell.
SHADES = " ░▒▓█"
ASCII_SHADES = " .:+#"


def resolve(pattern, seq_len: int, heads: int | None = None, causal: bool = False) -> BlockLayout:
    """The BlockLayout a pattern (or BlockLayout) gives for seq_len tokens of self-attention.
    heads defaults to the pattern's own head count (DeepSpeed configs), else 1."""
    check_int("seq_len", seq_len, minimum=1)
    if isinstance(pattern, BlockLayout):
        pattern.check_fits(seq_len, seq_len, pattern.num_heads)
        return pattern
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern: expected a Pattern or a BlockLayout, got {type(pattern).__name__}")
    if heads is None:
        heads = getattr(pattern, "num_heads", 1)
    return pattern.layout(seq_len, num_heads=heads, causal=causal or pattern.causal)


def _panels(layout: BlockLayout, max_panels: int) -> list[tuple[str, torch.Tensor]]:
    """(title, [qb, kb] mask) per distinct head layout, at most max_panels; heads that share a
    layout share a panel."""
    if layout.num_heads == 1:
        return [("all heads", layout.mask[0])]
    groups: list[tuple[torch.Tensor, list[int]]] = []
    for h, mask in enumerate(layout.mask):
        for seen, heads in groups:
            if torch.equal(seen, mask):
                heads.append(h)
                break
        else:
            groups.append((mask, [h]))
    if len(groups) == 1:
        return [("all heads", groups[0][0])]
    return [(("head " if len(heads) == 1 else "heads ") + ", ".join(map(str, heads)), mask)
            for mask, heads in groups[:max_panels]]


def show(pattern, seq_len: int, heads: int | None = None, out: str | os.PathLike | None = None, *,
         causal: bool = False, max_panels: int = 4, title: str | None = None):
    """Draws the block layout of `pattern` for seq_len tokens, one panel per distinct head
    layout (heads with equal layouts share a panel; at most max_panels panels).

    Args:
        pattern: a Pattern, a DeepSpeed-style sparsity config, or a BlockLayout.
        seq_len: tokens (self-attention: Nq = Nk = seq_len).
        heads: heads to build the layout for (default: the pattern's own, else 1).
        out: an image file to write (format from its suffix, e.g. .png or .svg), or None.
        causal: draw the causal layout (blocks wholly in the future dropped).
        title: the figure title (default: the pattern, length and density).

    Returns the matplotlib Figure (no pyplot state is touched; in a notebook it displays).
    """
    check_int("max_panels", max_panels, minimum=1)
    try:
        from matplotlib.figure import Figure
        from matplotlib.colors import ListedColormap
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError(
            "sparse_attention.show needs matplotlib: pip install sparse_attention[plot]"
        ) from error
    layout = resolve(pattern, seq_len, heads, causal)
    panels = _panels(layout, max_panels)
    fig = Figure(figsize=(3.6 * len(panels), 3.9), layout="constrained")
    colours = ListedColormap(["#f4f4f4", "#1f4e8c"])
    for ax, (name, mask) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.imshow(mask.numpy(), cmap=colours, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        for axis in (ax.xaxis, ax.yaxis):  # block indices: no ticks between blocks
            axis.set_major_locator(MaxNLocator(integer=True))
    if title is None:  # the repr when it fits in two lines, else the class name
        name = repr(pattern)
        if len(name) > 2 * 48 * len(panels):
            name = type(pattern).__name__
        title = f"{name}\nN={seq_len}{', causal' if causal else ''}: {layout.density:.1%} of blocks"
    width = 48 * len(panels)
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=9)
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig


def show_text(pattern, seq_len: int, heads: int | None = None, *, causal: bool = False,
              width: int = 64, max_panels: int = 2, ascii: bool = False) -> str:
    """The block layout as text for a terminal: two characters per cell of f x f blocks (f
    chosen so a panel is at most `width` characters wide), shaded by the fraction of blocks
    set (' ' none, '█' all; with ascii=True ' .:+#')."""
    check_int("width", width, minimum=2)
    check_int("max_panels", max_panels, minimum=1)
    shades = ASCII_SHADES if ascii else SHADES
    layout = resolve(pattern, seq_len, heads, causal)
    lines = []
    for name, mask in _panels(layout, max_panels):
        qb, kb = mask.shape
        f = max(1, math.ceil(kb / (width // 2)))
        padded = torch.zeros(math.ceil(qb / f) * f, math.ceil(kb / f) * f)
        padded[:qb, :kb] = mask.float()
        cells = padded.view(padded.shape[0] // f, f, padded.shape[1] // f, f).mean(dim=(1, 3))
        levels = torch.ceil(cells * (len(shades) - 1)).long()  # any block set: at least ░
        lines.append(f"{name} ({qb} x {kb} blocks of {layout.block_size}; one cell = {f} x {f} blocks)")
        lines += ["|" + "".join(shades[v] * 2 for v in row) + "|" for row in levels.tolist()]
    return "\n".join(lines)
