"""Which kernel backend runs an operator: chosen per call from the tensors' device.

cpu -> ``torch``; cuda -> ``triton`` when importable, else ``torch`` (warned once); npu -> ``npu``.
An explicit choice (``OPTIMUM_ATB_BACKEND``, :func:`set_backend`, :func:`use_backend`) wins, and
raises :class:`BackendUnavailableError` when it cannot run on the tensors' device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Iterator

import torch

from .errors import BackendUnavailableError

BACKENDS = ("torch", "triton", "npu")
_INSTALL_HINT = {
    "torch": "torch is always available",
    "triton": "pip install 'optimum-atb[triton]' and run on a CUDA GPU (or set TRITON_INTERPRET=1 "
    "before importing triton to run the kernels on the CPU in Triton's interpreter, for testing)",
    "npu": "pip install 'optimum-atb[npu]' (torch-npu matching your CANN toolkit) on an Ascend machine",
}

_state = threading.local()
_global_choice: str | None = None
_warned: set[str] = set()


def _check_name(name: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return name


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unavailable_reason(name: str, device_type: str | None = None) -> str | None:
    """None when backend `name` can run on `device_type` (any device when None), else why not."""
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the 'triton' package is not installed"
        if device_type == "cuda" or (device_type is None and torch.cuda.is_available()):
            return None
        if _triton_interpreted():
            return None
        if device_type is None:
            return "no CUDA GPU is visible (and TRITON_INTERPRET is not set)"
        return f"Triton kernels need CUDA tensors, got {device_type} (TRITON_INTERPRET is not set)"
    if name == "npu":
        if "torch_npu" not in sys.modules and importlib.util.find_spec("torch_npu") is None:
            return "the 'torch_npu' package is not installed"
        return None
    raise ValueError(name)


def backend_info() -> dict[str, dict[str, object]]:
    """What each backend needs and whether it can run in this process.

    Returns ``{name: {"available": bool, "reason": str}}`` plus the current choice under ``"selected"``.
    """
    info: dict[str, dict[str, object]] = {}
    for name in BACKENDS:
        reason = _unavailable_reason(name)
        info[name] = {
            "available": reason is None,
            "reason": "ok" if reason is None else f"{reason}; to enable: {_INSTALL_HINT[name]}",
        }
    info["selected"] = {"available": True, "reason": current_choice()}
    return info


def current_choice() -> str:
    """The explicit choice in force ('auto' when the device decides)."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_choice is not None:
        return _global_choice
    return _check_name(os.environ.get("OPTIMUM_ATB_BACKEND", "auto") or "auto")


def set_backend(name: str | None) -> None:
    """Force a backend for every later call in this process (``None`` or ``"auto"``: choose by device)."""
    global _global_choice
    if name is not None:
        _check_name(name)
        reason = None if name == "auto" else _unavailable_reason(name)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} is unavailable: {reason}. {_INSTALL_HINT[name]}."
            )
    _global_choice = None if name in (None, "auto") else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: force backend `name` inside the block (thread-local)."""
    _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a UserWarning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def resolve(device: torch.device) -> str:
    """The backend that runs an operator on tensors living on `device`."""
    choice = current_choice()
    if choice != "auto":
        reason = _unavailable_reason(choice, device.type)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {choice!r} cannot run on {device.type} tensors: {reason}. {_INSTALL_HINT[choice]}."
            )
        return choice
    if device.type == "cuda":
        if _unavailable_reason("triton", "cuda") is None:
            return "triton"
        warn_once(
            "cuda-no-triton",
            "optimum-atb: triton is not installed, CUDA tensors use the slower torch backend. "
            + _INSTALL_HINT["triton"],
        )
        return "torch"
    if device.type == "npu":
        reason = _unavailable_reason("npu", "npu")
        if reason is not None:
            raise BackendUnavailableError(f"NPU tensors need torch_npu: {reason}. {_INSTALL_HINT['npu']}.")
        return "npu"
    return "torch"
