"""How far a quantized model is from its float reference, teacher-forced on a fixed text.

Next-token agreement alone overstates the damage on a small model: where the reference's two best
tokens are nearly tied, any perturbation of the weights (bf16 rounding included) flips the argmax. So
beside perplexity and agreement this reports the agreement on *decisive* positions, where the
reference's top token leads the runner-up by at least ``margin`` logits, and the mean KL divergence
of the quantized model's next-token distribution from the reference's (llama.cpp's
``perplexity --kl-divergence`` reports the same pair of figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

DECISIVE_MARGIN = 1.0  # logits between the reference's top two tokens (a 2.7x probability ratio)


@dataclass
class QualityReport:
    """Teacher-forced comparison of a model with its reference over ``positions`` next-token predictions."""

    perplexity: float
    reference_perplexity: float
    next_token_agreement: float  # share of positions where both argmaxes are equal
    decisive_agreement: float  # the same over positions where the reference's top-2 margin >= margin
    decisive_share: float  # share of positions that are decisive
    mean_kl: float  # mean KL(reference || model) in nats
    positions: int
    margin: float

    @property
    def perplexity_change(self) -> float:
        return self.perplexity / self.reference_perplexity - 1

    def __str__(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} vs {self.reference_perplexity:.3f} "
            f"({self.perplexity_change:+.2%}); next-token agreement {self.next_token_agreement:.1%} of "
            f"{self.positions}; on decisive positions (margin >= {self.margin:g}, "
            f"{self.decisive_share:.0%} of them) {self.decisive_agreement:.1%}; mean KL {self.mean_kl:.4f}"
        )


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """How far each row's top logit leads its runner-up: logits [T, V] -> [T]."""
    top2 = logits.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def compare_logits(
    logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor, margin: float = DECISIVE_MARGIN
) -> QualityReport:
    """Compare next-token logits [T, V] of a model and its reference; ``targets`` [T] are the true next
    tokens (for perplexity)."""
    if logits.shape != reference.shape or logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits and reference of one shape [T, V] and targets [T], got "
            f"{tuple(logits.shape)}, {tuple(reference.shape)} and {tuple(targets.shape)}"
        )
    ref = reference.double()
    logp, ref_logp = logits.double().log_softmax(-1), ref.log_softmax(-1)
    same = logits.argmax(-1) == reference.argmax(-1)
    decisive = top2_margin(ref) >= margin
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)

    def ppl(lp: torch.Tensor) -> float:
        return math.exp(-lp.gather(1, targets[:, None]).mean().item())

    return QualityReport(
        perplexity=ppl(logp),
        reference_perplexity=ppl(ref_logp),
        next_token_agreement=same.double().mean().item(),
        decisive_agreement=same[decisive].double().mean().item() if decisive.any() else float("nan"),
        decisive_share=decisive.double().mean().item(),
        mean_kl=kl.mean().item(),
        positions=targets.numel(),
        margin=margin,
    )


@torch.inference_mode()
def next_token_logits(model: nn.Module, input_ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Float32 logits [T - n_chunks, V] predicting each next token of ``input_ids`` [1, T], computed in
    independent chunks of `chunk` tokens (the last position of each chunk has no target and is dropped)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"expected input_ids of shape [1, T], got {tuple(input_ids.shape)}")
    parts = []
    for start in range(0, input_ids.shape[1], chunk):
        piece = input_ids[:, start : start + chunk]
        if piece.shape[1] > 1:
            parts.append(model(piece).logits[0, :-1].float())
    return torch.cat(parts)


def next_token_targets(input_ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The true next tokens matching :func:`next_token_logits`'s rows."""
    parts = [input_ids[0, start + 1 : start + chunk] for start in range(0, input_ids.shape[1], chunk)]
    return torch.cat([p for p in parts if p.numel()])


def evaluate(
    model: nn.Module,
    reference: nn.Module | torch.Tensor,
    input_ids: torch.Tensor,
    margin: float = DECISIVE_MARGIN,
    chunk: int = 512,
) -> QualityReport:
    """Teacher-forced :class:`QualityReport` of `model` against `reference` (a model, or its logits from
    :func:`next_token_logits`, to reuse them across several models) on ``input_ids`` [1, T]."""
    ref = reference if isinstance(reference, torch.Tensor) else next_token_logits(reference, input_ids, chunk)
    return compare_logits(
        next_token_logits(model, input_ids, chunk), ref, next_token_targets(input_ids, chunk), margin
    )


@torch.inference_mode()
def greedy_continuations(model: nn.Module, tokenizer, prompts: list[str], new_tokens: int) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens [len(prompts), new_tokens] after each prompt (left-padded batch),
    for position-wise greedy agreement between a model and its reference."""
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
    )
    return out[:, inputs["input_ids"].shape[1] :]


@torch.inference_mode()
def continuation_logits(
    model: nn.Module, tokenizer, prompts: list[str], continuation: torch.Tensor
) -> torch.Tensor:
    """Float32 logits [B * T, V] of `model` predicting each token of `continuation` [B, T] (a reference's
    :func:`greedy_continuations` of `prompts`) from its prompt and the continuation's earlier tokens.

    Teacher-forced on the reference's own greedy text, so each position counts one decision: compared with
    the reference's logits (:func:`compare_logits`, ``targets=continuation.reshape(-1)``) this gives the
    agreement along the reference's greedy path, where position-wise greedy agreement lets one early
    near-tie flip change every later token of its row."""
    if continuation.dim() != 2 or continuation.shape[0] != len(prompts):
        raise ValueError(
            f"expected a continuation [len(prompts)={len(prompts)}, T], got {tuple(continuation.shape)}"
        )
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    ids = torch.cat([inputs["input_ids"], continuation], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(continuation)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    start = inputs["input_ids"].shape[1] - 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, start:-1]
    return logits.float().reshape(-1, logits.shape[-1])
