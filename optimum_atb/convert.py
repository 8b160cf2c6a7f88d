"""``model.to_atb()`` and ``optimum_atb.revert(model)``: instance-level conversion of LLaMA-family models.

Conversion gives the model's own module instances fused forwards (:mod:`optimum_atb.patches.fused`;
each converted module's class is swapped for a same-named subclass, see `_bind`) and adds concatenated
QKV / gate-up projections whose weights the original parameters view (:mod:`optimum_atb.patches.weights`).
Other models in the process, the transformers classes and the checkpoint format are untouched; ``revert``
restores the stock modules exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import nn

from .backends import resolve, use_backend
from .errors import QuantizationError, UnsupportedModelError

FUSIONS = ("norm", "rotary", "qkv", "mlp", "attention", "linear")
QUANTIZE_BITS = {"int8": 8, "int4": 4}
_ATTENTION_FUSIONS = {"rotary", "qkv", "attention"}
ATB_BASE = "_atb_stock_class"  # class attribute of a converted module's class: the class it replaced


@dataclass
class _State:
    """What ``to_atb`` changed on one model, so that ``revert`` can undo it."""

    fuse: frozenset[str]
    backend: str
    quantize: str | None
    # (module, previous instance forward, previous class): what each _bind changed
    forwards: list[tuple[nn.Module, object, type | None]] = field(default_factory=list)
    fused: list[tuple[nn.Module, tuple[str, ...], str]] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    attn_implementation: str | None = None  # the one to restore, when "attention" changed it
    compiled: dict | None = None  # generation-config values to restore, when compile=True set them


def _check_fuse(fuse: bool | Iterable[str]) -> frozenset[str]:
    if fuse is True:
        return frozenset(FUSIONS)
    if fuse is False or fuse is None:
        return frozenset()
    if isinstance(fuse, str):
        fuse = (fuse,)
    names = frozenset(fuse)
    unknown = sorted(names - set(FUSIONS))
    if unknown:
        raise ValueError(f"unknown fusion(s) {unknown}; choose from {FUSIONS} (or fuse=True for all)")
    return names


def _check_backend(model: nn.Module, backend: str) -> None:
    if backend == "auto":
        return
    device = next(model.parameters()).device
    with use_backend(backend):  # raises ValueError for an unknown name
        resolve(device)  # raises BackendUnavailableError when it cannot run on the model's device


@functools.cache
def _fused_class(cls: type, forward) -> type:
    """A subclass of `cls` whose forward is `forward`, under `cls`'s own name (reprs stay stock).

    `forward` is set after the class exists: a hook on subclass creation (transformers' gradient
    checkpointing layers) would otherwise wrap it, adding a frame per call and guards to compiled graphs.
    """
    fused = type(cls.__name__, (cls,), {"__module__": cls.__module__, ATB_BASE: cls})
    fused.forward = forward
    return fused


def _bind(state: _State, module: nn.Module, fn, per_instance: bool = False) -> None:
    """Make `fn` `module`'s forward. The module's class is swapped for a cached subclass whose forward is
    `fn`: torch.compile checks a class with one cheap type guard, whereas an instance-bound method costs a
    Python guard (``module is module.forward.__self__``) per module on every call of a compiled graph.
    A module that already has an instance forward (an accelerate hook, say) gets `fn` bound on the
    instance instead, as does anything `per_instance` (a closure)."""
    own = module.__dict__.get("forward")
    if own is None and not per_instance:
        state.forwards.append((module, None, type(module)))
        module.__class__ = _fused_class(type(module), fn)
    else:
        state.forwards.append((module, own, None))
        module.forward = MethodType(fn, module)


def stock_class(module: nn.Module) -> type:
    """The class `module` had before conversion (its own class when it was not converted)."""
    return getattr(type(module), ATB_BASE, type(module))


def _pin_backend(state: _State, model: nn.Module, backend: str) -> None:
    inner = model.forward

    @functools.wraps(type(model).forward)
    def pinned(self, *args, **kwargs):
        with use_backend(backend):
            return inner(*args, **kwargs)

    _bind(state, model, pinned, per_instance=True)


def _glu(spec, config):
    from .patches.fused import GLU_OPS

    return GLU_OPS.get(getattr(config, spec.act_config_key, None), (None, {}))


def _convert_layer(state: _State, spec, layer: nn.Module, config) -> None:
    from .patches import fused
    from .patches.weights import can_fuse, fuse_linears

    fuse = state.fuse
    attn, mlp = layer.self_attn, layer.mlp

    def concat(parent: nn.Module, parts: tuple[str, ...]) -> bool:
        # float or quantized alike (quantization ran first); parts left in other formats stay apart
        return not spec.fused_in_checkpoint and can_fuse([getattr(parent, name) for name in parts])

    if "norm" in fuse:
        layer._atb = fused.DecoderPlan(fused.norm_eps(layer.input_layernorm), spec.norm_offset)
        _bind(state, layer, spec.decoder_forward)
    if fuse & _ATTENTION_FUSIONS or ("norm" in fuse and spec.qk_norm):
        if "qkv" in fuse and concat(attn, ("q_proj", "k_proj", "v_proj")):
            state.hooks += fuse_linears(attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
            state.fused.append((attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"))
        split = None
        if hasattr(attn, "qkv_proj"):
            q_size = config.num_attention_heads * attn.head_dim
            kv_size = config.num_key_value_heads * attn.head_dim
            split = (q_size, kv_size, kv_size)
        qk_norm = None
        if spec.qk_norm and "norm" in fuse:
            qk_norm = (fused.norm_eps(attn.q_norm), spec.norm_offset)
        attn._atb = fused.AttentionPlan(
            head_dim=attn.head_dim,
            split=split,
            rotary="rotary" in fuse,
            attention="attention" in fuse,
            sliding_window=attn.sliding_window
            if hasattr(attn, "sliding_window")
            else getattr(config, "sliding_window", None),
            softcap=getattr(attn, "attn_logit_softcapping", None),
            qk_norm=qk_norm,
            apply_rotary_pos_emb=spec.modeling.apply_rotary_pos_emb,
            eager_attention=spec.modeling.eager_attention_forward,
        )
        _bind(state, attn, fused.attention_forward)
    if "mlp" in fuse:
        if concat(mlp, ("gate_proj", "up_proj")):
            state.hooks += fuse_linears(mlp, ("gate_proj", "up_proj"), "gate_up_proj")
            state.fused.append((mlp, ("gate_proj", "up_proj"), "gate_up_proj"))
        glu, glu_kwargs = _glu(spec, config)
        mlp._atb = fused.MLPPlan(glu, dict(glu_kwargs))  # one dict per layer: no aliasing guards
        _bind(state, mlp, fused.mlp_forward)
    if "linear" in fuse:
        for parent in (attn, mlp):
            _bind_linears(state, parent.children())


def _bind_linears(state: _State, modules: Iterable[nn.Module]) -> None:
    """Plain float32 ``nn.Linear`` modules on the CPU (not quantized ones) take the CPU small-row matmul;
    elsewhere ``F.linear`` is already the right call and a wrapper would only add Python per call."""
    from .patches import fused

    for module in modules:
        if (
            type(module) is nn.Linear
            and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu"
        ):
            _bind(state, module, fused.linear_forward)


def _decoder_layers(model: nn.Module, spec) -> list[nn.Module]:
    layer_cls, attn_cls, mlp_cls = spec.cls("DecoderLayer"), spec.cls("Attention"), spec.cls("MLP")
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    bad = [
        type(m).__name__
        for layer in layers
        for m, cls in ((layer.self_attn, attn_cls), (layer.mlp, mlp_cls))
        if not isinstance(m, cls)
    ]
    if not layers or bad:
        raise UnsupportedModelError(
            f"to_atb() expected {layer_cls.__name__} layers with {attn_cls.__name__} and {mlp_cls.__name__} "
            f"for model_type {spec.name!r}, found {bad or 'no decoder layer'}; the modules were replaced or the "
            "model is not one of the supported architectures."
        )
    return layers


def to_atb(
    model: nn.Module,
    *,
    backend: str = "auto",
    fuse: bool | Iterable[str] = True,
    quantize: str | None = None,
    group_size: int | None = None,
    include_lm_head: bool | None = None,
    compile: bool = False,
    compile_options: dict | None = None,
) -> nn.Module:
    """Convert a LLaMA-family model in place to optimum-atb's fused modules and return it.

    ``fuse``: True (all), False, or a subset of ``FUSIONS``. ``backend``: ``"auto"`` (by device) or a
    backend name pinned for this model's ops (checked now: ``BackendUnavailableError``). ``quantize``:
    None, ``"int8"`` or ``"int4"`` weight-only (with ``group_size``; Q/K/V and gate/up are concatenated
    as quantized layers, one matmul each); ``include_lm_head`` (None: quantize()'s default, True) quantizes the output
    projection too, always to int8 (docs/quantization.md). ``compile``: decode through a compiled
    static-shape step (:mod:`optimum_atb.compiled_decode`; the first ``generate`` per batch size compiles
    it), with inductor's ``compile_options`` (on a CPU the step defaults to ``{"cpp_wrapper": True}``:
    :func:`~optimum_atb.compiled_decode.decode_options`). A second call is a no-op.
    Raises :class:`UnsupportedModelError` for other architectures, before changing anything.
    """
    if getattr(model, "_atb_state", None) is not None:
        return model
    from .patches import spec_for

    fusions = _check_fuse(fuse)
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise QuantizationError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    config = model.config
    spec = spec_for(getattr(config, "model_type", None))
    layers = _decoder_layers(model, spec)
    _check_backend(model, backend)
    from . import compiled_decode

    compiled_decode.check_options(compile_options, compile)
    if compile:
        compiled_decode.check_compiler(next(model.parameters()).device)

    state = _State(fuse=fusions, backend=backend, quantize=quantize)
    if quantize is not None:  # first: Q/K/V and gate/up are then concatenated as quantized layers
        from .quantization import quantize as quantize_model

        quantize_model(
            model, bits=QUANTIZE_BITS[quantize], group_size=group_size, include_lm_head=include_lm_head
        )
    with torch.no_grad():
        for layer in layers:
            _convert_layer(state, spec, layer, config)
    if "linear" in fusions:
        _bind_linears(state, [model.get_output_embeddings()])
    if "attention" in fusions and config._attn_implementation != "atb":
        state.attn_implementation = config._attn_implementation
        model.set_attn_implementation("atb")
    if backend != "auto":
        _pin_backend(state, model, backend)
    model._atb_state = state
    if compile:
        state.compiled = compiled_decode.enable(model, compile_options)
    from . import speculative

    speculative.attach(model)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`to_atb`: stock modules, plain parameters, logits identical to before conversion.

    A model quantized by ``to_atb(quantize=...)`` cannot be restored (its weights were replaced):
    raises :class:`QuantizationError`. A model that was never converted is returned unchanged.
    """
    state: _State | None = getattr(model, "_atb_state", None)
    if state is None:
        return model
    if state.quantize is not None:
        raise QuantizationError(
            f"revert() cannot restore a model quantized to {state.quantize}: the original weights are gone. "
            "Reload the model instead."
        )
    from . import speculative
    from .patches.weights import unfuse_linears

    speculative.detach(model)
    if state.compiled is not None:
        from . import compiled_decode

        compiled_decode.disable(model, state.compiled)
    for module, previous, cls in reversed(state.forwards):
        if cls is not None:
            module.__class__ = cls
        elif previous is None:
            del module.forward
        else:
            module.forward = previous
        module.__dict__.pop("_atb", None)
    for handle in state.hooks:
        handle.remove()
    with torch.no_grad():
        for parent, parts, name in state.fused:
            unfuse_linears(parent, parts, name)
    if state.attn_implementation is not None:
        model.set_attn_implementation(state.attn_implementation)
    del model._atb_state
    return model
