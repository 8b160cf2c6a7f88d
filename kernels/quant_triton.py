"""Matmuls on the triton backend: dense through ``F.linear`` (cuBLAS); W8A16 / W4A16 in Triton, dequantization fused into the K loop (CUDA; tested in the interpreter).

Reads the neutral format of `optimum_atb.quantization.formats` directly (no repacking):
int8 [N, K] with per-channel or per-group scales; int4 nibbles [N, K/2] with per-group scale and zero.
Each program computes a [BLOCK_M, BLOCK_N] tile of ``x @ dequant(W).T``, accumulating in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimum_atb.kernels.dispatch import register


@triton.jit
def _wq_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, GROUPS,
    stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
            q = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0).to(tl.float32)
        else:
            byte = tl.load(w_ptr + rn[:, None] * (K // 2) + (rk[None, :] // 2), mask=wmask, other=0).to(
                tl.int32
            )
            q = ((byte >> ((rk[None, :] % 2) * 4)) & 0xF).to(tl.float32) - 8.0
        if PER_GROUP:
            sidx = rn[:, None] * GROUPS + rk[None, :] // GROUP
            w = q * tl.load(s_ptr + sidx, mask=wmask, other=0.0)
            if BITS == 4:
                w += tl.load(z_ptr + sidx, mask=wmask, other=0.0)
        else:
            w = q * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[:, None]
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@register("weight_quant_prepare", "triton")
def prepare(*, qweight, scale, zero, bits, group_size) -> dict:
    """The kernel reads the neutral format as is."""
    return {
        "weight": qweight.contiguous(), "scale": scale.float().contiguous(),
        "zero": None if zero is None else zero.float().contiguous(), "bits": bits, "group_size": group_size,
    }  # fmt: skip


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
    block_k = min(64, triton.next_power_of_2(k))
    grid = (triton.cdiv(m, 16), triton.cdiv(n, 32))
    _wq_matmul_kernel[grid](
        x2, w, state["scale"], state["zero"] if state["zero"] is not None else state["scale"], y,
        m, n, k, k // group if per_group else 1, x2.stride(0), y.stride(0),
        BITS=bits, GROUP=group or 1, PER_GROUP=per_group, BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k,
    )  # fmt: skip
    y = y.to(x.dtype).reshape(*x.shape[:-1], n)
    return y if bias is None else y + bias.to(x.dtype)


@register("linear", "triton")
def linear(*, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dense matmul: ``F.linear`` (cuBLAS)."""
    return torch.nn.functional.linear(x, weight, bias)
