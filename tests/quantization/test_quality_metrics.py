"""optimum_atb.quantization.evaluate / compare_logits on hand-computable logits and a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_atb.quantization import evaluate
from optimum_atb.quantization.quality import compare_logits, next_token_logits, next_token_targets


def test_identical_logits():
    logits = torch.randn(7, 11)
    targets = torch.randint(0, 11, (7,))
    r = compare_logits(logits, logits.clone(), targets)
    assert r.next_token_agreement == 1.0 and r.mean_kl == pytest.approx(0.0, abs=1e-12)
    expected_ppl = math.exp(-logits.double().log_softmax(-1)[torch.arange(7), targets].mean().item())
    assert r.perplexity == pytest.approx(expected_ppl) and r.perplexity_change == pytest.approx(0.0)
    assert r.positions == 7


def test_near_tie_flip_is_not_decisive():
    # position 0: the reference nearly tied (margin 0.2; the model is sure of the other token) and flipped;
    # position 1: decisive (margin 3) and kept. Only the reference's margin makes a position decisive.
    reference = torch.tensor([[1.0, 0.8, -5.0], [4.0, 1.0, 0.0]])
    model = torch.tensor([[0.0, 3.0, -5.0], [4.0, 1.0, 0.0]])
    r = compare_logits(model, reference, torch.tensor([0, 0]), margin=1.0)
    assert r.next_token_agreement == 0.5
    assert r.decisive_share == 0.5 and r.decisive_agreement == 1.0
    p = reference[0].double().softmax(-1)
    kl0 = (p * (p.log() - model[0].double().log_softmax(-1))).sum().item()
    assert r.mean_kl == pytest.approx(kl0 / 2)


def test_decisive_flip_counts():
    reference = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    model = torch.tensor([[0.0, 3.0], [3.0, 0.0]])
    r = compare_logits(model, reference, torch.tensor([0, 0]), margin=1.0)
    assert r.decisive_share == 1.0 and r.decisive_agreement == 0.5


def test_no_decisive_position_gives_nan():
    r = compare_logits(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    assert r.decisive_share == 0.0 and math.isnan(r.decisive_agreement)


@pytest.mark.parametrize(
    "shapes", [((3, 4), (3, 5), (3,)), ((3, 4), (3, 4), (2,)), ((1, 3, 4), (1, 3, 4), (1, 3))]
)
def test_shape_errors(shapes):
    a, b, t = shapes
    with pytest.raises(ValueError, match="expected logits"):
        compare_logits(torch.zeros(a), torch.zeros(b), torch.zeros(t, dtype=torch.long))


def test_chunks_and_targets():
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=50, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 23))
    logits = next_token_logits(model, ids, chunk=10)
    targets = next_token_targets(ids, chunk=10)
    # chunks [0:10], [10:20], [20:23]: 9 + 9 + 2 predictions, each chunk run on its own
    assert logits.shape == (20, model.config.vocab_size) and targets.shape == (20,)
    with torch.inference_mode():
        second = model(ids[:, 10:20]).logits[0, :-1].float()
    torch.testing.assert_close(logits[9:18], second)
    assert torch.equal(targets[9:18], ids[0, 11:20])
    r = evaluate(model, model, ids, chunk=10)
    assert r.next_token_agreement == 1.0 and r.positions == 20
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        next_token_logits(model, ids.expand(2, -1))
