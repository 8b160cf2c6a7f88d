"""One patch module per architecture family, looked up by ``config.model_type``.

Each family module declares a :class:`~optimum_atb.patches.spec.FamilySpec`; the fused forwards they
bind are shared (:mod:`optimum_atb.patches.fused`).
"""

from __future__ import annotations

from optimum_atb.errors import UnsupportedModelError

from . import gemma, gemma2, llama, mistral, phi3, qwen2, qwen3
from .spec import FamilySpec

FAMILIES: dict[str, FamilySpec] = {
    model_type: module.SPEC
    for module in (llama, mistral, qwen2, qwen3, phi3, gemma, gemma2)
    for model_type in module.SPEC.model_types
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(FAMILIES))


def spec_for(model_type: str | None) -> FamilySpec:
    """The family patch for ``model_type``; raises :class:`UnsupportedModelError` when there is none."""
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"to_atb() has no patch for model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
            'Use attn_implementation="atb" alone for other architectures.'
        )
    return spec
