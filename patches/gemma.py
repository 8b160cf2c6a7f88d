"""Gemma: RMSNorm ``x * (1 + w)`` in float32, GeGLU (tanh) MLP, scaled embeddings (untouched)."""

from transformers.models.gemma import modeling_gemma

from .fused import prenorm_decoder_forward
from .spec import FamilySpec

SPEC = FamilySpec(
    name="gemma",
    model_types=("gemma",),
    modeling=modeling_gemma,
    prefix="Gemma",
    decoder_forward=prenorm_decoder_forward,
    norm_offset=1.0,
)
