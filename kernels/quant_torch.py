"""Weight-only quantized matmul on the torch backend (CPU: torch's packed int8/int4 kernels).

On CPU the activations are cast to bfloat16 for the packed kernels and the output back to the input
dtype: an fp32 model quantized here computes its linear layers in bf16 (int8 weights with fp32
activations are slower than plain fp32, so that path is never taken). Group-wise int8 (torch has no such
kernel) runs as two int4 kernels over the high and low nibbles of ``q + 128``: with ``s`` the group's
scale, ``q * s = 16 s (((q + 128) >> 4) - 8) + s (((q + 128) & 15) - 8) + 8 s``, both exact in bf16 for
a bf16 ``s``. Shapes or devices the packed kernels do not take fall back to dequantize-then-matmul, with
a one-time warning.

On a CPU with AVX-512, inside a ``torch.compile`` trace a single row of int8 (a batch-1 decode step) is
written as the dequantize-and-reduce ``sum(x * q) * s`` in float32 instead, over two halves of the output
channels so that inductor's loop keeps two independent sums (``ROW_REDUCE_SPLIT``): inductor fuses it into
one vectorised loop that reads the int8 weight faster than the packed kernel does there; with AVX2 only, the
loop inductor writes is about 3x slower than the packed kernel, which stays (``INT8_ROW_REDUCE``,
docs/results-cpu.md). Same weight; the activations of an fp32 model are then not rounded to bf16.

Many rows (a prefill) are slow in the packed kernels. On a CPU with bf16 arithmetic in hardware (AVX512-BF16
or AMX, ``NATIVE_BF16``), from ``INT8_BF16_ROWS`` rows per-channel int8 runs as a bf16 GEMM on its codes
(exact in bf16) with the scale after: the packed kernel's numerics (bf16 activations, one bf16 rounding of
each output) at a bf16 GEMM's speed; without it that GEMM is slower than the packed kernel and is never
taken. From ``INT8_DEQUANT_ROWS`` /
``INT4_DEQUANT_ROWS`` rows per-channel int8 and int4 compute with the exact weight in float32 and float32
activations through fp32 GEMM instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from optimum_atb.backends import warn_once
from optimum_atb.kernels.dispatch import register
from optimum_atb.quantization.formats import dequantize, unpack_int4

_KERNEL_DTYPE = torch.bfloat16
_ALIGN = 64  # bytes
# A compiled one-row int8 product as inductor's fused reduce instead of the packed kernel: in compiled
# SmolLM2, +13% tokens/s on one Intel Xeon with AVX-512 and +4-19% on another; 3.2x slower per matmul on an
# AMD EPYC with AVX2 only (404 against 127 us; the model 7 against 34 tokens/s). docs/results-cpu.md.
INT8_ROW_REDUCE = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
# Parts the output channels of that reduce are split into (independent accumulators in inductor's loop):
# one chain of dependent adds leaves the loop waiting on the add latency. int8+compile SmolLM2 on the second
# Xeon, the settings alternated in one process (medians of 4 generates): 55.0 / 51.5 tokens/s with one
# part, 65.8 / 63.2 with two, 66.1 with four. docs/results-cpu.md.
ROW_REDUCE_SPLIT = 2


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without either, oneDNN's bf16 GEMM converts to float32 on the way (on an Ice Lake
    Xeon 2.6-3.3x slower than fp32 `F.linear` at 64 rows; docs/quantization.md)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


# bf16 arithmetic in hardware decides the many-row routes below.
NATIVE_BF16 = _cpu_has_native_bf16()
# From these many rows (a long prefill, a perplexity evaluation) per-channel int8 and int4 use the exact
# weight in float32 and fp32 `F.linear` with float32 activations: closer to the float model than bf16
# activations (teacher-forced int8 perplexity on tests/data with the bf16 GEMM below at every row count:
# +1.08%, over the +1% bound, against +0.26% this way and -0.42% with the packed kernel; mean KL 0.0201,
# 0.0193 and 0.0212: the bf16 GEMM is no worse than the packed kernel, both are worse than float32).
# int8 as ``F.linear(x, q.float()) * s``; int4 dequantized group by group. Per 1536 x 576 weight on the
# second Xeon (AMX): int8 4,059 against 9,563 us (packed) at 512 rows; int4 1,775 against 2,179 at 128,
# 5,825 against 9,748 at 512 (1,483 against 1,089 at 64). On an Ice Lake Xeon (no bf16 in hardware) the
# seven int8 matmuls of a SmolLM2 layer: 3.2-4.4 ms this way against 4.3-6.0 packed at 64 rows, 3.2-4.4
# ms packed against 4.3-5.2 this way at 48 (session 20). docs/quantization.md.
INT8_DEQUANT_ROWS = 128 if NATIVE_BF16 else 64
INT4_DEQUANT_ROWS = 128
# From these many rows up to `INT8_DEQUANT_ROWS` the packed int8 kernel, whose time grows with the rows faster
# than a GEMM's, gives way to ``F.linear(x.bf16(), q.bf16()).float() * s``: the same bf16 activations and one
# bf16 rounding of each output, through oneDNN's bf16 GEMM. The four int8 matmuls of a SmolLM2 layer on the
# second Xeon (session 19): 599 against 727 us at 16 rows, 851 against 2,717 at 64 (the float32 route:
# 2,020). Only with bf16 in hardware: on the Ice Lake Xeon the seven matmuls of a layer took 3.2-3.5 ms this
# way against 1.1-1.5 packed at 16 rows, 8.6-10.0 against 4.3-6.0 at 64 (a 64-token prefill of the int8
# model at 0.33x stock fp32's speed), so there the packed kernel runs until the float32 route takes over.
INT8_BF16_ROWS = 16 if NATIVE_BF16 else INT8_DEQUANT_ROWS
# Output channels taken to float32 at a time on that route: bounds the copy of a large weight (an output
# projection of 128k x 4,096 would be 2 GiB in float32) to this many rows.
DEQUANT_CHUNK = 8192


def _packed_kernel_reason(qweight, bits, group_size, device) -> str | None:
    """None when torch's CPU packed kernel can run this layer, else why not."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    if device.type != "cpu":
        return f"torch has no packed {bits}-bit kernel wired up for {device.type} here"
    if k % 16:  # _weight_int8pack_mm crashes (segfault) for in_features % 16 != 0 in torch 2.13
        return f"in_features={k} is not a multiple of 16"
    if (bits == 4 or group_size is not None) and n % 16:
        return f"out_features={n} is not a multiple of 16"
    return None


