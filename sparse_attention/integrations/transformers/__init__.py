"""Hugging Face transformers integration: run transformers models on the block-sparse op.

    from sparse_attention.integrations.transformers import register, sparsify

    register(pattern=sa.Local(128, block_size=64))            # then, for any supported model:
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sparse_attention")

    sparsify(model, sa.Fixed(chunk=256, block_size=64))         # or switch an existing model

Packed batches (position_ids that restart, or the cu_seq_lens_q / cu_seq_lens_k kwargs of
DataCollatorWithFlattening) run on the op's cu_seqlens, every document attended alone.
Logit soft-capping (Gemma 2), attention sinks (gpt-oss) and attention dropout in training run
on the op's score terms (see `terms`).

Needs transformers >= MINIMUM_VERSION (`pip install sparse_attention[transformers]`).
"""

from sparse_attention.integrations.transformers.version import MINIMUM_VERSION, check_version

check_version()

from sparse_attention.integrations.transformers.attention import attention_forward  # noqa: E402
from sparse_attention.integrations.transformers.masks import (  # noqa: E402
    PositionedMask, TokenRules, token_rules_mask,
)
from sparse_attention.integrations.transformers.positions import extend_position_embeddings  # noqa: E402
from sparse_attention.integrations.transformers.register import register  # noqa: E402
from sparse_attention.integrations.transformers.sparsify import sparsify  # noqa: E402

__all__ = [
    "MINIMUM_VERSION", "PositionedMask", "TokenRules", "attention_forward", "extend_position_embeddings", "register",
    "sparsify", "token_rules_mask",
]
