#!/usr/bin/env bash
# Installs a CPU build of torch unless one is already importable, so a CPU machine never pulls the
# multi-GB CUDA wheels that a plain `pip install torch` brings from PyPI.
set -euo pipefail
PY=${PYTHON:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
  exit 0
fi
# The CPU wheel from pip's find-links first (its dependencies from the package index; `+cpu` matches no
# CUDA build on PyPI), then PyTorch's CPU index.
"$PY" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
  || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
