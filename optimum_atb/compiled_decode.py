"""``to_atb(compile=True)``: a compiled, static-shape decode step through transformers' own machinery.

Once the fused modules have cut the number of ops, what is left of batch-1 decode on a CPU is the
Python and dispatch cost of each op (~0.4 ms per decoder layer). ``torch.compile`` over a decode step
with a :class:`~transformers.StaticCache` removes it. transformers already knows how: ``generate`` runs the
prefill eagerly and the decode steps through ``model.get_compiled_call(compile_config)`` when the cache
is compileable; on a CPU it only does so when ``compile_config._compile_all_devices`` is set. This module
sets the model's generation config accordingly and restores it on ``revert``.

The first ``generate`` for a new batch size (or a longer cache) compiles the step: about 20-30 s for
SmolLM2-135M on a 2-core CPU once inductor's cache holds the kernels, about two minutes with an empty
one. A cache passed explicitly (``PagedCache``, ``DynamicCache``) runs eagerly.

``compile_options`` are inductor's options (``torch.compile(options=...)``, ``torch._inductor.list_options()``)
for these graphs and the speculative decoder's. On a CPU the decode step's options update
``CPU_DEFAULT_OPTIONS``: inductor's C++ wrapper (``cpp_wrapper``) replaces the Python code that calls the
step's kernels with compiled C++. That code is a visible share of a small model's decode step there; the
first compile takes about twice as long (docs/results-cpu.md). ``compile_options={"cpp_wrapper": False}``
turns it off. The speculative decoder's graphs take ``compile_options`` as given (no gain measured there, a
first compile three times as long).
"""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn
from transformers import CompileConfig

from .errors import BackendUnavailableError, CompileOptionsError

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


def check_options(options: dict | None, compile: bool) -> None:
    """Reject `options` that ``torch.compile`` would only reject at the first ``generate``."""
    if options is None:
        return
    if not compile:
        raise CompileOptionsError("compile_options apply to compiled graphs: pass compile=True as well.")
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise CompileOptionsError(f"compile_options must be a dict of inductor option names, got {options!r}")
    from torch._inductor import list_options

    unknown = sorted(set(options) - set(list_options()))
    if unknown:
        raise CompileOptionsError(
            f"unknown inductor option(s) {unknown}: see torch._inductor.list_options() (e.g. 'cpp_wrapper')."
        )


# Inductor options for a CPU model's decode step unless ``compile_options`` say otherwise: the C++ wrapper.
# SmolLM2 int4+compile on the second Xeon, with it against without: +3%, +6% and +7% tokens/s alternated in one
# process, +4% to +15% at batch 1 in bench_quant's interleaved runs (sessions 17-18, docs/results-cpu.md);
# int8+compile within noise; the first compile with an empty inductor cache 129 against 68 s. Not for the
# speculative decoder's graphs: there 41.5 against 43.5 tokens/s (noise) and a first compile of 477 against 150 s.
CPU_DEFAULT_OPTIONS = {"cpp_wrapper": True}


def decode_options(options: dict | None, device: torch.device) -> dict | None:
    """The inductor options of the compiled decode step of a model on `device`: on a CPU
    ``CPU_DEFAULT_OPTIONS`` updated with `options`, elsewhere `options` (None: inductor's defaults). Always a
    new dict: the caller's may change."""
    if device.type == "cpu":
        return {**CPU_DEFAULT_OPTIONS, **(options or {})}
    return dict(options) if options else None


def enable(model: nn.Module, options: dict | None = None) -> dict:
    """Make ``model.generate`` decode through a compiled static-shape step, with inductor `options`
    (:func:`decode_options`; the speculative decoder's graphs take them as given); returns what to restore."""
    config = model.generation_config
    saved = {
        "cache_implementation": getattr(config, "cache_implementation", None),
        "compile_config": getattr(config, "compile_config", None),
    }
    step_options = decode_options(options, next(model.parameters()).device)
    # torch.compile takes a mode or options, not both (the default mode only matters on CUDA)
    if step_options:
        compile_config = CompileConfig(fullgraph=False, dynamic=False, mode=None, options=step_options)
    else:
        compile_config = CompileConfig(fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True
    config.compile_config = compile_config
    config.cache_implementation = "static"
    from .speculative.static_slots import attach_compiled

    attach_compiled(model, options)  # the speculative decoder's verify forwards (docs/speculative.md)
    first = "about two minutes" if step_options and step_options.get("cpp_wrapper") else "about a minute"
    logger.warning(
        "optimum-atb: generate() now decodes with a compiled step; the first call for a new batch size "
        "or a longer cache compiles it (about 20-30 s for a 135M model on a 2-core CPU once inductor's "
        "cache holds its kernels, %s the first time).",
        first,
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
