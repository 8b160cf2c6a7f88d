"""SwiGLU and GeGLU in Triton: ``act(gate) * up`` over rows, from two tensors or one ``cat(gate, up)``.

Computed in float32 and rounded once to the output dtype (the model's unfused ``act(g) * u`` rounds twice,
which is within the per-dtype tolerances of the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register
from ._common import cast, interpreted, tanh


@triton.jit
def _glu_kernel(
    G, U, Y, stride_g, stride_u, n_cols,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == "silu":
        a = g / (1.0 + tl.exp(-g))
    elif ACT == "gelu_tanh":
        a = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    tl.store(Y + row * n_cols + cols, cast(a * u, Y.dtype.element_ty), mask=mask)


def _glu(gate: torch.Tensor, up: torch.Tensor | None, act: str) -> torch.Tensor:
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    n = gate.shape[-1]
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    rows = g2.shape[0]
    if rows and n:
        block = min(triton.next_power_of_2(n), 1024)
        _glu_kernel[(rows, triton.cdiv(n, block))](
            g2, u2, out, g2.stride(0), u2.stride(0), n, ACT=act, BLOCK=block,
            num_warps=1 if interpreted() else 4,
        )  # fmt: skip
    return out


@register("swiglu", "triton")
def swiglu(*, gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    """Triton ``silu(gate) * up`` (see :func:`optimum_atb.ops.swiglu`)."""
    return _glu(gate, up, "silu")


@register("geglu", "triton")
def geglu(*, gate: torch.Tensor, up: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """Triton ``gelu(gate, approximate) * up`` (see :func:`optimum_atb.ops.geglu`)."""
    return _glu(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
