"""The dispatch table: (operator name, backend name) -> implementation.

Backend modules register their kernels with :func:`register` when imported; they are imported
lazily, the first time a backend is needed, so importing optimum_atb never imports triton or torch_npu.
An operator a backend does not implement falls back to the torch backend with a one-time warning.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from optimum_atb.backends import warn_once

_TABLE: dict[tuple[str, str], Callable] = {}
# Modules that register each backend's kernels: the core operators, then the quantized matmuls.
_BACKEND_MODULES = {
    "torch": ("optimum_atb.kernels.torch_ops", "optimum_atb.kernels.quant_torch"),
    "triton": ("optimum_atb.kernels.triton", "optimum_atb.kernels.quant_triton"),
    "npu": ("optimum_atb.kernels.npu_ops", "optimum_atb.kernels.quant_npu"),
}
_loaded: set[str] = set()


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` the implementation of `op` on `backend`."""

    def deco(fn: Callable) -> Callable:
        _TABLE[(op, backend)] = fn
        return fn

    return deco


def _load(backend: str) -> None:
    if backend not in _loaded:
        for module in _BACKEND_MODULES[backend]:
            importlib.import_module(module)
        _loaded.add(backend)


def get_kernel(op: str, backend: str) -> Callable:
    """The implementation of `op` on `backend`, or the torch one (warned once) when it has none."""
    _load(backend)
    fn = _TABLE.get((op, backend))
    if fn is not None:
        return fn
    _load("torch")
    warn_once(
        f"fallback-{op}-{backend}",
        f"optimum-atb: the {backend} backend has no '{op}' kernel; using the torch implementation.",
    )
    return _TABLE[(op, "torch")]


def has_kernel(op: str, backend: str) -> bool:
    """Whether `backend` implements `op` itself (no fallback)."""
    _load(backend)
    return (op, backend) in _TABLE
