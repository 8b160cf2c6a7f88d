"""Qwen3: Qwen2 plus RMSNorm over head_dim on q and k before RoPE."""

from transformers.models.qwen3 import modeling_qwen3

from .fused import prenorm_decoder_forward
from .spec import FamilySpec

SPEC = FamilySpec(
    name="qwen3",
    model_types=("qwen3",),
    modeling=modeling_qwen3,
    prefix="Qwen3",
    decoder_forward=prenorm_decoder_forward,
    qk_norm=True,
)
