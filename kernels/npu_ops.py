"""The npu backend: the operators on Ascend NPUs through torch_npu / ATB (see docs/npu.md).

``torch_npu`` is imported inside each function, at call time, so importing this module never needs it
(and the test emulator installed in ``sys.modules`` is the one used). What an NPU operator cannot express
(softcap, per-head masks, xPos, ALiBi over a paged cache...) runs on the torch backend, warned once.
Masking follows the conventions of :mod:`optimum_atb.ops`; inputs arrive validated.

Not run on Ascend hardware: checked only against ``tests/npu_emulator.py``, an emulator of the documented
semantics.
"""

from __future__ import annotations

import torch

from optimum_atb.backends import warn_once

from . import torch_ops
from .dispatch import register

MAX_TOKENS = 2147483647  # torch_npu's "no limit" for pre_tokens / next_tokens
_COMPRESSED_CAUSAL: dict[torch.device, torch.Tensor] = {}


def _compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The 2048x2048 ``triu(ones, 1)`` bool mask (True = masked) sparse modes 3 and 4 take, one per device."""
    mask = _COMPRESSED_CAUSAL.get(device)
    if mask is None:
        mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)
        _COMPRESSED_CAUSAL[device] = mask
    return mask


def _torch_fallback(op: str, reason: str, **kwargs):
    warn_once(
        f"npu-{op}-{reason}",
        f"optimum-atb: the npu backend has no torch_npu operator for {op} with {reason}; "
        "using the slower torch implementation.",
    )
    return getattr(torch_ops, op)(**kwargs)


# ----------------------------------------------------------------------------------------------- attention


def _sparse_params(
    causal: bool, sliding_window: int | None, attn_mask: torch.Tensor | None, batch: int, sq: int, sk: int
) -> tuple[torch.Tensor | None, int, int, int]:
    """(atten_mask with 1 = masked, sparse_mode, pre_tokens, next_tokens) for the NPU attention operators.

    Causal / sliding window alone use the compressed mask (modes 3 / 4, bottom-right aligned like the ops
    API). With ``attn_mask`` everything is folded into one explicit [B|1, 1, Sq, Sk] mask (mode 0),
    broadcast over the query dimension, since the NPU never broadcasts it.
    """
    if attn_mask is None:
        if sliding_window is not None:
            nxt = 0 if causal else MAX_TOKENS
            return None, 4, sliding_window, nxt
        return None, (3 if causal else 0), MAX_TOKENS, MAX_TOKENS
    allowed = attn_mask.to(torch.bool)
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    allowed = allowed.expand(allowed.shape[0], 1, sq, sk)
    if causal or sliding_window is not None:
        pos = torch.arange(sq, device=attn_mask.device).unsqueeze(1) + (sk - sq)
        cols = torch.arange(sk, device=attn_mask.device).unsqueeze(0)
        band = torch.ones(sq, sk, dtype=torch.bool, device=attn_mask.device)
        if causal:
            band = band & (cols <= pos)
        if sliding_window is not None:
            band = band & (cols > pos - sliding_window)
        allowed = allowed & band
    return (~allowed).contiguous(), 0, MAX_TOKENS, MAX_TOKENS


def _may_have_empty_rows(attn_mask, causal: bool, q_lens: list[int], k_lens: list[int]) -> bool:
    """Whether a query row may see no key (then ``inner_precise=2`` makes the NPU return zeros for it)."""
    return attn_mask is not None or (causal and any(q > k for q, k in zip(q_lens, k_lens)))


def _alibi_bias(slopes: torch.Tensor, sq: int, sk: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi as [B|1, Hq, Sq, Sk]: ``-slope * |p - j|`` with query positions aligned bottom-right."""
    s = slopes.to(torch.float32)
    s = s.view(1, -1, 1, 1) if s.dim() == 1 else s.view(s.shape[0], s.shape[1], 1, 1)
    pos = torch.arange(sq, device=slopes.device).unsqueeze(1) + (sk - sq)
    dist = (pos - torch.arange(sk, device=slopes.device).unsqueeze(0)).abs().to(torch.float32)
    return (-s * dist).to(dtype)


def _clean_lse(lse: torch.Tensor) -> torch.Tensor:
    """float32 lse with ``-inf`` for rows that saw no key (the NPU may report them as +inf)."""
    lse = lse.to(torch.float32)
    return lse.masked_fill(~torch.isfinite(lse), float("-inf"))


def _flash_unsupported(q, k, softcap, attn_mask, alibi_slopes, cu_seqlens_q) -> str | None:
    hq, hkv = q.shape[-2], k.shape[-2]
    if softcap is not None:
        return "softcap"
    if hq // hkv > 64:
        return "more than 64 query heads per kv head"
    if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] > 1:
        return "a per-head attn_mask"
    if cu_seqlens_q is not None and alibi_slopes is not None:
        return "varlen ALiBi"
    return None


