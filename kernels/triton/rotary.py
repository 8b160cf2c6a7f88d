"""Rotary embeddings in Triton: q and k of one token rotated in one program, one launch for both.

``out = x * cos + rotate(x) * sin`` on the first ``rotary_dim`` channels (rotate_half or, interleaved,
pairs (x0, x1) -> (-x1, x0)); the other channels are copied. Everything is computed in float32 and
rounded once (cos/sin arrive in the activations' dtype from the model's rotary module, so this matches
transformers up to that single rounding). xPos scales q's cos/sin by ``zeta ** (pos / base)`` and k's by
its inverse, in float32: rounding the scaled tables to bf16 first would cost up to ~10x the final error.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register
from ._common import cast, pow2


@triton.jit
def _rotate_heads(
    X, Y, base_x, base_y, stride_h, stride_d, num_heads, head_dim, cols, partner, rot, c, s,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Rotate the [num_heads, head_dim] tile of one token; Y is contiguous [.., head_dim]."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    h_ok = heads < num_heads
    x = tl.load(
        X + base_x + heads * stride_h + cols[None, :] * stride_d, mask=h_ok & (cols < head_dim)[None, :]
    )
    xp = tl.load(
        X + base_x + heads * stride_h + partner[None, :] * stride_d, mask=h_ok & rot[None, :], other=0.0
    )
    x = x.to(tl.float32)
    y = tl.where(rot[None, :], x * c[None, :] + xp.to(tl.float32) * s[None, :], x)
    tl.store(
        Y + base_y + heads * head_dim + cols[None, :],
        cast(y, Y.dtype.element_ty),
        mask=h_ok & (cols < head_dim)[None, :],
    )


@triton.jit
def _rotary_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd, stride_pb, stride_ps,
    seqlen, num_q_heads, num_k_heads, head_dim, rotary_dim, xpos_base,
    INTERLEAVED: tl.constexpr, XPOS: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seqlen
    t = pid % seqlen
    cols = tl.arange(0, BLOCK_D)
    rot = cols < rotary_dim
    half = rotary_dim // 2
    if INTERLEAVED:
        partner = cols ^ 1
        first = cols % 2 == 0
        pair = cols // 2
    else:
        first = cols < half
        partner = tl.where(first, cols + half, cols - half)
        pair = tl.where(first, cols, cols - half)
    c = tl.load(COS + b * stride_cb + t * stride_cs + cols * stride_cd, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(SIN + b * stride_sb + t * stride_ss + cols * stride_sd, mask=rot, other=0.0).to(tl.float32)
    s = tl.where(first, -s, s)  # rotate(x)[i] * sin[i] == sign_i * x[partner_i] * sin[i]
    cq, sq, ck, sk = c, s, c, s
    if XPOS:
        power = tl.load(POS + b * stride_pb + t * stride_ps).to(tl.float32) / xpos_base
        zeta = (2.0 * pair.to(tl.float32) + 0.4 * rotary_dim) / (1.4 * rotary_dim)
        up = tl.exp2(power * tl.log2(zeta))
        cq, sq, ck, sk = c * up, s * up, c / up, s / up
    _rotate_heads(
        Q, QO, b * stride_qb + t * stride_qs, pid * num_q_heads * head_dim, stride_qh, stride_qd,
        num_q_heads, head_dim, cols, partner, rot, cq, sq, BLOCK_HQ,
    )  # fmt: skip
    _rotate_heads(
        K, KO, b * stride_kb + t * stride_ks, pid * num_k_heads * head_dim, stride_kh, stride_kd,
        num_k_heads, head_dim, cols, partner, rot, ck, sk, BLOCK_HK,
    )  # fmt: skip


def _batch_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a [B or 1, ...] tensor with the batch stride zeroed when it broadcasts."""
    return (0 if t.shape[0] == 1 else t.stride(0), *t.stride()[1:])


@register("apply_rotary", "triton")
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
    """Triton rotary (see :func:`optimum_atb.ops.apply_rotary`); returns new (q_rot, k_rot)."""
    batch, seqlen, hq, dim = q.shape
    hk = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q_out.numel() == 0 and k_out.numel() == 0:
        return q_out, k_out
    xpos = xpos_scale_base is not None
    pos = positions if xpos else q
    pos_strides = _batch_strides(positions) if xpos else (0, 0)
    _rotary_kernel[(batch * seqlen,)](
        q, k, q_out, k_out, cos, sin, pos, *q.stride(), *k.stride(), *_batch_strides(cos),
        *_batch_strides(sin), *pos_strides, seqlen, hq, hk, dim, rotary_dim, xpos_scale_base or 1.0,
        INTERLEAVED=interleaved, XPOS=xpos, BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HK=triton.next_power_of_2(hk), BLOCK_D=pow2(dim, 1),
    )  # fmt: skip
    return q_out, k_out
