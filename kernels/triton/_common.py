"""Helpers shared by the Triton kernels: launch-time constants and small jitted math functions."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pow2(n: int, minimum: int = 16) -> int:
    """The next power of two >= max(n, minimum) (tile sizes; ``tl.dot`` needs >= 16)."""
    return max(triton.next_power_of_2(int(n)), minimum)


def dot_args(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, PRECISION) constexprs for ``tl.dot`` on `dtype` inputs.

    The interpreter computes bf16 ``tl.dot`` wrongly (numpy has no bf16), so there the operands are
    upcast to fp32 after rounding to bf16; on a GPU bf16/fp16 run natively on tensor cores. fp32 inputs
    use IEEE precision (not TF32) so fp32 results match the float64 reference tightly.
    """
    return interpreted() and dtype == torch.bfloat16, "ieee" if dtype == torch.float32 else "tf32"


# The interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest even): see `cast`.
INTERPRETER = tl.constexpr(interpreted())


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even for bf16 also in the interpreter (which truncates)."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tanh(x):
    """tanh from exp (no libdevice, so it also runs in the interpreter); stable for large |x|."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def attention_step(
    q, k_t, v, m_i, l_i, acc, pos, offs_n, valid, slope, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One K/V tile of online softmax (base 2), in the masking conventions of ``optimum_atb.ops``.

    q [M, D], k_t [D, N], v [N, D]; pos [M] absolute query positions; offs_n [N] key positions; valid
    [M, N] keys that exist and pass the explicit mask; slope: scalar or [M, 1]. Returns (m_i, l_i, acc)
    with m_i in log2 units; rows that see no key keep m_i = -inf, l_i = 0, acc = 0.
    """
    if DOT_F32:
        q = q.to(tl.float32)
        k_t = k_t.to(tl.float32)
    s = tl.dot(q, k_t, input_precision=PREC) * scale
    if HAS_SOFTCAP:
        s = softcap * tanh(s / softcap)
    if HAS_ALIBI:
        s = s - slope * tl.abs(pos[:, None] - offs_n[None, :]).to(tl.float32)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= pos[:, None])
    if HAS_WINDOW:
        valid = valid & (offs_n[None, :] > pos[:, None] - window)
    s = tl.where(valid, s * 1.4426950408889634, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = cast(p, v.dtype)
    if DOT_F32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
    return m_new, l_i, acc
