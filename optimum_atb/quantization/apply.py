"""`quantize(model, bits=..., group_size=...)`: swap a model's `nn.Linear` layers for `QuantLinear`."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch
from torch import nn

from ..convert import stock_class
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


HEAD_BITS = 8  # int4 on SmolLM2's output projection costs +8.7% perplexity, int8 +0.1% (docs/quantization.md)


class QuantTarget(NamedTuple):
    """One `nn.Linear` to replace, and the format it gets."""

    name: str
    layer: nn.Linear
    bits: int
    group_size: int | None


def output_projection(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def linears_to_quantize(
    model: nn.Module,
    bits: int,
    group_size: int | None,
    include_lm_head: bool = False,
    skip: list[str] | tuple[str, ...] = (),
) -> list[QuantTarget]:
    """Every `nn.Linear` that quantization replaces, in module order, with its format: (`bits`,
    `group_size`), except the output projection, which is always int8 per channel."""
    head = output_projection(model)
    chosen = []
    for name, module in model.named_modules():
        if stock_class(module) is not nn.Linear or (module is head and not include_lm_head):
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        fmt = (HEAD_BITS, None) if module is head else (bits, group_size)
        chosen.append(QuantTarget(name, module, *fmt))
    return chosen


def check_group_divides(targets: list[QuantTarget]) -> None:
    for name, layer, _, group_size in targets:
        if group_size is not None and layer.in_features % group_size:
            raise QuantizationError(
                f"group_size={group_size} does not divide in_features={layer.in_features} of '{name}'; "
                "choose a group size that divides it, or skip that layer (modules_to_not_convert)."
            )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def head_is_tied(model: nn.Module) -> bool:
    """True when the output projection shares its weight with the input embeddings."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False)) and hasattr(model, "get_output_embeddings")


def untie_output_embeddings(model: nn.Module) -> None:
    """Record that the (now quantized) output projection no longer shares the input embeddings' weight,
    so that `save_pretrained` writes it and `from_pretrained` reads it back instead of re-tying it."""
    model.config.tie_word_embeddings = False
    for module in model.modules():
        if hasattr(module, "all_tied_weights_keys") and hasattr(module, "get_expanded_tied_weights_keys"):
            module.all_tied_weights_keys = module.get_expanded_tied_weights_keys()


@torch.no_grad()
def quantize(
    model: nn.Module,
    bits: int = 8,
    group_size: int | None = None,
    include_lm_head: bool | None = None,
    modules_to_not_convert: list[str] | None = None,
) -> nn.Module:
    """Quantize `model`'s linear layers in place (weights only) and return it.

    int8: symmetric, per output channel (``group_size=None``, the default and the fastest) or per group of
    `group_size` input features. int4: groups of `group_size` (default 32) input features, asymmetric.
    ``include_lm_head`` (default True) also quantizes the output projection, always to int8 per channel (int4 there costs too much accuracy, see docs/quantization.md); a tied one is untied and
    the input embeddings stay in float. Raises
    :class:`~optimum_atb.errors.QuantizationError` (before changing anything) for unsupported bits or
    group size, a group size that does not divide a layer's input features, or an already quantized model.
    On CPU the quantized layers compute in bfloat16 (see docs/quantization.md).
    """
    from .hf_quantizer import attach_config

    group_size = check_request(bits, group_size)
    check_not_quantized(model)
    if include_lm_head is None:
        include_lm_head = True
    skip = list(modules_to_not_convert or [])
    targets = linears_to_quantize(model, bits, group_size, include_lm_head, skip)
    if not targets:
        raise QuantizationError("the model has no nn.Linear layer to quantize.")
    check_group_divides(targets)
    head = output_projection(model)
    untie = head_is_tied(model) and any(t.layer is head for t in targets)
    pending = deque(targets)  # popped as replaced: each float layer is freed before the next is quantized
    del targets
    while pending:
        name, layer, layer_bits, layer_group = pending.popleft()
        replace_module(model, name, QuantLinear.from_linear(layer, layer_bits, layer_group))
    if untie:
        untie_output_embeddings(model)
    attach_config(model, bits, group_size, include_lm_head, skip)
    return model
