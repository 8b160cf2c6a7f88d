"""attach/detach: route one model's ``generate(assistant_model=...)`` and
``generate(prompt_lookup_num_tokens=...)`` to the plugin's speculative decoder.

The hook is an instance attribute (a method bound to the model), so other models are untouched,
``deepcopy`` carries it to the copy (bound to the copy), and :func:`detach` restores what was there.
Every other ``generate`` call goes to the original method unchanged.
"""

from __future__ import annotations

import copy
import types

from .decoder import speculative_generate
from .drafts import ModelDraft, NgramDraft
from .errors import SpeculativeDecodingError

DEFAULT_MAX_DRAFT = 8
_MISSING = object()


def _vocab_size(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def _choose_draft(model, assistant_model, lookup, num_assistant_tokens):
    if assistant_model is not None and lookup is not None:
        raise SpeculativeDecodingError("pass either assistant_model or prompt_lookup_num_tokens, not both")
    if lookup is not None:
        if int(lookup) < 1:
            raise SpeculativeDecodingError(f"prompt_lookup_num_tokens must be >= 1, got {lookup}")
        return NgramDraft(k_max=int(num_assistant_tokens or lookup))
    if getattr(assistant_model.config, "is_encoder_decoder", False) or model.config.is_encoder_decoder:
        raise SpeculativeDecodingError("speculative decoding here supports decoder-only models only")
    if _vocab_size(assistant_model) != _vocab_size(model):
        raise SpeculativeDecodingError(
            f"the draft model's vocabulary ({_vocab_size(assistant_model)} tokens) differs from the target's "
            f"({_vocab_size(model)}): a draft must share the target's tokenizer and vocabulary"
        )
    return ModelDraft(assistant_model, k_max=int(num_assistant_tokens or DEFAULT_MAX_DRAFT))


def _generate(self, *args, assistant_model=None, prompt_lookup_num_tokens=None, **kwargs):
    """``generate`` of an attached model (see :func:`attach`)."""
    original = self.__dict__.get("_atb_generate_original") or type(self).generate.__get__(self)
    config = kwargs.get("generation_config")
    config_lookup = getattr(
        config if config is not None else self.generation_config, "prompt_lookup_num_tokens", None
    )
    lookup = prompt_lookup_num_tokens if prompt_lookup_num_tokens is not None else config_lookup
    if (assistant_model is None and lookup is None) or kwargs.get("custom_generate") is not None:
        if prompt_lookup_num_tokens is not None:
            kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
        return original(*args, assistant_model=assistant_model, **kwargs)

    num_assistant_tokens = kwargs.pop("num_assistant_tokens", None)
    fixed = kwargs.pop("num_assistant_tokens_schedule", "adaptive") == "constant"
    draft = _choose_draft(self, assistant_model, lookup, num_assistant_tokens)
    streamer = kwargs.get("streamer")
    inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if streamer is not None and inputs is not None and inputs.shape[0] > 1:
        raise SpeculativeDecodingError("a streamer needs batch size 1 with speculative decoding")
    if config_lookup is not None:
        config = copy.deepcopy(config if config is not None else self.generation_config)
        config.prompt_lookup_num_tokens = None
        kwargs["generation_config"] = config
    return original(
        *args,
        custom_generate=speculative_generate,
        atb_draft=draft,
        atb_streamer=streamer,
        atb_fixed_length=fixed,
        **kwargs,
    )


def attach(model) -> None:
    """Make `model.generate` run the plugin's speculative decoder for ``assistant_model=`` and
    ``prompt_lookup_num_tokens=``. Idempotent; undone by :func:`detach`.

    Extra ``generate`` options on that path: ``num_assistant_tokens`` (most draft tokens per round,
    default 8 for a draft model, ``prompt_lookup_num_tokens`` for n-gram lookup) and
    ``num_assistant_tokens_schedule="constant"`` (always draft that many; default adaptive per row).
    Statistics of the last call: ``model.atb_speculative_stats`` (:class:`SpeculativeStats`).
    """
    if is_attached(model):
        return
    model.__dict__["_atb_generate_original"] = model.__dict__.get("generate")
    model.__dict__["generate"] = types.MethodType(_generate, model)


def detach(model) -> None:
    """Undo :func:`attach` (no-op when `model` is not attached)."""
    if not is_attached(model):
        return
    original = model.__dict__.pop("_atb_generate_original", None)
    if original is None:
        del model.__dict__["generate"]
    else:
        model.__dict__["generate"] = original
    model.__dict__.pop("atb_speculative_stats", None)


def is_attached(model) -> bool:
    """Whether `model.generate` is routed through the speculative decoder."""
    bound = model.__dict__.get("generate", _MISSING)
    return getattr(bound, "__func__", None) is _generate
