"""The kernel backends under test, and how a test runs under one of them.

* ``torch``: the native backend.
* ``triton``: the Triton kernels on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by
  ``tests/conftest.py`` before triton is imported; triton is always installed in CI).
* ``npu``: the NPU backend against ``tests/npu_emulator.py``, whose ``installed()`` context manager puts a
  pure-torch emulator of torch_npu in ``sys.modules["torch_npu"]``. A missing emulator fails the test.

A backend that does not implement an operator itself would silently fall back to torch and pass for the
wrong reason, so :func:`require_kernel` fails such a test instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import optimum_atb
from optimum_atb.kernels.dispatch import has_kernel

BACKENDS = ("torch", "triton", "npu")
GRAD_BACKENDS = ("torch", "triton")  # backends whose flash_attention backward is tested
_EMULATOR = Path(__file__).resolve().parents[1] / "npu_emulator.py"


def _npu_emulator():
    if not _EMULATOR.exists():
        pytest.fail(f"the NPU emulator {_EMULATOR} does not exist: the npu backend cannot be tested")
    spec = importlib.util.spec_from_file_location("_optimum_atb_npu_emulator", _EMULATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_emulator_module = None


@contextlib.contextmanager
def active(backend: str) -> Iterator[str]:
    """Run the block with every operator forced onto `backend` (npu: inside the emulator)."""
    global _emulator_module
    with contextlib.ExitStack() as stack:
        if backend == "npu":
            if _emulator_module is None:
                _emulator_module = _npu_emulator()
            stack.enter_context(_emulator_module.installed())
        stack.enter_context(optimum_atb.use_backend(backend))
        yield backend


def require_kernel(op: str, backend: str) -> None:
    """Fail unless `backend` implements `op` itself (no fallback to torch)."""
    if not has_kernel(op, backend):
        pytest.fail(f"the {backend} backend registers no {op!r} kernel (it would fall back to torch)")


def backend_fixture(names: tuple[str, ...] = BACKENDS) -> Callable:
    """A pytest fixture ``backend`` parametrized over `names`, each test body running under it.

    Use in a test module as ``backend = backend_fixture()``.
    """

    @pytest.fixture(params=names)
    def backend(request):
        with active(request.param):
            yield request.param

    return backend
