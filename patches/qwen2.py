"""Qwen2: the LLaMA layout with q/k/v biases and per-layer sliding windows (``layer_types``)."""

from transformers.models.qwen2 import modeling_qwen2

from .fused import prenorm_decoder_forward
from .spec import FamilySpec

SPEC = FamilySpec(
    name="qwen2",
    model_types=("qwen2",),
    modeling=modeling_qwen2,
    prefix="Qwen2",
    decoder_forward=prenorm_decoder_forward,
)
