"""The float model a quantized model should reproduce: the same model with each quantized linear's weight
replaced by the weight it computes with (``QuantLinear.dequantized_weight``, tested against float64)."""

from __future__ import annotations

import copy

import torch

from optimum_atb.quantization import QuantLinear


def rounded_reference(float_model: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """A copy of `float_model` (the model `quantized` was quantized from) computing with `quantized`'s
    rounded weights."""
    reference = copy.deepcopy(float_model)
    for name, module in quantized.named_modules():
        if isinstance(module, QuantLinear):
            # a new Parameter, so that a tied output projection does not overwrite the embedding
            weight = torch.nn.Parameter(module.dequantized_weight(), requires_grad=False)
            reference.get_submodule(name).weight = weight
    return reference
