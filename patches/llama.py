"""LLaMA (Llama 2/3, SmolLM2, TinyLlama...): pre-norm RMSNorm, SwiGLU, separate q/k/v projections."""

from transformers.models.llama import modeling_llama

from .fused import prenorm_decoder_forward
from .spec import FamilySpec

SPEC = FamilySpec(
    name="llama",
    model_types=("llama",),
    modeling=modeling_llama,
    prefix="Llama",
    decoder_forward=prenorm_decoder_forward,
)
