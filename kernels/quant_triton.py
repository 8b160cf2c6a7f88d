"""Matmuls on the triton backend: dense through ``F.linear`` (cuBLAS); W8A16 / W4A16 in Triton (CUDA;
tested in the interpreter).

Reads the neutral format of `optimum_atb.quantization.formats` directly (no repacking): int8 [N, K] with
per-channel or per-group scales; int4 nibbles [N, K/2] with per-group scale and zero. Each program
computes a [BLOCK_M, BLOCK_N] tile of ``x @ dequant(W).T`` in float32. The weights are never rounded to
the activations' dtype: ``tl.dot`` multiplies the activations by the integer codes (exact in fp16/bf16:
int8 codes are at most 128 in magnitude, int4 codes ``q - 8`` lie in -8..7), and each K block's partial
sum is scaled afterwards, ``sum_k x q s = s sum_k x q``, with int4's zero as ``z sum_k x`` (one scale and
zero per group, every K block lies inside one group). fp32 activations use IEEE products, not TF32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimum_atb.kernels.dispatch import register
from optimum_atb.kernels.triton._common import dot_args, pow2


@triton.jit
def _wq_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, GROUPS,
    stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        wmask = n_ok[:, None] & k_ok[None, :]
        if BITS == 8:
            q = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0)
        else:
            byte = tl.load(w_ptr + rn[:, None] * (K // 2) + (rk[None, :] // 2), mask=wmask, other=0x88)
            q = ((byte.to(tl.int32) >> ((rk[None, :] % 2) * 4)) & 0xF) - 8
        if DOT_F32:  # the interpreter has no bf16 matmul: integer codes and bf16 values are exact in fp32
            part = tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision=PREC)
        else:
            part = tl.dot(x, tl.trans(q.to(x.dtype)), input_precision=PREC)
        if PER_GROUP:
            sidx = rn * GROUPS + k0 // GROUP
            acc += part * tl.load(s_ptr + sidx, mask=n_ok, other=0.0)[None, :]
            if BITS == 4:
                row_sum = tl.sum(x.to(tl.float32), 1)
                acc += row_sum[:, None] * tl.load(z_ptr + sidx, mask=n_ok, other=0.0)[None, :]
        else:
            acc += part
    if not PER_GROUP:
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@register("weight_quant_prepare", "triton")
def prepare(*, qweight, scale, zero, bits, group_size) -> dict:
    """The kernel reads the neutral format as is."""
    return {
        "weight": qweight.contiguous(), "scale": scale.float().contiguous(),
        "zero": None if zero is None else zero.float().contiguous(), "bits": bits, "group_size": group_size,
    }  # fmt: skip


def tile_sizes(m: int, k: int, group_size: int | None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for `m` activation rows: decode-sized tiles for a few rows, wider
    ones for prefill; a K block never straddles two groups (it divides the group size)."""
    block_m = min(pow2(m), 64)
    block_n = 32 if m <= 16 else 64
    block_k = min(64, pow2(k)) if group_size is None else min(64, group_size)
    return block_m, block_n, block_k


@register("weight_quant_matmul", "triton")
def weight_quant_matmul(*, x: torch.Tensor, state: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequant(W).T + bias``; float32 accumulation, output in x's dtype."""
    w, bits, group = state["weight"], state["bits"], state["group_size"]
    n = w.shape[0]
    k = w.shape[1] * (2 if bits == 4 else 1)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.float32)
    per_group = group is not None
    block_m, block_n, block_k = tile_sizes(m, k, group)
    dot_f32, prec = dot_args(x.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _wq_matmul_kernel[grid](
        x2, w, state["scale"], state["zero"] if state["zero"] is not None else state["scale"], y,
        m, n, k, k // group if per_group else 1, x2.stride(0), y.stride(0),
        BITS=bits, GROUP=group or 1, PER_GROUP=per_group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_F32=dot_f32, PREC=prec,
    )  # fmt: skip
    y = y.to(x.dtype).reshape(*x.shape[:-1], n)
    return y if bias is None else y + bias.to(x.dtype)


@register("linear", "triton")
def linear(*, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dense matmul: ``F.linear`` (cuBLAS)."""
    return torch.nn.functional.linear(x, weight, bias)
