"""The adaptive draft length: the target's cost per forward width, the draft's step cost, the choice of k."""

from __future__ import annotations

import pytest
import torch

from optimum_atb.speculative import attach, drafts, policy
from optimum_atb.speculative.policy import DraftLengthPolicy, TargetCostModel

from ._tiny import padded_batch, tiny_llama

MS = 1e-3


def test_cost_model_widths_seen_unseen_and_beyond():
    model = TargetCostModel()
    assert model.cost([1, 2]) is None  # nothing timed yet
    model.observe_prefill(41, 41 * 3 * MS + 20 * MS)  # 3 ms per token on top of the base cost
    model.observe(2, 24 * MS)
    model.observe(5, 46 * MS)
    slope = (41 * 3 + 20 - 46) / (41 - 5)  # above the widest seen: the prefill's rate past it
    # unseen widths cost what the nearest narrower seen one costs; below the narrowest, in proportion
    want = [12, 24, 24, 24, 46, 46 + slope, 46 + 3 * slope]
    assert model.cost([1, 2, 3, 4, 5, 6, 8]) == pytest.approx([w * MS for w in want])
    model.observe(5, 56 * MS)  # a decayed mean: 0.8 * old + 0.2 * new
    assert model.cost([5]) == pytest.approx([(0.8 * 46 + 0.2 * 56) * MS])


def test_cost_model_slope_is_capped_and_defaults_without_prefill():
    model = TargetCostModel()
    model.observe(1, 10 * MS)
    assert model.cost([3]) == pytest.approx([30 * MS])  # no prefill: the seen width's cost per token
    model.observe_prefill(11, 1.0)  # an absurd prefill: an extra token never costs more than a forward
    assert model.cost([3]) == pytest.approx([30 * MS])


def _policy_with_costs(costs_ms: dict[int, float], draft_ms: float, accepted: float, rejected: float):
    p = DraftLengthPolicy(1, k_max=8, device=torch.device("cpu"))
    for width, ms in costs_ms.items():
        p.target.observe(width, ms * MS)
    p.observe_draft(1, draft_ms * MS)
    p.accepted[:] = accepted
    p.rejected[:] = rejected
    return p


def test_first_round_drafts_one_token():
    p = DraftLengthPolicy(2, k_max=8, device=torch.device("cpu"))
    assert p.lengths(torch.arange(2), torch.tensor([50, 50])).tolist() == [1, 1]


def test_policy_follows_a_step_shaped_target_cost():
    """1-4 tokens stream the weights once (cheap), 5+ are compute-bound: with good drafts, k = 3."""
    step = {w: 24 if w <= 4 else 46 + 2 * (w - 5) for w in range(1, 10)}
    p = _policy_with_costs(step, draft_ms=12, accepted=19, rejected=1)
    assert p.lengths(torch.arange(1), torch.tensor([50])).tolist() == [3]
    linear = {w: 20 + 2 * w for w in range(1, 10)}  # the same drafts with a cost linear in the width
    p = _policy_with_costs(linear, draft_ms=12, accepted=19, rejected=1)
    assert p.lengths(torch.arange(1), torch.tensor([50])).item() > 3


def test_a_width_narrower_than_any_seen_gets_tried():
    """Batch 4 starts with k=1 (8 tokens); plain decoding (4 tokens) must not be assumed as dear as that."""
    p = DraftLengthPolicy(4, k_max=8, device=torch.device("cpu"))
    p.target.observe(8, 46 * MS)
    p.observe_draft(1, 15 * MS)
    p.accepted[:], p.rejected[:] = 9, 1
    assert p.lengths(torch.arange(4), torch.full((4,), 50)).tolist() == [0, 0, 0, 0]


