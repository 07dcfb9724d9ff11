"""What a model's attention call asks for besides q, k, v and the mask, as the op's score terms.

transformers hands attention functions these as keyword arguments:
- `softcap`: logit soft-capping of the scaled scores (Gemma 2's attn_logit_softcapping);
- `s_aux`: attention sinks, one logit per query head (gpt-oss's `sinks` parameter);
- `dropout`: attention dropout, which eager attention applies only while module.training.
Arguments for what the op does not compute raise a ValueError that names them.
"""

from __future__ import annotations

# Arguments some models pass that change attention in ways the op is not given here.
UNSUPPORTED_ARGUMENTS = {
    "position_bias": "an additive position bias [B, H, Nq, Nk] (the op takes T5's bucket table, "
                     "not its expansion)",
    "head_mask": "a head mask",
}


def model_terms(module, dropout: float, ignore_dropout: bool, kwargs: dict) -> dict:
    """The score-term arguments of sparse_attention for this call: softcap, sinks, dropout_p."""
    model = type(module).__name__
    for name, meaning in UNSUPPORTED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{name}: {model} asks for {meaning}, which sparse_attention does not compute; "
                f"use attn_implementation='sdpa' or 'eager' for this model"
            )
    # transformers' models pass dropout=0 outside training; eager attention also checks
    # module.training, so this does too.
    training = getattr(module, "training", True)
    return dict(softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"),
                dropout_p=float(dropout or 0.0) if training and not ignore_dropout else 0.0)
