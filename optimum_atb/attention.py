"""The ``"atb"`` attention implementation: transformers' attention call routed to ``ops.flash_attention``.

Mask conventions handled here (transformers 5.x, see shared/docs/transformers-integration.md):

* The mask builder registered for ``"atb"`` is transformers' ``sdpa_mask``: a bool
  ``(B, 1, Sq, Sk)`` mask (True = attend) that already holds causality, padding and the sliding window,
  or ``None`` when it can be skipped.
* ``None`` means bottom-right causal (``optimum_atb.ops`` convention) except in one case: prefill into an
  empty ``StaticCache`` (``1 < Sq < Sk``), where the keys are the cache's ``max_cache_len`` rows and the
  attention is top-left causal over the first ``Sq`` of them; we then keep only those ``Sq`` keys.
* A float (additive) mask, e.g. from an ``"eager"`` mask builder, is turned into a bool mask.
"""

from __future__ import annotations

import torch

from . import ops


def _bool_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min


def flash_attention_bshd(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
) -> torch.Tensor:
    """Attention over q [B,Sq,Hq,D], k/v [B,Sk,Hkv,D] (layout of ``ops``) with transformers' masks.

    Returns [B,Sq,Hq,D]. ``is_causal`` defaults to ``module.is_causal``.
    """
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q_len, kv_len = query.shape[1], key.shape[1]
    mask = None
    if attention_mask is not None:
        mask = _bool_mask(attention_mask)
    elif causal and 1 < q_len < kv_len:
        # Prefill into an empty static cache: top-left causal, the keys after the first q_len are unwritten.
        key, value = key[:, :q_len], value[:, :q_len]
    return ops.flash_attention(
        query,
        key,
        value,
        causal=causal,
        scale=scaling,
        sliding_window=sliding_window,
        softcap=softcap,
        attn_mask=mask,
        dropout_p=dropout,
    )


def atb_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function registered as ``"atb"`` in ``transformers.AttentionInterface``.

    Takes transformers' (B, H, S, D) query/key/value (K/V already updated by the cache, GQA heads not
    repeated) and returns ``(out, None)`` with ``out`` shaped (B, Sq, Hq, D).
    """
    out = flash_attention_bshd(
        module,
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attention_mask,
        scaling=scaling,
        dropout=dropout,
        sliding_window=sliding_window,
        softcap=softcap,
        is_causal=kwargs.get("is_causal"),
    )
    return out, None
