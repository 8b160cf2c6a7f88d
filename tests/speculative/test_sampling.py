"""Sampled speculative decoding has the target's output distribution (rejection sampling is exact).

Reference: the exact joint distribution of the first three new tokens under the target alone, computed
by enumerating every 2-token continuation of the prompt and applying transformers' own temperature and
top-p warpers. 20,000 runs go through the speculative decoder as one batch of 20,000 rows.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from optimum_atb.speculative import attach

from ._tiny import noisy_copy, tiny_llama

VOCAB = 12
RUNS = 20_000
TEMPERATURE, TOP_P = 0.8, 0.9
PROMPT = [2, 9, 3, 2]  # n-gram lookup proposes "9 3" (the target gives 9 probability ~0.45)


def exact_distribution(model, prompt: list[int]) -> torch.Tensor:
    """P(t1, t2, t3 | prompt) under `model` with temperature and top-p, shape (V, V, V), float64."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))
    seqs = torch.cat([torch.tensor(prompt).expand(len(pairs), -1), pairs], dim=1)
    with torch.no_grad():
        logits = model(seqs).logits[:, len(prompt) - 1 :].double()
    warpers = [TemperatureLogitsWarper(TEMPERATURE), TopPLogitsWarper(TOP_P)]

    def probs(x):
        for w in warpers:
            x = w(None, x)
        return torch.softmax(x, dim=-1)

    p1 = probs(logits[:1, 0])[0]  # (V,)
    p2 = probs(logits[::VOCAB, 1])  # rows t1 = 0..V-1 (pairs with t2 = 0)
    p3 = probs(logits[:, 2]).reshape(VOCAB, VOCAB, VOCAB)  # [t1, t2, :]
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_p(samples: torch.Tensor, expected: torch.Tensor) -> float:
    """Goodness-of-fit p-value of (N, 3) samples against a (V, V, V) distribution; cells with
    an expected count below 5 are pooled into one."""
    from scipy.stats import chisquare

    index = samples[:, 0] * VOCAB * VOCAB + samples[:, 1] * VOCAB + samples[:, 2]
    observed = torch.bincount(index, minlength=VOCAB**3).double()
    exp = expected.reshape(-1) * samples.shape[0]
    small = exp < 5
    obs_cells = torch.cat([observed[~small], observed[small].sum()[None]])
    exp_cells = torch.cat([exp[~small], exp[small].sum()[None]])
    exp_cells = exp_cells * obs_cells.sum() / exp_cells.sum()
    return float(chisquare(obs_cells.numpy(), exp_cells.numpy()).pvalue)


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(VOCAB, seed=11, hidden=32, scale=0.4)
    draft = noisy_copy(target, 0.04, seed=2)  # acceptance ~0.67 on the first token
    return target, draft, exact_distribution(target, PROMPT)


def sample(model, **kwargs) -> torch.Tensor:
    ids = torch.tensor([PROMPT] * RUNS)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=True,
        temperature=TEMPERATURE, top_p=TOP_P, top_k=0, **kwargs,
    )  # fmt: skip
    assert out.shape == (RUNS, len(PROMPT) + 3)
    return out[:, len(PROMPT) :]


@pytest.mark.parametrize("source", ["draft_model", "ngram"])
def test_sampled_distribution_matches_target(models, source):
    target, draft, expected = models
    attach(target)
    kwargs = {"assistant_model": draft} if source == "draft_model" else {"prompt_lookup_num_tokens": 2}
    torch.manual_seed(1234)
    got = sample(target, **kwargs, num_assistant_tokens=2, num_assistant_tokens_schedule="constant")
    stats = target.atb_speculative_stats
    assert 0.1 < stats.acceptance_rate < 0.95  # both the accept and the reject path ran many times
    assert chi_square_p(got, expected) > 1e-3


def test_chi_square_detects_the_draft_distribution(models):
    """Power check: the draft's own samples (what an incorrect acceptance rule drifts toward) fail."""
    target, draft, expected = models
    torch.manual_seed(99)
    assert chi_square_p(sample(draft), expected) < 1e-3
