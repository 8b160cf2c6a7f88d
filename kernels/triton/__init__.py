"""The triton backend: importing this package registers its kernels in the dispatch table.

Runs on CUDA GPUs, or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how CI tests it. See docs/triton-kernels.md.
"""

from . import cache_write, flash_attention, glu, norms, paged_attention, rotary

__all__ = ["cache_write", "flash_attention", "glu", "norms", "paged_attention", "rotary"]
