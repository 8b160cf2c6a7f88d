"""Device-neutral storage formats of quantized weights, and the float64 dequantization that defines them.

int8: ``qweight`` int8 [N, K], symmetric, ``w = qweight * scale[n]`` per output channel or
``w = qweight * scale[n, k // g]`` per group of ``g`` input columns (GGUF Q8_0: g = 32); see
:func:`quantize_int8`.
int4: ``qweight`` uint8 [N, K/2] (column ``2j`` in the low nibble of byte ``j``, ``2j+1`` in the high one),
unsigned codes ``q`` in 0..15, group-wise asymmetric over ``group_size`` input columns:
``w = (q - 8) * scale[n, k // g] + zero[n, k // g]`` -- the scale-and-zero convention of torch's int4pack
kernels, which also represents GGUF Q4_0 (``zero = 0``) and Q4_1 (``w = d*q + m``: ``zero = m + 8d``) exactly.
Scales and zeros are stored in float32. Backend kernels repack these tensors into their own layouts.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4pack kernel accepts (int8 groups run on it too)
DEFAULT_GROUP_SIZE = 32


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, K] (any integer dtype, K even) -> uint8 [N, K/2], low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int32 codes 0..15 [N, K]."""
    lo = (packed & 0xF).to(torch.int32)
    hi = (packed >> 4).to(torch.int32)
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest bfloat16 value (kept in float32): the CPU and NPU kernels take scales in the
    activation dtype, so choosing bf16-representable scales keeps stored and computed weights identical."""
    return t.to(torch.bfloat16).float()


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, per output channel (scale float32 [N]) or per group of `group_size` input columns
    (scale [N, K/g]): returns (qweight int8 [N, K], scale)."""
    w = w.detach().float()
    n, k = w.shape
    groups = w.reshape(n, 1 if group_size is None else k // group_size, -1)
    absmax = torch.linalg.vector_norm(groups, ord=float("inf"), dim=-1)  # max |w| without an |w| copy
    scale = _bf16_exact(absmax.clamp(min=1e-12) / 127.0)
    q = (groups / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8).reshape(n, k)  # one temporary
    return q, scale[:, 0] if group_size is None else scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric (min/max) int4: returns (qweight uint8 [N, K/2], scale, zero float32 [N, K/g])."""
    w = w.detach().float()
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    lo = groups.amin(dim=-1)
    hi = groups.amax(dim=-1)
    scale = _bf16_exact(((hi - lo) / 15.0).clamp(min=1e-12))
    zero = _bf16_exact(lo + 8.0 * scale)
    q = (groups - zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15).reshape(n, k)
    return pack_int4(q), scale, zero


def dequantize(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The float weight [N, K] a quantized layer stands for (the oracle of every kernel test)."""
    if bits == 8:
        s = scale.to(dtype)
        s = s[:, None] if s.dim() == 1 else s.repeat_interleave(group_size, dim=1)
        return qweight.to(dtype) * s
    q = unpack_int4(qweight).to(dtype)
    s = scale.to(dtype).repeat_interleave(group_size, dim=1)
    z = zero.to(dtype).repeat_interleave(group_size, dim=1)
    return (q - 8) * s + z
