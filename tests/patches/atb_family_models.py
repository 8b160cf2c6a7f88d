"""Tiny random models (hidden 64, 2 layers), one per family quirk, and the stock eager reference."""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 96
PAD = 0
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
)
WINDOW = 6  # shorter than every prompt used in the tests

CONFIGS = {
    # llama3 rope scaling, attention bias, tied embeddings, head_dim (32) != hidden / heads (16)
    "llama-llama3": lambda: LlamaConfig(
        **COMMON,
        head_dim=32,
        attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # yarn rope scaling, untied embeddings, MLP bias
    "llama-yarn": lambda: LlamaConfig(
        **COMMON,
        mlp_bias=True,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral-window": lambda: MistralConfig(**COMMON, sliding_window=WINDOW),
    # layer 0 full attention, layer 1 sliding; q/k/v biases
    "qwen2-window": lambda: Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "qwen3-qknorm": lambda: Qwen3Config(**COMMON, head_dim=32),
    # partial rotary (half of head_dim), qkv_proj / gate_up_proj fused in the checkpoint
    "phi3-partial": lambda: Phi3Config(
        **COMMON, partial_rotary_factor=0.5, sliding_window=WINDOW, resid_pdrop=0.0
    ),
    "gemma-geglu": lambda: GemmaConfig(**COMMON, head_dim=16, hidden_act="gelu_pytorch_tanh"),
    # softcap small enough to bite, sandwich norms, alternating sliding window
    "gemma2-softcap": lambda: Gemma2Config(
        **COMMON,
        head_dim=16,
        sliding_window=WINDOW,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
        query_pre_attn_scalar=16,
    ),
}


def _randomize(model: torch.nn.Module) -> None:
    """Weights large enough for the quirks to matter (norm weights != init, softcap active)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def stock_model(name: str, dtype: torch.dtype = torch.float32):
    """The reference: a stock eager model with deterministic random weights."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    _randomize(model)
    return model.to(dtype).eval()


def plugin_model(stock, entry: str):
    """A copy of `stock` through one entry point: ``"attn"`` (attn_implementation="atb") or ``"to_atb"``."""
    model = copy.deepcopy(stock)
    if entry == "attn":
        model.set_attn_implementation("atb")
        return model
    return model.to_atb()


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=g)


def left_padded(lengths: tuple[int, ...]) -> tuple[list[torch.Tensor], dict]:
    """Prompts of the given lengths, alone and as one left-padded batch."""
    prompts = [prompt(n, seed=i + 1) for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    return prompts, {"input_ids": ids, "attention_mask": mask}


def greedy(model, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            **kwargs,
        )
