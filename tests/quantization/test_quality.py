"""Quality of the quantized SmolLM2-135M against its float32 model (`optimum_atb.quantization.evaluate`).

The float32 reference is transformers' dequantization of the embedded Q4_1 GGUF. `quantize()` re-quantizes
those weights (int8, int4); `load_gguf` keeps the file's own Q4_1 blocks, which must cost nothing beyond
bf16 activation rounding. Teacher-forced on a fixed public-domain text (tests/data/README.md): perplexity,
next-token agreement, agreement on decisive positions (fp32's top token ahead of its runner-up by >= 1
logit) and mean KL divergence; greedy agreement is position-wise over 5 prompts x 64 tokens, so one early
near-tie flip costs a whole row, and along fp32's greedy path (each of its 320 tokens predicted from fp32's
own earlier tokens: one decision per position). On this model 41% of the positions are within 1 logit of a tie, and every
disagreement of every format measured lies among them (benchmarks/quant_quality.py, docs/quantization.md).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import optimum_atb
from optimum_atb.quantization import QuantLinear, evaluate
from optimum_atb.quantization.quality import (
    compare_logits,
    continuation_logits,
    greedy_continuations,
    next_token_logits,
)

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TEXT = os.path.join(os.path.dirname(__file__), "..", "data", "public_domain_text.txt")
PPL_TOKENS = 512
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Photosynthesis is the process by which green plants",
    "Once upon a time, in a small village at the edge of a great forest,",
    "To install the package, open a terminal and",
    "The three laws of thermodynamics can be summarised as follows.",
]
NEW_TOKENS = 64


def greedy(model, tok) -> torch.Tensor:
    return greedy_continuations(model, tok, PROMPTS, NEW_TOKENS)


def greedy_path(model, tok, tokens_fp32: torch.Tensor, path_logits_fp32: torch.Tensor):
    """`model` against fp32 along fp32's greedy path (a QualityReport; its agreement figures are what count)."""
    logits = continuation_logits(model, tok, PROMPTS, tokens_fp32)
    return compare_logits(logits, path_logits_fp32, tokens_fp32.reshape(-1))


@pytest.fixture(scope="module")
def reference(_smollm2_pristine, smollm2_tokenizer):
    """(text ids [1, 512], fp32 next-token logits on them, fp32 greedy tokens of PROMPTS, fp32 logits along
    those tokens)."""
    with open(TEXT) as f:
        ids = smollm2_tokenizer(f.read(), return_tensors="pt")["input_ids"][:, :PPL_TOKENS]
    tokens = greedy(_smollm2_pristine, smollm2_tokenizer)
    path_logits = continuation_logits(_smollm2_pristine, smollm2_tokenizer, PROMPTS, tokens)
    return ids, next_token_logits(_smollm2_pristine, ids), tokens, path_logits


def test_greedy_path_logits_reproduce_the_greedy_tokens(reference):
    """Teacher-forced on its own greedy output, fp32 predicts exactly that output (positions aligned)."""
    _, _, tokens_fp32, path_logits = reference
    assert torch.equal(path_logits.argmax(-1), tokens_fp32.reshape(-1))


# Bounds: perplexity change, greedy agreement (position-wise / along fp32's greedy path), next-token agreement,
# agreement on decisive positions (fp32's top token ahead by >= 1 logit; on the text and on the greedy path),
# mean KL (nats). Measured values (docs/quantization.md) depend on the CPU's bf16 kernels: AMD EPYC / Intel Xeon.
@pytest.mark.parametrize(
    "bits,group,max_ppl_increase,min_greedy,min_path,min_next_token,min_decisive,max_kl",
    [
        # -0.1% / -0.4%, 43% / 50%, - / 96.9%, 91.8% / 92.6%, 100% / 99.7%, 0.021 / 0.021
        (8, None, 0.01, 0.25, 0.94, 0.88, 0.99, 0.03),
        # -3.8% / -3.7%, 70% / 63%, - / 97.8%, 94.1% / 94.9%, 100% / 100%, 0.011 / 0.011
        (8, 32, 0.01, 0.55, 0.95, 0.92, 0.99, 0.016),
        # +2.3% / +2.0%, 77% / 89%, - / 99.1%, 96.5% / 97.1%, 100% / 100%, 0.0057 / 0.0058
        (4, 32, 0.08, 0.5, 0.96, 0.93, 0.99, 0.008),
    ],
)
def test_quantize_quality(
    _smollm2_pristine, smollm2_tokenizer, reference, bits, group, max_ppl_increase, min_greedy, min_path,
    min_next_token, min_decisive, max_kl,
):  # fmt: skip
    ids, ref_logits, tokens_fp32, path_logits = reference
    model = optimum_atb.quantize(copy.deepcopy(_smollm2_pristine), bits=bits, group_size=group)
    assert model.lm_head.bits == 8  # the default: output projection in int8 whatever the body's bits
    report = evaluate(model, ref_logits, ids)
    agreement = (greedy(model, smollm2_tokenizer) == tokens_fp32).float().mean().item()
    path = greedy_path(model, smollm2_tokenizer, tokens_fp32, path_logits)
    print(
        f"\nint{bits} group {group}: {report}; greedy agreement {agreement:.1%} of {len(PROMPTS)}x{NEW_TOKENS}, "
        f"along fp32's greedy path {path.next_token_agreement:.1%} (decisive {path.decisive_agreement:.1%} "
        f"of {path.decisive_share:.0%}, KL {path.mean_kl:.4f})"
    )
    assert report.perplexity_change <= max_ppl_increase
    assert agreement >= min_greedy
    assert path.next_token_agreement >= min_path and path.decisive_agreement >= min_decisive
    assert report.next_token_agreement >= min_next_token
    assert report.decisive_agreement >= min_decisive
    assert report.mean_kl <= max_kl


def test_gguf_kept_quantized(smollm2_path, _smollm2_pristine, smollm2_tokenizer, reference):
    """Q4_1 blocks kept: weights equal transformers' dequantized ones; only bf16 activation rounding differs."""
    ids, ref_logits, tokens_fp32, _ = reference
    model = optimum_atb.load_gguf(*smollm2_path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 30 * 7 and all(m.bits == 4 and m.group_size == 32 for m in linears.values())
    for name in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.29.mlp.down_proj",
    ):
        expected = _smollm2_pristine.get_submodule(name).weight.double()
        assert torch.equal(linears[name].dequantized_weight(torch.float64), expected), name
    quant_bytes = sum(
        m.weight.numel() + 4 * (m.weight_scale.numel() + m.weight_zero.numel()) for m in linears.values()
    )
    float_bytes = sum(4 * _smollm2_pristine.get_submodule(n).weight.numel() for n in linears)
    assert quant_bytes < 0.2 * float_bytes
    report = evaluate(model, ref_logits, ids)
    agreement = (greedy(model, smollm2_tokenizer) == tokens_fp32).float().mean().item()
    print(f"\nGGUF Q4_1 kept: {report}; greedy agreement {agreement:.1%}; "
          f"linear weights {quant_bytes / 2**20:.1f} MiB vs {float_bytes / 2**20:.1f} MiB fp32")  # fmt: skip
    assert abs(report.perplexity_change) < 0.02  # measured +1.2%: bf16 activations and bf16 scale/zero
    assert agreement >= 0.8
    assert report.decisive_agreement >= 0.99 and report.mean_kl <= 0.003  # measured: 100%, 0.0019
