"""Registration with transformers, done once on ``import optimum_atb``.

* ``"atb"`` in ``AttentionInterface`` (the attention function) and in ``AttentionMaskInterface``
  (class-level ``register``: without it the mask builder returns ``None`` for ``"atb"`` and left-padded
  batches are silently wrong). The mask builder is transformers' own ``sdpa_mask`` (bool masks).
* ``PreTrainedModel.to_atb``: a new method; nothing existing in transformers is modified.
"""

from __future__ import annotations

from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import atb_attention_forward
from .convert import to_atb

ATTN_IMPLEMENTATION = "atb"


def register() -> None:
    """Register ``"atb"`` with transformers and attach ``PreTrainedModel.to_atb`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, atb_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    PreTrainedModel.to_atb = to_atb
