"""Tiny random LLaMA models for the speculative decoder's tests."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab: int = 64, seed: int = 0, hidden: int = 64, layers: int = 2, scale: float = 0.3):
    """A random LlamaForCausalLM with peaked next-token distributions (large init), EOS disabled."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=scale,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def noisy_copy(model, noise: float, seed: int = 1):
    """A copy of `model` with Gaussian noise on every weight: a draft that is often but not always right."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return draft


def padded_batch(vocab: int, rows: int = 4, width: int = 9, seed: int = 0):
    """Left-padded random prompts of different lengths (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, width), generator=gen)
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, : (r * 2) % width] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}
