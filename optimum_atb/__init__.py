"""optimum-atb: Ascend Transformer Boost ideas for Hugging Face Transformers LLaMA-family models.

``import optimum_atb`` registers the ``"atb"`` attention implementation, the ``"atb_paged"`` cache
implementation and the ``"atb"`` quantization method with transformers, and attaches
``PreTrainedModel.to_atb``. Nothing changes for models that do not use the plugin.
"""

from . import ops
from .backends import backend_info, set_backend, use_backend
from .convert import revert, to_atb
from .errors import (
    BackendUnavailableError,
    CompileOptionsError,
    KVCacheCapacityError,
    OptimumAtbError,
    QuantizationError,
    UnsupportedModelError,
)
from .integration import register as _register_integration
from .paged_cache import PagedCache
from .paged_cache import register as _register_paged_cache
from .quantization import AtbQuantConfig, load_gguf, quantize
from .quantization import register as _register_quantization
from .speculative import draft_from

__version__ = "0.1.0"

_register_integration()
_register_paged_cache()
_register_quantization()

__all__ = [
    "AtbQuantConfig",
    "BackendUnavailableError",
    "CompileOptionsError",
    "KVCacheCapacityError",
    "OptimumAtbError",
    "PagedCache",
    "QuantizationError",
    "UnsupportedModelError",
    "backend_info",
    "draft_from",
    "load_gguf",
    "ops",
    "quantize",
    "revert",
    "set_backend",
    "to_atb",
    "use_backend",
]