def test_policy_switches_off_useless_drafts_and_probes():
    p = _policy_with_costs({1: 24, 2: 25, 3: 26}, draft_ms=12, accepted=0.2, rejected=5)
    rows, room = torch.arange(1), torch.tensor([50])
    assert p.lengths(rows, room).item() == 0
    for _ in range(policy.PROBE_EVERY):
        p.update(rows, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert p.lengths(rows, room).item() == 1  # a probe after PROBE_EVERY idle rounds
    assert p.lengths(rows, torch.tensor([0])).item() == 0  # never past the room left


def test_rejected_probes_back_off_accepted_ones_reset():
    p = _policy_with_costs({1: 24, 2: 25, 3: 26}, draft_ms=12, accepted=0.2, rejected=5)
    rows, room, none = torch.arange(1), torch.tensor([50]), torch.zeros(1, dtype=torch.long)
    probes = []
    for round_ in range(policy.PROBE_EVERY * 8):
        k = p.lengths(rows, room)
        if k.item():
            probes.append(round_)
        p.update(rows, k, none)  # every probe fails
    e = policy.PROBE_EVERY
    assert probes == [e, e + 1 + 2 * e, e + 1 + 2 * e + 1 + 4 * e]  # waits of 16, 32, 64 idle rounds
    p.accepted[:], p.rejected[:] = 19, 1  # the draft turns good: a fully accepted round resets the wait
    k = p.lengths(rows, room)
    assert k.item() > 0
    p.update(rows, k, k)
    assert p.probe_every.item() == e


def test_no_probe_when_drafting_cannot_pay():
    """When even accepted drafts lose (a verify of 2 tokens costs twice one), probing only wastes time."""
    p = _policy_with_costs({1: 24, 2: 48, 3: 72}, draft_ms=12, accepted=0.2, rejected=5)
    rows = torch.arange(1)
    for _ in range(policy.PROBE_EVERY):
        p.update(rows, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert p.lengths(rows, torch.tensor([50])).item() == 0


def test_catch_up_rounds_do_not_time_the_draft_step(monkeypatch):
    """After idle rounds the draft's first forward catches up on every token it missed: that round's time
    is not a draft step's cost (it would make drafting look dearer and keep it switched off)."""
    target = tiny_llama(64, layers=8)
    attach(target)
    # always wrong, and cheap enough that good drafts would pay: drafting switches off, then probes
    bad_draft = tiny_llama(64, seed=123, layers=1)
    backlogs, timed = [], []
    propose, observe = drafts.ModelDraft.propose, DraftLengthPolicy.observe_draft

    def recording_propose(self, view, counts):
        out = propose(self, view, counts)
        backlogs.append(self.backlog)
        return out

    def recording_observe(self, steps, seconds):
        timed.append(len(backlogs))
        return observe(self, steps, seconds)

    monkeypatch.setattr(drafts.ModelDraft, "propose", recording_propose)
    monkeypatch.setattr(DraftLengthPolicy, "observe_draft", recording_observe)
    target.generate(**padded_batch(64, rows=1), max_new_tokens=60, do_sample=False, assistant_model=bad_draft)
    assert any(b > 2 for b in backlogs)  # probes after idle rounds happened
    assert timed == [i + 1 for i, b in enumerate(backlogs) if b <= 2]


def _judge(g, seconds: float, tokens: int) -> None:
    """One guard verdict: JUDGE_ROUNDS drafting rounds of `seconds` and `tokens` each."""
    for _ in range(policy.JUDGE_ROUNDS):
        g.observe(True, seconds, tokens)


def test_guard_suspends_drafting_slower_than_plain_and_backs_off():
    """Drafting rounds that cost more per token than plain ones switch drafting off for the whole batch
    (no drafts, no probes), for twice as many rounds each time they are found slower again."""
    p = _policy_with_costs({1: 24, 2: 25, 3: 26}, draft_ms=1, accepted=19, rejected=1)
    rows, room = torch.arange(1), torch.tensor([50])
    assert p.lengths(rows, room).item() > 0  # the cost model says drafting pays
    g = p.guard
    g.observe(False, 0.024, 1)  # plain: 24 ms per token
    for _ in range(policy.JUDGE_ROUNDS - 1):
        g.observe(True, 0.100, 2)  # drafting: 50 ms per token, measured whole
        assert g.suspended == 0  # not judged on fewer rounds
    g.observe(True, 0.100, 2)
    assert g.suspended == policy.HOLD_ROUNDS and g.suspensions == 1
    for left in range(policy.HOLD_ROUNDS, 0, -1):
        assert p.lengths(rows, room).item() == 0
        g.observe(False, 0.024, 1)
        assert g.suspended == left - 1
    assert p.lengths(rows, room).item() > 0  # drafting is tried again
    g.observe(True, 5.0, 1, caught_up=True)  # the draft's catch-up after the suspension is not judged
    _judge(g, 0.100, 2)
    assert g.suspended == 2 * policy.HOLD_ROUNDS  # slower again: twice as long
    g.suspended = 0
    _judge(g, 0.030, 3)  # faster than plain now: the wait resets, drafting goes on
    assert g.suspended == 0 and g.hold == policy.HOLD_ROUNDS


def test_guard_averages_a_window_of_drafting_rounds():
    """One slow drafting round (a rejection) among fast ones does not switch drafting off."""
    g = policy.RoundRateGuard()
    g.observe(False, 0.024, 1)
    g.observe(True, 0.040, 1)  # 40 ms per token: slower than plain alone
    for _ in range(policy.JUDGE_ROUNDS - 1):
        g.observe(True, 0.040, 5)  # 8 ms per token
    assert g.suspended == 0 and g.suspensions == 0


def test_guard_waits_for_a_measured_plain_round_and_caps_its_hold():
    g = policy.RoundRateGuard()
    _judge(g, 1.0, 1)  # no plain round measured yet: the next round runs plain to measure one
    assert g.suspended == 1 and g.suspensions == 0
    g.observe(False, 0.01, 0)  # a round that committed nothing is not a rate
    assert g.plain_s is None and g.suspended == 1
    g.observe(False, 0.01, 1)
    assert g.suspended == 0
    g.observe(True, 1.0, 1)  # the window held back for want of a plain figure is judged now
    assert g.suspensions == 1
    for _ in range(20):
        g.suspended = 0
        _judge(g, 1.0, 1)
    assert g.hold == policy.MAX_HOLD_ROUNDS


def test_fixed_length_ignores_the_guard():
    p = DraftLengthPolicy(1, k_max=4, device=torch.device("cpu"), fixed=True)
    p.guard.suspended = 5
    assert p.lengths(torch.arange(1), torch.tensor([50])).item() == 4


def test_decoder_suspends_drafting_that_is_slower_than_plain(monkeypatch):
    """End to end: a draft that is always right but whose proposals cost far more than they save is
    switched off by the guard (the cost model, fed a cheap draft step, keeps asking for drafts); the tokens
    stay those of the target alone."""
    import time

    target = tiny_llama(64, layers=2)
    attach(target)
    draft = tiny_llama(64, layers=2)  # same weights as the target: every draft token is accepted
    inputs = padded_batch(64, rows=2)
    ref = target.generate(**inputs, max_new_tokens=80, do_sample=False)
    propose, calls = drafts.ModelDraft.propose, []

    def slow_propose(self, view, counts):
        calls.append(1)
        time.sleep(0.3)  # far dearer per token than a 2-layer verify, even with 9 tokens accepted per row
        return propose(self, view, counts)

    monkeypatch.setattr(drafts.ModelDraft, "propose", slow_propose)
    monkeypatch.setattr(DraftLengthPolicy, "observe_draft", lambda self, steps, seconds: None)  # hidden
    out = target.generate(**inputs, max_new_tokens=80, do_sample=False, assistant_model=draft)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    stats = target.atb_speculative_stats
    assert stats.suspensions >= 1
    assert stats.rounds - len(calls) >= policy.HOLD_ROUNDS  # the suspended rounds ran plain