@register("flash_attention", "npu")
def flash_attention(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
    softcap: float | None,
    attn_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    dropout_p: float,
    return_lse: bool,
):
    """See :func:`optimum_atb.ops.flash_attention`. Inference: ``npu_fused_infer_attention_score``;
    gradients or dropout: ``npu_fusion_attention`` (the training operator). Varlen reads ``cu_seqlens`` on
    the host (the operators take Python lists): one sync per call."""
    kwargs = dict(
        q=q, k=k, v=v, causal=causal, scale=scale, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, return_lse=return_lse,
    )  # fmt: skip
    reason = _flash_unsupported(q, k, softcap, attn_mask, alibi_slopes, cu_seqlens_q)
    if reason is not None:
        return _torch_fallback("flash_attention", reason, **kwargs)
    training = dropout_p > 0.0 or (torch.is_grad_enabled() and q.requires_grad)
    if cu_seqlens_q is not None:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        q_lens = [cq[i + 1] - cq[i] for i in range(len(cq) - 1)]
        k_lens = [ck[i + 1] - ck[i] for i in range(len(ck) - 1)]
        lengths = (cq[1:], ck[1:])
        mask, mode, pre, nxt = _sparse_params(causal, sliding_window, None, 1, 1, 1)
        pse = None
    else:
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        q_lens, k_lens, lengths = [sq], [sk], None
        mask, mode, pre, nxt = _sparse_params(causal, sliding_window, attn_mask, batch, sq, sk)
        pse = None if alibi_slopes is None else _alibi_bias(alibi_slopes, sq, sk, q.dtype)
    if mode in (3, 4):
        mask = _compressed_causal_mask(q.device)
    precise = 2 if _may_have_empty_rows(attn_mask, causal, q_lens, k_lens) else 0
    if training:
        return _fusion_attention(
            q, k, v, scale, mask, mode, pre, nxt, precise, pse, lengths, dropout_p, return_lse
        )
    return _fused_infer(q, k, v, scale, mask, mode, pre, nxt, precise, pse, lengths, return_lse)


def _fused_infer(q, k, v, scale, mask, mode, pre, nxt, precise, pse, lengths, return_lse):
    import torch_npu

    layout = "BSND" if lengths is None else "TND"
    out, lse = torch_npu.npu_fused_infer_attention_score(
        q.contiguous(), k.contiguous(), v.contiguous(), pse_shift=pse, atten_mask=mask,
        actual_seq_lengths=None if lengths is None else lengths[0],
        actual_seq_lengths_kv=None if lengths is None else lengths[1],
        num_heads=q.shape[-2], num_key_value_heads=k.shape[-2], scale=float(scale), pre_tokens=pre,
        next_tokens=nxt, input_layout=layout, sparse_mode=mode, inner_precise=precise,
        softmax_lse_flag=return_lse,
    )  # fmt: skip
    if not return_lse:
        return out
    lse = _clean_lse(lse.squeeze(-1))  # BSND: [B, N, Sq, 1]; TND: [T, N, 1]
    return out, (lse if lengths is None else lse.transpose(0, 1))


def _fusion_attention(q, k, v, scale, mask, mode, pre, nxt, precise, pse, lengths, dropout_p, return_lse):
    import torch_npu

    varlen = lengths is not None
    res = torch_npu.npu_fusion_attention(
        q, k, v, q.shape[-2], "TND" if varlen else "BSND",
        pse=None if pse is None else pse / scale,  # the operator computes scale * (QK^T + pse)
        atten_mask=mask, scale=float(scale), keep_prob=1.0 - dropout_p, pre_tockens=pre, next_tockens=nxt,
        inner_precise=precise, actual_seq_qlen=lengths[0] if varlen else None,
        actual_seq_kvlen=lengths[1] if varlen else None, sparse_mode=mode,
    )  # fmt: skip
    out = res[0]
    if not return_lse:
        return out
    lse = _clean_lse(res[1][..., 0] + torch.log(res[2][..., 0]))  # softmax max + log(sum)
    return out, (lse.transpose(0, 1) if varlen else lse)


