"""SmolLM2-135M (fp32): greedy text after to_atb(), to_atb(compile=True) and with attn_implementation="atb"
equals stock."""

from __future__ import annotations

import copy

import pytest
import torch

import optimum_atb  # noqa: F401  (registers "atb", attaches to_atb)

RAW = [
    "The history of the printing press begins in the fifteenth century, when",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Photosynthesis is the process by which green plants",
]
CHAT = ["What is the capital of France?", "Write a haiku about the sea."]
NEW_TOKENS = 64


def _batch(tokenizer) -> dict:
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True
        )
        for c in CHAT
    ]
    tokenizer.padding_side = "left"
    return dict(tokenizer(RAW + chats, return_tensors="pt", padding=True))


def _greedy(model, batch, tokenizer) -> list[str]:
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :])


@pytest.mark.real_model
@pytest.mark.slow
def test_greedy_text_identical_to_stock(smollm2, smollm2_tokenizer):
    batch = _batch(smollm2_tokenizer)
    converted = copy.deepcopy(smollm2).to_atb()
    attn_only = copy.deepcopy(smollm2)
    attn_only.set_attn_implementation("atb")
    compiled = copy.deepcopy(smollm2).to_atb(compile=True)
    expected = _greedy(smollm2, batch, smollm2_tokenizer)
    assert _greedy(converted, batch, smollm2_tokenizer) == expected
    assert _greedy(attn_only, batch, smollm2_tokenizer) == expected
    assert _greedy(compiled, batch, smollm2_tokenizer) == expected
    assert hasattr(compiled, "_compiled_call")  # decoded through the compiled static-shape step