@register("weight_quant_prepare", "torch")
def prepare(*, qweight, scale, zero, bits, group_size) -> dict:
    """Repack the neutral format for torch's kernels (see `optimum_atb.quantization.formats`)."""
    reason = _packed_kernel_reason(qweight, bits, group_size, qweight.device)
    if reason is not None:
        warn_once(
            f"quant-torch-fallback-{reason}",
            f"optimum-atb: {reason}; this quantized layer dequantizes its weight on every call (slower).",
        )
        return {"kind": "dequant", "args": (qweight, scale, zero, bits, group_size)}
    if bits == 8 and group_size is not None:
        codes = qweight.to(torch.int32) + 128  # 0..255
        s, zeros = scale.t(), torch.zeros_like(scale.t())
        halves = []
        for nibble, part_scale, part_zero in ((codes >> 4, 16 * s, zeros), (codes & 15, s, 8 * s)):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibble, 1)
            halves.append(
                (packed, torch.stack([part_scale, part_zero], dim=-1).to(_KERNEL_DTYPE).contiguous())
            )
        return {"kind": "int8_groups", "halves": halves, "group_size": group_size}
    if bits == 8:
        # _weight_int8pack_mm reads the weight with aligned vector loads for 16+ rows of activations and
        # crashes (segfault, torch 2.13) on a weight that is not 64-byte aligned, as buffers loaded from a
        # safetensors file can be: such a weight is copied once into fresh (aligned) memory.
        weight = qweight if qweight.data_ptr() % _ALIGN == 0 else qweight.clone()
        return {"kind": "int8", "weight": weight, "scale": scale.to(_KERNEL_DTYPE)}
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(qweight), 1)
    # [K/g, N, 2] scale-and-zero; the kernel computes (q - 8) * scale + zero
    scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(_KERNEL_DTYPE).contiguous()
    by_group = {"qweight": qweight, "scale": scale, "zero": zero}  # the stored format, for many-row calls
    return {
        "kind": "int4", "weight": packed, "scale_zero": scale_zero, "group_size": group_size, "by_group": by_group
    }  # fmt: skip


