"""`QuantLinear`: a weight-only quantized replacement for `nn.Linear` (W8A16 / W4A16).

The module holds the device-neutral format of :mod:`.formats` as buffers named ``weight``,
``weight_scale`` and (int4) ``weight_zero``: that is what ``state_dict``/``save_pretrained`` write and
what transformers' loader fills in. On the first forward on a device, the backend chosen for it
(:mod:`optimum_atb.backends`) repacks the buffers into its kernel's layout; that copy is cached on the
module until the buffers move or change.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backends import resolve
from ..kernels.dispatch import get_kernel
from .formats import dequantize, quantize_int4, quantize_int8


class QuantLinear(nn.Module):
    """``y = x @ dequant(weight).T + bias`` with int8 (per-channel) or int4 (group-wise) weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n, k = out_features, in_features
        if bits == 8:
            self.register_buffer("weight", torch.zeros(n, k, dtype=torch.int8, device=device))
            scale_shape = (n,) if group_size is None else (n, k // group_size)
            self.register_buffer("weight_scale", torch.zeros(scale_shape, dtype=torch.float32, device=device))
            self.weight_zero = None
        else:
            self.register_buffer("weight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.zeros(n, k // group_size, device=device))
            self.register_buffer("weight_zero", torch.zeros(n, k // group_size, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self._prepared: dict = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None) -> QuantLinear:
        """Quantize `linear`'s weight over groups of `group_size` input columns (int8 with None: per
        output channel)."""
        w = linear.weight
        qlayer = cls(
            linear.in_features, linear.out_features, bits, group_size,
            bias=linear.bias is not None, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        qlayer.set_quantized(*quantize_weight(w, bits, group_size))
        if linear.bias is not None:
            qlayer.bias.data.copy_(linear.bias.detach())
        return qlayer

    @torch.no_grad()
    def set_quantized(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Replace the stored weight (formats as in :mod:`.formats`)."""
        self.weight = qweight.contiguous()
        self.weight_scale = scale.float().contiguous()
        if zero is not None:
            self.weight_zero = zero.float().contiguous()
        self._prepared = {}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this layer computes with (before any activation rounding)."""
        return dequantize(self.weight, self.weight_scale, self.weight_zero, self.bits, self.group_size, dtype)

    def _apply(self, fn, recurse=True):
        self._prepared = {}  # buffers may move or change dtype: repack lazily on the next forward
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepared = {}  # loading copies into the buffers in place: the kernel layouts would be stale
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = resolve(x.device)
        state = self._prepared.get(backend)
        # Inside a compiled graph the staleness check is left out: it would make torch.compile guard that
        # the buffer and the prepared state hold one tensor (a Python guard per layer on every call);
        # generate's eager prefill repacks a replaced weight before any compiled decode step runs.
        if state is None or (not torch.compiler.is_compiling() and state["source"] is not self.weight):
            state = get_kernel("weight_quant_prepare", backend)(
                qweight=self.weight, scale=self.weight_scale, zero=self.weight_zero,
                bits=self.bits, group_size=self.group_size,
            )  # fmt: skip
            state["source"] = self.weight
            self._prepared[backend] = state
        return get_kernel("weight_quant_matmul", backend)(x=x, state=state, bias=self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


ROWS_PER_CHUNK = 8192  # output channels quantized at a time: bounds the float temporaries (see below)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None):
    """(qweight, scale, zero or None) of a float weight [N, K].

    Every format here is per output channel (row), so rows are quantized `ROWS_PER_CHUNK` at a time with
    identical results: the float temporary of a large layer (SmolLM2's output projection: 49,152 x 576,
    113 MiB in fp32) stays ~19 MiB instead of adding to the peak memory of an in-place quantization.
    """
    quantize = quantize_int4 if bits == 4 else quantize_int8
    parts = [quantize(w[i : i + ROWS_PER_CHUNK], group_size) for i in range(0, w.shape[0], ROWS_PER_CHUNK)]
    out = parts[0] if len(parts) == 1 else tuple(torch.cat(pieces) for pieces in zip(*parts))
    return out if bits == 4 else (*out, None)
