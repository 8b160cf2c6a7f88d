"""The ``quant_method="atb"`` quantizer for transformers' `from_pretrained` / `save_pretrained`.

Quantize at load time: ``from_pretrained(path, quantization_config=AtbQuantConfig(bits=8))`` swaps the
meta-device model's linear layers for :class:`QuantLinear` before any weight is read; transformers then
loads one checkpoint tensor at a time (sequentially, since on-the-fly quantization turns its thread pool
off) and :class:`AtbQuantize` turns each float weight into the stored format, so no float copy of the
whole model is ever materialised. A saved model carries the quantized buffers and the config; loading it
back builds the same modules and copies the buffers as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ..errors import QuantizationError
from .apply import check_group_divides, head_is_tied, linears_to_quantize, replace_module
from .config import QUANT_METHOD, AtbQuantConfig
from .linear import QuantLinear, quantize_weight


class AtbQuantize(ConversionOps):
    """Loader op: one float ``<layer>.weight`` -> ``weight``, ``weight_scale`` (, ``weight_zero``)."""

    def __init__(self, hf_quantizer: AtbHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model: nn.Module | None = None, **kwargs) -> dict:
        key, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        layer = model.get_submodule(key.rpartition(".")[0])
        qweight, scale, zero = quantize_weight(value, layer.bits, layer.group_size)
        out = {key: qweight, f"{key}_scale": scale}
        if zero is not None:
            out[f"{key}_zero"] = zero
        return out


class AtbHfQuantizer(HfQuantizer):
    """Weight-only int8/int4 quantization with optimum-atb's kernels (see `AtbQuantConfig`)."""

    requires_calibration = False
    quantization_config: AtbQuantConfig

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    @property
    def quantized_element_size(self) -> float:
        return 1 if self.quantization_config.bits == 8 else 0.5

    def _process_model_before_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        targets = linears_to_quantize(
            model, cfg.bits, cfg.group_size, cfg.include_lm_head, cfg.modules_to_not_convert
        )
        if cfg.include_lm_head and not self.pre_quantized and head_is_tied(model):
            raise QuantizationError(
                "include_lm_head=True at load time needs an untied output projection; this model ties it to "
                "the input embeddings. Load it in float and call optimum_atb.quantize(model, bits=..., "
                "include_lm_head=True), or model.to_atb(quantize=...)."
            )
        check_group_divides(targets)
        for name, layer, bits, group_size in targets:
            with torch.device("meta"):
                qlayer = QuantLinear(
                    layer.in_features, layer.out_features, bits, group_size,
                    bias=layer.bias is not None, dtype=layer.weight.dtype,
                )  # fmt: skip
            replace_module(model, name, qlayer)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        if self.pre_quantized or tensor_name != "weight":
            return False
        try:
            return isinstance(model.get_submodule(module_name), QuantLinear)
        except AttributeError:
            return False

    def get_quantize_ops(self) -> AtbQuantize:
        return AtbQuantize(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """QuantLinear's kernels trace under torch.compile (``to_atb(compile=True)``)."""
        return True


def attach_config(
    model: nn.Module, bits: int, group_size: int | None, include_lm_head: bool, skip: list[str]
) -> None:
    """Record the quantization on a model quantized in place, so `save_pretrained` writes it."""
    if not hasattr(model, "config"):
        return
    cfg = AtbQuantConfig(bits, group_size, include_lm_head, skip)
    model.config.quantization_config = cfg
    model.hf_quantizer = AtbHfQuantizer(cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def register() -> None:
    """Make ``quant_method="atb"`` known to transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(AtbQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(AtbHfQuantizer)