def _linear_by_chunks(
    x: torch.Tensor,
    n: int,
    weight_rows: Callable[[int, int], torch.Tensor],
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T`` (times a per-channel `scale`) in float32, `W` built `DEQUANT_CHUNK` output channels at a
    time by ``weight_rows(start, end)``."""
    parts = []
    for start in range(0, n, DEQUANT_CHUNK):
        end = min(start + DEQUANT_CHUNK, n)
        y = F.linear(x, weight_rows(start, end))
        parts.append(y if scale is None else y * scale[start:end])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _int4_linear_fp32(x: torch.Tensor, by_group: dict) -> torch.Tensor:
    """``x @ dequant(W).T`` in float32 with the exact weight. The weight is unpacked group by group as the
    low nibbles (even columns) then the high ones (odd columns), x's columns taken in the same order."""
    scale, zero = by_group["scale"], by_group["zero"]
    n, groups = scale.shape
    packed = by_group["qweight"].view(n, groups, -1)

    def weight_rows(start: int, end: int) -> torch.Tensor:
        part = packed[start:end]
        codes = torch.cat([part & 15, part >> 4], dim=-1).float()
        s, z = scale[start:end], zero[start:end]
        # (q - 8) * s + z as q * s + (z - 8 s): one pass less over the weight
        return codes.mul_(s[..., None]).add_((z - 8 * s)[..., None]).view(end - start, -1)

    rows, k = x.shape
    x = x.float().view(rows, groups, -1, 2).transpose(-1, -2).reshape(rows, k)
    return _linear_by_chunks(x, n, weight_rows)


def _int8_row_reduce(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One row x [1, K] times the int8 weight [N, K] and its scale [N], in float32, as a reduction
    inductor fuses (not for eager use: eagerly it would materialise the [N, K] products).

    The output channels are reduced in `ROW_REDUCE_SPLIT` equal parts: inductor fuses reductions of the same
    shape into one loop with one accumulator each, so the loop carries that many independent sums instead
    of one chain of dependent vector adds (see `ROW_REDUCE_SPLIT`)."""
    xf = x.float()
    n = weight.shape[0]
    parts = ROW_REDUCE_SPLIT if n % ROW_REDUCE_SPLIT == 0 else 1
    step = n // parts
    sums = [(xf * weight[i * step : (i + 1) * step].float()).sum(-1) for i in range(parts)]
    y = sums[0] if parts == 1 else torch.cat(sums, dim=-1)
    return (y * scale.float()).unsqueeze(0)


def _packed_matmul(x: torch.Tensor, state: dict) -> torch.Tensor:
    """x [rows, K] through torch's packed kernels (bf16 activations, cast here)."""
    x = x.to(_KERNEL_DTYPE)
    if state["kind"] == "int8":
        return torch.ops.aten._weight_int8pack_mm(x, state["weight"], state["scale"])
    if state["kind"] == "int8_groups":
        (hi, hi_sz), (lo, lo_sz) = state["halves"]
        group = state["group_size"]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, hi, group, hi_sz).float()
        return y.add_(torch.ops.aten._weight_int4pack_mm_for_cpu(x, lo, group, lo_sz))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, state["weight"], state["group_size"], state["scale_zero"]
    )


@register("weight_quant_matmul", "torch")
def weight_quant_matmul(*, x: torch.Tensor, state: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` in the layout `prepare` produced; output in x's dtype."""
    if state["kind"] == "dequant":
        w = dequantize(*state["args"], dtype=x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if state["kind"] == "int8" and flat.shape[0] == 1 and INT8_ROW_REDUCE and torch.compiler.is_compiling():
        y = _int8_row_reduce(flat, state["weight"], state["scale"])
    elif state["kind"] == "int8" and flat.shape[0] >= INT8_DEQUANT_ROWS:
        weight = state["weight"]
        y = _linear_by_chunks(flat.float(), weight.shape[0], lambda a, b: weight[a:b].float(), state["scale"])
    elif state["kind"] == "int8" and flat.shape[0] >= INT8_BF16_ROWS:
        weight, scale = state["weight"], state["scale"].float()  # a bf16 output times a float32 scale
        x_bf16 = flat.to(_KERNEL_DTYPE)
        y = _linear_by_chunks(x_bf16, weight.shape[0], lambda a, b: weight[a:b].to(_KERNEL_DTYPE), scale)
    elif state["kind"] == "int4" and flat.shape[0] >= INT4_DEQUANT_ROWS:
        y = _int4_linear_fp32(flat, state["by_group"])
    else:
        y = _packed_matmul(flat, state)
    y = y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])
    return y if bias is None else y + bias.to(x.dtype)
