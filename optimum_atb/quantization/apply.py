"""`quantize(model, bits=..., group_size=...)`: swap a model's `nn.Linear` layers for `QuantLinear`."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QuantizationError
from .config import check_request
from .linear import QuantLinear


def is_quantized_by_us(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def check_not_quantized(model: nn.Module) -> None:
    """Raise when `model` already carries quantized weights (a GGUF-dequantized float model is fine)."""
    if is_quantized_by_us(model):
        raise QuantizationError(
            "this model is already quantized by optimum-atb; quantize the float model instead."
        )
    hf_quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(hf_quantizer, "quantization_config", None), "quant_method", None)
    if hf_quantizer is not None and str(getattr(method, "value", method)) != "gguf":
        raise QuantizationError(
            f"this model is already quantized ({method}); load it unquantized to quantize it with optimum-atb."
        )


def linears_to_quantize(
    model: nn.Module, include_lm_head: bool = False, skip: list[str] | tuple[str, ...] = ()
) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every `nn.Linear` that quantization replaces, in module order."""
    head = (
        None
        if include_lm_head or not hasattr(model, "get_output_embeddings")
        else model.get_output_embeddings()
    )
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is head:
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        chosen.append((name, module))
    return chosen


def check_group_divides(layers: list[tuple[str, nn.Linear]], bits: int, group_size: int | None) -> None:
    for name, layer in layers:
        if bits == 4 and layer.in_features % group_size:
            raise QuantizationError(
                f"group_size={group_size} does not divide in_features={layer.in_features} of '{name}'; "
                "choose a group size that divides it, or skip that layer (modules_to_not_convert)."
            )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def quantize(
    model: nn.Module,
    bits: int = 8,
    group_size: int | None = None,
    include_lm_head: bool = False,
    modules_to_not_convert: list[str] | None = None,
) -> nn.Module:
    """Quantize `model`'s linear layers in place (weights only) and return it.

    int8: per output channel, symmetric. int4: groups of `group_size` (default 32) input features,
    asymmetric. The output projection stays in float unless `include_lm_head`. Raises
    :class:`~optimum_atb.errors.QuantizationError` (before changing anything) for unsupported bits or
    group size, a group size that does not divide a layer's input features, or an already quantized model.
    On CPU the quantized layers compute in bfloat16 (see docs/quantization.md).
    """
    from .hf_quantizer import attach_config

    group_size = check_request(bits, group_size)
    check_not_quantized(model)
    skip = list(modules_to_not_convert or [])
    layers = linears_to_quantize(model, include_lm_head, skip)
    if not layers:
        raise QuantizationError("the model has no nn.Linear layer to quantize.")
    check_group_divides(layers, bits, group_size)
    for name, layer in layers:
        replace_module(model, name, QuantLinear.from_linear(layer, bits, group_size))
    attach_config(model, bits, group_size, include_lm_head, skip)
    return model
