"""Phi-3: qkv_proj and gate_up_proj are already fused in the checkpoint; partial rotary."""

from transformers.models.phi3 import modeling_phi3

from .fused import prenorm_decoder_forward
from .spec import FamilySpec

SPEC = FamilySpec(
    name="phi3",
    model_types=("phi3",),
    modeling=modeling_phi3,
    prefix="Phi3",
    decoder_forward=prenorm_decoder_forward,
    fused_in_checkpoint=True,
)
