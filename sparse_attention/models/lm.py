"""SparseTransformerLM: a decoder-only Sparse Transformer (Child et al. 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_attention.models.config import SparseTransformerConfig
from sparse_attention.models.documents import document_starts
from sparse_attention.models.kv_cache import KVCache
from sparse_attention.models.output import ModelOutput
from sparse_attention.models.pretrained import PretrainedMixin
from sparse_attention.models.trunk import SparseTransformer
from sparse_attention.patterns.arguments import check_int

IGNORE_INDEX = -100


class SparseTransformerLM(PretrainedMixin, nn.Module):
    """Causal language model: pre-norm blocks with a sparse pattern per layer, learned or
    rotary positions, optional tied input/output embeddings.

    forward(input_ids, labels=None, targets=None) -> ModelOutput(logits [B, N, vocab], loss):
    - labels: [B, N] the input's own tokens (Hugging Face convention): position t is scored on
      labels[t + 1];
    - targets: [B, N] already shifted (position t is scored on targets[t]).
    Entries equal to -100 are ignored in the loss. cu_seqlens: packed documents (offsets over
    the B * N tokens taken row after row), each attended alone with positions from 0; with
    labels, no document's last token is scored on the next document's first. With
    cache=KVCache(), input_ids are the
    tokens that follow those already run through the cache (incremental decoding); their
    logits are those the whole sequence gives them.
    """

    config_class = SparseTransformerConfig

    def __init__(self, config: SparseTransformerConfig):
        super().__init__()
        self.config = self.check_config(config)
        self.transformer = SparseTransformer(config, causal=True)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.transformer.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=config.init_std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                layout=None, cu_seqlens: torch.Tensor | None = None) -> ModelOutput:
        if labels is not None and targets is not None:
            raise ValueError("labels, targets: pass one (labels are shifted here, targets already are)")
        logits = self.head(self.transformer(input_ids, cache=cache, layout=layout,
                                            cu_seqlens=cu_seqlens))
        if labels is not None:
            _check_same_shape("labels", labels, input_ids)
            if cu_seqlens is not None:
                labels = labels.masked_fill(document_starts(cu_seqlens, labels), IGNORE_INDEX)
            logits_for_loss, targets = logits[:, :-1], labels[:, 1:]
        elif targets is not None:
            _check_same_shape("targets", targets, input_ids)
            logits_for_loss = logits
        if targets is None:
            return ModelOutput(logits)
        loss = F.cross_entropy(logits_for_loss.reshape(-1, logits.shape[-1]).float(),
                               targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return ModelOutput(logits, loss)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """input_ids [B, N] followed by max_new_tokens sampled tokens (N may exceed max_seq_len).

        Runs in eval mode (the model's mode is restored afterwards) on the last max_seq_len
        tokens. With use_cache, each new token runs alone against a KVCache of the earlier
        ones until max_seq_len tokens are cached; after that (and without use_cache) each step
        reruns the model on the last max_seq_len tokens, whose positions then start at 0.
        greedy takes the most likely token; otherwise tokens are sampled from
        softmax(logits / temperature), restricted to the top_k most likely when given and to
        the smallest set of most likely tokens whose probabilities add up to top_p (nucleus
        sampling) when given."""
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        if not greedy and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                           or temperature <= 0):
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        if top_k is not None:
            check_int("top_k", top_k, minimum=1)
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p: expected a probability in (0, 1], got {top_p!r}")
        self.transformer.check_input_ids(input_ids, any_length=True)
        max_len = self.config.max_seq_len
        cache = KVCache() if use_cache else None
        was_training = self.training
        self.eval()
        try:
            for step in range(max_new_tokens):
                if step == 0 or cache is None:
                    logits = self(input_ids[:, -max_len:], cache=cache).logits
                else:
                    logits = self(input_ids[:, -1:], cache=cache).logits
                token = _next_token(logits[:, -1].float(), greedy, temperature, top_k, top_p, generator)
                input_ids = torch.cat((input_ids, token.to(input_ids.dtype)), dim=1)
                if cache is not None and cache.length() == max_len:
                    cache = None  # the window slides on: positions restart, so rerun it whole
        finally:
            self.train(was_training)
        return input_ids


def _next_token(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """[B, 1] tokens chosen from the last position's logits [B, vocab]."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = _nucleus(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits with -inf outside the smallest set of most likely tokens whose probabilities
    reach top_p (the most likely token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probabilities = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens more likely than it already reach top_p.
    before = probabilities.cumsum(dim=-1) - probabilities
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _check_same_shape(name: str, tensor, input_ids: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(input_ids.shape):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} (that of input_ids), got {shape}")
