"""The torch backend: every operator in native PyTorch (the CPU path and the fallback of the others).

Attention runs through ``F.scaled_dot_product_attention`` with ``enable_gqa=True`` (K/V never repeated)
whenever it can express the request; softcap, ``return_lse`` and ALiBi in half precision take an explicit
float32 math path (SDPA cannot softcap nor return the log-sum-exp, and a half-precision bias loses digits).
Masking follows the conventions of :mod:`optimum_atb.ops`. Inputs arrive validated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import register

# ----------------------------------------------------------------------------------------------- attention


def _visibility(
    batch: int,
    sq: int,
    sk: int,
    device: torch.device,
    *,
    causal: bool,
    sliding_window: int | None,
    attn_mask: torch.Tensor | None,
    kv_len: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(allowed [B|1, Hq|1, Sq, Sk] bool or None when every key is visible, query positions [B|1, Sq]).

    Query row ``i`` sits at ``kv_len[b] - Sq + i`` (``Sk - Sq + i`` without ``kv_len``); keys at or past
    ``kv_len[b]`` are invisible.
    """
    rows = torch.arange(sq, device=device)
    if kv_len is None:
        q_pos = (rows + (sk - sq)).unsqueeze(0)
    else:
        q_pos = kv_len.to(torch.long).unsqueeze(1) - sq + rows
    k_pos = torch.arange(sk, device=device)
    allowed = None

    def _and(cond: torch.Tensor) -> None:
        nonlocal allowed
        allowed = cond if allowed is None else allowed & cond

    if kv_len is not None:
        _and((k_pos < kv_len.to(torch.long).view(-1, 1, 1)).unsqueeze(1))
    if causal:
        _and((k_pos <= q_pos.unsqueeze(-1)).unsqueeze(1))
    if sliding_window is not None:
        _and((k_pos > q_pos.unsqueeze(-1) - sliding_window).unsqueeze(1))
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        _and(m.to(torch.bool))
    return allowed, q_pos


def _alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, sk: int) -> torch.Tensor:
    """float32 bias [B|1, Hq, Sq, Sk]: ``-slope * |q_pos - k_pos|``."""
    s = slopes.to(torch.float32)
    s = s.view(1, -1, 1, 1) if s.dim() == 1 else s.view(s.shape[0], s.shape[1], 1, 1)
    k_pos = torch.arange(sk, device=q_pos.device)
    dist = (q_pos.unsqueeze(-1) - k_pos).abs().to(torch.float32).unsqueeze(1)
    return -s * dist


def _math_attention(q, k, v, scale, allowed, bias, softcap, dropout_p):
    """float32 attention on (B,H,S,D) tensors with grouped heads; returns (out float32, lse [B,Hq,Sq])."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.to(torch.float32).reshape(b, hkv, g, sq, d)
    kf, vf = k.to(torch.float32).unsqueeze(2), v.to(torch.float32).unsqueeze(2)
    s = (qf @ kf.transpose(-1, -2)).reshape(b, hq, sq, sk) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    out = (p.reshape(b, hkv, g, sq, sk) @ vf).reshape(b, hq, sq, vf.shape[-1])
    return out, lse


def _attention_bhsd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None,
    alibi_slopes: torch.Tensor | None,
    softcap: float | None,
    attn_mask: torch.Tensor | None,
    kv_len: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Attention on q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D]; returns out [B,Hq,Sq,D] (and lse [B,Hq,Sq] float32)."""
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    plain = sliding_window is None and alibi_slopes is None and attn_mask is None and kv_len is None
    use_math = return_lse or softcap is not None or (alibi_slopes is not None and q.dtype != torch.float32)
    if plain and not use_math and (not causal or sq == 1 or sq == sk):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal and sq > 1, scale=scale, enable_gqa=True
        )

    allowed, q_pos = _visibility(
        b, sq, sk, q.device, causal=causal, sliding_window=sliding_window, attn_mask=attn_mask, kv_len=kv_len
    )
    bias = _alibi_bias(alibi_slopes, q_pos, sk) if alibi_slopes is not None else None
    row_ok = None
    # A row that sees no key would give NaN (and NaN gradients): let it see everything, zero it afterwards.
    if allowed is not None and (attn_mask is not None or kv_len is not None or (causal and sq > sk)):
        row_ok = allowed.any(dim=-1, keepdim=True)
        allowed = allowed | ~row_ok

    if use_math:
        out, lse = _math_attention(q, k, v, scale, allowed, bias, softcap, dropout_p)
        out = out.to(q.dtype)
    else:
        if bias is not None:
            mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
        else:
            mask = allowed
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=True
        )
        lse = None
    if row_ok is not None:
        out = torch.where(row_ok, out, 0.0)
        if lse is not None:
            lse = torch.where(row_ok.squeeze(-1), lse, float("-inf"))
    if return_lse:
        return out, lse
    return out


@register("flash_attention", "torch")
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
    """See :func:`optimum_atb.ops.flash_attention`. Varlen mode loops over the sequences (host sync)."""
    opts = dict(
        causal=causal, scale=scale, sliding_window=sliding_window, softcap=softcap, dropout_p=dropout_p,
        return_lse=return_lse,
    )  # fmt: skip
    if cu_seqlens_q is None:
        res = _attention_bhsd(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), alibi_slopes=alibi_slopes,
            attn_mask=attn_mask, **opts,
        )  # fmt: skip
        if return_lse:
            return res[0].transpose(1, 2), res[1]
        return res.transpose(1, 2)

    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        res = _attention_bhsd(
            q[cq[i] : cq[i + 1]].transpose(0, 1).unsqueeze(0),
            k[ck[i] : ck[i + 1]].transpose(0, 1).unsqueeze(0),
            v[ck[i] : ck[i + 1]].transpose(0, 1).unsqueeze(0),
            alibi_slopes=slopes, attn_mask=None, **opts,
        )  # fmt: skip
        out, lse = res if return_lse else (res, None)
        outs.append(out[0].transpose(0, 1))
        if return_lse:
            lses.append(lse[0])
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=1)) if return_lse else out


