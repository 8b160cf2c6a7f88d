"""Paged attention (decode and speculative verification) in Triton, split-K as vLLM's paged attention v2.

Grid (sequence, KV head, partition): one program serves every query head of its KV head and all Sq new
tokens (rows ``token * group + head``), so each K/V block of the pool is read once per partition. Keys are
gathered per token through ``block_tables`` (any block size). When a context spans several partitions of
``partition_size`` tokens, each program writes its partial max / sum / unnormalised output and a reduce
kernel merges them; with one partition the program writes the final output directly. The number of
partitions comes from ``block_tables.shape[1]`` (no device-to-host sync); partitions past a sequence's
context exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register
from ._common import attention_step, cast, dot_args, interpreted, pow2


@triton.jit
def _paged_kernel(
    Q, KC, VC, BT, CTX, SLOPES, O, PART_M, PART_L, PART_O,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kn, stride_kb, stride_kh, stride_kd,
    stride_vn, stride_vb, stride_vh, stride_vd,
    stride_btb, stride_ob, stride_os, stride_oh, stride_od,
    stride_ab, stride_ah,
    seqlen_q, group, head_dim, block_size, num_parts, scale, softcap, window,
    PARTITION: tl.constexpr, SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    part = tl.program_id(2)
    ctx = tl.load(CTX + b).to(tl.int32)
    part_lo = part * PARTITION
    if (part_lo >= ctx) & (part > 0):  # past this sequence (partition 0 always writes)
        return
    rows = tl.arange(0, ROWS)
    tok = rows // group
    head = kvh * group + rows % group
    row_ok = tok < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(
        Q
        + b * stride_qb
        + tok[:, None] * stride_qs
        + head[:, None] * stride_qh
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    pos = ctx - seqlen_q + tok
    slope = tl.zeros([ROWS, 1], tl.float32)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * stride_ab + head * stride_ah, mask=row_ok, other=0.0)[:, None]
    hi = tl.minimum(part_lo + PARTITION, ctx)
    lo = part_lo
    if HAS_WINDOW:
        first = tl.maximum(0, ctx - seqlen_q - window + 1)
        lo = tl.maximum(lo, (first // BLOCK_N) * BLOCK_N)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        block = tl.load(BT + b * stride_btb + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
        slot = offs_n % block_size
        k_t = tl.load(
            KC
            + block[None, :] * stride_kn
            + slot[None, :] * stride_kb
            + kvh * stride_kh
            + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            VC
            + block[:, None] * stride_vn
            + slot[:, None] * stride_vb
            + kvh * stride_vh
            + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        valid = row_ok[:, None] & n_ok[None, :]
        m_i, l_i, acc = attention_step(
            q, k_t, v, m_i, l_i, acc, pos, offs_n, valid, slope, scale, softcap, window,
            True, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, DOT_F32, PREC,
        )  # fmt: skip

    if SPLIT:
        base = ((b * tl.num_programs(1) + kvh) * num_parts + part) * ROWS
        tl.store(PART_M + base + rows, m_i)
        tl.store(PART_L + base + rows, l_i)
        tl.store(PART_O + (base + rows[:, None]) * BLOCK_D + offs_d[None, :], acc)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            O
            + b * stride_ob
            + tok[:, None] * stride_os
            + head[:, None] * stride_oh
            + offs_d[None, :] * stride_od,
            cast(out, O.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _paged_reduce_kernel(
    CTX, O, PART_M, PART_L, PART_O,
    stride_ob, stride_os, stride_oh, stride_od,
    seqlen_q, group, head_dim, num_parts,
    PARTITION: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Merge the partitions' (max, sum, unnormalised output) of one (sequence, KV head)."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    ctx = tl.load(CTX + b).to(tl.int32)
    used = tl.maximum(tl.cdiv(ctx, PARTITION), 1)
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for part in range(0, used):
        base = ((b * tl.num_programs(1) + kvh) * num_parts + part) * ROWS
        m_p = tl.load(PART_M + base + rows)
        m_new = tl.maximum(m, m_p)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_p - m_safe)
        l = l * alpha + tl.load(PART_L + base + rows) * beta
        acc = (
            acc * alpha[:, None]
            + tl.load(PART_O + (base + rows[:, None]) * BLOCK_D + offs_d[None, :]) * beta[:, None]
        )
        m = m_new
    out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    tok = rows // group
    head = kvh * group + rows % group
    tl.store(
        O
        + b * stride_ob
        + tok[:, None] * stride_os
        + head[:, None] * stride_oh
        + offs_d[None, :] * stride_od,
        cast(out, O.dtype.element_ty),
        mask=(tok < seqlen_q)[:, None] & (offs_d < head_dim)[None, :],
    )


def paged_attention_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    partition_size: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launch the paged kernels; ``partition_size`` (a multiple of the key tile) sets the split-K grain."""
    batch, sq, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    block_size = k_cache.shape[1]
    bn = block_n or (16 if interpreted() else 64)
    partition = partition_size or 512
    if partition % bn:
        raise ValueError(f"partition_size ({partition}) must be a multiple of the key tile ({bn})")
    max_context = block_tables.shape[1] * block_size
    num_parts = max(triton.cdiv(max_context, partition), 1)
    split = num_parts > 1
    rows = pow2(sq * group)
    bd = pow2(d)
    out = torch.empty(batch, sq, hq, d, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32)
        as_ = (0, slopes.stride(0)) if slopes.dim() == 1 else slopes.stride()
    else:
        slopes, as_ = q, (0, 0)
    if split:
        part_m = torch.empty(batch, hkv, num_parts, rows, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_o = torch.empty(batch, hkv, num_parts, rows, bd, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_o = out  # unused
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    dot_f32, prec = dot_args(q.dtype)
    warps = 1 if interpreted() else 4
    _paged_kernel[(batch, hkv, num_parts)](
        q, k_cache, v_cache, bt, context_lens, slopes, out, part_m, part_l, part_o,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), bt.stride(0), *out.stride(), *as_,
        sq, group, d, block_size, num_parts, scale, softcap or 0.0, sliding_window or 0,
        PARTITION=partition, SPLIT=split, HAS_WINDOW=sliding_window is not None,
        HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap is not None,
        ROWS=rows, BLOCK_N=bn, BLOCK_D=bd, DOT_F32=dot_f32, PREC=prec, num_warps=warps,
    )  # fmt: skip
    if split:
        _paged_reduce_kernel[(batch, hkv)](
            context_lens, out, part_m, part_l, part_o, *out.stride(),
            sq, group, d, num_parts, PARTITION=partition, ROWS=rows, BLOCK_D=bd, num_warps=warps,
        )  # fmt: skip
    return out


@register("paged_attention", "triton")
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
    """Triton paged attention (see :func:`optimum_atb.ops.paged_attention`)."""
    return paged_attention_forward(
        q, k_cache, v_cache, block_tables, context_lens, scale=scale, sliding_window=sliding_window,
        alibi_slopes=alibi_slopes, softcap=softcap,
    )  # fmt: skip
