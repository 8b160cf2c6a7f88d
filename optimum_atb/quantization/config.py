"""`AtbQuantConfig`: the ``quant_method="atb"`` configuration, and the checks every entry point shares."""

from __future__ import annotations

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import QuantizationError
from .formats import DEFAULT_GROUP_SIZE, GROUP_SIZES, SUPPORTED_BITS

QUANT_METHOD = "atb"


def check_request(bits: int, group_size: int | None) -> int | None:
    """Validate (bits, group_size); returns the group size in force (None for int8: per channel)."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits={bits!r} is not supported; choose 8 (W8A16) or 4 (W4A16).")
    if bits == 8 and group_size is None:
        return None  # per output channel
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        per_channel = " or None (per output channel)" if bits == 8 else ""
        raise QuantizationError(
            f"int{bits} group_size={group_size!r} is not supported; choose one of {GROUP_SIZES}{per_channel}."
        )
    return group_size


class AtbQuantConfig(QuantizationConfigMixin):
    """Weight-only quantization by optimum-atb, for ``from_pretrained(..., quantization_config=...)``.

    Args:
        bits: 8 (int8, symmetric) or 4 (int4 group-wise, asymmetric).
        group_size: group size over input features: 32, 64, 128 or 256. int4: 32 by default. int8: None
            (default) for one scale per output channel, the fastest; a group size for one per group
            (closer to the float model, slower on CPU: see docs/quantization.md).
        include_lm_head: also quantize the output projection, to int8 per channel whatever ``bits`` is
            (default False at load time: it stays in float; a tied one cannot be quantized at load).
        modules_to_not_convert: names (or name suffixes) of linear layers left in float.
    """

    def __init__(
        self,
        bits: int = 8,
        group_size: int | None = None,
        include_lm_head: bool = False,
        modules_to_not_convert: list[str] | None = None,
        **kwargs,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = check_request(bits, group_size)
        self.include_lm_head = include_lm_head
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "group_size": self.group_size,
            "include_lm_head": self.include_lm_head,
            "modules_to_not_convert": self.modules_to_not_convert,
        }
