"""Greedy speculative decoding is token-identical to the target alone (tiny random models)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from optimum_atb.speculative import SpeculativeDecodingError, attach, detach, is_attached

from ._tiny import noisy_copy, padded_batch, tiny_llama

VOCAB = 64


@pytest.fixture
def target():
    model = tiny_llama(VOCAB)
    attach(model)
    return model


def stock(model, **kwargs):
    """The target alone: transformers' own generate, bypassing the hook."""
    return type(model).generate(model, **kwargs)


SOURCES = {
    "noisy_draft": lambda t: {"assistant_model": noisy_copy(t, 0.05)},
    "self_draft": lambda t: {"assistant_model": copy.deepcopy(t)},
    "ngram": lambda t: {"prompt_lookup_num_tokens": 4},
}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("schedule", ["adaptive", "constant"])
def test_greedy_identity_padded_batch(target, source, schedule):
    inputs = padded_batch(VOCAB)
    ref = stock(target, **inputs, max_new_tokens=24, do_sample=False)
    extra = (
        {"num_assistant_tokens_schedule": "constant", "num_assistant_tokens": 3}
        if schedule == "constant"
        else {}
    )
    out = target.generate(**inputs, max_new_tokens=24, do_sample=False, **SOURCES[source](target), **extra)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    stats = target.atb_speculative_stats
    assert stats.new_tokens == 4 * 24
    if schedule == "constant":
        assert stats.proposed_tokens > 0
    if source == "self_draft":
        assert stats.accepted_tokens == stats.proposed_tokens > 0


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_greedy_identity_paged_cache_rows_cropped_apart(target, source, monkeypatch):
    """After to_atb() a PagedCache keeps each row's own length: rejected drafts are cropped per row."""
    from optimum_atb import PagedCache

    inputs = padded_batch(VOCAB)
    ref = stock(target, **inputs, max_new_tokens=24, do_sample=False)
    converted = copy.deepcopy(target).to_atb()
    crops = []
    original = PagedCache.crop_rows
    monkeypatch.setattr(PagedCache, "crop_rows", lambda self, n: (crops.append(list(n)), original(self, n)))
    cache = PagedCache(target.config, block_size=4)

    out = converted.generate(
        **inputs, max_new_tokens=24, do_sample=False, cache=cache, **SOURCES[source](target)
    )

    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if source != "self_draft":  # an exact draft has nothing rejected
        assert any(len(set(n)) > 1 for n in crops), "rows were never cropped by different amounts"
    stats = cache.memory_stats()
    assert stats["wasted_slots"] < 4 * 4  # no row holds a block it does not use


