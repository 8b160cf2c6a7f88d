"""Greedy identity on the embedded SmolLM2-135M for each draft source, batch 1 and batch 4 with padding."""

from __future__ import annotations

import copy

import pytest
import torch

import optimum_atb
from optimum_atb.speculative import attach

NEW_TOKENS = 32
PROMPTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Photosynthesis is the process by which green plants use sunlight to",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
]


def truncated_copy(model, layers: int = 6):
    """The target's first `layers` decoder layers and its head: a draft sharing the vocabulary."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    return draft


SOURCES = {
    # a fixed draft length: the adaptive policy may rightly switch a weak truncated draft off
    "truncated": lambda m: {
        "assistant_model": truncated_copy(m),
        "num_assistant_tokens_schedule": "constant",
    },
    "int4_self": lambda m: {"assistant_model": optimum_atb.draft_from(m, quantize="int4")},
    "ngram": lambda m: {"prompt_lookup_num_tokens": 8, "num_assistant_tokens_schedule": "constant"},
}


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_greedy_identity_smollm2(smollm2, smollm2_tokenizer, source, batch):
    tok = smollm2_tokenizer
    tok.padding_side = "left"
    inputs = dict(tok(PROMPTS[:batch], return_tensors="pt", padding=True))
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.inference_mode():
        ref = smollm2.generate(**inputs, **kwargs)
        attach(smollm2)
        out = smollm2.generate(**inputs, **kwargs, **SOURCES[source](smollm2))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    stats = smollm2.atb_speculative_stats
    assert stats.accepted_tokens > 0 and stats.tokens_per_target_forward > 1.0


@pytest.mark.real_model
@pytest.mark.slow
def test_greedy_identity_smollm2_paged_batch(smollm2, smollm2_tokenizer):
    """After to_atb(), with a PagedCache: rows crop their rejected drafts apart, output stays stock."""
    tok = smollm2_tokenizer
    tok.padding_side = "left"
    inputs = dict(tok(PROMPTS, return_tensors="pt", padding=True))
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    converted = copy.deepcopy(smollm2).to_atb()
    with torch.inference_mode():
        ref = smollm2.generate(**inputs, **kwargs)
        out = converted.generate(
            **inputs,
            **kwargs,
            assistant_model=optimum_atb.draft_from(smollm2),
            cache_implementation="atb_paged",
        )
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert converted.atb_speculative_stats.accepted_tokens > 0


@pytest.mark.real_model
@pytest.mark.slow  # compiles four graphs: single-token and wide, for the target and the draft (~3 min)
def test_greedy_identity_smollm2_compiled_verify_and_draft(smollm2, smollm2_tokenizer):
    """to_atb(compile=True) target and draft_from(compile=True): stock's tokens, through compiled forwards."""
    tok = smollm2_tokenizer
    tok.padding_side = "left"
    inputs = dict(tok(PROMPTS, return_tensors="pt", padding=True))
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    target = copy.deepcopy(smollm2).to_atb(compile=True)
    draft = optimum_atb.draft_from(target, quantize="int4", compile=True)
    with torch.inference_mode():
        ref = smollm2.generate(**inputs, **kwargs)
        out = target.generate(**inputs, **kwargs, assistant_model=draft)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert target.atb_speculative_stats.accepted_tokens > 0
    assert target._atb_compiled_forward.compiles and draft._atb_compiled_forward.compiles
