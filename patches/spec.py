"""What a family patch needs to know about one transformers architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class FamilySpec:
    """One LLaMA-family architecture as seen by ``to_atb``.

    ``modeling`` is the transformers modeling module; its classes are ``<prefix>DecoderLayer``,
    ``<prefix>Attention``, ``<prefix>MLP`` and ``<prefix>RMSNorm``. ``decoder_forward`` is the fused
    decoder-layer forward bound on each layer when norms are fused.
    """

    name: str
    model_types: tuple[str, ...]
    modeling: ModuleType
    prefix: str
    decoder_forward: Callable
    norm_offset: float = 0.0  # Gemma RMSNorm is x * (1 + w), computed in float32
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    fused_in_checkpoint: bool = False  # Phi3: qkv_proj and gate_up_proj are the checkpoint's own weights
    act_config_key: str = "hidden_act"  # config attribute naming the MLP activation

    def cls(self, suffix: str) -> type:
        return getattr(self.modeling, self.prefix + suffix)
