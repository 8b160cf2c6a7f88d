"""Concatenated projections that share memory with the checkpoint's own parameters.

``fuse_linears`` allocates one weight (and bias) for several ``nn.Linear`` with the same input, and
re-points each original parameter to a view into it: no memory is duplicated, the originals keep their
names and shapes, and loading into them writes the fused weight. A state-dict hook hides the fused
module and clones the views (safetensors refuses tensors sharing storage); a load pre-hook fills the
fused keys from the originals. ``unfuse_linears`` gives the originals plain parameters of their own.
"""

from __future__ import annotations

import torch
from torch import nn


def _concat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    if any(t is None for t in tensors):
        return None
    return torch.cat([t.detach() for t in tensors], dim=0)


def fuse_linears(parent: nn.Module, parts: tuple[str, ...], fused_name: str) -> list:
    """Add ``parent.<fused_name>``: an ``nn.Linear`` over the concatenated outputs of ``parent.<parts>``.

    Returns the hook handles to remove on revert.
    """
    linears = [getattr(parent, name) for name in parts]
    weight, bias = _concat([m.weight for m in linears]), _concat([m.bias for m in linears])
    with torch.device("meta"):
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=linears[0].weight.requires_grad)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=linears[0].bias.requires_grad)
    offset = 0
    for m in linears:
        n = m.out_features
        m.weight = nn.Parameter(weight[offset : offset + n], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[offset : offset + n], requires_grad=m.bias.requires_grad)
        offset += n
    parent.add_module(fused_name, fused)

    def save_hook(module, state_dict, prefix, local_metadata):
        for suffix in ("weight", "bias"):
            state_dict.pop(f"{prefix}{fused_name}.{suffix}", None)
            for name in parts:
                key = f"{prefix}{name}.{suffix}"
                if key in state_dict:
                    state_dict[key] = state_dict[key].clone()

    def load_hook(module, state_dict, prefix, *args):
        for suffix in ("weight", "bias"):
            keys = [f"{prefix}{name}.{suffix}" for name in parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fused_name}.{suffix}"] = torch.cat([state_dict[k] for k in keys])

    return [
        parent.register_state_dict_post_hook(save_hook),
        parent.register_load_state_dict_pre_hook(load_hook),
    ]


def unfuse_linears(parent: nn.Module, parts: tuple[str, ...], fused_name: str) -> None:
    """Give ``parent.<parts>`` plain parameters of their own again and drop the fused module."""
    for name in parts:
        m = getattr(parent, name)
        m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    delattr(parent, fused_name)
