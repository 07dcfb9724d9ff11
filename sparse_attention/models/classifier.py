"""SparseTransformerClassifier: a Sparse Transformer encoder that classifies long sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_attention.models.config import SparseClassifierConfig
from sparse_attention.models.documents import pool_documents
from sparse_attention.models.output import ModelOutput
from sparse_attention.models.pretrained import PretrainedMixin
from sparse_attention.models.trunk import SparseTransformer
from sparse_attention.nn.masks import padding_from_mask


class SparseTransformerClassifier(PretrainedMixin, nn.Module):
    """Encoder (bidirectional unless config.causal) + pooling + linear head.

    forward(input_ids, key_padding_mask=None, attention_mask=None, labels=None) ->
    ModelOutput(logits [B, num_classes], loss):
    - key_padding_mask: bool [B, N], True = padding (torch's convention), or
    - attention_mask: [B, N], 1 = token, 0 = padding (Hugging Face's convention);
    padding is hidden from attention and left out of mean pooling. labels: int [B].
    cu_seqlens: packed documents instead of padding (offsets over the B * N tokens taken row
    after row), each attended alone and classified: logits [documents, num_classes], labels
    [documents].
    """

    config_class = SparseClassifierConfig

    def __init__(self, config: SparseClassifierConfig):
        super().__init__()
        self.config = self.check_config(config)
        self.transformer = SparseTransformer(config, causal=config.causal)
        self.head = nn.Linear(config.d_model, config.num_classes)
        nn.init.normal_(self.head.weight, std=config.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, layout=None,
                cu_seqlens: torch.Tensor | None = None) -> ModelOutput:
        self.transformer.check_input_ids(input_ids, any_length=cu_seqlens is not None)
        batch, n = input_ids.shape
        if key_padding_mask is not None and attention_mask is not None:
            raise ValueError("key_padding_mask, attention_mask: pass one (True = padding, or 1 = token)")
        if cu_seqlens is not None and (key_padding_mask is not None or attention_mask is not None):
            raise ValueError("cu_seqlens: packed documents take no padding mask (each document "
                             "ends where cu_seqlens says)")
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask: expected a bool tensor [batch, seq_len], True = padding")
            padding = padding_from_mask("key_padding_mask", key_padding_mask, "bool", batch, n)
        elif attention_mask is not None:
            padding = padding_from_mask("attention_mask", attention_mask, "mul", batch, n)
        else:
            padding = None
        hidden = self.transformer(input_ids, padding, layout=layout, cu_seqlens=cu_seqlens)
        if cu_seqlens is not None:
            pooled = pool_documents(hidden.flatten(0, 1), cu_seqlens, self.config.pooling)
        elif self.config.pooling == "first":
            pooled = hidden[:, 0]
        elif padding is None:
            pooled = hidden.mean(dim=1)
        else:
            keep = (~padding).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        logits = self.head(pooled)
        if labels is None:
            return ModelOutput(logits)
        count = logits.shape[0]  # batch entries, or packed documents
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (count,):
            raise ValueError(f"labels: expected a class index tensor of shape ({count},)")
        return ModelOutput(logits, F.cross_entropy(logits.float(), labels))