@register("paged_attention", "torch")
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
    """Gathers every sequence's blocks ([B, max_blocks * block_size] keys), masks past ``context_lens``.

    Correct, not fast: the fallback when no fused paged kernel exists. No host sync. Slots past a
    sequence's context are never read into the result (zeroed before use).
    """
    nb, bs, hkv, d = k_cache.shape
    b = block_tables.shape[0]
    table = block_tables.to(torch.long).clamp(0, nb - 1)  # unused entries may hold anything
    keys = k_cache[table].reshape(b, -1, hkv, d).transpose(1, 2)
    values = v_cache[table].reshape(b, -1, hkv, v_cache.shape[-1]).transpose(1, 2)
    # slots past a context may hold anything (NaN from torch.empty): 0 * NaN would leak through softmax @ V
    stale = (torch.arange(keys.shape[2], device=q.device) >= context_lens.view(-1, 1).to(torch.long)).view(
        b, 1, -1, 1
    )
    keys, values = keys.masked_fill(stale, 0), values.masked_fill(stale, 0)
    out = _attention_bhsd(
        q.transpose(1, 2), keys, values, causal=True, scale=scale, sliding_window=sliding_window,
        alibi_slopes=alibi_slopes, softcap=softcap, attn_mask=None, kv_len=context_lens,
    )  # fmt: skip
    return out.transpose(1, 2)


@register("reshape_and_cache", "torch")
def reshape_and_cache(
    *,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """``index_copy_`` of the tokens with a slot >= 0 into the flattened pools (in place)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.long)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


# ------------------------------------------------------------------------------------------------- norms


@register("rms_norm", "torch")
def rms_norm(
    *, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, offset: float
):
    """LlamaRMSNorm (``offset=0``) / GemmaRMSNorm-style (``offset!=0``: float32 ``x * (offset + w)``)."""
    h = x if residual is None else x + residual
    hf = h.to(torch.float32)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        out = weight * hf.to(h.dtype)
    else:
        out = (hf * (offset + weight.float())).to(h.dtype)
    return out if residual is None else (out, h)


@register("layer_norm", "torch")
def layer_norm(
    *,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
):
    """``F.layer_norm`` over the last dim (as ``nn.LayerNorm``), optionally after a residual add."""
    h = x if residual is None else x + residual
    out = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, h)


# ------------------------------------------------------------------------------------------------ rotary


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """rotate_half (halves) or its GPT-J form: pairs (x0, x1) -> (-x1, x0)."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def xpos_zeta(rotary_dim: int, interleaved: bool, device: torch.device | None = None) -> torch.Tensor:
    """xPos per-channel base ``zeta_i = (2i + 0.4 R) / (1.4 R)`` for pair i, laid out like cos/sin."""
    z = (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) + 0.4 * rotary_dim) / (
        1.4 * rotary_dim
    )
    return z.repeat_interleave(2) if interleaved else torch.cat((z, z))


@register("apply_rotary", "torch")
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
    """``x * cos + rotate(x) * sin`` on the first ``rotary_dim`` channels, computed in float32 and rounded
    once (in fp32 this is exactly transformers' ``apply_rotary_pos_emb``).

    With xPos the rotated channels of q are further multiplied by ``zeta ** (pos / base)`` and those of
    k by ``zeta ** (-pos / base)`` (see :func:`xpos_zeta`).
    """
    c = cos.to(torch.float32).unsqueeze(2)  # [B|1, S, 1, R]
    s = sin.to(torch.float32).unsqueeze(2)
    qc = kc = c
    qs = ks = s
    if xpos_scale_base is not None:
        power = positions.to(torch.float32).unsqueeze(-1) / xpos_scale_base  # [B|1, S, 1]
        scale = (xpos_zeta(rotary_dim, interleaved, q.device) ** power).unsqueeze(2)  # [B|1, S, 1, R]
        qc, qs, kc, ks = c * scale, s * scale, c / scale, s / scale

    def turn(x, cc, ss):
        xr = x[..., :rotary_dim].to(torch.float32)
        rot = (xr * cc + _rotate(xr, interleaved) * ss).to(x.dtype)
        return rot if rotary_dim == x.shape[-1] else torch.cat((rot, x[..., rotary_dim:]), dim=-1)

    return turn(q, qc, qs), turn(k, kc, ks)


# ------------------------------------------------------------------------------------------- activations


def _split(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return gate.chunk(2, dim=-1) if up is None else (gate, up)


@register("swiglu", "torch")
def swiglu(*, gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    """``silu(gate) * up`` (``up=None``: first half of the last dim is the gate)."""
    g, u = _split(gate, up)
    return F.silu(g) * u


@register("geglu", "torch")
def geglu(*, gate: torch.Tensor, up: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (``up=None``: first half of the last dim is the gate)."""
    g, u = _split(gate, up)
    return F.gelu(g, approximate=approximate) * u
