"""``reshape_and_cache`` in Triton: one program per token copies its [Hkv, D] keys and values into the pool."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register
from ._common import cast, pow2


@triton.jit
def _cache_write_kernel(
    K, V, KC, VC, SLOTS,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_kcn, stride_kcb, stride_kch, stride_kcd, stride_vcn, stride_vcb, stride_vch, stride_vcd,
    stride_s, num_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t * stride_s).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // block_size
    offset = slot % block_size
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < num_heads) & (offs_d < head_dim)
    k = tl.load(K + t * stride_kt + offs_h * stride_kh + offs_d * stride_kd, mask=mask)
    v = tl.load(V + t * stride_vt + offs_h * stride_vh + offs_d * stride_vd, mask=mask)
    kc = KC + block * stride_kcn + offset * stride_kcb + offs_h * stride_kch + offs_d * stride_kcd
    vc = VC + block * stride_vcn + offset * stride_vcb + offs_h * stride_vch + offs_d * stride_vcd
    tl.store(kc, cast(k, KC.dtype.element_ty), mask=mask)
    tl.store(vc, cast(v, VC.dtype.element_ty), mask=mask)


@register("reshape_and_cache", "triton")
def reshape_and_cache(
    *,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k/v [T, Hkv, D] into the pools at ``slot_mapping`` (slots < 0 skipped), in place."""
    tokens, heads, dim = k.shape
    if tokens == 0:
        return
    _cache_write_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping, *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        slot_mapping.stride(0), heads, dim, k_cache.shape[1], BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=pow2(dim, 1),
    )  # fmt: skip
