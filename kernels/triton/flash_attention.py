"""Flash attention forward in Triton: one program per (query tile, sequence, query head).

The program streams K/V tiles through an online softmax (fp32 accumulators), reading the K/V head
``h // (Hq // Hkv)`` in place (GQA without repeating K/V). Tiles wholly above the causal diagonal or below
the sliding window are never visited. Varlen mode (``cu_seqlens``) uses the same kernel with a per-sequence
token offset. The backward recomputes attention with the torch backend under autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import get_kernel, register
from ._common import LN2, attention_step, cast, dot_args, interpreted, pow2


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE, MASK, SLOPES, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_ab, stride_ah,
    seqlen_q, seqlen_k, head_dim, group, scale, softcap, window,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, RETURN_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        k_start = tl.load(CU_K + b).to(tl.int64)
        sq = tl.load(CU_Q + b + 1).to(tl.int32) - q_start.to(tl.int32)
        sk = tl.load(CU_K + b + 1).to(tl.int32) - k_start.to(tl.int32)
    else:
        q_start = 0
        k_start = 0
        sq = seqlen_q
        sk = seqlen_k
    m0 = pid_m * BLOCK_M
    if m0 >= sq:
        return
    kvh = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < sq
    d_ok = offs_d < head_dim
    q_base = Q + b * stride_qb + q_start * stride_qs + h * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b * stride_kb + k_start * stride_ks + kvh * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vs + kvh * stride_vh
    pos = offs_m + (sk - sq)  # bottom-right aligned absolute positions

    # Key range this tile can see: below the causal diagonal of its last row, above the window of its first.
    hi = sk
    if CAUSAL:
        hi = tl.minimum(sk, tl.minimum(m0 + BLOCK_M, sq) + sk - sq)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, m0 + sk - sq - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N

    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * stride_ab + h * stride_ah).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < sk
        k_t = tl.load(
            k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        valid = row_ok[:, None] & n_ok[None, :]
        if HAS_MASK:
            allowed = tl.load(
                MASK
                + b * stride_mb
                + h * stride_mh
                + offs_m[:, None] * stride_mq
                + offs_n[None, :] * stride_mk,
                mask=valid,
                other=0,
            )
            valid = valid & (allowed != 0)
        m_i, l_i, acc = attention_step(
            q, k_t, v, m_i, l_i, acc, pos, offs_n, valid, slope, scale, softcap, window,
            CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, DOT_F32, PREC,
        )  # fmt: skip

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_base = O + b * stride_ob + q_start * stride_os + h * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
        cast(out, O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    if RETURN_LSE:
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(LSE + b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ls, lse, mask=row_ok)


def _tiles(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head_dim."""
    if interpreted():
        return 16, 16, 1, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    attn_mask: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    return_lse: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel; returns (out, lse or None). ``block_m/n`` override the tile sizes."""
    varlen = cu_seqlens_q is not None
    if varlen:
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported with cu_seqlens (varlen); mask via the lengths")
        tq, hq, d = q.shape
        hkv = k.shape[1]
        batch = cu_seqlens_q.numel() - 1
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if batch else 0
        sq = sk = 0
        qs = (0, *q.stride())
        ks = (0, *k.stride())
        vs = (0, *v.stride())
        out = torch.empty(tq, hq, d, dtype=q.dtype, device=q.device)
        os_ = (0, *out.stride())
        lse = torch.empty(hq, tq, dtype=torch.float32, device=q.device) if return_lse else None
        ls = (0, tq, 1)
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        max_seqlen_q = sq
        qs, ks, vs = q.stride(), k.stride(), v.stride()
        out = torch.empty(batch, sq, hq, d, dtype=q.dtype, device=q.device)
        os_ = out.stride()
        lse = torch.empty(batch, hq, sq, dtype=torch.float32, device=q.device) if return_lse else None
        ls = (hq * sq, sq, 1)
        cu_q = cu_k = q  # unused placeholders
    if attn_mask is not None:
        mask = attn_mask.expand(batch, hq, sq, sk)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        ms = mask.stride()
    else:
        mask, ms = q, (0, 0, 0, 0)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32)
        as_ = (0, slopes.stride(0)) if slopes.dim() == 1 else slopes.stride()
    else:
        slopes, as_ = q, (0, 0)

    bd = pow2(d)
    bm, bn, warps, stages = _tiles(bd)
    bm, bn = block_m or bm, block_n or bn
    dot_f32, prec = dot_args(q.dtype)
    grid = (triton.cdiv(max_seqlen_q, bm), batch, hq)
    if grid[0] == 0 or batch == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return out.zero_(), lse
    _flash_fwd_kernel[grid](
        q, k, v, out, lse if lse is not None else out, mask, slopes, cu_q, cu_k,
        *qs, *ks, *vs, *os_, *ls, *ms, *as_,
        sq, sk, d, hq // hkv, scale, softcap or 0.0, sliding_window or 0,
        IS_VARLEN=varlen, CAUSAL=causal, HAS_WINDOW=sliding_window is not None,
        HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap is not None,
        HAS_MASK=attn_mask is not None, RETURN_LSE=return_lse,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_F32=dot_f32, PREC=prec,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


class _FlashAttention(torch.autograd.Function):
    """Triton forward; backward recomputes with the (differentiable) torch backend."""

    @staticmethod
    def forward(ctx, q, k, v, opts, max_seqlen_k):
        out, lse = flash_attention_forward(q, k, v, **opts)
        ctx.save_for_backward(q, k, v)
        ctx.opts = opts
        ctx.max_seqlen_k = max_seqlen_k
        ctx.set_materialize_grads(False)
        if lse is None:
            return out
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, *_grad_lse):
        q, k, v = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None
        torch_attention = get_kernel("flash_attention", "torch")
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad)]
            out = torch_attention(
                q=inputs[0],
                k=inputs[1],
                v=inputs[2],
                dropout_p=0.0,
                max_seqlen_k=ctx.max_seqlen_k,
                **ctx.opts,
            )
            if isinstance(out, tuple):
                out = out[0]
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None)


@register("flash_attention", "triton")
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
    """Triton flash attention (see :func:`optimum_atb.ops.flash_attention`); dropout is not supported."""
    if dropout_p > 0.0:
        raise NotImplementedError(
            "the triton backend's flash_attention has no dropout; use dropout_p=0.0 (inference) or the "
            "torch backend (optimum_atb.backends.use_backend('torch')) for training with attention dropout"
        )
    opts = dict(
        causal=causal, scale=scale, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
        softcap=softcap, attn_mask=attn_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, return_lse=return_lse,
    )  # fmt: skip
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _FlashAttention.apply(q, k, v, opts, max_seqlen_k)
    out, lse = flash_attention_forward(q, k, v, **opts)
    return (out, lse) if return_lse else out
