"""The compiled draft's static cache (StaticSlotCache) gives the logits of the dynamic SlotCache, through
holes, compaction, forwards split to fit, and finished rows left idle; and the compiled draft drafts what
the eager one drafts."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import optimum_atb
from optimum_atb.speculative import attach, compile_draft, drafts
from optimum_atb.speculative.slots import SlotCache
from optimum_atb.speculative.static_slots import StaticSlotCache, attach_compiled, compiled_forward

from ._tiny import noisy_copy, padded_batch, tiny_llama

VOCAB = 64


class EagerStandIn:
    """Stands in for the compiled forward (same interface), records the widths it ran."""

    last_compiled = False

    def __init__(self, model):
        self.model, self.widths = model, []

    def __call__(self, **inputs):
        self.widths.append(inputs["input_ids"].shape[1])
        return self.model(**inputs)


def _trailing_valid(counts, width):
    return torch.arange(width)[None, :] < torch.tensor(counts)[:, None]


def _check_same(a, b, valid):
    """Logits of the valid positions agree."""
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-5)


def test_static_slots_match_dynamic_slots_through_holes_compaction_and_split_forwards(monkeypatch):
    model = tiny_llama(VOCAB, layers=2)
    gen = torch.Generator().manual_seed(0)
    stand_in = EagerStandIn(model)
    compactions = []
    compact = StaticSlotCache._compact
    monkeypatch.setattr(
        StaticSlotCache, "_compact", lambda self: (compactions.append(self.used), compact(self))
    )
    dynamic = SlotCache(model, DynamicCache(config=model.config), 3, torch.device("cpu"))
    static = StaticSlotCache(model, stand_in, 3, capacity=30, device=torch.device("cpu"))

    # left-padded prompt: leading invalid columns
    ids = torch.randint(1, VOCAB, (3, 6), generator=gen)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, :2] = valid[2, :5] = False
    with torch.inference_mode():
        _check_same(dynamic.forward(ids, valid, keep=6), static.forward(ids, valid, keep=6), valid)
        split = False
        rows = 3
        # (width, the row that keeps all its tokens): the others keep one (rejected drafts: holes); fills
        # the 30 columns, compacts at the 7th forward and splits the 8th (6 columns, 5 free after compacting)
        schedule = [(4, 0)] * 4 + [(4, 1), (4, 2), (2, 1), (6, 2), (1, 0), (2, 1), (3, 1)]
        for step, (width, lead) in enumerate(schedule):
            if step == 9:  # the middle row finishes: it stays in the static cache as an idle slot
                dynamic.select(torch.tensor([0, 2]))
                static.select(torch.tensor([0, 2]))
                rows = 2
            counts = torch.ones(rows, dtype=torch.long)
            counts[lead] = width
            ids = torch.randint(1, VOCAB, (rows, width), generator=gen)
            valid = _trailing_valid(counts.tolist(), width)
            split |= width > static.capacity - int(static.mask.sum(1).max())
            _check_same(
                dynamic.forward(ids, valid, keep=width), static.forward(ids, valid, keep=width), valid
            )
            keep = dynamic.lengths - counts + 1
            keep[lead] += counts[lead] - 1
            dynamic.truncate(keep)
            static.truncate(keep)
            torch.testing.assert_close(static.lengths, dynamic.lengths, rtol=0, atol=0)
    assert compactions and split  # both ways of making room were exercised
    # every forward but the first (it creates the cache) and split pieces went through the compiled one
    assert len(stand_in.widths) >= len(schedule) and {1, 2, 4} <= set(stand_in.widths)


def test_compile_draft_is_carried_by_deepcopy_to_the_copy():
    model = tiny_llama(VOCAB)
    compile_draft(model)
    copied = copy.deepcopy(model)
    assert copied._atb_compiled_forward.model is copied
    assert model._atb_compiled_forward.model is model


def test_compile_options_of_a_draft_replace_the_ones_it_was_copied_with():
    target = tiny_llama(VOCAB).to_atb(compile=True, compile_options={"cpp_wrapper": True})
    inherited = optimum_atb.draft_from(target, compile=True)
    assert inherited._atb_compiled_forward.options == {"cpp_wrapper": True}
    assert inherited._atb_compiled_forward.model is inherited
    options = {"size_asserts": False}
    own = optimum_atb.draft_from(target, compile=True, compile_options=options)
    options["size_asserts"] = True  # the draft keeps a copy
    assert own._atb_compiled_forward.options == {"size_asserts": False}
    assert compile_draft(tiny_llama(VOCAB))._atb_compiled_forward.options is None  # inductor's defaults
    assert compile_draft(own)._atb_compiled_forward.options == {"size_asserts": False}  # none given: kept
    assert target._atb_compiled_forward.options == {"cpp_wrapper": True}  # the target is untouched


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: optimum_atb.draft_from(m, compile_options={"cpp_wrapper": True}), "compile=True"),
        (
            lambda m: optimum_atb.draft_from(m, compile=True, compile_options={"cpp_wraper": True}),
            "cpp_wraper",
        ),
        (lambda m: compile_draft(m, ["cpp_wrapper"]), "dict of inductor option names"),
    ],
)
def test_bad_draft_compile_options_raise_before_anything_is_compiled(make, match):
    model = tiny_llama(VOCAB)
    with pytest.raises(optimum_atb.CompileOptionsError, match=match):
        make(model)
    assert compiled_forward(model) is None


@pytest.mark.slow  # compiles two draft graphs (about 10 s on 2 cores)
def test_compiled_draft_proposes_what_the_eager_draft_proposes(monkeypatch):
    target = tiny_llama(VOCAB)
    attach(target)
    inputs = padded_batch(VOCAB)
    expected = type(target).generate(target, **inputs, max_new_tokens=24, do_sample=False)
    eager = noisy_copy(target, 0.05)
    compiled = compile_draft(copy.deepcopy(eager))
    proposals, timed = [], []
    propose = drafts.ModelDraft.propose

    def recording(self, view, counts):
        out = propose(self, view, counts)
        proposals[-1].append(out[0].clone())
        timed[-1].append(self.timed)
        return out

    monkeypatch.setattr(drafts.ModelDraft, "propose", recording)
    kwargs = dict(max_new_tokens=24, do_sample=False, num_assistant_tokens_schedule="constant")
    for draft in (eager, compiled):
        proposals.append([])
        timed.append([])
        out = target.generate(**inputs, assistant_model=draft, num_assistant_tokens=3, **kwargs)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(proposals[0]) == len(proposals[1]) > 5
    for a, b in zip(*proposals):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert compiled._atb_compiled_forward.compiles >= 2  # one token, and wider
    assert not all(timed[1]) and all(timed[0])  # the rounds that compiled a graph are not timed


@pytest.mark.slow  # compiles two graphs (about 15 s on 2 cores)
def test_verify_forwards_of_any_width_share_one_compiled_graph_on_a_converted_fp32_model():
    """fp32 ``ops.linear`` chooses its form by row count; inside the dynamic-width graph it must not,
    or every verify width compiles its own graph (seconds to a minute each on a small CPU)."""
    stock = tiny_llama(VOCAB)
    model = copy.deepcopy(stock).to_atb()
    attach_compiled(model)
    slots = StaticSlotCache(model, compiled_forward(model), 1, 128, torch.device("cpu"))
    reference = DynamicCache(config=stock.config)
    gen = torch.Generator().manual_seed(3)
    seen = 0
    for width in (7, 1, 2, 3, 5, 4, 9, 2):
        ids = torch.randint(1, VOCAB, (1, width), generator=gen)
        out = slots.forward(ids, torch.ones_like(ids), keep=width)
        positions = torch.arange(seen, seen + width)[None]
        expected = stock(input_ids=ids, position_ids=positions, cache=reference).logits
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        seen += width
    assert compiled_forward(model).compiles == 2  # one token, and every wider forward
