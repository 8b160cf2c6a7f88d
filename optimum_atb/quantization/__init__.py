"""Weight-only quantization (W8A16, W4A16) and GGUF checkpoints kept quantized.

- :func:`quantize`: swap a model's linear layers for :class:`QuantLinear` in place.
- :class:`AtbQuantConfig`: ``from_pretrained(path, quantization_config=AtbQuantConfig(bits=8))``.
- :func:`load_gguf`: a GGUF file's Q4_0/Q4_1/Q8_0 linear weights loaded without dequantizing them.
- :func:`evaluate`: a quantized model against its float reference (perplexity, agreement, KL).
"""

from .apply import quantize
from .config import AtbQuantConfig
from .gguf import load_gguf
from .hf_quantizer import register
from .linear import QuantLinear
from .quality import QualityReport, evaluate

__all__ = ["AtbQuantConfig", "QualityReport", "QuantLinear", "evaluate", "load_gguf", "quantize", "register"]
