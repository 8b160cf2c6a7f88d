"""Fused operators: one dispatch table (op x backend), a float64 reference per op, and the
torch / triton / npu implementations. Users call them through :mod:`optimum_atb.ops`."""

from .dispatch import get_kernel, register

__all__ = ["get_kernel", "register"]
