"""RMSNorm and LayerNorm in Triton, one program per row, optionally fused with the residual add.

Numerics follow the torch backend: the residual sum is rounded to the activations' dtype (as the model's
own ``x + residual``), statistics are float32, and RMSNorm without offset rounds the normalised row to the
input dtype before the weight multiply (``LlamaRMSNorm``), with an offset multiplies ``offset + w`` in
float32 (Gemma).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register
from ._common import cast, interpreted


@triton.jit
def _load_row(X, R, H, row, stride_x, stride_r, stride_h, cols, mask, HAS_RES: tl.constexpr):
    """The row as float32; with a residual, stores the (rounded) sum x + r to H first."""
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = cast(x + r, H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit
def _rms_norm_kernel(
    X, R, H, W, Y, stride_x, stride_r, stride_h, stride_y, n_cols, eps, offset,
    HAS_RES: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = _load_row(X, R, H, row, stride_x, stride_r, stride_h, cols, mask, HAS_RES)
    xn = x * tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        y = xn * (offset + w)
    else:
        y = w * cast(xn, H.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, cast(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_kernel(
    X, R, H, W, B, Y, stride_x, stride_r, stride_h, stride_y, n_cols, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = _load_row(X, R, H, row, stride_x, stride_r, stride_h, cols, mask, HAS_RES)
    xc = tl.where(mask, x - tl.sum(x, 0) / n_cols, 0.0)
    y = xc * tl.math.rsqrt(tl.sum(xc * xc, 0) / n_cols + eps)
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, cast(y, Y.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as [rows, cols] with unit column stride (a copy only when needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _vector(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A contiguous weight/bias vector, or a placeholder pointer when absent (the kernel never reads it)."""
    return placeholder if t is None else t.contiguous()


def _prepare(x: torch.Tensor, residual: torch.Tensor | None):
    """(x2, r2, h, h2, launch kwargs): the row views and the residual-sum output (x itself without one)."""
    x2 = _rows(x)
    n = x2.shape[1]
    if residual is None:
        r2, h, h2 = x2, x, x2
    else:
        r2 = _rows(residual)
        h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        h2 = h.view(-1, n)
    block = triton.next_power_of_2(n)
    warps = 1 if interpreted() else min(max(block // 512, 1), 16)
    return x2, r2, h, h2, dict(BLOCK=block, num_warps=warps)


@register("rms_norm", "triton")
def rms_norm(
    *, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, offset: float
):
    """Triton RMSNorm (see :func:`optimum_atb.ops.rms_norm`)."""
    x2, r2, h, h2, launch = _prepare(x, residual)
    out_dtype = h.dtype if offset != 0.0 else torch.promote_types(weight.dtype, h.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, h2, weight.contiguous(), y, x2.stride(0), r2.stride(0), h2.stride(0), y.shape[-1], x2.shape[1],
            eps, offset, HAS_RES=residual is not None, HAS_OFFSET=offset != 0.0, **launch,
        )  # fmt: skip
    return y if residual is None else (y, h)


@register("layer_norm", "triton")
def layer_norm(
    *,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
):
    """Triton LayerNorm (see :func:`optimum_atb.ops.layer_norm`)."""
    x2, r2, h, h2, launch = _prepare(x, residual)
    y = torch.empty(x.shape, dtype=h.dtype, device=x.device)
    if x2.shape[0]:
        _layer_norm_kernel[(x2.shape[0],)](
            x2, r2, h2, _vector(weight, x2), _vector(bias, x2), y,
            x2.stride(0), r2.stride(0), h2.stride(0), y.shape[-1], x2.shape[1], eps,
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, **launch,
        )  # fmt: skip
    return y if residual is None else (y, h)
