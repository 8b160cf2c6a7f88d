"""Mistral: the LLaMA layout with a sliding window on every layer."""

from transformers.models.mistral import modeling_mistral

from .fused import prenorm_decoder_forward
from .spec import FamilySpec

SPEC = FamilySpec(
    name="mistral",
    model_types=("mistral",),
    modeling=modeling_mistral,
    prefix="Mistral",
    decoder_forward=prenorm_decoder_forward,
)
