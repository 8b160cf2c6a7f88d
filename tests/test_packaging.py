"""Packaging: kernels/ and patches/ are installed as optimum_atb.kernels / optimum_atb.patches, never as a
top-level ``kernels`` module (that name is Hugging Face's ``kernels`` package, which transformers probes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib.util, json, sys
from transformers.utils import is_kernels_available
before = is_kernels_available()
spec = importlib.util.find_spec("kernels")
import optimum_atb, optimum_atb.kernels, optimum_atb.patches
is_kernels_available.cache_clear() if hasattr(is_kernels_available, "cache_clear") else None
print(json.dumps({
    "kernels_origin": None if spec is None else spec.origin,
    "before": before,
    "after": is_kernels_available(),
    "optimum_atb.kernels": optimum_atb.kernels.__file__,
    "optimum_atb.patches": optimum_atb.patches.__file__,
    "top_level_kernels_file": getattr(sys.modules.get("kernels"), "__file__", None),
    "backend_modules_loaded": sorted(m for m in sys.modules if m.startswith(
        ("optimum_atb.kernels.triton", "optimum_atb.kernels.npu_ops", "optimum_atb.kernels.quant_triton",
         "optimum_atb.kernels.quant_npu"))),
    "torch_npu_loaded": "torch_npu" in sys.modules,
}))
"""


def _probe(tmp_path) -> dict:
    """Run the probe in a fresh interpreter whose working directory is not the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_installed_layout(tmp_path):
    found = _probe(tmp_path)
    origin = found["kernels_origin"]
    assert origin is None or not Path(origin).resolve().is_relative_to(REPO), (
        f"a top-level 'kernels' module resolves into this repository: {origin}"
    )
    top = found["top_level_kernels_file"]  # transformers >= 5.25 imports Hugging Face's `kernels` itself
    assert top is None or not Path(top).resolve().is_relative_to(REPO), (
        f"a top-level 'kernels' from here: {top}"
    )
    assert found["before"] == found["after"], "import optimum_atb changed transformers.is_kernels_available()"
    assert Path(found["optimum_atb.kernels"]).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(found["optimum_atb.patches"]).resolve() == REPO / "patches" / "__init__.py"
    assert found["backend_modules_loaded"] == [], "the triton/npu backends must load lazily, on first use"
    assert not found["torch_npu_loaded"], "import optimum_atb must not import torch_npu"


_ROOT_PROBE = (
    "import json, transformers.utils as u; from transformers import LlamaConfig, LlamaForCausalLM; "
    "import optimum_atb; "
    "LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, "
    "num_hidden_layers=1, num_attention_heads=2)); available = u.is_kernels_available(); "
    "import sys; top = sys.modules.get('kernels'); "
    "print(json.dumps([available, getattr(top, '__file__', None), optimum_atb.kernels.__file__]))"
)


def test_checkout_root_on_sys_path_keeps_transformers_working(tmp_path):
    """`python -m optimum_atb` from a checkout puts the root (and its `kernels/` folder) on sys.path:
    transformers must see and import the same `kernels` as from anywhere else (Hugging Face's package,
    which transformers >= 5.25 depends on and imports while loading a model), never this folder."""
    answers = []
    for cwd in (REPO, tmp_path):
        done = subprocess.run(
            [sys.executable, "-c", _ROOT_PROBE], cwd=cwd, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        answers.append(json.loads(done.stdout.strip().splitlines()[-1]))
    (available, top_file, ours), elsewhere = answers
    assert [available, top_file] == elsewhere[:2]
    assert top_file is None or not Path(top_file).resolve().is_relative_to(REPO)
    assert Path(ours).resolve() == REPO / "kernels" / "__init__.py"


def test_checkout_root_without_hf_kernels_installed_raises_module_not_found():
    """With no `kernels` package installed (no site-packages at all here), importing the name from a
    checkout is an ordinary ModuleNotFoundError, not this folder."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
        "else:\n    print('found', kernels.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "missing kernels"
