"""``to_atb(compile=True)``: a compiled, static-shape decode step through transformers' own machinery.

Once the fused modules have cut the number of ops, what is left of batch-1 decode on a CPU is the
Python and dispatch cost of each op (~0.4 ms per decoder layer). ``torch.compile`` over a decode step
with a :class:`~transformers.StaticCache` removes it. transformers already knows how: ``generate`` runs the
prefill eagerly and the decode steps through ``model.get_compiled_call(compile_config)`` when the cache
is compileable; on a CPU it only does so when ``compile_config._compile_all_devices`` is set. This module
sets the model's generation config accordingly and restores it on ``revert``.

The first ``generate`` for a new batch size (or a longer cache) compiles the step: about 20-30 s for
SmolLM2-135M on a 2-core CPU. A cache passed explicitly (``PagedCache``, ``DynamicCache``) runs eagerly.
"""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn
from transformers import CompileConfig

from .errors import BackendUnavailableError

logger = logging.getLogger("optimum_atb")


def check_compiler(device: torch.device) -> None:
    """Inductor builds C++ on CPUs: fail now, with what to install, rather than at the first token."""
    if device.type != "cpu":
        return
    from torch._inductor import config

    configured = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    if not any(shutil.which(c) for c in (configured, "g++", "clang++", "c++") if c):
        raise BackendUnavailableError(
            "to_atb(compile=True) needs a C++ compiler on CPU (torch.compile's inductor builds C++): "
            "install g++ (apt install g++) or use to_atb() without compile."
        )


def enable(model: nn.Module) -> dict:
    """Make ``model.generate`` decode through a compiled static-shape step; returns what to restore."""
    config = model.generation_config
    saved = {
        "cache_implementation": getattr(config, "cache_implementation", None),
        "compile_config": getattr(config, "compile_config", None),
    }
    compile_config = CompileConfig(fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True
    config.compile_config = compile_config
    config.cache_implementation = "static"
    from .speculative.static_slots import attach_compiled

    attach_compiled(model)  # the speculative decoder's verify forwards (docs/speculative.md)
    logger.warning(
        "optimum-atb: generate() now decodes with a compiled step; the first call for a new batch size "
        "or a longer cache compiles it (about 20-30 s for a 135M model on a 2-core CPU)."
    )
    return saved


def disable(model: nn.Module, saved: dict) -> None:
    """Undo :func:`enable`: the generation config as it was, no compiled call kept."""
    config = model.generation_config
    for key, value in saved.items():
        setattr(config, key, value)
    from .speculative.static_slots import COMPILED_ATTR

    for attr in ("_compiled_call", "_last_compile_config", COMPILED_ATTR):
        model.__dict__.pop(attr, None)