@register("paged_attention", "npu")
def paged_attention(
    *,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    """Sq == 1: ATB PagedAttention (``_npu_paged_attention``); Sq > 1 or a sliding window: FIA with
    ``block_table``. ``context_lens`` is needed on the host: pass it on the CPU to avoid a sync per call.

    Block sizes outside the NPU constraints (a multiple of 16 for decode, of 128 in [128, 512] for Sq > 1)
    run on the torch implementation, with a one-time warning: allocate the paged cache with block_size=128.
    """
    b, sq, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    reason = "softcap" if softcap is not None else "ALiBi" if alibi_slopes is not None else None
    if reason is None and hq // hkv > 64:
        reason = "more than 64 query heads per kv head"
    if reason is None and sq > 1 and (bs % 128 != 0 or not 128 <= bs <= 512):
        reason = (
            f"{sq} query tokens per sequence and block_size={bs} (FIA needs a multiple of 128 in [128, 512])"
        )
    elif reason is None and sq == 1 and (bs % 16 != 0 or bs > 512):
        reason = f"block_size={bs} (PagedAttention needs a multiple of 16, <= 512)"
    if reason is not None:
        return _torch_fallback(
            "paged_attention", reason, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
            context_lens=context_lens, scale=scale, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
            softcap=softcap,
        )  # fmt: skip
    import torch_npu

    table = block_tables.to(torch.int32)
    if sq == 1 and sliding_window is None:
        out = torch.empty(b, hq, v_cache.shape[-1], dtype=q.dtype, device=q.device)
        torch_npu._npu_paged_attention(
            query=q.reshape(b, hq, d), key_cache=k_cache, value_cache=v_cache, num_kv_heads=hkv,
            num_heads=hq, scale_value=float(scale), block_table=table,
            context_lens=context_lens.to(device="cpu", dtype=torch.int32), out=out,
        )  # fmt: skip
        return out.view(b, 1, hq, -1)
    lens = context_lens.tolist()
    mode, pre, nxt = (3, MAX_TOKENS, MAX_TOKENS) if sliding_window is None else (4, sliding_window, 0)
    out, _ = torch_npu.npu_fused_infer_attention_score(
        q.contiguous(), k_cache.view(nb, bs, -1), v_cache.view(nb, bs, -1),
        atten_mask=_compressed_causal_mask(q.device), block_table=table, actual_seq_lengths_kv=lens,
        num_heads=hq, num_key_value_heads=hkv, scale=float(scale), pre_tokens=pre, next_tokens=nxt,
        input_layout="BSND", sparse_mode=mode, inner_precise=2 if min(lens) < sq else 0, block_size=bs,
    )  # fmt: skip
    return out


@register("reshape_and_cache", "npu")
def reshape_and_cache(
    *,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """``_npu_reshape_and_cache`` of the tokens whose slot is >= 0 (padding slots are filtered out first,
    which costs a host sync: the operator itself does not skip them)."""
    import torch_npu

    keep = slot_mapping >= 0
    torch_npu._npu_reshape_and_cache(
        key=k[keep].to(k_cache.dtype), value=v[keep].to(v_cache.dtype), key_cache=k_cache,
        value_cache=v_cache, slot_indices=slot_mapping[keep].to(torch.int32),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- norms


@register("rms_norm", "npu")
def rms_norm(
    *, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, offset: float
):
    """``npu_rms_norm`` (``npu_add_rms_norm`` with a residual); ``offset`` is folded into the weight.
    The output keeps x's dtype (the NPU operators need gamma in x's dtype)."""
    import torch_npu

    gamma = weight if offset == 0.0 else weight.float() + offset
    gamma = gamma.to(x.dtype)
    if residual is None:
        return torch_npu.npu_rms_norm(x, gamma, epsilon=eps)[0]
    y, _rstd, h = torch_npu.npu_add_rms_norm(x, residual.to(x.dtype), gamma, epsilon=eps)
    return y, h


register("layer_norm", "npu")(torch_ops.layer_norm)  # F.layer_norm is a native NPU operator


# ------------------------------------------------------------------------------------------------ rotary


@register("apply_rotary", "npu")
def apply_rotary(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    rotary_dim: int,
    xpos_scale_base: float | None,
    positions: torch.Tensor | None,
):
    """``npu_rotary_mul`` on q and k ([B,S,H,D] with cos/sin as [B|1,S,1,R]); partial rotary by slicing."""
    if xpos_scale_base is not None:
        return _torch_fallback(
            "apply_rotary", "xPos", q=q, k=k, cos=cos, sin=sin, interleaved=interleaved,
            rotary_dim=rotary_dim, xpos_scale_base=xpos_scale_base, positions=positions,
        )  # fmt: skip
    import torch_npu

    mode = "interleave" if interleaved else "half"

    def turn(x: torch.Tensor) -> torch.Tensor:
        r1, r2 = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
        rot = torch_npu.npu_rotary_mul(x[..., :rotary_dim].contiguous(), r1, r2, rotary_mode=mode)
        return rot if rotary_dim == x.shape[-1] else torch.cat((rot, x[..., rotary_dim:]), dim=-1)

    return turn(q), turn(k)


# ------------------------------------------------------------------------------------------- activations


@register("swiglu", "npu")
def swiglu(*, gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    """``npu_swiglu`` on ``cat(gate, up)`` (its first half is the one through swish)."""
    import torch_npu

    return torch_npu.npu_swiglu(gate if up is None else torch.cat((gate, up), dim=-1), dim=-1)


@register("geglu", "npu")
def geglu(*, gate: torch.Tensor, up: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """``npu_geglu`` on ``cat(gate, up)`` with ``activate_left=True`` (gelu on the first half)."""
    import torch_npu

    x = gate if up is None else torch.cat((gate, up), dim=-1)
    code = 1 if approximate == "tanh" else 0
    out, _gelu = torch_npu.npu_geglu(x, dim=-1, approximate=code, activate_left=True)
    return out
