"""Gemma2: Gemma plus sandwich norms, attention-logit softcap and alternating sliding windows."""

from transformers.models.gemma2 import modeling_gemma2

from .fused import sandwich_decoder_forward
from .spec import FamilySpec

SPEC = FamilySpec(
    name="gemma2",
    model_types=("gemma2",),
    modeling=modeling_gemma2,
    prefix="Gemma2",
    decoder_forward=sandwich_decoder_forward,
    norm_offset=1.0,
    act_config_key="hidden_activation",
)
