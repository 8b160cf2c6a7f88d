"""Fused operators: one dispatch table (op x backend), a float64 reference per op, and the
torch / triton / npu implementations. Users call them through :mod:`optimum_atb.ops`.

This file imports nothing on purpose: when the repository root is on ``sys.path`` (``python -m ...`` from
a checkout), transformers' ``is_kernels_available()`` imports this folder as the top-level ``kernels``
module; importing nothing keeps that probe harmless (no version -> "not available").
"""
