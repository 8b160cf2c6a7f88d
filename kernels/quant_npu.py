"""Weight-only quantized matmul on Ascend NPUs: ``torch_npu.npu_weight_quant_batchmatmul``.

The operator computes ``x @ ((weight + antiquant_offset) * antiquant_scale)`` with weight [K, N]
(int8, or int4 packed eight to an int32 by ``npu_convert_weight_to_int4pack``), scales and offsets in x's
dtype, [N] per channel or [K/group, N] per group. Our int4 format ``(q - 8) * scale + zero`` maps to
signed values ``q - 8`` with ``offset = zero / scale``. x must be fp16/bf16: fp32 activations are cast
to bf16 and the output back, as on CPU.
"""

from __future__ import annotations

import torch

from optimum_atb.kernels.dispatch import register
from optimum_atb.quantization.formats import unpack_int4


@register("weight_quant_prepare", "npu")
def prepare(*, qweight, scale, zero, bits, group_size) -> dict:
    """Transpose/pack the weight once; scales stay float32 until the activation dtype is known."""
    import torch_npu

    if bits == 8:
        weight = qweight.t().contiguous()
        offset = None
    else:
        signed = (unpack_int4(qweight) - 8).t().contiguous()
        weight = torch_npu.npu_convert_weight_to_int4pack(signed)
        offset = (zero / scale).t().contiguous()
    scale = scale.t().contiguous() if scale.dim() == 2 else scale
    return {"weight": weight, "scale": scale, "offset": offset, "group_size": group_size or 0, "by_dtype": {}}


@register("weight_quant_matmul", "npu")
def weight_quant_matmul(*, x: torch.Tensor, state: dict, bias: torch.Tensor | None) -> torch.Tensor:
    import torch_npu

    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    cast = state["by_dtype"].get(dtype)
    if cast is None:
        offset = state["offset"]
        cast = state["by_dtype"][dtype] = (
            state["scale"].to(dtype),
            None if offset is None else offset.to(dtype),
        )
    shape = x.shape
    y = torch_npu.npu_weight_quant_batchmatmul(
        x.reshape(-1, shape[-1]).to(dtype), state["weight"], cast[0], cast[1],
        bias=None if bias is None else bias.to(dtype), antiquant_group_size=state["group_size"],
    )  # fmt: skip
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


@register("linear", "npu")
def linear(*, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dense matmul: ``F.linear`` (the NPU matmul)."""
    return torch.nn.functional.linear(x, weight, bias)
