"""Backend selection (optimum_atb.backends) and the dispatch table's fallback (optimum_atb.kernels.dispatch)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
import warnings

import pytest
import torch

from optimum_atb import BackendUnavailableError, backend_info, backends, ops, set_backend, use_backend
from optimum_atb.kernels import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
NPU = types.SimpleNamespace(type="npu")  # torch.device("npu") needs torch_npu; resolve() reads only .type


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    """No explicit choice and no warnings already given; torch_npu absent unless a test installs it."""
    monkeypatch.setattr(backends, "_global_choice", None)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv("OPTIMUM_ATB_BACKEND", raising=False)
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.fail("these tests assume torch_npu is not installed")


def _fake_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))


def _no_triton(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )


def test_device_decides_by_default(monkeypatch):
    assert backends.current_choice() == "auto"
    assert backends.resolve(CPU) == "torch"
    assert backends.resolve(CUDA) == "triton"  # triton is installed in the test environment
    with pytest.raises(BackendUnavailableError, match=r"optimum-atb\[npu\]"):
        backends.resolve(NPU)
    _fake_torch_npu(monkeypatch)
    assert backends.resolve(NPU) == "npu"


def test_cuda_without_triton_falls_back_to_torch_warning_once(monkeypatch):
    _no_triton(monkeypatch)
    with pytest.warns(UserWarning, match=r"triton is not installed.*optimum-atb\[triton\]"):
        assert backends.resolve(CUDA) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve(CUDA) == "torch"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("OPTIMUM_ATB_BACKEND", "triton")  # TRITON_INTERPRET=1 (tests/conftest.py): runs on CPU
    assert backends.current_choice() == "triton"
    assert backends.resolve(CPU) == "triton"
    monkeypatch.setenv("OPTIMUM_ATB_BACKEND", "npu")
    with pytest.raises(
        BackendUnavailableError, match=r"backend 'npu' cannot run on cpu tensors.*optimum-atb\[npu\]"
    ):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8))
    monkeypatch.setenv("OPTIMUM_ATB_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        backends.current_choice()


def test_set_backend(monkeypatch):
    set_backend("triton")
    assert backends.current_choice() == "triton" and backends.resolve(CPU) == "triton"
    monkeypatch.setenv("OPTIMUM_ATB_BACKEND", "torch")
    assert backends.current_choice() == "triton", "set_backend wins over the environment"
    set_backend(None)
    assert backends.current_choice() == "torch"
    set_backend("auto")
    assert backends.current_choice() == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        set_backend("tpu")


def test_set_backend_refuses_an_unavailable_backend(monkeypatch):
    with pytest.raises(BackendUnavailableError, match=r"pip install 'optimum-atb\[npu\]'"):
        set_backend("npu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'optimum-atb\[triton\]'"):
        set_backend("triton")
    _no_triton(monkeypatch)
    with pytest.raises(BackendUnavailableError, match="'triton' package is not installed"):
        set_backend("triton")
    assert backends.current_choice() == "auto", "a refused choice must leave the state unchanged"


def test_use_backend_nests_restores_and_is_thread_local():
    seen = {}
    with use_backend("triton"):
        assert backends.current_choice() == "triton"
        with use_backend("torch"):
            assert backends.current_choice() == "torch"
            worker = threading.Thread(target=lambda: seen.update(choice=backends.current_choice()))
            worker.start()
            worker.join()
        assert backends.current_choice() == "triton"
        with pytest.raises(RuntimeError), use_backend("torch"):
            raise RuntimeError("boom")
        assert backends.current_choice() == "triton"
    assert backends.current_choice() == "auto"
    assert seen["choice"] == "auto"
    with pytest.raises(ValueError, match="unknown backend"), use_backend("gpu"):
        pass


def test_use_backend_wins_over_set_backend():
    set_backend("triton")
    with use_backend("torch"):
        assert backends.resolve(CPU) == "torch"
    assert backends.resolve(CPU) == "triton"


def test_backend_info(monkeypatch):
    info = backend_info()
    assert set(info) == {"torch", "triton", "npu", "selected"}
    assert info["torch"] == {"available": True, "reason": "ok"}
    assert info["triton"]["available"] is True  # installed, and TRITON_INTERPRET=1 in tests
    assert info["npu"]["available"] is False
    assert "torch_npu" in info["npu"]["reason"] and "optimum-atb[npu]" in info["npu"]["reason"]
    assert info["selected"]["reason"] == "auto"
    with use_backend("torch"):
        assert backend_info()["selected"]["reason"] == "torch"
    _no_triton(monkeypatch)
    assert "optimum-atb[triton]" in backend_info()["triton"]["reason"]


@pytest.fixture
def torch_only_op():
    """An operator registered for the torch backend only."""
    name = "_test_torch_only_op"
    dispatch.register(name, "torch")(lambda x: x + 1)
    yield name
    del dispatch._TABLE[(name, "torch")]


def test_missing_kernel_falls_back_to_torch_and_warns_once(torch_only_op):
    assert not dispatch.has_kernel(torch_only_op, "triton")
    assert dispatch.has_kernel(torch_only_op, "torch")
    with pytest.warns(UserWarning, match=f"triton backend has no '{torch_only_op}' kernel; using the torch"):
        fn = dispatch.get_kernel(torch_only_op, "triton")
    assert fn(1) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.get_kernel(torch_only_op, "triton")(2) == 3
        assert dispatch.get_kernel(torch_only_op, "torch")(3) == 4


def test_every_core_op_has_a_torch_kernel():
    for op in ("flash_attention", "paged_attention", "reshape_and_cache", "rms_norm", "layer_norm",
               "apply_rotary", "swiglu", "geglu"):  # fmt: skip
        assert dispatch.has_kernel(op, "torch"), op
