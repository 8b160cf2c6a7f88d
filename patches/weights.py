"""Concatenated projections that share memory with the checkpoint's own parameters.

``fuse_linears`` allocates one weight (and bias) for several ``nn.Linear`` with the same input, and
re-points each original parameter to a view into it: no memory is duplicated, the originals keep their
names and shapes, and loading into them writes the fused weight. Quantized layers (``QuantLinear`` of one
format) are fused the same way, over their quantized buffers (codes, scales, zeros). A state-dict hook
hides the fused module and clones the views (safetensors refuses tensors sharing storage); a load pre-hook
fills the fused keys from the originals. ``unfuse_linears`` gives the originals tensors of their own.
"""

from __future__ import annotations

import torch
from torch import nn


def _concat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    if any(t is None for t in tensors):
        return None
    return torch.cat([t.detach() for t in tensors], dim=0)


QUANT_TENSORS = ("weight", "weight_scale", "weight_zero")  # QuantLinear buffers, concatenated along N


def can_fuse(linears: list[nn.Module]) -> bool:
    """True when `linears` are all plain ``nn.Linear`` of one input size and bias presence, or all
    ``QuantLinear`` of one format (bits, group size, input size, bias presence)."""
    from optimum_atb.quantization.linear import QuantLinear

    first = linears[0]
    if type(first) not in (nn.Linear, QuantLinear) or any(type(m) is not type(first) for m in linears):
        return False
    same = ("in_features",) + (("bits", "group_size") if type(first) is QuantLinear else ())
    return all(
        all(getattr(m, a) == getattr(first, a) for a in same) and (m.bias is None) == (first.bias is None)
        for m in linears
    )


def _fused_quant_linear(linears: list[nn.Module]) -> nn.Module:
    from optimum_atb.quantization.linear import QuantLinear

    first = linears[0]
    tensors = [_concat([getattr(m, name) for m in linears]) for name in QUANT_TENSORS]
    fused = QuantLinear(
        first.in_features, tensors[0].shape[0], first.bits, first.group_size,
        bias=first.bias is not None, device="meta",
    )  # fmt: skip
    fused.set_quantized(*tensors)
    return fused


def fuse_linears(parent: nn.Module, parts: tuple[str, ...], fused_name: str) -> list:
    """Add ``parent.<fused_name>``: one linear layer (``nn.Linear`` or ``QuantLinear``, as the parts are;
    see `can_fuse`) over the concatenated outputs of ``parent.<parts>``.

    Returns the hook handles to remove on revert.
    """
    linears = [getattr(parent, name) for name in parts]
    quantized = type(linears[0]) is not nn.Linear
    names = QUANT_TENSORS if quantized else ("weight",)
    bias = _concat([m.bias for m in linears])
    if quantized:
        fused = _fused_quant_linear(linears)
    else:
        weight = _concat([m.weight for m in linears])
        with torch.device("meta"):
            fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        fused.weight = nn.Parameter(weight, requires_grad=linears[0].weight.requires_grad)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=linears[0].bias.requires_grad)
    offset = 0
    for m in linears:
        rows = slice(offset, offset + m.out_features)
        if quantized:  # views of the fused buffers; also drops the parts' kernel layouts (no longer called)
            m.set_quantized(*(None if t is None else t[rows] for t in (getattr(fused, n) for n in names)))
        else:
            m.weight = nn.Parameter(weight[rows], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[rows], requires_grad=m.bias.requires_grad)
        offset += m.out_features
    parent.add_module(fused_name, fused)
    suffixes = (*names, "bias")

    def save_hook(module, state_dict, prefix, local_metadata):
        for suffix in suffixes:
            state_dict.pop(f"{prefix}{fused_name}.{suffix}", None)
            for name in parts:
                key = f"{prefix}{name}.{suffix}"
                if key in state_dict:
                    state_dict[key] = state_dict[key].clone()

    def load_hook(module, state_dict, prefix, *args):
        for suffix in suffixes:
            keys = [f"{prefix}{name}.{suffix}" for name in parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fused_name}.{suffix}"] = torch.cat([state_dict[k] for k in keys])

    return [
        parent.register_state_dict_post_hook(save_hook),
        parent.register_load_state_dict_pre_hook(load_hook),
    ]


def unfuse_linears(parent: nn.Module, parts: tuple[str, ...], fused_name: str) -> None:
    """Give ``parent.<parts>`` parameters (quantized buffers) of their own again and drop the fused
    module."""
    for name in parts:
        m = getattr(parent, name)
        if type(m) is nn.Linear:
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
        else:
            m.set_quantized(
                *(None if t is None else t.clone() for t in (getattr(m, n) for n in QUANT_TENSORS))
            )
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    delattr(parent, fused_name)
