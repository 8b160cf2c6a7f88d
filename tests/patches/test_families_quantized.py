"""Weight-only quantization on every family: the quantized, fused model against stock eager with the same
rounded weights.

The reference is the stock model with each linear's weight replaced by what ``optimum_atb.quantize`` rounded
it to (tests/quantized_reference.py). So these
tests check the wiring around the quantized layers (the fused q/k/v and gate/up products over quantized
parts, biases, a tied output projection untied, a checkpoint's own fused ``qkv_proj``), family by family.
With the torch backend's many-row routes forced (exact weights, float32 activations) the two agree to
float32 precision; with the default routes (the packed kernels, bf16 activations) as closely as that
reference run in bf16 does (the rule of test_families.py's bf16 test).
"""

from __future__ import annotations

import copy

import pytest
import torch
from atb_family_models import CONFIGS, greedy, prompt, stock_model
from quantized_reference import rounded_reference

import optimum_atb
from optimum_atb.kernels import quant_torch
from optimum_atb.quantization import QuantLinear

FAMILIES = sorted(CONFIGS)
FP32_TOL = 1e-4


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _quantized_and_reference(family: str, bits: int):
    """(stock, its ``to_atb(quantize=...)`` copy, the stock reference with the same rounded weights)."""
    stock = stock_model(family)
    quantized = optimum_atb.quantize(copy.deepcopy(stock), bits=bits)
    linears = sum(isinstance(m, torch.nn.Linear) for m in stock.modules())
    assert sum(isinstance(m, QuantLinear) for m in quantized.modules()) == linears  # output projection too
    return stock, copy.deepcopy(stock).to_atb(quantize=f"int{bits}"), rounded_reference(stock, quantized)


@pytest.fixture
def exact_routes(monkeypatch):
    """Every quantized product through the exact weight in float32 (the many-row routes), at any row count."""
    monkeypatch.setattr(quant_torch, "INT8_DEQUANT_ROWS", 1)
    monkeypatch.setattr(quant_torch, "INT8_BF16_ROWS", 1)
    monkeypatch.setattr(quant_torch, "INT4_DEQUANT_ROWS", 1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_to_atb_matches_stock_with_the_rounded_weights(family, bits, exact_routes):
    stock, model, reference = _quantized_and_reference(family, bits)
    ids = prompt(13)
    out, ref = _logits(model, ids), _logits(reference, ids)
    assert (out - ref).abs().max().item() <= FP32_TOL
    # the weights really were rounded: the reference is not the float model
    assert (ref - _logits(stock, ids)).abs().max().item() > 100 * FP32_TOL
    assert torch.equal(greedy(model, prompt(9), 12), greedy(reference, prompt(9), 12))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_to_atb_through_the_packed_kernels_within_bf16_error(family, bits):
    _, model, reference = _quantized_and_reference(family, bits)
    ids = prompt(13)
    out, ref = _logits(model, ids), _logits(reference, ids)
    bf16_err = (_logits(reference.to(torch.bfloat16), ids) - ref).abs().max().item()
    err = (out - ref).abs().max().item()
    assert FP32_TOL < err <= 2 * bf16_err + 0.05  # above FP32_TOL: the bf16 kernels ran, not a float fallback