def test_token_dependent_processor(target):
    """repetition_penalty and no_repeat_ngram_size see each verified position's own prefix."""
    inputs = padded_batch(VOCAB, seed=3)
    kwargs = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2)
    ref = stock(target, **inputs, **kwargs)
    out = target.generate(
        **inputs, **kwargs, assistant_model=copy.deepcopy(target), num_assistant_tokens_schedule="constant"
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert target.atb_speculative_stats.accepted_tokens > 0


def test_user_logits_processor(target):
    def ban_odd(input_ids, scores):
        scores = scores.clone()
        scores[:, 1::2] = -float("inf")
        return scores

    inputs = padded_batch(VOCAB, rows=2)
    kw = dict(max_new_tokens=12, do_sample=False, logits_processor=LogitsProcessorList([ban_odd]))
    ref = stock(target, **inputs, **kw)
    out = target.generate(**inputs, **kw, prompt_lookup_num_tokens=3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert (out[:, inputs["input_ids"].shape[1] :] % 2 == 0).all()


def test_eos_inside_accepted_run(target):
    """With a perfect draft every run is accepted whole; an EOS in the middle of a run ends that row there."""
    inputs = padded_batch(VOCAB, rows=3, seed=5)
    prompt_len = inputs["input_ids"].shape[1]
    free = stock(target, **inputs, max_new_tokens=16, do_sample=False)[:, prompt_len:]
    eos = int(free[0, 6])  # the 7th new token of row 0; runs of 1 + 4 tokens put it inside the second run
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=eos)
    ref = stock(target, **inputs, **kw)
    out = target.generate(
        **inputs, **kw, assistant_model=copy.deepcopy(target), num_assistant_tokens=4,
        num_assistant_tokens_schedule="constant",
    )  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    first = (free[0] == eos).nonzero()[0, 0].item()
    row0 = out[0, prompt_len:]
    assert row0[first] == eos and (row0[first + 1 :] == 0).all()


@pytest.mark.parametrize("max_new_tokens", [1, 2, 4, 5, 7])
def test_max_new_tokens_exact(target, max_new_tokens):
    inputs = padded_batch(VOCAB, rows=2, seed=7)
    ref = stock(target, **inputs, max_new_tokens=max_new_tokens, do_sample=False)
    out = target.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=copy.deepcopy(target),
        num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
    )  # fmt: skip
    assert out.shape == (2, inputs["input_ids"].shape[1] + max_new_tokens)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_stopping_criteria_and_streamer(target):
    class StopAfter(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1))

        def end(self):
            self.ended = True

    inputs = {k: v[:1] for k, v in padded_batch(VOCAB, seed=9).items()}
    prompt_len = inputs["input_ids"].shape[1]
    crit = StoppingCriteriaList([StopAfter(prompt_len + 11)])
    ref = stock(target, **inputs, max_new_tokens=30, do_sample=False, stopping_criteria=crit)
    streamer = Collect()
    out = target.generate(
        **inputs, max_new_tokens=30, do_sample=False, stopping_criteria=crit, streamer=streamer,
        assistant_model=copy.deepcopy(target), num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
    )  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.shape[1] == prompt_len + 11
    assert streamer.ended
    torch.testing.assert_close(torch.cat(streamer.chunks), out[0])  # prompt first, then each accepted run
    assert len(streamer.chunks) < 11  # runs of several tokens, not one token at a time


def test_different_vocabulary_is_rejected(target):
    inputs = padded_batch(VOCAB, rows=2)
    with pytest.raises(SpeculativeDecodingError, match="vocabulary"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=tiny_llama(VOCAB + 16))
    assert not hasattr(target, "atb_speculative_stats")
    ref = stock(target, **inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(target.generate(**inputs, max_new_tokens=4, do_sample=False), ref)


def test_useless_draft_backs_off(target):
    """A draft that is always wrong ends up proposing (almost) nothing: drafting costs more than it gains."""
    inputs = padded_batch(VOCAB, rows=1)
    bad = tiny_llama(VOCAB, seed=123)
    ref = stock(target, **inputs, max_new_tokens=48, do_sample=False)
    out = target.generate(**inputs, max_new_tokens=48, do_sample=False, assistant_model=bad)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    stats = target.atb_speculative_stats
    assert stats.acceptance_rate < 0.3
    assert stats.proposed_tokens < 0.25 * stats.rounds * 8  # 8 = default most draft tokens per round


def test_attach_is_instance_level_and_detach_restores(target):
    other = tiny_llama(VOCAB, seed=4)
    assert is_attached(target) and not is_attached(other)
    clone = copy.deepcopy(target)
    assert is_attached(clone) and clone.generate.__self__ is clone
    detach(target)
    assert not is_attached(target) and "generate" not in target.__dict__
    inputs = padded_batch(VOCAB, rows=1)
    target.generate(**inputs, max_new_tokens=3, prompt_lookup_num_tokens=2)  # stock prompt lookup again
    assert not hasattr(target, "atb_speculative_stats")


def test_unsupported_output_flag_is_clear(target):
    inputs = padded_batch(VOCAB, rows=1)
    with pytest.raises(SpeculativeDecodingError, match="output_scores"):
        target.generate(
            **inputs,
            max_new_tokens=3,
            prompt_lookup_num_tokens=2,
            output_scores=True,
            return_dict_in_generate=True,
        )
    out = target.generate(
        **inputs, max_new_tokens=3, prompt_lookup_num_tokens=2, return_dict_in_generate=True
    )
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3
