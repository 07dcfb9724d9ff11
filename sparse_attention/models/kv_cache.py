"""Incremental decoding: KVCache holds the keys and values of the tokens run so far."""

from __future__ import annotations

import torch



class KVCache:
    """Per layer, the keys and values [B, H, N, D] of every token run so far.

    Passed to SparseTransformerLM(new_tokens, cache=cache), the new tokens' queries attend to
    the cached keys and their own, and see exactly the keys they see when the whole sequence
    runs at once (causal layouts take every row from the whole sequence's blocks: see
    sparse_attention.patterns.grid).
    """

    def __init__(self):
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def length(self, layer: int = 0) -> int:
        """Tokens cached for a layer."""
        cached = self._layers.get(layer)
        return 0 if cached is None else cached[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds a layer's new keys and values; returns all of them."""
        cached = self._layers.get(layer)
        if cached is not None:
            k, v = torch.cat((cached[0], k), dim=2), torch.cat((cached[1], v), dim=2)
        self._layers[layer] = (k, v)
        return k, v
