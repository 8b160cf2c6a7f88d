"""Exceptions raised by optimum-atb. Each one says what went wrong and what to do about it."""


class OptimumAtbError(Exception):
    """Base class of every optimum-atb error."""


class BackendUnavailableError(OptimumAtbError, RuntimeError):
    """A kernel backend was requested that cannot run here (missing package or device)."""


class UnsupportedModelError(OptimumAtbError, ValueError):
    """`to_atb()` was called on a model whose architecture has no patch."""


class KVCacheCapacityError(OptimumAtbError, RuntimeError):
    """The paged KV block pool has too few free blocks for the tokens being written."""


class QuantizationError(OptimumAtbError, ValueError):
    """Invalid quantization request (bits, group size, already quantized model...)."""


class CompileOptionsError(OptimumAtbError, ValueError):
    """Invalid ``compile_options`` (without ``compile=True``, not a dict, or an option inductor lacks)."""
