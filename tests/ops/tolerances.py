"""Per-dtype tolerances of a backend's result against the float64 reference.

Inputs are rounded to the test dtype *before* the reference sees them, so the table bounds only the
error of the computation and of rounding the result. fp16/bf16 follow the bounds ATB's own operator
tests use (``|out - golden| <= max(|golden|, 1) * 2^-8`` for fp16, ``2^-7`` for bf16). Gradients go
through one more reduction (and a low-precision P / dS in fused kernels), hence the looser table.
"""

from __future__ import annotations

import torch

FORWARD = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2**-8, 2**-8),
    torch.bfloat16: (2**-7, 2**-7),
}
BACKWARD = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2**-6, 2**-6),
    torch.bfloat16: (2**-5, 2**-5),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, grad: bool = False, what: str = ""
) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise (NaN never passes), from the table."""
    atol, rtol = (BACKWARD if grad else FORWARD)[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    err = torch.where(both_inf, torch.zeros_like(a), (a - e).abs())
    bound = atol + rtol * e.abs().nan_to_num(posinf=0.0, neginf=0.0)
    bad = ~(err <= bound)  # catches NaN
    if bad.any():
        idx = tuple(i.item() for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{bad.numel()} elements out of tolerance "
            f"(atol={atol:g}, rtol={rtol:g}); max error {err.nan_to_num(nan=float('inf')).max().item():.3g}; "
            f"first at {idx}: got {a[idx].item()!r}, expected {e[idx].item()!r}"
        )
