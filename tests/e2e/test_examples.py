"""Each script in examples/ runs to completion on the CPU with the embedded model and says what it should."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# script -> lines its output must contain (regular expressions)
EXPECTED = {
    "quickstart.py": [r"answer: .*Paris", r"stock: [\d.]+ tokens/s, to_atb\(\): [\d.]+ tokens/s", r"^identical to stock: True$"],
    "attention_only.py": [r"^attention implementation: atb$", r"max \|logit diff\| vs sdpa: ", r"^identical to stock: True$"],
    "paged_cache.py": [r"paged cache: \d+ blocks of 16 tokens hold \d+ tokens", r"^identical to DynamicCache: True$"],
    "quantization.py": [r"^fp32: [\d.]+ tokens/s", r"^int8: .* of greedy tokens equal to fp32$", r"^int4: ", r"^gguf Q4_1: "],
    "speculative_decoding.py": [r"^int4 self-draft: .*identical to plain: True$", r"^n-gram: .*identical to plain: True$"],
    "ops_api.py": [r"flash_attention max abs diff vs SDPA: ", r"paged_attention max abs diff vs dense: ", r"^backend for CPU tensors: torch$"],
}  # fmt: skip


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=EXAMPLES,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for pattern in EXPECTED[script]:
        assert re.search(pattern, result.stdout, re.MULTILINE), f"{pattern!r} not in:\n{result.stdout}"
